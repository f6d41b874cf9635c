"""Storage on both backends: local folders and a real S3 endpoint (moto server over HTTP)."""

from __future__ import annotations

import os
import stat
import time

import pyarrow.fs as pafs
import pytest

from segray.io import local, storage


@pytest.fixture(params=["local", "s3"])
def base(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "data"), None
    endpoint = request.getfixturevalue("s3_endpoint")
    return request.getfixturevalue("s3_prefix"), endpoint


def test_write_read_exists_list(base):
    root, endpoint = base
    files = {"images/a.png": b"A", "images/b.tif": b"BB", "images/sub/c.PNG": b"C", "x.txt": b"x"}
    for rel, data in files.items():
        storage.write_bytes(storage.join(root, rel), data, endpoint=endpoint)
    for rel, data in files.items():
        assert storage.read_bytes(storage.join(root, rel), endpoint=endpoint) == data
        assert storage.exists(storage.join(root, rel), endpoint=endpoint)
    assert not storage.exists(storage.join(root, "images/zzz.png"), endpoint=endpoint)
    assert storage.exists(storage.join(root, "images"), endpoint=endpoint)

    everything = storage.list_files(root, endpoint=endpoint)
    assert sorted(storage.relative_to(root, u) for u in everything) == sorted(files)
    pngs = storage.list_files(storage.join(root, "images"), suffixes=".png", endpoint=endpoint)
    assert [storage.relative_to(root, u) for u in pngs] == ["images/a.png", "images/sub/c.PNG"]
    tifs = storage.list_files(root, pattern="*.tif", endpoint=endpoint)
    assert [storage.relative_to(root, u) for u in tifs] == ["images/b.tif"]
    sub = storage.list_files(root, pattern="images/sub/*", endpoint=endpoint)
    assert [storage.relative_to(root, u) for u in sub] == ["images/sub/c.PNG"]


def test_overwrite_replaces_whole_object(base):
    root, endpoint = base
    uri = storage.join(root, "m.bin")
    storage.write_bytes(uri, b"0" * 1000, endpoint=endpoint)
    storage.write_bytes(uri, b"new", endpoint=endpoint)
    assert storage.read_bytes(uri, endpoint=endpoint) == b"new"


def test_local_write_leaves_no_temp_files_and_survives_failure(tmp_path, monkeypatch):
    target = tmp_path / "out" / "mask.png"
    storage.write_bytes(str(target), b"good")
    assert os.listdir(tmp_path / "out") == ["mask.png"]

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        storage.write_bytes(str(target), b"half")
    assert target.read_bytes() == b"good"
    assert os.listdir(tmp_path / "out") == ["mask.png"]


def test_temporary_files_of_dead_writers_are_removed_and_live_ones_kept(tmp_path, monkeypatch):
    import subprocess
    import sys

    out = tmp_path / "out"
    seen: list[str] = []
    real_fsync = os.fsync

    def look(fd):  # while a write is under way: its temporary file, named by its writer
        seen.extend(os.listdir(out))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", look)
    storage.write_bytes(str(out / "mask.png"), b"good")
    monkeypatch.undo()
    (temp,) = seen
    host, pid = temp[len(".tmp-") :].split("-", 1)[0].split(".")[:2]
    assert int(pid) == os.getpid() and temp.endswith("-mask.png")
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead = out / f".tmp-{host}.{gone.stdout.strip()}.abcdefgh-tile.tif"  # a killed task's
    live = out / f".tmp-{host}.{os.getpid()}.abcdefgh-other.tif"  # a writer at work
    foreign = out / f".tmp-00000000.{gone.stdout.strip()}.abcdefgh-far.tif"  # another host's
    legacy = out / ".tmp-killed-old.tif"  # says nothing of its writer: left to the age rule
    for p in (dead, live, foreign, legacy):
        p.write_bytes(b"half")
    fs = storage.filesystem(str(out))
    assert fs.remove_orphaned_temps(str(out)) == 1
    assert not dead.exists() and live.exists() and foreign.exists() and legacy.exists()
    assert (out / "mask.png").read_bytes() == b"good"


