"""Deleting: one report or one crash through the API (write token only), retention and prune
over crashes, and their dump and attachment files once nothing references them."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from reporting_endpoint import deletion as deleting
from reporting_endpoint.app import create_app
from reporting_endpoint.blobstores import BlobStore
from reporting_endpoint.blobstores.filesystem import FilesystemBlobStore
from reporting_endpoint.retention import DAY_MS, prune_deletion
from reporting_endpoint.settings import Settings
from reporting_endpoint.storage import SQLiteStorage, StorageError
from reporting_endpoint.storage.base import Blob, Deletion
from reporting_endpoint.storage.sqlite import open_connection
from reporting_endpoint.storage.sqlite.deletion import prune_everything
from reporting_endpoint.storage.sqlite.rollups import HOURLY_TABLES, TOTAL_TABLES
from tests.conftest import crash_report
from tests.crashpad_client import MINIDUMPS, content_type, multipart
from tests.s3server import s3_server  # noqa: F401 (the fixture, until conftest has it)

READ = "read-token"
WRITE = "write-token"
AS_READER = {"authorization": f"Bearer {READ}"}
AS_WRITER = {"authorization": f"Bearer {WRITE}"}
FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:145.0) Gecko/20100101 Firefox/145.0"
DUMP = (MINIDUMPS / "win-x86_breakpad_minidump2.dmp").read_bytes()
OTHER_DUMP = (MINIDUMPS / "linux-x64_breakpad_linux_raise_sigabrt.dmp").read_bytes()
HOUR = 3_600_000


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(db=tmp_path / "d.sqlite3", read_token=READ, write_token=WRITE)


@pytest.fixture
def api(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


def send(client: TestClient, reports: list[dict[str, Any]]) -> None:
    response = client.post(
        "/reports",
        content=json.dumps(reports),
        headers={"content-type": "application/reports+json"},
    )
    assert response.json()["accepted"] == len(reports)


def upload(client: TestClient, dump: bytes, attachment: bytes | None = None) -> str:
    files = [("upload_file_minidump", "a.dmp", dump)]
    if attachment is not None:
        files.append(("log", "app.log", attachment))
    body = multipart({"_productName": "App"}, files)
    response = client.post("/crashpad", content=body, headers={"content-type": content_type()})
    assert response.status_code == 200, response.text
    return response.text


def blob_store(client: TestClient) -> BlobStore:
    store: BlobStore = client.app.state.blobs  # type: ignore[attr-defined]
    return store


def blob_files(settings: Settings) -> set[str]:
    return {path.name for path in (settings.data_dir / "blobs").glob("*/*")}


def sha_of(settings: Settings, crash_id: str) -> tuple[str, list[str]]:
    connection = sqlite3.connect(settings.db)
    sha, attachments = connection.execute(
        "SELECT dump_sha256, attachments FROM crashes WHERE id = ?", (crash_id,)
    ).fetchone()
    connection.close()
    return sha, [a["sha256"] for a in json.loads(attachments)]


# --- tokens ---------------------------------------------------------------------------------


def test_deleting_needs_the_write_token_never_the_read_token(api: TestClient) -> None:
    send(api, [crash_report()])
    report_id = api.get("/api/reports", headers=AS_READER).json()["reports"][0]["id"]
    for headers in ({}, AS_READER, {"authorization": f"Bearer {WRITE}x"}):
        refused = api.delete(f"/api/reports/{report_id}", headers=headers)
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_token"
        assert refused.headers["www-authenticate"].startswith("Bearer")
    # The write token deletes, and does not read.
    assert api.get("/api/reports", headers=AS_WRITER).status_code == 401
    deleted = api.delete(f"/api/reports/{report_id}", headers=AS_WRITER)
    assert deleted.status_code == 200
    assert deleted.json() == {"deleted": {"reports": 1, "crashes": 0, "files": 0}}
    assert api.get(f"/api/reports/{report_id}", headers=AS_READER).status_code == 404
    again = api.delete(f"/api/reports/{report_id}", headers=AS_WRITER)
    assert again.status_code == 404 and again.json()["error"]["code"] == "report_not_found"
    bad = api.delete("/api/reports/²", headers=AS_WRITER)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_id"
    missing = api.delete("/api/crashes/" + "0" * 32, headers=AS_WRITER)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "crash_not_found"


def test_without_a_write_token_nothing_can_be_deleted(tmp_path: Path) -> None:
    settings = Settings(db=tmp_path / "d.sqlite3", read_token=READ)
    with TestClient(create_app(settings)) as client:
        send(client, [crash_report()])
        report_id = client.get("/api/reports", headers=AS_READER).json()["reports"][0]["id"]
        refused = client.delete(f"/api/reports/{report_id}", headers=AS_READER)
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "write_api_disabled"
        assert "REPORTING_ENDPOINT_WRITE_TOKEN" in refused.json()["error"]["message"]
        assert client.get(f"/api/reports/{report_id}", headers=AS_READER).status_code == 200


# --- reports and their counters ---------------------------------------------------------------


def recounted(db: Path) -> dict[str, set[tuple[Any, ...]]]:
    """Every roll-up table as it should be: counted again from the reports themselves."""
    connection = sqlite3.connect(db)
    keys = ("type", "site", "origin", "browser", "browser_major", "os", "reason", "user_agent")
    columns = ", ".join(f"coalesce({k}, '') AS {k}" for k in keys)
    tables: dict[str, set[tuple[Any, ...]]] = {}
    for table, names in {**HOURLY_TABLES, **TOTAL_TABLES}.items():
        hour = "received_at / 3600000, " if table in HOURLY_TABLES else ""
        listed = ", ".join(names)
        tables[table] = set(
            connection.execute(
                f"SELECT {hour}{listed}, count(*), min(received_at), max(received_at)"
                f" FROM (SELECT received_at, {columns} FROM reports)"
                f" GROUP BY {hour}{listed}"
            )
        )
    connection.close()
    return tables


def stored_rollups(db: Path) -> dict[str, set[tuple[Any, ...]]]:
    connection = sqlite3.connect(db)
    tables: dict[str, set[tuple[Any, ...]]] = {}
    for table, names in {**HOURLY_TABLES, **TOTAL_TABLES}.items():
        hour = "hour, " if table in HOURLY_TABLES else ""
        tables[table] = set(
            connection.execute(
                f"SELECT {hour}{', '.join(names)}, count, first_seen, last_seen FROM {table}"
            )
        )
    connection.close()
    return tables


def spread_over_hours(db: Path) -> None:
    """Give the reports distinct times over four hours, counters rebuilt to match."""
    connection = sqlite3.connect(db, isolation_level=None)
    connection.execute("UPDATE reports SET received_at = received_at - (id % 4) * ? - id", (HOUR,))
    for table, names in {**HOURLY_TABLES, **TOTAL_TABLES}.items():
        connection.execute(f"DELETE FROM {table}")
        hour = "hour, " if table in HOURLY_TABLES else ""
        rows = recounted(db)[table]
        width = len(names) + (4 if hour else 3)
        connection.executemany(
            f"INSERT INTO {table} ({hour}{', '.join(names)}, count, first_seen, last_seen)"
            f" VALUES ({', '.join('?' * width)})",
            rows,
        )
    connection.close()


def test_deleting_reports_keeps_every_counter_exact(api: TestClient, settings: Settings) -> None:
    send(
        api,
        [crash_report(url=f"https://a.example/{n}", body={"reason": "oom"}) for n in range(6)]
        + [crash_report(url="https://b.example/", user_agent=FIREFOX, body={})] * 3
        + [crash_report(type="deprecation", url="https://c.example/", body={"id": "X"})],
    )
    spread_over_hours(settings.db)
    assert stored_rollups(settings.db) == recounted(settings.db)
    connection = sqlite3.connect(settings.db)
    only = connection.execute("SELECT id FROM reports WHERE type = 'deprecation'").fetchone()[0]
    ids = [
        row[0]
        for row in connection.execute(
            "SELECT id FROM reports WHERE id != ? ORDER BY received_at", (only,)
        )
    ]
    connection.close()
    # The oldest and newest (first_seen/last_seen at the edge), the only one of its group, and
    # one in the middle.
    for report_id in (ids[0], ids[-1], only, ids[3]):
        response = api.delete(f"/api/reports/{report_id}", headers=AS_WRITER)
        assert response.status_code == 200
        assert stored_rollups(settings.db) == recounted(settings.db)
    groups = api.get("/api/groups?by=type", headers=AS_READER).json()["groups"]
    assert [(g["type"], g["count"]) for g in groups] == [("crash", 6)]
    windowed = api.get("/api/groups?by=browser&since=1d", headers=AS_READER).json()["groups"]
    assert sum(g["count"] for g in windowed) == 6


# --- crashes and their files ------------------------------------------------------------------


def test_deleting_a_crash_removes_its_files_once_unreferenced(
    api: TestClient, settings: Settings
) -> None:
    first = upload(api, DUMP, attachment=b"log one")
    twin = upload(api, DUMP)  # the same dump: one file for both
    other = upload(api, OTHER_DUMP, attachment=DUMP)  # the first dump again, as an attachment
    dump_sha, (log_sha,) = sha_of(settings, first)
    other_sha, _ = sha_of(settings, other)
    assert blob_files(settings) == {dump_sha, log_sha, other_sha}

    response = api.delete(f"/api/crashes/{first}", headers=AS_WRITER)
    assert response.status_code == 200
    assert response.json() == {"deleted": {"reports": 0, "crashes": 1, "files": 1}}
    assert blob_files(settings) == {dump_sha, other_sha}  # the log only it had is gone
    assert api.get(f"/api/crashes/{first}", headers=AS_READER).status_code == 404
    assert api.get(f"/api/crashes/{twin}/minidump", headers=AS_READER).content == DUMP

    assert api.delete(f"/api/crashes/{twin}", headers=AS_WRITER).json()["deleted"]["files"] == 0
    assert blob_files(settings) == {dump_sha, other_sha}  # still another crash's attachment
    assert api.delete(f"/api/crashes/{other}", headers=AS_WRITER).json()["deleted"]["files"] == 2
    assert blob_files(settings) == set()
    assert api.get("/api/crashes", headers=AS_READER).json()["crashes"] == []


def age_crashes(settings: Settings, crash_ids: list[str], days: int) -> None:
    connection = sqlite3.connect(settings.db)
    with connection:
        connection.executemany(
            "UPDATE crashes SET received_at = received_at - ? WHERE id = ?",
            [(days * DAY_MS, crash_id) for crash_id in crash_ids],
        )
    connection.close()


def test_retention_deletes_old_crashes_and_their_files(api: TestClient, settings: Settings) -> None:
    old = upload(api, DUMP, attachment=b"old log")
    shared = upload(api, OTHER_DUMP)
    new = upload(api, OTHER_DUMP)  # same file as `shared`: it must stay
    send(api, [crash_report()])
    dump_sha, (log_sha,) = sha_of(settings, old)
    other_sha, _ = sha_of(settings, new)
    age_crashes(settings, [old, shared], days=10)

    # As the service's retention loop does it: through the running service's writer.
    storage = api.app.state.storage  # type: ignore[attr-defined]
    deletion = api.portal.call(  # type: ignore[union-attr]
        partial(prune_deletion, storage, days=7, blobs=blob_store(api))
    )
    assert (deletion.reports, deletion.crashes, deletion.files_removed) == (0, 2, 2)
    assert blob_files(settings) == {other_sha}
    connection = sqlite3.connect(settings.db)
    assert [row[0] for row in connection.execute("SELECT id FROM crashes")] == [new]
    assert connection.execute("SELECT count(*) FROM reports").fetchone()[0] == 1
    connection.close()
    assert dump_sha != other_sha and log_sha not in blob_files(settings)


def test_prune_from_another_process_covers_crashes(api: TestClient, settings: Settings) -> None:
    """What the CLI's prune runs beside a live service: rows in one transaction, then files."""
    old = upload(api, DUMP)
    kept = upload(api, OTHER_DUMP)
    age_crashes(settings, [old], days=40)

    async def prune() -> Deletion:
        storage = SQLiteStorage(settings.db, must_exist=True)
        await storage.start()
        try:
            cutoff = time.time_ns() // 1_000_000 - 30 * DAY_MS
            store = FilesystemBlobStore(settings.data_dir)
            return await deleting.prune(storage, cutoff, store, sweep=False)
        finally:
            await storage.stop()

    deletion = asyncio.run(prune())
    assert (deletion.crashes, deletion.files_removed) == (1, 1)
    assert api.get(f"/api/crashes/{old}", headers=AS_READER).status_code == 404
    assert api.get(f"/api/crashes/{kept}/minidump", headers=AS_READER).content == OTHER_DUMP


