"""Issues under /api: the ranked list, one issue with its breakdowns, history and latest
events, the events page by page (read token), and triage (``PATCH``, write token).

Parameters are checked here, before the storage sees them, and every refusal is a 400 with a
reason code like the rest of the API; the storage answers the JSON of an issue as it is.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from reporting_endpoint.api.read import answered, json_response
from reporting_endpoint.errors import RequestRejected
from reporting_endpoint.issues.triage import STATUSES, StatusChange
from reporting_endpoint.params import (
    QueryError,
    decode_crash_cursor,
    decode_row_cursor,
    encode_cursor,
    now_ms,
    parse_int,
    parse_limit,
    parse_time,
)
from reporting_endpoint.storage.base import (
    DEFAULT_ISSUE_WINDOW_MS,
    ISSUE_SORTS,
    IssueFilters,
    IssueSort,
    Storage,
)
from reporting_endpoint.storage.filters import Position
from reporting_endpoint.storage.rows import iso_time

# Issues on one page: each carries an hourly series and its top browsers and OSes, so fewer
# than the thousand rows a reports page may hold.
DEFAULT_ISSUES = 50
MAX_ISSUES = 200
# Events shown with one issue (GET /api/issues/{id}); the events endpoint pages on.
DEFAULT_EVENTS = 20
MAX_CURSOR = 200
# Values of filters and of a PATCH body are labels, not documents.
MAX_VALUE = 1000
MAX_RELEASE = 128
MAX_REASON = 1000
# A PATCH body is a handful of small fields.
MAX_PATCH_BYTES = 16 * 1024
# Ignoring for longer than ten years is ignoring for ever: leave both out for that.
MAX_IGNORE_MINUTES = 10 * 366 * 24 * 60
MAX_IGNORE_EVENTS = 1_000_000_000
# Who a change through the API is recorded as (the CLI records "cli").
API_ACTOR = "api"

LIST_PARAMETERS = frozenset(
    {"status", "kind", "site", "release", "browser", "os", "since", "until", "sort", "limit",
     "cursor"}
)  # fmt: skip
ISSUE_PARAMETERS = frozenset({"since", "until", "events"})
EVENT_PARAMETERS = frozenset({"limit", "cursor"})
PATCH_FIELDS = frozenset({"status", "release", "ignore_minutes", "ignore_events", "reason"})
PATCH_STATUSES = ("resolved", "ignored", "unresolved")


def query_params(request: Request, allowed: frozenset[str]) -> dict[str, str]:
    """The query parameters, each at most once and each one the endpoint takes."""
    params: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name not in allowed:
            raise QueryError("unknown_parameter", f"this endpoint does not take {name!r}")
        if name in params:
            raise QueryError("repeated_parameter", f"{name!r} given more than once")
        if len(value) > MAX_VALUE:
            raise QueryError("invalid_value", f"{name!r} is longer than {MAX_VALUE} characters")
        params[name] = value
    return params


def parse_window(params: Mapping[str, str], now: int | None = None) -> tuple[int, int]:
    """The [since, until) window of the counts: the last 24 hours unless given."""
    moment = now if now is not None else now_ms()
    until = parse_time(params["until"], "until", moment) if params.get("until") else moment
    if params.get("since"):
        since = parse_time(params["since"], "since", moment)
    else:
        since = until - DEFAULT_ISSUE_WINDOW_MS
    if since >= until:
        raise QueryError("invalid_time", "since must be before until")
    return since, until


def parse_sort(value: str | None) -> IssueSort:
    for sort in ISSUE_SORTS:
        if value == sort:
            return sort
    if value is None or value == "":
        return "count"
    raise QueryError("invalid_sort", f"sort is one of {', '.join(ISSUE_SORTS)}")


def parse_issue_filters(params: Mapping[str, str], now: int | None = None) -> IssueFilters:
    """``GET /api/issues`` filters (also what ``issues list`` parses)."""
    status = params.get("status") or None
    if status is not None and status not in STATUSES:
        raise QueryError("invalid_status", f"status is one of {', '.join(STATUSES)}")
    since, until = parse_window(params, now)
    return IssueFilters(
        status=status,
        kind=params.get("kind") or None,
        site=params.get("site") or None,
        release=params.get("release") or None,
        browser=params.get("browser") or None,
        os=params.get("os") or None,
        since=since,
        until=until,
    )


def decode_event_cursor(cursor: str | None) -> Position | None:
    """A cursor of an issue's events: over reports (whole-number ids) or crashes (hex)."""
    try:
        return decode_row_cursor(cursor)
    except QueryError:
        return decode_crash_cursor(cursor)


def _issue_id(request: Request) -> int:
    issue_id = parse_int(request.path_params["issue_id"], 1)
    if issue_id is None:
        raise RequestRejected(400, "invalid_id", "an issue id is a whole number")
    return issue_id


def _not_found(issue_id: int) -> RequestRejected:
    return RequestRejected(404, "issue_not_found", f"no issue with id {issue_id}")


def _bad(field: str, message: str) -> RequestRejected:
    return RequestRejected(400, "invalid_change", f"{field}: {message}")


def _whole(body: Mapping[str, Any], field: str, maximum: int) -> int | None:
    value = body.get(field)
    if value is None:
        return None
    # bool is an int in Python, but true is not a number of minutes.
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise _bad(field, f"a whole number from 1 to {maximum}")
    return value


def _text(body: Mapping[str, Any], field: str, maximum: int) -> str | None:
    value = body.get(field)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > maximum:
        raise _bad(field, f"a string of at most {maximum} characters")
    return value