def test_file_uri_and_errors(tmp_path):
    path = tmp_path / "a.bin"
    storage.write_bytes(f"file://{path}", b"abc")
    assert storage.read_bytes(str(path)) == b"abc"
    with pytest.raises(storage.StorageError, match="missing.bin"):
        storage.read_bytes(str(tmp_path / "missing.bin"))
    with pytest.raises(storage.StorageError, match="unsupported scheme 'gs'"):
        storage.parse("gs://bucket/x")
    with pytest.raises(storage.StorageError, match="needs a bucket"):
        storage.parse("s3:///x")


def test_s3_missing_object_names_uri(s3_prefix, s3_endpoint):
    uri = storage.join(s3_prefix, "nope.png")
    with pytest.raises(storage.StorageError, match="nope.png"):
        storage.read_bytes(uri, endpoint=s3_endpoint)


def test_endpoint_from_environment(s3_prefix, s3_endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    uri = storage.join(s3_prefix, "env.bin")
    storage.write_bytes(uri, b"via env")
    assert storage.read_bytes(uri, endpoint=s3_endpoint) == b"via env"


def test_pyarrow_filesystem_reads_what_boto3_wrote(base):
    root, endpoint = base
    uri = storage.join(root, "pa/one.bin")
    storage.write_bytes(uri, b"payload", endpoint=endpoint)
    fs, path = storage.pyarrow_filesystem(uri, endpoint=endpoint)
    with fs.open_input_stream(path) as f:
        assert f.read() == b"payload"
    fs_dir, dir_path = storage.pyarrow_filesystem(storage.join(root, "pa"), endpoint=endpoint)
    infos = fs_dir.get_file_info(pafs.FileSelector(dir_path, recursive=True))
    assert [i.base_name for i in infos if i.type == pafs.FileType.File] == ["one.bin"]


def test_local_writes_take_the_mode_the_umask_gives(tmp_path):
    old = os.umask(0o022)
    try:
        local._umask.cache_clear()
        target = tmp_path / "sub" / "mask.tif"
        storage.write_bytes(str(target), b"x")
        assert stat.S_IMODE(target.stat().st_mode) == 0o644  # readable by the team, not 0600
        os.umask(0o027)
        local._umask.cache_clear()
        storage.write_text(str(tmp_path / "model.json"), "{}")
        assert stat.S_IMODE((tmp_path / "model.json").stat().st_mode) == 0o640
    finally:
        os.umask(old)
        local._umask.cache_clear()


@pytest.fixture
def proxy(s3_endpoint):
    from outage import OutageProxy

    p = OutageProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    yield p
    p.close()


def test_s3_calls_ride_out_an_outage_within_the_budget(s3_prefix, s3_endpoint, proxy, monkeypatch):
    monkeypatch.setenv("SEGRAY_S3_RETRY_S", "20")
    uri = storage.join(s3_prefix, "through-outage.bin")
    storage.write_bytes(uri, b"before", endpoint=proxy.endpoint)
    for call in (
        lambda: storage.read_bytes(uri, endpoint=proxy.endpoint),
        lambda: storage.write_bytes(uri, b"during", endpoint=proxy.endpoint),
        lambda: storage.list_files(s3_prefix, endpoint=proxy.endpoint),
        lambda: storage.exists(uri, endpoint=proxy.endpoint),
    ):
        proxy.outage(3.0)  # every connection refused for 3 s
        start = time.monotonic()
        call()
        assert time.monotonic() - start >= 2.5
    assert storage.read_bytes(uri, endpoint=s3_endpoint) == b"during"


def test_s3_outage_past_the_budget_names_the_object_and_permanent_errors_fail_at_once(
    s3_prefix, s3_endpoint, proxy, monkeypatch
):
    monkeypatch.setenv("SEGRAY_S3_RETRY_S", "2")
    uri = storage.join(s3_prefix, "never.bin")
    proxy.down()
    start = time.monotonic()
    with pytest.raises(storage.StorageError, match="never.bin"):
        storage.read_bytes(uri, endpoint=proxy.endpoint)
    assert 1.0 <= time.monotonic() - start < 10
    proxy.up()
    # a 404 is not retried: with a 60 s budget, a retried one would take most of a minute
    monkeypatch.setenv("SEGRAY_S3_RETRY_S", "60")
    start = time.monotonic()
    with pytest.raises(storage.StorageError, match="NoSuchKey"):
        storage.read_bytes(uri, endpoint=proxy.endpoint)
    assert time.monotonic() - start < 10


def test_s3_keys_keep_question_marks_and_hashes():
    # characters of a key, not a query or fragment: a mask of "a?b#c.tif" is that key's mask
    loc = storage.parse("s3://bucket/tiles/a?b#c.tif")
    assert (loc.bucket, loc.path) == ("bucket", "tiles/a?b#c.tif")
    assert storage.relative_to("s3://bucket/tiles", loc.uri) == "a?b#c.tif"
    with pytest.raises(storage.StorageError, match="needs a bucket"):
        storage.parse("s3:///key")


def test_a_filesystem_is_chosen_once_by_uri_and_travels_whole(tmp_path):
    """One FileSystem per scheme, bound to its endpoint: the same object for the same endpoint,
    equal after pickling (as Ray ships it), and an unknown scheme is refused by name."""
    import pickle

    s3 = storage.filesystem("s3://bucket/key", "http://127.0.0.1:1")
    assert isinstance(s3, storage.S3FileSystem) and s3.endpoint == "http://127.0.0.1:1"
    assert storage.filesystem("s3://other/k", "http://127.0.0.1:1") is s3
    assert storage.filesystem("s3://bucket/key").endpoint is None
    assert pickle.loads(pickle.dumps(s3)) == s3
    assert storage.filesystem(str(tmp_path)) is storage.filesystem(f"file://{tmp_path}")
    assert isinstance(storage.filesystem(str(tmp_path)), storage.LocalFileSystem)
    with pytest.raises(storage.StorageError, match="gs://b/x.*unsupported scheme 'gs'"):
        storage.filesystem("gs://b/x")


def test_an_s3_filesystem_holds_its_endpoint_whatever_the_environment(
    s3_prefix, s3_endpoint, monkeypatch
):
    """Bound to the moto server, it reads and writes there while the environment names a
    closed port; the same URI without the endpoint follows the environment and fails."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    monkeypatch.setenv("SEGRAY_S3_RETRY_S", "0")
    fs = storage.filesystem(s3_prefix, s3_endpoint)
    uri = storage.join(s3_prefix, "bound/a.bin")
    fs.write_bytes(uri, b"abc")
    assert fs.read_bytes(uri) == b"abc" and fs.exists(uri)
    assert fs.list_files(storage.join(s3_prefix, "bound")) == [uri]
    arrow, path = fs.arrow(uri)
    with arrow.open_input_stream(path) as f:
        assert f.read() == b"abc"
    with pytest.raises(storage.StorageError, match="a.bin"):
        storage.filesystem(uri).read_bytes(uri)


def test_a_named_pipe_or_a_device_is_refused_at_once_never_read(tmp_path):
    """Opening a FIFO with no writer for reading blocks for ever, /dev/zero never ends: each is
    refused by its kind, in a thread that a hang would fail (bounded in time), and a listing's
    entries that are no file are named before anything opens them."""
    import socket
    import threading

    fifo, sock, tile = tmp_path / "pipe.tif", tmp_path / "s.sock", tmp_path / "a.tif"
    os.mkfifo(fifo)
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock))
    tile.write_bytes(b"tile")
    errors: dict[str, str] = {}

    def read(uri: str) -> None:
        try:
            storage.read_bytes(uri)
        except storage.StorageError as exc:
            errors[uri] = str(exc)

    threads = [
        threading.Thread(target=read, args=(u,), daemon=True) for u in (str(fifo), "/dev/zero")
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert not any(t.is_alive() for t in threads), "a read of a FIFO or a device hung"
    assert "named pipe (FIFO), not a regular file" in errors[str(fifo)]
    assert "/dev/zero" in errors["/dev/zero"] and "character device" in errors["/dev/zero"]
    fs = storage.filesystem(str(tmp_path))
    found = fs.not_files([str(fifo), str(sock), str(tile), str(tmp_path), "/dev/zero", "/nope"])
    assert found == {
        str(fifo): "a named pipe (FIFO)",
        str(sock): "a socket",
        str(tmp_path): "a folder",
        "/dev/zero": "a character device",
    }
    server.close()
