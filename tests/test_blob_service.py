"""The service on its blob store setting: S3 end to end on a real server (moto on 127.0.0.1),
the setting itself, and a SIGKILLed ``serve --blob-store s3://...`` keeping every 200.

The S3 cases set only the standard variables (``AWS_ENDPOINT_URL``, ``AWS_REGION``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``), as an operator would.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import signal
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from starlette.testclient import TestClient

from reporting_endpoint.app import create_app
from reporting_endpoint.blobstores import BlobNotFound, open_blob_store
from reporting_endpoint.blobstores.base import key_for
from reporting_endpoint.blobstores.filesystem import FilesystemBlobStore
from reporting_endpoint.cli import main
from reporting_endpoint.settings import SERVER_DATA_DIR, Settings, SettingsError
from tests.crashpad_client import MINIDUMPS, content_type, dump_upload, multipart
from tests.s3server import S3Server, s3_server  # noqa: F401 (the fixture, until conftest has it)
from tests.servers import start_service, stop

READ = "read-token"
WRITE = "write-token"
AS_READER = {"authorization": f"Bearer {READ}"}
AS_WRITER = {"authorization": f"Bearer {WRITE}"}
DUMP = (MINIDUMPS / "win-x86_breakpad_minidump2.dmp").read_bytes()
LOG = b"app.log: the last lines before the crash\n"


# --- the setting ---------------------------------------------------------------------------


def test_the_blob_store_setting(tmp_path: Path) -> None:
    # Unset: the folder beside the SQLite file, as before the setting existed.
    assert Settings(db=tmp_path / "r.sqlite3").data_dir == tmp_path / "r.sqlite3.data"
    # A server's URL names no folder: a fixed, documented one in the working directory.
    server = Settings(database="postgresql://u@/reports?host=/run/postgresql")
    assert server.data_dir == SERVER_DATA_DIR == Path("reporting-endpoint.data")
    # From the environment, as every setting; empty means unset.
    env = {"REPORTING_ENDPOINT_BLOB_STORE": "s3://bucket/dumps"}
    assert Settings.from_env(env).blob_store == "s3://bucket/dumps"
    assert Settings.from_env({"REPORTING_ENDPOINT_BLOB_STORE": ""}).blob_store is None
    for bad in ("gs://bucket/x", "s3://", "s3:///prefix"):
        with pytest.raises(SettingsError, match="blob_store"):
            Settings(blob_store=bad)


def test_a_folder_blob_store_takes_the_dumps(tmp_path: Path) -> None:
    folder = tmp_path / "elsewhere"
    settings = Settings(db=tmp_path / "r.sqlite3", read_token=READ, blob_store=str(folder))
    with TestClient(create_app(settings)) as client:
        crash_id = post_dump(client)
        download = client.get(f"/api/crashes/{crash_id}/minidump", headers=AS_READER)
        assert download.content == DUMP
    digest = hashlib.sha256(DUMP).hexdigest()
    assert (folder / key_for(digest)).read_bytes() == DUMP
    assert not (settings.data_dir / "blobs").exists()


def test_serve_has_the_flag() -> None:
    from reporting_endpoint.cli import build_parser

    args = build_parser().parse_args(["serve", "--blob-store", "s3://b/p"])
    assert args.blob_store == "s3://b/p"


# --- S3 end to end -------------------------------------------------------------------------


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:  # noqa: F811
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture
def s3_settings(tmp_path: Path, s3_env: S3Server) -> Settings:
    spec = f"s3://{s3_env.bucket}/service/{uuid.uuid4().hex}"
    return Settings(db=tmp_path / "r.sqlite3", read_token=READ, write_token=WRITE, blob_store=spec)


@pytest.fixture
def s3_client(s3_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(s3_settings)) as client:
        yield client


def post_dump(client: TestClient, attachment: bytes | None = None) -> str:
    files = [("upload_file_minidump", "a.dmp", DUMP)]
    if attachment is not None:
        files.append(("log", "app.log", attachment))
    body = multipart({"_productName": "App", "_version": "1.0"}, files)
    response = client.post("/crashpad", content=body, headers={"content-type": content_type()})
    assert response.status_code == 200, response.text
    return response.text


def in_bucket(settings: Settings, digest: str) -> bytes | None:
    """The object's bytes as a separate client of the same bucket reads them."""

    async def read() -> bytes | None:
        store = open_blob_store(settings.blob_store or "", settings.data_dir.with_name("reader"))
        try:
            stream = await store.open(key_for(digest))
        except BlobNotFound:
            return None
        return b"".join([chunk async for chunk in stream])

    return asyncio.run(read())


