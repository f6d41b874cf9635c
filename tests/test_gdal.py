"""segray's GDAL environment: raster calls never build a cloud session, even with AWS credentials
in the environment (rasterio otherwise builds a boto3 session around every lone call: 21 ms
against 1.9 to decode a 64 px GeoTIFF). ``rasterio.features`` builds one inside itself whatever
the caller's environment (rasterio/rasterio#3331), so footprints and rasterising are not here."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.session import AWSSession

from segray.io import gdal, imagery, rasters, stac

CRS = "EPSG:32633"
TRANSFORM = Affine(10.0, 0.0, 500_000.0, 0.0, -10.0, 5_000_000.0)


@pytest.fixture
def aws_sessions(monkeypatch):
    """AWS credentials in the environment, and a count of the rasterio AWS sessions built."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "segray-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "segray-test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    built = []
    original = AWSSession.__init__

    def counting(self, *args, **kwargs):
        built.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(AWSSession, "__init__", counting)
    return built


def tiff() -> bytes:
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    return imagery.encode_geotiff(image, CRS, TRANSFORM)


def test_a_lone_rasterio_call_builds_a_session_with_credentials_set(aws_sessions):
    """The cost this module avoids is real here: the counter sees rasterio build sessions."""
    data = tiff()
    aws_sessions.clear()
    with rasterio.MemoryFile(data) as mem, mem.open() as ds:
        ds.read(1)
    assert aws_sessions


def test_segray_raster_calls_build_no_session(aws_sessions, tmp_path):
    data = tiff()
    mask = (np.arange(64 * 64).reshape(64, 64) % 3 == 0).astype(np.uint8)
    path = tmp_path / "scene.tif"
    path.write_bytes(data)
    aws_sessions.clear()

    tile = imagery.decode(data, "a.tif")
    assert imagery.header(data, "a.tif").width == 64
    encoded, ext = imagery.encode_mask(mask, like=tile, palette=[(0, 0, 0), (255, 0, 0)])
    assert ext == ".tif" and imagery.decode(encoded, "m.tif").crs == tile.crs
    bbox, _ = stac.footprint(CRS, TRANSFORM, (64, 64))
    assert -180 <= bbox[0] < bbox[2] <= 180
    with rasters.open_scene(str(path)) as ds:
        pixels, _ = rasters.read_window(ds, rasters.Window(0, 0, 16, 16))
    np.testing.assert_array_equal(pixels, tile.array[:16, :16])
    with gdal.env(GDAL_CACHEMAX=32):
        imagery.decode(data, "a.tif")

    assert aws_sessions == []


def test_an_environment_is_opened_only_where_the_caller_has_none(monkeypatch):
    opened = []
    real = gdal.env

    def counting(**options):
        opened.append(options)
        return real(**options)

    monkeypatch.setattr(gdal, "env", counting)
    seen = []

    @gdal.scoped
    def probe():
        seen.append(rasterio.env.getenv().get("GDAL_PAM_ENABLED"))

    with rasterio.Env(GDAL_PAM_ENABLED="NO"):
        probe()
        with gdal.ensured(GDAL_CACHEMAX=32):
            probe()
    assert opened == [] and seen == ["NO", "NO"]
    probe()  # outside any environment: getenv() would raise without one
    with gdal.ensured(GDAL_CACHEMAX=32):
        pass
    assert opened == [{}, {"GDAL_CACHEMAX": 32}] and seen[-1] is None
    assert not gdal.active()
