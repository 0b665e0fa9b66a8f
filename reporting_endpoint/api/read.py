"""JSON API under /api behind bearer tokens: groups, reports, crashes, series, quarantine to
read (read token), and deleting one report or crash (write token); the token middleware that
guards every route under /api, issues included."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from reporting_endpoint import deletion
from reporting_endpoint.blobstores import BlobNotFound, BlobStore, BlobStoreError, BlobStream
from reporting_endpoint.errors import RETRY_LATER, RequestRejected, error_response
from reporting_endpoint.params import (
    DIMENSIONS,
    QueryError,
    Window,
    decode_crash_cursor,
    decode_row_cursor,
    encode_cursor,
    is_crash_id,
    parse_bucket,
    parse_by,
    parse_filters,
    parse_int,
    parse_limit,
    series_rows,
)
from reporting_endpoint.storage.base import Page, Storage, StorageError
from reporting_endpoint.storage.filters import (
    CRASH_DEFAULT_BY,
    CRASH_DIMENSIONS,
    QUARANTINE_DIMENSIONS,
    Source,
)

T = TypeVar("T")

_COMMON = {"type", "site", "origin", "browser", "browser_major", "os", "reason", "user_agent"}
_CRASH = set(CRASH_DIMENSIONS)
ALLOWED_PARAMETERS = {
    "groups": _COMMON | _CRASH | {"by", "since", "until", "limit", "source"},
    "crashes": _CRASH | {"since", "until", "limit", "cursor"},
    "reports": _COMMON | {"since", "until", "limit", "cursor"},
    "timeseries": _COMMON | _CRASH | {"by", "since", "until", "bucket", "source"},
    "quarantine": set(QUARANTINE_DIMENSIONS) | {"since", "until", "limit", "cursor"},
}


async def answered(query: Awaitable[T], store: str = "report store") -> T:
    """A storage call's answer; a storage that cannot answer now is 503 with its code and
    ``Retry-After`` (every API module reads through this)."""
    try:
        return await query
    except StorageError as exc:
        raise RequestRejected(503, exc.code, f"the {store} is not available", RETRY_LATER) from None


class _FromApp:
    """The write token is the service app's own setting (``app.state.settings``)."""


_FROM_APP = _FromApp()


# Methods that only read; any other (DELETE, PATCH, ...) changes data and needs the write token.
READ_METHODS = frozenset({"GET", "HEAD"})


