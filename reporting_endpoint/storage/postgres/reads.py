"""The read side in PostgreSQL: groups, pages, single rows, time series, exports and blobs.

The same questions as ``storage/sqlite/reads.py``, answered as the same JSON (the rows go
through ``storage.rows`` in its column orders), so the API is byte-identical on both engines.
Each function takes the backend's read pool first, then the protocol's arguments; every
statement is one pool call (a connection is never held across an ``await`` of the caller).

Every value is a ``$n`` parameter; the only names put into a statement are column names
checked against the dimensions of ``storage.filters`` first, and table names from this module.

Where PostgreSQL's defaults differ from SQLite's, the statements say what SQLite does:

- Text is ordered ``COLLATE "C"`` (byte order, as SQLite's BINARY), whatever collation the
  database was created with; otherwise the order of groups with equal counts and of crash ids
  would depend on the server's locale.
- NULL sorts first in ascending order, as in SQLite (PostgreSQL puts it last by default): only
  the crash table has NULL keys (the roll-ups store '' for "none").
- ``sum(count)`` is cast back to bigint (PostgreSQL sums bigint into numeric, which asyncpg
  answers as ``Decimal``).

A text value holding U+0000 cannot be stored in PostgreSQL (nor sent as a parameter), so a
filter or id holding one matches nothing, as it would in SQLite, instead of failing the query.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any, TypeAlias

import asyncpg
import orjson

from reporting_endpoint.native.records import symbol_keys
from reporting_endpoint.storage.base import Blob, GroupPage, Page, PendingCrash, SeriesCount
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
from reporting_endpoint.storage.postgres import group_days, symbols
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

# A string, so nothing subscripts asyncpg.Pool at run time (it is generic in the stubs only).
PgPool: TypeAlias = "asyncpg.Pool[asyncpg.Record]"
Row = tuple[Any, ...]

_REPORTS = ", ".join(REPORT_COLUMNS)
_CRASHES = ", ".join(CRASH_COLUMNS)
_QUARANTINE = ", ".join(QUARANTINE_COLUMNS)
_NATIVE = ", ".join(NATIVE_COLUMNS)
_DIMENSIONS: dict[str, tuple[str, ...]] = {
    "reports": REPORT_DIMENSIONS,
    "crashes": CRASH_DIMENSIONS,
}
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1

# The roll-ups of migrations/0002_report_groups.sql, finest first: a query reads the smallest
# one holding every column it groups or filters on (the finest holds them all). The same
# tables and choice as the SQLite backend's rollups.table_for / hourly_table_for.
_TOTAL_TABLES: tuple[tuple[str, frozenset[str]], ...] = (
    ("report_groups", frozenset(REPORT_DIMENSIONS)),
    ("report_groups_site", frozenset({"type", "site", "browser", "reason"})),
)
_HOURLY_TABLES: tuple[tuple[str, frozenset[str]], ...] = (
    ("report_groups_hourly", frozenset(REPORT_DIMENSIONS)),
    ("report_groups_hourly_kind", frozenset({"type", "reason", "browser"})),
)


def _smallest(tables: tuple[tuple[str, frozenset[str]], ...], columns: set[str]) -> str:
    for table, keys in reversed(tables):
        if columns <= keys:
            return table
    return tables[0][0]


class _Statement:
    """WHERE clauses with their ``$n`` parameters, numbered as they are added."""

    def __init__(self) -> None:
        self.clauses: list[str] = []
        self.args: list[object] = []

    def arg(self, value: object) -> str:
        self.args.append(value)
        return f"${len(self.args)}"

    def where(self) -> str:
        return " WHERE " + " AND ".join(self.clauses) if self.clauses else ""


def _unmatchable(values: Iterable[object]) -> bool:
    """Whether a text value holds U+0000: nothing stored can equal it (see the docstring)."""
    return any(isinstance(value, str) and "\x00" in value for value in values)


def _ordered(columns: Sequence[str], nulls_first: bool) -> str:
    """ORDER BY terms for text ``columns`` in SQLite's order (bytes; NULL first)."""
    nulls = " NULLS FIRST" if nulls_first else ""
    return ", ".join(f'{name} COLLATE "C"{nulls}' for name in columns)


def _row_filters(filters: Filters, dimensions: tuple[str, ...]) -> _Statement:
    """Exact matches and the exact [since, until) window, for a table of rows."""
    filters.check(dimensions)
    statement = _Statement()
    for name, value in filters.equal:
        statement.clauses.append(f"{name} = {statement.arg(value)}")
    if filters.since is not None:
        statement.clauses.append(f"received_at >= {statement.arg(filters.since)}")
    if filters.until is not None:
        statement.clauses.append(f"received_at < {statement.arg(filters.until)}")
    return statement


