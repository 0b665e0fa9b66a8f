"""POST /reports: what is refused is kept in quarantine, what is stored can always be read back."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from reporting_endpoint.app import create_app
from reporting_endpoint.settings import Settings
from tests.conftest import captured_reports, crash_report, post_reports, stored_rows

TOKEN = "quarantine-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
DAY_MS = 24 * 3600 * 1000


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(db=tmp_path / "q.sqlite3", read_token=TOKEN)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def quarantine_rows(db: Path) -> list[dict[str, Any]]:
    connection = sqlite3.connect(db)
    connection.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in connection.execute("SELECT * FROM quarantine ORDER BY id")]
    finally:
        connection.close()


def test_huge_age_is_refused_quarantined_and_reads_stay_200(
    client: TestClient, settings: Settings
) -> None:
    """2**53-1 ms put generated_at hundreds of thousands of years before the epoch."""
    batch = [crash_report(age=2**53 - 1), crash_report()]
    response = post_reports(client, batch)
    assert response.status_code == 200
    summary = response.json()
    assert summary["accepted"] == 1
    assert [(r["index"], r["code"], r["field"]) for r in summary["rejected"]] == [
        (0, "invalid_field", "age")
    ]
    [kept] = quarantine_rows(settings.db)
    assert (kept["code"], kept["field"], kept["type"]) == ("invalid_field", "age", "crash")
    assert json.loads(kept["raw"])["age"] == 2**53 - 1
    page = client.get("/api/reports", headers=AUTH)
    assert page.status_code == 200
    assert [r["age"] for r in page.json()["reports"]] == [13]


def test_large_valid_age_yields_a_readable_row(client: TestClient, settings: Settings) -> None:
    age = 30 * DAY_MS  # the largest age the schema takes
    response = post_reports(client, [crash_report(age=age)])
    assert response.json() == {"accepted": 1, "rejected": []}
    [row] = stored_rows(settings.db)
    assert row["generated_at"] == row["received_at"] - age >= 0
    page = client.get("/api/reports", headers=AUTH)
    assert page.status_code == 200
    [report] = page.json()["reports"]
    assert report["age"] == age
    assert report["generated_at"] < report["received_at"]
    one = client.get(f"/api/reports/{report['id']}", headers=AUTH)
    assert one.status_code == 200


def _too_deep_report() -> dict[str, Any]:
    # 300 levels: orjson reads up to 1024 but writes at most 254.
    nested: Any = 1
    for _ in range(300):
        nested = [nested]
    url = "https://a.example/p?secret=1"
    return {"age": 1, "type": "x", "url": url, "user_agent": "u", "body": {"n": nested}}


def test_too_deeply_nested_report_has_its_own_code_and_spares_its_sibling(
    client: TestClient, settings: Settings
) -> None:
    body = json.dumps([_too_deep_report(), crash_report()], separators=(",", ":")).encode()
    assert len(body) < 1024  # a few hundred bytes were enough to answer 500 and lose both
    response = post_reports(client, body)
    assert response.status_code == 200
    summary = response.json()
    assert summary["accepted"] == 1
    assert [(r["index"], r["code"]) for r in summary["rejected"]] == [(0, "too_deeply_nested")]
    assert [r["type"] for r in stored_rows(settings.db)] == ["crash"]
    [kept] = quarantine_rows(settings.db)
    assert (kept["code"], kept["type"], kept["truncated"]) == ("too_deeply_nested", "x", 1)
    assert "nested deeper" in kept["raw"]
    raw = json.loads(kept["raw"])  # still JSON: the outer levels, the rest replaced by a marker
    assert raw["url"] == "https://a.example/p"
    assert raw["user_agent"] == "u"


def test_a_too_deep_report_that_is_also_invalid_keeps_its_schema_code(
    client: TestClient, settings: Settings
) -> None:
    report = {**_too_deep_report(), "age": -1}
    response = post_reports(client, [report, [[[[1]]]]])
    assert [r["code"] for r in response.json()["rejected"]] == ["invalid_field", "not_an_object"]
    kept = quarantine_rows(settings.db)
    assert [(r["code"], r["truncated"]) for r in kept] == [
        ("invalid_field", 1),
        ("not_an_object", 0),
    ]
    assert json.loads(kept[0]["raw"])["age"] == -1
    assert len(kept[0]["message"]) <= 300


def test_the_769_byte_body_alone_answers_200_not_500(
    client: TestClient, settings: Settings
) -> None:
    """The review's own body: one report, 255 levels, 769 bytes."""
    prefix = b'[{"age":1,"type":"x","url":"https://a.example/","user_agent":"u","body":{"n":'
    depth = (769 - len(prefix) - len(b"1}}]")) // 2
    body = prefix + b"[" * depth + b"1" + b"]" * depth + b"}}]"
    assert len(body) == 769 and depth >= 255
    response = post_reports(client, body)
    assert response.status_code == 200
    assert [r["code"] for r in response.json()["rejected"]] == ["too_deeply_nested"]
    assert [r["code"] for r in quarantine_rows(settings.db)] == ["too_deeply_nested"]


