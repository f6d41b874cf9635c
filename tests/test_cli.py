"""The CLI through click's runner, and the import-time promise (no tensorflow, no ray)."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
import rasterio
from click.testing import CliRunner

from segray.cli import cli
from segray.devtools import synth
from segray.devtools.ports import free_port
from segray.io import imagery, storage


def test_help_lists_commands_and_import_is_light():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in ("synth", "check", "models", "demo"):
        assert command in result.output
    code = (
        "import sys, segray, segray.cli, segray.io.storage, segray.io.imagery;"
        "import segray.devtools.synth;"
        "heavy = [m for m in ('tensorflow', 'ray', 'keras', 'boto3') if m in sys.modules];"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_synth_to_s3_endpoint(s3_endpoint):
    out = "s3://cli-synth-bucket/x"
    result = CliRunner().invoke(
        cli,
        ["synth", "--out", out, "--s3-endpoint", s3_endpoint, "--count", "3", "--size", "32"],
    )
    assert result.exit_code == 0, result.output
    files = storage.list_files(out, endpoint=s3_endpoint)
    names = sorted(storage.relative_to(out, f) for f in files)
    assert names == [
        "classes.json",
        *[f"images/tile_{i:05d}.png" for i in range(3)],
        *[f"masks/tile_{i:05d}.png" for i in range(3)],
    ]
    image, mask = synth.generate_tile(32, synth.tile_seed(0, 1))
    written = imagery.decode(
        storage.read_bytes(f"{out}/images/tile_00001.png", endpoint=s3_endpoint)
    )
    assert (written.array == image).all()


def test_check_describes_geotiff_and_names_corrupt_tile(tmp_path):
    synth.write_collection(str(tmp_path), layout="geotiff", count=2, size=32)
    good = CliRunner().invoke(cli, ["check", str(tmp_path / "images")])
    assert good.exit_code == 0, good.output
    assert "EPSG:32633" in good.output and "32x32x3 uint8" in good.output

    bad = tmp_path / "broken.tif"
    bad.write_bytes((tmp_path / "images" / "tile_r000_c000.tif").read_bytes()[:300])
    result = CliRunner().invoke(cli, ["check", str(bad)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "corrupt or truncated TIFF" in lines[0]
    assert "Traceback" not in result.output


def test_check_folder_with_one_bad_tile_reports_it_and_fails(tmp_path):
    synth.write_collection(str(tmp_path), count=2, size=32)
    (tmp_path / "images" / "zero.png").write_bytes(b"")
    result = CliRunner().invoke(cli, ["check", str(tmp_path / "images")])
    assert result.exit_code == 1
    assert "zero.png: empty file" in result.output
    assert "1 of 3 tile(s) could not be read" in result.output


def test_bad_option_value_is_one_line(tmp_path):
    result = CliRunner().invoke(cli, ["synth", "--out", str(tmp_path), "--size", "4"])
    assert result.exit_code == 1
    assert "size" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_demo_end_to_end_says_where_outputs_are(tmp_path, ray_local):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--count", "16", "--size", "32", "--epochs", "2"]
    result = CliRunner().invoke(cli, [*args, "--scene-size", "96"])
    assert result.exit_code == 0, result.output
    for name in ("run/model.keras", "run/curves.png", "eval/report.md", "eval/confusion.png"):
        assert (out / name).exists(), name
        assert str(out / name.split("/")[0]) in result.output
    masks = sorted((out / "masks").rglob("*.tif"))
    tiles = sorted((out / "heldout" / "images").glob("*.tif"))
    assert len(masks) == len(tiles) == 16
    with rasterio.open(masks[0]) as m, rasterio.open(tiles[0]) as t:
        assert m.crs == t.crs and m.transform == t.transform
    with rasterio.open(out / "scene_masks" / "scene_000.tif") as scene:
        assert scene.shape == (96, 96) and scene.crs.to_string() == synth.CRS
    assert "building" in result.output and "pixel accuracy" in result.output


# --- where settings come from, and what the user sees of errors ---------------------------------


def _synth_to(out: str, *extra: str):
    return CliRunner().invoke(cli, ["synth", "--out", out, "--count", "1", "--size", "32", *extra])


def test_endpoint_precedence_flag_then_s3_variable_then_generic(s3_endpoint, monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there: using it would fail
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    result = _synth_to("s3://precedence-a/x")  # AWS_ENDPOINT_URL_S3 beats AWS_ENDPOINT_URL
    assert result.exit_code == 0, result.output
    assert storage.exists("s3://precedence-a/x/classes.json", endpoint=s3_endpoint)

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", dead)
    result = _synth_to("s3://precedence-b/x", "--s3-endpoint", s3_endpoint)  # the flag beats both
    assert result.exit_code == 0, result.output
    assert storage.exists("s3://precedence-b/x/classes.json", endpoint=s3_endpoint)

    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)  # alone, the generic variable is used
    result = _synth_to("s3://precedence-c/x")
    assert result.exit_code == 0, result.output
    assert storage.exists("s3://precedence-c/x/classes.json", endpoint=s3_endpoint)


def test_train_config_file_gives_settings_and_flags_override_them(tmp_path):
    from segray.train.config import TrainConfig
    from segray.train.driver import load_config, save_config

    saved = TrainConfig(
        data=str(tmp_path / "no-such-data"), out=str(tmp_path / "r1"), epochs=3, batch_size=4
    )
    uri = save_config(saved)
    assert TrainConfig(**load_config(uri)) == saved  # the run folder's config.yaml repeats the run
    assert TrainConfig(**load_config(str(tmp_path / "r1"))) == saved  # or its folder
    # the file's data is used ...
    result = CliRunner().invoke(cli, ["train", "--config", uri, "--out", str(tmp_path / "r2")])
    assert result.exit_code == 1
    assert "no-such-data" in result.output and "Traceback" not in result.output
    # ... and a flag given overrides the file (here with a value the config refuses, by name)
    result = CliRunner().invoke(cli, ["train", "--config", uri, "--batch-size", "3"])
    assert result.exit_code == 1
    assert "batch size 3 is not a multiple of workers 2" in result.output


def test_own_errors_are_one_line_and_bugs_keep_their_traceback():
    from segray.cli import _Group
    from segray.errors import DatasetError

    @click.group(cls=_Group)
    def group() -> None:
        pass

    @group.command()
    def ours() -> None:
        raise DatasetError("no images under /data: check --data")

    @group.command()
    def bug() -> None:
        raise KeyError("shape")

    ours_result = CliRunner().invoke(group, ["ours"])
    assert ours_result.exit_code == 1
    assert ours_result.output.strip() == "Error: no images under /data: check --data"
    bug_result = CliRunner().invoke(group, ["bug"])
    assert isinstance(bug_result.exception, KeyError)  # not turned into a user error


NATIVE_DEMO = r"""
import ctypes, sys
from segray import log
log.filter_native_stderr()
libc = ctypes.CDLL(None)
def native(text):
    data = text.encode()
    libc.write(2, data, len(data))
