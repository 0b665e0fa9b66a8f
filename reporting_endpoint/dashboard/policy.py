"""What every dashboard answer carries: a strict Content-Security-Policy and the reporting
headers pointing at this service (so a violation or a crash of the dashboard lands in it),
and refusals as HTML pages with a reason code."""

from __future__ import annotations

import functools

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reporting_endpoint.dashboard.render import Refusal, error_page
from reporting_endpoint.errors import RETRY_LATER, RequestRejected
from reporting_endpoint.headers import HeaderError, HeaderOptions, reporting_endpoints
from reporting_endpoint.storage.base import StorageError

# Where the dashboard is mounted below the service (its /reports is one level up).
MOUNT = "/dashboard"
CSP = (
    "default-src 'none'; style-src 'self'; img-src 'self' data:; script-src 'self';"
    " form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
# Sent with every dashboard answer: pages hold data from the internet and must not be cached
# by a shared proxy, framed, sniffed into another type or leak their URL (filters) elsewhere.
FIXED = (
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
)
_STATUS_CODES = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}


@functools.lru_cache(maxsize=64)
def _reporting(scheme: str, host: str, root: str) -> tuple[bytes, bytes] | None:
    """(Content-Security-Policy, Reporting-Endpoints) for a dashboard at ``root`` on
    ``scheme://host``; None when that makes no endpoint URL a browser takes (an odd Host)."""
    base = root.removesuffix(MOUNT)
    try:
        # http too: a browser delivers to a local http:// endpoint (localhost is trustworthy).
        options = HeaderOptions(f"{scheme}://{host}{base}/reports", allow_insecure=True)
        endpoints = reporting_endpoints(options)
    except HeaderError:
        return None
    return f"{CSP}; report-to default".encode(), endpoints.encode("latin-1")


def _host(scope: Scope) -> str:
    for key, value in scope.get("headers", []):
        if key == b"host":
            return bytes(value).decode("latin-1")
    server = scope.get("server")
    return f"{server[0]}:{server[1]}" if server else "localhost"


class DashboardHeaders:
    """Pure ASGI: adds the policy headers to every answer under the mount (pages, redirects,
    errors, assets); ``Cache-Control`` unless the answer set its own."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scheme, root = scope.get("scheme", "http"), scope.get("root_path", "")
        reporting = _reporting(scheme, _host(scope), root)
        # Pages hold data from the internet and are never stored; the two assets are the
        # same for everyone (still behind a session, so not in shared caches).
        static = scope["path"].startswith(root + "/static/")
        cache = b"private, max-age=3600" if static else b"no-store"

        async def send_with_policy(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {bytes(k).lower() for k, _ in headers}
                if reporting is None:
                    headers.append((b"content-security-policy", CSP.encode()))
                else:
                    headers.append((b"content-security-policy", reporting[0]))
                    headers.append((b"reporting-endpoints", reporting[1]))
                headers.extend(FIXED)
                if b"cache-control" not in present:
                    headers.append((b"cache-control", cache))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_policy)


class ErrorPages:
    """Pure ASGI: a refusal raised before the answer started becomes an HTML page with its
    reason code (``data-code``), in the dashboard's layout; a store that is down is a 503."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        headers: dict[str, str] = {}
        try:
            await self.app(scope, receive, tracking_send)
            return
        except Refusal as exc:
            status, code, message = exc.status, exc.code, exc.message
        except RequestRejected as exc:
            status, code, message = exc.status, exc.code, exc.message
        except HTTPException as exc:
            status = exc.status_code
            code = _STATUS_CODES.get(status, f"http_{status}")
            message = str(exc.detail)
        except StorageError as exc:
            status, code = 503, exc.code
            message = "the report store is not available; try again in a moment"
            headers = RETRY_LATER
        if started:
            raise RuntimeError(f"refused after the answer started: {code}")
        response = error_page(Request(scope), status, code, message)
        response.headers.update(headers)
        await response(scope, receive, send)