def status_change(body: object, actor: str, now: int) -> StatusChange:
    """A PATCH body as a triage decision; every problem is a 400 naming the field."""
    if not isinstance(body, dict):
        raise RequestRejected(400, "invalid_change", "the body must be a JSON object")
    unknown = sorted(set(body) - PATCH_FIELDS)
    if unknown:
        raise _bad(unknown[0], f"unknown field; the fields are {', '.join(sorted(PATCH_FIELDS))}")
    status = body.get("status")
    if status not in PATCH_STATUSES:
        raise _bad("status", f"required, one of {', '.join(PATCH_STATUSES)}")
    release = _text(body, "release", MAX_RELEASE)
    if release is not None:
        release = release.strip()
        if not release:
            raise _bad("release", "must not be blank")
    minutes = _whole(body, "ignore_minutes", MAX_IGNORE_MINUTES)
    events = _whole(body, "ignore_events", MAX_IGNORE_EVENTS)
    reason = _text(body, "reason", MAX_REASON) or ""
    # Said here in the API's field names (StatusChange, below, names its own fields).
    if release is not None and status != "resolved":
        raise RequestRejected(400, "invalid_change", "release goes only with status 'resolved'")
    if status != "ignored" and (minutes is not None or events is not None):
        raise RequestRejected(
            400, "invalid_change", "ignore_minutes and ignore_events go only with status 'ignored'"
        )
    try:
        return StatusChange(
            status=status,
            actor=actor,
            reason=reason,
            resolved_in_release=release,
            ignore_until_ms=None if minutes is None else now + minutes * 60_000,
            ignore_more_events=events,
        )
    except ValueError as exc:
        # Anything else StatusChange refuses.
        raise RequestRejected(400, "invalid_change", str(exc)) from None


async def _read_body(request: Request) -> bytes:
    # The /api mount has no body limit of its own (reads have no body): bound it here.
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_PATCH_BYTES:
            raise RequestRejected(413, "too_large", f"at most {MAX_PATCH_BYTES} bytes")
    return bytes(body)


class IssuesApi:
    """The issue endpoints; reads and triage go through the storage protocol."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    async def issues(self, request: Request) -> Response:
        try:
            params = query_params(request, LIST_PARAMETERS)
            filters = parse_issue_filters(params)
            sort = parse_sort(params.get("sort"))
            limit = parse_limit(params.get("limit"), DEFAULT_ISSUES, MAX_ISSUES)
        except QueryError as exc:
            raise RequestRejected(400, exc.code, exc.message) from None
        cursor = params.get("cursor") or None
        if cursor is not None and len(cursor) > MAX_CURSOR:
            raise RequestRejected(400, "invalid_cursor", "cursor is not one this service gave out")
        try:
            page = await answered(self.storage.issues_page(filters, sort, limit, cursor))
        except (ValueError, OverflowError):
            # The window was checked above: what the backend refuses is the opaque cursor.
            raise RequestRejected(
                400, "invalid_cursor", "cursor is not one this service gave out"
            ) from None
        assert filters.since is not None and filters.until is not None
        return json_response(
            {
                "issues": list(page.items),
                "next_cursor": page.next,
                "sort": sort,
                "since": iso_time(filters.since),
                "until": iso_time(filters.until),
            }
        )

    async def issue(self, request: Request) -> Response:
        issue_id = _issue_id(request)
        try:
            params = query_params(request, ISSUE_PARAMETERS)
            since, until = parse_window(params)
            events = parse_limit(params.get("events"), DEFAULT_EVENTS)
        except QueryError as exc:
            raise RequestRejected(400, exc.code, exc.message) from None
        found = await answered(self.storage.get_issue(issue_id, since, until))
        if found is None:
            raise _not_found(issue_id)
        page = await answered(self.storage.issue_events(issue_id, events))
        return json_response(
            {
                **found,
                "since": iso_time(since),
                "until": iso_time(until),
                "events": list(page.items),
                "events_next_cursor": encode_cursor(page.next),
            }
        )

    async def events(self, request: Request) -> Response:
        issue_id = _issue_id(request)
        try:
            params = query_params(request, EVENT_PARAMETERS)
            limit = parse_limit(params.get("limit"))
            after = decode_event_cursor(params.get("cursor"))
        except QueryError as exc:
            raise RequestRejected(400, exc.code, exc.message) from None
        page = await answered(self.storage.issue_events(issue_id, limit, after))
        # An empty first page is either an issue with no events left or no issue at all.
        missing = not page.items and after is None
        if missing and await answered(self.storage.get_issue(issue_id)) is None:
            raise _not_found(issue_id)
        return json_response({"events": list(page.items), "next_cursor": encode_cursor(page.next)})

    async def change(self, request: Request) -> Response:
        issue_id = _issue_id(request)
        if request.query_params:
            raise RequestRejected(400, "unknown_parameter", "PATCH takes a JSON body only")
        raw = await _read_body(request)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise RequestRejected(400, "invalid_json", f"the body is not JSON: {exc}") from None
        now = now_ms()
        change = status_change(body, API_ACTOR, now)
        found = await answered(self.storage.set_issue_status(issue_id, change, now))
        if found is None:
            raise _not_found(issue_id)
        return json_response(found)

    def routes(self) -> list[Route]:
        return [
            Route("/issues", self.issues, methods=["GET"]),
            Route("/issues/{issue_id}", self.issue, methods=["GET"]),
            Route("/issues/{issue_id}", self.change, methods=["PATCH"]),
            Route("/issues/{issue_id}/events", self.events, methods=["GET"]),
        ]
