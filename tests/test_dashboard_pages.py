"""Dashboard pages over HTTP on both storage engines: every page answers with data and with an
empty database, carries the CSP and the reporting headers, escapes what came from the
internet; triage through the forms; filters in the URL; the set-up page and the minidump."""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from starlette.testclient import TestClient

from reporting_endpoint.storage.base import IssueFilters
from tests.conftest import CHROME_UA, captured_reports, crash_report, post_reports
from tests.crashpad_client import MINIDUMPS, content_type, dump_upload
from tests.dashboard_session import (
    READ_TOKEN,
    dashboard_client,
    dashboard_settings,
    login,
    session_csrf,
)

# What an attacker puts where the pages show it: page URLs, user agents, report bodies,
# annotations, releases.
XSS = "<script>alert(1)</script>"
IMG = '"><img src=x onerror=alert(2)>'
EVIL_UA = f"{CHROME_UA} {XSS}"
_AGES = itertools.count(13, 2000)
POLICY = (
    "default-src 'none'", "script-src 'self'", "style-src 'self'", "frame-ancestors 'none'",
    "form-action 'self'", "base-uri 'none'", "report-to default",
)  # fmt: skip
TODAY = datetime.now(UTC).date()
TEN_DAYS_AGO = TODAY - timedelta(days=10)
API_HEADERS = {"authorization": f"Bearer {READ_TOKEN}"}
INLINE_SCRIPT = re.compile(r"<script(?![^>]*\bsrc=)", re.I)


@pytest.fixture
def client(database_url: str, tmp_path: Path) -> Iterator[TestClient]:
    with dashboard_client(dashboard_settings(database_url, tmp_path)) as test_client:
        login(test_client)
        yield test_client


def populate(client: TestClient) -> dict[str, Any]:
    """Reports of every kind, a refused one, and a parsed Crashpad upload, with HTML in every
    field an attacker controls; answers the ids the pages are reached by."""
    crashes = [
        crash_report(url=f"https://shop.example.com/cart/{IMG}?v=1.{n}", user_agent=EVIL_UA,
                     age=next(_AGES))
        for n in range(3)
    ]  # fmt: skip
    csp = captured_reports("csp")[0]
    csp = {**csp, "body": {**csp["body"], "blockedURL": f"https://cdn.example/{IMG}"}}
    deprecation = captured_reports("deprecation")[0]
    deprecation = {**deprecation, "body": {**deprecation["body"], "id": XSS}}
    refused = {"type": "crash", "url": f"https://x.example/{XSS}", "age": 1, "body": XSS}
    answer = post_reports(client, [*crashes, csp, deprecation, refused])
    assert answer.status_code == 200
    assert answer.json()["accepted"] == 5
    fields = {"prod": f"Evil{XSS}", "ver": "1.2.3", "_productName": "ExampleApp",
              "_version": "1.2.3", "platform": "win32", "note": XSS}  # fmt: skip
    body = dump_upload(
        (MINIDUMPS / "win-x64_electron_node-minidump_windows.dmp").read_bytes(), fields
    )
    uploaded = client.post("/crashpad", content=body, headers={"content-type": content_type()})
    assert uploaded.status_code == 200
    analyzer = client.app.state.analyzer  # type: ignore[attr-defined]
    client.portal.call(analyzer.idle)  # type: ignore[union-attr]
    issues = issue_ids(client.get("/dashboard/issues").text)
    native = issue_ids(client.get("/dashboard/issues?kind=native").text)
    report = re.search(r'data-report="(\d+)"', client.get("/dashboard/reports").text)
    assert report is not None
    return {"issues": issues, "native": native[0], "crash": uploaded.text,
            "report": int(report.group(1))}  # fmt: skip


def issue_ids(html: str) -> list[int]:
    return [int(found) for found in re.findall(r'<tr data-issue="(\d+)"', html)]


def pages(ids: dict[str, Any]) -> list[tuple[str, str]]:
    """(URL, data-page) of every page, with the ids of what ``populate`` stored."""
    return [
        ("/dashboard/", "overview"),
        ("/dashboard/?window=7d", "overview"),
        ("/dashboard/?window=30d", "overview"),
        (f"/dashboard/?since={TEN_DAYS_AGO}&until={TODAY}", "overview"),
        (f"/dashboard/issues?since={TEN_DAYS_AGO}", "issues"),
        ("/dashboard/issues", "issues"),
        ("/dashboard/issues?status=unresolved&sort=trend&window=30d", "issues"),
        ("/dashboard/issues?kind=crash&site=https://example.com&browser=Chrome&os=Linux", "issues"),
        *[(f"/dashboard/issues/{i}", "issue") for i in ids["issues"]],
        ("/dashboard/reports", "reports"),
        ("/dashboard/reports?type=csp-violation&window=30d", "reports"),
        ("/dashboard/reports?type=native", "reports"),
        (f"/dashboard/reports/{ids['report']}", "report"),
        (f"/dashboard/crashes/{ids['crash']}", "crash"),
        ("/dashboard/quarantine", "quarantine"),
        ("/dashboard/setup", "setup"),
        ("/dashboard/setup?url=https://shop.example.com/", "setup"),
    ]


