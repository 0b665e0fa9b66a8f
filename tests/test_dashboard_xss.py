"""The XSS corpus in real headless Chromium: on every dashboard page that shows it, no payload
runs (with the CSP and without it), no markup of it becomes live, and it reads as plain text."""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.browser import Chromium
from tests.dashboard_driver import (
    ARTIFACTS,
    CHROMIUM,
    CHROMIUM_MARKS,
    DESKTOP,
    FIND_ACTIVE_MARKUP,
    READ_TOKEN,
    SERVICE_ENV,
    WRITE_TOKEN,
    DashboardTab,
    api,
    dashboard_tab,
    dashboard_violation_reports,
)
from tests.servers import RunningServer, TlsCertificate, make_certificate, running_service
from tests.xss_corpus import FLAG, PAYLOADS, Stored, store_corpus

pytestmark = CHROMIUM_MARKS

SCRIPT = PAYLOADS[0]
SVG = '"><svg onload=window.__xss=3>'
NOT_FOUND = ("issues", "reports", "crashes")
# Payloads where the page refuses the value (400/404): the error page must not reflect them
# live either. The browser logs the refusal itself as a failed load, which is expected here.
REFUSED = [
    "/dashboard/issues?"
    + urllib.parse.urlencode({"status": SCRIPT, "sort": SVG, "after": SVG, "since": SVG}),
    "/dashboard/?" + urllib.parse.urlencode({"window": SCRIPT}),
    *(f"/dashboard/{page}/{urllib.parse.quote(SVG, safe='')}" for page in NOT_FOUND),
]
READ_FLAG = f"typeof window.{FLAG} === 'undefined' ? null : String(window.{FLAG})"


@dataclass(frozen=True)
class Corpus:
    server: RunningServer
    stored: Stored
    paths: list[str]


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> TlsCertificate:
    return make_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def corpus(
    tmp_path_factory: pytest.TempPathFactory, certificate: TlsCertificate
) -> Iterator[Corpus]:
    db = tmp_path_factory.mktemp("xss") / "reports.sqlite3"
    env = {
        **SERVICE_ENV,
        # Query strings and the body's release are kept, so they carry payloads too.
        "REPORTING_ENDPOINT_KEEP_URL_QUERY": "1",
        "REPORTING_ENDPOINT_RELEASE_SOURCE": "body:release",
    }
    with running_service(db, certificate, env=env) as server:
        stored = store_corpus(server.url, certificate.client_context())
        yield Corpus(server, stored, dashboard_paths(server, certificate, stored))


def dashboard_paths(
    server: RunningServer, certificate: TlsCertificate, stored: Stored
) -> list[str]:
    """Every page the corpus shows on: lists, every issue, report and crash, the quarantine,
    and payloads reflected from the query string into filters, the set-up page and login."""
    deadline = time.monotonic() + 20
    issues: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        issues = api(server, certificate, "/api/issues?limit=200")["issues"]
        if sum(1 for issue in issues if issue["kind"] == "native") >= 1:
            break
        time.sleep(0.1)
    reports = api(server, certificate, "/api/reports?limit=200")["reports"]
    kinds = sorted({str(issue["kind"]) for issue in issues})

    def query(**params: str) -> str:
        return urllib.parse.urlencode(params)

    paths = [
        "/dashboard/",
        "/dashboard/?window=30d",
        "/dashboard/issues",
        "/dashboard/issues?sort=first_seen",
        *(f"/dashboard/issues?{query(kind=kind)}" for kind in kinds),
        *(f"/dashboard/issues/{issue['id']}" for issue in issues),
        "/dashboard/reports",
        *(f"/dashboard/reports?{query(type=kind)}" for kind in kinds if kind != "native"),
        *(f"/dashboard/reports/{report['id']}" for report in reports),
        *(f"/dashboard/crashes/{crash}" for crash in stored.crash_ids),
        "/dashboard/quarantine",
        f"/dashboard/issues?{query(site=SCRIPT, release=SVG, browser=PAYLOADS[1], os=SVG)}",
        f"/dashboard/reports?{query(site=SCRIPT, browser=SVG, user_agent=PAYLOADS[1])}",
        f"/dashboard/setup?{query(url='https://xss.example/' + SCRIPT)}",
        f"/dashboard/setup?{query(url='javascript:window.__xss=7')}",
        f"/dashboard/login?{query(next=SVG)}",
        *REFUSED,
    ]
    return paths


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


@dataclass
class Visit:
    path: str
    flag: str | None
    active: list[str]
    text: str


