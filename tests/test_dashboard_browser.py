"""The dashboard in real headless Chromium: log in, every page with data renders without a
console error or CSP violation at desktop and phone width, and triage works through buttons."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx2
import pytest

from tests.browser import Chromium
from tests.crashpad_client import MINIDUMPS, multipart
from tests.dashboard_driver import (
    ARTIFACTS,
    CHROMIUM,
    CHROMIUM_MARKS,
    DESKTOP,
    PHONE,
    READ_TOKEN,
    SERVICE_ENV,
    WRITE_TOKEN,
    DashboardTab,
    api,
    dashboard_tab,
    dashboard_violation_reports,
)
from tests.servers import RunningServer, TlsCertificate, make_certificate, running_service
from tests.xss_corpus import post_crash, post_reports

pytestmark = CHROMIUM_MARKS

CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36"
)
ANDROID = (
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/130.0.0.0 Mobile Safari/537.36"
)
EDGE = CHROME + " Edg/131.0.0.0"
# The host of the image the control test loads against the CSP.
CONTROL = "elsewhere.example"


def sample_reports() -> list[dict[str, Any]]:
    """What two sites' browsers send in a day: crashes of each reason, and the other types."""
    reports: list[dict[str, Any]] = []
    pages = ["https://shop.example/checkout", "https://blog.example/post/7"]
    for index in range(36):
        reason = [None, "oom", "unresponsive"][index % 3]
        body: dict[str, Any] = {"is_top_level": True, "visibility_state": "visible"}
        if reason:
            body["reason"] = reason
        reports.append(
            {
                "age": 1000 * index,
                "type": "crash",
                "url": pages[index % 2],
                "user_agent": [CHROME, ANDROID, EDGE][index % 3],
                "body": body,
            }
        )
    reports += [
        {
            "age": 5,
            "type": "deprecation",
            "url": pages[0],
            "user_agent": CHROME,
            "body": {"id": "UnloadHandler", "message": "Unload event listeners are deprecated."},
        },
        {
            "age": 6,
            "type": "intervention",
            "url": pages[1],
            "user_agent": ANDROID,
            "body": {"id": "NavigatorVibrate", "message": "Blocked call to navigator.vibrate"},
        },
        {
            "age": 7,
            "type": "csp-violation",
            "url": pages[0],
            "user_agent": CHROME,
            "body": {
                "documentURL": pages[0],
                "blockedURL": "https://ads.example/x.js",
                "effectiveDirective": "script-src-elem",
                "originalPolicy": "script-src 'self'",
                "disposition": "enforce",
                "statusCode": 200,
            },
        },
        {
            "age": 8,
            "type": "network-error",
            "url": pages[1],
            "user_agent": EDGE,
            "body": {
                "sampling_fraction": 1.0,
                "elapsed_time": 42,
                "phase": "connection",
                "type": "tcp.timed_out",
                "server_ip": "192.0.2.1",
                "protocol": "http/1.1",
                "method": "GET",
                "status_code": 0,
                "url": pages[1],
            },
        },
        # Refused by the schema: lands in quarantine.
        {
            "age": 9,
            "type": "crash",
            "url": pages[0],
            "user_agent": CHROME,
            "body": {"reason": "cosmic-ray"},
        },
    ]
    return reports


def electron_upload() -> tuple[str, bytes]:
    dump = (MINIDUMPS / "win-x86_breakpad_minidump2.dmp").read_bytes()
    fields = {
        "prod": "Electron",
        "ver": "33.2.0",
        "_productName": "Notes",
        "_version": "2.4.1",
        "platform": "win32",
        "process_type": "renderer",
    }
    return "", multipart(fields, [("upload_file_minidump", "crash.dmp", dump)])


@dataclass(frozen=True)
class Loaded:
    server: RunningServer
    w3c_issue: int
    native_issue: int
    report: int
    crash: str


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> TlsCertificate:
    return make_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def loaded(
    tmp_path_factory: pytest.TempPathFactory, certificate: TlsCertificate
) -> Iterator[Loaded]:
    db = tmp_path_factory.mktemp("dashboard") / "reports.sqlite3"
    with running_service(db, certificate, env=SERVICE_ENV) as server:
        verify = certificate.client_context()
        with httpx2.Client(base_url=server.url, verify=verify, timeout=30) as client:
            assert len(post_reports(client, sample_reports())) == 1
            crash = post_crash(client, *electron_upload())
        w3c = api(server, certificate, "/api/issues?kind=crash")["issues"]
        native = wait_for_native_issue(server, certificate)
        report = api(server, certificate, "/api/reports?type=crash&limit=1")["reports"][0]
        yield Loaded(server, int(w3c[0]["id"]), int(native["id"]), int(report["id"]), crash)


