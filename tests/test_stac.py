"""STAC in and out of bulk prediction: items of an ItemCollection, a catalog or a collection as
inputs (local or s3://), a label item beside each mask and a collection over them at the output."""

from __future__ import annotations

import json
import os

import numpy as np
import pystac
import pytest
import rasterio
from pystac.extensions.label import LabelExtension
from rasterio.warp import transform_bounds

from segray.bulk.config import PredictConfig
from segray.bulk.manifest import read_manifest
from segray.bulk.plan import plan_sources
from segray.devtools import synth
from segray.errors import ConfigError, DatasetError, StorageError
from segray.io import imagery, stac, storage

SIZE = 32
WHEN = "2024-05-01T10:30:00Z"
COG = "image/tiff; application=geotiff; profile=cloud-optimized"


# --- helpers: a tiny model, synthetic COGs and STAC documents ---------------------------------


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    import keras

    from segray.models import build_model, saving

    keras.utils.set_random_seed(0)
    options = {"base_filters": 4, "depth": 2, "dropout": 0}
    net = build_model("unet", 2, (SIZE, SIZE, 3), **options)
    card = saving.ModelCard(
        name="unet",
        num_classes=2,
        input_shape=(SIZE, SIZE, 3),
        class_names=["background", "building"],
        options=options,
    )
    folder = str(tmp_path_factory.mktemp("stac-model") / "model")
    saving.save_model(net, card, folder)
    return folder


def write_cog(uri: str, index: int, size: int = SIZE, endpoint: str | None = None) -> tuple:
    """A synthetic 3-band COG at grid cell ``index``; returns its georeference."""
    image, _ = synth.generate_tile(size, synth.tile_seed(3, index), "binary")
    transform = synth.grid_transform(0, index, size)
    data = imagery.encode_geotiff(image, synth.CRS, transform, cog=True)
    storage.write_bytes(uri, data, endpoint=endpoint)
    return synth.CRS, transform, size


def feature(item_id: str, href: str, **assets: dict) -> dict:
    """A STAC item with an ``image`` asset at ``href`` (and any other ``assets``)."""
    image = {"href": href, "type": COG, "roles": ["data"]}
    return {
        "type": "Feature",
        "stac_version": "1.1.0",
        "stac_extensions": [],
        "id": item_id,
        "geometry": None,
        "properties": {"datetime": WHEN},
        "links": [],
        "assets": {"image": image, **assets} if href else assets,
    }


def item_collection(features: list[dict]) -> str:
    return json.dumps({"type": "FeatureCollection", "features": features})


THUMB = {"href": "thumb.png", "type": "image/png", "roles": ["thumbnail"]}


def check_output(out: str, inputs: dict, endpoint: str | None, scene: bool = False) -> dict:
    """The output collection and its items, read back through plain storage reads: they load
    with pystac, pass the core STAC schemas bundled with pystac (offline), carry the label
    fields, link their source item, and their ``labels`` asset is a COG mask with nodata 255
    whose footprint is the input's. ``inputs``: ``{item id: (source href, crs, transform,
    size)}``. Returns ``{item id: item dict}``."""
    from pystac.validation import validate_dict

    uri = storage.join(out, stac.COLLECTION_FILE)
    doc = stac.read_json(uri, storage.filesystem(uri, endpoint))
    validate_dict(doc, extensions=[])
    collection = pystac.Collection.from_dict(doc, href=uri)
    assert collection.license == "other" and collection.id.startswith("segray-")
    links = [link["href"] for link in doc["links"] if link["rel"] == "item"]  # as written
    items = {}
    for href in links:
        item_uri = stac.resolve(uri, href)
        raw = stac.read_json(item_uri, storage.filesystem(item_uri, endpoint))
        validate_dict(raw, extensions=[])
        item = pystac.Item.from_dict(raw, href=item_uri)
        label = LabelExtension.ext(item)
        assert label.label_type == "raster" and label.label_tasks == ["segmentation"]
        assert label.label_classes[0].classes == ["background", "building"]
        assert "building" in label.label_description
        source = next(link["href"] for link in raw["links"] if link["rel"] == "source")
        assert stac.resolve(item_uri, source) == inputs[item.id][0]
        assert stac.resolve(item_uri, raw["links"][2]["href"]) == uri  # its collection
        assert item.datetime.isoformat().replace("+00:00", "Z") == WHEN
        asset = raw["assets"]["labels"]
        assert asset["type"] == COG and asset["roles"] == ["labels"]
        assert asset["raster:bands"] == [{"nodata": 255, "data_type": "uint8"}]
        mask = stac.resolve(item_uri, asset["href"])
        assert mask == storage.join(out, stac.safe_name(item.id) + ".tif")
        data = storage.read_bytes(mask, endpoint=endpoint)
        with rasterio.MemoryFile(data) as mem, mem.open() as ds:
            assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG" and ds.nodata == 255
            crs, transform, size = inputs[item.id][1:]
            assert ds.crs == crs and ds.transform == transform and ds.shape == (size, size)
            assert set(np.unique(ds.read(1))) <= {0, 1}
            west, south, east, north = transform_bounds(ds.crs, "EPSG:4326", *ds.bounds)
        np.testing.assert_allclose(item.bbox, [west, south, east, north], atol=1e-6)
        assert item.geometry["type"] == "Polygon"
        items[item.id] = raw
    assert sorted(items) == sorted(inputs)
    (box,) = doc["extent"]["spatial"]["bbox"]
    assert box[0] == min(i["bbox"][0] for i in items.values())
    assert box[2] == max(i["bbox"][2] for i in items.values())
    return items