class BearerTokenMiddleware:
    """Lets a request through only with ``Authorization: Bearer <token>``: the read token for
    reading (``GET``), the write token for anything that changes data (``DELETE`` a report,
    ``PATCH`` an issue's status): the read token never changes anything.

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
        writing = scope["method"] not in READ_METHODS
        expected = self._write_token(scope) if writing else self.token
        if expected is None:
            response = (
                error_response(
                    401,
                    "write_api_disabled",
                    "changing data (deleting, triage) is off until a write token is set:"
                    " REPORTING_ENDPOINT_WRITE_TOKEN",
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


def json_response(data: Any, status: int = 200) -> Response:
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
    if not is_crash_id(crash_id):
        raise RequestRejected(400, "invalid_id", "a crash id is 32 hex digits")
    return crash_id


def _page(page: Page, name: str) -> dict[str, Any]:
    return {name: list(page.items), "next_cursor": encode_cursor(page.next)}


def _source(value: str) -> Source:
    if value == "reports":
        return "reports"
    if value == "crashes":
        return "crashes"
    raise QueryError("invalid_source", "source is reports or crashes")


async def _chunks(stream: BlobStream) -> AsyncIterator[bytes]:
    try:
        async for chunk in stream:
            yield chunk
    finally:
        # Also when the client goes away mid-download: the file or connection is released.
        await stream.aclose()


class ReadApi:
    """The endpoints; every query goes through the storage protocol's reads (never the
    writer's connection)."""

    def __init__(self, storage: Storage, blobs: BlobStore) -> None:
        self.storage = storage
        self.blobs = blobs

    async def groups(self, request: Request) -> Response:
        try:
            params = _params(request, "groups")
            raw_source = params.pop("source", "reports")
            limit = parse_limit(params.get("limit"))
            source = _source(raw_source)
            dimensions = CRASH_DIMENSIONS if source == "crashes" else DIMENSIONS
            stray = set(params) - {"by", "since", "until", "limit"} - set(dimensions)
            if stray:
                raise QueryError("unknown_parameter", f"{source} has no {sorted(stray)[0]!r}")
            if source == "crashes":
                by = parse_by(params.get("by"), CRASH_DEFAULT_BY, CRASH_DIMENSIONS)
            else:
                by = parse_by(params.get("by"))
            filters = parse_filters(params, dimensions=dimensions)
        except QueryError as exc:
            raise RequestRejected(400, exc.code, exc.message) from None
        found = await answered(self.storage.groups(source, by, filters, limit))
        return json_response(
            {"source": source, "by": list(by), "groups": list(found.groups), "more": found.more}
        )

    async def crashes(self, request: Request) -> Response:
        try:
            params = _params(request, "crashes")
            limit = parse_limit(params.get("limit"))
            filters = parse_filters(params, dimensions=CRASH_DIMENSIONS)
            after = decode_crash_cursor(params.get("cursor"))
        except QueryError as exc:
            raise RequestRejected(400, exc.code, exc.message) from None
        page = await answered(self.storage.crash_page(filters, limit, after))
        return json_response(_page(page, "crashes"))

    async def crash(self, request: Request) -> Response:
        crash_id = _crash_id(request)
        found = await answered(self.storage.get_crash(crash_id))
        if found is None:
            raise RequestRejected(404, "crash_not_found", f"no crash with id {crash_id}")
        return json_response(found)

    async def minidump(self, request: Request) -> Response:
        crash_id = _crash_id(request)
        dump_path = await answered(self.storage.crash_dump_path(crash_id))
        if dump_path is None:
            raise RequestRejected(404, "crash_not_found", f"no crash with id {crash_id}")
        try:
            # The row's key is checked again by the store (never a path outside blobs/).
            stream = await self.blobs.open(dump_path)
        except (BlobNotFound, ValueError):
            raise RequestRejected(404, "minidump_missing", "the dump file is gone") from None
        except (BlobStoreError, OSError):
            raise RequestRejected(
                503, "blob_store_error", "the dump store is not available", RETRY_LATER
            ) from None
        # Streamed as the client reads it (from a file or straight from the bucket), with its
        # length up front so a download tool can show progress and spot a cut-off transfer.
        return StreamingResponse(
            _chunks(stream),
            media_type="application/octet-stream",
            headers={
                "Content-Length": str(stream.size),
                "Content-Disposition": f'attachment; filename="{crash_id}.dmp"',
            },
        )

    async def reports(self, request: Request) -> Response:
        try:
            params = _params(request, "reports")
            limit = parse_limit(params.get("limit"))
            filters = parse_filters(params)
            after = decode_row_cursor(params.get("cursor"))
        except QueryError as exc:
            raise RequestRejected(400, exc.code, exc.message) from None
        page = await answered(self.storage.reports_page(filters, limit, after))
        return json_response(_page(page, "reports"))

    async def report(self, request: Request) -> Response:
        report_id = _row_id(request, "report_id", "report")
        found = await answered(self.storage.get_report(report_id))
        if found is None:
            raise RequestRejected(404, "report_not_found", f"no report with id {report_id}")
        return json_response(found)

    async def timeseries(self, request: Request) -> Response:
        try:
            params = _params(request, "timeseries")
            source = _source(params.pop("source", "reports"))
            dimensions = CRASH_DIMENSIONS if source == "crashes" else DIMENSIONS
            stray = set(params) - {"by", "since", "until", "bucket"} - set(dimensions)
            if stray:
                raise QueryError("unknown_parameter", f"{source} has no {sorted(stray)[0]!r}")
            by = parse_by(params.get("by"), (), dimensions)
            bucket = parse_bucket(params.get("bucket", "hour"))
            filters = parse_filters(params, dimensions=dimensions)
            window = Window.of(bucket, filters)
            counts = await answered(self.storage.timeseries(source, bucket, by, filters))
            series = series_rows(by, counts, window.widen(counts))
        except QueryError as exc:
            raise RequestRejected(400, exc.code, exc.message) from None
        return json_response({"source": source, "bucket": bucket, "by": list(by), "series": series})

    async def quarantine(self, request: Request) -> Response:
        try:
            params = _params(request, "quarantine")
            limit = parse_limit(params.get("limit"))
            filters = parse_filters(params, dimensions=QUARANTINE_DIMENSIONS)
            after = decode_row_cursor(params.get("cursor"))
        except QueryError as exc:
            raise RequestRejected(400, exc.code, exc.message) from None
        page = await answered(self.storage.quarantine_page(filters, limit, after))
        return json_response(_page(page, "quarantine"))

    async def quarantined(self, request: Request) -> Response:
        row_id = _row_id(request, "quarantine_id", "quarantined report")
        found = await answered(self.storage.get_quarantined(row_id))
        if found is None:
            raise RequestRejected(404, "quarantined_not_found", f"no quarantined id {row_id}")
        return json_response(found)

    async def delete_report(self, request: Request) -> Response:
        report_id = _row_id(request, "report_id", "report")
        deleted = await answered(self.storage.delete_report(report_id))
        if not deleted:
            raise RequestRejected(404, "report_not_found", f"no report with id {report_id}")
        return json_response({"deleted": {"reports": 1, "crashes": 0, "files": 0}})

    async def delete_crash(self, request: Request) -> Response:
        crash_id = _crash_id(request)
        gone = await answered(deletion.delete_crash(self.storage, crash_id, self.blobs))
        if not gone.crashes:
            raise RequestRejected(404, "crash_not_found", f"no crash with id {crash_id}")
        return json_response({"deleted": {"reports": 0, "crashes": 1, "files": gone.files_removed}})

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
