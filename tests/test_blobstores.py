"""One behavioural suite for every blob store: files in a temp folder, and S3 on a real server.

The S3 cases run against moto's server mode on 127.0.0.1 (tests/s3server.py), configured only
through the standard AWS_* variables, as an operator would.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from reporting_endpoint.blobstores import BlobNotFound, BlobStore, StoredBlob, open_blob_store
from reporting_endpoint.blobstores.base import BlobInfo, key_for
from reporting_endpoint.blobstores.filesystem import FilesystemBlobStore
from tests.s3server import S3Server, s3_server  # noqa: F401 (the fixture, until conftest has it)

T = TypeVar("T")
DUMP = b"MDMP" + bytes(range(256)) * 1000  # ~256 KB: several stream chunks


def run(factory: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await factory()

    return asyncio.run(main())


@pytest.fixture(params=["filesystem", "s3"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def spec(kind: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if kind == "filesystem":
        return ""
    server: S3Server = request.getfixturevalue("s3_server")
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    # A prefix per test: one bucket for the session, no test sees another's objects.
    return f"s3://{server.bucket}/tests/{uuid.uuid4().hex}"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def store(spec: str, data_dir: Path) -> Iterator[BlobStore]:
    blob_store = open_blob_store(spec, data_dir)
    run(blob_store.start)
    yield blob_store
    run(blob_store.close)


async def store_bytes(store: BlobStore, *parts: bytes) -> StoredBlob:
    writer = store.writer()
    for part in parts:
        writer.write(part)
    return await store.commit(writer)


async def read_all(store: BlobStore, key: str) -> bytes:
    stream = await store.open(key)
    chunks = [chunk async for chunk in stream]
    assert sum(map(len, chunks)) == stream.size
    return b"".join(chunks)


async def all_keys(store: BlobStore) -> list[BlobInfo]:
    return [info async for info in store.list_blobs()]


def temp_files(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "tmp").glob("*"))


def test_commit_read_stream_delete(store: BlobStore, data_dir: Path) -> None:
    async def scenario() -> None:
        blob = await store_bytes(store, DUMP[:100], DUMP[100:])
        digest = hashlib.sha256(DUMP).hexdigest()
        assert blob == StoredBlob(digest, len(DUMP), f"blobs/{digest[:2]}/{digest}")
        assert temp_files(data_dir) == []  # the temp file went with the commit
        assert await store.exists(blob.key)
        assert await read_all(store, blob.key) == DUMP
        async with store.local_file(blob.key) as path:
            assert path.read_bytes() == DUMP
        assert [(i.key, i.size) for i in await all_keys(store)] == [(blob.key, len(DUMP))]

        assert await store.delete(blob.key)
        assert not await store.exists(blob.key)
        assert not await store.delete(blob.key)
        assert await all_keys(store) == []
        with pytest.raises(BlobNotFound):
            await store.open(blob.key)
        with pytest.raises(BlobNotFound):
            async with store.local_file(blob.key):
                pass

    run(scenario)
    assert temp_files(data_dir) == []  # the S3 download for local_file is gone too


def test_keys_from_rows_are_checked(store: BlobStore) -> None:
    async def scenario() -> None:
        for key in ("../reports.sqlite3", "blobs/ab/../../x", "blobs/ab/" + "ab" * 32 + "/x"):
            with pytest.raises(ValueError):
                await store.open(key)
            with pytest.raises(ValueError):
                await store.delete(key)

    run(scenario)


def test_discarded_writer_leaves_nothing(store: BlobStore, data_dir: Path) -> None:
    async def scenario() -> None:
        writer = store.writer()
        writer.write(b"not a minidump")
        writer.discard()
        assert temp_files(data_dir) == []
        assert await all_keys(store) == []
        assert not await store.exists(key_for(hashlib.sha256(b"not a minidump").hexdigest()))

    run(scenario)


def test_same_content_in_one_upload_is_stored_once(store: BlobStore, data_dir: Path) -> None:
    async def scenario() -> list[StoredBlob]:
        writers = []
        for _ in range(20):  # the 20-attachment upload of issue 14
            writer = store.writer()
            writer.write(DUMP)
            writers.append(writer)
        return await store.commit_all(writers)

    stored = run(scenario)
    assert len({blob.key for blob in stored}) == 1
    assert len(run(lambda: all_keys(store))) == 1
    assert temp_files(data_dir) == []


def _count_calls(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> list[object]:
    calls: list[object] = []
    original = getattr(owner, name)

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[0] if args else None)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counting)
    return calls


def test_filesystem_reuses_a_stored_blob(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second commit of the same content writes, fsyncs and renames nothing."""
    store = FilesystemBlobStore(tmp_path / "data")
    run(store.start)
    first = run(lambda: store_bytes(store, DUMP))
    path = store.path(first.key)
    inode = path.stat().st_ino
    renames = _count_calls(monkeypatch, os, "replace")
    fsyncs = _count_calls(monkeypatch, os, "fsync")

    second = run(lambda: store_bytes(store, DUMP))
    assert second == first
    assert renames == [] and fsyncs == []  # this process made it durable itself
    assert path.stat().st_ino == inode

    # Another process (a second worker) finds the file: no write, no rename; one fsync of the
    # clean file and of its folder, since the first writer may not have synced them yet.
    other = FilesystemBlobStore(tmp_path / "data")
    assert run(lambda: store_bytes(other, DUMP)) == first
    assert renames == []
    assert path.stat().st_ino == inode
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert oct((tmp_path / "data" / "blobs").stat().st_mode & 0o777) == "0o700"