# --- STAC in: reading, choosing the asset, naming the masks -------------------------------------


def test_hrefs_resolve_against_their_file_local_and_s3():
    assert stac.resolve("s3://b/x/y/items.json", "../z/a.tif") == "s3://b/x/z/a.tif"
    assert stac.resolve("s3://b/items.json", "./a.tif") == "s3://b/a.tif"
    assert stac.resolve("/data/stac/c.json", "./sub/a.tif") == "/data/stac/sub/a.tif"
    assert stac.resolve("/data/stac/c.json", "s3://o/k.tif") == "s3://o/k.tif"
    assert stac.resolve("s3://b/c.json", "/abs/a.tif") == "/abs/a.tif"
    assert stac.resolve("s3://b/c.json", "file:///abs/a.tif") == "/abs/a.tif"


def test_the_asset_is_the_named_one_or_the_one_raster(tmp_path):
    two = feature("two", "a.tif", other={"href": "b.tif", "type": COG, "roles": ["data"]})
    untyped = feature("plain", "", img={"href": "x.tif", "type": COG}, thumbnail=THUMB)
    (tmp_path / "items.json").write_text(
        item_collection([feature("one", "a.tif", thumbnail=THUMB), two, untyped])
    )
    items = {i.id: i for i in stac.read_items(str(tmp_path / "items.json"))}
    assert items["one"].asset() == str(tmp_path / "a.tif")  # the thumbnail is no candidate
    assert items["plain"].asset() == str(tmp_path / "x.tif")  # a GeoTIFF without roles
    assert items["two"].asset("other") == str(tmp_path / "b.tif")
    with pytest.raises(DatasetError, match=r"'two' .*several raster assets.* image, other"):
        items["two"].asset()
    with pytest.raises(DatasetError, match=r"'one' .*has no asset 'red'.*: image, thumbnail"):
        items["one"].asset("red")
    assert items["one"].datetime == WHEN and items["one"].href == str(tmp_path / "items.json")


def test_a_static_catalog_is_followed_to_its_items(tmp_path):
    """catalog.json → a child collection in a subfolder → item files in folders of their own,
    and an item linked from the catalog itself; relative hrefs resolve against each file."""
    root = tmp_path / "stac"
    (root / "col" / "i1").mkdir(parents=True)
    (root / "col" / "i2").mkdir()
    (root / "loose").mkdir()
    link = {"type": "application/json"}
    catalog = {"type": "Catalog", "stac_version": "1.1.0", "id": "cat", "description": "d"}
    catalog["links"] = [
        {"rel": "root", "href": "./catalog.json", **link},
        {"rel": "child", "href": "./col/collection.json", **link},
        {"rel": "item", "href": "./loose/item.json", **link},
    ]
    collection = {
        "type": "Collection",
        "stac_version": "1.1.0",
        "id": "col",
        "description": "d",
        "license": "other",
        "extent": {"spatial": {"bbox": [[0, 0, 1, 1]]}, "temporal": {"interval": [[WHEN, None]]}},
        "links": [
            {"rel": "root", "href": "../catalog.json", **link},
            {"rel": "parent", "href": "../catalog.json", **link},
            {"rel": "item", "href": "./i1/i1.json", **link},
            {"rel": "item", "href": "i2/i2.json", **link},
        ],
    }
    (root / "catalog.json").write_text(json.dumps(catalog))
    (root / "col" / "collection.json").write_text(json.dumps(collection))
    (root / "col" / "i1" / "i1.json").write_text(json.dumps(feature("i1", "./image.tif")))
    (root / "col" / "i2" / "i2.json").write_text(json.dumps(feature("i2", "../../shared/b.tif")))
    (root / "loose" / "item.json").write_text(json.dumps(feature("loose", "image.tif")))
    items = {i.id: i for i in stac.read_items(str(root / "catalog.json"))}
    assert {k: v.asset() for k, v in items.items()} == {
        "i1": str(root / "col" / "i1" / "image.tif"),
        "i2": str(root / "shared" / "b.tif"),
        "loose": str(root / "loose" / "image.tif"),
    }
    assert items["i2"].href == str(root / "col" / "i2" / "i2.json")
    # the collection alone gives its two items; the plan names masks by item id
    assert len(stac.read_items(str(root / "col" / "collection.json"))) == 2
    out = tmp_path / "out"
    todo, done, sources = plan_sources(
        PredictConfig(model="m", stac=str(root / "catalog.json"), output=str(out))
    )
    assert not done and sorted(o for _, o in todo) == sorted(str(out / f"{n}.tif") for n in items)
    assert sources[str(out / "i2.tif")]["href"] == items["i2"].href