def assert_policy(response: Any) -> None:
    csp = response.headers["content-security-policy"]
    for directive in POLICY:
        assert directive in csp
    assert "unsafe" not in csp
    assert response.headers["reporting-endpoints"] == (
        'default="https://testserver/reports", crash-reporting="https://testserver/reports"'
    )


def assert_escaped(html: str) -> None:
    assert not INLINE_SCRIPT.search(html), "an inline <script> on the page"
    assert "<img" not in html and "onerror=alert" not in html.replace("onerror=alert(2)&gt;", "")
    # No inline style either: the CSP (style-src 'self') would block it.
    assert " style=" not in html


def test_every_page_with_data(client: TestClient) -> None:
    ids = populate(client)
    assert len(ids["issues"]) >= 4
    for url, page in pages(ids):
        response = client.get(url)
        assert response.status_code == 200, (url, response.text[-2000:])
        assert f'<main data-page="{page}">' in response.text, url
        assert_policy(response)
        assert_escaped(response.text)
    # What was sent is shown, escaped.
    report = client.get(f"/dashboard/reports/{ids['report']}").text
    crash = client.get(f"/dashboard/crashes/{ids['crash']}").text
    quarantine = client.get("/dashboard/quarantine").text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in report + crash + quarantine
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in crash  # the annotation
    assert "&lt;script&gt;" in quarantine
    overview = client.get("/dashboard/?window=30d").text
    assert "<svg" in overview
    for section in ("Top issues", "New issues", "Top sites", "Browsers", "Native crashes"):
        assert section in overview


def test_every_page_with_an_empty_database(client: TestClient) -> None:
    ids = {"issues": [], "native": 1, "crash": "0" * 32, "report": 1}
    for url, page in pages(ids):
        response = client.get(url)
        if page in ("report", "crash"):
            assert response.status_code == 404
            assert 'data-page="error"' in response.text
            assert 'data-code="' in response.text
        else:
            assert response.status_code == 200, (url, response.text[-2000:])
            assert f'<main data-page="{page}">' in response.text
        assert_policy(response)
    assert client.get("/dashboard/issues/1").status_code == 404
    assert "No issue had an event" in client.get("/dashboard/").text


def test_bad_parameters_are_refused_with_a_reason_code(client: TestClient) -> None:
    for url, code in [
        ("/dashboard/?window=1y", "invalid_window"),
        ("/dashboard/?since=yesterday", "invalid_time"),
        ("/dashboard/?since=2020-01-01&until=2026-01-01", "window_too_large"),
        ("/dashboard/issues?status=lost", "invalid_status"),
        ("/dashboard/issues?sort=random", "invalid_sort"),
        ("/dashboard/issues?after=%00%ff", "invalid_cursor"),
        ("/dashboard/issues?colour=red", "unknown_parameter"),
        ("/dashboard/reports?after=nope", "invalid_cursor"),
        ("/dashboard/issues/abc", "invalid_id"),
        ("/dashboard/crashes/xyz", "invalid_id"),
    ]:
        response = client.get(url)
        assert response.status_code == 400, url
        assert f'data-code="{code}"' in response.text, (url, response.text[-600:])
        assert_policy(response)


def test_windows_at_the_ends_of_the_calendar_are_refused_or_shown(client: TestClient) -> None:
    # Date arithmetic past year 1 or 9999 overflows: a 400 naming the parameter, never a 500.
    ids = populate(client)
    windowed = ["/dashboard/", "/dashboard/issues", f"/dashboard/issues/{ids['native']}",
                "/dashboard/reports", "/dashboard/reports?type=native"]  # fmt: skip
    edges = ["until=0001-01-01", "until=0001-01-06", "until=9999-12-31",
             "since=9999-12-31&until=9999-12-31", "since=0001-01-01&until=9999-12-31"]  # fmt: skip
    for path in windowed:
        joiner = "&" if "?" in path else "?"
        for edge in edges:
            response = client.get(path + joiner + edge)
            assert response.status_code == 400, (path, edge, response.text[-600:])
            assert 'data-code="invalid_time"' in response.text or (
                'data-code="window_too_large"' in response.text and "since=0001" in edge
            ), (path, edge)
        for fine in ["since=0001-01-01&until=0001-01-02", "since=9999-12-29&until=9999-12-30"]:
            response = client.get(path + joiner + fine)
            assert response.status_code == 200, (path, fine, response.text[-600:])


