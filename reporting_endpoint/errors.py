"""Rejections with stable reason codes, and the one JSON error shape they are sent in."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

log = logging.getLogger("reporting_endpoint.errors")

# Reason codes for HTTP statuses Starlette itself raises (routing, methods).
_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
}


# Sent with every 503: the store is down or busy for a while, not for good.
RETRY_LATER = {"Retry-After": "5"}


class RequestRejected(Exception):
    """A request the service refuses; ``code`` is stable and safe to match on."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> Response:
    """The single error shape: ``{"error": {"code": ..., "message": ...}}``."""
    body = orjson.dumps({"error": {"code": code, "message": message}})
    return Response(body, status_code=status, headers=headers, media_type="application/json")


async def rejected_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestRejected)
    return error_response(exc.status, exc.code, exc.message, exc.headers)


async def http_exception_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _STATUS_CODES.get(exc.status_code, f"http_{exc.status_code}")
    return error_response(exc.status_code, code, str(exc.detail), exc.headers)


async def internal_error_handler(request: Request, exc: Exception) -> Response:
    """Anything unexpected still answers in the one shape, and tells the client nothing about
    the inside (no traceback, no SQL); the log has the details.

    Starlette hands the ``Exception`` handler to its outermost ServerErrorMiddleware, which
    re-raises after sending this, so the server logs the traceback as well.
    """
    name = type(exc).__name__
    if exc.__cause__ is not None:
        # A storage failure names the driver's error it wraps (OperationalError, ...).
        name += f" ({type(exc.__cause__).__name__})"
    log.error("unexpected error on %s %r: %s", request.method, request.url.path, name)
    return error_response(500, "internal_error", "the service hit an unexpected error")


EXCEPTION_HANDLERS = {
    RequestRejected: rejected_handler,
    HTTPException: http_exception_handler,
    Exception: internal_error_handler,
}
