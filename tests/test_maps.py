"""Map tiles over real HTTP on 127.0.0.1: layers, seams, the allow-list, caching, and the map page
in a real headless Chromium (Debian's package, driven by Playwright)."""

from __future__ import annotations

import os
import shutil

import morecantile
import numpy as np
import pytest
import requests

from segray import inference
from segray.devtools import labelled_scenes
from segray.devtools.ports import free_port
from segray.inference import tiling
from segray.io import imagery
from segray.io.maptiles import MapTiles
from segray.io.readers import SceneReader
from segray.models import saving
from segray.serve import app as serve
from segray.serve.config import ServeConfig
from segray.serve.sources import check_source, normalise_prefixes
from segray.serve.tilecache import TileCache

SIZE = 64
TMS = morecantile.tms.get("WebMercatorQuad")
CHROMIUM = "/usr/bin/chromium"
SHOTS = os.path.join(os.path.dirname(__file__), "..", "runs", "screenshots")
REAL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "real")


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> dict:
    """One 512 px labelled UTM scene (its buildings' truth raster beside it) and a secret file
    outside the allowed folder."""
    root = tmp_path_factory.mktemp("maps")
    allowed = root / "imagery"
    labelled_scenes.write_labelled_scenes(str(allowed), count=1, scene_size=512, seed=3)
    (root / "secret.tif").write_bytes((allowed / "images" / "scene_000.tif").read_bytes())
    os.symlink(root / "secret.tif", allowed / "link.tif")
    os.mkfifo(allowed / "pipe.tif")
    return {
        "root": str(root),
        "allowed": str(allowed),
        "image": str(allowed / "images" / "scene_000.tif"),
        "truth": str(allowed / "truth" / "scene_000.tif"),
    }


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from segray.models import build_model

    folder = str(tmp_path_factory.mktemp("map-model"))
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
def base(ray_local, model_dir, scene) -> str:
    from ray import serve as ray_serve

    port = free_port()
    ray_serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = ServeConfig(
        model_uri=model_dir,
        allowed_sources=(scene["allowed"], REAL),
        num_cpus=0.5,
        tile_cache_bytes=32 * 2**20,
    )
    ray_serve.run(serve.build_app(config), name="segray-maps", route_prefix="/")
    yield f"http://127.0.0.1:{port}/v1"
    ray_serve.shutdown()


def native_tiles(source: str) -> tuple[int, list[morecantile.Tile]]:
    with SceneReader(source) as reader:
        info = MapTiles(reader).info()
    return info.maxzoom, list(TMS.tiles(*info.bounds, zooms=[info.maxzoom]))


def get_tile(base: str, source: str, z: int, x: int, y: int, **params) -> requests.Response:
    url = f"{base}/tiles/WebMercatorQuad/{z}/{x}/{y}.png"
    return requests.get(url, params={"url": source, **params}, timeout=60)


def rgba(response: requests.Response) -> np.ndarray:
    return imagery.decode(response.content, "tile").array


# --- no server ---------------------------------------------------------------------------------


def test_allow_list_refuses_every_hostile_url(scene):
    allowed = normalise_prefixes([scene["allowed"], "s3://bucket/imagery"])
    ok = check_source(scene["image"], allowed)
    assert ok == os.path.realpath(scene["image"])
    assert check_source("file://" + scene["image"], allowed) == ok
    assert check_source("s3://bucket/imagery/a.tif", allowed) == "s3://bucket/imagery/a.tif"
    hostile = [
        "/etc/passwd",
        "file:///etc/passwd",
        f"{scene['allowed']}/../secret.tif",
        f"{scene['allowed']}/images/../../secret.tif",
        f"{scene['allowed']}/link.tif",  # a link out of the allowed folder
        scene["allowed"] + "-other/a.tif",  # a sibling that shares the prefix's letters
        "file://evil.host/etc/passwd",
        "http://169.254.169.254/latest/meta-data/",
        "https://example.com/a.tif",
        "/vsicurl/http://169.254.169.254/a.tif",
        f"/vsizip/{scene['allowed']}/a.zip/a.tif",
        "GTIFF_DIR:1:/etc/passwd",
        "s3://bucket/imagery/../private/a.tif",
        "s3://bucket/imagery-private/a.tif",
        "s3://bucket//imagery/a.tif",
        "s3://other/imagery/a.tif",
        "../../etc/passwd",
    ]
    for url in hostile:
        with pytest.raises(serve.ApiError) as err:
            check_source(url, allowed)
        assert err.value.status == 403, url
        assert "allowed_sources" in err.value.detail
    for url in ("", "/tmp/a\x00.tif"):
        with pytest.raises(serve.ApiError) as err:
            check_source(url, allowed)
        assert err.value.status == 400
    with pytest.raises(serve.ApiError) as err:
        check_source(scene["image"], ())
    assert err.value.status == 403