def test_files_stay_when_the_deletion_does_not_commit(api: TestClient, settings: Settings) -> None:
    crash_id = upload(api, DUMP)
    before = blob_files(settings)

    def fails_after_deleting(connection: sqlite3.Connection) -> Deletion:
        prune_everything(connection, older_than_ms=2**62)
        raise RuntimeError("power cut before COMMIT")

    async def prune() -> Deletion:
        storage = SQLiteStorage(settings.db, must_exist=True)
        await storage.start()
        try:
            failing = storage.run_job(fails_after_deleting)
            store = FilesystemBlobStore(settings.data_dir)
            return await deleting.delete_with_files(storage, failing, store)
        finally:
            await storage.stop()

    with pytest.raises(StorageError, match="power cut before COMMIT"):
        asyncio.run(prune())
    assert blob_files(settings) == before
    assert api.get(f"/api/crashes/{crash_id}/minidump", headers=AS_READER).content == DUMP


def test_a_file_written_again_after_the_deletion_began_is_kept(
    api: TestClient, settings: Settings
) -> None:
    """An upload of the same content may replace the file while its row is on its way: the
    file written after the deletion started is not removed (an orphan at worst, never a row
    without its file)."""
    crash_id = upload(api, DUMP)
    sha, _ = sha_of(settings, crash_id)
    path = f"blobs/{sha[:2]}/{sha}"
    started = time.time_ns()
    storage = api.app.state.storage  # type: ignore[attr-defined]
    store = blob_store(api)
    connection = open_connection(settings.db)
    try:
        connection.execute("DELETE FROM crashes")  # as if a deletion had just committed
        written_later = started + 1_000_000_000
        os.utime(settings.data_dir / path, ns=(written_later, written_later))
        remove = partial(deleting.remove_unreferenced, storage, store, [Blob(sha, path)])
        assert api.portal.call(remove, started) == 0  # type: ignore[union-attr]
        assert (settings.data_dir / path).is_file()
        assert api.portal.call(remove, written_later) == 1  # type: ignore[union-attr]
        assert not (settings.data_dir / path).exists()
        # Never anything outside blobs/, whatever a row says.
        outside = settings.data_dir / "keep.txt"
        outside.write_text("x")
        keep = partial(deleting.remove_unreferenced, storage, store, [Blob("f" * 64, "keep.txt")])
        assert api.portal.call(keep, 2**62) == 0  # type: ignore[union-attr]
        assert outside.is_file()
    finally:
        connection.close()