def test_an_upload_is_stored_downloaded_parsed_and_deleted_on_s3(
    s3_client: TestClient, s3_settings: Settings
) -> None:
    crash_id = post_dump(s3_client, attachment=LOG)
    dump_sha = hashlib.sha256(DUMP).hexdigest()
    log_sha = hashlib.sha256(LOG).hexdigest()
    # Stored: both objects in the bucket, nothing lasting on the local disk.
    assert in_bucket(s3_settings, dump_sha) == DUMP
    assert in_bucket(s3_settings, log_sha) == LOG
    # (Nothing lasting on the local disk: checked once the parse, which a processor does from
    # a temporary local copy of the object, is over.)

    # Downloadable, streamed from the bucket with its length.
    download = s3_client.get(f"/api/crashes/{crash_id}/minidump", headers=AS_READER)
    assert download.status_code == 200
    assert download.content == DUMP
    assert download.headers["content-length"] == str(len(DUMP))
    assert download.headers["content-type"] == "application/octet-stream"
    assert f"{crash_id}.dmp" in download.headers["content-disposition"]

    # Parsed, through a local copy of the object (removed after the parse).
    analyzer = s3_client.app.state.analyzer  # type: ignore[attr-defined]
    s3_client.portal.call(analyzer.idle)  # type: ignore[union-attr]
    stored = s3_client.get(f"/api/crashes/{crash_id}", headers=AS_READER).json()
    assert stored["parse_status"] == "parsed", stored["parse_error"]
    assert stored["os"] == "Windows"
    assert stored["dump_sha256"] == dump_sha
    assert [p for p in s3_settings.data_dir.rglob("*") if p.is_file()] == []

    # Deleted with its objects.
    deleted = s3_client.delete(f"/api/crashes/{crash_id}", headers=AS_WRITER)
    assert deleted.json() == {"deleted": {"reports": 0, "crashes": 1, "files": 2}}
    assert in_bucket(s3_settings, dump_sha) is None
    assert in_bucket(s3_settings, log_sha) is None
    gone = s3_client.get(f"/api/crashes/{crash_id}/minidump", headers=AS_READER)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "crash_not_found"


def test_a_shared_object_stays_until_its_last_crash_goes(
    s3_client: TestClient, s3_settings: Settings
) -> None:
    first, second = post_dump(s3_client), post_dump(s3_client)
    digest = hashlib.sha256(DUMP).hexdigest()
    one = s3_client.delete(f"/api/crashes/{first}", headers=AS_WRITER).json()
    assert one["deleted"]["files"] == 0
    assert in_bucket(s3_settings, digest) == DUMP
    download = s3_client.get(f"/api/crashes/{second}/minidump", headers=AS_READER)
    assert download.content == DUMP
    two = s3_client.delete(f"/api/crashes/{second}", headers=AS_WRITER).json()
    assert two["deleted"]["files"] == 1
    assert in_bucket(s3_settings, digest) is None


def test_a_missing_object_is_a_404_not_a_500(s3_client: TestClient, s3_settings: Settings) -> None:
    crash_id = post_dump(s3_client)

    async def remove_behind_the_service() -> None:
        store = open_blob_store(s3_settings.blob_store or "", s3_settings.data_dir)
        assert await store.delete(key_for(hashlib.sha256(DUMP).hexdigest()))

    asyncio.run(remove_behind_the_service())
    missing = s3_client.get(f"/api/crashes/{crash_id}/minidump", headers=AS_READER)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "minidump_missing"