def _rollup_filters(filters: Filters, hourly: bool) -> _Statement:
    """Exact matches on a roll-up table; with a window, an hourly one, widened to whole hours
    (what the counters can tell apart), as the SQLite backend does."""
    filters.check(REPORT_DIMENSIONS)
    statement = _Statement()
    for name, value in filters.equal:
        statement.clauses.append(f"{name} = {statement.arg(value)}")
    if hourly and filters.since is not None:
        statement.clauses.append(f"hour >= {statement.arg(filters.since // HOUR_MS)}")
    if hourly and filters.until is not None:
        statement.clauses.append(f"hour <= {statement.arg((filters.until - 1) // HOUR_MS)}")
    return statement


async def _fetch(pool: PgPool, sql: str, args: Sequence[object]) -> list[Row]:
    return [tuple(record) for record in await pool.fetch(sql, *args)]


def _page(rows: list[Row], limit: int, to_dict: Callable[[Row], dict[str, Any]]) -> Page:
    """The first ``limit`` rows; the extra one fetched says whether a next page exists."""
    items = tuple(to_dict(row) for row in rows[:limit])
    last = rows[limit - 1] if len(rows) > limit else None
    return Page(items, Position(last[1], last[0]) if last is not None else None)


def _int_id(value: int) -> bool:
    """Whether ``value`` fits a bigint id column (a larger one names no row; asyncpg would
    refuse to send it)."""
    return _I64_MIN <= value <= _I64_MAX


# --- groups and time series ---------------------------------------------------------------


async def _levels(pool: PgPool, by: Sequence[str], filters: Filters) -> tuple[str, _Statement]:
    """The window's rows of the report roll-ups, each level for the hours it holds."""
    marks: dict[str, int] = dict(
        await _fetch(
            pool,
            "SELECT name, day FROM daily_mark WHERE name IN ('report_day', 'report_hour')",
            (),
        )
    )
    first = filters.since // HOUR_MS if filters.since is not None else 0
    last = (filters.until - 1) // HOUR_MS if filters.until is not None else (1 << 62)
    read = levels(first, last, int(marks.get("report_day", 0)), int(marks.get("report_hour", 0)))
    statement = _Statement()
    equal = "".join(f"{name} = {statement.arg(value)} AND " for name, value in filters.equal)
    return group_days.window_source(read, by, equal, statement.arg), statement


async def groups(
    pool: PgPool, source: Source, by: Sequence[str], filters: Filters, limit: int
) -> GroupPage:
    """Counts per group, largest first (ties in byte order of the key). Reports come from the
    roll-up tables (cost: O(groups)); crashes, few enough, from their table. ``more`` comes
    from one row past the limit."""
    check_by(tuple(by), _DIMENSIONS[source])
    if not by:
        raise ValueError("groups need at least one dimension to group by")
    columns = ", ".join(by)
    if source == "crashes":
        statement = _row_filters(filters, CRASH_DIMENSIONS)
        select = "count(*) AS n, min(received_at), max(received_at)"
        table, nulls_first = "crashes", True
    else:
        hourly = filters.since is not None or filters.until is not None
        used = set(by) | filters.names()
        table = _smallest(_HOURLY_TABLES if hourly else _TOTAL_TABLES, used)
        statement = _rollup_filters(filters, hourly)
        select = "sum(count)::bigint AS n, min(first_seen), max(last_seen)"
        nulls_first = False
        if table == "report_groups_hourly" and used <= set(group_days.KEYS):
            # The finest table has about a row per report: the hours and days rolled up read
            # from the coarse roll-ups instead, the rest (the last hour or so) from it.
            table, statement = await _levels(pool, by, filters)
    if _unmatchable(statement.args):
        return GroupPage((), False)
    limit_arg = statement.arg(limit + 1)
    sql = (
        f"SELECT {columns}, {select} FROM {table}{statement.where()}"
        f" GROUP BY {columns} ORDER BY n DESC, {_ordered(by, nulls_first)} LIMIT {limit_arg}"
    )
    rows = await _fetch(pool, sql, statement.args)
    return GroupPage(tuple(group_rows(by, rows[:limit])), len(rows) > limit)