def visit_all(tab: DashboardTab, base: str, paths: list[str]) -> list[Visit]:
    visits = []
    for path in paths:
        tab.goto(base + path)
        # A payload that ran on load, or on a timer it set, has run by now.
        tab.settle(0.05)
        visits.append(
            Visit(path, tab.evaluate(READ_FLAG), tab.evaluate(FIND_ACTIVE_MARKUP), tab.text())
        )
    return visits


def test_the_corpus_went_in(corpus: Corpus) -> None:
    """Every payload carrier was stored: reports, quarantined reports, crashes with issues."""
    assert corpus.stored.accepted >= 20
    assert corpus.stored.quarantined == 7
    assert len(corpus.stored.crash_ids) == 2
    assert sum("/dashboard/issues/" in p for p in corpus.paths) >= 20


def test_no_payload_runs_and_every_one_reads_as_text(corpus: Corpus, chromium: Chromium) -> None:
    base = corpus.server.url
    before = len(dashboard_violation_reports(corpus.server))
    with dashboard_tab(chromium) as tab:
        tab.login(base, READ_TOKEN, WRITE_TOKEN)
        visits = visit_all(tab, base, corpus.paths)
        tab.viewport(*DESKTOP)
        for name in ("issues", "quarantine"):
            tab.goto(f"{base}/dashboard/{name}")
            tab.screenshot(ARTIFACTS / f"xss-{name}-{DESKTOP[0]}.png")
        tab.settle(1.0)
        refusals = {base + path for path in REFUSED}
        problems = [p for p in tab.problems() if not (p.kind == "network" and p.url in refusals)]
    assert [(v.path, v.flag) for v in visits if v.flag is not None] == []
    assert [(v.path, v.active) for v in visits if v.active] == []
    # Not a CSP block either: a violation would mean markup from the corpus became live.
    assert problems == [], "\n".join(map(str, problems))
    assert len(dashboard_violation_reports(corpus.server)) == before
    every_text = "\n".join(v.text for v in visits)
    assert [p for p in PAYLOADS if p.strip() not in every_text] == []
    # Shown once escaped, as typed: never escaped twice.
    assert "&lt;" not in every_text and "&amp;" not in every_text and "&quot;" not in every_text
    # Pages that show stored data show the payloads in it (the lists, details, quarantine).
    dark = [v.path for v in visits if shows_stored_data(v.path) and "window.__xss" not in v.text]
    assert dark == []


def shows_stored_data(path: str) -> bool:
    """Not a filtered list (may be empty), the set-up or login page, or a page not found."""
    unknown = any(path.startswith(f"/dashboard/{page}/%22") for page in NOT_FOUND)
    return "?" not in path and "/setup" not in path and "/login" not in path and not unknown


def test_without_the_csp_escaping_alone_keeps_every_payload_inert(
    corpus: Corpus, chromium: Chromium
) -> None:
    """With the page's CSP switched off in the browser, only the templates' escaping stands
    between a payload and running: still nothing runs and nothing becomes live markup."""
    base = corpus.server.url
    with dashboard_tab(chromium, bypass_csp=True) as tab:
        tab.login(base, READ_TOKEN, WRITE_TOKEN)
        visits = visit_all(tab, base, corpus.paths)
    assert [(v.path, v.flag) for v in visits if v.flag is not None] == []
    assert [(v.path, v.active) for v in visits if v.active] == []


@pytest.mark.parametrize("bypass_csp", [False, True], ids=["with-csp", "without-csp"])
def test_the_checks_see_a_payload_that_gets_in(
    corpus: Corpus, chromium: Chromium, bypass_csp: bool
) -> None:
    """The control: markup that does reach a page is caught by the checks above, as a live
    handler, and either as a run payload (no CSP) or as a CSP violation (with it)."""
    base = corpus.server.url
    with dashboard_tab(chromium, bypass_csp=bypass_csp) as tab:
        tab.login(base, READ_TOKEN)
        tab.evaluate(
            f"document.querySelector('main').insertAdjacentHTML('beforeend', {PAYLOADS[1]!r})"
        )
        tab.settle(0.5)
        flag = tab.evaluate(READ_FLAG)
        active = tab.evaluate(FIND_ACTIVE_MARKUP)
        problems = tab.problems()
    assert active == ["IMG onerror"]
    if bypass_csp:
        assert flag == "2"
    else:
        assert flag is None
        assert any("Content Security Policy" in p.text for p in problems), problems
