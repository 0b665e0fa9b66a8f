"""The read side in SQL: groups, pages, single rows, time series and exports.

Every statement is parameterised; the only names put into one are column names checked
against the dimensions of ``storage.filters`` first. Pages are keyset pages on
(received_at, id), newest first, so inserts meanwhile (always newer than a cursor already
given out) never shift a page: no gaps, no repeats. Each page query fetches one extra row to
tell whether there is a next page.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import aiosqlite

from reporting_endpoint.native.records import symbol_keys
from reporting_endpoint.storage.base import GroupPage, Page, PendingCrash, SeriesCount
from reporting_endpoint.storage.filters import (
    BUCKET_HOURS,
    CRASH_DIMENSIONS,
    HOUR_MS,
    QUARANTINE_DIMENSIONS,
    REPORT_DIMENSIONS,
    Bucket,
    Filters,
    Position,
    Source,
    check_by,
)
from reporting_endpoint.storage.native_rows import (
    NATIVE_COLUMNS,
    stored_modules,
    with_native,
)
from reporting_endpoint.storage.rows import (
    CRASH_COLUMNS,
    QUARANTINE_COLUMNS,
    REPORT_COLUMNS,
    crash_row_to_dict,
    group_rows,
    quarantine_row_to_dict,
    report_row_to_dict,
)
from reporting_endpoint.storage.spans import levels
from reporting_endpoint.storage.sqlite import group_days, symbols
from reporting_endpoint.storage.sqlite.rollups import hourly_table_for, table_for

_REPORTS = ", ".join(REPORT_COLUMNS)
_CRASHES = ", ".join(CRASH_COLUMNS)
_QUARANTINE = ", ".join(QUARANTINE_COLUMNS)
_NATIVE = ", ".join(NATIVE_COLUMNS)
_DIMENSIONS: dict[str, tuple[str, ...]] = {
    "reports": REPORT_DIMENSIONS,
    "crashes": CRASH_DIMENSIONS,
}

Rows = list[tuple[Any, ...]]


async def _fetch(connection: aiosqlite.Connection, sql: str, parameters: Sequence[object]) -> Rows:
    rows = await connection.execute_fetchall(sql, parameters)
    return [tuple(row) for row in rows]


def row_clauses(filters: Filters, dimensions: tuple[str, ...]) -> tuple[list[str], list[object]]:
    """WHERE clauses and parameters for a table of rows (exact received times)."""
    filters.check(dimensions)
    clauses = [f"{name} = ?" for name, _ in filters.equal]
    parameters: list[object] = [value for _, value in filters.equal]
    if filters.since is not None:
        clauses.append("received_at >= ?")
        parameters.append(filters.since)
    if filters.until is not None:
        clauses.append("received_at < ?")
        parameters.append(filters.until)
    return clauses, parameters


def _group_where(filters: Filters, hourly: bool) -> tuple[str, list[object]]:
    """WHERE of a roll-up table: with a window, the hourly one, widened to whole hours."""
    filters.check(REPORT_DIMENSIONS)
    clauses = [f"{name} = ?" for name, _ in filters.equal]
    parameters: list[object] = [value for _, value in filters.equal]
    if hourly and filters.since is not None:
        clauses.append("hour >= ?")
        parameters.append(filters.since // HOUR_MS)
    if hourly and filters.until is not None:
        clauses.append("hour <= ?")
        parameters.append((filters.until - 1) // HOUR_MS)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), parameters


def _where(clauses: list[str]) -> str:
    return " WHERE " + " AND ".join(clauses) if clauses else ""


def _before(after: Position | None, clauses: list[str], parameters: list[object]) -> None:
    if after is not None:
        clauses.append("(received_at < ? OR (received_at = ? AND id < ?))")
        parameters.extend([after.received_at, after.received_at, after.id])


def _page(rows: Rows, limit: int, to_dict: Callable[[tuple[Any, ...]], dict[str, Any]]) -> Page:
    items = tuple(to_dict(row) for row in rows[:limit])
    last = rows[limit - 1] if len(rows) > limit else None
    return Page(items, Position(last[1], last[0]) if last is not None else None)


# --- groups and time series ---------------------------------------------------------------


async def _levels(
    connection: aiosqlite.Connection, by: Sequence[str], filters: Filters
) -> tuple[str, list[object]]:
    """The window's rows of the report roll-ups, each level for the hours it holds."""
    rows = await connection.execute_fetchall(
        "SELECT name, day FROM daily_mark WHERE name IN ('report_day', 'report_hour')"
    )
    marks: dict[str, int] = {str(row[0]): int(row[1]) for row in rows}
    first = filters.since // HOUR_MS if filters.since is not None else 0
    last = (filters.until - 1) // HOUR_MS if filters.until is not None else (1 << 62)
    read = levels(first, last, int(marks.get("report_day", 0)), int(marks.get("report_hour", 0)))
    clauses = "".join(f"{name} = ? AND " for name, _ in filters.equal)
    values = [value for _, value in filters.equal]
    return group_days.window_source(read, by, clauses, values)