def test_an_unreachable_bucket_is_a_503_and_nothing_is_stored(
    tmp_path: Path, s3_env: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(db=tmp_path / "r.sqlite3", read_token=READ, blob_store="s3://no-bucket/x")
    with TestClient(create_app(settings)) as client:
        body = dump_upload(DUMP)
        response = client.post("/crashpad", content=body, headers={"content-type": content_type()})
        assert response.status_code == 503
        assert response.text == "Discarded=blob_store_error"
        assert response.headers["retry-after"]
        assert client.get("/api/crashes", headers=AS_READER).json()["crashes"] == []


def test_the_cli_prunes_and_deletes_on_s3(
    s3_client: TestClient, s3_settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    crash_id = post_dump(s3_client, attachment=LOG)
    digest = hashlib.sha256(LOG).hexdigest()
    spec = s3_settings.blob_store or ""
    db = str(s3_settings.db)
    assert main(["delete", "--db", db, "--blob-store", spec, "--crash", crash_id]) == 0
    assert "2 dump file(s) removed" in capsys.readouterr().out
    assert in_bucket(s3_settings, digest) is None

    # prune: rows past the cutoff, then their objects, then the orphan sweep (a LIST).
    old = post_dump(s3_client)
    connection = sqlite3.connect(s3_settings.db)
    with connection:
        connection.execute(
            "UPDATE crashes SET received_at = received_at - 10 * 86400000 WHERE id = ?", (old,)
        )
    connection.close()
    assert main(["prune", "--db", db, "--blob-store", spec, "--older-than", "7d"]) == 0
    assert "1 crash(es)" in capsys.readouterr().out
    assert in_bucket(s3_settings, hashlib.sha256(DUMP).hexdigest()) is None


# --- SIGKILL: every 200 has its row and its object ----------------------------------------

SENDERS = 6
MAX_SECONDS = 15.0
DUMPS = sorted(MINIDUMPS.glob("*.dmp"))


def test_every_acknowledged_crash_keeps_its_row_and_its_object_after_sigkill(
    tmp_path: Path, s3_env: S3Server
) -> None:
    db = tmp_path / "reports.sqlite3"
    spec = f"s3://{s3_env.bucket}/sigkill/{uuid.uuid4().hex}"
    server = start_service(db, env=s3_env.env(), args=["--blob-store", spec])
    acknowledged: dict[str, str] = {}  # crash id -> sha256 of the dump sent
    lock = threading.Lock()
    deadline = time.monotonic() + MAX_SECONDS
    dumps = [path.read_bytes() for path in DUMPS]

    def send(sender: int) -> None:
        with httpx2.Client(timeout=10) as client:
            n = 0
            while time.monotonic() < deadline:
                # Mostly known dumps (the object exists: reused), now and then a new one.
                dump = dumps[(sender * 7 + n) % len(dumps)]
                if n % 5 == 0:
                    dump += uuid.uuid4().bytes
                n += 1
                try:
                    answer = client.post(
                        server.url + "/crashpad",
                        content=dump_upload(dump, {"prod": f"S3Durable{sender}", "ver": f"{n}"}),
                        headers={"content-type": content_type()},
                    )
                except httpx2.HTTPError:
                    return  # the server is gone
                if answer.status_code == 200:
                    with lock:
                        acknowledged[answer.text] = hashlib.sha256(dump).hexdigest()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(SENDERS)]
    for thread in threads:
        thread.start()
    time.sleep(random.uniform(1.0, 3.0))
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(timeout=10)
    for thread in threads:
        thread.join(timeout=MAX_SECONDS + 15)
    assert server.process.returncode == -signal.SIGKILL
    assert len(acknowledged) > 10, "the load never got going"

    restarted = start_service(db, env=s3_env.env(), args=["--blob-store", spec])
    assert stop(restarted) == 0
    connection = sqlite3.connect(db)
    try:
        rows: dict[str, tuple[str, str]] = {
            row[0]: (row[1], row[2])
            for row in connection.execute("SELECT id, dump_sha256, dump_path FROM crashes")
        }
    finally:
        connection.close()
    missing_rows = [crash_id for crash_id in acknowledged if crash_id not in rows]
    assert not missing_rows, f"{len(missing_rows)} acknowledged crashes lost: {missing_rows[:3]}"

    async def objects() -> dict[str, str | None]:
        """sha256 of each stored object, by key (None: no object)."""
        store = open_blob_store(spec, tmp_path / "reader")
        found: dict[str, str | None] = {}
        for key in {path for _, path in rows.values()}:
            try:
                stream = await store.open(key)
            except BlobNotFound:
                found[key] = None
                continue
            digest = hashlib.sha256()
            async for chunk in stream:
                digest.update(chunk)
            found[key] = digest.hexdigest()
        return found

    stored = asyncio.run(objects())
    for crash_id, digest in acknowledged.items():
        row_sha, key = rows[crash_id]
        assert row_sha == digest
        assert stored[key] == digest, f"crash {crash_id}: its object {key} is gone or differs"


def test_the_folder_store_still_writes_beside_the_database(tmp_path: Path) -> None:
    """Default settings: the blobs under ``<db>.data/blobs`` as before, through the protocol."""
    settings = Settings(db=tmp_path / "r.sqlite3", read_token=READ)
    with TestClient(create_app(settings)) as client:
        post_dump(client)
    store = FilesystemBlobStore(settings.data_dir)
    assert store.path(key_for(hashlib.sha256(DUMP).hexdigest())).read_bytes() == DUMP


def test_a_storage_shared_by_hosts_gives_the_blob_store_its_locks(tmp_path: Path) -> None:
    """A database server every host sees can order uploads and removals for all of them."""
    from reporting_endpoint.blobstores.locks import ShardLocks
    from reporting_endpoint.storage import SQLiteStorage

    used: list[str] = []

    class RecordingLocks(ShardLocks):
        def uploading(self, keys: Any, wait: float = 60.0) -> Any:
            used.append("uploading")
            return super().uploading(keys, wait)

        def removing(self, keys: Any, wait: float = 30.0) -> Any:
            used.append("removing")
            return super().removing(keys, wait)

    class SharedStorage(SQLiteStorage):
        def blob_locks(self) -> RecordingLocks:
            return RecordingLocks(tmp_path / "shared-locks")

    settings = Settings(db=tmp_path / "r.sqlite3", read_token=READ, write_token=WRITE)
    app = create_app(settings, storage=SharedStorage(settings.db))
    with TestClient(app) as client:
        crash_id = post_dump(client)
        assert client.delete(f"/api/crashes/{crash_id}", headers=AS_WRITER).status_code == 200
    assert used == ["uploading", "removing"]