def wait_for_native_issue(server: RunningServer, certificate: TlsCertificate) -> dict[str, Any]:
    """The dump is parsed after the upload's answer; its issue follows within moments."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = api(server, certificate, "/api/issues?kind=native")["issues"]
        if found:
            return dict(found[0])
        time.sleep(0.1)
    raise AssertionError("the uploaded dump never became a native issue")


@pytest.fixture(scope="module")
def chromium(
    tmp_path_factory: pytest.TempPathFactory, certificate: TlsCertificate
) -> Iterator[Chromium]:
    assert CHROMIUM is not None
    browser = Chromium(CHROMIUM, tmp_path_factory.mktemp("profile"), certificate)
    try:
        yield browser
    finally:
        browser.close()


@pytest.fixture(scope="module", autouse=True)
def _say_where_screenshots_are(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and ARTIFACTS.is_dir():
        reporter.write_line(f"dashboard screenshots: {ARTIFACTS}")


def pages(loaded: Loaded) -> list[tuple[str, str, str, str]]:
    """(name, path, data-page, a text the page shows when it shows the data)."""
    return [
        ("overview", "/dashboard/", "overview", "shop.example"),
        ("overview-30d", "/dashboard/?window=30d", "overview", "blog.example"),
        ("issues", "/dashboard/issues", "issues", "OOM"),
        ("issues-native", "/dashboard/issues?kind=native", "issues", "EXCEPTION_ACCESS"),
        ("issue-w3c", f"/dashboard/issues/{loaded.w3c_issue}", "issue", "example"),
        ("issue-native", f"/dashboard/issues/{loaded.native_issue}", "issue", "test_app.exe"),
        ("reports", "/dashboard/reports", "reports", "network-error"),
        ("reports-csp", "/dashboard/reports?type=csp-violation", "reports", "shop.example"),
        ("report", f"/dashboard/reports/{loaded.report}", "report", "example"),
        ("crash", f"/dashboard/crashes/{loaded.crash}", "crash", "EXCEPTION_ACCESS_VIOLATION"),
        ("quarantine", "/dashboard/quarantine", "quarantine", "cosmic-ray"),
        ("setup", "/dashboard/setup?url=https://shop.example/", "setup", "Reporting-Endpoints"),
    ]


@pytest.mark.parametrize("size", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_every_page_shows_its_data_without_errors(
    loaded: Loaded, chromium: Chromium, size: tuple[int, int]
) -> None:
    base, width = loaded.server.url, size[0]
    with dashboard_tab(chromium) as tab:
        tab.viewport(*size)
        tab.goto(f"{base}/dashboard/login")
        assert tab.page() == "login"
        tab.screenshot(ARTIFACTS / f"login-{width}.png")
        tab.login(base, READ_TOKEN)
        seen = {}
        for name, path, _page, evidence in pages(loaded):
            tab.goto(base + path)
            seen[name] = (tab.page(), evidence in tab.text(), tab.url)
            tab.screenshot(ARTIFACTS / f"{name}-{width}.png")
        tab.settle(1.0)
        problems = tab.problems()
    wanted = {name: (page, True) for name, _, page, _evidence in pages(loaded)}
    assert {name: got[:2] for name, got in seen.items()} == wanted, seen
    assert problems == []
    assert [r for r in dashboard_violation_reports(loaded.server) if CONTROL not in r["raw"]] == []


def issue_state(tab: DashboardTab) -> tuple[str, int]:
    status = tab.evaluate("document.querySelector('[data-status]').textContent.trim()")
    history = tab.evaluate("document.querySelectorAll('[data-history] > li').length")
    return str(status).lower(), int(history)


def test_triage_through_the_buttons(loaded: Loaded, chromium: Chromium) -> None:
    base = loaded.server.url
    issue = f"{base}/dashboard/issues/{loaded.native_issue}"
    with dashboard_tab(chromium) as tab:
        tab.viewport(*DESKTOP)
        tab.login(base, READ_TOKEN, WRITE_TOKEN)
        tab.goto(issue)
        status, history = issue_state(tab)
        assert status in ("unresolved", "new")
        steps = [
            ("button[name=action][value=resolve]", "resolved"),
            ("button[name=action][value=reopen]", "unresolved"),
            ("button[name=action][value=ignore]", "ignored"),
            ("button[name=action][value=reopen]", "unresolved"),
        ]
        states = []
        for button, _ in steps:
            tab.click(button)
            states.append((tab.url, *issue_state(tab)))
        tab.fill("input[name=release]", "2.5.0")
        tab.click("button[name=action][value=resolve_in_release]")
        final = issue_state(tab)
        shows_release = "2.5.0" in tab.text()
        tab.screenshot(ARTIFACTS / f"issue-triaged-{DESKTOP[0]}.png")
        tab.goto(f"{base}/dashboard/issues?status=resolved")
        listed = tab.evaluate(
            "[...document.querySelectorAll('tr[data-issue]')].map(r => r.dataset.issue)"
        )
        problems = tab.problems()
    assert states == [
        (issue, want, history + number) for number, (_, want) in enumerate(steps, start=1)
    ]
    assert final == ("resolved", history + len(steps) + 1) and shows_release
    assert str(loaded.native_issue) in listed
    assert problems == []


def test_a_violation_is_seen_and_reported_to_the_service(
    loaded: Loaded, chromium: Chromium
) -> None:
    """The control for the checks above: a CSP violation on a dashboard page shows up both
    in the console and, through the page's own Reporting-Endpoints, as a stored report."""
    base = loaded.server.url
    before = len(dashboard_violation_reports(loaded.server))
    with dashboard_tab(chromium) as tab:
        tab.login(base, READ_TOKEN)
        tab.evaluate(
            "document.body.appendChild(Object.assign(document.createElement('img'),"
            f" {{src: 'https://{CONTROL}/pixel.png'}}))"
        )
        tab.settle(0.5)
        problems = tab.problems()
    assert any("Content Security Policy" in p.text for p in problems), problems
    deadline = time.monotonic() + 15
    while len(dashboard_violation_reports(loaded.server)) == before:
        if time.monotonic() > deadline:
            raise AssertionError("no csp-violation report about the dashboard arrived")
        time.sleep(0.1)
    [report] = dashboard_violation_reports(loaded.server)[before:]
    assert report["url"] == f"{base}/dashboard/"
    assert CONTROL in report["raw"]
