"""Blob shard locks on PostgreSQL advisory locks (``storage/postgres/bloblocks.py``): what two
hosts sharing one database and one bucket need so that a deletion on one never removes the
blob of an upload in flight on the other.

Each host is a ``PostgresStorage`` of its own on the same database (the test's own, on the real
cluster of ``tests/postgres.py``); the end-to-end race runs two service apps, each with its own
data folder (so their local ``flock`` locks do not see each other, as on two machines), on that
database and one bucket of the real S3 server of ``tests/s3server.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from reporting_endpoint.blobstores import BlobStoreBusy, BlobStoreError, blob_locks_of
from reporting_endpoint.blobstores.base import key_for
from reporting_endpoint.settings import Settings
from reporting_endpoint.storage.postgres import PostgresStorage
from reporting_endpoint.storage.postgres.bloblocks import NAMESPACE
from tests.s3server import s3_server  # noqa: F401 (the fixture, until conftest has it)
from tests.test_delete import AS_READER, AS_WRITER, DUMP, READ, WRITE, _post_dump, asgi_call

KEY = key_for(hashlib.sha256(b"one").hexdigest())
# Another key of the same shard (the lock is per shard, not per blob) and one of another shard.
SAME_SHARD = key_for(KEY[6:8] + "0" * 62)
OTHER_SHARD = key_for(("00" if KEY[6:8] != "00" else "ff") + "1" * 62)


async def _advisory_locks(url: str) -> list[tuple[int, int, str]]:
    """(pid, shard, mode) of every blob shard lock held in the database now."""
    connection = await asyncpg.connect(url)
    try:
        rows = await connection.fetch(
            "SELECT pid, objid::int AS shard, mode FROM pg_locks"
            " WHERE locktype = 'advisory' AND classid::int = $1 AND objsubid = 2 AND granted",
            NAMESPACE,
        )
    finally:
        await connection.close()
    return [(row["pid"], row["shard"], row["mode"]) for row in rows]


@asynccontextmanager
async def _hosts(url: str) -> AsyncIterator[tuple[PostgresStorage, PostgresStorage]]:
    # Not started: the locks need no writer, and they must work before ``start`` (the app
    # asks for them first). ``stop`` still closes their pools.
    one, two = PostgresStorage(url), PostgresStorage(url)
    try:
        yield one, two
    finally:
        await one.stop()
        await two.stop()


async def _removal(host: PostgresStorage, keys: list[str], wait: float) -> tuple[bool, float]:
    """Whether ``removing`` got the locks, and when it answered (monotonic)."""
    async with host.blob_locks().removing(keys, wait) as held:
        return held, time.monotonic()


def test_the_storage_hands_out_its_locks() -> None:
    storage = PostgresStorage("postgresql://nobody@/nowhere")
    assert blob_locks_of(storage) is storage.blob_locks()  # one pool per storage


def test_an_upload_on_one_host_holds_off_a_removal_on_the_other(postgres_url: str) -> None:
    async def scenario() -> None:
        async with _hosts(postgres_url) as (one, two):
            async with one.blob_locks().uploading([KEY]):
                assert [mode for _, _, mode in await _advisory_locks(postgres_url)] == ["ShareLock"]
                started = time.monotonic()
                held, _ = await _removal(two, [SAME_SHARD], wait=0.3)
                assert held is False  # it gave up after its wait, holding nothing
                assert time.monotonic() - started >= 0.3
                # Another shard is not held by the upload.
                assert (await _removal(two, [OTHER_SHARD], wait=0.3))[0] is True

                waiting = asyncio.ensure_future(_removal(two, [KEY], wait=30))
                await asyncio.sleep(0.5)
                assert not waiting.done()
                released = time.monotonic()
            held, answered = await waiting
            assert held is True
            assert answered - released < 1.0  # polled, not waiting out its 30 s
            assert await _advisory_locks(postgres_url) == []

    asyncio.run(scenario())


def test_a_removal_on_one_host_holds_off_an_upload_on_the_other(postgres_url: str) -> None:
    async def scenario() -> None:
        async with _hosts(postgres_url) as (one, two):
            async with two.blob_locks().removing([KEY]) as held:
                assert held is True
                with pytest.raises(BlobStoreBusy):
                    async with one.blob_locks().uploading([SAME_SHARD], wait=0.3):
                        raise AssertionError("an upload got in beside a removal")
                # A removal excludes another removal, on the same host too.
                assert (await _removal(two, [KEY], wait=0.2))[0] is False
                assert (await _removal(one, [KEY], wait=0.2))[0] is False
            async with one.blob_locks().uploading([KEY], wait=1.0):
                pass

    asyncio.run(scenario())


def test_uploads_share_a_shard_across_hosts(postgres_url: str) -> None:
    async def scenario() -> None:
        async with _hosts(postgres_url) as (one, two):
            started = time.monotonic()
            async with (
                one.blob_locks().uploading([KEY], wait=1.0),
                two.blob_locks().uploading([KEY, SAME_SHARD], wait=1.0),
                one.blob_locks().uploading([KEY], wait=1.0),
            ):
                assert time.monotonic() - started < 1.0
                locks = await _advisory_locks(postgres_url)
                assert len({pid for pid, _, _ in locks}) == 3  # a session per context
                assert (await _removal(two, [KEY], wait=0.2))[0] is False
            assert (await _removal(two, [KEY], wait=1.0))[0] is True

    asyncio.run(scenario())


def test_a_killed_session_releases_its_locks(postgres_url: str) -> None:
    """The server drops the locks of a session that ends (a host killed, its connection
    gone); the upload whose lock went learns it and does not answer success."""

    async def scenario() -> None:
        async with _hosts(postgres_url) as (one, two):
            with pytest.raises(BlobStoreError, match="session ended"):
                async with one.blob_locks().uploading([KEY]):
                    [(pid, _, _)] = await _advisory_locks(postgres_url)
                    waiting = asyncio.ensure_future(_removal(two, [KEY], wait=30))
                    await asyncio.sleep(0.3)
                    assert not waiting.done()
                    admin = await asyncpg.connect(postgres_url)
                    try:
                        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
                    finally:
                        await admin.close()
                    held, _ = await asyncio.wait_for(waiting, 10)
                    assert held is True
            assert await _advisory_locks(postgres_url) == []
            # The pool replaced the dead connection: the next lock works.
            async with one.blob_locks().uploading([KEY], wait=1.0):
                pass

    asyncio.run(scenario())


def test_a_pooled_connection_never_keeps_a_lock(postgres_url: str) -> None:
    """A removal that took one shard and timed out on the next, an upload whose body failed:
    their connections go back to the pool (still open) holding nothing."""

    async def scenario() -> None:
        async with _hosts(postgres_url) as (one, two):
            async with two.blob_locks().uploading([KEY]):
                held, _ = await _removal(one, [KEY, OTHER_SHARD], wait=0.3)
                assert held is False
                [(_, shard, _)] = await _advisory_locks(postgres_url)
                assert shard == int(KEY[6:8], 16)  # only the upload's
            with pytest.raises(RuntimeError):
                async with one.blob_locks().uploading([KEY, OTHER_SHARD]):
                    raise RuntimeError("the upload failed")
            assert await _advisory_locks(postgres_url) == []
            admin = await asyncpg.connect(postgres_url)
            try:
                idle = await admin.fetchval(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE application_name = 'reporting-endpoint blob locks'"
                )
            finally:
                await admin.close()
            assert idle >= 1  # pooled and reused, not closed after every use

    asyncio.run(scenario())


def test_an_unreachable_database_is_a_blob_store_error(tmp_path: Path) -> None:
    async def scenario() -> None:
        storage = PostgresStorage(f"postgresql://nobody@/none?host={tmp_path}&port=1")
        try:
            with pytest.raises(BlobStoreError) as upload:
                async with storage.blob_locks().uploading([KEY]):
                    raise AssertionError("locked without a database")
            assert not isinstance(upload.value, BlobStoreBusy)
            with pytest.raises(BlobStoreError):
                async with storage.blob_locks().removing([KEY]):
                    raise AssertionError("locked without a database")
        finally:
            await storage.stop()

    asyncio.run(scenario())


# --- the race of tests/test_delete.py, across two hosts ---------------------------------------


class PausingPostgresStorage(PostgresStorage):
    """``test_delete.PausingStorage`` on PostgreSQL: ``insert_crash`` (an upload whose blob
    is committed and whose row is not) and ``unreferenced_blobs`` (a deletion that decided
    which blobs are free and has not removed them) each pause once when armed."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.paused: dict[str, asyncio.Event] = {}
        self.resume: dict[str, asyncio.Event] = {}

    def arm(self, step: str) -> None:
        self.paused[step] = asyncio.Event()
        self.resume[step] = asyncio.Event()

    async def _hold(self, step: str) -> None:
        if step in self.resume and not self.paused[step].is_set():
            self.paused[step].set()
            await self.resume[step].wait()

    async def insert_crash(self, crash: Any) -> None:
        await self._hold("insert_crash")
        await super().insert_crash(crash)

    async def unreferenced_blobs(self, blobs: Any) -> Any:
        free = await super().unreferenced_blobs(blobs)
        await self._hold("unreferenced_blobs")
        return free


