"""Distributed training on a real local Ray: sync, sharding, faults, resume, learning, S3."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from segray import inference, metrics
from segray.datasets import labels
from segray.devtools import synth
from segray.errors import ConfigError, DatasetError, ModelError
from segray.io import imagery, storage
from segray.models import saving
from segray.train.augment import AugmentConfig
from segray.train.config import THRESHOLDS, TrainConfig
from segray.train.driver import prepare, train

TINY = {"base_filters": 4, "depth": 2}


@pytest.fixture(scope="module")
def binary_tiles(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("tiles"))
    synth.write_collection(root, count=22, size=32, mode="binary", seed=3)
    return root


def tiny_config(data: str, out: str, **kw) -> TrainConfig:
    base = dict(
        data=data,
        out=out,
        model_options=TINY,
        num_classes=2,
        size=32,
        epochs=2,
        batch_size=4,
        workers=2,
        max_failures=0,
        diagnostics=True,
        augment=AugmentConfig.off(),
    )
    base.update(kw)
    return TrainConfig(**base)


def diagnostics(out: str, epoch: int, workers: int) -> list[dict]:
    return [
        json.loads(storage.read_text(f"{out}/diagnostics/epoch{epoch:04d}_rank{r}.json"))
        for r in range(workers)
    ]


def _text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def actor_classes(ray) -> set[str]:
    """The classes of every actor the Ray instance has held, from its actor table."""
    from ray._private import state

    return {a["ActorClassName"] for a in state.actors().values()}


@pytest.mark.slow
def test_two_workers_stay_in_sync_use_each_sample_once_then_resume(
    binary_tiles, tmp_path, ray_local
):
    out = str(tmp_path / "run")
    spent = set(Path(tempfile.gettempdir()).glob("segray-ckpt-*"))
    result = train(tiny_config(binary_tiles, out))
    assert result.epochs_run == 2 and result.starts == [1]
    # each epoch's local checkpoint folder goes once Ray Train has copied it into the run folder
    # (other runs on this machine may hold theirs: a left one would match a state of this run)
    states = {p.read_text() for p in Path(out).glob("epoch_*/state.json")}
    left = set(Path(tempfile.gettempdir()).glob("segray-ckpt-*")) - spent
    assert len(states) == 2 and not [f for f in left if _text(f / "state.json") in states]
    train_ids, _ = labels.split_samples(
        labels.find_samples(labels.DatasetSpec(root=binary_tiles)), 0.2, 0
    )
    expected = sorted(s.id for s in train_ids)
    for epoch in (1, 2):
        ranks = diagnostics(out, epoch, 2)
        # replicas bit-identical after every epoch
        assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
        # every training sample exactly once across workers; global batch = 2 per worker x 2
        seen = ranks[0]["ids"] + ranks[1]["ids"]
        assert sorted(seen) == expected
        assert all(r["global_batch"] == 4 for r in ranks)
    # the run folder has what bulk prediction and Serve load
    for name in ("model.keras", "model.json", "metrics.csv", "curves.png", "last/model.keras"):
        assert storage.exists(f"{out}/{name}"), name
    assert len(storage.read_text(f"{out}/metrics.csv").strip().splitlines()) == 3
    # a two-class run's best epoch is its positive class's best validation IoU, recorded as such
    assert result.monitor == "val_iou_1" and "val_f1_1" in result.history[-1]
    scores = [h["val_iou_1"] for h in result.history]
    assert result.history[result.best_epoch - 1]["val_iou_1"] == max(scores)
    assert "monitor: val_iou_1" in storage.read_text(f"{out}/config.yaml")
    # on the Ray this process started, Ray Train ran no preemption watcher (runtime.train_env)
    classes = actor_classes(ray_local)
    assert "TrainController" in classes and "PreemptionWatcher" not in classes
    card = saving.load_card(out)
    assert card.dtype == "uint8" and card.scale == 255  # the pixel type it was trained on
    curves = imagery.decode(storage.read_bytes(f"{out}/curves.png"))
    assert curves.shape[0] > 100 and curves.shape[1] > 100

    # without --resume the folder is refused; with it, a 4-epoch run starts at epoch 3
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        prepare(tiny_config(binary_tiles, out, epochs=4))
    resumed = train(tiny_config(binary_tiles, out, epochs=4, resume=True))
    assert resumed.starts == [1, 3]
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    assert len(storage.read_text(f"{out}/metrics.csv").strip().splitlines()) == 5
    assert resumed.restored[-1]["from"] == "epoch_0002" and not resumed.restored[-1]["passed_over"]

    # a newest checkpoint that no longer loads is passed over for the next older complete one
    from segray.train.checkpoints import complete_checkpoints

    newest, older = complete_checkpoints(out, None)[:2]
    with open(f"{newest}/model.keras", "r+b") as f:
        f.truncate(1000)
    again = train(tiny_config(binary_tiles, out, epochs=5, resume=True))
    fallback = int(older.rsplit("epoch_", 1)[-1][:4])
    assert again.restored[-1]["from"] == older.rsplit("/", 1)[-1]
    (passed,) = again.restored[-1]["passed_over"]
    assert passed.startswith(newest.rsplit("/", 1)[-1])
    assert again.starts[-1] == fallback + 1
    assert [h["epoch"] for h in again.history] == [1, 2, 3, 4, 5]
    assert "passed over" in again.summary()

    # the newest checkpoint folder deleted: Ray Train's record of it is set aside (it would refuse
    # the run folder as corrupted) and the run goes on from the newest folder left
    gone, *left = complete_checkpoints(out, None)
    shutil.rmtree(gone)
    resumed = train(tiny_config(binary_tiles, out, epochs=6, resume=True))
    assert Path(out, "checkpoint_manager_snapshot.json.stale").exists()
    assert resumed.restored[-1]["from"] == left[0].rsplit("/", 1)[-1]
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4, 5, 6]
    # none restorable: one error on the driver, naming each folder, before any worker starts
    for folder in complete_checkpoints(out, None):
        with open(f"{folder}/model.keras", "r+b") as f:
            f.truncate(1000)
    with pytest.raises(ModelError, match="no checkpoint of .* can be restored") as refused:
        prepare(tiny_config(binary_tiles, out, epochs=7, resume=True))
    for folder in complete_checkpoints(out, None):
        assert f"{folder}/model.keras" in str(refused.value)


@pytest.mark.slow
def test_lost_worker_restarts_from_last_checkpoint(binary_tiles, tmp_path, ray_local):
    out = str(tmp_path / "fault")
    result = train(tiny_config(binary_tiles, out, epochs=3, fail_at_epoch=2, max_failures=1))
    assert storage.exists(f"{out}/_fault_injected")
    assert result.starts == [1, 2]  # the group restarted at epoch 2 from epoch 1's checkpoint
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert "val_miou" in result.best


@pytest.mark.slow
def test_checkpoints_on_s3_load_back_identical(
    binary_tiles, tmp_path, s3_prefix, s3_endpoint, ray_local
):
    out = f"{s3_prefix}/run"
    train(tiny_config(binary_tiles, out, epochs=1, workers=1, batch_size=4, endpoint=s3_endpoint))
    s3_model, card = saving.load_model(out, storage.filesystem(out, s3_endpoint))
    local = tmp_path / "copy"
    for name in ("model.keras", "model.json"):
        storage.write_bytes(
            str(local / name), storage.read_bytes(f"{out}/{name}", endpoint=s3_endpoint)
        )
    local_model, local_card = saving.load_model(str(local))
    assert card == local_card and card.name == "unet" and card.input_shape == (32, 32, 3)
    x = np.random.default_rng(0).random((2, 32, 32, 3), dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(s3_model(x)), np.asarray(local_model(x)))
    epoch_dirs = storage.list_files(out, pattern="epoch_0001/*", endpoint=s3_endpoint)
    assert any(u.endswith("model.keras") for u in epoch_dirs)


@pytest.mark.slow
def test_small_unet_learns_buildings(tmp_path, ray_local):
    data = str(tmp_path / "data")
    synth.write_collection(data, count=96, size=64, mode="binary", seed=11)
    out = str(tmp_path / "learn")
    cfg = TrainConfig(
        data=data,
        out=out,
        model_options={"base_filters": 8, "depth": 3},
        num_classes=2,
        size=64,
        epochs=20,
        batch_size=8,
        workers=1,
        learning_rate=3e-3,
        schedule="cosine",
        max_failures=0,
        augment=AugmentConfig(hue=0.0, brightness=0.0, contrast=0.0),  # flips and rot90 only
    )
    best = train(cfg).best
    # evaluate the saved best model ourselves on the validation tiles
    model, card = saving.load_model(out)
    _, val = labels.split_samples(labels.find_samples(labels.DatasetSpec(root=data)), 0.2, 0)
    cm, at_half = metrics.ConfusionMatrix(2), metrics.ConfusionMatrix(2)
    spec = labels.DatasetSpec(root=data)
    for sample in val:
        row = labels.load_sample(sample, spec)
        x = inference.prepare(imagery.Tile(row["image"]), card)[None]
        logits = inference.infer(model, x, card)
        cm.update(row["mask"][None], inference.render(logits, card))
        at_half.update(row["mask"][None], inference.render(logits, card, threshold=0.5))
    assert cm.iou[1] >= 0.6, cm.table()
    # the card keeps the threshold its best epoch chose on these tiles, and the inference path
    # at that threshold scores what the training loop scored (never worse than 0.5 there)
    assert card.threshold == best["val_threshold"] and card.threshold in THRESHOLDS
    assert cm.iou[1] == pytest.approx(best["val_iou_1"], abs=1e-4)
    assert cm.iou[1] >= at_half.iou[1]
    # the run's STAC MLM item describes its model.keras, and stac-model accepts it
    from segray.inference import export

    item = json.loads((Path(out) / export.MLM_FILE).read_text())
    export.check_mlm(item)
    assert item["assets"]["model"]["href"] == saving.MODEL_FILE
    assert item["properties"]["mlm:hyperparameters"]["threshold"] == card.threshold


def test_bad_input_refused_before_workers_start(binary_tiles, tmp_path):
    out = str(tmp_path / "r")
    # settings are refused when the config is made, naming the field and the allowed values
    with pytest.raises(ConfigError, match="smaller than the number of workers"):
        tiny_config(binary_tiles, out, batch_size=1, workers=2)
    with pytest.raises(ConfigError, match="not a multiple of workers 2; use 4 or 6"):
        tiny_config(binary_tiles, out, batch_size=5, workers=2)
    with pytest.raises(ConfigError, match="optimizer: Input should be 'adam', 'rmsprop' or 'sgd'"):
        tiny_config(binary_tiles, out, optimizer="adamw")
    with pytest.raises(ConfigError, match="monitor val_iou_2: class 2 does not exist in 2 classes"):
        tiny_config(binary_tiles, out, monitor="val_iou_2")
    with pytest.raises(ConfigError, match="monitor 'miou': expected one of val_miou, .*val_f1_K"):
        tiny_config(binary_tiles, out, monitor="miou")
    with pytest.raises(ConfigError, match="monitor val_f1_1 needs validation tiles"):
        tiny_config(binary_tiles, out, monitor="val_f1_1", val_fraction=0)
    assert tiny_config(binary_tiles, out, num_classes=3).monitor == "val_miou"
    assert tiny_config(binary_tiles, out, val_fraction=0).monitor == "loss"
    assert not TrainConfig(data=binary_tiles, out=out).augment.active  # measured: off by default
    with pytest.raises(ConfigError, match="loss: unknown loss 'dicey'"):
        prepare(tiny_config(binary_tiles, out, loss="ce+dicey"))
    with pytest.raises(DatasetError, match="no images under"):
        prepare(tiny_config(str(tmp_path / "empty"), out))


def test_the_threshold_is_chosen_on_the_monitored_metric_nearest_half_of_equals(binary_tiles):
    from segray.train.loop import _best_threshold

    # truth x prediction counts at thresholds 0.3 and 0.7: the low one finds every target pixel
    # with as many false ones (IoU 0.5, accuracy 0.95), the high one a fifth of them, none false
    # (IoU 0.2, accuracy 0.96)
    cms = np.array([[[900, 50], [0, 50]], [[950, 0], [40, 10]]])
    assert _best_threshold(cms, (0.3, 0.7), "val_iou_1") == 0
    assert _best_threshold(cms, (0.3, 0.7), "val_loss") == 0  # a loss: the positive class's IoU
    assert _best_threshold(cms, (0.3, 0.7), "val_pixel_accuracy") == 1
    same = np.stack([cms[0]] * 3)
    assert _best_threshold(same, (0.2, 0.45, 0.9), "val_f1_1") == 1
    # no target on the validation tiles: predicting none (IoU NaN) beats false ones (IoU 0)
    nothing = np.array([[[900, 100], [0, 0]], [[1000, 0], [0, 0]]])
    assert _best_threshold(nothing, (0.1, 0.5), "val_iou_1") == 1
    out = "unused"
    assert tiny_config(binary_tiles, out).thresholds() == THRESHOLDS
    assert tiny_config(binary_tiles, out, threshold=0.7).thresholds() == (0.7,)
    assert tiny_config(binary_tiles, out, num_classes=3).thresholds() == (0.5,)
    with pytest.raises(ConfigError, match="threshold"):
        tiny_config(binary_tiles, out, threshold=1.5)


def test_bad_data_and_model_refused(tmp_path, ray_local):
    data = str(tmp_path / "multi")
    synth.write_collection(data, count=4, size=32, mode="multiclass")
    out = str(tmp_path / "r")
    with pytest.raises(DatasetError, match="class id 4 found but classes is 2"):
        prepare(tiny_config(data, out))
    with pytest.raises(ModelError, match="unknown model"):
        prepare(tiny_config(data, out, num_classes=5, model="unet3000"))
    storage.write_bytes(
        f"{data}/masks/tile_00001.png", imagery.encode_png(np.zeros((8, 8), np.uint8))
    )
    with pytest.raises(DatasetError, match="mask is 8x8 but its image"):
        prepare(tiny_config(data, out, num_classes=5))


def test_photometric_augmentation_works_in_normalised_space_band_by_band():
    from segray.train.augment import Photometry, augment_batch

    rng = np.random.default_rng(0)
    images = rng.normal(size=(8, 16, 16, 4)).astype(np.float32)  # standardised bands
    masks = np.zeros((8, 16, 16), np.uint8)
    valid = np.ones((8, 16, 16), bool)
    valid[:, :4] = False  # a no-data strip
    images[~valid] = 0
    unit = Photometry(np.zeros(4, np.float32), np.full(4, 2.0, np.float32))
    geometry_off = {"hflip": False, "vflip": False, "rot90": False, "hue": 0.0}
    shifted, _ = augment_batch(
        images, masks, AugmentConfig(**geometry_off, brightness=0.1, contrast=0.0), rng, unit, valid
    )
    assert (shifted < -1).mean() > 0.1  # nothing clipped to [0, 1]: negatives survive
    assert (shifted[~valid] == 0).all()  # no data stays what inference sees
    delta = (shifted - images)[:, 4:]  # valid rows: one shift per sample and band
    per_band = delta.reshape(8, -1, 4)
    np.testing.assert_allclose(
        per_band, np.broadcast_to(per_band[:, :1], per_band.shape), atol=1e-5
    )
    assert np.abs(per_band[:, 0]).max() <= 0.1 * 2.0 + 1e-6  # at most 0.1 of a band's spread
    assert np.ptp(per_band[:, 0], axis=1).min() > 0  # the bands move independently
    stretched, _ = augment_batch(
        images, masks, AugmentConfig(**geometry_off, brightness=0.0, contrast=0.2), rng, unit, valid
    )
    ratio = stretched[:, 4:] / np.where(images[:, 4:] == 0, 1, images[:, 4:])
    assert np.all((ratio > np.exp(-0.2) - 1e-4) & (ratio < np.exp(0.2) + 1e-4))


def test_cached_tiles_give_the_batches_the_stream_gives(binary_tiles, ray_local):
    """A worker's cache of decoded tiles serves each epoch the rows, in the order, the stream
    of Ray Data would serve, for every rank; a cache too small streams."""
    from segray.datasets.labels import DatasetSpec
    from segray.train.feed import CachedRows, tile_feed

    spec = DatasetSpec(root=binary_tiles, size=32, val_fraction=0.2)
    streamed, _ = tile_feed(spec, global_batch=4, cache_bytes=0)
    cached, _ = tile_feed(spec, global_batch=4, cache_bytes=2**30)
    tiny, _ = tile_feed(spec, global_batch=4, cache_bytes=1000)
    assert not streamed.cached() and cached.cached() and not tiny.cached()
    assert not isinstance(tiny.train(1, 0, 2), CachedRows)

    def batches(shard):
        out = []
        for b in shard.iter_batches(batch_size=2, batch_format="numpy"):
            out += [
                (str(i), w, img.tobytes(), m.tobytes(), v.tobytes())
                for i, w, img, m, v in zip(
                    b["id"], b["weight"], b["image"], b["mask"], b["valid"], strict=True
                )
            ]
        return sorted(out)  # Ray Data need not keep the order; the cache keeps the epoch's

    for epoch in (1, 2):
        for rank in (0, 1):
            shard = cached.train(epoch, rank, 2)
            assert isinstance(shard, CachedRows)
            assert [r["id"] for r in shard.rows] == [
                r["id"] for r in cached.train_rows(epoch, rank, 2)
            ]
            assert batches(shard) == batches(streamed.train(epoch, rank, 2))
    assert batches(cached.val(0, 1)) == batches(streamed.val(0, 1))


def test_step_progress_is_posted_at_most_every_interval_and_always_at_the_epoch_end():
    from segray.train import progress

    posted: list[tuple] = []
    board = SimpleNamespace(step=SimpleNamespace(remote=lambda *a: posted.append(a)))
    times = iter([0.0, 0.1, 0.2, 0.6, 0.7, 0.8])
    post = progress.StepPoster(board, every=0.5, clock=lambda: next(times))
    sent = [post(1, step, 6) for step in range(1, 7)]
    assert sent == [True, False, False, True, False, True]  # 0.0, 0.6, and the last step
    assert posted == [(1, 1, 6), (1, 4, 6), (1, 6, 6)]
    assert progress.StepPoster(None)(1, 6, 6) is False  # no board, nothing posted


def test_train_env_only_on_a_ray_this_process_started_and_the_users_setting_wins(monkeypatch):
    import os

    from segray import runtime

    key, value = next(iter(runtime.LOCAL_TRAIN_ENV.items()))
    monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(runtime, "_started_here", False)
    with runtime.train_env():
        assert key not in os.environ  # a joined cluster keeps Ray Train's defaults
    monkeypatch.setattr(runtime, "_started_here", True)
    with runtime.train_env():
        assert os.environ[key] == value
    assert key not in os.environ  # restored on the way out
    with runtime.train_env(local=False):  # a caller that knows better wins over the guess
        assert key not in os.environ
    monkeypatch.setattr(runtime, "_started_here", False)
    with runtime.train_env(local=True):  # a Tune trial on the Ray that segray tune started
        assert os.environ[key] == value
    assert key not in os.environ
    monkeypatch.setenv(key, "1")
    with runtime.train_env():
        assert os.environ[key] == "1"
    assert os.environ[key] == "1"


def test_ray_trains_controller_unpickles_nothing_that_imports_tensorflow():
    """The controller actor unpickles the backend config and the loop; neither may pull in
    TensorFlow (Ray's ``TensorflowConfig`` did: a third 4 s import beside the two workers')."""
    import subprocess
    import sys

    code = (
        "import sys, ray.cloudpickle as cp\n"
        "from segray.train.backend import MultiWorkerConfig\n"
        "from segray.train.loop import train_loop\n"
        "config = cp.loads(cp.dumps(MultiWorkerConfig()))\n"
        "assert config.backend_cls.__name__ == '_MultiWorkerBackend'\n"
        "print(sorted(m for m in ('tensorflow', 'keras', 'jax') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