def triage(client: TestClient, issue_id: int, **fields: str) -> Any:
    return client.post(
        f"/dashboard/issues/{issue_id}/status", data={"csrf": session_csrf(client), **fields}
    )


def status_of(client: TestClient, issue_id: int) -> tuple[str, list[str]]:
    html = client.get(f"/dashboard/issues/{issue_id}").text
    found = re.search(r"<span [^>]*data-status>([^<]*)<", html)
    assert found is not None
    history = re.search(r"<ol data-history>(.*?)</ol>", html, re.S)
    assert history is not None
    return found.group(1), re.findall(r"<li>(.*?)</li>", history.group(1), re.S)


def test_triage_through_the_forms(client: TestClient) -> None:
    post_reports(client, [crash_report(age=next(_AGES))])
    (issue_id,) = issue_ids(client.get("/dashboard/issues").text)
    page = client.get(f"/dashboard/issues/{issue_id}").text
    for action in ("resolve", "resolve_in_release", "ignore", "reopen"):
        assert f'<button name="action" value="{action}"' in page
    assert status_of(client, issue_id) == ("unresolved", [])
    assert 'data-badge="new"' in client.get("/dashboard/").text

    answer = triage(client, issue_id, action="resolve")
    assert answer.status_code == 303
    assert answer.headers["location"] == f"/dashboard/issues/{issue_id}"
    status, history = status_of(client, issue_id)
    assert status == "resolved"
    assert len(history) == 1 and "dashboard: unresolved → resolved" in history[0]
    assert issue_ids(client.get("/dashboard/issues?status=resolved").text) == [issue_id]
    # The overview read a moment ago shows the decision too.
    assert 'data-badge="resolved"' in client.get("/dashboard/").text

    triage(client, issue_id, action="resolve_in_release", release=f"2.0{XSS}")
    status, history = status_of(client, issue_id)
    assert status == "resolved" and "in release 2.0&lt;script&gt;" in history[-1]
    triage(client, issue_id, action="ignore")
    assert status_of(client, issue_id)[0] == "ignored"
    triage(client, issue_id, action="reopen")
    status, history = status_of(client, issue_id)
    assert status == "unresolved" and len(history) == 4

    assert triage(client, issue_id, action="delete").status_code == 400
    assert triage(client, issue_id, action="resolve_in_release", release=" ").status_code == 400
    assert triage(client, 999_999, action="resolve").status_code == 404
    assert len(status_of(client, issue_id)[1]) == 4


def test_filters_live_in_the_url(client: TestClient) -> None:
    ids = populate(client)
    native = ids["native"]
    assert issue_ids(client.get("/dashboard/issues?kind=native").text) == [native]
    crash_only = issue_ids(client.get("/dashboard/issues?kind=crash").text)
    assert crash_only and native not in crash_only
    assert issue_ids(client.get("/dashboard/issues?release=1.1").text) == crash_only
    assert issue_ids(client.get("/dashboard/issues?release=9.9").text) == []
    # The filter form shows what the URL asked for, and the window links keep the filters.
    html = client.get("/dashboard/issues?kind=crash&release=1.1&window=7d").text
    assert "<option selected>crash</option>" in html
    assert 'name="release" value="1.1"' in html
    assert "kind=crash&amp;release=1.1&amp;window=30d" in html
    # Reports by type, and native crashes in the same explorer.
    csp = client.get("/dashboard/reports?type=csp-violation").text
    assert csp.count("<tr data-report=") == 1
    natives = client.get("/dashboard/reports?type=native").text
    assert f'data-crash="{ids["crash"]}"' in natives


def test_issue_pages_of_every_size_page_on(client: TestClient) -> None:
    # More issues than one page holds: the next link carries the filters and the rank.
    reports = [
        crash_report(url=f"https://shop{n}.example/page", age=next(_AGES)) for n in range(55)
    ]
    assert post_reports(client, reports).status_code == 200
    first = client.get("/dashboard/issues?sort=last_seen").text
    assert len(issue_ids(first)) == 50
    following = re.search(r'href="([^"]+)" rel="next"', first)
    assert following is not None
    second = client.get(following.group(1).replace("&amp;", "&")).text
    assert len(issue_ids(second)) == 5
    assert not set(issue_ids(first)) & set(issue_ids(second))
    assert '<td class="n">51</td>' in second