def test_reuse_protects_the_blob_from_a_running_deletion(store: BlobStore) -> None:
    """A deletion that started before an upload reused the blob leaves it alone (its row is
    on its way), as it does for a new file committed meanwhile."""

    async def scenario() -> None:
        blob = await store_bytes(store, DUMP)
        await asyncio.sleep(1.1)  # S3 keeps modification times in whole seconds
        deletion_started = time.time_ns()
        await asyncio.sleep(1.1)
        await store_bytes(store, DUMP)
        if isinstance(store, FilesystemBlobStore):
            assert not await store.delete(blob.key, unless_committed_after_ns=deletion_started)
            assert await store.exists(blob.key)
        assert await store.delete(blob.key, unless_committed_after_ns=time.time_ns() + 10**9)

    run(scenario)


@pytest.mark.parametrize("kind", ["s3"])
def test_s3_does_not_upload_stored_content_again(
    store: BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import obstore

    from reporting_endpoint.blobstores.s3 import S3BlobStore

    assert isinstance(store, S3BlobStore)
    puts = _count_calls(monkeypatch, obstore, "put_async")

    async def scenario() -> None:
        first = await store_bytes(store, DUMP)
        before = await obstore.head_async(store.store, first.key)
        await asyncio.sleep(1.1)  # a second PUT would show in the last-modified second
        assert await store_bytes(store, DUMP) == first
        after = await obstore.head_async(store.store, first.key)
        assert (after["e_tag"], after["last_modified"]) == (
            before["e_tag"],
            before["last_modified"],
        )

    run(scenario)
    assert len(puts) == 1


@pytest.mark.parametrize("kind", ["s3"])
def test_s3_reads_the_standard_variables(
    store: BlobStore, spec: str, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reporting_endpoint.blobstores.s3 import S3BlobStore

    assert isinstance(store, S3BlobStore)
    config = store.store.config
    assert config.get("endpoint") == os.environ["AWS_ENDPOINT_URL"]
    assert config.get("region") == os.environ["AWS_REGION"]
    assert config.get("access_key_id") == os.environ["AWS_ACCESS_KEY_ID"]
    assert config.get("secret_access_key") == os.environ["AWS_SECRET_ACCESS_KEY"]
    assert store.store.prefix == spec.removeprefix("s3://").split("/", 1)[1]

    # Another endpoint in the variable, another server: the store follows the variable.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://s3.example.test")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    elsewhere = open_blob_store(spec, data_dir)
    assert isinstance(elsewhere, S3BlobStore)
    assert elsewhere.store.config.get("endpoint") == "https://s3.example.test"
    assert elsewhere.store.config.get("region") == "eu-west-3"
    options = elsewhere.store.client_options or {}
    assert str(options.get("allow_http")).lower() == "false"  # HTTPS unless named http://


def test_sweep_removes_only_old_temp_files(store: BlobStore, data_dir: Path) -> None:
    old, fresh = store.writer(), store.writer()
    fresh_path = fresh.path  # a part spilled to its temp file (small ones start in memory)
    long_ago = time.time() - 7200
    os.utime(old.path, (long_ago, long_ago))
    assert run(store.sweep) == 1
    assert temp_files(data_dir) == [fresh_path]
    fresh.discard()


def test_open_blob_store_chooses_by_spec(tmp_path: Path) -> None:
    default = open_blob_store("", tmp_path)
    assert isinstance(default, FilesystemBlobStore) and default.root == tmp_path
    folder = open_blob_store(str(tmp_path / "elsewhere"), tmp_path)
    assert isinstance(folder, FilesystemBlobStore) and folder.root == tmp_path / "elsewhere"
    with pytest.raises(ValueError):
        open_blob_store("ftp://host/x", tmp_path)


# --- the locks that keep a removal off an upload in flight (locks.py) -----------------------


def test_uploads_share_a_shard_and_a_removal_excludes_them(tmp_path: Path) -> None:
    from reporting_endpoint.blobstores import BlobStoreBusy
    from reporting_endpoint.blobstores.locks import ShardLocks

    key = key_for("ab" * 32)
    other = key_for("cd" * 32)

    async def scenario() -> None:
        locks = ShardLocks(tmp_path / "locks")
        elsewhere = ShardLocks(tmp_path / "locks")  # another process's view of the folder
        async with locks.uploading([key]), elsewhere.uploading([key]):
            async with elsewhere.removing([key], wait=0.2) as held:
                assert not held  # uploads in flight: the removal gives up, removes nothing
            async with elsewhere.removing([other], wait=0.2) as held:
                assert held  # another shard is free
        async with elsewhere.removing([key], wait=0.2) as held:
            assert held
            with pytest.raises(BlobStoreBusy):
                async with locks.uploading([key], wait=0.2):
                    pass
        # Released on exit: an upload goes through again.
        async with locks.uploading([key, other], wait=0.2):
            pass

    asyncio.run(scenario())
    # The locks are folders: a listing of the data folder shows no file that is not a blob.
    assert [p for p in (tmp_path / "locks").rglob("*") if p.is_file()] == []


def test_a_known_upload_part_never_touches_a_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 14: an upload whose parts are all stored already (the 20 identical attachments)
    is held in memory and committed without a temp file, a write, an fsync or a rename; the
    blob's mtime still moves to the commit (a running deletion then leaves it alone)."""
    store = FilesystemBlobStore(tmp_path / "data")
    run(store.start)
    first = run(lambda: store_bytes(store, DUMP))
    path = store.path(first.key)
    before = path.stat()
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns - 10**9))
    created = _count_calls(monkeypatch, tempfile, "mkstemp")
    fsyncs = _count_calls(monkeypatch, os, "fsync")

    async def twenty() -> list[StoredBlob]:
        writers = []
        for _ in range(20):
            writer = store.writer()
            writer.write(DUMP)
            writers.append(writer)
        assert temp_files(tmp_path / "data") == []  # held in memory while the body streams
        return await store.commit_all(writers)

    stored = run(twenty)
    assert {blob.key for blob in stored} == {first.key}
    assert created == [] and fsyncs == []
    after = path.stat()
    assert after.st_ino == before.st_ino
    assert after.st_mtime_ns >= before.st_mtime_ns
    assert temp_files(tmp_path / "data") == []
