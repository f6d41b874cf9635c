"""The online path through real HTTP on 127.0.0.1: masks, validation, batching, token, config."""

from __future__ import annotations

import importlib
import json
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import yaml
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

from segray import inference
from segray.devtools import synth
from segray.devtools.ports import free_port
from segray.errors import ConfigError
from segray.io import imagery, storage
from segray.models import saving
from segray.serve import app as serve
from segray.serve import http
from segray.serve.config import ServeConfig

pytestmark = pytest.mark.slow

SIZE = 32
TOKEN = "s3cret-token"
MAX_BODY = 256 * 1024
MAX_WINDOWS = 16  # a 32 px model with overlap 16: 100x100 px is 36 windows
MAX_PIXELS = 128 * 128


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A tiny untrained binary U-Net at 32x32x3, saved as a segray model folder."""
    from segray.models import build_model

    folder = str(tmp_path_factory.mktemp("model"))
    model = build_model("unet", 2, (SIZE, SIZE, 3), base_filters=4, depth=2)
    card = saving.ModelCard(
        name="unet",
        num_classes=2,
        input_shape=(SIZE, SIZE, 3),
        class_names=["background", "building"],
        dtype="uint8",
    )
    saving.save_model(model, card, folder)
    return folder


@pytest.fixture(scope="module")
def loaded(model_dir):
    """The same model loaded in the test process, for the shared-path masks."""
    return saving.load_model(model_dir)


@pytest.fixture(scope="module")
def url(ray_local, model_dir) -> str:
    """Serve on a free port with the open app at / (Serve shut down after the module)."""
    from ray import serve as ray_serve

    port = free_port()
    ray_serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = serve.build_app(
        ServeConfig(
            model_uri=model_dir,
            max_batch_size=16,
            batch_wait_timeout_s=0.05,
            max_body_bytes=MAX_BODY,
            max_pixels=MAX_PIXELS,
            max_windows=MAX_WINDOWS,
            body_timeout_s=4.0,
            chunk_timeout_s=1.0,
            num_cpus=0.5,
        )
    )
    ray_serve.run(app, name="segray-test", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    ray_serve.shutdown()


@pytest.fixture(scope="module")
def secure_url(url, model_dir, s3_endpoint) -> str:
    """A second app at /secure with a bearer token, its model read from the moto S3 server."""
    from ray import serve as ray_serve

    prefix = f"s3://segray-test/{uuid.uuid4().hex[:12]}"
    storage.make_bucket(prefix, endpoint=s3_endpoint)
    for name in (saving.MODEL_FILE, saving.CARD_FILE):
        with open(f"{model_dir}/{name}", "rb") as f:
            storage.write_bytes(f"{prefix}/model/{name}", f.read(), endpoint=s3_endpoint)
    config = ServeConfig(
        model_uri=f"{prefix}/model",
        api_token=TOKEN,
        endpoint=s3_endpoint,
        num_cpus=0.5,
        max_batch_size=4,
    )
    app = serve.build_app(config)
    ray_serve.run(app, name="segray-secure", route_prefix="/secure")
    return f"{url}/secure"


@pytest.fixture(scope="module")
def uint16_url(url, tmp_path_factory) -> tuple[str, str]:
    """A third app at /u16: a 4-band model of uint16 data *fitted* on synthetic buildings
    (:mod:`segray.devtools.fitted`; its masks are not constant), standardised by the statistics
    in its card, served with test-time augmentation over the 8 symmetries of the square."""
    from ray import serve as ray_serve

    from segray.devtools.fitted import fit_unet

    folder = fit_unet(str(tmp_path_factory.mktemp("model16")), SIZE, bands=4, dtype="uint16")
    ray_serve.run(
        serve.build_app(ServeConfig(model_uri=folder, num_cpus=0.5, tta="d4")),
        name="segray-u16",
        route_prefix="/u16",
    )
    return f"{url}/u16", folder


@pytest.fixture(scope="module")
def onnx_url(uint16_url) -> str:
    """A fourth app at /onnx: the same fitted model's ONNX export, in ONNX Runtime."""
    from ray import serve as ray_serve

    from segray.inference.export import ExportConfig, export_model

    _, folder = uint16_url
    export_model(ExportConfig(model=folder))
    config = ServeConfig(model_uri=folder, num_cpus=0.5, tta="d4", runtime="onnx")
    ray_serve.run(serve.build_app(config), name="segray-onnx", route_prefix="/onnx")
    return f"{uint16_url[0].rsplit('/', 1)[0]}/onnx"


