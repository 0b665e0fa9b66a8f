"""JSON API under /api behind bearer tokens: groups, reports, crashes, series, quarantine to
read (read token), and deleting one report or crash (write token)."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable
from functools import partial
from typing import Any, TypeVar

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
    QUARANTINE_FILTERS,
    Filters,
    QueryError,
    Window,
    crash_groups_query,
    crash_page,
    crash_query,
    crash_row_to_dict,
    crash_timeseries_query,
    crashes_query,
    group_rows,
    groups_query,
    parse_by,
    parse_int,
    parse_limit,
    quarantine_page,
    quarantine_query,
    quarantine_row_to_dict,
    quarantined_query,
    report_page,
    report_query,
    report_row_to_dict,
    reports_query,
    series_rows,
    timeseries_query,
)
from reporting_endpoint.storage.base import Storage, StorageError
from reporting_endpoint.storage.deletion import delete_crash, delete_report, delete_through

T = TypeVar("T")

_COMMON = {"type", "site", "origin", "browser", "browser_major", "os", "reason", "user_agent"}
_CRASH = set(CRASH_DIMENSIONS)
ALLOWED_PARAMETERS = {
    "groups": _COMMON | _CRASH | {"by", "since", "until", "limit", "source"},
    "crashes": _CRASH | {"since", "until", "limit", "cursor"},
    "reports": _COMMON | {"since", "until", "limit", "cursor"},
    "timeseries": _COMMON | _CRASH | {"by", "since", "until", "bucket", "source"},
    "quarantine": set(QUARANTINE_FILTERS) | {"since", "until", "limit", "cursor"},
}


class _FromApp:
    """The write token is the service app's own setting (``app.state.settings``)."""


_FROM_APP = _FromApp()


