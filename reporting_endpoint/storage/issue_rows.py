"""The engine-neutral parts of the issue storage, shared by ``storage/postgres`` and
``storage/sqlite``: the issue columns, the issue JSON, the window and its hours, the series
shape and the page cursor, and the pure parts of the tally (breakdown values, release
order, stored status). No SQL and no driver here; each engine keeps its own statements.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterable, Sequence
from typing import Any

import orjson

from reporting_endpoint.issues.triage import STATUSES, Status, release_newer
from reporting_endpoint.storage.base import DEFAULT_ISSUE_WINDOW_MS
from reporting_endpoint.storage.filters import HOUR_MS
from reporting_endpoint.storage.rows import stored_time, texts

ISSUE_COLUMNS = (
    "id", "fingerprint", "kind", "title", "site", "status", "resolved_in_release",
    "ignore_until_ms", "ignore_until_count", "event_count", "first_seen", "last_seen",
    "first_release", "last_release", "created_at", "status_changed_at",
)  # fmt: skip

# Points of an issue's series at most: hourly up to a week, then buckets of whole days.
MAX_SERIES_POINTS = 168
# Breakdown values shown per dimension: on a page (browsers, OSes) and on one issue.
PAGE_TOP = 5
ISSUE_TOP = 20
BREAKDOWN_DIMENSIONS = (
    "browser", "browser_major", "os", "release", "path", "visibility_state", "is_top_level",
)  # fmt: skip


def window(since: int | None, until: int | None, now_ms: int | None = None) -> tuple[int, int]:
    """The window [since, until) in ms: ``until`` defaults to now, ``since`` to a day before."""
    end = (
        until
        if until is not None
        else (now_ms if now_ms is not None else time.time_ns() // 1_000_000)
    )
    start = since if since is not None else end - DEFAULT_ISSUE_WINDOW_MS
    if start >= end:
        raise ValueError("since must be before until")
    return start, end


def window_hours(start: int, end: int) -> tuple[int, int]:
    """The whole hours a window covers (counters are hourly), inclusive."""
    return start // HOUR_MS, (end - 1) // HOUR_MS


def encode_cursor(value: int, issue_id: int) -> str:
    return base64.urlsafe_b64encode(f"{value}:{issue_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, int]:
    """The (sort value, id) of a cursor; ``ValueError`` for anything else."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        value, issue_id = text.split(":")
        return int(value), int(issue_id)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError("not a cursor of this query") from exc


def issue_json(row: Sequence[Any], window_count: int, previous_count: int) -> dict[str, Any]:
    """An issue's JSON from its ``ISSUE_COLUMNS`` row and its window's and previous counts."""
    (iid, fingerprint, kind, title, site, status, resolved_in, ignore_until, ignore_count,
     count, first_seen, last_seen, first_release, last_release, _created,
     _changed) = texts(row)  # fmt: skip
    return {
        "id": iid,
        "fingerprint": fingerprint,
        "kind": kind,
        "title": title,
        "site": site,
        "status": status,
        "resolved_in_release": resolved_in,
        "ignore_until": None if ignore_until is None else stored_time(ignore_until),
        "ignore_until_count": ignore_count,
        "count": count,
        "window_count": window_count,
        "previous_count": previous_count,
        "change": (window_count / previous_count - 1) if previous_count else None,
        "first_seen": stored_time(first_seen),
        "last_seen": stored_time(last_seen),
        "first_release": first_release,
        "last_release": last_release,
    }


def series_shape(first_hour: int, last_hour: int) -> tuple[int, int]:
    """(hours per point, points): hourly up to ``MAX_SERIES_POINTS`` hours, else whole days,
    as many days per point as keeps the series within the bound."""
    hours = last_hour - first_hour + 1
    if hours <= MAX_SERIES_POINTS:
        return 1, hours
    days = -(-hours // 24)
    step = 24 * -(-days // MAX_SERIES_POINTS)
    return step, -(-hours // step)


def attach_decorations(
    items: list[dict[str, Any]],
    series: dict[int, list[int]],
    breakdowns: dict[int, dict[str, list[dict[str, Any]]]],
    top: int,
) -> None:
    """Put each item's series and top breakdown values on it: browsers and OSes on a page
    (``top == PAGE_TOP``), and every dimension as well on one issue."""
    for item in items:
        item["series"] = series[item["id"]]
        found = breakdowns[item["id"]]
        if top == PAGE_TOP:
            item["browsers"] = found["browser"]
            item["os"] = found["os"]
        else:
            item["browsers"] = found["browser"][:PAGE_TOP]
            item["os"] = found["os"][:PAGE_TOP]
            item["breakdowns"] = found


def history_json(rows: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
    """An issue's history from its ``issue_history`` rows (at, actor, from_status, to_status,
    reason, resolved_in_release), in the order given."""
    return [
        {
            "at": stored_time(at),
            "actor": actor,
            "from": before,
            "to": after,
            "reason": reason,
            "resolved_in_release": release,
        }
        for at, actor, before, after, reason, release in rows
    ]


# Breakdown values are attacker-controlled text: bounded, so one odd user agent or release
# cannot bloat the table or the page.
MAX_VALUE = 200


def bounded(value: object) -> str | None:
    """A breakdown value as text of at most ``MAX_VALUE`` characters; None for none or ""."""
    if value is None or value == "":
        return None
    text = value if isinstance(value, str) else str(value)
    return text[:MAX_VALUE]


def has_body_dims(raw: str) -> bool:
    """Whether a crash report's raw JSON may carry body breakdown values (a substring test
    spares a JSON parse for the rest)."""
    return '"visibility_state"' in raw or '"is_top_level"' in raw


def crash_body_dims(raw: object) -> list[tuple[str, str]]:
    """The ``visibility_state`` and ``is_top_level`` values of a W3C crash report's body."""
    # Only W3C crash bodies carry these; the substring test spares a JSON parse for the rest.
    if not isinstance(raw, str):
        return []
    if not has_body_dims(raw):
        return []
    try:
        body = orjson.loads(raw).get("body")
    except (orjson.JSONDecodeError, AttributeError):
        return []
    if not isinstance(body, dict):
        return []
    dims: list[tuple[str, str]] = []
    visibility = body.get("visibility_state")
    if isinstance(visibility, str) and visibility:
        dims.append(("visibility_state", visibility[:MAX_VALUE]))
    top = body.get("is_top_level")
    if isinstance(top, bool):
        dims.append(("is_top_level", "true" if top else "false"))
    return dims


def crash_dims(os: object, release: object) -> list[tuple[str, str]]:
    """The breakdown values of one native crash."""
    return [
        (name, value)
        for name, value in (("os", bounded(os)), ("release", bounded(release)))
        if value is not None
    ]


def oldest(values: Iterable[str | None]) -> str | None:
    """The oldest release of ``values`` (None left out), by ``release_newer``."""
    best: str | None = None
    for value in values:
        if value is not None and (best is None or release_newer(best, value)):
            best = value
    return best


def newest(values: Iterable[str | None]) -> str | None:
    """The newest release of ``values`` (None left out), by ``release_newer``."""
    best: str | None = None
    for value in values:
        if value is not None and (best is None or release_newer(value, best)):
            best = value
    return best


def status_of(value: object) -> Status:
    """A stored status; anything else (written by another tool) reads as unresolved."""
    for status in STATUSES:
        if value == status:
            return status
    return "unresolved"
