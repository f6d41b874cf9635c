"""Every labelled layout → a Ray Dataset, on local disk and on the S3 server; bad input named."""

from __future__ import annotations

import json

import numpy as np
import pytest
from affine import Affine

from segray.datasets.labels import DatasetSpec, find_samples, resize_mask
from segray.errors import ConfigError, DatasetError
from segray.io import imagery, storage
from segray.train.data import load_splits

PALETTE = [[0, 0, 0], [255, 0, 0], [0, 0, 255]]


def tile(i: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(i)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[: size // 2, : size // 2] = 1
    mask[size // 2 :, size // 2 :] = 2 if i % 2 else 0
    return image, mask


def write_paired(root: str, n: int = 6, endpoint=None, mask_fn=None) -> None:
    for i in range(n):
        image, mask = tile(i)
        storage.write_bytes(f"{root}/images/t{i}.png", imagery.encode_png(image), endpoint=endpoint)
        data = mask_fn(mask) if mask_fn else imagery.encode_png(mask)
        storage.write_bytes(f"{root}/masks/t{i}.png", data, endpoint=endpoint)


def rows_by_id(ds) -> dict:
    return {r["id"]: r for r in ds.take_all()}


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_paired_layout_split_and_summary(backend, tmp_path, request, ray_local):
    if backend == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        root = request.getfixturevalue("s3_prefix")
    else:
        endpoint, root = None, str(tmp_path)
    write_paired(root, 6, endpoint)
    spec = DatasetSpec(
        root=root, layout="paired", num_classes=3, val_fraction=0.34, seed=1, endpoint=endpoint
    )
    train, val, info = load_splits(spec)
    t, v = rows_by_id(train), rows_by_id(val)
    assert len(t) == 4 and len(v) == 2 and not set(t) & set(v)
    assert info.count == 6 and info.image_shape == (32, 32, 3) and info.max_class == 2
    for sid, row in {**t, **v}.items():
        image, mask = tile(int(sid[1:]))
        np.testing.assert_array_equal(row["image"], image)
        np.testing.assert_array_equal(row["mask"], mask)
    again_train, _, _ = load_splits(spec)
    assert sorted(rows_by_id(again_train)) == sorted(t)


def test_resize_is_nearest_for_masks(tmp_path, ray_local):
    write_paired(str(tmp_path), 2)
    spec = DatasetSpec(root=str(tmp_path), size=48, val_fraction=0.0)
    train, val, info = load_splits(spec)
    assert val is None and info.image_shape == (48, 48, 3)
    for row in train.take_all():
        assert row["image"].shape == (48, 48, 3) and row["mask"].shape == (48, 48)
        assert set(np.unique(row["mask"])) <= {0, 1, 2}
    mask = np.array([[0, 1], [2, 3]], np.uint8)
    assert resize_mask(mask, (4, 4)).tolist() == [[0, 0, 1, 1]] * 2 + [[2, 2, 3, 3]] * 2


def test_palette_layout(tmp_path, ray_local):
    root = str(tmp_path)
    storage.write_text(f"{root}/classes.json", json.dumps({"palette": PALETTE}))
    write_paired(root, 3, mask_fn=lambda m: imagery.encode_png(np.asarray(PALETTE, np.uint8)[m]))
    train, _, info = load_splits(
        DatasetSpec(root=root, layout="palette", num_classes=3, val_fraction=0)
    )
    for row in train.take_all():
        np.testing.assert_array_equal(row["mask"], tile(int(row["id"][1:]))[1])
    assert info.max_class == 2


def test_palette_unknown_colour_names_file(tmp_path, ray_local):
    root = str(tmp_path)
    storage.write_text(f"{root}/classes.json", json.dumps({"palette": PALETTE}))
    write_paired(root, 2, mask_fn=lambda m: imagery.encode_png(np.full((32, 32, 3), 7, np.uint8)))
    with pytest.raises(DatasetError, match=r"masks/t0.png: colour \(7, 7, 7\)"):
        load_splits(DatasetSpec(root=root, layout="palette", val_fraction=0))


def test_nuclei_layout_merges_instance_masks(tmp_path, ray_local):
    for sid in ("abc", "def"):
        image = np.full((32, 32, 3), 90, np.uint8)
        storage.write_bytes(f"{tmp_path}/{sid}/images/{sid}.png", imagery.encode_png(image))
        for k in range(3):
            inst = np.zeros((32, 32), np.uint8)
            inst[k * 10 : k * 10 + 5, 4:9] = 255
            storage.write_bytes(f"{tmp_path}/{sid}/masks/m{k}.png", imagery.encode_png(inst))
    train, _, info = load_splits(
        DatasetSpec(root=str(tmp_path), layout="nuclei", num_classes=2, val_fraction=0)
    )
    rows = train.take_all()
    assert len(rows) == 2 and info.max_class == 1
    assert all(int(r["mask"].sum()) == 3 * 25 for r in rows)


def test_nuclei_missing_masks_named(tmp_path):
    storage.write_bytes(f"{tmp_path}/xyz/images/xyz.png", imagery.encode_png(tile(0)[0]))
    with pytest.raises(DatasetError, match="xyz"):
        find_samples(DatasetSpec(root=str(tmp_path), layout="nuclei"))


def test_polygon_layout_pixel_and_geojson(tmp_path, ray_local):
    root = str(tmp_path)
    image = np.zeros((32, 32, 3), np.uint8)
    storage.write_bytes(f"{root}/images/a.png", imagery.encode_png(image))
    storage.write_text(
        f"{root}/labels/a.json",
        json.dumps(
            [
                {"class": 2, "points": [[4, 4], [12, 4], [12, 12], [4, 12]]},
                [[20, 20], [28, 20], [28, 28]],
            ]
        ),
    )
    transform = Affine(0.5, 0, 1000.0, 0, -0.5, 2000.0)
    storage.write_bytes(
        f"{root}/images/b.tif", imagery.encode_geotiff(image, "EPSG:32633", transform)
    )
    outer = [
        [1000 + 2, 2000 - 2],
        [1000 + 14, 2000 - 2],
        [1000 + 14, 2000 - 14],
        [1000 + 2, 2000 - 14],
    ]
    hole = [
        [1000 + 6, 2000 - 6],
        [1000 + 10, 2000 - 6],
        [1000 + 10, 2000 - 10],
        [1000 + 6, 2000 - 10],
    ]
    feature = {
        "type": "Feature",
        "properties": {"class": 1},
        "geometry": {"type": "Polygon", "coordinates": [outer, hole]},
    }
    storage.write_text(
        f"{root}/labels/b.geojson", json.dumps({"type": "FeatureCollection", "features": [feature]})
    )
    train, _, _ = load_splits(
        DatasetSpec(root=root, layout="polygons", num_classes=3, val_fraction=0)
    )
    rows = rows_by_id(train)
    a = rows["a"]["mask"]
    assert (a[4:12, 4:12] == 2).all() and a[25, 26] == 1 and a[0, 0] == 0
    b = rows["b"]["mask"]
    # outer square 4..28 px with an 12..20 px hole (0.5 m pixels), holes kept
    assert b[5, 5] == 1 and b[16, 16] == 0 and b[30, 30] == 0
    assert int(b.sum()) == 24 * 24 - 8 * 8


def test_unpaired_files_are_named(tmp_path):
    write_paired(str(tmp_path), 3)
    storage.delete(f"{tmp_path}/masks/t1.png")
    storage.write_bytes(f"{tmp_path}/masks/orphan.png", imagery.encode_png(tile(0)[1]))
    with pytest.raises(DatasetError) as err:
        find_samples(DatasetSpec(root=str(tmp_path)))
    assert "images/t1.png has no label" in str(err.value)
    assert "masks/orphan.png has no image" in str(err.value)


def test_empty_folder(tmp_path):
    with pytest.raises(DatasetError, match="no images under"):
        find_samples(DatasetSpec(root=str(tmp_path)))


def test_class_ids_beyond_classes_and_bad_files_all_reported(tmp_path, ray_local):
    write_paired(str(tmp_path), 4)
    storage.write_bytes(f"{tmp_path}/images/t2.png", b"")
    mismatch = imagery.encode_png(np.zeros((16, 16), np.uint8))
    storage.write_bytes(f"{tmp_path}/masks/t3.png", mismatch)
    with pytest.raises(DatasetError) as err:
        load_splits(DatasetSpec(root=str(tmp_path), num_classes=2, val_fraction=0))
    text = str(err.value)
    assert "3 bad file(s)" in text
    assert "masks/t1.png: class id 2 found but classes is 2" in text
    assert "images/t2.png: empty file" in text
    assert "masks/t3.png: mask is 16x16 but its image" in text


def test_bad_layout_name():
    with pytest.raises(ConfigError, match=r"layout: Input should be 'paired', 'nuclei'"):
        DatasetSpec(root="x", layout="coco")