def test_item_ids_cannot_place_a_mask_outside_the_output(tmp_path):
    """Ids that try to climb out, or are absolute, or clash once made file names, never name a
    file outside the output: separators become ``_``; clashes and unreadable hrefs are error
    rows naming the item."""
    evil = ["../../evil", "..", "/etc/passwd", "a/../../b", "..\\..\\win", "a_b", "a/b"]
    features = [feature(i, f"t{n}.tif") for n, i in enumerate(evil)]
    features.append(feature("web", "https://example.com/x.tif"))
    (tmp_path / "items.json").write_text(item_collection(features))
    out = tmp_path / "out"
    config = PredictConfig(model="m", stac=str(tmp_path / "items.json"), output=str(out))
    todo, done, _ = plan_sources(config)
    names = sorted(os.path.basename(o) for _, o in todo)
    assert all(storage.lies_under(str(out), o) for _, o in todo)
    assert all(os.path.dirname(o) == str(out) for _, o in todo)
    assert names == sorted(
        [".._.._evil.tif", "...tif", "_etc_passwd.tif", "a_.._.._b.tif", ".._.._win.tif", "a_b.tif"]
    )
    errors = {u: reason for u, _, reason in done}
    assert any("already made from" in r and "a_b.tif" in r for r in errors.values())  # a/b
    web = errors[f"{tmp_path / 'items.json'}#web"]
    assert "'web'" in web and "unsupported scheme" in web


def test_bad_settings_and_a_missing_stac_file_say_what_is_wrong(tmp_path):
    with pytest.raises(ConfigError, match="stac replaces input and manifest"):
        PredictConfig(model="m", stac="s.json", input="folder", output="o")
    with pytest.raises(ConfigError, match="asset names the asset of STAC items"):
        PredictConfig(model="m", input="folder", output="o", asset="image")
    missing = str(tmp_path / "nowhere" / "items.json")
    with pytest.raises(StorageError, match=f"cannot read STAC file: {missing}"):
        plan_sources(PredictConfig(model="m", stac=missing, output=str(tmp_path / "o")))
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(DatasetError, match="bad.json: not a STAC object"):
        stac.read_items(str(tmp_path / "bad.json"))
    (tmp_path / "geo.json").write_text(json.dumps({"type": "Polygon", "coordinates": []}))
    with pytest.raises(DatasetError, match="geo.json: not a STAC ItemCollection, catalog"):
        stac.read_items(str(tmp_path / "geo.json"))


def test_a_stac_file_without_items_is_an_error_naming_it(model, tmp_path):
    from segray.bulk.job import predict

    (tmp_path / "empty.json").write_text(item_collection([]))
    config = PredictConfig(model=model, stac=str(tmp_path / "empty.json"), output=str(tmp_path))
    with pytest.raises(ConfigError, match=f"no STAC item found in {tmp_path}/empty.json"):
        predict(config)


def test_a_mask_without_georeference_gets_an_item_with_null_geometry(tmp_path):
    """A PNG tile's mask: geometry null and no bbox (STAC allows it), the input file as its
    source; the collection over such items spans the world; both pass the core schemas."""
    from pystac.validation import validate_dict

    assert stac.footprint(None, None, (32, 32)) is None
    out = str(tmp_path / "out")
    item = stac.mask_item(
        f"{out}/sub/x.json",
        f"{out}/sub/x.png",
        out,
        geo=None,
        source="/in/sub/x.png",
        source_id=None,
        datetime=WHEN,
        classes=["a", "b"],
        description="d",
        collection_id="c",
    )
    validate_dict(item, extensions=[])
    assert item["geometry"] is None and "bbox" not in item and item["id"] == "sub_x"
    source = {link["rel"]: link for link in item["links"]}["source"]
    assert source == {
        "rel": "source",
        "href": "/in/sub/x.png",
        "title": "input image",
        "type": "image/png",
    }
    assert item["assets"]["labels"] == {
        "href": "./x.png",
        "type": "image/png",
        "title": "predicted mask",
        "roles": ["labels"],
        "raster:bands": [{"nodata": 255, "data_type": "uint8"}],
    }
    assert {link["rel"]: link["href"] for link in item["links"]}["collection"] == (
        "../collection.json"
    )
    doc = stac.collection("c", [("sub/x.json", item)], description="d")
    validate_dict(doc, extensions=[])
    assert doc["extent"]["spatial"]["bbox"] == [[-180.0, -90.0, 180.0, 90.0]]
    assert doc["extent"]["temporal"]["interval"] == [[WHEN, WHEN]]