async def timeseries(
    pool: PgPool, source: Source, bucket: Bucket, by: Sequence[str], filters: Filters
) -> tuple[SeriesCount, ...]:
    """Counts per hour or day and key, in bucket order: reports from the hourly roll-ups
    (windows widened to whole hours), crashes from their table (indexed on time)."""
    check_by(tuple(by), _DIMENSIONS[source])
    hours = BUCKET_HOURS[bucket]
    columns = "".join(f", {name}" for name in by)
    order = f", {_ordered(by, nulls_first=source == 'crashes')}" if by else ""
    if source == "crashes":
        statement = _row_filters(filters, CRASH_DIMENSIONS)
        sql = (
            f"SELECT received_at / {HOUR_MS} / {hours} * {hours} AS b{columns}, count(*)"
            f" FROM crashes{statement.where()} GROUP BY b{columns} ORDER BY b{order}"
        )
    else:
        statement = _rollup_filters(filters, hourly=True)
        table = _smallest(_HOURLY_TABLES, set(by) | filters.names())
        sql = (
            f"SELECT hour / {hours} * {hours} AS b{columns}, sum(count)::bigint"
            f" FROM {table}{statement.where()} GROUP BY b{columns} ORDER BY b{order}"
        )
    if _unmatchable(statement.args):
        return ()
    rows = await _fetch(pool, sql, statement.args)
    return tuple(
        SeriesCount(
            int(row[0]),
            tuple(value if value != "" else None for value in row[1 : 1 + len(by)]),
            int(row[-1]),
        )
        for row in rows
    )


# --- reports ------------------------------------------------------------------------------


def _before_int(statement: _Statement, after: Position | None) -> None:
    """Newest first, strictly past ``after``: a row comparison, which the (received_at, id)
    primary key of every partition answers directly, and the same bound on received_at
    alone, which PostgreSQL prunes the newer day partitions by (it does not on a row)."""
    if after is not None:
        time, row_id = statement.arg(after.received_at), statement.arg(int(after.id))
        statement.clauses.append(
            f"received_at <= {time} AND (received_at, id) < ({time}, {row_id})"
        )


async def reports_page(
    pool: PgPool, filters: Filters, limit: int, after: Position | None = None
) -> Page:
    """One keyset page of reports, newest first. Rows committed meanwhile never shift the
    pages after a cursor (no gaps, no repeats): they are newer than it, or, when another
    writer commits a row received a moment before the cursor's, simply not in this walk."""
    statement = _row_filters(filters, REPORT_DIMENSIONS)
    if _unmatchable(statement.args):
        return Page((), None)
    _before_int(statement, after)
    sql = (
        f"SELECT {_REPORTS} FROM reports{statement.where()}"
        f" ORDER BY received_at DESC, id DESC LIMIT {statement.arg(limit + 1)}"
    )
    return _page(await _fetch(pool, sql, statement.args), limit, report_row_to_dict)


async def get_report(pool: PgPool, report_id: int) -> dict[str, Any] | None:
    """One report with its ``raw`` JSON (the id index: one probe per day partition)."""
    if not _int_id(report_id):
        return None
    rows = await _fetch(pool, f"SELECT {_REPORTS} FROM reports WHERE id = $1", (report_id,))
    return report_row_to_dict(rows[0], with_raw=True) if rows else None


async def iter_reports(
    pool: PgPool, filters: Filters | None, page_size: int = 1000
) -> AsyncIterator[dict[str, Any]]:
    """Every matching report, oldest first, in keyset pages on (received_at, id) so memory
    stays flat. The key is the primary key, so each page is a short index range of the
    partitions it touches; ids alone would not do, since writers committing in parallel take
    ids out of time order. No connection is held while the caller handles a page."""
    statement = _row_filters(filters or Filters(), REPORT_DIMENSIONS)
    if _unmatchable(statement.args):
        return
    base = list(statement.args)
    where = statement.where()
    n = len(base)
    first = f"SELECT {_REPORTS} FROM reports{where} ORDER BY received_at, id LIMIT ${n + 1}"
    after = (
        f"{' AND' if where else ' WHERE'} received_at >= ${n + 1}"
        f" AND (received_at, id) > (${n + 1}, ${n + 2})"
    )
    rest = f"SELECT {_REPORTS} FROM reports{where}{after} ORDER BY received_at, id LIMIT ${n + 3}"
    rows = await _fetch(pool, first, (*base, page_size))
    while rows:
        for row in rows:
            yield report_row_to_dict(row)
        if len(rows) < page_size:
            return
        received_at, report_id = rows[-1][1], rows[-1][0]
        rows = await _fetch(pool, rest, (*base, received_at, report_id, page_size))


# --- crashes ------------------------------------------------------------------------------

