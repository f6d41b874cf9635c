"""A bulk job's outputs as sinks, unit-tested in-process on a dict batch (no Ray, no S3): the
files of each mask in writing order, the mask last; a new output is one new sink; the manifest
hears the same lifecycle and records what a stopped job wrote but never reported."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import rasterio
from affine import Affine

from segray.bulk import sinks as sinks_mod
from segray.bulk.config import PredictConfig
from segray.bulk.manifest import Manifest, read_manifest
from segray.bulk.rows import columns, objects, pack
from segray.bulk.sinks import File, Output, Sink, job_sinks
from segray.bulk.stages import write_masks
from segray.models.saving import ModelCard

CRS = "EPSG:32633"
TRANSFORM = Affine(0.5, 0, 500_000, 0, -0.5, 4_000_000)


def _card() -> ModelCard:
    return ModelCard(name="unet", num_classes=2, input_shape=(16, 16, 3), class_names=("bg", "b"))


def _predicted(tmp_path, n: int = 3, broken: int | None = None) -> dict[str, np.ndarray]:
    """A batch as the Predictor hands it to the write stage: masks, class ids, uncertainty."""
    rows = []
    for i in range(n):
        labels = np.zeros((16, 16), np.uint8)
        labels[2 : 6 + i, 3:9] = 1
        mask, shape, dtype = pack(labels)
        rows.append(
            {
                "input_uri": str(tmp_path / "in" / f"t{i}.tif"),
                "output_uri": str(tmp_path / "out" / f"t{i}.tif"),
                "source": "",
                "error": "broken tile" if i == broken else "",
                "seconds": 0.0,
                "pixels": mask,
                "shape": shape,
                "dtype": dtype,
                "format": "tiff",
                "crs": CRS,
                "transform": list(TRANSFORM)[:6],
                "class_fractions": [0.5, 0.5],
                "uncertainty": (labels * 100).tobytes(),
                "labels": labels.tobytes(),
            }
        )
    return columns(rows)


def _config(tmp_path, **kw) -> PredictConfig:
    return PredictConfig(model="m", input=str(tmp_path / "in"), output=str(tmp_path / "out"), **kw)


def test_the_files_of_a_mask_come_in_sink_order_the_mask_last(tmp_path):
    config = _config(tmp_path, mc_samples=2, footprints=1)
    card = _card()
    sinks = job_sinks(config, card)
    assert [type(s).__name__ for s in sinks] == [
        "UncertaintySink",
        "FootprintsSink",
        "StacItemSink",
        "MaskSink",
    ]
    rows = write_masks(_predicted(tmp_path, broken=1), config, sinks)
    assert list(rows["status"]) == ["ok", "error", "ok"] and rows["error"][1] == "broken tile"
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == sorted(
        f"t{i}{ext}" for i in (0, 2) for ext in (".tif", ".uncertainty.tif", ".geojson", ".json")
    )
    assert rows["footprints_uri"][2] == str(out / "t2.geojson")
    assert rows["item_uri"][0] == str(out / "t0.json") and rows["output_uri"][1] == ""
    with rasterio.open(out / "t2.tif") as ds:
        assert ds.crs.to_string() == CRS and ds.transform == TRANSFORM
        assert int((ds.read(1) == 1).sum()) == 6 * 6  # rows 2:8, columns 3:9
    doc = json.loads((out / "t2.geojson").read_text())
    (feature,) = doc["features"]
    assert feature["properties"] == {"class": 1, "name": "b", "pixels": 36}
    output = sinks_mod.Output(
        uri=str(out / "x.tif"),
        input_uri="x",
        like=sinks_mod.Tile(np.empty((0, 0, 1)), "x", "tiff", CRS, TRANSFORM),
        shape=(16, 16),
        mask=np.zeros((16, 16), np.uint8),
        uncertainty=np.zeros((16, 16), np.uint8),
        labels=lambda: np.zeros((16, 16), np.uint8),
    )
    files, uris = sinks_mod.files_of(sinks, output)
    assert [name for name, _ in files][-1] == str(out / "x.tif")
    assert set(uris) == {"output_uri", "uncertainty_uri", "footprints_uri", "item_uri"}


class AreaSink(Sink):
    """A new output of a job: one text file beside each mask with its class-1 area."""

    column = None
    needs_labels = True

    def files(self, output: Output) -> list[File]:
        area = int((output.class_ids() == 1).sum())
        return [(output.uri[: -len(".tif")] + ".area.txt", str(area).encode())]


def test_a_new_output_is_one_new_sink(tmp_path):
    """The stage writes whatever the job's sinks make, before the mask, with nothing else
    changed; a sink that fails on one tile makes that tile's error, the others are written."""
    config = _config(tmp_path, footprints=1, stac_items=False)
    base = job_sinks(config, _card())
    rows = write_masks(_predicted(tmp_path), config, (AreaSink(), *base))
    assert list(rows["status"]) == ["ok"] * 3
    assert [(tmp_path / "out" / f"t{i}.area.txt").read_text() for i in range(3)] == [
        "24",
        "30",
        "36",
    ]
    batch = _predicted(tmp_path)
    batch["labels"] = objects([batch["labels"][0], b"short", batch["labels"][2]])
    (tmp_path / "out" / "t1.tif").unlink()
    rows = write_masks(batch, config, (AreaSink(), *base))
    assert list(rows["status"]) == ["ok", "error", "ok"]
    assert "t1.tif: cannot write mask" in rows["error"][1]
    assert not (tmp_path / "out" / "t1.tif").exists()  # nothing of a failed tile's mask