# --- end to end: predict over STAC items, STAC out ----------------------------------------------


@pytest.mark.slow
def test_predict_over_a_local_item_collection_writes_stac_and_a_rerun_keeps_it(
    model, tmp_path, ray_local
):
    """3 items with relative hrefs (one in a subfolder, one with an id that climbs out) and one
    without the named asset: 3 masks, each with its label item, the collection over them; the
    bad item is an error row naming it and its assets; nothing lands outside the output. A
    rerun skips every mask, rewrites nothing, and the collection still lists all three."""
    from segray.bulk.job import predict

    src = tmp_path / "in"
    names = {"a": "a.tif", "b": "sub/b.tif", "../../evil": "c.tif"}
    inputs = {}
    for index, (item_id, rel) in enumerate(names.items()):
        geo = write_cog(str(src / rel), index)
        inputs[item_id] = (str(src / "items.json"), *geo)
    features = [feature(i, rel, thumbnail=THUMB) for i, rel in names.items()]
    features.append(feature("bare", "", thumbnail=THUMB))
    (src / "items.json").write_text(item_collection(features))
    out = tmp_path / "out"
    config = PredictConfig(
        model=model,
        stac=str(src / "items.json"),
        output=str(out),
        asset="image",
        batch_size=4,
        max_error_rate=0.5,
    )
    result = predict(config)
    assert result.counts == {"ok": 3, "skipped": 0, "error": 1}, result.summary()
    (bare,) = [r for r in read_manifest(result.manifest).to_pylist() if r["status"] == "error"]
    assert "'bare'" in bare["error"] and "assets: thumbnail" in bare["error"]
    items = check_output(str(out), inputs, None)
    assert sorted(os.listdir(tmp_path)) == ["in", "out"]
    assert sorted(p.name for p in out.iterdir() if p.name != "_manifest") == sorted(
        [
            "a.tif",
            "a.json",
            "b.tif",
            "b.json",
            ".._.._evil.tif",
            ".._.._evil.json",
            "collection.json",
        ]
    )
    rows = {r["input_uri"]: r for r in read_manifest(result.manifest).to_pylist()}
    assert rows[str(src / "sub" / "b.tif")]["item_uri"] == str(out / "b.json")
    # the collection opens with pystac's own reader too, its items through their links
    opened = pystac.Collection.from_file(str(out / "collection.json"))
    assert sorted(i.id for i in opened.get_items()) == sorted(items)

    stamp = (out / "collection.json").stat().st_mtime_ns
    again = predict(config)
    assert again.counts == {"ok": 0, "skipped": 3, "error": 1}, again.summary()
    assert (out / "collection.json").stat().st_mtime_ns == stamp
    assert check_output(str(out), inputs, None) == items


@pytest.mark.slow
def test_predict_scenes_from_s3_items_writes_stac_on_s3(model, s3_prefix, s3_endpoint, ray_local):
    """An ItemCollection on s3:// with absolute s3:// asset hrefs, the assets scenes (read
    window by window); masks, items and the collection on s3://, read back from there."""
    from segray.bulk.job import predict

    features, inputs = [], {}
    for index, item_id in enumerate(["s1", "s2"]):
        href = f"{s3_prefix}/scenes/{item_id}.tif"
        geo = write_cog(href, index, size=3 * SIZE, endpoint=s3_endpoint)
        inputs[item_id] = (f"{s3_prefix}/stac/items.json", *geo)
        features.append(feature(item_id, href))
    storage.write_text(
        f"{s3_prefix}/stac/items.json", item_collection(features), endpoint=s3_endpoint
    )
    out = f"{s3_prefix}/out"
    config = PredictConfig(
        model=model,
        stac=f"{s3_prefix}/stac/items.json",
        output=out,
        endpoint=s3_endpoint,
        scene=True,
        overlap=8,
        batch_size=4,
    )
    result = predict(config)
    assert result.counts == {"ok": 2, "skipped": 0, "error": 0}, result.summary()
    check_output(out, inputs, s3_endpoint, scene=True)
    again = predict(config)
    assert again.counts == {"ok": 0, "skipped": 2, "error": 0}, again.summary()