def test_deleting_through_the_api_checks_its_input(api: TestClient) -> None:
    for path in ("/api/crashes/zz", "/api/crashes/" + "A" * 32):
        response = api.delete(path, headers=AS_WRITER)
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "invalid_id"


def test_files_left_by_an_interrupted_deletion_are_collected_later(
    api: TestClient, settings: Settings
) -> None:
    """Killed between the commit and the unlinks: the rows are gone, the files stay (never the
    other way round), and the next retention run removes them once they are old enough."""
    old = upload(api, DUMP, attachment=b"old log")
    kept = upload(api, OTHER_DUMP)
    age_crashes(settings, [old], days=10)
    connection = open_connection(settings.db)
    try:
        connection.execute("BEGIN IMMEDIATE")
        prune_everything(connection, older_than_ms=time.time_ns() // 1_000_000 - 7 * DAY_MS)
        connection.execute("COMMIT")  # ... and the process dies here
    finally:
        connection.close()
    assert len(blob_files(settings)) == 3
    storage = api.app.state.storage  # type: ignore[attr-defined]
    run = partial(prune_deletion, storage, days=7, blobs=blob_store(api))
    # Fresh files are left alone: an upload renames its file a moment before its row commits.
    assert api.portal.call(run).files_removed == 0  # type: ignore[union-attr]
    hours_ago = time.time_ns() - 2 * 3600 * 1_000_000_000
    for path in (settings.data_dir / "blobs").glob("*/*"):
        os.utime(path, ns=(hours_ago, hours_ago))
    assert api.portal.call(run).files_removed == 2  # type: ignore[union-attr]
    assert blob_files(settings) == {sha_of(settings, kept)[0]}
    assert api.get(f"/api/crashes/{kept}/minidump", headers=AS_READER).content == OTHER_DUMP


def test_retention_in_the_service_covers_crashes(tmp_path: Path) -> None:
    settings = Settings(db=tmp_path / "d.sqlite3", read_token=READ)
    with TestClient(create_app(settings)) as client:
        old = upload(client, DUMP)
        kept = upload(client, OTHER_DUMP)
    age_crashes(settings, [old], days=10)
    kept_sha = sha_of(settings, kept)[0]
    with TestClient(create_app(settings.replace(retention_days=7))) as client:
        deadline = time.monotonic() + 10
        while blob_files(settings) != {kept_sha} and time.monotonic() < deadline:
            time.sleep(0.02)  # retention runs in the background at start
        assert blob_files(settings) == {kept_sha}
        assert client.get(f"/api/crashes/{old}", headers=AS_READER).status_code == 404
        assert client.get(f"/api/crashes/{kept}/minidump", headers=AS_READER).content == OTHER_DUMP


# --- a deletion racing an upload of the same content ------------------------------------------


class PausingStorage(SQLiteStorage):
    """SQLite storage with one hook per step a race turns on: ``insert_crash`` (an upload
    whose blob is committed and whose row is not) and ``unreferenced_blobs`` (a deletion that
    decided which blobs are free and has not removed them). Each pauses once when armed."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
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


def race_settings(tmp_path: Path, store_kind: str, request: pytest.FixtureRequest) -> Settings:
    settings = Settings(db=tmp_path / "d.sqlite3", read_token=READ, write_token=WRITE)
    if store_kind == "s3":
        server = request.getfixturevalue("s3_server")
        monkeypatch: pytest.MonkeyPatch = request.getfixturevalue("monkeypatch")
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        settings = settings.replace(blob_store=f"s3://{server.bucket}/race/{tmp_path.name}")
    return settings


async def asgi_call(
    app: Any, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """One request straight into the ASGI app on the current loop (so a test can interleave
    requests with its own hooks); answers the status and the body."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "client": ("127.0.0.1", 50000),
        "server": ("test", 80),
    }
    sent = False
    status = 0
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client stays connected
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, b"".join(chunks)


