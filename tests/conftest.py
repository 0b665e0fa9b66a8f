"""Shared test helpers: settings on a temporary database, an in-process client, fixtures."""

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
from tests.postgres import postgres, postgres_url  # noqa: F401 (the fixtures, for every test)

FIXTURES = Path(__file__).parent / "fixtures"

CHROME_UA = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "HeadlessChrome/156.0.0.0 Safari/537.36"
)


def captured_requests(name: str) -> list[dict[str, Any]]:
    """The browser's own Reporting API deliveries in ``fixtures/chromium/<name>.jsonl``."""
    lines = (FIXTURES / "chromium" / f"{name}.jsonl").read_text().splitlines()
    requests = [json.loads(line) for line in lines if line.strip()]
    return [
        r
        for r in requests
        if r["method"] == "OPTIONS"
        or dict(r["headers"]).get("Content-Type") == "application/reports+json"
    ]


def captured_reports(name: str) -> list[dict[str, Any]]:
    reports: list[dict[str, Any]] = []
    for request in captured_requests(name):
        if request["method"] == "POST":
            reports.extend(json.loads(request["body"]))
    return reports


def crash_report(**overrides: Any) -> dict[str, Any]:
    report: dict[str, Any] = {
        "age": 13,
        "body": {"crash_report_api": {}, "is_top_level": True, "visibility_state": "visible"},
        "type": "crash",
        "url": "https://shop.example.co.uk/cart?user=alice#top",
        "user_agent": CHROME_UA,
    }
    report.update(overrides)
    return report


def stored_rows(db: Path) -> list[dict[str, Any]]:
    connection = sqlite3.connect(db)
    connection.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in connection.execute("SELECT * FROM reports ORDER BY id")]
    finally:
        connection.close()


# Storage backends the parity suite (tests/test_storage_parity.py) runs against; a backend
# adds its name here and a branch to ``database_url``.
STORAGE_BACKENDS = ["sqlite", "postgresql"]


@pytest.fixture(params=STORAGE_BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database of each backend, as the ``database`` setting names it (for
    PostgreSQL a database of this test's own on the session's server, skipped without one)."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/parity.sqlite3"
    if request.param == "postgresql":
        url: str = request.getfixturevalue("postgres_url")
        return url
    raise NotImplementedError(request.param)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(db=tmp_path / "reports.sqlite3")


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """The service in-process, lifespan running (storage started, drained on exit)."""
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def post_reports(
    client: TestClient, reports: Any, content_type: str = "application/reports+json"
) -> Any:
    body = reports if isinstance(reports, bytes) else json.dumps(reports).encode()
    return client.post("/reports", content=body, headers={"content-type": content_type})


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """How long each real-browser scenario took (they are the slow part of the suite)."""
    from tests import test_chromium

    if test_chromium.TIMINGS:
        terminalreporter.section("Chromium scenarios")
        for name, seconds in test_chromium.TIMINGS.items():
            terminalreporter.write_line(f"{name}: {seconds:.1f} s")