def test_every_refused_report_is_in_quarantine_after_the_200(
    client: TestClient, settings: Settings
) -> None:
    missing_age = {k: v for k, v in crash_report().items() if k != "age"}
    batch: list[Any] = [
        crash_report(age=-5),
        "nope",
        crash_report(body={"reason": 5}),
        missing_age,
        crash_report(),
        [1, 2],
    ]
    response = post_reports(client, batch)
    assert response.status_code == 200
    summary = response.json()
    assert summary["accepted"] == 1
    sent = [(r["code"], r["field"]) for r in summary["rejected"]]
    kept = quarantine_rows(settings.db)
    assert sent == [
        ("invalid_field", "age"),
        ("not_an_object", ""),
        ("invalid_field", "body.reason"),
        ("missing_field", "age"),
        ("not_an_object", ""),
    ]
    assert [(r["code"], r["field"]) for r in kept] == sent
    assert [r["type"] for r in kept] == ["crash", None, "crash", "crash", None]
    assert json.loads(kept[1]["raw"]) == "nope"
    assert json.loads(kept[4]["raw"]) == [1, 2]
    # The same privacy rule as stored reports: no query string, fragment or credentials.
    assert json.loads(kept[0]["raw"])["url"] == "https://shop.example.co.uk/cart"
    assert {r["received_at"] for r in kept} == {stored_rows(settings.db)[0]["received_at"]}
    assert not any(r["truncated"] for r in kept)


def test_quarantined_raw_is_bounded(client: TestClient, settings: Settings) -> None:
    big = crash_report(age=-1, body={"reason": "oom", "pad": "p" * 200_000})
    assert post_reports(client, [big]).json()["rejected"][0]["code"] == "invalid_field"
    [kept] = quarantine_rows(settings.db)
    assert kept["truncated"] == 1
    assert len(kept["raw"]) == 64 * 1024
    assert kept["raw"].startswith('{"age":-1')


def test_values_a_newer_browser_may_send_are_quarantined_not_lost(
    client: TestClient, settings: Settings
) -> None:
    """A new `reason` or `visibility_state` is outside the schema: refused, but kept."""
    batch = [
        crash_report(body={"reason": "gpu-hang", "visibility_state": "visible"}),
        crash_report(body={"reason": "oom", "visibility_state": "prerender"}),
    ]
    response = post_reports(client, batch)
    summary = response.json()
    assert summary["accepted"] == 0
    assert [(r["code"], r["field"]) for r in summary["rejected"]] == [
        ("invalid_field", "body.reason"),
        ("invalid_field", "body.visibility_state"),
    ]
    assert stored_rows(settings.db) == []
    kept = quarantine_rows(settings.db)
    assert [(row["code"], row["field"]) for row in kept] == [
        ("invalid_field", "body.reason"),
        ("invalid_field", "body.visibility_state"),
    ]
    assert '"gpu-hang"' in kept[0]["raw"]
    assert '"prerender"' in kept[1]["raw"]


def _without_query(url: str) -> str:
    return url.split("?", 1)[0].split("#", 1)[0]


def test_urls_inside_bodies_lose_their_query_like_the_report_url(
    client: TestClient, settings: Settings
) -> None:
    batch = captured_reports("csp") + captured_reports("deprecation")
    with_query = [
        (i, key)
        for i, report in enumerate(batch)
        for key, value in report["body"].items()
        if isinstance(value, str) and value.startswith("https://") and "?" in value
    ]
    assert {key for _, key in with_query} == {"documentURL", "sourceFile"}  # real reports do
    assert post_reports(client, batch).json()["accepted"] == len(batch)
    page = client.get("/api/reports", headers=AUTH, params={"limit": 100}).json()["reports"]
    by_time = sorted(page, key=lambda r: r["id"])
    for i, key in with_query:
        assert by_time[i]["body"][key] == _without_query(batch[i]["body"][key])
        assert "?" not in stored_rows(settings.db)[i]["raw"]
    csp = by_time[0]["body"]
    assert csp["blockedURL"] == "inline"  # not a URL: left alone
    assert csp["referrer"] == ""


def test_body_url_credentials_are_dropped_even_when_queries_are_kept(tmp_path: Path) -> None:
    settings = Settings(db=tmp_path / "k.sqlite3", keep_url_query=True)
    body = {
        "documentURL": "https://user:pw@a.example/p?q=1#f",
        "blockedURL": "https://cdn.example/x.js?v=2",
        "referrer": "https://ref.example/?from=mail",
        "sourceFile": "https://a.example/app.js?build=7",
        "disposition": "enforce",
    }
    with TestClient(create_app(settings)) as client:
        response = post_reports(client, [crash_report(type="csp-violation", body=body)])
        assert response.json()["accepted"] == 1
    stored = json.loads(stored_rows(settings.db)[0]["raw"])["body"]
    assert stored == {**body, "documentURL": "https://a.example/p?q=1#f"}


def test_network_error_and_coop_bodies_lose_their_queries(
    client: TestClient, settings: Settings
) -> None:
    nel = {"phase": "application", "type": "http.error", "referrer": "https://r.example/?t=1"}
    coop = {
        "disposition": "enforce",
        "previousResponseURL": "https://a.example/prev?token=abc",
        "openerURL": "https://b.example/o#frag",
    }
    batch = [
        crash_report(type="network-error", body=nel),
        crash_report(type="coop", body=coop),
    ]
    assert post_reports(client, batch).json()["accepted"] == 2
    first, second = (json.loads(r["raw"])["body"] for r in stored_rows(settings.db))
    assert first["referrer"] == "https://r.example/"
    assert second["previousResponseURL"] == "https://a.example/prev"
    assert second["openerURL"] == "https://b.example/o"


def test_quarantine_keeps_only_the_newest_rows(tmp_path: Path) -> None:
    settings = Settings(db=tmp_path / "b.sqlite3", quarantine_max_rows=3)
    with TestClient(create_app(settings)) as client:
        for age in range(-1, -6, -1):
            assert post_reports(client, [crash_report(age=age)]).json()["accepted"] == 0
    kept = quarantine_rows(settings.db)
    assert [json.loads(r["raw"])["age"] for r in kept] == [-3, -4, -5]
