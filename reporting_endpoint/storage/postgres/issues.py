"""Reading issues from PostgreSQL: the ranked issues page, one issue, and its events.

The same questions and JSON as ``storage/sqlite/issues.py``. Counts come from the counters kept
at insert (``issue_hourly``, ``issue_breakdown``) and the daily roll-up of completed days
(``issue_daily``): a page costs a range of days plus the hours of the partial days at the edges,
for the window and the window before it, plus a few key lookups for the page's own issues,
never a scan of the reports. As in ``reads.py``, text is ordered ``COLLATE "C"`` (SQLite's
byte order), ``sum`` is cast back to bigint, and a text value holding U+0000 matches nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from reporting_endpoint.storage.base import (
    ISSUE_SORTS,
    IssueFilters,
    IssuePage,
    IssueSort,
    Page,
)
from reporting_endpoint.storage.filters import Position
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
from reporting_endpoint.storage.postgres.daily import mark_day
from reporting_endpoint.storage.postgres.reads import PgPool
from reporting_endpoint.storage.rows import (
    CRASH_COLUMNS,
    REPORT_COLUMNS,
    crash_row_to_dict,
    report_row_to_dict,
)
from reporting_endpoint.storage.spans import DAY_HOURS, merged, span

_ISSUE_SELECT = ", ".join(f"i.{name}" for name in ISSUE_COLUMNS)
# The value each sort orders by (descending, then id descending), as SQL over the query below.
_SORT_VALUE: dict[str, str] = {
    "count": "coalesce(c.n, 0)",
    "last_seen": "i.last_seen",
    "first_seen": "i.first_seen",
    "trend": "coalesce(c.n, 0) - coalesce(c.pn, 0)",
}
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1

Rows = list[tuple[Any, ...]]


async def _fetch(pool: PgPool, sql: str, parameters: Sequence[object]) -> Rows:
    return [tuple(record) for record in await pool.fetch(sql, *parameters)]


def _unmatchable(values: Sequence[object]) -> bool:
    return any(isinstance(value, str) and "\x00" in value for value in values)


def _bigint(value: int) -> bool:
    return _I64_MIN <= value <= _I64_MAX


def _decode_cursor(cursor: str) -> tuple[int, int]:
    """The (sort value, id) of a cursor, both bigints; ``ValueError`` for anything else."""
    decoded = decode_cursor(cursor)
    if not all(_bigint(part) for part in decoded):
        raise ValueError("not a cursor of this query")
    return decoded


async def _decorate(
    pool: PgPool,
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
    first_hour, last_hour = window_hours(start, end)
    step, points = series_shape(first_hour, last_hour)
    series: dict[int, list[int]] = {iid: [0] * points for iid in ids}
    for iid, hour, count in await _fetch(
        pool,
        "SELECT issue_id, hour, count FROM issue_hourly WHERE issue_id = ANY($1::bigint[])"
        " AND hour >= $2 AND hour <= $3",
        (ids, first_hour, last_hour),
    ):
        series[iid][(hour - first_hour) // step] += count
    breakdowns: dict[int, dict[str, list[dict[str, Any]]]] = {
        iid: {name: [] for name in dimensions} for iid in ids
    }
    # Top values per (issue, dimension) with a window function: one statement for the page;
    # ties in byte order, as SQLite orders text.
    for iid, dimension, value, count in await _fetch(
        pool,
        "SELECT issue_id, dimension, value, count FROM (SELECT issue_id, dimension, value,"
        " count, row_number() OVER (PARTITION BY issue_id, dimension"
        ' ORDER BY count DESC, value COLLATE "C") AS rank FROM issue_breakdown'
        " WHERE issue_id = ANY($1::bigint[]) AND dimension = ANY($2::text[])) AS t"
        " WHERE rank <= $3 ORDER BY issue_id, dimension, rank",
        (ids, list(dimensions), top),
    ):
        breakdowns[iid][dimension].append({"value": value, "count": count})
    attach_decorations(items, series, breakdowns, top)


def _counted(
    first_hour: int, last_hour: int, mark: int, arg: Callable[[object], str], only: str = ""
) -> str:
    """A CTE body: per issue, its events in the window (``n``) and in the window before it
    (``pn``), from the whole rolled-up days of ``issue_daily`` and the other hours of
    ``issue_hourly``, each an index range (adjacent ranges of the two windows joined);
    ``only``: a condition put first (one issue's primary-key ranges)."""
    length = last_hour - first_hour + 1
    now = span(first_hour, last_hour, mark)
    before = span(first_hour - length, first_hour - 1, mark)
    first = arg(first_hour)
    # Every hour (and day) of the window is at or after first_hour, every one before it not.
    parts = [
        f"SELECT issue_id, count, hour >= {first} AS w FROM issue_hourly"
        f" WHERE {only}hour >= {arg(lo)} AND hour <= {arg(hi)}"
        for lo, hi in merged(now.hours + before.hours)
    ] + [
        f"SELECT issue_id, count, day * {DAY_HOURS} >= {first} AS w FROM issue_daily"
        f" WHERE {only}day >= {arg(lo)} AND day <= {arg(hi)}"
        for lo, hi in merged(now.days + before.days)
    ]
    return (
        "SELECT issue_id, sum(count) FILTER (WHERE w)::bigint AS n,"
        " sum(count) FILTER (WHERE NOT w)::bigint AS pn"
        f" FROM ({' UNION ALL '.join(parts)}) AS u GROUP BY issue_id"
    )


def _query(
    filters: IssueFilters, sort: IssueSort, start: int, end: int, mark: int
) -> tuple[str, list[object]]:
    """The issues of the page's query with their window and previous counts, and the sort
    value as the last column (``sv``)."""
    if sort not in ISSUE_SORTS:
        raise ValueError(f"no such sort: {sort!r}")
    first_hour, last_hour = window_hours(start, end)
    parameters: list[object] = []
    clauses: list[str] = []

    def arg(value: object) -> str:
        parameters.append(value)
        return f"${len(parameters)}"

    counted = _counted(first_hour, last_hour, mark, arg)
    # Without a status filter only issues active in the window are listed (an hourly row
    # exists only for an hour with events, so a window sum is NULL only without any).
    if filters.status is None:
        clauses.append("c.n IS NOT NULL")
    for column, value in (
        ("status", filters.status), ("kind", filters.kind), ("site", filters.site)
    ):  # fmt: skip
        if value is not None:
            clauses.append(f"i.{column} = {arg(value)}")
    if filters.first_seen_since is not None:
        clauses.append(f"i.first_seen >= {arg(filters.first_seen_since)}")
    for dimension, value in (
        ("release", filters.release), ("browser", filters.browser), ("os", filters.os)
    ):  # fmt: skip
        if value is not None:
            clauses.append(
                "EXISTS (SELECT FROM issue_breakdown b WHERE b.issue_id = i.id"
                f" AND b.dimension = {arg(dimension)} AND b.value = {arg(value)})"
            )
    join = "JOIN" if filters.status is None else "LEFT JOIN"
    sql = (
        f"WITH c AS ({counted})"
        f" SELECT {_ISSUE_SELECT}, coalesce(c.n, 0), coalesce(c.pn, 0), {_SORT_VALUE[sort]} AS sv"
        f" FROM issues i {join} c ON c.issue_id = i.id"
        + (" WHERE " + " AND ".join(clauses) if clauses else "")
    )
    return sql, parameters


async def issues_page(
    pool: PgPool, filters: IssueFilters, sort: IssueSort, limit: int, after: str | None
) -> IssuePage:
    start, end = window(filters.since, filters.until)
    sql, parameters = _query(filters, sort, start, end, await mark_day(pool))
    if _unmatchable(parameters):
        return IssuePage((), None)
    n = len(parameters)
    if after is not None:
        value, issue_id = _decode_cursor(after)
        sql = f"SELECT * FROM ({sql}) AS q WHERE sv < ${n + 1} OR (sv = ${n + 1} AND id < ${n + 2})"
        parameters.extend([value, issue_id])
    else:
        sql = f"SELECT * FROM ({sql}) AS q"
    parameters.append(limit + 1)
    rows = await _fetch(
        pool, f"{sql} ORDER BY sv DESC, id DESC LIMIT ${len(parameters)}", parameters
    )
    width = len(ISSUE_COLUMNS)
    items = [issue_json(row[:width], row[width], row[width + 1]) for row in rows[:limit]]
    await _decorate(pool, items, start, end, PAGE_TOP, ("browser", "os"))
    following = None
    if len(rows) > limit:
        last = rows[limit - 1]
        following = encode_cursor(int(last[-1]), int(last[0]))
    return IssuePage(tuple(items), following)


async def get_issue(
    pool: PgPool, issue_id: int, since: int | None, until: int | None
) -> dict[str, Any] | None:
    start, end = window(since, until)
    if not _bigint(issue_id):
        return None
    first_hour, last_hour = window_hours(start, end)
    parameters: list[object] = [issue_id]

    def arg(value: object) -> str:
        parameters.append(value)
        return f"${len(parameters)}"

    counted = _counted(first_hour, last_hour, await mark_day(pool), arg, "issue_id = $1 AND ")
    rows = await _fetch(
        pool,
        f"WITH c AS ({counted}) SELECT {_ISSUE_SELECT}, coalesce(c.n, 0), coalesce(c.pn, 0)"
        " FROM issues i LEFT JOIN c ON c.issue_id = i.id WHERE i.id = $1",
        parameters,
    )
    if not rows:
        return None
    width = len(ISSUE_COLUMNS)
    item = issue_json(rows[0][:width], rows[0][width], rows[0][width + 1])
    await _decorate(pool, [item], start, end, ISSUE_TOP, BREAKDOWN_DIMENSIONS)
    item["history"] = history_json(
        await _fetch(
            pool,
            "SELECT at, actor, from_status, to_status, reason, resolved_in_release"
            " FROM issue_history WHERE issue_id = $1 ORDER BY id",
            (issue_id,),
        )
    )
    return item


async def issue_events(pool: PgPool, issue_id: int, limit: int, after: Position | None) -> Page:
    """The issue's reports (crashes for a ``native`` issue), newest first, keyset paged on
    (received_at, id) through the (issue_id, received_at, id) indexes."""
    if not _bigint(issue_id):
        return Page((), None)
    kind = await _fetch(pool, "SELECT kind FROM issues WHERE id = $1", (issue_id,))
    if not kind:
        return Page((), None)
    native = kind[0][0] == "native"
    table, columns = ("crashes", CRASH_COLUMNS) if native else ("reports", REPORT_COLUMNS)
    to_dict = crash_row_to_dict if native else report_row_to_dict
    clauses = ["issue_id = $1"]
    parameters: list[object] = [issue_id]
    order = "received_at DESC, id DESC"
    if native:
        order = 'received_at DESC, id COLLATE "C" DESC'
    if after is not None:
        if native:
            after_id: object = str(after.id)
            if _unmatchable([after_id]):
                return Page((), None)
            compare = 'id COLLATE "C" < $3'
        else:
            try:
                after_id = int(after.id)
            except ValueError:
                return Page((), None)
            if not _bigint(after_id):
                return Page((), None)
            compare = "id < $3"
        # received_at <= $2 alone too: the day partitions newer than the cursor are pruned.
        clauses.append(f"received_at <= $2 AND (received_at < $2 OR {compare})")
        parameters.extend([after.received_at, after_id])
    parameters.append(limit + 1)
    rows = await _fetch(
        pool,
        f"SELECT {', '.join(columns)} FROM {table} WHERE {' AND '.join(clauses)}"
        f" ORDER BY {order} LIMIT ${len(parameters)}",
        parameters,
    )
    items = tuple(to_dict(row) for row in rows[:limit])
    last = rows[limit - 1] if len(rows) > limit else None
    return Page(items, Position(last[1], last[0]) if last is not None else None)
