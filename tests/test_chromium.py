"""Real headless Chromium, crashing for real, ends up as stored reports in a running service."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reporting_endpoint.settings import Settings
from tests.browser import Chromium, find_chromium, page_server, recording_service
from tests.servers import (
    RunningServer,
    TlsCertificate,
    free_port,
    make_certificate,
    running_service,
)

CHROMIUM = find_chromium()
pytestmark = [
    pytest.mark.chromium,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="Debian's chromium is not installed "
        "(the README's test command installs it when run as root)",
    ),
]

TIMINGS: dict[str, float] = {}


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> TlsCertificate:
    return make_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def chromium(tmp_path: Path, certificate: TlsCertificate) -> Iterator[Chromium]:
    assert CHROMIUM is not None
    browser = Chromium(CHROMIUM, tmp_path / "profile", certificate)
    try:
        yield browser
    finally:
        browser.close()


@pytest.fixture(autouse=True)
def _timed(request: pytest.FixtureRequest) -> Iterator[None]:
    start = time.monotonic()
    yield
    TIMINGS[request.node.name] = time.monotonic() - start


def stored(db: Path) -> list[dict[str, Any]]:
    if not db.exists():
        return []
    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    connection.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in connection.execute("SELECT * FROM reports ORDER BY id")]
    except sqlite3.OperationalError:
        return []
    finally:
        connection.close()


def wait_for_reports(
    db: Path, want: int = 1, timeout: float = 20.0, report_type: str | None = None
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        rows = [r for r in stored(db) if report_type is None or r["type"] == report_type]
        if len(rows) >= want:
            return rows
        time.sleep(0.1)
    return rows


def crash_page(chromium: Chromium, url: str) -> None:
    with chromium.new_tab() as tab:
        tab.navigate_and_wait(url)
        tab.send("Page.crash")
        time.sleep(0.2)


def service(tmp_path: Path, certificate: TlsCertificate, **env: str) -> Any:
    return running_service(tmp_path / "reports.sqlite3", certificate, env=env or None)


def endpoint(server: RunningServer) -> str:
    return f"https://127.0.0.1:{server.port}/reports"


def test_renderer_crash_is_stored(
    tmp_path: Path, certificate: TlsCertificate, chromium: Chromium
) -> None:
    with (
        service(tmp_path, certificate) as server,
        page_server(certificate, endpoint(server)) as origin,
    ):
        crash_page(chromium, f"{origin}/page?ep=both&user=alice")
        rows = wait_for_reports(server.db, report_type="crash")
    assert len(rows) == 1, "Chromium delivered no crash report (cross-origin: preflight first)"
    [row] = rows
    assert row["url"] == f"{origin}/page"  # the query string is dropped by default
    assert row["user_agent"] == chromium.user_agent()
    assert row["browser"] == "HeadlessChrome"
    assert row["reason"] is None
    body = json.loads(row["raw"])["body"]
    assert body["is_top_level"] is True
    assert body["visibility_state"] == "visible"


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param("default", id="only-default-endpoint"),
        pytest.param("report-to", id="legacy-report-to"),
    ],
)
def test_crash_delivered_without_a_crash_reporting_endpoint(
    tmp_path: Path, certificate: TlsCertificate, chromium: Chromium, headers: str
) -> None:
    """Without a crash-reporting endpoint Chromium sends crashes to default: a page naming only
    default in Reporting-Endpoints, or only the legacy Report-To group."""
    with (
        service(tmp_path, certificate) as server,
        page_server(certificate, endpoint(server)) as origin,
    ):
        crash_page(chromium, f"{origin}/page?ep={headers}")
        rows = wait_for_reports(server.db, report_type="crash")
    assert [r["url"] for r in rows] == [f"{origin}/page"]


def test_allow_list_that_excludes_the_page_refuses_the_report(
    tmp_path: Path, certificate: TlsCertificate, chromium: Chromium
) -> None:
    """Two pages crash in one browser: the allowed one is the control that Chromium delivers at
    all, and the service must have seen (and refused) the excluded page's preflight, so the
    test cannot pass merely because Chromium sent nothing."""
    db = tmp_path / "reports.sqlite3"
    allowed_port = free_port()
    allowed = f"https://127.0.0.1:{allowed_port}"
    settings = Settings(db=db, cors_allow_origins=(allowed,))
    with (
        recording_service(settings, certificate) as (service_url, seen),
        page_server(certificate, f"{service_url}/reports", port=allowed_port) as allowed_origin,
        page_server(certificate, f"{service_url}/reports") as excluded,
    ):
        crash_page(chromium, f"{excluded}/page?ep=both")
        crash_page(chromium, f"{allowed_origin}/page?ep=both")
        rows = wait_for_reports(db, report_type="crash")
        deadline = time.monotonic() + 10
        while not any(r.origin == excluded for r in seen) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1)  # room for a POST that should never follow the refused preflight
        from_excluded = [r for r in seen if r.origin == excluded]
    assert [r["url"] for r in rows] == [f"{allowed_origin}/page"], "the control never arrived"
    assert from_excluded, "Chromium never asked on behalf of the excluded page"
    assert {(r.method, r.path, r.status) for r in from_excluded} == {("OPTIONS", "/reports", 403)}
    assert not [r for r in stored(db) if r["origin"] == excluded]


def test_allow_list_that_includes_the_page_passes(
    tmp_path: Path, certificate: TlsCertificate, chromium: Chromium
) -> None:
    db = tmp_path / "reports.sqlite3"
    # The page's origin must be known before the service starts: pick the page port first.
    page_port = free_port()
    allowed = f"https://127.0.0.1:{page_port}"
    with (
        running_service(
            db, certificate, env={"REPORTING_ENDPOINT_CORS_ALLOW_ORIGINS": allowed}
        ) as server,
        page_server(certificate, endpoint(server), port=page_port) as origin,
    ):
        assert origin == allowed
        crash_page(chromium, f"{origin}/page?ep=both")
        rows = wait_for_reports(db, report_type="crash")
    assert len(rows) == 1


def test_deprecation_and_intervention_reports_are_stored(
    tmp_path: Path, certificate: TlsCertificate, chromium: Chromium
) -> None:
    with (
        service(tmp_path, certificate) as server,
        page_server(certificate, endpoint(server)) as origin,
        chromium.new_tab() as tab,
    ):
        tab.navigate_and_wait(f"{origin}/page?ep=both&js=deprecation")
        rows = wait_for_reports(server.db, want=2, timeout=90)
        types = {r["type"] for r in rows}
    assert types == {"deprecation", "intervention"}, types


@pytest.mark.slow
def test_out_of_memory_crash_has_reason_oom(
    tmp_path: Path, certificate: TlsCertificate, chromium: Chromium
) -> None:
    with (
        service(tmp_path, certificate) as server,
        page_server(certificate, endpoint(server)) as origin,
    ):
        with chromium.new_tab() as tab:
            tab.call("Inspector.enable")
            tab.navigate_and_wait(f"{origin}/page?ep=both&js=oom")
            tab.wait_for("Inspector.targetCrashed", timeout=120)
        rows = wait_for_reports(server.db, report_type="crash", timeout=30)
    assert [r["reason"] for r in rows] == ["oom"]