def native_tab(html: str) -> tuple[str, int]:
    """The native tab of the reports page: where it leads, and the count it shows."""
    found = re.search(
        r'<a href="([^"]*type=native[^"]*)"[^>]*>native <small>([\d,]+)</small>', html
    )
    assert found is not None, html
    return found.group(1).replace("&amp;", "&"), int(found.group(2).replace(",", ""))


def test_the_native_tab_keeps_the_filters_the_crash_list_takes(client: TestClient) -> None:
    ids = populate(client)
    crash = client.get(f"/api/crashes/{ids['crash']}", headers=API_HEADERS).json()
    assert crash["os"]
    report_only = "site=https://example.com&origin=https://shop.example.com&browser=Chrome"
    cases = [
        (f"/dashboard/reports?{report_only}&browser_major=120&reason=oom&user_agent=x", 1),
        (f"/dashboard/reports?type=crash&os={crash['os']}&window=7d", 1),
        ("/dashboard/reports?os=NoSuchOS", 0),
    ]
    for url, expected in cases:
        target, count = native_tab(client.get(url).text)
        crashes = client.get(target)
        assert crashes.status_code == 200, (url, target, crashes.text[-600:])
        shown = len(re.findall(r'<tr data-crash="', crashes.text))
        assert count == shown == expected, (url, target, count, shown)
    target, _ = native_tab(client.get("/dashboard/reports?window=7d&os=NoSuchOS").text)
    assert "window=7d" in target and "os=NoSuchOS" in target and "site=" not in target


def test_native_crash_pages_and_the_minidump(client: TestClient) -> None:
    ids = populate(client)
    issue = client.get(f"/dashboard/issues/{ids['native']}").text
    assert "Latest crash" in issue and f"/dashboard/crashes/{ids['crash']}" in issue
    crash = client.get(f"/dashboard/crashes/{ids['crash']}").text
    assert "exception name" in crash and "crash address hex" in crash
    download = client.get(f"/dashboard/crashes/{ids['crash']}/minidump")
    assert download.status_code == 200
    assert download.headers["content-type"] == "application/octet-stream"
    assert download.content[:4] == b"MDMP"
    missing = client.get("/dashboard/crashes/" + "f" * 32 + "/minidump")
    assert missing.status_code == 404 and 'data-code="crash_not_found"' in missing.text


def test_the_issue_page_of_a_crash_without_an_offset_or_address(client: TestClient) -> None:
    # A null read's dump names no crashing module offset (and the parse may leave the address
    # unset): the page shows dashes rather than failing on the missing keys.
    body = dump_upload((MINIDUMPS / "linux-x64_breakpad_linux_null_read_av.dmp").read_bytes())
    uploaded = client.post("/crashpad", content=body, headers={"content-type": content_type()})
    assert uploaded.status_code == 200
    analyzer = client.app.state.analyzer  # type: ignore[attr-defined]
    client.portal.call(analyzer.idle)  # type: ignore[union-attr]
    crash = client.get(f"/api/crashes/{uploaded.text}", headers=API_HEADERS).json()
    assert crash.get("crash_offset_hex") is None  # the case this test is about
    native = issue_ids(client.get("/dashboard/issues?kind=native").text)
    assert native
    page = client.get(f"/dashboard/issues/{native[0]}")
    assert page.status_code == 200, page.text
    assert "Latest crash" in page.text


def test_the_setup_page_gives_headers_and_says_whether_a_site_reported(
    client: TestClient,
) -> None:
    waiting = client.get("/dashboard/setup?url=https://www.shop.example.com/checkout").text
    assert 'data-site-status="waiting"' in waiting
    for label, text in (("HTTP", "Reporting-Endpoints: default="), ("nginx", "add_header"),
                        ("Caddy", "header {"), ("Apache", "Header always set")):  # fmt: skip
        assert f"<h2>{label}</h2>" in waiting and text in waiting
    assert "https://testserver/reports" in waiting
    assert 'data-copy="headers-nginx" hidden' in waiting
    assert '<script src="/dashboard/static/copy.js" defer></script>' in waiting
    post_reports(client, [crash_report(url="https://shop.example.com/cart", age=next(_AGES))])
    seen = client.get("/dashboard/setup?url=https://www.shop.example.com/checkout").text
    assert 'data-site-status="seen"' in seen and "https://example.com" in seen
    bad = client.get("/dashboard/setup?url=not a url").text
    assert 'data-code="setup_problem"' in bad