def tile_png(seed: int = 1, size: int | tuple[int, int] = SIZE, bands: int = 3) -> bytes:
    return imagery.encode_png(synth.generate_tile(size, seed, "binary", bands)[0])


def shared_mask(data: bytes, model_card) -> np.ndarray:
    """The mask the shared functions give for these bytes: decode, prepare, infer, render."""
    model, card = model_card
    array = inference.prepare(imagery.decode(data), card)
    return inference.render(inference.infer(model, array[None], card), card)[0]


def png_mask(response: requests.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return imagery.as_mask(imagery.decode(response.content).array)


def post(url: str, data: bytes, **kwargs) -> requests.Response:
    return requests.post(f"{url}/v1/segment", data=data, timeout=60, **kwargs)


# --- through HTTP -----------------------------------------------------------------------------


def test_bench_serve_smoke(ray_local, model_dir):
    """Runs before the module's Serve starts; each ingress runs in a child with its own Ray."""
    from segray.devtools.bench.serve import bench_serve
    from segray.serve.ingress import haproxy_binary

    both = haproxy_binary() is not None
    lines: list[str] = []
    result = bench_serve(
        model_dir,
        requests_per_level=4,
        concurrencies=(1, 2),
        max_batch_size=4,
        ceiling_seconds=0.2,
        ingresses=("proxy", "haproxy") if both else ("proxy",),
        echo=lines.append,
    )
    assert result["ceiling_images_per_s"] > 0
    for name, figures in result["ingresses"].items():
        assert figures["ingress"] == name and figures["ratio_to_ceiling"] > 0
        assert set(figures["runs"]) == {"batching", "no_batching"}
        assert all(f["errors"] == 0 for run in figures["runs"].values() for f in run.values())
        assert all(f["requests"] == 4 for run in figures["runs"].values() for f in run.values())
    report = "\n".join(lines)
    assert "x ceiling" in report and "Little's law floor" in report
    assert ("haproxy / proxy throughput" in report) == both


def test_bench_serve_refuses_an_unknown_ingress():
    from segray.devtools.bench.serve import bench_serve
    from segray.errors import ConfigError

    with pytest.raises(ConfigError, match="--ingress: 'nginx'"):
        bench_serve(ingresses=("proxy", "nginx"))


def test_health_model_and_docs(url):
    assert requests.get(f"{url}/healthz", timeout=10).json()["status"] == "ok"
    info = requests.get(f"{url}/v1/model", timeout=10).json()
    assert info["classes"] == ["background", "building"]
    assert info["input_size"] == [SIZE, SIZE] and info["channels"] == 3 and info["version"]
    assert requests.get(f"{url}/docs", timeout=10).status_code == 200
    assert "/v1/segment" in requests.get(f"{url}/openapi.json", timeout=10).json()["paths"]


def test_png_mask_equals_shared_path(url, loaded):
    for seed in (1, 2, 3):
        data = tile_png(seed)
        np.testing.assert_array_equal(png_mask(post(url, data)), shared_mask(data, loaded))
    multipart = requests.post(
        f"{url}/v1/segment", files={"file": ("t.png", data, "image/png")}, timeout=60
    )
    np.testing.assert_array_equal(png_mask(multipart), shared_mask(data, loaded))


def test_geotiff_mask_and_json_polygons_in_crs(url, loaded, tmp_path):
    synth.write_collection(str(tmp_path), "geotiff", count=1, size=SIZE, mode="binary")
    data = (tmp_path / "images" / "tile_r000_c000.tif").read_bytes()
    np.testing.assert_array_equal(png_mask(post(url, data)), shared_mask(data, loaded))

    doc = post(url, data, params={"class": 1}, headers={"Accept": "application/json"}).json()
    assert doc["shape"] == [SIZE, SIZE] and doc["crs"] == synth.CRS
    assert sum(doc["fractions"].values()) == pytest.approx(1.0)
    expected = inference.class_fractions(shared_mask(data, loaded), 2)
    assert list(doc["fractions"].values()) == pytest.approx(expected)
    polygons = doc["polygons"]
    assert polygons["type"] == "FeatureCollection" and polygons["features"]
    # the one vectorisation: the footprints bulk --footprints writes for this tile
    tile = imagery.decode(data)
    same = inference.footprint_doc(shared_mask(data, loaded), tile, 1, "building")
    assert polygons == json.loads(json.dumps(same))
    # RFC 7946: WGS84 longitude and latitude (UTM 33N, 500 km E, 5,000 km N: 15° E, 45.15° N)
    for feature in polygons["features"]:
        for x, y in feature["geometry"]["coordinates"][0]:
            assert abs(x - 15.0) < 0.01 and abs(y - 45.15) < 0.01


def test_json_polygons_in_pixels_for_png(url):
    doc = post(url, tile_png(4), params={"format": "json", "class": 1}).json()
    assert doc["crs"] is None and sum(doc["fractions"].values()) == pytest.approx(1.0)
    for feature in doc["polygons"]["features"]:
        for x, y in feature["geometry"]["coordinates"][0]:
            assert 0 <= x <= SIZE and 0 <= y <= SIZE


def test_any_size_is_windowed_like_the_bulk_path(url, loaded):
    model, card = loaded
    data = tile_png(5, (2 * SIZE, 2 * SIZE))
    mask = png_mask(post(url, data))
    array = inference.prepare(imagery.decode(data), card)
    # Windows of 32 over 64 px with overlap 16 start at 0, 16, 32: the outer corners of the
    # first and last windows are theirs alone.
    first, last = (array[:SIZE, :SIZE], array[SIZE:, SIZE:])
    logits = inference.infer(model, np.stack([first, last]), card)
    corners = inference.render(logits, card)
    np.testing.assert_array_equal(mask[:16, :16], corners[0][:16, :16])
    np.testing.assert_array_equal(mask[-16:, -16:], corners[1][-16:, -16:])
    assert png_mask(post(url, tile_png(6, (50, 70)))).shape == (50, 70)
    assert png_mask(post(url, tile_png(7, (20, 24)))).shape == (20, 24)


def _bad_inputs() -> list[tuple[str, dict, int, str]]:
    good = tile_png(8)
    rgba = imagery.encode_png(synth.generate_tile(SIZE, 8, "binary", 4)[0])
    boundary = "b0undary"
    no_file = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="x"\r\n\r\nhi\r\n--{boundary}--'
    )
    return [
        ("empty", {"data": b""}, 400, "empty body"),
        ("not an image", {"data": b"hello, not an image"}, 415, "unsupported media type"),
        ("truncated", {"data": good[: len(good) // 2]}, 400, "corrupt or truncated image"),
        ("4 bands", {"data": rgba}, 415, "unsupported band count"),
        ("float64", {"data": imagery.encode_geotiff(np.zeros((8, 8, 3)))}, 415, "unsupported"),
        (
            "uint16",
            {"data": imagery.encode_geotiff(np.full((8, 8, 3), 900, np.uint16))},
            415,
            "unsupported image",
        ),
        ("17 bands", {"data": imagery.encode_geotiff(np.zeros((8, 8, 17), np.uint8))}, 415, ""),
        ("body", {"data": good + b"\0" * MAX_BODY}, 413, "body too large"),
        ("pixels", {"data": imagery.encode_png(np.zeros((200, 200), np.uint8))}, 413, "too large"),
        (
            "multipart",
            {
                "data": no_file.encode(),
                "headers": {"Content-Type": f"multipart/form-data; boundary={boundary}"},
            },
            400,
            "invalid multipart body",
        ),
        (
            "two files",
            {
                "data": b"".join(
                    f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                    f'filename="{n}.png"\r\n\r\n'.encode()
                    + good
                    + b"\r\n"
                    for n in "ab"
                )
                + f"--{boundary}--\r\n".encode(),
                "headers": {"Content-Type": f"multipart/form-data; boundary={boundary}"},
            },
            400,
            "invalid multipart body",
        ),
        ("format", {"data": good, "params": {"format": "xml"}}, 400, "invalid request"),
        ("class", {"data": good, "params": {"class": 7}}, 400, "invalid request"),
        ("threshold", {"data": good, "params": {"threshold": "high"}}, 400, "invalid request"),
    ]


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_bad_input_gets_4xx_json_and_service_goes_on(url, loaded, case):
    _, kwargs, status, error = case
    response = requests.post(f"{url}/v1/segment", timeout=60, **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"} and body["detail"]
    assert error in body["error"]
    good = tile_png(9)
    np.testing.assert_array_equal(png_mask(post(url, good)), shared_mask(good, loaded))


def test_64_concurrent_requests_are_batched(url):
    before = requests.get(f"{url}/v1/stats", timeout=10).json()["batch_sizes"]
    tiles = [tile_png(100 + i % 8) for i in range(64)]
    with ThreadPoolExecutor(64) as pool:
        codes = list(pool.map(lambda data: post(url, data).status_code, tiles))
    assert codes == [200] * 64
    after = requests.get(f"{url}/v1/stats", timeout=10).json()["batch_sizes"]
    new = {int(k): v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)}
    assert sum(k * v for k, v in new.items()) == 64
    assert max(new) > 1, new


def windowed_mask(data: bytes, model_card) -> np.ndarray:
    """The shared path's mask of an image larger than the model: windows cut, run, stitched."""
    model, card = model_card
    array = inference.prepare(imagery.decode(data), card)
    return inference.render(inference.infer_images(model, [array], card)[0][None], card)[0]


def _new_batches(url: str, before: dict, **kwargs) -> dict[int, int]:
    after = requests.get(f"{url}/v1/stats", timeout=10, **kwargs).json()["batch_sizes"]
    return {int(k): v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)}


def test_batches_are_counted_in_windows_and_a_large_request_fills_several(url, secure_url, loaded):
    # 64 px images: 9 windows each of the 32 px model (windows at 0, 16, 32 on each axis)
    images = [tile_png(200 + i, (2 * SIZE, 2 * SIZE)) for i in range(6)]
    before = requests.get(f"{url}/v1/stats", timeout=10).json()["batch_sizes"]
    with ThreadPoolExecutor(6) as pool:
        masks = list(pool.map(lambda data: png_mask(post(url, data)), images))
    for data, mask in zip(images, masks, strict=True):
        np.testing.assert_array_equal(mask, windowed_mask(data, loaded))
    new = _new_batches(url, before)
    assert sum(k * v for k, v in new.items()) == 6 * 9, new
    # at most 16 windows a batch (the app's max_batch_size), and more than one request's
    assert max(new) <= 16 and max(new) > 9, new
    # the secure app batches 4 windows: one request of 9 goes in parts, each within the limit
    auth = {"headers": {"Authorization": f"Bearer {TOKEN}"}}
    before = requests.get(f"{secure_url}/v1/stats", timeout=10, **auth).json()["batch_sizes"]
    mask = png_mask(post(secure_url, images[0], **auth))
    np.testing.assert_array_equal(mask, windowed_mask(images[0], loaded))
    new = _new_batches(secure_url, before, **auth)
    assert sum(k * v for k, v in new.items()) == 9 and max(new) <= 4, new


def test_token_required_on_v1_only(secure_url):
    data = tile_png(10)
    assert requests.get(f"{secure_url}/healthz", timeout=10).status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        response = post(secure_url, data, headers=headers)
        assert response.status_code == 401 and response.json()["error"] == "unauthorized"
        assert (
            requests.get(f"{secure_url}/v1/model", headers=headers, timeout=10).status_code == 401
        )
    right = {"Authorization": f"Bearer {TOKEN}"}
    assert post(secure_url, data, headers=right).status_code == 200
    assert requests.get(f"{secure_url}/v1/model", headers=right, timeout=10).status_code == 200


def test_bulk_predict_gives_the_same_masks(url, model_dir, tmp_path):
    from segray.bulk.config import PredictConfig
    from segray.bulk.job import predict

    folder = tmp_path / "in"
    synth.write_collection(str(folder), "paired", count=2, size=SIZE, mode="binary")
    (folder / "images" / "odd.png").write_bytes(tile_png(11, (40, 52)))
    out = tmp_path / "out"
    predict(PredictConfig(model=model_dir, input=str(folder / "images"), output=str(out)))
    for name in ("tile_00000.png", "tile_00001.png", "odd.png"):
        bulk = imagery.as_mask(imagery.decode((out / name).read_bytes()).array)
        served = png_mask(post(url, (folder / "images" / name).read_bytes()))
        np.testing.assert_array_equal(served, bulk)


def test_a_uint16_model_gives_one_mask_through_serve_bulk_and_eval(uint16_url, onnx_url, tmp_path):
    """One Segmenter on every path: bulk tiles, a bulk scene, /v1/segment and eval give the same
    masks, with test-time augmentation (d4) everywhere, from a fitted model whose masks follow
    the buildings (so no path can agree with another by giving one class everywhere)."""
    from segray.bulk.config import PredictConfig
    from segray.bulk.job import predict
    from segray.datasets import labels
    from segray.evaluate.evaluate import predict_rows

    address, model_dir = uint16_url
    folder = tmp_path / "in"
    synth.write_collection(
        str(folder), "geotiff", count=6, size=SIZE, mode="binary", bands=4, dtype="uint16"
    )
    out, plain = tmp_path / "out", tmp_path / "plain"
    job = PredictConfig(model=model_dir, input=str(folder / "images"), output=str(out), tta="d4")
    assert predict(job).ok
    assert predict(job.replace(output=str(plain), tta="none")).ok
    spec = labels.DatasetSpec(root=str(folder), num_classes=2, val_fraction=0.0)
    samples = {s.id: s for s in labels.find_samples(spec)}
    model, card = saving.load_model(model_dir)
    edged = changed = hits = union = 0
    counts = np.zeros(2, np.int64)
    for name in sorted(samples):
        data = (folder / "images" / f"{name}.tif").read_bytes()
        bulk = imagery.decode((out / f"{name}.tif").read_bytes()).array[..., 0]
        without = imagery.decode((plain / f"{name}.tif").read_bytes()).array[..., 0]
        changed += int(np.sum(bulk != without))
        served = png_mask(post(address, data))
        row = labels.load_sample(samples[name], spec)
        (evaluated,) = predict_rows(model, card, [row], tta="d4")
        np.testing.assert_array_equal(served, bulk)
        np.testing.assert_array_equal(evaluated, bulk)
        on_onnx = png_mask(post(onnx_url, data))  # the onnx runtime: the same masks
        assert np.mean(on_onnx == bulk) >= 0.999
        nodata = (imagery.decode(data).array == 0).all(-1)
        np.testing.assert_array_equal(bulk == 255, nodata)  # no data in, 255 out
        edged += bool(nodata.any())
        counts += np.bincount(bulk[~nodata], minlength=2)[:2]
        truth = row["mask"] == 1
        hits += int(np.sum((bulk == 1) & truth))
        union += int(np.sum(((bulk == 1) | truth) & ~nodata))
    assert requests.get(f"{onnx_url}/v1/model", timeout=10).json()["runtime"] == "onnx"
    assert edged  # at least one tile had a no-data corner
    assert changed  # the augmentation changed some pixels: the paths agree on it, not by chance
    # the masks are not constant, and follow the buildings: the model was fitted
    assert counts.min() > 0.05 * counts.sum(), counts
    assert hits / union > 0.4, (hits, union)
    # a scene larger than the model, windows stitched: the scene path and Serve agree
    synth.write_collection(
        str(tmp_path / "scene"),
        "geotiff",
        count=1,
        size=64,
        mode="binary",
        bands=4,
        dtype="uint16",
    )
    (scene,) = (tmp_path / "scene" / "images").glob("*.tif")
    stitched = PredictConfig(
        model=model_dir,
        input=str(scene),
        output=str(tmp_path / "scene_out"),
        scene=True,
        tta="d4",
    )
    assert predict(stitched).ok
    (written,) = (tmp_path / "scene_out").glob("*.tif")
    from_scene = imagery.decode(written.read_bytes()).array[..., 0]
    served = png_mask(post(address, scene.read_bytes()))
    assert len(np.unique(served[served != 255])) == 2
    np.testing.assert_array_equal(served, from_scene)
    eight_bit = post(address, tile_png(3, SIZE, 4))
    assert eight_bit.status_code == 415
    assert "uint8" in eight_bit.text and "uint16" in eight_bit.text


# --- without Serve --------------------------------------------------------------------------


def test_deploy_yaml_validates_and_import_path_resolves():
    from ray.serve.deployment import Application
    from ray.serve.schema import ServeDeploySchema

    with open("deploy/serve.yaml") as f:
        doc = yaml.safe_load(f)
    config = ServeDeploySchema.model_validate(doc)
    (application,) = config.applications
    module, _, attr = application.import_path.partition(":")
    builder = getattr(importlib.import_module(module), attr)
    # as `serve run` / `serve deploy` call it: the args dict validated into a ServeConfig first
    assert isinstance(
        call_user_app_builder_with_args_if_necessary(builder, application.args), Application
    )
    assert application.deployments[0].name == serve.DEPLOYMENT
    # the import path of segray 0.1 still resolves to the same builder
    assert importlib.import_module("segray.serve").app_builder is serve.app_builder


def test_app_builder_takes_typed_args_and_refuses_bad_settings():
    build = call_user_app_builder_with_args_if_necessary
    with pytest.raises(ValueError, match="model_uri"):
        build(serve.app_builder, {"max_batch_size": 4})
    with pytest.raises(ValueError, match="nonsense"):
        build(serve.app_builder, {"model_uri": "m", "nonsense": 1})
    # `serve run segray.serve.app:app_builder model_uri=m max_batch_size=8` passes strings
    app = build(serve.app_builder, {"model_uri": "m", "max_batch_size": "8", "num_gpus": "0"})
    assert app._bound_deployment._deployment_config.max_ongoing_requests == 32
    with pytest.raises(
        ConfigError, match="max_batch_size: Input should be greater than or equal to 1; got 0"
    ):
        ServeConfig(model_uri="m", max_batch_size=0)
    with pytest.raises(ConfigError, match="blend: Input should be 'linear', 'cosine' or 'crop'"):
        ServeConfig(model_uri="m", blend="smear")
    app = serve.build_app(ServeConfig(model_uri="m", replicas=1, max_replicas=3, num_gpus=0.5))
    deployment = app._bound_deployment
    assert deployment._deployment_config.max_ongoing_requests == 64
    assert deployment._deployment_config.autoscaling_config.max_replicas == 3
    assert deployment.ray_actor_options["num_gpus"] == 0.5


def test_multipart_extraction_is_byte_exact():
    payload = bytes(range(256)) * 4 + b"\r\n--not-the-boundary\r\n\r\n"
    body = (
        b'--xyz\r\nContent-Disposition: form-data; name="meta"\r\n\r\n{}\r\n'
        b'--xyz\r\nContent-Disposition: form-data; name="upload"; filename="a.tif"\r\n'
        b"Content-Type: image/tiff\r\n\r\n" + payload + b"\r\n--xyz--\r\n"
    )
    assert http.image_bytes(body, 'multipart/form-data; boundary="xyz"') == payload
    assert http.image_bytes(b"raw", "image/png") == b"raw"
    # strict: the body must close, and carry one file
    refused = {
        "before its final boundary": body[: -len(b"--xyz--\r\n")],
        "2 file parts": body.replace(b'name="meta"', b'name="file"'),
        "no file part": body.replace(b'; filename="a.tif"', b""),
        "boundary": b"no boundary at all",
    }
    for reason, bad in refused.items():
        with pytest.raises(http.ApiError) as info:
            http.image_bytes(bad, 'multipart/form-data; boundary="xyz"')
        assert info.value.status == 400 and reason in info.value.detail, reason


def test_read_body_answers_499_however_serve_reports_the_departure():
    import asyncio

    from ray.exceptions import TaskCancelledError
    from starlette.requests import Request

    def request(then):
        """A request whose body sends 3 bytes, then ``then``: a message, or an error raised."""
        first = {"type": "http.request", "body": b"abc", "more_body": True}
        messages = iter([first])

        async def receive():
            message = next(messages, None)
            if message is not None:
                return message
            if isinstance(then, BaseException):
                raise then
            return then

        return Request({"type": "http", "method": "POST", "headers": []}, receive)

    last = {"type": "http.request", "body": b"de", "more_body": False}
    assert asyncio.run(http.read_body(request(last), 10)) == b"abcde"
    # the proxy's disconnect message, or Serve's pull from the proxy cancelled in a race with it
    for then in ({"type": "http.disconnect"}, TaskCancelledError()):
        with pytest.raises(http.ApiError) as info:
            asyncio.run(http.read_body(request(then), 10))
        assert info.value.status == 499 and "after 3 bytes" in info.value.detail
    with pytest.raises(RuntimeError):  # anything else is not a departure
        asyncio.run(http.read_body(request(RuntimeError("boom")), 10))


def test_response_format_from_accept():
    assert http.response_format(None, "") == "png"
    assert http.response_format(None, "application/json") == "json"
    assert http.response_format("png", "application/json") == "png"
    with pytest.raises(http.ApiError):
        http.response_format("xml", "")


def test_every_tile_error_kind_has_a_4xx_status():
    from segray.errors import TILE_ERROR_KINDS, TileError

    assert set(http.TILE_STATUS) == set(TILE_ERROR_KINDS)
    for kind in TILE_ERROR_KINDS:
        err = http.tile_error(TileError("request body", "why", kind))
        assert 400 <= err.status < 500 and err.detail == "why"
    assert http.tile_error(TileError("b", "x", "bands")).status == 415
    assert http.tile_error(TileError("b", "x", "too_large")).status == 413


# --- requests that would cost a replica too much -----------------------------------------------


def test_refused_from_the_header_before_decoding(url):
    many_windows = imagery.encode_png(np.zeros((100, 100, 3), np.uint8))
    response = post(url, many_windows)
    assert response.status_code == 413, response.text
    assert "36 model windows" in response.json()["detail"]
    assert "bulk path" in response.json()["detail"]
    # 16 float32 bands of 96x96 px: refused from the header (the model takes 3), never decoded
    wide = imagery.encode_geotiff(np.zeros((96, 96, 16), np.float32))
    response = post(url, wide)
    assert response.status_code == 415, response.text
    assert "has 16 band(s) but the model expects 3" in response.json()["detail"]
    # a pixel type the model was not trained on: refused from the header, never rescaled
    response = post(url, imagery.encode_geotiff(np.full((SIZE, SIZE, 3), 900, np.uint16)))
    assert response.status_code == 415, response.text
    detail = response.json()["detail"]
    assert "has pixel type uint16 but the model was trained on uint8" in detail


def test_slow_clients_get_408_and_cannot_take_healthz_down(url):
    import socket
    import time
    from urllib.parse import urlparse

    host, port = urlparse(url).hostname, urlparse(url).port
    head = (
        f"POST /v1/segment HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
        "Content-Length: 100000\r\n\r\n"
    ).encode()
    slow = []
    try:
        for _ in range(70):  # more than a replica's 64 request slots
            sock = socket.create_connection((host, port), timeout=20)
            sock.sendall(head + b"\x89PNG\r\n\x1a\n\0\0")  # then nothing more
            slow.append(sock)
        start = time.monotonic()
        health = requests.get(f"{url}/healthz", timeout=20)
        assert health.status_code == 200
        assert time.monotonic() - start < 15
        answers = []
        for sock in slow:
            sock.settimeout(20)
            answers.append(sock.recv(200).split(b"\r\n", 1)[0])
        assert answers == [b"HTTP/1.1 408 Request Timeout"] * len(slow), set(answers)
    finally:
        for sock in slow:
            sock.close()
    assert post(url, tile_png(3)).status_code == 200  # and the service goes on


def test_a_client_that_leaves_is_one_log_line_not_a_500(url):
    import glob
    import os
    import socket
    import time
    from urllib.parse import urlparse

    import ray

    logs = os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs", "serve")

    def counts() -> dict[str, int]:
        text = "".join(open(f, errors="replace").read() for f in glob.glob(f"{logs}/*.log"))
        return {key: text.count(key) for key in (" 499 ", " 500 ", "Traceback")}

    before = counts()
    host, port = urlparse(url).hostname, urlparse(url).port
    head = (
        f"POST /v1/segment HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
        "Content-Length: 100000\r\n\r\n"
    ).encode()
    for _ in range(3):
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.sendall(head + b"\x89PNG\r\n\x1a\n\0\0")
            time.sleep(0.2)
    deadline = time.monotonic() + 10
    while counts()[" 499 "] < before[" 499 "] + 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    after = counts()
    assert after[" 499 "] >= before[" 499 "] + 3
    assert after[" 500 "] == before[" 500 "] and after["Traceback"] == before["Traceback"]
