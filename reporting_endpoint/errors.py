"""Rejections with stable reason codes, and the one JSON error shape they are sent in."""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

# Reason codes for HTTP statuses Starlette itself raises (routing, methods).
_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
}


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


EXCEPTION_HANDLERS = {
    RequestRejected: rejected_handler,
    HTTPException: http_exception_handler,
}