async def _race_two_hosts(apps: dict[str, Any], first: str) -> tuple[int, dict[str, bytes]]:
    """Crash C (DUMP) uploaded to host "b"; then an upload of DUMP (A) on host "a" and the
    deletion of C on host "b", with ``first`` paused at its hook while the other runs as far
    as it can. Answers D's status and A's dump as each host downloads it afterwards."""
    from reporting_endpoint.app import lifespan

    uploader, deleter = apps["a"], apps["b"]
    up_storage: PausingPostgresStorage = uploader.state.storage
    del_storage: PausingPostgresStorage = deleter.state.storage
    async with lifespan(uploader), lifespan(deleter):
        status, crash_c = await _post_dump(deleter, DUMP)
        assert status == 200, crash_c

        def deleting() -> Any:
            path = f"/api/crashes/{crash_c.decode()}"
            return asgi_call(deleter, "DELETE", path, headers=AS_WRITER)

        if first == "upload":
            up_storage.arm("insert_crash")
            upload_task = asyncio.ensure_future(_post_dump(uploader, DUMP))
            await up_storage.paused["insert_crash"].wait()
            delete_task = asyncio.ensure_future(deleting())
            await asyncio.wait({delete_task}, timeout=1.0)  # done, unless something holds it
            up_storage.resume["insert_crash"].set()
        else:
            del_storage.arm("unreferenced_blobs")
            delete_task = asyncio.ensure_future(deleting())
            await del_storage.paused["unreferenced_blobs"].wait()
            upload_task = asyncio.ensure_future(_post_dump(uploader, DUMP))
            await asyncio.wait({upload_task}, timeout=1.0)
            del_storage.resume["unreferenced_blobs"].set()
        (uploaded, crash_a), (deleted, _) = await upload_task, await delete_task
        assert uploaded == 200, crash_a
        downloads: dict[str, bytes] = {}
        for name, app in apps.items():
            path = f"/api/crashes/{crash_a.decode()}/minidump"
            status, content = await asgi_call(app, "GET", path, headers=AS_READER)
            assert status == 200, (name, content)
            downloads[name] = content
        return deleted, downloads