class BearerTokenMiddleware:
    """Lets a request through only with ``Authorization: Bearer <token>``: the read token for
    reading, the write token for ``DELETE`` (the read token never deletes anything).

    With no token configured that half of the API is closed to everyone, and the error says how
    to open it. ``write_token`` left out is taken from the service app's settings
    (``app.state.settings``), so a caller that passes only the read token still guards deletes.
    """

    def __init__(
        self, app: ASGIApp, token: str | None, write_token: str | _FromApp | None = _FROM_APP
    ) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.write_token = write_token

    def _write_token(self, scope: Scope) -> bytes | None:
        token = self.write_token
        if isinstance(token, _FromApp):
            settings = getattr(getattr(scope.get("app"), "state", None), "settings", None)
            token = getattr(settings, "write_token", None)
        return token.encode() if isinstance(token, str) and token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        challenge = {"WWW-Authenticate": 'Bearer realm="reporting-endpoint"'}
        writing = scope["method"] == "DELETE"
        expected = self._write_token(scope) if writing else self.token
        if expected is None:
            response = (
                error_response(
                    401,
                    "write_api_disabled",
                    "deleting is off until a write token is set: REPORTING_ENDPOINT_WRITE_TOKEN",
                    challenge,
                )
                if writing
                else error_response(
                    401,
                    "read_api_disabled",
                    "the read API is off until a token is set: REPORTING_ENDPOINT_READ_TOKEN",
                    challenge,
                )
            )
            await response(scope, receive, send)
            return
        given = b""
        for key, value in scope["headers"]:
            if key == b"authorization":
                given = bytes(value)
                break
        scheme, _, credentials = given.partition(b" ")
        valid = scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), expected)
        if not valid:
            kind = "write" if writing else "read"
            response = error_response(
                401, "invalid_token", f"send Authorization: Bearer <{kind} token>", challenge
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


def _row_id(request: Request, name: str, what: str) -> int:
    # ASCII digits only: "²" passes str.isdigit() but not int(), which made it a 500.
    row_id = parse_int(request.path_params[name], 1)
    if row_id is None:
        raise RequestRejected(400, "invalid_id", f"a {what} id is a whole number")
    return row_id


def _crash_id(request: Request) -> str:
    crash_id: str = request.path_params["crash_id"]
    if not (len(crash_id) == 32 and all(c in "0123456789abcdef" for c in crash_id)):
        raise RequestRejected(400, "invalid_id", "a crash id is 32 hex digits")
    return crash_id


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
                query = crash_groups_query(by, filters, limit + 1)
            else:
                by = parse_by(params.get("by"))
                filters = Filters.parse(params)
                query = groups_query(by, filters, limit + 1)
        except QueryError as exc:
            raise RequestRejected(400, exc.code, exc.message) from None
        rows = await self._read(query.sql, query.parameters)
        # One row past the limit was asked for: it only says that more groups exist.
        return _json(
            {
                "source": source,
                "by": list(by),
                "groups": group_rows(by, rows[:limit]),
                "more": len(rows) > limit,
            }
        )

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
        crash_id = _crash_id(request)
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
        report_id = _row_id(request, "report_id", "report")
        query = report_query(report_id)
        rows = await self._read(query.sql, query.parameters)
        if not rows:
            raise RequestRejected(404, "report_not_found", f"no report with id {report_id}")
        return _json(report_row_to_dict(rows[0], with_raw=True))

    async def timeseries(self, request: Request) -> Response:
        try:
            params = _params(request, "timeseries")
            source = params.pop("source", "reports")
            if source not in {"reports", "crashes"}:
                raise QueryError("invalid_source", "source is reports or crashes")
            dimensions = CRASH_DIMENSIONS if source == "crashes" else DIMENSIONS
            stray = set(params) - {"by", "since", "until", "bucket"} - set(dimensions)
            if stray:
                raise QueryError("unknown_parameter", f"{source} has no {sorted(stray)[0]!r}")
            by = parse_by(params.get("by"), (), dimensions)
            bucket = params.get("bucket", "hour")
            filters = Filters.parse(params, dimensions=dimensions)
            window = Window.of(bucket, filters)
            if source == "crashes":
                query = crash_timeseries_query(bucket, by, filters)
            else:
                query = timeseries_query(bucket, by, filters)
            rows = await self._read(query.sql, query.parameters)
            series = series_rows(by, rows, window.widen(rows))
        except QueryError as exc:
            raise RequestRejected(400, exc.code, exc.message) from None
        return _json({"source": source, "bucket": bucket, "by": list(by), "series": series})

    async def quarantine(self, request: Request) -> Response:
        try:
            params = _params(request, "quarantine")
            limit = parse_limit(params.get("limit"))
            filters = Filters.parse(params, dimensions=QUARANTINE_FILTERS)
            query = quarantine_query(filters, limit, params.get("cursor"))
        except QueryError as exc:
            raise RequestRejected(400, exc.code, exc.message) from None
        rows = await self._read(query.sql, query.parameters)
        return _json(quarantine_page(rows, limit))

    async def quarantined(self, request: Request) -> Response:
        row_id = _row_id(request, "quarantine_id", "quarantined report")
        query = quarantined_query(row_id)
        rows = await self._read(query.sql, query.parameters)
        if not rows:
            raise RequestRejected(404, "quarantined_not_found", f"no quarantined id {row_id}")
        return _json(quarantine_row_to_dict(rows[0]))

    async def _write(self, job: Awaitable[T]) -> T:
        try:
            return await job
        except StorageError as exc:
            raise RequestRejected(503, exc.code, "the report store is not available") from None

    async def delete_report(self, request: Request) -> Response:
        report_id = _row_id(request, "report_id", "report")
        job = partial(delete_report, report_id=report_id)
        deleted = await self._write(self.storage.run_job(job))
        if not deleted:
            raise RequestRejected(404, "report_not_found", f"no report with id {report_id}")
        return _json({"deleted": {"reports": 1, "crashes": 0, "files": 0}})

    async def delete_crash(self, request: Request) -> Response:
        crash_id = _crash_id(request)
        job = partial(delete_crash, crash_id=crash_id)
        deletion = await self._write(delete_through(self.storage, job, self.blobs.root))
        if not deletion.crashes:
            raise RequestRejected(404, "crash_not_found", f"no crash with id {crash_id}")
        return _json({"deleted": {"reports": 0, "crashes": 1, "files": deletion.files_removed}})

    def routes(self) -> list[Route]:
        return [
            Route("/groups", self.groups, methods=["GET"]),
            Route("/reports", self.reports, methods=["GET"]),
            Route("/reports/{report_id}", self.report, methods=["GET"]),
            Route("/reports/{report_id}", self.delete_report, methods=["DELETE"]),
            Route("/timeseries", self.timeseries, methods=["GET"]),
            Route("/crashes", self.crashes, methods=["GET"]),
            Route("/crashes/{crash_id}", self.crash, methods=["GET"]),
            Route("/crashes/{crash_id}", self.delete_crash, methods=["DELETE"]),
            Route("/quarantine", self.quarantine, methods=["GET"]),
            Route("/quarantine/{quarantine_id}", self.quarantined, methods=["GET"]),
            Route("/crashes/{crash_id}/minidump", self.minidump, methods=["GET"]),
        ]