async def _post_dump(app: Any, dump: bytes) -> tuple[int, bytes]:
    body = multipart({"_productName": "App"}, [("upload_file_minidump", "a.dmp", dump)])
    return await asgi_call(app, "POST", "/crashpad", body, {"content-type": content_type()})


async def _race(settings: Settings, first: str) -> tuple[str, bytes, int]:
    """Upload DUMP (crash C), then run a second upload of DUMP (A) and the deletion of C (D)
    with ``first`` paused at its hook while the other runs as far as it can. Answers A's id,
    A's dump as downloaded after both finished, and D's status."""
    from reporting_endpoint.app import create_app, lifespan

    storage = PausingStorage(settings.db)
    app = create_app(settings, storage=storage)
    async with lifespan(app):
        status, crash_c = await _post_dump(app, DUMP)
        assert status == 200

        def deleting() -> Any:
            return asgi_call(app, "DELETE", f"/api/crashes/{crash_c.decode()}", headers=AS_WRITER)

        if first == "upload":
            # A's blob is committed (reusing C's file or object) and its row is not: then C is
            # deleted, finding the content unreferenced, as far as it gets while A waits.
            storage.arm("insert_crash")
            upload_task = asyncio.ensure_future(_post_dump(app, DUMP))
            await storage.paused["insert_crash"].wait()
            delete_task = asyncio.ensure_future(deleting())
            await asyncio.wait({delete_task}, timeout=1.0)  # done, unless something holds it
            storage.resume["insert_crash"].set()
        else:
            # D decided the content is free and has not removed it yet: then A uploads the
            # same content, as far as it gets while D waits.
            storage.arm("unreferenced_blobs")
            delete_task = asyncio.ensure_future(deleting())
            await storage.paused["unreferenced_blobs"].wait()
            upload_task = asyncio.ensure_future(_post_dump(app, DUMP))
            await asyncio.wait({upload_task}, timeout=1.0)
            storage.resume["unreferenced_blobs"].set()
        (uploaded, crash_a), (deleted, _) = await upload_task, await delete_task
        assert uploaded == 200, crash_a
        path = f"/api/crashes/{crash_a.decode()}/minidump"
        status, content = await asgi_call(app, "GET", path, headers=AS_READER)
        assert status == 200, content
        return crash_a.decode(), content, deleted


@pytest.mark.parametrize("store_kind", ["filesystem", "s3"])
@pytest.mark.parametrize("first", ["upload", "deletion"])
def test_a_deletion_never_takes_the_blob_of_an_upload_in_flight(
    tmp_path: Path, store_kind: str, first: str, request: pytest.FixtureRequest
) -> None:
    """An upload of the same content as a crash being deleted: after its 200, its dump is
    there and downloadable, in whichever order the steps interleave."""
    settings = race_settings(tmp_path, store_kind, request)
    crash_a, downloaded, deleted = asyncio.run(_race(settings, first))
    assert downloaded == DUMP
    assert deleted == 200
    # And it stays: a later deletion of A takes the blob (nothing else references it).
    assert sha_of(settings, crash_a)[0] == hashlib.sha256(DUMP).hexdigest()
