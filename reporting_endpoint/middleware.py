"""Pure ASGI middleware for the ingest routes: body size and body time limits, and CORS."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reporting_endpoint import metrics
from reporting_endpoint.errors import RequestRejected, error_response

Responder = Callable[[RequestRejected], Response]


def json_rejection(exc: RequestRejected) -> Response:
    return error_response(exc.status, exc.code, exc.message, exc.headers)


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


class BodyLimitMiddleware:
    """Refuses a body over ``max_bytes``: at once from Content-Length, else while it streams.

    A streamed overflow surfaces as ``RequestRejected(413)`` from ``receive`` in the handler,
    which answers in its own format; a declared overflow is answered here by ``respond``.
    A refusal made here is counted under ``endpoint`` (None: not counted, for routes that are
    not ingest), with ``too_large`` as the reason code of an overflow: the code the answer
    names, so the count and the answer agree (Crashpad's is ``too_large``).
    """

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        respond: Responder = json_rejection,
        endpoint: metrics.Endpoint | None = "reports",
        too_large: str = "body_too_large",
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.respond = respond
        self.endpoint = endpoint
        self.too_large = too_large

    def _count(self, code: str) -> None:
        if self.endpoint is not None:
            metrics.request_rejected(self.endpoint, code)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not declared.isdigit():
                problem = RequestRejected(
                    400, "bad_content_length", "Content-Length is not a number"
                )
                self._count(problem.code)
                await self.respond(problem)(scope, receive, send)
                return
            if int(declared) > limit:
                problem = RequestRejected(
                    413, self.too_large, f"the body is larger than {limit} bytes"
                )
                self._count(problem.code)
                await self.respond(problem)(scope, receive, send)
                return

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise RequestRejected(
                        413, self.too_large, f"the body is larger than {limit} bytes"
                    )
            return message

        await self.app(scope, limited_receive, send)


def origin_list(entries: Iterable[str]) -> frozenset[str]:
    """``cors_allow_origins`` as CORSMiddleware compares them: without a trailing ``/``."""
    return frozenset(entry.rstrip("/") for entry in entries)


def origin_allowed(origin: str, allowed: frozenset[str]) -> bool:
    """Whether CORSMiddleware lets ``origin`` send reports, under an ``origin_list``: an
    empty list or ``*`` lets every origin. The set-up page asks the same question, so what it
    warns about is what the middleware refuses."""
    return not allowed or "*" in allowed or origin in allowed


class CORSMiddleware:
    """CORS for a reporting endpoint, as Chromium's Reporting API needs it.

    Chromium preflights a cross-origin endpoint and sends the report only if the answer is 2xx,
    allows the origin and allows ``content-type``. With an allow-list, other origins are refused
    outright (preflight and POST), so a report from an unlisted page is never stored.
    """

    def __init__(
        self,
        app: ASGIApp,
        allow_origins: Iterable[str] = (),
        max_age: int = 86400,
        allow_methods: str = "POST, OPTIONS",
    ) -> None:
        self.app = app
        self.allow_origins = origin_list(allow_origins)
        self.any_origin = not self.allow_origins or "*" in self.allow_origins
        self.max_age = str(max_age)
        self.allow_methods = allow_methods

    def _allow_origin(self, origin: bytes | None) -> bytes | None:
        if self.any_origin:
            return b"*"
        if origin is not None and origin_allowed(origin.decode("latin-1"), self.allow_origins):
            return origin
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        origin = _header(scope, b"origin")
        allowed = self._allow_origin(origin)
        if scope["method"] == "OPTIONS":
            await self._preflight(origin, allowed)(scope, receive, send)
            return
        if origin is not None and allowed is None:
            metrics.request_rejected("reports", "origin_not_allowed")
            refused = error_response(
                403, "origin_not_allowed", "this origin may not send reports here"
            )
            await refused(scope, receive, send)
            return
        extra: list[tuple[bytes, bytes]] = []
        if allowed is not None:
            extra.append((b"access-control-allow-origin", allowed))
        if not self.any_origin:
            extra.append((b"vary", b"Origin"))

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_cors)

    def _preflight(self, origin: bytes | None, allowed: bytes | None) -> Response:
        if origin is not None and allowed is None:
            return error_response(
                403, "origin_not_allowed", "this origin may not send reports here"
            )
        headers = {
            "Access-Control-Allow-Origin": (allowed or b"*").decode("latin-1"),
            "Access-Control-Allow-Methods": self.allow_methods,
            # Chromium asks for exactly this one; "*" would not cover credentialed requests.
            "Access-Control-Allow-Headers": "content-type",
            "Access-Control-Max-Age": self.max_age,
            "Allow": self.allow_methods,
        }
        if not self.any_origin:
            headers["Vary"] = "Origin"
        return Response(status_code=204, headers=headers)


class BodyTimeoutMiddleware:
    """Answers 408 ``body_timeout`` when the next chunk of a request body is too long coming.

    A per-chunk deadline (like nginx's ``client_body_timeout``): a large dump on a slow link
    still arrives, a client that sends headers and then stalls does not hold the connection.
    The answer is sent from here, in the format of the endpoint (``respond_for`` picks it by
    path), with ``Connection: close``; the handler then sees ``http.disconnect`` and whatever
    it sends afterwards is dropped. Once the body is complete ``receive`` is passed through
    untouched, so waiting for a disconnect is not cut short.
    """

    def __init__(
        self,
        app: ASGIApp,
        timeout: float,
        respond_for: Callable[[str], Responder] | None = None,
    ) -> None:
        self.app = app
        self.timeout = timeout
        self.respond_for = respond_for or _respond_by_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_done = not _has_body(scope)
        response_started = False
        timed_out = False

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if timed_out:
                return  # the 408 was the answer
            if message["type"] == "http.response.start":
                response_started = True
                if not body_done:
                    # Answered before the body was read (415, 413, 401...): once the app is
                    # done no deadline watches the rest of the body, and a client dribbling it
                    # would hold the connection for ever. Close it after this answer.
                    message = {
                        **message,
                        "headers": [*message.get("headers", []), (b"connection", b"close")],
                    }
            await send(message)

        async def timed_receive() -> Message:
            nonlocal body_done, timed_out
            if timed_out:
                return {"type": "http.disconnect"}
            if body_done:
                return await receive()
            try:
                # asyncio.timeout, not wait_for: no task per chunk on the ingest hot path.
                async with asyncio.timeout(self.timeout):
                    message = await receive()
            except TimeoutError:
                if not response_started:
                    problem = RequestRejected(
                        408,
                        "body_timeout",
                        f"no part of the body arrived for {self.timeout:g} seconds",
                        {"Connection": "close"},
                    )
                    await self.respond_for(scope["path"])(problem)(scope, receive, send)
                timed_out = True
                return {"type": "http.disconnect"}
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        try:
            await self.app(scope, timed_receive, guarded_send)
        except Exception:
            if not timed_out:
                raise
            # The client was already answered; a handler failing on the cut body is moot.


def _has_body(scope: Scope) -> bool:
    for name, value in scope["headers"]:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
            return True
    return False


def _respond_by_path(path: str) -> Responder:
    if path.rstrip("/").endswith("/crashpad"):
        from reporting_endpoint.crashpad import discarded

        return _with_close(discarded)
    return json_rejection


def _with_close(respond: Responder) -> Responder:
    def closing(exc: RequestRejected) -> Response:
        response = respond(exc)
        response.headers.update(exc.headers)
        return response

    return closing
