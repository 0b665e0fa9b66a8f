"""Read-only JSON API under /api, behind a bearer token: groups, reports, time series."""

from __future__ import annotations

import hmac
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from reporting_endpoint.errors import RequestRejected, error_response
from reporting_endpoint.queries import (
    Filters,
    QueryError,
    group_rows,
    groups_query,
    parse_by,
    parse_limit,
    report_page,
    report_query,
    report_row_to_dict,
    reports_query,
    series_rows,
    timeseries_query,
)
from reporting_endpoint.storage.base import Storage, StorageError

_COMMON = {"type", "site", "origin", "browser", "browser_major", "os", "reason", "user_agent"}
ALLOWED_PARAMETERS = {
    "groups": _COMMON | {"by", "since", "until", "limit"},
    "reports": _COMMON | {"since", "until", "limit", "cursor"},
    "timeseries": _COMMON | {"by", "since", "until", "bucket"},
}


class BearerTokenMiddleware:
    """Lets a request through only with ``Authorization: Bearer <read_token>``.

    With no token configured the API is closed to everyone, and the error says how to open it.
    """

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token.encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        challenge = {"WWW-Authenticate": 'Bearer realm="reporting-endpoint"'}
        if self.token is None:
            response = error_response(
                401,
                "read_api_disabled",
                "the read API is off until a token is set: REPORTING_ENDPOINT_READ_TOKEN",
                challenge,
            )
            await response(scope, receive, send)
            return
        given = b""
        for key, value in scope["headers"]:
            if key == b"authorization":
                given = bytes(value)
                break
        scheme, _, credentials = given.partition(b" ")
        valid = scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self.token)
        if not valid:
            response = error_response(
                401, "invalid_token", "send Authorization: Bearer <read token>", challenge
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def _params(request: Request, endpoint: str) -> dict[str, str]:
    params: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name not in ALLOWED_PARAMETERS[endpoint]:
            raise QueryError("unknown_parameter", f"{endpoint} does not take {name!r}")
        if name in params:
            raise QueryError("repeated_parameter", f"{name!r} given more than once")
        params[name] = value
    return params


class ReadApi:
    """The endpoints; every query goes through the storage's read-only connection."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    async def _read(self, sql: str, parameters: tuple[object, ...]) -> list[tuple[Any, ...]]:
        try:
            return await self.storage.read(sql, parameters)
        except StorageError as exc:
            raise RequestRejected(503, exc.code, "the report store is not available") from None

    async def groups(self, request: Request) -> Response:
        try:
            params = _params(request, "groups")
            by = parse_by(params.get("by"))
            filters = Filters.parse(params)
            query = groups_query(by, filters, parse_limit(params.get("limit")))
        except QueryError as exc:
            raise RequestRejected(400, exc.code, exc.message) from None
        rows = await self._read(query.sql, query.parameters)
        return _json({"by": list(by), "groups": group_rows(by, rows)})

    async def reports(self, request: Request) -> Response:
        try:
            params = _params(request, "reports")
            limit = parse_limit(params.get("limit"))
            query = reports_query(Filters.parse(params), limit, params.get("cursor"))
        except QueryError as exc:
            raise RequestRejected(400, exc.code, exc.message) from None
        rows = await self._read(query.sql, query.parameters)
        return _json(report_page(rows, limit))

    async def report(self, request: Request) -> Response:
        raw_id = request.path_params["report_id"]
        if not raw_id.isdigit() or len(raw_id) > 18:
            raise RequestRejected(400, "invalid_id", "a report id is a whole number")
        query = report_query(int(raw_id))
        rows = await self._read(query.sql, query.parameters)
        if not rows:
            raise RequestRejected(404, "report_not_found", f"no report with id {raw_id}")
        return _json(report_row_to_dict(rows[0], with_raw=True))

    async def timeseries(self, request: Request) -> Response:
        try:
            params = _params(request, "timeseries")
            by = parse_by(params.get("by"), default=())
            bucket = params.get("bucket", "hour")
            query = timeseries_query(bucket, by, Filters.parse(params))
        except QueryError as exc:
            raise RequestRejected(400, exc.code, exc.message) from None
        rows = await self._read(query.sql, query.parameters)
        return _json({"bucket": bucket, "by": list(by), "series": series_rows(by, rows)})

    def routes(self) -> list[Route]:
        return [
            Route("/groups", self.groups, methods=["GET"]),
            Route("/reports", self.reports, methods=["GET"]),
            Route("/reports/{report_id}", self.report, methods=["GET"]),
            Route("/timeseries", self.timeseries, methods=["GET"]),
        ]