# Crash ids are text: compared in byte order, as ordered. Spelt out rather than as a row
# comparison so that ``received_at`` still bounds the index range whatever the collation.
_CRASH_BEFORE = 'received_at <= {t} AND (received_at < {t} OR id COLLATE "C" < {i})'
_CRASH_AFTER = 'received_at >= {t} AND (received_at > {t} OR id COLLATE "C" > {i})'


async def crash_page(
    pool: PgPool, filters: Filters, limit: int, after: Position | None = None
) -> Page:
    """One keyset page of crashes, newest first."""
    statement = _row_filters(filters, CRASH_DIMENSIONS)
    if after is not None:
        statement.args.extend([after.received_at, str(after.id)])
    if _unmatchable(statement.args):
        return Page((), None)
    if after is not None:
        n = len(statement.args)
        statement.clauses.append(_CRASH_BEFORE.format(t=f"${n - 1}", i=f"${n}"))
    sql = (
        f"SELECT {_CRASHES} FROM crashes{statement.where()}"
        f' ORDER BY received_at DESC, id COLLATE "C" DESC LIMIT {statement.arg(limit + 1)}'
    )
    return _page(await _fetch(pool, sql, statement.args), limit, crash_row_to_dict)


async def get_crash(pool: PgPool, crash_id: str) -> dict[str, Any] | None:
    """One crash with its modules (each saying whether its symbols are stored) and frames."""
    if _unmatchable([crash_id]):
        return None
    rows = await _fetch(
        pool, f"SELECT {_CRASHES}, issue_id, {_NATIVE} FROM crashes WHERE id = $1", (crash_id,)
    )
    if not rows:
        return None
    *row, issue_id, modules_text, frames = rows[0]
    modules = stored_modules(modules_text)
    present = await symbols.present(pool, symbol_keys(modules))
    crash = with_native(crash_row_to_dict(row), modules, frames, present)
    # The issue the crash is counted in (None until processed, or without a signature).
    crash["issue_id"] = None if issue_id is None else int(issue_id)
    return crash


async def crash_dump_path(pool: PgPool, crash_id: str) -> str | None:
    """The dump's blob path (never part of the crash JSON)."""
    if _unmatchable([crash_id]):
        return None
    rows = await _fetch(pool, "SELECT dump_path FROM crashes WHERE id = $1", (crash_id,))
    return str(rows[0][0]) if rows else None


async def pending_crashes(pool: PgPool, limit: int) -> tuple[PendingCrash, ...]:
    """Crashes not parsed yet, oldest first (the partial index on pending rows)."""
    rows = await _fetch(
        pool,
        "SELECT id, dump_path FROM crashes WHERE parse_status = 'pending'"
        ' ORDER BY received_at, id COLLATE "C" LIMIT $1',
        (limit,),
    )
    return tuple(PendingCrash(str(crash_id), str(path)) for crash_id, path in rows)


async def iter_crashes(
    pool: PgPool, filters: Filters | None, page_size: int = 1000
) -> AsyncIterator[dict[str, Any]]:
    """Every matching crash, oldest first, in keyset pages on (received_at, id)."""
    statement = _row_filters(filters or Filters(), CRASH_DIMENSIONS)
    if _unmatchable(statement.args):
        return
    base = list(statement.args)
    where = statement.where()
    n = len(base)
    order = 'ORDER BY received_at, id COLLATE "C"'
    first = f"SELECT {_CRASHES} FROM crashes{where} {order} LIMIT ${n + 1}"
    after = _CRASH_AFTER.format(t=f"${n + 1}", i=f"${n + 2}")
    rest = (
        f"SELECT {_CRASHES} FROM crashes{where}{' AND ' if where else ' WHERE '}{after}"
        f" {order} LIMIT ${n + 3}"
    )
    rows = await _fetch(pool, first, (*base, page_size))
    while rows:
        for row in rows:
            yield crash_row_to_dict(row)
        if len(rows) < page_size:
            return
        received_at, crash_id = rows[-1][1], rows[-1][0]
        rows = await _fetch(pool, rest, (*base, received_at, crash_id, page_size))


# --- quarantine -----------------------------------------------------------------------------


async def quarantine_page(
    pool: PgPool, filters: Filters, limit: int, after: Position | None = None
) -> Page:
    statement = _row_filters(filters, QUARANTINE_DIMENSIONS)
    if _unmatchable(statement.args):
        return Page((), None)
    _before_int(statement, after)
    sql = (
        f"SELECT {_QUARANTINE} FROM quarantine{statement.where()}"
        f" ORDER BY received_at DESC, id DESC LIMIT {statement.arg(limit + 1)}"
    )
    return _page(await _fetch(pool, sql, statement.args), limit, quarantine_row_to_dict)