native("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n")
native("I0000 00:00:1796350133.471022   17815 port.cc:153] oneDNN custom operations are on.\n")
print("python says hello", file=sys.stderr)
native("[2026-12-04 02:11:26,099 E 17815 17815] core_worker.cc:2465: Actor with class name: ")
native("'MapWorker' has constructor arguments in the object store and max_restarts > 0.\n")
native("a native line of the user's own\n")
native("no newline at the end")
"""


@pytest.mark.parametrize("verbosity", ["0", "1"])
def test_native_log_lines_reach_the_terminal_only_when_verbose(verbosity):
    env = {**__import__("os").environ, "SEGRAY_VERBOSITY": verbosity}
    proc = subprocess.run(
        [sys.executable, "-c", NATIVE_DEMO], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert "python says hello" in lines
    assert "a native line of the user's own" in lines and lines[-1] == "no newline at the end"
    native = [line for line in lines if "port.cc" in line or "core_worker.cc" in line]
    native += [line for line in lines if "absl::InitializeLog" in line]
    if verbosity == "0":
        assert native == [], proc.stderr
    else:  # -v: every line, the one written in two pieces whole
        assert len(native) == 3, proc.stderr
        assert any(line.endswith("max_restarts > 0.") for line in native)


def test_every_command_parses_with_only_its_required_options():
    """Each command's options, parsed by click with nothing but what is required, make a valid
    config: an option with an empty default (``--allow-source``) falls back to the config's."""
    from segray.bulk.config import PredictConfig
    from segray.cli.options import from_options
    from segray.evaluate.evaluate import EvalConfig
    from segray.serve.config import ServeConfig

    cases = [
        ("serve", ServeConfig, ["--model", "m"], {"model_uri"}),
        ("predict", PredictConfig, ["--model", "m", "--input", "i", "--output", "o"], set()),
        ("eval", EvalConfig, ["--model", "m", "--data", "d", "--out", "r"], set()),
    ]
    for name, config, args, named in cases:
        ctx = cli.commands[name].make_context(name, list(args))
        made = from_options(config, ctx.params)
        given = named | {a[2:].replace("-", "_") for a in args if a.startswith("--")}
        for field, info in config.model_fields.items():
            if not info.is_required() and field in ctx.params and field not in given:
                assert getattr(made, field) == info.get_default(call_default_factory=True), field
    assert (
        from_options(ServeConfig, {"model_uri": "m", "allowed_sources": None}).allowed_sources == ()
    )