@pytest.mark.parametrize(
    ("changes", "warnings"),
    [
        ({"cors_allow_origins": ("*",)}, []),
        ({"cors_allow_origins": ("https://other.example", "*")}, []),
        ({"cors_allow_origins": ("https://shop.example.com/",)}, []),
        ({"cors_allow_origins": ("https://other.example",)}, ["origin_not_allowed"]),
        ({"allowed_sites": ("https://www.example.com",)}, []),
        ({"allowed_sites": ("other.example",)}, ["site_not_allowed"]),
    ],
)
def test_the_setup_page_warns_of_what_the_ingest_would_refuse(
    database_url: str, tmp_path: Path, changes: dict[str, Any], warnings: list[str]
) -> None:
    # The page asks the middleware's and the intake's own questions: ``*`` lets any origin,
    # a trailing slash is no difference, and the allow-list is of registrable domains.
    settings = dashboard_settings(database_url, tmp_path, **changes)
    with dashboard_client(settings) as client:
        login(client)
        page = client.get("/dashboard/setup?url=https://shop.example.com/cart").text
    codes = re.findall(r'data-code="([^"]+)"', page)
    assert codes == warnings, page


def test_the_dashboard_reports_to_the_service_itself(client: TestClient) -> None:
    endpoint = client.get("/dashboard/").headers["reporting-endpoints"]
    url = re.search(r'default="([^"]+)"', endpoint)
    assert url is not None
    violation = {
        "type": "csp-violation",
        "age": 5,
        "url": "https://testserver/dashboard/",
        "user_agent": CHROME_UA,
        "body": {"documentURL": "https://testserver/dashboard/", "blockedURL": "inline",
                 "effectiveDirective": "script-src-elem", "disposition": "enforce",
                 "originalPolicy": "default-src 'none'", "statusCode": 200},
    }  # fmt: skip
    sent = client.post(
        urlsplit(url.group(1)).path,
        content=json.dumps([violation]).encode(),
        headers={"content-type": "application/reports+json"},
    )
    assert sent.status_code == 200 and sent.json()["accepted"] == 1
    listed = client.get("/dashboard/reports?type=csp-violation").text
    assert "https://testserver/dashboard/" in listed


def test_static_assets(client: TestClient) -> None:
    css = client.get("/dashboard/static/dashboard.css")
    js = client.get("/dashboard/static/copy.js")
    assert css.status_code == js.status_code == 200
    assert css.headers["content-type"].startswith("text/css")
    assert "javascript" in js.headers["content-type"]
    assert_policy(css)


def test_new_issues_are_those_first_seen_in_the_window(client: TestClient) -> None:
    post_reports(client, [crash_report(age=next(_AGES))])
    storage = client.app.state.storage  # type: ignore[attr-defined]
    now = int(datetime.now(UTC).timestamp() * 1000)

    def listed(first_seen_since: int) -> list[int]:
        filters = IssueFilters(since=now - 3_600_000, first_seen_since=first_seen_since)
        page = client.portal.call(  # type: ignore[union-attr]
            storage.issues_page, filters, "first_seen", 10
        )
        return [int(item["id"]) for item in page.items]

    (issue_id,) = listed(now - 3_600_000)
    assert listed(now + 3_600_000) == []
    overview = client.get("/dashboard/").text
    new = overview[overview.index("<h2>New issues</h2>") : overview.index("<h2>Regressed")]
    assert f'data-issue="{issue_id}"' in new


def test_the_overview_is_read_again_after_its_minute(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reporting_endpoint.dashboard import views

    def top_sites() -> str:
        html = client.get("/dashboard/").text
        return html[html.index("<h2>Top sites</h2>") : html.index("<h2>Browsers</h2>")]

    post_reports(client, [crash_report(url="https://one.example/a", age=next(_AGES))])
    assert "https://one.example" in top_sites()
    post_reports(client, [crash_report(url="https://two.example/b", age=next(_AGES))])
    # Within the minute the top sites are the ones read a moment ago.
    assert "https://two.example" not in top_sites()
    # Past it, a view gets those still, and has them read again for the next ones.
    monkeypatch.setattr(views, "OVERVIEW_TTL", 0.0)
    deadline = time.monotonic() + 10
    while "https://two.example" not in top_sites():
        assert time.monotonic() < deadline, "the top sites were never read again"
        time.sleep(0.05)