async def get_quarantined(pool: PgPool, row_id: int) -> dict[str, Any] | None:
    if not _int_id(row_id):
        return None
    sql = f"SELECT {_QUARANTINE} FROM quarantine WHERE id = $1"
    rows = await _fetch(pool, sql, (row_id,))
    return quarantine_row_to_dict(rows[0]) if rows else None


async def quarantine_counts(pool: PgPool) -> tuple[tuple[str, int], ...]:
    """How many quarantined reports per rejection code, largest first."""
    rows = await _fetch(
        pool,
        "SELECT code, count(*) AS n FROM quarantine GROUP BY code"
        ' ORDER BY n DESC, code COLLATE "C"',
        (),
    )
    return tuple((str(code), int(n)) for code, n in rows)


# --- blobs still in use -------------------------------------------------------------------
#
# Attachments are a JSON list in a text column (not jsonb: see migrations/0003_crashes.sql),
# and a row written by another tool may not hold valid JSON: casting it in SQL would fail the
# whole statement (PostgreSQL 15 has no IS JSON test), so the lists are parsed here, row by
# row through a cursor, the way the SQLite backend skips what json_valid refuses.

_CURSOR_PREFETCH = 500


def _attachment_hashes(text: object) -> Iterable[str]:
    """The ``sha256`` of every attachment in one row's list; nothing when it does not parse."""
    if not isinstance(text, str):
        return ()
    try:
        parsed = orjson.loads(text)
    except orjson.JSONDecodeError:
        return ()
    # json_each (the SQLite side) walks an object's values as it walks a list's items.
    items = parsed.values() if isinstance(parsed, dict) else parsed
    if not isinstance(items, Iterable) or isinstance(items, str):
        return ()
    return [
        str(item["sha256"])
        for item in items
        if isinstance(item, dict) and item.get("sha256") is not None
    ]


async def referenced_blobs(pool: PgPool) -> frozenset[str]:
    """The sha256 of every dump and attachment some crash row points at, and of every symbol
    file's text and native debug file (the orphan sweep)."""
    async with pool.acquire() as connection, connection.transaction(readonly=True):
        found = {
            str(record[0])
            for record in await connection.fetch(
                "SELECT dump_sha256 FROM crashes UNION SELECT sym_sha256 FROM symbol_files"
                " UNION SELECT object_sha256 FROM symbol_files WHERE object_sha256 IS NOT NULL"
            )
        }
        async for record in connection.cursor(
            "SELECT attachments FROM crashes WHERE attachments <> '[]'",
            prefetch=_CURSOR_PREFETCH,
        ):
            found.update(_attachment_hashes(record[0]))
    return frozenset(found)


def _like_pattern(text: str) -> str:
    """A LIKE pattern finding ``text`` anywhere (LIKE's own characters escaped)."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


async def unreferenced_blobs(pool: PgPool, blobs: Sequence[Blob]) -> tuple[Blob, ...]:
    """Those of ``blobs`` no crash row (dump or attachment) and no symbol file references
    now, by sha256 order.

    Dumps through their index; attachments from the rows whose list text holds one of the
    hashes at all (a LIKE, no index), parsed to be sure it is an attachment's ``sha256``.
    The writers store lists with orjson, which never escapes the ASCII of a hex hash, so the
    LIKE cannot miss a reference.
    """
    files = {blob.sha256: blob.path for blob in blobs}
    # A hash holding U+0000 cannot be in any row (and cannot be sent): unreferenced.
    wanted = sorted(sha for sha in files if "\x00" not in sha)
    still: set[str] = set()
    if wanted:
        async with pool.acquire() as connection, connection.transaction(readonly=True):
            still.update(
                str(record[0])
                for record in await connection.fetch(
                    "SELECT dump_sha256 FROM crashes WHERE dump_sha256 = ANY($1::text[])"
                    " UNION SELECT sym_sha256 FROM symbol_files WHERE sym_sha256 = ANY($1::text[])"
                    " UNION SELECT object_sha256 FROM symbol_files"
                    " WHERE object_sha256 = ANY($1::text[])",
                    wanted,
                )
            )
            rest = [sha for sha in wanted if sha not in still]
            if rest:
                targets = set(rest)
                async for record in connection.cursor(
                    "SELECT attachments FROM crashes WHERE attachments LIKE ANY($1::text[])",
                    [_like_pattern(sha) for sha in rest],
                    prefetch=_CURSOR_PREFETCH,
                ):
                    still.update(targets.intersection(_attachment_hashes(record[0])))
    return tuple(Blob(sha, path) for sha, path in sorted(files.items()) if sha not in still)
