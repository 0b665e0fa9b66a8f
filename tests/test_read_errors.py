"""The read API never answers a plain-text 500: bad parameters are 400 with a code, odd stored
values are clamped rather than failing a page, and anything unexpected is JSON too."""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from reporting_endpoint.app import create_app
from reporting_endpoint.settings import Settings
from reporting_endpoint.storage import SQLiteStorage
from reporting_endpoint.storage.rows import u64_to_db
from tests.conftest import crash_report

TOKEN = "read-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "r.sqlite3"


@pytest.fixture
def api(db: Path) -> Iterator[TestClient]:
    # Server errors come back as responses, as a real client would see them.
    app = create_app(Settings(db=db, read_token=TOKEN))
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def cursor(received_at: object, row_id: object) -> str:
    return base64.urlsafe_b64encode(f"{received_at}.{row_id}".encode()).decode().rstrip("=")


def send(client: TestClient, reports: list[dict[str, Any]]) -> None:
    response = client.post(
        "/reports",
        content=json.dumps(reports),
        headers={"content-type": "application/reports+json"},
    )
    assert response.status_code == 200


def assert_error(response: Any, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {
        "error": {"code": code, "message": response.json()["error"]["message"]}
    }


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/api/groups?limit=²", "invalid_limit"),
        ("/api/reports?limit=²", "invalid_limit"),
        ("/api/crashes?limit=٣", "invalid_limit"),  # an Arabic-Indic digit: int() takes it
        ("/api/groups?limit=1_0", "invalid_limit"),
        ("/api/reports/²", "invalid_id"),
        ("/api/reports/%EF%BC%91", "invalid_id"),  # a fullwidth digit one
        ("/api/reports/0", "invalid_id"),
        ("/api/reports/99999999999999999999", "invalid_id"),
        ("/api/reports?cursor=" + cursor(2**70, 1), "invalid_cursor"),
        ("/api/reports?cursor=" + cursor(1, 2**70), "invalid_cursor"),
        ("/api/reports?cursor=" + cursor(-(2**64), 1), "invalid_cursor"),
        ("/api/reports?cursor=" + cursor("²", 1), "invalid_cursor"),
        ("/api/crashes?cursor=" + cursor(2**70, "0" * 32), "invalid_cursor"),
        ("/api/crashes?cursor=" + cursor(1, "x' OR 1"), "invalid_cursor"),
        ("/api/groups?since=²d", "invalid_time"),
        ("/api/timeseries?since=0001-01-01T00:00:00%2B14:00", "window_too_large"),
    ],
)
def test_bad_parameters_are_json_400_not_500(api: TestClient, path: str, code: str) -> None:
    assert_error(api.get(path, headers=AUTH), 400, code)


