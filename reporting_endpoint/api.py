"""Read-only JSON API under /api, behind a bearer token: groups, reports, crashes, series."""

from __future__ import annotations

import hmac
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from reporting_endpoint.blobs import BlobStore
from reporting_endpoint.errors import RequestRejected, error_response
from reporting_endpoint.queries import (
    CRASH_DEFAULT_BY,
    CRASH_DIMENSIONS,
    CRASH_DUMP_PATH,
    DIMENSIONS,
    Filters,
    QueryError,
    crash_groups_query,
    crash_page,
    crash_query,
    crash_row_to_dict,
    crashes_query,
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
_CRASH = set(CRASH_DIMENSIONS)
ALLOWED_PARAMETERS = {
    "groups": _COMMON | _CRASH | {"by", "since", "until", "limit", "source"},
    "crashes": _CRASH | {"since", "until", "limit", "cursor"},
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

    def __init__(self, storage: Storage, blobs: BlobStore) -> None:
        self.storage = storage
        self.blobs = blobs

    async def _read(self, sql: str, parameters: tuple[object, ...]) -> list[tuple[Any, ...]]:
        try:
            return await self.storage.read(sql, parameters)
        except StorageError as exc:
            raise RequestRejected(503, exc.code, "the report store is not available") from None

    async def groups(self, request: Request) -> Response:
        try:
            params = _params(request, "groups")
            source = params.pop("source", "reports")
            limit = parse_limit(params.get("limit"))
            if source not in {"reports", "crashes"}:
                raise QueryError("invalid_source", "source is reports or crashes")
            dimensions = CRASH_DIMENSIONS if source == "crashes" else DIMENSIONS
            stray = set(params) - {"by", "since", "until", "limit"} - set(dimensions)
            if stray:
                raise QueryError("unknown_parameter", f"{source} has no {sorted(stray)[0]!r}")
            if source == "crashes":
                by = parse_by(params.get("by"), CRASH_DEFAULT_BY, CRASH_DIMENSIONS)
                filters = Filters.parse(params, dimensions=CRASH_DIMENSIONS)
                query = crash_groups_query(by, filters, limit)
            else:
                by = parse_by(params.get("by"))
                filters = Filters.parse(params)
                query = groups_query(by, filters, limit)
        except QueryError as exc:
            raise RequestRejected(400, exc.code, exc.message) from None
        rows = await self._read(query.sql, query.parameters)
        return _json({"source": source, "by": list(by), "groups": group_rows(by, rows)})

    async def crashes(self, request: Request) -> Response:
        try:
            params = _params(request, "crashes")
            limit = parse_limit(params.get("limit"))
            filters = Filters.parse(params, dimensions=CRASH_DIMENSIONS)
            query = crashes_query(filters, limit, params.get("cursor"))
        except QueryError as exc:
            raise RequestRejected(400, exc.code, exc.message) from None
        rows = await self._read(query.sql, query.parameters)
        return _json(crash_page(rows, limit))

    async def _crash_row(self, request: Request) -> tuple[Any, ...]:
        crash_id = request.path_params["crash_id"]
        if not (len(crash_id) == 32 and all(c in "0123456789abcdef" for c in crash_id)):
            raise RequestRejected(400, "invalid_id", "a crash id is 32 hex digits")
        query = crash_query(crash_id)
        rows = await self._read(query.sql, query.parameters)
        if not rows:
            raise RequestRejected(404, "crash_not_found", f"no crash with id {crash_id}")
        return rows[0]

    async def crash(self, request: Request) -> Response:
        return _json(crash_row_to_dict(await self._crash_row(request)))

    async def minidump(self, request: Request) -> Response:
        row = await self._crash_row(request)
        # A hash path the service made itself; open_path also refuses anything outside blobs/.
        path = self.blobs.open_path(row[CRASH_DUMP_PATH])
        if not path.is_file():
            raise RequestRejected(404, "minidump_missing", "the dump file is gone")
        return FileResponse(
            path,
            media_type="application/octet-stream",
            filename=f"{row[0]}.dmp",
        )

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
            Route("/crashes", self.crashes, methods=["GET"]),
            Route("/crashes/{crash_id}", self.crash, methods=["GET"]),
            Route("/crashes/{crash_id}/minidump", self.minidump, methods=["GET"]),
        ]
