"""POST /reports in-process, lifespan running: what a browser and an operator see."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from reporting_endpoint.app import create_app
from reporting_endpoint.settings import Settings
from tests.conftest import (
    CHROME_UA,
    captured_reports,
    captured_requests,
    crash_report,
    post_reports,
    stored_rows,
)


def test_real_chromium_crash_upload_is_stored(client: TestClient, settings: Settings) -> None:
    request = captured_requests("crash-pagecrash")[0]
    headers = {k: v for k, v in request["headers"] if k.lower() not in {"host", "content-length"}}
    response = client.post("/reports", content=request["body"].encode(), headers=headers)
    assert response.status_code == 200
    assert response.json() == {"accepted": 1, "rejected": []}
    assert response.headers["access-control-allow-origin"] == "*"
    [row] = stored_rows(settings.db)
    sent = json.loads(request["body"])[0]
    assert row["type"] == "crash"
    assert row["url"] == "https://127.0.0.1:54645/page"  # query dropped by default
    assert row["origin"] == "https://127.0.0.1:54645"
    assert row["site"] == "https://127.0.0.1"
    assert row["user_agent"] == sent["user_agent"]
    assert (row["browser"], row["browser_major"], row["os"]) == ("HeadlessChrome", "156", "Linux")
    assert row["reason"] is None
    assert row["age"] == sent["age"]
    assert row["generated_at"] == row["received_at"] - sent["age"]
    raw = json.loads(row["raw"])
    assert raw["body"] == sent["body"]
    assert raw["url"] == row["url"]


def test_every_report_type_in_one_batch_is_stored(client: TestClient, settings: Settings) -> None:
    batch = captured_reports("oom") + captured_reports("deprecation") + captured_reports("csp")
    response = post_reports(client, batch)
    assert response.json() == {"accepted": len(batch), "rejected": []}
    rows = stored_rows(settings.db)
    assert [r["type"] for r in rows] == [r["type"] for r in batch]
    assert {r["reason"] for r in rows if r["type"] == "crash"} == {"oom"}
    assert {r["reason"] for r in rows if r["type"] != "crash"} == {None}


def test_one_bad_report_does_not_sink_the_batch(client: TestClient, settings: Settings) -> None:
    batch = [crash_report(), crash_report(age=-5), "nope", crash_report(body={"reason": "x"})]
    response = post_reports(client, batch)
    assert response.status_code == 200
    summary = response.json()
    assert summary["accepted"] == 1
    assert [(r["index"], r["code"], r["field"]) for r in summary["rejected"]] == [
        (1, "invalid_field", "age"),
        (2, "not_an_object", ""),
        (3, "invalid_field", "body.reason"),
    ]
    assert len(stored_rows(settings.db)) == 1


def test_application_json_is_accepted(client: TestClient) -> None:
    response = post_reports(client, [crash_report()], "application/json; charset=utf-8")
    assert response.json()["accepted"] == 1


def test_empty_batch_is_fine(client: TestClient) -> None:
    assert post_reports(client, []).json() == {"accepted": 0, "rejected": []}


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        (b"{not json", "application/reports+json", 400, "invalid_json"),
        (b"", "application/reports+json", 400, "invalid_json"),
        (b'{"age": 1}', "application/reports+json", 400, "not_an_array"),
        (b'"text"', "application/reports+json", 400, "not_an_array"),
        (b"[]", "text/plain", 415, "unsupported_media_type"),
        (b"[]", "", 415, "unsupported_media_type"),
        (b"[]", "multipart/form-data; boundary=x", 415, "unsupported_media_type"),
    ],
)
def test_request_errors_have_one_shape(
    client: TestClient, body: bytes, content_type: str, status: int, code: str
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = client.post("/reports", content=body, headers=headers)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]


def test_405_and_404_use_the_same_shape(client: TestClient) -> None:
    response = client.get("/reports")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"
    assert "POST" in response.headers["allow"]
    response = client.get("/nowhere")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_too_large_from_content_length(tmp_path: Path) -> None:
    settings = Settings(db=tmp_path / "r.sqlite3", max_body_bytes=1000)
    with TestClient(create_app(settings)) as client:
        body = json.dumps([crash_report(url="https://a.example/" + "x" * 2000)]).encode()
        response = post_reports(client, body)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "body_too_large"
        assert stored_rows(settings.db) == []


def test_too_large_while_streaming_without_content_length(tmp_path: Path) -> None:
    settings = Settings(db=tmp_path / "r.sqlite3", max_body_bytes=1000)

    def chunks() -> Iterator[bytes]:
        yield b"["
        for _ in range(50):
            yield json.dumps(crash_report()).encode() + b","
        yield b"1]"

    with TestClient(create_app(settings)) as client:
        response = client.post(
            "/reports", content=chunks(), headers={"content-type": "application/reports+json"}
        )
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "body_too_large"
        assert stored_rows(settings.db) == []


def test_streamed_body_under_the_limit_is_accepted(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"["
        yield json.dumps(crash_report()).encode()
        yield b"]"

    response = client.post(
        "/reports", content=chunks(), headers={"content-type": "application/reports+json"}
    )
    assert response.json()["accepted"] == 1


def test_too_many_reports_in_one_batch(tmp_path: Path) -> None:
    settings = Settings(db=tmp_path / "r.sqlite3", max_reports_per_batch=3)
    with TestClient(create_app(settings)) as client:
        response = post_reports(client, [crash_report()] * 4)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "too_many_reports"


def test_bad_content_length_is_400_not_500(client: TestClient) -> None:
    response = client.post(
        "/reports",
        content=b"[]",
        headers={"content-type": "application/reports+json", "content-length": "abc"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "bad_content_length"


HOSTILE_BODIES = [
    b"[" * 100000,
    b'["\\ud800"]',
    b"\xff\xfe\x00",
    b"[" + b"1," * 1000 + b"1]",
    json.dumps([crash_report(age=2**70)]).encode(),
    json.dumps([crash_report(url="https://a.example/\x00")]).encode(),
    json.dumps([crash_report(user_agent="\u0000" * 10)]).encode(),
    json.dumps([crash_report(body={"reason": "oom", "k": "v" * 10000})]).encode(),
    json.dumps([crash_report(url="https://[bad/")]).encode(),
    json.dumps([crash_report(url="http://exa mple:99999999/")]).encode(),
]


@pytest.mark.parametrize("body", HOSTILE_BODIES)
def test_no_input_causes_5xx_or_410(client: TestClient, body: bytes) -> None:
    response = post_reports(client, body)
    assert response.status_code < 500
    assert response.status_code != 410
    assert client.get("/healthz").json()["writer_alive"] is True


def test_keep_url_query_setting(tmp_path: Path) -> None:
    settings = Settings(db=tmp_path / "r.sqlite3", keep_url_query=True)
    with TestClient(create_app(settings)) as client:
        post_reports(client, [crash_report(url="https://a.example/p?q=1#f")])
    assert stored_rows(settings.db)[0]["url"] == "https://a.example/p?q=1#f"


def test_client_ip_is_not_stored(client: TestClient, settings: Settings) -> None:
    post_reports(client, [crash_report()])
    connection_text = json.dumps(stored_rows(settings.db))
    assert "testclient" not in connection_text
    assert "127.0.0.1" not in connection_text


def test_healthz(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "writer_alive": True,
        "queue_depth": 0,
        "queue_capacity": Settings().queue_size,
        "crash_backlog": 0,
        "crash_backlog_age_seconds": None,
        "crash_processors": client.app.state.analyzer.options.processors,  # type: ignore[attr-defined]
    }


def test_storage_not_started_is_503_not_a_hang(settings: Settings) -> None:
    # No `with`: the lifespan never runs, as when a host app forgets to start the service.
    client = TestClient(create_app(settings))
    response = post_reports(client, [crash_report()])
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "storage_not_started"
    assert response.headers["retry-after"]
    health = client.get("/healthz")
    assert health.status_code == 503
    assert health.json()["writer_alive"] is False


def test_user_agent_header_is_not_used_for_the_report(
    client: TestClient, settings: Settings
) -> None:
    client.post(
        "/reports",
        content=json.dumps([crash_report(user_agent=CHROME_UA)]).encode(),
        headers={"content-type": "application/reports+json", "user-agent": "curl/8"},
    )
    assert stored_rows(settings.db)[0]["user_agent"] == CHROME_UA