def test_an_unexpected_error_is_json_500_without_details(
    api: TestClient, db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A database broken behind the service's back (here a table gone) fails the request, not
    the error shape: JSON, a stable code, and nothing from the inside (SQL, traceback)."""
    send(api, [crash_report()])
    connection = sqlite3.connect(db)
    connection.execute("DROP TABLE reports")
    connection.commit()
    connection.close()
    response = api.get("/api/reports", headers=AUTH)
    assert_error(response, 500, "internal_error")
    assert "reports" not in response.text and "Traceback" not in response.text
    # The operator learns what happened from the log, not the client.
    assert any("OperationalError" in r.getMessage() for r in caplog.records)
    # The service still answers what does not need the lost table.
    assert api.get("/healthz").status_code == 200


def insert_report(db: Path, **values: Any) -> int:
    row = {
        "received_at": 1_700_000_000_000,
        "generated_at": 1_700_000_000_000,
        "age": 0,
        "type": "crash",
        "url": "https://odd.example/",
        "user_agent": "UA",
        "raw": "{}",
        **values,
    }
    connection = sqlite3.connect(db)
    with connection:
        cursor = connection.execute(
            f"INSERT INTO reports ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
            tuple(row.values()),
        )
    connection.close()
    assert cursor.lastrowid is not None
    return cursor.lastrowid


def test_odd_stored_values_never_break_a_page_or_the_export(api: TestClient, db: Path) -> None:
    send(api, [crash_report(url=f"https://ok.example/{n}") for n in range(3)])
    odd = [
        insert_report(db, generated_at=-(2**53), age=2**53),
        insert_report(db, generated_at=2**62, received_at=1_700_000_000_001),
        insert_report(db, raw="not json {", received_at=1_700_000_000_002),
    ]
    seen: list[int] = []
    next_cursor = None
    while True:  # pages of one, so each odd row is alone on a page and past it
        query = "/api/reports?limit=1" + (f"&cursor={next_cursor}" if next_cursor else "")
        response = api.get(query, headers=AUTH)
        assert response.status_code == 200, response.text
        seen.extend(r["id"] for r in response.json()["reports"])
        next_cursor = response.json()["next_cursor"]
        if next_cursor is None:
            break
    assert set(odd) <= set(seen) and len(seen) == 6
    first = api.get(f"/api/reports/{odd[0]}", headers=AUTH).json()
    assert first["generated_at"] == "0001-01-01T00:00:00.000Z"  # clamped, not a 500
    assert first["age"] == 2**53
    assert (
        api.get(f"/api/reports/{odd[1]}", headers=AUTH)
        .json()["generated_at"]
        .startswith("9999-12-31")
    )
    assert api.get(f"/api/reports/{odd[2]}", headers=AUTH).json()["raw"] == "not json {"
    exported = [report["id"] for report in export(db, page_size=2)]
    assert sorted(exported) == sorted(seen)


def export(db: Path, page_size: int = 1000) -> list[dict[str, Any]]:
    """Every report, as ``export`` reads them: through a read-only storage."""

    async def read() -> list[dict[str, Any]]:
        storage = SQLiteStorage(db, read_only=True)
        await storage.start()
        try:
            return [report async for report in storage.iter_reports(page_size=page_size)]
        finally:
            await storage.stop()

    return asyncio.run(read())


def insert_crash(db: Path, crash_id: str, **values: Any) -> None:
    row = {
        "id": crash_id,
        "received_at": 1_700_000_000_000,
        "annotations": "{}",
        "query": "{}",
        "dump_sha256": "0" * 64,
        "dump_size": 1,
        "dump_path": "blobs/00/" + "0" * 64,
        "attachments": "[]",
        "upload_bytes": 1,
        **values,
    }
    connection = sqlite3.connect(db)
    with connection:
        connection.execute(
            f"INSERT INTO crashes ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
            tuple(row.values()),
        )
    connection.close()


def test_unsigned_64_bit_crash_values_read_back_unsigned(api: TestClient, db: Path) -> None:
    vsyscall = 0xFFFFFFFFFF600000
    crash_id = "a" * 32
    insert_crash(
        db,
        crash_id,
        parse_status="parsed",
        crash_address=u64_to_db(vsyscall),
        crash_offset=u64_to_db(2**63),
        exception_code=u64_to_db(0xC0000005),
    )
    crash = api.get(f"/api/crashes/{crash_id}", headers=AUTH).json()
    assert crash["crash_address"] == vsyscall
    assert crash["crash_address_hex"] == "0xffffffffff600000"
    assert crash["crash_offset_hex"] == "0x8000000000000000"
    assert crash["exception_code_hex"] == "0xc0000005"
    listed = api.get("/api/crashes", headers=AUTH).json()["crashes"]
    assert listed[0]["crash_address_hex"] == "0xffffffffff600000"


def test_odd_crash_rows_never_break_a_page(api: TestClient, db: Path) -> None:
    insert_crash(db, "b" * 32, annotations="not json", attachments="{}", received_at=2**62)
    insert_crash(db, "c" * 32, crash_address="text", received_at=-(2**62))
    response = api.get("/api/crashes", headers=AUTH)
    assert response.status_code == 200, response.text
    crashes = {c["id"]: c for c in response.json()["crashes"]}
    assert crashes["b" * 32]["annotations"] == "not json"
    assert crashes["b" * 32]["received_at"].startswith("9999-12-31")
    assert crashes["c" * 32]["received_at"] == "0001-01-01T00:00:00.000Z"


def test_export_keeps_going_past_text_that_is_not_utf8(api: TestClient, db: Path) -> None:
    """Rows written by another tool: text with invalid UTF-8, a blob where text belongs."""
    send(api, [crash_report()])
    connection = sqlite3.connect(db)
    with connection:
        connection.execute(
            "INSERT INTO reports (received_at, generated_at, age, type, url, user_agent, raw)"
            " VALUES (1, 1, 0, 'crash', CAST(x'68ff80' AS TEXT), x'00ff', CAST(x'ff' AS TEXT))"
        )
    connection.close()
    # Made 5 s before the first one: the same report again would be a retry, stored once.
    send(api, [crash_report(age=5013)])
    exported = export(db)
    assert len(exported) == 3
    odd = next(report for report in exported if report["received_at"].startswith("1970"))
    assert odd["url"] == "h\ufffd\ufffd" and odd["user_agent"] == "\x00\ufffd"
    json.dumps(exported)  # what `export` writes


@pytest.mark.parametrize("path", ["/api/groups", "/api/reports", "/api/issues", "/api/crashes"])
def test_a_store_that_is_not_available_answers_503_with_retry_after(
    tmp_path: Path, path: str
) -> None:
    """A mounted service whose lifespan never ran (or a store that is down) is a wait, not an
    error: 503 with its code and Retry-After, like the ingest endpoints."""
    app = create_app(Settings(db=tmp_path / "r.sqlite3", read_token=TOKEN))
    client = TestClient(app)  # no `with`: the lifespan (and so the storage) never starts
    response = client.get(path, headers=AUTH)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "storage_not_started"
    assert int(response.headers["retry-after"]) > 0