def test_tile_cache_is_bounded_in_bytes_and_least_recently_used_goes():
    cache = TileCache(100)
    for key in "abc":
        cache.put(key, key, 40)
    assert cache.get("a") is None and cache.get("b") == "b"
    cache.put("d", "d", 40)  # c is now the oldest
    assert cache.get("c") is None and cache.get("b") == "b" and cache.get("d") == "d"
    assert cache.stats()["bytes"] == 80 and cache.stats()["evictions"] == 2
    cache.put("huge", "x", 101)
    assert cache.get("huge") is None


def test_map_tiles_read_onto_the_tile_grid_with_a_margin(scene):
    z, tiles = native_tiles(scene["image"])
    with SceneReader(scene["image"]) as reader:
        maps = MapTiles(reader)
        info = maps.info()
        assert info.minzoom <= info.maxzoom == z == 18  # 0.5 m pixels: zoom 18 (0.6 m)
        tile = tiles[len(tiles) // 2]
        plain = maps.read(z, tile.x, tile.y)
        wide = maps.read(z, tile.x, tile.y, margin=16)
    assert plain.array.shape == (256, 256, 3) and wide.array.shape == (288, 288, 3)
    # nearest neighbour on two warped grids: the same source pixel but for float rounding
    same = (wide.array[16:-16, 16:-16] == plain.array).all(axis=-1).mean()
    assert same >= 0.99, same
    assert plain.crs == "EPSG:3857"


# --- through Serve -----------------------------------------------------------------------------


@pytest.mark.slow
def test_tilejson_layers_cache_headers_and_errors(base, scene):
    doc = requests.get(f"{base}/tilejson.json", params={"url": scene["image"]}, timeout=60).json()
    assert doc["tilejson"] == "3.0.0" and doc["maxzoom"] == 18 and doc["minzoom"] == 17
    west, south, east, north = doc["bounds"]
    assert 14.99 < west < east < 15.01 and 45.1 < south < north < 45.2  # UTM 33N near 15°E
    z, tiles = native_tiles(scene["image"])
    t = tiles[len(tiles) // 2]
    first = get_tile(base, scene["image"], z, t.x, t.y)
    assert first.status_code == 200 and first.headers["content-type"] == "image/png"
    assert "max-age" in first.headers["cache-control"]
    again = get_tile(base, scene["image"], z, t.x, t.y, layer="mask")
    assert again.content == first.content and again.headers["etag"] == first.headers["etag"]
    cached = requests.get(
        f"{base}/tiles/WebMercatorQuad/{z}/{t.x}/{t.y}.png",
        params={"url": scene["image"]},
        headers={"If-None-Match": first.headers["etag"]},
        timeout=60,
    )
    assert cached.status_code == 304 and not cached.content
    for layer in ("image", "probability"):
        shown = get_tile(base, scene["image"], z, t.x, t.y, layer=layer)
        assert shown.status_code == 200, shown.text
        assert rgba(shown).shape == (256, 256, 4)
        assert shown.headers["etag"] != first.headers["etag"]
    # a class mask is drawn in the palette; an image is no class mask: refused, saying why
    truth = get_tile(base, scene["truth"], z, t.x, t.y, layer="precomputed")
    assert truth.status_code == 200 and rgba(truth).shape == (256, 256, 4), truth.text
    rgb = get_tile(base, scene["image"], z, t.x, t.y, layer="precomputed")
    assert rgb.status_code == 400 and "it has 3 bands" in rgb.json()["detail"], rgb.text
    import rasterio

    grey = os.path.join(scene["allowed"], "grey.tif")  # one uint8 band, but brightness
    with rasterio.open(scene["image"]) as src:
        profile = {**src.profile, "count": 1}
        with rasterio.open(grey, "w", **profile) as dst:
            dst.write(src.read(1), 1)
    pan = get_tile(base, grey, z, t.x, t.y, layer="precomputed")
    assert pan.status_code == 400 and "values up to" in pan.json()["detail"], pan.text
    retina = requests.get(
        f"{base}/tiles/WebMercatorQuad/{z}/{t.x}/{t.y}@2x.png",
        params={"url": scene["image"]},
        timeout=60,
    )
    assert rgba(retina).shape == (512, 512, 4)
    # a zoom out is the mosaic of native tiles; closer, a part of one
    assert rgba(get_tile(base, scene["image"], z - 2, t.x // 4, t.y // 4)).shape == (256, 256, 4)
    assert get_tile(base, scene["image"], z + 2, t.x * 4, t.y * 4).status_code == 200
    assert get_tile(base, scene["image"], z - 3, t.x // 8, t.y // 8).status_code == 404
    assert get_tile(base, scene["image"], z, 0, 0).status_code == 404  # outside the source
    assert get_tile(base, scene["image"], z, t.x, t.y, layer="nope").status_code == 400
    bad_tms = requests.get(f"{base}/tiles/NoSuchTMS/1/0/0.png", params={"url": "x"}, timeout=10)
    assert bad_tms.status_code == 404 and "WebMercatorQuad" in bad_tms.json()["detail"]
    stats = requests.get(f"{base}/stats", timeout=10).json()["tile_cache"]
    assert stats["hits"] >= 1 and 0 < stats["bytes"] <= 32 * 2**20


@pytest.mark.slow
def test_a_7_band_landsat_cog_under_an_rgb_model_takes_bands_that_serve_offers(base, model_dir):
    """A real 7-band Landsat COG under an RGB model: refused with a message naming ``--bands``,
    an option ``segray serve`` has; drawn once the app reads bands 3,2,1; a --bands the model
    cannot take is refused before any replica starts."""
    from click.testing import CliRunner
    from ray import serve as ray_serve

    from segray.cli import cli
    from segray.errors import ConfigError

    landsat = f"{REAL}/landsat7_utah.tif"
    config = ServeConfig(model_uri=model_dir, allowed_sources=(REAL,), num_cpus=0.25)
    landsat_app = serve.build_app(config.replace(bands=(3, 2, 1)))
    ray_serve.run(landsat_app, name="segray-landsat", route_prefix="/landsat")
    root = base.rsplit("/v1", 1)[0]
    z, tiles = native_tiles(landsat)
    t = tiles[len(tiles) // 2]
    refused = get_tile(base, landsat, z, t.x, t.y)
    assert refused.status_code == 415, refused.text
    detail = refused.json()["detail"]
    assert "7 band(s)" in detail and "--bands" in detail
    assert "--bands" in CliRunner().invoke(cli, ["serve", "--help"]).output  # it exists
    drawn = get_tile(f"{root}/landsat/v1", landsat, z, t.x, t.y)
    assert drawn.status_code == 200, drawn.text
    assert rgba(drawn)[..., 3].any()
    info = requests.get(f"{root}/landsat/v1/model", timeout=10).json()
    assert info["bands"] == [3, 2, 1]
    # TiTiler's bidx picks the bands per request: the same tile as the app's --bands
    picked = get_tile(base, landsat, z, t.x, t.y, bidx="3,2,1")
    assert picked.status_code == 200 and picked.content == drawn.content
    doc = requests.get(
        f"{base}/tilejson.json", params={"url": landsat, "bidx": "3,2,1"}, timeout=30
    ).json()
    assert "bidx=3,2,1" in doc["tiles"][0]
    (lon, lat) = doc["center"][:2]
    point = requests.get(
        f"{base}/point",
        params={"url": landsat, "lon": lon, "lat": lat, "bidx": "3,2,1"},
        timeout=30,
    )
    assert point.status_code == 200, point.text
    for bidx, words in (("3,2", "the model reads 3"), ("9,2,1", "has 7 band"), ("a,b", "bidx")):
        wrong = get_tile(base, landsat, z, t.x, t.y, bidx=bidx)
        assert wrong.status_code == 400 and words in wrong.json()["detail"], wrong.text
        assert "bidx" in wrong.json()["detail"]
    with pytest.raises(ConfigError, match="--bands 4,3: the model reads 3 band"):
        config.replace(bands=(4, 3)).check_card(saving.load_card(model_dir))
    # the map page opened with bidx draws the model over the 7-band source, every request 200
    with _browser() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 700, "height": 500}, bypass_csp=True)
        failed: list[str] = []
        tiles_asked: list[str] = []
        page.on("response", lambda r: r.status >= 400 and failed.append(f"{r.status} {r.url}"))
        page.on("request", lambda r: "/tiles/" in r.url and tiles_asked.append(r.url))
        page.goto(f"{base}/map?url={landsat}&bidx=3,2,1")
        _wait_for_tiles(page, 2)
        browser.close()
    assert not failed, failed
    assert tiles_asked and all("bidx=3%2C2%2C1" in u or "bidx=3,2,1" in u for u in tiles_asked)
    ray_serve.delete("segray-landsat")


def test_hostile_urls_get_403_and_odd_files_a_clear_error(base, scene):
    for url in (
        "/etc/passwd",
        "file:///etc/passwd",
        f"{scene['allowed']}/../secret.tif",
        f"{scene['allowed']}/link.tif",
        "http://169.254.169.254/latest/meta-data/",
        "/vsicurl/http://127.0.0.1:1/a.tif",
    ):
        for path in ("tilejson.json", "tiles/WebMercatorQuad/18/0/0.png", "point"):
            params = {"url": url, "lon": 15.0, "lat": 45.15}
            r = requests.get(f"{base}/{path}", params=params, timeout=30)
            assert r.status_code == 403, (url, path, r.text)
            assert "allowed_sources" in r.json()["detail"]

    def info(url: str) -> requests.Response:
        return requests.get(f"{base}/tilejson.json", params={"url": url}, timeout=30)

    fifo = info(f"{scene['allowed']}/pipe.tif")
    assert fifo.status_code == 400 and "named pipe" in fifo.json()["detail"]
    assert info(f"{scene['allowed']}/no.tif").status_code == 404
    not_tiff = os.path.join(scene["allowed"], "labels.geojson")
    refused = requests.get(f"{base}/tilejson.json", params={"url": not_tiff}, timeout=30)
    assert refused.status_code == 415 and "labels.geojson" in refused.json()["detail"]
    for name in ("../app.py", "vendor/../map.html", "/etc/passwd", "map.html"):
        assert requests.get(f"{base}/static/{name}", timeout=10).status_code == 404, name


@pytest.mark.slow
def test_native_tiles_join_without_seams(base, scene, model_dir, tmp_path):
    """A mosaic of the native tiles equals the scene job's windowing of the same scene
    reprojected onto the mosaic's grid (the windows and blend ``segray predict --scene`` uses)."""
    from rasterio.transform import from_bounds

    from segray.io.readers import Grid

    z, tiles = native_tiles(scene["image"])
    xs, ys = sorted({t.x for t in tiles}), sorted({t.y for t in tiles})
    left, _, _, top = TMS.xy_bounds(morecantile.Tile(xs[0], ys[0], z))
    _, bottom, right, _ = TMS.xy_bounds(morecantile.Tile(xs[-1], ys[-1], z))
    width, height = 256 * len(xs), 256 * len(ys)
    grid = Grid("EPSG:3857", from_bounds(left, bottom, right, top, width, height), width, height)
    with SceneReader(scene["image"]) as reader:
        whole = reader.read(grid=grid)
    model, card = saving.load_model(model_dir)
    array = inference.prepare(whole, card)
    windows, layout = tiling.cut_windows(array, (SIZE, SIZE), tiling.default_overlap(SIZE))
    logits = inference.infer(model, windows, card)
    joined = inference.mark_nodata(tiling.join_windows(logits, layout), whole.valid)
    reference = inference.render(joined[None], card, "classes")[0]
    mosaic = np.full((height, width), 255, np.uint8)
    for t in tiles:
        doc = get_tile(base, scene["image"], z, t.x, t.y)
        assert doc.status_code == 200
        shown = rgba(doc)
        classes = np.where(shown[..., 3] == 0, 0, 1).astype(np.uint8)  # building drawn, else not
        r, c = (t.y - ys[0]) * 256, (t.x - xs[0]) * 256
        mosaic[r : r + 256, c : c + 256] = classes
    valid = whole.valid if whole.valid is not None else np.ones((height, width), bool)
    inner = valid.copy()
    inner[:SIZE], inner[-SIZE:], inner[:, :SIZE], inner[:, -SIZE:] = False, False, False, False
    ref = np.where(reference == 1, 1, 0)
    agreement = float((mosaic[inner] == ref[inner]).mean())
    print(f"seam agreement {agreement:.5f} over {int(inner.sum())} pixels, {len(tiles)} tiles")
    assert agreement >= 0.995


# --- in a real browser -------------------------------------------------------------------------


def _browser():
    if not os.path.exists(CHROMIUM) or shutil.which("chromium") is None:
        if os.environ.get("SEGRAY_REQUIRE_BROWSER"):
            pytest.fail(f"{CHROMIUM} is missing: make browser installs Debian's chromium")
        pytest.skip("no Chromium here (make browser installs it)")
    from playwright.sync_api import sync_playwright

    return sync_playwright()


BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _wait_for_tiles(page, least: int) -> None:
    page.wait_for_function(
        f"window.segrayTiles && window.segrayTiles.loaded >= {least} && "
        "window.segrayTiles.loaded + window.segrayTiles.failed >= window.segrayTiles.requested",
        timeout=90_000,
    )
    page.wait_for_timeout(300)


@pytest.mark.slow
def test_map_page_in_chromium_draws_buildings_where_they_are(base, scene):
    """The page over the scene with the scene's truth as the precomputed mask layer (no image
    under it): building red appears on the scene's buildings and not elsewhere. Then the model's
    mask: panned and zoomed, no request is answered with an error."""
    from rasterio.warp import transform as warp

    with _browser() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        # the page forbids eval (CSP); Playwright's own waits need it, so only they bypass it
        page = browser.new_page(viewport={"width": 900, "height": 700}, bypass_csp=True)
        failed: list[str] = []
        page.on("response", lambda r: r.status >= 400 and failed.append(f"{r.status} {r.url}"))
        page.on("pageerror", lambda e: failed.append(f"page error {e}"))
        page.goto(f"{base}/map?url={scene['truth']}&layer=precomputed")
        _wait_for_tiles(page, 4)
        page.uncheck("#show-image")
        page.fill("#opacity", "1")
        page.dispatch_event("#opacity", "input")
        page.wait_for_timeout(300)
        os.makedirs(SHOTS, exist_ok=True)
        shot = os.path.abspath(os.path.join(SHOTS, "map_truth.png"))
        page.locator("#map").screenshot(path=shot)
        pixels = imagery.decode(open(shot, "rb").read(), shot).array[..., :3].astype(int)
        points = [(c, r) for r in range(20, 680, 12) for c in range(20, 620, 12)]  # left of panel
        script = (
            "(pts) => pts.map(([x, y]) => {"
            " const l = window.segrayMap.containerPointToLatLng([x, y]); return [l.lng, l.lat]; })"
        )
        lonlat = page.evaluate(script, points)
        with SceneReader(scene["truth"]) as reader:
            head = reader.header()
            truth = reader.read().array[..., 0]
        xs, ys = warp("EPSG:4326", head.crs, [p[0] for p in lonlat], [p[1] for p in lonlat])
        red = np.array(inference.PALETTE[1])
        hits = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
        for (c, r), x, y in zip(points, xs, ys, strict=True):
            col, row = ~head.transform * (x, y)
            row, col = int(row), int(col)
            if not (1 <= row < head.height - 1 and 1 <= col < head.width - 1):
                continue
            near = truth[row - 1 : row + 2, col - 1 : col + 2]
            if near.min() != near.max():
                continue  # an edge pixel: either answer is right
            drawn = np.abs(pixels[r, c] - red).sum() < 60
            building = bool(near[1, 1] == 1)
            hits[("t" if drawn == building else "f") + ("p" if drawn else "n")] += 1
        print("screenshot", shot, hits)
        assert hits["tp"] >= 20, hits  # the scene has buildings in view
        assert hits["tp"] / (hits["tp"] + hits["fp"]) >= 0.95, hits
        assert hits["tp"] / (hits["tp"] + hits["fn"]) >= 0.95, hits

        page.goto(f"{base}/map?url={scene['image']}")
        _wait_for_tiles(page, 4)
        page.mouse.click(300, 300)
        page.wait_for_function("window.segrayPoint !== undefined", timeout=30_000)
        point = page.evaluate("window.segrayPoint")
        assert point["class_name"] in ("background", "building")
        assert abs(sum(point["fractions"].values()) - 1) < 1e-3
        for step in ("zoom_in", "pan", "zoom_out", "pan"):
            if step == "pan":
                page.mouse.move(450, 350)
                page.mouse.down()
                page.mouse.move(300, 250, steps=5)
                page.mouse.up()
            else:
                page.evaluate(f"window.segrayMap.{'zoomIn' if step == 'zoom_in' else 'zoomOut'}()")
            page.wait_for_timeout(500)
            _wait_for_tiles(page, 4)
        page.locator("#map").screenshot(path=os.path.join(SHOTS, "map_model.png"))
        tiles = page.evaluate("window.segrayTiles")
        browser.close()
    assert not failed, failed
    assert tiles["failed"] == 0 and tiles["loaded"] >= 8, tiles


def test_a_wheel_of_segray_draws_its_map_wherever_it_is_installed(tmp_path):
    """Leaflet comes from a dependency (XStatic-Leaflet), not from an npm step in a checkout: the
    wheel holds the page and requires the library, and the library is read from where pip put it."""
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    from segray.serve import page
    from segray.serve.http import ApiError

    root = Path(__file__).resolve().parents[1]
    source = tmp_path / "source"  # a copy: setuptools writes build/ beside what it builds
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(root / "segray", source / "segray", ignore=skip)
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    build += ["-w", str(tmp_path), str(source)]
    done = subprocess.run(build, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("segray-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        requires = [line for line in archive.read(meta).decode().splitlines() if "Requires" in line]
    static = {f"segray/serve/static/{n}" for n in ("map.html", "map.js", "map.css")}
    assert static <= names
    assert any(line.startswith("Requires-Dist: XStatic-Leaflet") for line in requires), requires
    html = (root / "segray/serve/static/map.html").read_text()
    assert f"static/{page.VENDOR}leaflet.js" in html and "://" not in html  # nothing from the web

    from importlib.metadata import distribution

    library = page.leaflet()  # where pip put the dependency's files, not a folder of the checkout
    installed = distribution("XStatic-Leaflet").locate_file("xstatic/pkg/leaflet/data/leaflet.js")
    assert library is not None and Path(installed).resolve() == (library / "leaflet.js").resolve()
    served = page.asset(f"{page.VENDOR}leaflet.js")
    assert served.status_code == 200 and served.body == (library / "leaflet.js").read_bytes()
    assert b"Leaflet" in served.body[:400]
    for name in (f"{page.VENDOR}../__init__.py", f"{page.VENDOR}leaflet-src.js", "vendor/x.js"):
        with pytest.raises(ApiError) as refused:
            page.asset(name)
        assert refused.value.status == 404, name
