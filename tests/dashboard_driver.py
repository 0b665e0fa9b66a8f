"""Drives the dashboard in real headless Chromium over DevTools: log in, visit, click, and keep
every console error, exception and CSP violation the pages cause."""

from __future__ import annotations

import base64
import itertools
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
from websockets.sync.client import ClientConnection

from tests.browser import Chromium, find_chromium
from tests.servers import RunningServer, TlsCertificate

CHROMIUM = find_chromium()
# Both dashboard browser modules: skipped, saying why, where Debian's chromium is missing.
CHROMIUM_MARKS = [
    pytest.mark.chromium,
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="Debian's chromium is not installed "
        "(the README's test command installs it when run as root)",
    ),
]

READ_TOKEN = "dashboard-read-token"
WRITE_TOKEN = "dashboard-write-token"
SERVICE_ENV = {
    "REPORTING_ENDPOINT_READ_TOKEN": READ_TOKEN,
    "REPORTING_ENDPOINT_WRITE_TOKEN": WRITE_TOKEN,
    "REPORTING_ENDPOINT_SECRET_KEY": "a-secret-key-for-the-dashboard-tests-0123456789",
}
# Kept after the run (the lead's .gitignore covers it): one PNG per page and width.
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "dashboard"
DESKTOP = (1280, 800)
PHONE = (390, 844)

# Every element and attribute a page would run or navigate to without a click, plus links to
# javascript: or data: URLs; none of the dashboard's own markup has any.
FIND_ACTIVE_MARKUP = """
(() => {
  const found = [];
  for (const el of document.querySelectorAll('*')) {
    if (el.tagName === 'SCRIPT' && !el.src) found.push('inline <script>');
    if (['IFRAME', 'OBJECT', 'EMBED', 'BASE'].includes(el.tagName)) found.push(el.tagName);
    for (const a of el.attributes) {
      if (a.name.startsWith('on')) found.push(el.tagName + ' ' + a.name);
      if (a.name === 'srcdoc' || a.name === 'style') found.push(el.tagName + ' ' + a.name);
      if (/(^|:)(href|src|action|formaction|data)$/.test(a.name)
          && /^\\s*(javascript|vbscript|data:text)/i.test(a.value))
        found.push(el.tagName + ' ' + a.name + '=' + a.value);
    }
  }
  return found;
})()
"""


@dataclass(frozen=True)
class Problem:
    """A console error, an uncaught exception or a CSP violation, with the page it was on."""

    url: str
    kind: str
    text: str


