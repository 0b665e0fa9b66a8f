"""The dashboard's Jinja2 environment, its refusals, and the parsing shared by its pages:
the time window, the query string, and the links that carry every filter in the URL."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import jinja2
import orjson
from starlette.requests import Request
from starlette.responses import HTMLResponse

from reporting_endpoint.dashboard.auth import Session, session_of
from reporting_endpoint.params import QueryError, is_crash_id, parse_int
from reporting_endpoint.storage.filters import HOUR_MS, Bucket

# Windows the picker offers, and the bucket each one's chart is drawn in.
WINDOWS: dict[str, tuple[int, Bucket]] = {
    "24h": (24 * HOUR_MS, "hour"),
    "7d": (7 * 24 * HOUR_MS, "hour"),
    "30d": (30 * 24 * HOUR_MS, "day"),
}
DEFAULT_WINDOW = "24h"
# A custom window spans at most this many days (its chart is one bar a day past a week).
MAX_CUSTOM_DAYS = 400
# A query value is a label or a short URL, never a document.
MAX_VALUE = 1000
# One ``<pre>`` of raw JSON shows at most this much (a report is at most 1 MiB).
MAX_JSON_CHARS = 64 * 1024

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("reporting_endpoint.dashboard", "templates"),
    # Every value shown came from the internet: escaped everywhere, whatever the extension.
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


class Refusal(Exception):
    """A request the dashboard refuses; shown as an HTML page naming ``code``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Window:
    """The time window of a page: [since, until) in ms, its chart bucket, and how it was
    asked for (``label``: one of ``WINDOWS`` or ``custom`` with the two dates)."""

    label: str
    since: int
    until: int
    bucket: Bucket
    since_date: str = ""
    until_date: str = ""

    def params(self) -> dict[str, str]:
        """The query parameters that ask for this window again."""
        if self.label == "custom":
            return {"since": self.since_date, "until": self.until_date}
        return {"window": self.label}

    def buckets(self) -> list[int]:
        """Every bucket of the window, in hours since the epoch (a day: its first hour)."""
        step = 24 if self.bucket == "day" else 1
        first = self.since // HOUR_MS // step * step
        last = (self.until - 1) // HOUR_MS // step * step
        return list(range(first, last + 1, step))


def _day(value: str, name: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise Refusal(400, "invalid_time", f"{name} is a date like 2026-01-31") from None


def parse_window(params: Mapping[str, str], now: int) -> Window:
    """``window=24h|7d|30d`` (default 24h), or ``since``/``until`` dates (UTC, both days
    included; ``until`` defaults to today)."""
    since_text = params.get("since", "").strip()
    until_text = params.get("until", "").strip()
    if since_text or until_text:
        today = datetime.fromtimestamp(now / 1000, UTC).date()
        until_day = _day(until_text, "until") if until_text else today
        try:
            since_day = _day(since_text, "since") if since_text else until_day - timedelta(days=6)
        except OverflowError:
            # The week before 0001-01-07 is not a date.
            raise Refusal(400, "invalid_time", "until is too early") from None
        if since_day > until_day:
            raise Refusal(400, "invalid_time", "since must not be after until")
        days = (until_day - since_day).days + 1
        if days > MAX_CUSTOM_DAYS:
            raise Refusal(400, "window_too_large", f"a window spans at most {MAX_CUSTOM_DAYS} days")
        start = datetime.combine(since_day, datetime.min.time(), UTC)
        try:
            end = start + timedelta(days=days)
        except OverflowError:
            # A window through 9999-12-31 ends at a midnight no datetime can hold.
            raise Refusal(400, "invalid_time", "until is too late") from None
        return Window(
            "custom",
            int(start.timestamp() * 1000),
            int(end.timestamp() * 1000),
            "hour" if days <= 7 else "day",
            since_day.isoformat(),
            until_day.isoformat(),
        )
    label = params.get("window") or DEFAULT_WINDOW
    if label not in WINDOWS:
        raise Refusal(400, "invalid_window", f"window is one of {', '.join(WINDOWS)}")
    span, bucket = WINDOWS[label]
    return Window(label, now - span, now, bucket)


def query(request: Request, allowed: frozenset[str]) -> dict[str, str]:
    """The query parameters, each at most once, each one the page takes, none too long."""
    params: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name not in allowed:
            raise Refusal(400, "unknown_parameter", f"this page does not take {name!r}")
        if name in params:
            raise Refusal(400, "repeated_parameter", f"{name!r} given more than once")
        if len(value) > MAX_VALUE:
            raise Refusal(400, "invalid_value", f"{name!r} is longer than {MAX_VALUE} characters")
        params[name] = value
    return params


def refused(exc: QueryError) -> Refusal:
    return Refusal(400, exc.code, exc.message)


def path_id(request: Request, name: str, what: str) -> int:
    value = parse_int(request.path_params[name], 1)
    if value is None:
        raise Refusal(400, "invalid_id", f"a {what} id is a whole number")
    return value


def crash_id(request: Request) -> str:
    value: str = request.path_params["crash_id"]
    if not is_crash_id(value):
        raise Refusal(400, "invalid_id", "a crash id is 32 hex digits")
    return value


def base_path(request: Request) -> str:
    """Where the dashboard is mounted (``/dashboard``, or under a host app's prefix)."""
    root: str = request.scope.get("root_path", "")
    return root


def link(path: str, params: Mapping[str, object] | None = None) -> str:
    """``path`` with the non-empty ``params`` as its query string."""
    kept = {k: str(v) for k, v in (params or {}).items() if v is not None and v != ""}
    return f"{path}?{urlencode(kept)}" if kept else path


def when(value: object) -> str:
    """An ISO time as the pages show it (UTC, to the minute); anything else as text."""
    if not isinstance(value, str) or len(value) < 16:
        return "" if value is None else str(value)
    return value[:10] + " " + value[11:16]


def number(value: object) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def percent(part: int, whole: int) -> str:
    if whole <= 0:
        return "-"
    share = 100 * part / whole
    return f"{share:.1f}%" if share >= 0.1 else "<0.1%"


def change(item: Mapping[str, Any]) -> str:
    """The change of an issue's count against the window before."""
    ratio = item.get("change")
    if ratio is None:
        return "new" if item.get("window_count") else "-"
    return f"{100 * ratio:+.0f}%"


def pretty_json(value: object) -> str:
    """JSON for a ``<pre>``, indented, cut at ``MAX_JSON_CHARS`` (escaped by the template)."""
    text = orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS).decode()
    if len(text) > MAX_JSON_CHARS:
        return text[:MAX_JSON_CHARS] + f"\n… ({len(text) - MAX_JSON_CHARS:,} more characters)"
    return text


_ENV.filters.update(when=when, number=number, pretty_json=pretty_json, change=change)
_ENV.globals.update(link=link, percent=percent)


def render(
    request: Request,
    template: str,
    page: str,
    title: str,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
    **context: Any,
) -> HTMLResponse:
    """A page: ``template`` inside the layout, with the session's CSRF token and rights."""
    session: Session | None = session_of(request)
    html = _ENV.get_template(template).render(
        base=base_path(request),
        page=page,
        title=title,
        session=session,
        **context,
    )
    return HTMLResponse(html, status_code=status, headers=headers)


def error_page(request: Request, status: int, code: str, message: str) -> HTMLResponse:
    title = f"{status} {code}"
    return render(request, "error.html", "error", title, status=status, code=code, message=message)
