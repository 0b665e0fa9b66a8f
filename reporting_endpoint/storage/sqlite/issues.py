"""Reading issues from SQLite: the ranked issues page, one issue, and its events.

Counts come from the counters kept at insert (``issue_hourly``, ``issue_breakdown``): a page
costs a range of the hourly table for the window and the window before it, plus a few
primary-key reads for the page's own issues, never a scan of the reports.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Sequence
from typing import Any

import aiosqlite

from reporting_endpoint.storage.base import (
    DEFAULT_ISSUE_WINDOW_MS,
    ISSUE_SORTS,
    IssueFilters,
    IssuePage,
    IssueSort,
    Page,
)
from reporting_endpoint.storage.filters import HOUR_MS, Position
from reporting_endpoint.storage.rows import (
    CRASH_COLUMNS,
    REPORT_COLUMNS,
    crash_row_to_dict,
    report_row_to_dict,
    stored_time,
    texts,
)
from reporting_endpoint.storage.sqlite.issue_counts import ISSUE_COLUMNS

# Points of an issue's series at most: hourly up to a week, then buckets of whole days.
MAX_SERIES_POINTS = 168
# Breakdown values shown per dimension: on a page (browsers, OSes) and on one issue.
PAGE_TOP = 5
ISSUE_TOP = 20
BREAKDOWN_DIMENSIONS = (
    "browser", "browser_major", "os", "release", "path", "visibility_state", "is_top_level",
)  # fmt: skip
_ISSUE_SELECT = ", ".join(f"i.{name}" for name in ISSUE_COLUMNS)
# The value each sort orders by (descending, then id descending), as SQL over the query below.
_SORT_VALUE: dict[str, str] = {
    "count": "wn",
    "last_seen": "last_seen",
    "first_seen": "first_seen",
    "trend": "wn - pn",
}

Rows = list[tuple[Any, ...]]


async def _fetch(connection: aiosqlite.Connection, sql: str, parameters: Sequence[object]) -> Rows:
    rows = await connection.execute_fetchall(sql, parameters)
    return [tuple(row) for row in rows]


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


def _hours(start: int, end: int) -> tuple[int, int]:
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


def _issue_json(row: Sequence[Any], window_count: int, previous_count: int) -> dict[str, Any]:
    (iid, fingerprint, kind, title, site, status, resolved_in, ignore_until, ignore_count,
     count, first_seen, last_seen, first_release, last_release) = texts(row)[:14]  # fmt: skip
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


def _series_shape(first_hour: int, last_hour: int) -> tuple[int, int]:
    """(hours per point, points): hourly up to ``MAX_SERIES_POINTS`` hours, else whole days,
    as many days per point as keeps the series within the bound."""
    hours = last_hour - first_hour + 1
    if hours <= MAX_SERIES_POINTS:
        return 1, hours
    days = -(-hours // 24)
    step = 24 * -(-days // MAX_SERIES_POINTS)
    return step, -(-hours // step)


async def _decorate(
    connection: aiosqlite.Connection,
    items: list[dict[str, Any]],
    start: int,
    end: int,
    top: int,
    dimensions: Sequence[str],
) -> None:
    """Add the series of the window and the top breakdown values to each item."""
    if not items:
        return
    ids = [item["id"] for item in items]
    marks = ",".join("?" * len(ids))
    first_hour, last_hour = _hours(start, end)
    step, points = _series_shape(first_hour, last_hour)
    series: dict[int, list[int]] = {iid: [0] * points for iid in ids}
    for iid, hour, count in await _fetch(
        connection,
        f"SELECT issue_id, hour, count FROM issue_hourly WHERE issue_id IN ({marks})"
        " AND hour >= ? AND hour <= ?",
        (*ids, first_hour, last_hour),
    ):
        series[iid][(hour - first_hour) // step] += count
    breakdowns: dict[int, dict[str, list[dict[str, Any]]]] = {
        iid: {name: [] for name in dimensions} for iid in ids
    }
    dim_marks = ",".join("?" * len(dimensions))
    # Top values per (issue, dimension) with a window function: one statement for the page.
    for iid, dimension, value, count in await _fetch(
        connection,
        "SELECT issue_id, dimension, value, count FROM (SELECT issue_id, dimension, value,"
        " count, row_number() OVER (PARTITION BY issue_id, dimension"
        " ORDER BY count DESC, value) AS rank FROM issue_breakdown"
        f" WHERE issue_id IN ({marks}) AND dimension IN ({dim_marks})) WHERE rank <= ?"
        " ORDER BY issue_id, dimension, rank",
        (*ids, *dimensions, top),
    ):
        breakdowns[iid][dimension].append({"value": value, "count": count})
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


def _query(
    filters: IssueFilters, sort: IssueSort, start: int, end: int
) -> tuple[str, list[object]]:
    """The issues of the page's query with their window and previous counts (columns ``wn``
    and ``pn``) and the sort value (``sv``) after the issue's columns.

    Issues are few next to reports (a scan of them is cheap); the counts are primary-key
    ranges of ``issue_hourly``, read only for issues whose first and last seen overlap the
    hours asked about."""
    if sort not in ISSUE_SORTS:
        raise ValueError(f"no such sort: {sort!r}")
    first_hour, last_hour = _hours(start, end)
    length = last_hour - first_hour + 1
    previous_hour = first_hour - length
    parameters: list[object] = [
        first_hour * HOUR_MS, (last_hour + 1) * HOUR_MS, first_hour, last_hour,
        previous_hour * HOUR_MS, first_hour * HOUR_MS, previous_hour, first_hour - 1,
    ]  # fmt: skip
    clauses: list[str] = []
    for column, value in (
        ("status", filters.status),
        ("kind", filters.kind),
        ("site", filters.site),
    ):
        if value is not None:
            clauses.append(f"i.{column} = ?")
            parameters.append(value)
    if filters.status is None:
        # Only issues with an event in the window are listed.
        clauses.append("i.last_seen >= ? AND i.first_seen < ?")
        parameters.extend([first_hour * HOUR_MS, (last_hour + 1) * HOUR_MS])
    for dimension, value in (
        ("release", filters.release), ("browser", filters.browser), ("os", filters.os)
    ):  # fmt: skip
        if value is not None:
            clauses.append(
                "EXISTS (SELECT 1 FROM issue_breakdown b WHERE b.issue_id = i.id"
                " AND b.dimension = ? AND b.value = ?)"
            )
            parameters.append(dimension)
            parameters.append(value)
    counted = (
        f"SELECT {_ISSUE_SELECT},"
        " CASE WHEN i.last_seen >= ? AND i.first_seen < ? THEN (SELECT coalesce(sum(count), 0)"
        "  FROM issue_hourly h WHERE h.issue_id = i.id AND h.hour >= ? AND h.hour <= ?)"
        "  ELSE 0 END AS wn,"
        " CASE WHEN i.last_seen >= ? AND i.first_seen < ? THEN (SELECT coalesce(sum(count), 0)"
        "  FROM issue_hourly h WHERE h.issue_id = i.id AND h.hour >= ? AND h.hour <= ?)"
        "  ELSE 0 END AS pn"
        " FROM issues i" + (" WHERE " + " AND ".join(clauses) if clauses else "")
    )
    sql = f"SELECT *, {_SORT_VALUE[sort]} AS sv FROM ({counted})" + (
        " WHERE wn > 0" if filters.status is None else ""
    )
    return sql, parameters


async def issues_page(
    connection: aiosqlite.Connection,
    filters: IssueFilters,
    sort: IssueSort,
    limit: int,
    after: str | None,
) -> IssuePage:
    start, end = window(filters.since, filters.until)
    sql, parameters = _query(filters, sort, start, end)
    if after is not None:
        value, issue_id = decode_cursor(after)
        sql = f"SELECT * FROM ({sql}) WHERE sv < ? OR (sv = ? AND id < ?)"
        parameters.extend([value, value, issue_id])
    rows = await _fetch(
        connection, f"{sql} ORDER BY sv DESC, id DESC LIMIT ?", (*parameters, limit + 1)
    )
    width = len(ISSUE_COLUMNS)
    items = [_issue_json(row[:width], row[width], row[width + 1]) for row in rows[:limit]]
    await _decorate(connection, items, start, end, PAGE_TOP, ("browser", "os"))
    following = None
    if len(rows) > limit:
        last = rows[limit - 1]
        following = encode_cursor(int(last[-1]), int(last[0]))
    return IssuePage(tuple(items), following)


async def get_issue(
    connection: aiosqlite.Connection, issue_id: int, since: int | None, until: int | None
) -> dict[str, Any] | None:
    start, end = window(since, until)
    first_hour, last_hour = _hours(start, end)
    length = last_hour - first_hour + 1
    rows = await _fetch(
        connection,
        f"SELECT {_ISSUE_SELECT},"
        " (SELECT coalesce(sum(count), 0) FROM issue_hourly WHERE issue_id = i.id"
        "  AND hour >= ? AND hour <= ?),"
        " (SELECT coalesce(sum(count), 0) FROM issue_hourly WHERE issue_id = i.id"
        "  AND hour >= ? AND hour <= ?)"
        " FROM issues i WHERE i.id = ?",
        (first_hour, last_hour, first_hour - length, first_hour - 1, issue_id),
    )
    if not rows:
        return None
    width = len(ISSUE_COLUMNS)
    item = _issue_json(rows[0][:width], rows[0][width], rows[0][width + 1])
    await _decorate(connection, [item], start, end, ISSUE_TOP, BREAKDOWN_DIMENSIONS)
    item["history"] = [
        {
            "at": stored_time(at),
            "actor": actor,
            "from": before,
            "to": after,
            "reason": reason,
            "resolved_in_release": release,
        }
        for at, actor, before, after, reason, release in await _fetch(
            connection,
            "SELECT at, actor, from_status, to_status, reason, resolved_in_release"
            " FROM issue_history WHERE issue_id = ? ORDER BY id",
            (issue_id,),
        )
    ]
    return item


async def issue_events(
    connection: aiosqlite.Connection, issue_id: int, limit: int, after: Position | None
) -> Page:
    kind = await _fetch(connection, "SELECT kind FROM issues WHERE id = ?", (issue_id,))
    if not kind:
        return Page((), None)
    native = kind[0][0] == "native"
    table, columns = ("crashes", CRASH_COLUMNS) if native else ("reports", REPORT_COLUMNS)
    to_dict = crash_row_to_dict if native else report_row_to_dict
    clauses = ["issue_id = ?"]
    parameters: list[object] = [issue_id]
    if after is not None:
        clauses.append("(received_at < ? OR (received_at = ? AND id < ?))")
        parameters.extend([after.received_at, after.received_at, after.id])
    rows = await _fetch(
        connection,
        f"SELECT {', '.join(columns)} FROM {table} WHERE {' AND '.join(clauses)}"
        " ORDER BY received_at DESC, id DESC LIMIT ?",
        (*parameters, limit + 1),
    )
    items = tuple(to_dict(row) for row in rows[:limit])
    last = rows[limit - 1] if len(rows) > limit else None
    return Page(items, Position(last[1], last[0]) if last is not None else None)