async def groups(
    connection: aiosqlite.Connection,
    source: Source,
    by: Sequence[str],
    filters: Filters,
    limit: int,
) -> GroupPage:
    """Counts per group, largest first. Reports come from the roll-up tables (cost: O(groups));
    crashes, few enough, from their table. ``more`` comes from one row past the limit."""
    check_by(tuple(by), _DIMENSIONS[source])
    columns = ", ".join(by)
    if source == "crashes":
        clauses, parameters = row_clauses(filters, CRASH_DIMENSIONS)
        sql = (
            f"SELECT {columns}, count(*) AS n, min(received_at), max(received_at)"
            f" FROM crashes{_where(clauses)} GROUP BY {columns} ORDER BY n DESC, {columns}"
            " LIMIT ?"
        )
    else:
        hourly = filters.since is not None or filters.until is not None
        used = set(by) | filters.names()
        table = hourly_table_for(used) if hourly else table_for(used)
        where, parameters = _group_where(filters, hourly)
        if table == "report_groups_hourly" and used <= set(group_days.KEYS):
            # The finest table has about a row per report: the hours and days rolled up read
            # from the coarse roll-ups instead, the rest (the last hour or so) from it.
            table, parameters = await _levels(connection, by, filters)
            where = ""
        sql = (
            f"SELECT {columns}, sum(count) AS n, min(first_seen), max(last_seen)"
            f" FROM {table}{where} GROUP BY {columns} ORDER BY n DESC, {columns} LIMIT ?"
        )
    rows = await _fetch(connection, sql, (*parameters, limit + 1))
    return GroupPage(tuple(group_rows(by, rows[:limit])), len(rows) > limit)


async def timeseries(
    connection: aiosqlite.Connection,
    source: Source,
    bucket: Bucket,
    by: Sequence[str],
    filters: Filters,
) -> tuple[SeriesCount, ...]:
    """Counts per hour or day: reports from the hourly roll-ups, crashes from their table
    (indexed on time)."""
    check_by(tuple(by), _DIMENSIONS[source])
    hours = BUCKET_HOURS[bucket]
    columns = "".join(f", {name}" for name in by)
    if source == "crashes":
        clauses, parameters = row_clauses(filters, CRASH_DIMENSIONS)
        sql = (
            f"SELECT received_at / {HOUR_MS} / {hours} * {hours} AS b{columns}, count(*)"
            f" FROM crashes{_where(clauses)} GROUP BY b{columns} ORDER BY b{columns}"
        )
    else:
        where, parameters = _group_where(filters, hourly=True)
        table = hourly_table_for(set(by) | filters.names())
        sql = (
            f"SELECT hour / {hours} * {hours} AS b{columns}, sum(count) FROM {table}{where}"
            f" GROUP BY b{columns} ORDER BY b{columns}"
        )
    rows = await _fetch(connection, sql, parameters)
    return tuple(
        SeriesCount(
            int(row[0]),
            tuple(value if value != "" else None for value in row[1 : 1 + len(by)]),
            int(row[-1]),
        )
        for row in rows
    )


# --- reports ------------------------------------------------------------------------------


async def reports_page(
    connection: aiosqlite.Connection, filters: Filters, limit: int, after: Position | None
) -> Page:
    clauses, parameters = row_clauses(filters, REPORT_DIMENSIONS)
    _before(after, clauses, parameters)
    sql = (
        f"SELECT {_REPORTS} FROM reports{_where(clauses)}"
        " ORDER BY received_at DESC, id DESC LIMIT ?"
    )
    rows = await _fetch(connection, sql, (*parameters, limit + 1))
    return _page(rows, limit, report_row_to_dict)


async def get_report(connection: aiosqlite.Connection, report_id: int) -> dict[str, Any] | None:
    rows = await _fetch(connection, f"SELECT {_REPORTS} FROM reports WHERE id = ?", (report_id,))
    return report_row_to_dict(rows[0], with_raw=True) if rows else None


async def iter_reports(
    connection: aiosqlite.Connection, filters: Filters | None, page_size: int
) -> AsyncIterator[dict[str, Any]]:
    """Every matching report, oldest first (by id), in keyset pages so memory stays flat."""
    clauses, base = row_clauses(filters or Filters(), REPORT_DIMENSIONS)
    clauses.append("id > ?")
    sql = f"SELECT {_REPORTS} FROM reports{_where(clauses)} ORDER BY id LIMIT ?"
    last_id = 0
    while True:
        rows = await _fetch(connection, sql, (*base, last_id, page_size))
        if not rows:
            return
        for row in rows:
            yield report_row_to_dict(row)
        last_id = rows[-1][0]


