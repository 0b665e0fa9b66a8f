"""Real headless Chromium for end-to-end tests: a test page server and a DevTools driver."""

from __future__ import annotations

import itertools
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from websockets.sync.client import ClientConnection, connect

from reporting_endpoint.app import create_app
from reporting_endpoint.headers import HeaderOptions, build_headers
from reporting_endpoint.settings import Settings
from tests.servers import TlsCertificate, free_port

SCRIPTS = {
    "none": "",
    # Deprecation (UnloadHandler) and intervention (NavigatorVibrate), within ~0.1 s of load.
    "deprecation": "window.addEventListener('unload', () => {});"
    " if (navigator.vibrate) navigator.vibrate(100);",
    # Exhausts the V8 heap: the renderer dies with reason "oom".
    "oom": "setTimeout(() => { const keep = []; while (true) {"
    " keep.push(new Array(1e6).fill(Math.random())); } }, 50);",
}


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def page_app(endpoint: str) -> Starlette:
    """Pages whose headers name ``endpoint``; ``?ep=`` picks which headers, ``?js=`` a script."""

    async def page(request: Request) -> Response:
        mode = request.query_params.get("ep", "both")
        script = SCRIPTS[request.query_params.get("js", "none")]
        options = HeaderOptions(url=endpoint, crash_reporting=(mode == "both"))
        headers = build_headers(options)
        if mode == "report-to":
            headers = {"Report-To": headers["Report-To"]}
        html = f"<!doctype html><title>crash me</title><p>{mode}</p><script>{script}</script>"
        return HTMLResponse(html, headers=headers)

    return Starlette(routes=[Route("/page", page)])


@contextmanager
def page_server(
    certificate: TlsCertificate, endpoint: str, port: int | None = None
) -> Iterator[str]:
    """An HTTPS origin of its own (another port than the service), in a thread."""
    port = port or free_port()
    with _threaded(page_app(endpoint), certificate, port, "off"):
        yield f"https://127.0.0.1:{port}"


@dataclass(frozen=True)
class Seen:
    """One request the service answered: what the browser sent, and the status it got."""

    method: str
    path: str
    origin: str | None
    status: int


class _Recorder:
    """Outermost ASGI layer: notes every request and its status, changes nothing."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.seen: list[Seen] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        origin = dict(scope["headers"]).get(b"origin")

        async def noting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.seen.append(
                    Seen(
                        scope["method"],
                        scope["path"],
                        origin.decode("latin-1") if origin is not None else None,
                        int(message["status"]),
                    )
                )
            await send(message)

        await self.app(scope, receive, noting_send)


@contextmanager
def recording_service(
    settings: Settings, certificate: TlsCertificate
) -> Iterator[tuple[str, list[Seen]]]:
    """The service over HTTPS in a thread; yields its URL and the requests it has answered, so
    a test can tell "the browser sent nothing" from "the service refused what it sent"."""
    recorder = _Recorder(create_app(settings))
    port = free_port()
    with _threaded(recorder, certificate, port, "on"):
        yield f"https://127.0.0.1:{port}", recorder.seen


@contextmanager
def _threaded(
    app: ASGIApp, certificate: TlsCertificate, port: int, lifespan: str
) -> Iterator[None]:
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        ssl_certfile=str(certificate.cert_file),
        ssl_keyfile=str(certificate.key_file),
        lifespan=lifespan,  # type: ignore[arg-type]
        # Chromium keeps its connection open; do not wait for it when the test is over.
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test page server did not start")
        time.sleep(0.02)
    try:
        yield
    finally:
        server.should_exit = True
        thread.join(timeout=15)


class Tab:
    """One page target over the DevTools protocol."""

    def __init__(self, websocket: ClientConnection) -> None:
        self.websocket = websocket
        self.ids = itertools.count(1)

    def call(self, method: str, timeout: float = 15, **params: Any) -> dict[str, Any]:
        call_id = next(self.ids)
        self.websocket.send(json.dumps({"id": call_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(
                self.websocket.recv(timeout=max(0.01, deadline - time.monotonic()))
            )
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return dict(message.get("result", {}))

    def send(self, method: str, **params: Any) -> None:
        """Fire and forget (Page.crash never answers: the renderer is gone)."""
        self.websocket.send(json.dumps({"id": next(self.ids), "method": method, "params": params}))

    def wait_for(self, event: str, timeout: float = 20) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {event} within {timeout}s")
            message = json.loads(self.websocket.recv(timeout=remaining))
            if message.get("method") == event:
                return dict(message.get("params", {}))

    def navigate_and_wait(self, url: str, timeout: float = 20) -> None:
        self.call("Page.enable")
        self.call("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired", timeout)


class Chromium:
    """Headless Chromium with a fresh profile, trusting only the test certificate."""

    def __init__(self, binary: str, profile: Path, certificate: TlsCertificate) -> None:
        self.profile = profile
        self.process = subprocess.Popen(
            [
                binary,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--mute-audio",
                # Deliver queued reports within ~0.1 s instead of once a minute.
                "--short-reporting-delay",
                # A small V8 heap: the out-of-memory page dies in seconds, not tens of them.
                "--js-flags=--max-old-space-size=256",
                f"--user-data-dir={profile}",
                "--remote-debugging-port=0",
                f"--ignore-certificate-errors-spki-list={certificate.spki_sha256_b64}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.devtools_port = self._wait_for_devtools()

    def _wait_for_devtools(self, timeout: float = 30) -> int:
        active = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.process.returncode}")
            if active.is_file():
                lines = active.read_text().split()
                if lines:
                    port = int(lines[0])
                    with socket.socket() as sock:
                        if sock.connect_ex(("127.0.0.1", port)) == 0:
                            return port
            time.sleep(0.05)
        raise TimeoutError("chromium's DevTools did not come up")

    @contextmanager
    def new_tab(self) -> Iterator[Tab]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.devtools_port}/json/new?about:blank", method="PUT"
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            target = json.loads(answer.read())
        with connect(target["webSocketDebuggerUrl"], max_size=None, open_timeout=10) as ws:
            yield Tab(ws)

    def user_agent(self) -> str:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.devtools_port}/json/version", timeout=10
        ) as answer:
            return str(json.loads(answer.read())["User-Agent"])

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
