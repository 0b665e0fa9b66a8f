"""Retries over HTTP: a browser's second delivery of a batch (same reports, larger ``age``) is
answered 2xx and stored once; distinct reports that merely look alike are all stored."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from reporting_endpoint.app import create_app
from reporting_endpoint.settings import Settings, SettingsError
from tests.conftest import captured_reports, crash_report, post_reports

READ = {"Authorization": "Bearer read-secret"}
NAMES = ("crash-pagecrash", "oom", "deprecation", "csp", "nel")


def service(database_url: str, tmp_path: Path, **changes: Any) -> TestClient:
    settings = Settings(
        database=database_url, blob_store=str(tmp_path / "blobs"), read_token="read-secret"
    ).replace(**changes)
    return TestClient(create_app(settings))


@pytest.fixture
def client(database_url: str, tmp_path: Path) -> Iterator[TestClient]:
    with service(database_url, tmp_path) as test_client:
        yield test_client


def stored(client: TestClient) -> list[dict[str, Any]]:
    response = client.get("/api/reports?limit=1000", headers=READ)
    assert response.status_code == 200
    reports: list[dict[str, Any]] = response.json()["reports"]
    return reports


def retried(batch: list[dict[str, Any]], since: float) -> list[dict[str, Any]]:
    """The batch as the browser sends it again now, ``since`` being when it sent it first
    (``time.monotonic()``): every age grown by the time that passed."""
    later_ms = round((time.monotonic() - since) * 1000)
    return [{**report, "age": report["age"] + later_ms} for report in batch]


@pytest.mark.parametrize("name", NAMES)
def test_a_retried_captured_batch_is_stored_once(client: TestClient, name: str) -> None:
    batch = captured_reports(name)
    sent = time.monotonic()
    first = post_reports(client, batch)
    assert first.json() == {"accepted": len(batch), "rejected": []}
    if name == "oom":
        time.sleep(1.2)  # once: a retry well after the first delivery, ages grown by > 1 s
    # The retry: answered like any delivery (the browser only needs its 2xx), not stored.
    # The larger age makes up for the time that passed, give or take a few ms.
    again = post_reports(client, retried(batch, sent))
    assert again.status_code == 200
    assert again.json() == {"accepted": len(batch), "rejected": []}
    assert len(stored(client)) == len(batch)
    issue_total = sum(
        item["count"] for item in client.get("/api/issues?limit=200", headers=READ).json()["issues"]
    )
    assert issue_total == len(batch)


def test_two_crashes_of_one_page_a_second_apart_are_both_stored(client: TestClient) -> None:
    # Identical but for when they were made: 1 s apart, twice the tolerance.
    sent = time.monotonic()
    batch = [crash_report(age=1013), crash_report(age=13), crash_report(age=2013)]
    assert post_reports(client, batch[:2]).json()["accepted"] == 2
    assert post_reports(client, batch[2:]).json()["accepted"] == 1
    assert len(stored(client)) == 3
    # ... and a retry of all three is still recognised.
    assert post_reports(client, retried(batch, sent)).json()["accepted"] == 3
    assert len(stored(client)) == 3


def test_what_makes_a_report_different(client: TestClient) -> None:
    base = crash_report(url="https://shop.example.com/app?v=1.1", age=13)
    variants = [
        {**base, "url": "https://shop.example.com/app?v=1.3"},  # same stored URL, other query
        {**base, "user_agent": base["user_agent"].replace("156.0", "157.0")},
        {**base, "body": {**base["body"], "reason": "oom"}},
    ]
    post_reports(client, [base])
    for variant in variants:
        assert post_reports(client, [variant]).json()["accepted"] == 1
    assert len(stored(client)) == 4


def test_a_refused_upload_is_not_remembered(tmp_path: Path) -> None:
    """Only a committed report counts as seen: the retry of an upload that got a 503 must be
    stored, or the report would be lost."""
    app = create_app(Settings(db=tmp_path / "r.sqlite3", read_token="read-secret"))
    batch = [crash_report(age=13), crash_report(age=3013)]
    sent = time.monotonic()
    # Before the lifespan has started the storage: 503 storage_not_started, nothing written.
    refused = post_reports(TestClient(app), batch)
    assert refused.status_code == 503
    with TestClient(app) as client:  # the same app, so the same window of seen reports
        assert post_reports(client, retried(batch, sent)).json()["accepted"] == 2
        assert len(stored(client)) == 2


def test_retry_detection_can_be_turned_off(tmp_path: Path) -> None:
    with service(f"sqlite://{tmp_path}/r.sqlite3", tmp_path, duplicate_tolerance_ms=0) as client:
        batch = captured_reports("oom")
        sent = time.monotonic()
        post_reports(client, batch)
        post_reports(client, retried(batch, sent))
        assert len(stored(client)) == 2 * len(batch)


@pytest.mark.parametrize(
    "changes",
    [{"duplicate_tolerance_ms": -1}, {"duplicate_window_minutes": 0}],
)
def test_bad_retry_settings_are_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(SettingsError):
        Settings(**changes)


def test_reports_older_than_the_window_are_stored_and_not_held(client: TestClient) -> None:
    """A report made a day ago (the schema allows ages up to 30 days) is past the window:
    stored each time it comes, never held in memory."""
    day = 24 * 3600 * 1000
    endpoint = client.app.router.routes[0].endpoint  # type: ignore[attr-defined]
    assert post_reports(client, [crash_report(age=day)]).json()["accepted"] == 1
    assert post_reports(client, [crash_report(age=day)]).json()["accepted"] == 1
    assert len(stored(client)) == 2
    assert len(endpoint.duplicates) == 0