# --- crashes ------------------------------------------------------------------------------


async def crash_page(
    connection: aiosqlite.Connection, filters: Filters, limit: int, after: Position | None
) -> Page:
    clauses, parameters = row_clauses(filters, CRASH_DIMENSIONS)
    _before(after, clauses, parameters)
    sql = (
        f"SELECT {_CRASHES} FROM crashes{_where(clauses)}"
        " ORDER BY received_at DESC, id DESC LIMIT ?"
    )
    rows = await _fetch(connection, sql, (*parameters, limit + 1))
    return _page(rows, limit, crash_row_to_dict)


async def get_crash(connection: aiosqlite.Connection, crash_id: str) -> dict[str, Any] | None:
    """One crash with its modules (each saying whether its symbols are stored) and frames."""
    rows = await _fetch(
        connection, f"SELECT {_CRASHES}, issue_id, {_NATIVE} FROM crashes WHERE id = ?", (crash_id,)
    )
    if not rows:
        return None
    *row, issue_id, modules_text, frames = rows[0]
    modules = stored_modules(modules_text)
    present = await symbols.present(connection, symbol_keys(modules))
    crash = with_native(crash_row_to_dict(row), modules, frames, present)
    # The issue the crash is counted in (None until processed, or without a signature).
    crash["issue_id"] = None if issue_id is None else int(issue_id)
    return crash


async def crash_dump_path(connection: aiosqlite.Connection, crash_id: str) -> str | None:
    rows = await _fetch(connection, "SELECT dump_path FROM crashes WHERE id = ?", (crash_id,))
    return str(rows[0][0]) if rows else None


async def pending_crashes(connection: aiosqlite.Connection, limit: int) -> tuple[PendingCrash, ...]:
    rows = await _fetch(
        connection,
        "SELECT id, dump_path FROM crashes WHERE parse_status = 'pending'"
        " ORDER BY received_at LIMIT ?",
        (limit,),
    )
    return tuple(PendingCrash(str(crash_id), str(path)) for crash_id, path in rows)


async def iter_crashes(
    connection: aiosqlite.Connection, filters: Filters | None, page_size: int
) -> AsyncIterator[dict[str, Any]]:
    """Every matching crash, oldest first, in keyset pages on (received_at, id)."""
    clauses, base = row_clauses(filters or Filters(), CRASH_DIMENSIONS)
    where = _where(clauses)
    after = f"{' AND' if clauses else ' WHERE'} (received_at > ? OR (received_at = ? AND id > ?))"
    first = f"SELECT {_CRASHES} FROM crashes{where} ORDER BY received_at, id LIMIT ?"
    rest = f"SELECT {_CRASHES} FROM crashes{where}{after} ORDER BY received_at, id LIMIT ?"
    rows = await _fetch(connection, first, (*base, page_size))
    while rows:
        for row in rows:
            yield crash_row_to_dict(row)
        received_at, crash_id = rows[-1][1], rows[-1][0]
        rows = await _fetch(
            connection, rest, (*base, received_at, received_at, crash_id, page_size)
        )


# --- quarantine -----------------------------------------------------------------------------


async def quarantine_page(
    connection: aiosqlite.Connection, filters: Filters, limit: int, after: Position | None
) -> Page:
    clauses, parameters = row_clauses(filters, QUARANTINE_DIMENSIONS)
    _before(after, clauses, parameters)
    sql = (
        f"SELECT {_QUARANTINE} FROM quarantine{_where(clauses)}"
        " ORDER BY received_at DESC, id DESC LIMIT ?"
    )
    rows = await _fetch(connection, sql, (*parameters, limit + 1))
    return _page(rows, limit, quarantine_row_to_dict)


async def get_quarantined(connection: aiosqlite.Connection, row_id: int) -> dict[str, Any] | None:
    sql = f"SELECT {_QUARANTINE} FROM quarantine WHERE id = ?"
    rows = await _fetch(connection, sql, (row_id,))
    return quarantine_row_to_dict(rows[0]) if rows else None


async def quarantine_counts(connection: aiosqlite.Connection) -> tuple[tuple[str, int], ...]:
    rows = await _fetch(
        connection,
        "SELECT code, count(*) AS n FROM quarantine GROUP BY code ORDER BY n DESC, code",
        (),
    )
    return tuple((str(code), int(n)) for code, n in rows)
