"""Reading issues from SQLite: the ranked issues page, one issue, and its events.

Counts come from the counters kept at insert (``issue_hourly``, ``issue_breakdown``) and the
daily roll-up of completed days (``issue_daily``): a page costs, per issue of the window, a
range of days plus the hours of the partial days at the edges, for the window and the window
before it, plus a few primary-key reads for the page's own issues, never a scan of the reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import aiosqlite

from reporting_endpoint.storage.base import (
    ISSUE_SORTS,
    IssueFilters,
    IssuePage,
    IssueSort,
    Page,
)
from reporting_endpoint.storage.filters import HOUR_MS, Position
from reporting_endpoint.storage.issue_rows import (
    BREAKDOWN_DIMENSIONS,
    ISSUE_COLUMNS,
    ISSUE_TOP,
    PAGE_TOP,
    attach_decorations,
    decode_cursor,
    encode_cursor,
    history_json,
    issue_json,
    series_shape,
    window,
    window_hours,
)
from reporting_endpoint.storage.rows import (
    CRASH_COLUMNS,
    REPORT_COLUMNS,
    crash_row_to_dict,
    report_row_to_dict,
)
from reporting_endpoint.storage.spans import span
from reporting_endpoint.storage.sqlite.daily import mark_day

_ISSUE_SELECT = ", ".join(f"i.{name}" for name in ISSUE_COLUMNS)
# What the ranking needs of an issue: its id and the columns a sort orders by.
_RANKED = "i.id, i.first_seen, i.last_seen"
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
    first_hour, last_hour = window_hours(start, end)
    step, points = series_shape(first_hour, last_hour)
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
    attach_decorations(items, series, breakdowns, top)


def _count(first_hour: int, last_hour: int, mark: int) -> tuple[str, list[object]]:
    """SQL for the events of issue ``i`` in the hours [first_hour, last_hour]: its whole
    rolled-up days from ``issue_daily``, the other hours from ``issue_hourly``, each a
    primary-key range (only the ranges the window has)."""
    read = span(first_hour, last_hour, mark)
    parts: list[str] = []
    parameters: list[object] = []
    for table, column, ranges in (
        ("issue_hourly", "hour", read.hours), ("issue_daily", "day", read.days)
    ):  # fmt: skip
        for first, last in ranges:
            parts.append(
                f"(SELECT coalesce(sum(count), 0) FROM {table} h WHERE h.issue_id = i.id"
                f" AND h.{column} >= ? AND h.{column} <= ?)"
            )
            parameters.extend([first, last])
    return " + ".join(parts) or "0", parameters


def _query(
    filters: IssueFilters,
    sort: IssueSort,
    start: int,
    end: int,
    mark: int,
    columns: str = _ISSUE_SELECT,
) -> tuple[str, list[object]]:
    """The issues of the page's query with their window and previous counts (columns ``wn``
    and ``pn``) and the sort value (``sv``) after ``columns`` (by default all of them).

    Issues are few next to reports (a scan of them is cheap); the counts are primary-key
    ranges of ``issue_hourly``, read only for issues whose first and last seen overlap the
    hours asked about."""
    if sort not in ISSUE_SORTS:
        raise ValueError(f"no such sort: {sort!r}")
    first_hour, last_hour = window_hours(start, end)
    length = last_hour - first_hour + 1
    previous_hour = first_hour - length
    now_sql, now_parameters = _count(first_hour, last_hour, mark)
    before_sql, before_parameters = _count(previous_hour, first_hour - 1, mark)
    parameters: list[object] = [
        first_hour * HOUR_MS, (last_hour + 1) * HOUR_MS, *now_parameters,
        previous_hour * HOUR_MS, first_hour * HOUR_MS, *before_parameters,
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
    if filters.first_seen_since is not None:
        clauses.append("i.first_seen >= ?")
        parameters.append(filters.first_seen_since)
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
        f"SELECT {columns},"
        f" CASE WHEN i.last_seen >= ? AND i.first_seen < ? THEN {now_sql} ELSE 0 END AS wn,"
        f" CASE WHEN i.last_seen >= ? AND i.first_seen < ? THEN {before_sql} ELSE 0 END AS pn"
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
    # Ranked on narrow rows (the sort of every issue of the window carries no titles), then
    # the page's own issues read whole by id.
    sql, parameters = _query(filters, sort, start, end, await mark_day(connection), _RANKED)
    if after is not None:
        value, issue_id = decode_cursor(after)
        sql = f"SELECT * FROM ({sql}) WHERE sv < ? OR (sv = ? AND id < ?)"
        parameters.extend([value, value, issue_id])
    rows = await _fetch(
        connection, f"{sql} ORDER BY sv DESC, id DESC LIMIT ?", (*parameters, limit + 1)
    )
    shown = rows[:limit]
    found = {
        row[0]: row
        for row in await _fetch(
            connection,
            f"SELECT {_ISSUE_SELECT} FROM issues i WHERE i.id IN ({','.join('?' * len(shown))})",
            [row[0] for row in shown],
        )
    }
    # An issue gone between the two reads (deleted) is left out.
    items = [issue_json(found[row[0]], row[3], row[4]) for row in shown if row[0] in found]
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
    first_hour, last_hour = window_hours(start, end)
    length = last_hour - first_hour + 1
    mark = await mark_day(connection)
    now_sql, now_parameters = _count(first_hour, last_hour, mark)
    before_sql, before_parameters = _count(first_hour - length, first_hour - 1, mark)
    rows = await _fetch(
        connection,
        f"SELECT {_ISSUE_SELECT}, {now_sql}, {before_sql} FROM issues i WHERE i.id = ?",
        (*now_parameters, *before_parameters, issue_id),
    )
    if not rows:
        return None
    width = len(ISSUE_COLUMNS)
    item = issue_json(rows[0][:width], rows[0][width], rows[0][width + 1])
    await _decorate(connection, [item], start, end, ISSUE_TOP, BREAKDOWN_DIMENSIONS)
    item["history"] = history_json(
        await _fetch(
            connection,
            "SELECT at, actor, from_status, to_status, reason, resolved_in_release"
            " FROM issue_history WHERE issue_id = ? ORDER BY id",
            (issue_id,),
        )
    )
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