class DashboardTab:
    """One tab. Unlike tests.browser.Tab, events that arrive while waiting for an answer are
    kept, so no console error or violation slips by between two calls."""

    def __init__(self, websocket: ClientConnection) -> None:
        self.websocket = websocket
        self.ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []
        self.url = "about:blank"

    def _receive(self, deadline: float) -> dict[str, Any]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no answer from Chromium in time")
        message: dict[str, Any] = json.loads(self.websocket.recv(timeout=remaining))
        if "method" in message:
            self.events.append(message)
        return message

    def call(self, method: str, timeout: float = 20, **params: Any) -> dict[str, Any]:
        call_id = next(self.ids)
        self.websocket.send(json.dumps({"id": call_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = self._receive(deadline)
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return dict(message.get("result", {}))

    def wait_for(self, event: str, after: int, timeout: float = 20) -> dict[str, Any]:
        """The first ``event`` recorded at or after index ``after``."""
        deadline = time.monotonic() + timeout
        checked = after
        while True:
            for message in self.events[checked:]:
                if message["method"] == event:
                    return dict(message.get("params", {}))
            checked = len(self.events)
            self._receive(deadline)

    def settle(self, seconds: float) -> None:
        """Keep reading events for a while (late console messages, CSP reports)."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                self._receive(deadline)
            except TimeoutError:
                return

    def start(self, bypass_csp: bool = False) -> None:
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")
        if bypass_csp:
            # Only the escaping stands between a payload and running: proves the templates
            # escape, whatever the CSP would have blocked.
            self.call("Page.setBypassCSP", enabled=True)

    def viewport(self, width: int, height: int) -> None:
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=width < 600,
        )

    def _after(self, action: Callable[[], object], timeout: float) -> None:
        mark = len(self.events)
        action()
        self.wait_for("Page.loadEventFired", mark, timeout)
        self.url = str(self.evaluate("location.href"))

    def goto(self, url: str, timeout: float = 20) -> None:
        self._after(lambda: self.call("Page.navigate", url=url), timeout)

    def click(self, selector: str, timeout: float = 20) -> None:
        """Click what ``selector`` finds and wait for the page the click loads."""
        script = f"document.querySelector({json.dumps(selector)}).click()"
        self._after(lambda: self.evaluate(script), timeout)

    def fill(self, selector: str, value: str) -> None:
        self.evaluate(f"document.querySelector({json.dumps(selector)}).value = {json.dumps(value)}")

    def evaluate(self, expression: str) -> Any:
        answer = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in answer:
            raise RuntimeError(f"{expression[:80]}: {answer['exceptionDetails']}")
        return answer.get("result", {}).get("value")

    def page(self) -> str | None:
        """The data-page of the <main> element: which dashboard page this is."""
        value = self.evaluate("document.querySelector('main')?.dataset.page ?? null")
        return None if value is None else str(value)

    def text(self) -> str:
        return str(self.evaluate("document.body.innerText"))

    def screenshot(self, path: Path, max_height: int = 6000) -> Path:
        """The whole page (up to ``max_height`` CSS pixels) at the current viewport width."""
        metrics = self.call("Page.getLayoutMetrics")
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        clip = {
            "x": 0,
            "y": 0,
            "width": size["width"],
            "height": min(size["height"], max_height),
            "scale": 1,
        }
        shot = self.call(
            "Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def problems(self) -> list[Problem]:
        """Console errors, uncaught exceptions and CSP violations seen so far."""
        found = []
        for event in self.events:
            params = event.get("params", {})
            method = event["method"]
            if method == "Log.entryAdded" and params["entry"]["level"] == "error":
                entry = params["entry"]
                found.append(Problem(entry.get("url", ""), entry["source"], entry["text"]))
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                text = " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
                found.append(Problem("", f"console.{params['type']}", text))
            elif method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                text = details.get("exception", {}).get("description") or details["text"]
                found.append(Problem(details.get("url", ""), "exception", text))
        return found

    def login(self, base: str, token: str, write_token: str | None = None) -> None:
        """Through the form, as a person would: open the dashboard, be sent to the login page,
        type the tokens, press the button. Starts from no session (tabs share cookies)."""
        self.call("Network.clearBrowserCookies")
        self.goto(f"{base}/dashboard/")
        assert self.page() == "login", f"not sent to the login page: {self.url}"
        self.fill("input[name=token]", token)
        if write_token is not None:
            self.fill("input[name=write_token]", write_token)
        self.click("main form button[type=submit], main form button:not([type])")
        assert self.page() == "overview", f"login did not lead to the overview: {self.url}"


@contextmanager
def dashboard_tab(chromium: Chromium, bypass_csp: bool = False) -> Iterator[DashboardTab]:
    with chromium.new_tab() as tab:
        page = DashboardTab(tab.websocket)
        page.start(bypass_csp)
        yield page


def api(server: RunningServer, certificate: TlsCertificate, path: str) -> Any:
    """GET from the read API with the read token (to find ids to open pages by)."""
    answer = httpx2.get(
        f"{server.url}{path}",
        headers={"authorization": f"Bearer {READ_TOKEN}"},
        verify=certificate.client_context(),
        timeout=10,
    )
    answer.raise_for_status()
    return answer.json()


def dashboard_violation_reports(server: RunningServer) -> list[dict[str, Any]]:
    """csp-violation reports the browser sent about dashboard pages (they report to this
    service: Reporting-Endpoints and the CSP's report-to)."""
    import sqlite3

    if not server.db.exists():
        return []
    connection = sqlite3.connect(f"file:{server.db}?mode=ro", uri=True)
    connection.row_factory = sqlite3.Row
    try:
        rows = connection.execute(
            "SELECT url, raw FROM reports WHERE type = 'csp-violation' AND url LIKE ?",
            (f"{server.url}/dashboard%",),
        )
        return [dict(row) for row in rows]
    finally:
        connection.close()