@pytest.mark.parametrize("first", ["upload", "deletion"])
def test_a_deletion_on_one_host_never_takes_the_blob_of_an_upload_on_another(
    postgres_url: str,
    tmp_path: Path,
    first: str,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    """Two service instances on one PostgreSQL database and one bucket, each with its own data
    folder (its local locks unseen by the other, as on two machines): after the upload's 200
    its dump is there, on either host, in whichever order the steps interleave."""
    from reporting_endpoint.app import create_app

    server = request.getfixturevalue("s3_server")
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    settings = Settings(
        database=postgres_url,
        read_token=READ,
        write_token=WRITE,
        blob_store=f"s3://{server.bucket}/two-hosts/{tmp_path.name}",
    )
    apps: dict[str, Any] = {}
    for name in ("a", "b"):
        # A server URL names no folder: the data folder is SERVER_DATA_DIR, read when the app
        # is built; each host gets its own, as each machine has its own working directory.
        monkeypatch.setattr("reporting_endpoint.settings.SERVER_DATA_DIR", tmp_path / name)
        apps[name] = create_app(settings, storage=PausingPostgresStorage(postgres_url))
    assert apps["a"].state.blobs.data_dir != apps["b"].state.blobs.data_dir

    deleted, downloads = asyncio.run(_race_two_hosts(apps, first))
    assert deleted == 200
    assert downloads == {"a": DUMP, "b": DUMP}
