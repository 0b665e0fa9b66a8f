"""The read API: token checks, groups, keyset pages, one report, time series, bad parameters."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterator
from datetime import datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx2
import pytest
from starlette.testclient import TestClient

import reporting_endpoint
from reporting_endpoint.app import create_app
from reporting_endpoint.settings import Settings
from reporting_endpoint.storage import SQLiteStorage
from tests.conftest import crash_report
from tests.test_read_errors import insert_crash

TOKEN = "s3cret-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:145.0) Gecko/20100101 Firefox/145.0"


@pytest.fixture
def api(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(db=tmp_path / "r.sqlite3", read_token=TOKEN)
    with TestClient(create_app(settings)) as client:
        yield client


def send(client: TestClient, reports: list[dict[str, Any]]) -> None:
    response = client.post(
        "/reports",
        content=json.dumps(reports),
        headers={"content-type": "application/reports+json"},
    )
    assert response.json()["accepted"] == len(reports)


def seed(client: TestClient) -> None:
    send(
        client,
        [crash_report(url="https://a.example.co.uk/1", body={"reason": "oom"})] * 3
        + [crash_report(url="https://b.example.co.uk/2", body={"reason": "unresponsive"})] * 2
        + [crash_report(url="https://x.github.io/", user_agent=FIREFOX, body={})] * 4
        + [crash_report(type="deprecation", url="https://y.github.io/", body={"id": "U"})],
    )


def test_no_token_configured_closes_the_api_and_says_how_to_open_it(client: TestClient) -> None:
    response = client.get("/api/groups", headers=AUTH)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "read_api_disabled"
    assert "REPORTING_ENDPOINT_READ_TOKEN" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": "Bearer wrong"},
        {"authorization": f"Basic {TOKEN}"},
        {"authorization": f"Bearer {TOKEN}x"},
        {"authorization": "Bearer"},
    ],
)
def test_bad_tokens_are_refused(api: TestClient, headers: dict[str, str]) -> None:
    response = api.get("/api/groups", headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_token"
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_ingest_needs_no_token(api: TestClient) -> None:
    send(api, [crash_report()])


def test_groups_by_site_and_browser(api: TestClient) -> None:
    seed(api)
    groups = api.get("/api/groups?by=site,browser&type=crash", headers=AUTH).json()["groups"]
    assert [(g["site"], g["browser"], g["count"]) for g in groups] == [
        ("https://example.co.uk", "HeadlessChrome", 5),
        ("https://x.github.io", "Firefox", 4),
    ]
    assert all(g["first_seen"] <= g["last_seen"] for g in groups)


def test_groups_filters(api: TestClient) -> None:
    seed(api)
    oom = api.get("/api/groups?by=reason&reason=oom", headers=AUTH).json()["groups"]
    assert [(g["reason"], g["count"]) for g in oom] == [("oom", 3)]
    by_type = api.get("/api/groups?by=type", headers=AUTH).json()["groups"]
    assert {g["type"]: g["count"] for g in by_type} == {"crash": 9, "deprecation": 1}
    none_reason = api.get("/api/groups?by=reason&type=crash", headers=AUTH).json()["groups"]
    assert {g["reason"]: g["count"] for g in none_reason} == {
        "oom": 3,
        "unresponsive": 2,
        None: 4,
    }
    windowed = api.get("/api/groups?by=type&since=1h&until=2999-01-01", headers=AUTH).json()
    assert {g["type"]: g["count"] for g in windowed["groups"]} == {"crash": 9, "deprecation": 1}
    past = api.get("/api/groups?by=type&since=2000-01-01&until=2000-01-02", headers=AUTH).json()
    assert past["groups"] == []
    assert len(api.get("/api/groups?by=user_agent&limit=1", headers=AUTH).json()["groups"]) == 1


def test_one_report_with_its_raw_json(api: TestClient) -> None:
    send(api, [crash_report(body={"reason": "oom", "extra": {"k": 1}})])
    page = api.get("/api/reports", headers=AUTH).json()
    report_id = page["reports"][0]["id"]
    report = api.get(f"/api/reports/{report_id}", headers=AUTH).json()
    assert report["raw"]["body"] == {"reason": "oom", "extra": {"k": 1}}
    assert report["raw"]["url"] == "https://shop.example.co.uk/cart"
    assert report["reason"] == "oom"
    missing = api.get("/api/reports/999999", headers=AUTH)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "report_not_found"
    assert api.get("/api/reports/abc", headers=AUTH).json()["error"]["code"] == "invalid_id"


@pytest.mark.parametrize("by", ["reason", "type,browser", "site", "os"])
def test_windowed_counts_match_the_reports_table(api: TestClient, tmp_path: Path, by: str) -> None:
    """With since/until the hourly roll-ups answer (the small one when it has the columns)."""
    seed(api)
    connection = sqlite3.connect(tmp_path / "r.sqlite3")
    expected = {
        tuple(row[:-1]): row[-1]
        for row in connection.execute(f"SELECT {by}, count(*) FROM reports GROUP BY {by}")
    }
    names = by.split(",")
    groups = api.get(f"/api/groups?by={by}&since=1d", headers=AUTH).json()["groups"]
    assert {tuple(g[n] for n in names): g["count"] for g in groups} == expected
    series = api.get(f"/api/timeseries?by={by}&bucket=day", headers=AUTH).json()["series"]
    summed: dict[tuple[Any, ...], int] = {}
    for point in series:  # a day boundary may split one key over two buckets
        key = tuple(point[n] for n in names)
        summed[key] = summed.get(key, 0) + point["count"]
    assert summed == expected


def test_timeseries(api: TestClient) -> None:
    seed(api)
    for bucket in ("hour", "day"):
        series = api.get(f"/api/timeseries?bucket={bucket}&by=reason&type=crash", headers=AUTH)
        points = series.json()["series"]
        assert sum(p["count"] for p in points) == 9
        assert {p["reason"] for p in points} == {"oom", "unresponsive", None}
        assert all(p["time"].endswith(":00:00.000Z") for p in points)


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/api/groups?by=nope", "invalid_by"),
        ("/api/groups?by=site,site", "invalid_by"),
        ("/api/groups?limit=0", "invalid_limit"),
        ("/api/groups?limit=100000", "invalid_limit"),
        ("/api/groups?limit=-1", "invalid_limit"),
        ("/api/groups?since=yesterday", "invalid_time"),
        ("/api/groups?since=2d&until=3d", "invalid_time"),
        ("/api/groups?colour=red", "unknown_parameter"),
        ("/api/groups?type=a&type=b", "repeated_parameter"),
        ("/api/reports?cursor=!!!", "invalid_cursor"),
        ("/api/reports?cursor=bm90LWEtY3Vyc29y", "invalid_cursor"),
        ("/api/timeseries?bucket=week", "invalid_bucket"),
        ("/api/reports/12345678901234567890", "invalid_id"),
    ],
)
def test_bad_parameters_are_400_with_a_code(api: TestClient, path: str, code: str) -> None:
    response = api.get(path, headers=AUTH)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == code


def test_pages_have_no_gaps_or_repeats_under_concurrent_inserts(tmp_path: Path) -> None:
    settings = Settings(db=tmp_path / "r.sqlite3", read_token=TOKEN)
    app = create_app(settings)

    async def scenario() -> tuple[list[int], set[int]]:
        transport = httpx2.ASGITransport(app=app)
        async with (
            reporting_endpoint.lifespan(app),
            httpx2.AsyncClient(transport=transport, base_url="http://t") as client,
        ):
            for n in range(120):
                await client.post(
                    "/reports",
                    content=json.dumps([crash_report(url=f"https://p.example/{n}")]),
                    headers={"content-type": "application/reports+json"},
                )
            before = {r["id"] for r in await all_ids(client)}
            seen: list[int] = []
            cursor = None
            while True:
                query = "/api/reports?limit=7" + (f"&cursor={cursor}" if cursor else "")
                page = (await client.get(query, headers=AUTH)).json()
                seen.extend(r["id"] for r in page["reports"])
                # Someone reports between every page.
                await client.post(
                    "/reports",
                    content=json.dumps([crash_report(url="https://p.example/late")] * 3),
                    headers={"content-type": "application/reports+json"},
                )
                cursor = page["next_cursor"]
                if cursor is None:
                    return seen, before
        raise AssertionError("unreachable")

    async def all_ids(client: httpx2.AsyncClient) -> list[dict[str, Any]]:
        page = await client.get("/api/reports?limit=1000", headers=AUTH)
        return list(page.json()["reports"])

    seen, before = asyncio.run(scenario())
    assert len(seen) == len(set(seen)), "a report appeared on two pages"
    assert before <= set(seen), "a report that existed before paging was skipped"
    assert seen == sorted(seen, reverse=True)


@pytest.mark.parametrize(
    "by", ["site", "site,browser", "origin", "user_agent,reason", "browser_major,os", "type"]
)
def test_group_counts_match_the_reports_table(api: TestClient, tmp_path: Path, by: str) -> None:
    """Whichever roll-up table answers, its counts are those of the rows themselves."""
    seed(api)
    seed(api)
    connection = sqlite3.connect(tmp_path / "r.sqlite3")
    expected = {
        tuple(row[:-1]): row[-1]
        for row in connection.execute(f"SELECT {by}, count(*) FROM reports GROUP BY {by}")
    }
    groups = api.get(f"/api/groups?by={by}", headers=AUTH).json()["groups"]
    names = by.split(",")
    assert {tuple(g[n] for n in names): g["count"] for g in groups} == expected


@pytest.mark.parametrize(
    "query",
    [
        "since=0001-01-01T00:00:00%2B14:00",
        "since=9999-12-31T23:59:59-14:00",
        "since=999999w",
        "limit=1" + "0" * 30,
        "by=,,,",
        "type=%00",
        "cursor=" + "A" * 5000,
        "since=2024-02-30",
        "source=crashes&since=1d&by=os",
    ],
)
@pytest.mark.parametrize("path", ["/api/groups", "/api/reports", "/api/timeseries", "/api/crashes"])
def test_odd_parameters_never_cause_5xx(api: TestClient, path: str, query: str) -> None:
    response = api.get(f"{path}?{query}", headers=AUTH)
    assert response.status_code < 500
    if response.status_code >= 400:
        assert response.json()["error"]["code"]


def test_groups_say_when_more_exist_than_the_limit(api: TestClient, tmp_path: Path) -> None:
    seed(api)
    # Three sites: a limit of 2 leaves one out and says so; 3 or more shows them all.
    cut = api.get("/api/groups?by=site&limit=2", headers=AUTH).json()
    assert len(cut["groups"]) == 2 and cut["more"] is True
    whole = api.get("/api/groups?by=site&limit=3", headers=AUTH).json()
    assert len(whole["groups"]) == 3 and whole["more"] is False
    for n in range(3):
        insert_crash(tmp_path / "r.sqlite3", f"{n:032x}", product=f"App{n}")
    crashes = api.get("/api/groups?source=crashes&by=product&limit=2", headers=AUTH).json()
    assert len(crashes["groups"]) == 2 and crashes["more"] is True
    crashes = api.get("/api/groups?source=crashes&by=product&limit=3", headers=AUTH).json()
    assert len(crashes["groups"]) == 3 and crashes["more"] is False


def test_timeseries_buckets_are_zero_filled(api: TestClient) -> None:
    seed(api)
    series = api.get("/api/timeseries?since=3h&type=crash", headers=AUTH).json()["series"]
    # Every hour of the window is there, the quiet ones with 0.
    assert len(series) == 4
    times = [datetime.fromisoformat(p["time"].replace("Z", "+00:00")) for p in series]
    assert all(b - a == timedelta(hours=1) for a, b in pairwise(times))
    assert sum(p["count"] for p in series) == 9
    assert sum(1 for p in series if p["count"] == 0) >= 2
    by_reason = api.get("/api/timeseries?since=3h&type=crash&by=reason", headers=AUTH).json()
    points = by_reason["series"]
    assert len(points) == 4 * 3  # every hour for every reason seen
    assert {p["reason"] for p in points} == {"oom", "unresponsive", None}
    assert sum(p["count"] for p in points if p["reason"] == "oom") == 3


def test_timeseries_windows_are_bounded(api: TestClient) -> None:
    seed(api)
    hourly = api.get("/api/timeseries?since=2000-01-01&bucket=hour", headers=AUTH)
    assert hourly.status_code == 400
    assert hourly.json()["error"]["code"] == "window_too_large"
    daily = api.get("/api/timeseries?since=2010-01-01&bucket=day", headers=AUTH)
    assert daily.status_code == 200
    assert len(daily.json()["series"]) > 5000  # zero-filled from 2010
    assert sum(p["count"] for p in daily.json()["series"]) == 10


def test_timeseries_of_crashes(api: TestClient, tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite3"
    base = 1_767_225_600_000  # 2026-01-01T00:00:00Z
    hour = 3_600_000
    for n, (offset, platform) in enumerate(
        [(0, "linux"), (10, "linux"), (hour + 5, "win32"), (3 * hour, "linux")]
    ):
        insert_crash(db, f"{n:032x}", received_at=base + offset, platform=platform)
    query = "/api/timeseries?source=crashes&since=2026-01-01&until=2026-01-01T05:00:00Z"
    series = api.get(query, headers=AUTH).json()
    assert series["source"] == "crashes"
    assert [(p["time"][11:16], p["count"]) for p in series["series"]] == [
        ("00:00", 2),
        ("01:00", 1),
        ("02:00", 0),
        ("03:00", 1),
        ("04:00", 0),
    ]
    by = api.get(query + "&by=platform&platform=linux", headers=AUTH).json()["series"]
    assert [(p["platform"], p["count"]) for p in by] == [
        ("linux", 2),
        ("linux", 0),
        ("linux", 0),
        ("linux", 1),
        ("linux", 0),
    ]
    daily = api.get(query + "&bucket=day&by=platform", headers=AUTH).json()["series"]
    assert {p["platform"]: p["count"] for p in daily} == {"linux": 3, "win32": 1}
    bad = api.get("/api/timeseries?source=crashes&site=x", headers=AUTH)
    assert bad.json()["error"]["code"] == "unknown_parameter"
    assert api.get("/api/timeseries?source=nope", headers=AUTH).status_code == 400


def insert_quarantined(db: Path, rows: list[tuple[int, str, str | None, str, int]]) -> None:
    """(received_at, code, type, raw, truncated) rows, as the writer stores refused reports."""
    connection = sqlite3.connect(db)
    with connection:
        connection.executemany(
            "INSERT INTO quarantine (received_at, code, field, message, type, raw, truncated)"
            " VALUES (?, ?, 'body.reason', 'not one of the known values', ?, ?, ?)",
            rows,
        )
    connection.close()


def test_quarantine_is_visible_in_the_api(api: TestClient, tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite3"
    day = 86_400_000
    base = 1_767_225_600_000  # 2026-01-01
    report = {"type": "crash", "body": {"reason": "new-reason"}}
    insert_quarantined(
        db,
        [
            (base + n * day, "invalid_value" if n % 2 else "unknown_type", "crash",
             json.dumps(report), 0)
            for n in range(5)
        ]
        + [(base + 5 * day, "too_deep", None, '{"type": "crash", "body": {"a": [[[', 1)],
    )  # fmt: skip
    page = api.get("/api/quarantine?limit=4", headers=AUTH).json()
    items = page["quarantine"]
    assert [i["received_at"][:10] for i in items] == [
        "2026-01-06",
        "2026-01-05",
        "2026-01-04",
        "2026-01-03",
    ]
    assert items[0]["raw"] == '{"type": "crash", "body": {"a": [[[' and items[0]["truncated"]
    assert items[0]["type"] is None and items[0]["code"] == "too_deep"
    assert items[1]["raw"] == report and items[1]["field"] == "body.reason"
    rest = api.get(f"/api/quarantine?limit=4&cursor={page['next_cursor']}", headers=AUTH).json()
    assert len(rest["quarantine"]) == 2 and rest["next_cursor"] is None
    ids = [i["id"] for i in items + rest["quarantine"]]
    assert len(set(ids)) == 6
    codes = api.get("/api/quarantine?code=invalid_value&type=crash", headers=AUTH).json()
    assert {i["code"] for i in codes["quarantine"]} == {"invalid_value"}
    assert len(codes["quarantine"]) == 2
    window = api.get("/api/quarantine?since=2026-01-02&until=2026-01-04", headers=AUTH).json()
    assert [i["received_at"][:10] for i in window["quarantine"]] == ["2026-01-03", "2026-01-02"]
    one = api.get(f"/api/quarantine/{ids[1]}", headers=AUTH).json()
    assert one == items[1]
    missing = api.get("/api/quarantine/999999", headers=AUTH)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "quarantined_not_found"
    assert api.get("/api/quarantine/x", headers=AUTH).json()["error"]["code"] == "invalid_id"
    assert api.get("/api/quarantine?reason=x", headers=AUTH).status_code == 400
    assert api.get("/api/quarantine").status_code == 401

    async def counts() -> tuple[tuple[str, int], ...]:
        storage = SQLiteStorage(db, read_only=True)
        await storage.start()
        try:
            return await storage.quarantine_counts()
        finally:
            await storage.stop()

    assert asyncio.run(counts()) == (
        ("unknown_type", 3),
        ("invalid_value", 2),
        ("too_deep", 1),
    )