def test_a_new_output_with_a_manifest_column_is_one_class_and_nothing_else(tmp_path):
    """Defining the sink class is all: the job makes it, the write stage's rows and the
    manifest name its file in its column, and a rerun plans again an input whose file is gone."""
    from segray.bulk.manifest import schema
    from segray.bulk.plan import plan

    class AreaFileSink(Sink):
        column = "area_uri"
        needs_labels = True

        @classmethod
        def made(cls, config):
            return True

        @classmethod
        def build(cls, config, card, run_id):
            return cls()

        @staticmethod
        def beside(mask):
            return mask.rsplit(".", 1)[0] + ".area.txt"

        def files(self, output):
            area = int((output.class_ids() == 1).sum())
            return [(self.beside(output.uri), str(area).encode())]

    try:
        (tmp_path / "in").mkdir()
        for i in range(3):
            (tmp_path / "in" / f"t{i}.tif").write_bytes(b"a tile")
        config = _config(tmp_path, stac_items=False)
        sinks = job_sinks(config, _card())
        assert [type(s).__name__ for s in sinks] == ["AreaFileSink", "MaskSink"]
        assert "area_uri" in schema().names
        rows = write_masks(_predicted(tmp_path), config, sinks)
        out = tmp_path / "out"
        assert list(rows["area_uri"]) == [str(out / f"t{i}.area.txt") for i in range(3)]
        assert (out / "t2.area.txt").read_text() == "36"
        manifest = Manifest(str(out), "model", "v1")
        manifest.on_rows(rows)
        table = read_manifest(manifest.close(1.0).manifest)
        assert table.column("area_uri").to_pylist() == list(rows["area_uri"])
        assert table.column("footprints_uri").to_pylist() == [None] * 3  # not made: null
        (out / "t1.area.txt").unlink()
        todo, done = plan(config)
        assert [t[0] for t in todo] == [str(tmp_path / "in" / "t1.tif")] and len(done) == 2
    finally:
        Sink.kinds.remove(AreaFileSink)
    assert "area_uri" not in schema().names


def test_the_manifest_hears_the_lifecycle_and_records_what_a_stop_left(tmp_path):
    """Rows arrive by block; after a stop, a mask the driver never saw reported but that
    exists gets its ok row; one that was never written gets none."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "b.tif").write_bytes(b"written by a block in flight")
    todo = [(f"in/{n}.tif", str(out / f"{n}.tif")) for n in ("a", "b", "c")]
    manifest = Manifest(str(out), "model", "v1", files=lambda mask: {"output_uri": mask})
    manifest.on_write_start()
    manifest.record_settled([("in/z.tif", "", "refused: a symbolic link")], todo)
    block = {
        "input_uri": ["in/a.tif"],
        "status": ["ok"],
        "error": [""],
        "output_uri": [str(out / "a.tif")],
        "class_fractions": [[0.25, 0.75]],
        "seconds": [0.1],
    }
    manifest.on_rows(block)
    manifest.on_write_failed("disk full")
    result = manifest.close(1.0)
    rows = {r["input_uri"]: r for r in read_manifest(result.manifest).to_pylist()}
    assert set(rows) == {"in/z.tif", "in/a.tif", "in/b.tif"}
    assert rows["in/b.tif"]["status"] == "ok" and rows["in/b.tif"]["class_fractions"] is None
    assert rows["in/a.tif"]["class_fractions"] == pytest.approx([0.25, 0.75])
    assert rows["in/z.tif"]["status"] == "error"


def test_one_row_codec_carries_a_tile_and_its_georeference_both_ways():
    from segray.bulk.rows import failed_tile, pixels_of, tile_columns
    from segray.io.imagery import Tile

    rng = np.random.default_rng(1)
    valid = np.ones((5, 7), bool)
    valid[0, :3] = False
    tiles = [
        Tile(rng.integers(0, 9, (5, 7, 2), np.uint16), "a.tif", "tiff", CRS, TRANSFORM, {}, valid),
        Tile(rng.random((4, 4, 3), dtype=np.float32), "b.png", "png"),  # no georeference
    ]
    rows = [{"input_uri": t.source, **tile_columns(t)} for t in tiles]
    rows.append({"input_uri": "c.tif", **failed_tile("c.tif: broken", 0.1)})
    batch = columns(rows)
    for i, tile in enumerate(tiles):
        back = pixels_of(batch, i)
        np.testing.assert_array_equal(back.array, tile.array)
        assert back.array.dtype == tile.array.dtype and back.source == tile.source
        assert (back.crs, back.transform, back.format) == (tile.crs, tile.transform, tile.format)
        assert (back.valid is None) == (tile.valid is None)
    np.testing.assert_array_equal(pixels_of(batch, 0).valid, valid)
    assert batch["error"][2] == "c.tif: broken" and batch["crs"][1] == ""
