"""Whole rows out and in, for ``copy``: export in (received_at, id) order, import keeping ids.

Exports read the backend's read-only connection; imports are writer jobs (the caller, the
writer, owns the transaction). An import first asks which of the batch's ids are present, then
inserts only the others: the roll-up counters are bumped for exactly the rows inserted, so
a batch imported twice (a copy resumed after a kill) changes nothing.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

import aiosqlite
import orjson

from reporting_endpoint.storage.base import Counts, RawRow, RowKind, TableCount
from reporting_endpoint.storage.filters import Position
from reporting_endpoint.storage.rows import EXPORT_COLUMNS, REPORT_COLUMNS
from reporting_endpoint.storage.sqlite.rollups import HOURLY_TABLES, TOTAL_TABLES, count_reports


def _columns(kind: RowKind) -> tuple[str, ...]:
    # The table name is the kind; checked here because it becomes part of a statement.
    if kind not in EXPORT_COLUMNS:
        raise ValueError(f"no such table: {kind!r}")
    return EXPORT_COLUMNS[kind]


async def export_batch(
    connection: aiosqlite.Connection,
    kind: RowKind,
    limit: int,
    after: Position | None,
    since: int | None,
) -> tuple[RawRow, ...]:
    columns = ", ".join(_columns(kind))
    parameters: tuple[object, ...]
    if after is not None:
        # received_at >= ? first, so the (received_at, id) index bounds the range.
        where = " WHERE received_at >= ? AND (received_at > ? OR id > ?)"
        parameters = (after.received_at, after.received_at, after.id)
    elif since is not None:
        where = " WHERE received_at >= ?"
        parameters = (since,)
    else:
        where, parameters = "", ()
    sql = f"SELECT {columns} FROM {kind}{where} ORDER BY received_at, id LIMIT ?"
    rows = await connection.execute_fetchall(sql, (*parameters, limit))
    return tuple(tuple(row) for row in rows)


def import_rows(connection: sqlite3.Connection, kind: RowKind, rows: Sequence[RawRow]) -> int:
    """Insert the rows whose ids are not present yet (with their ids); counters for reports.
    The caller owns the transaction (``BEGIN IMMEDIATE``: nothing else writes meanwhile, so
    the ids found absent are still absent at the insert)."""
    columns = _columns(kind)
    if not rows:
        return 0
    wanted = orjson.dumps([row[0] for row in rows]).decode()
    present = {
        row[0]
        for row in connection.execute(
            f"SELECT id FROM {kind} WHERE id IN (SELECT value FROM json_each(?))", (wanted,)
        )
    }
    new = [tuple(row) for row in rows if row[0] not in present]
    if not new:
        return 0
    connection.executemany(
        f"INSERT INTO {kind} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
        new,
    )
    if kind == "reports":
        # The id is the first column; the roll-ups take the report columns after it, in
        # NewReport.row() order (the release after them is no roll-up key). Issues do not
        # travel: the exported row has no issue columns (the same shape for every engine),
        # so imported events belong to no issue until ``regroup`` runs at the target with
        # its fingerprint rules and each event's release, which does travel.
        count_reports(connection, [row[1 : len(REPORT_COLUMNS)] for row in new])
    return len(new)


async def counts(connection: aiosqlite.Connection) -> Counts:
    tables: dict[str, TableCount] = {}
    for kind in EXPORT_COLUMNS:
        rows = await connection.execute_fetchall(
            f"SELECT count(*), max(received_at) FROM {kind}", ()
        )
        number, last = next(iter(rows))
        tables[kind] = TableCount(int(number), None if last is None else int(last))
    totals = []
    for table in (*HOURLY_TABLES, *TOTAL_TABLES):
        rows = await connection.execute_fetchall(f"SELECT coalesce(sum(count), 0) FROM {table}", ())
        totals.append(int(next(iter(rows))[0]))
    return Counts(tables["reports"], tables["crashes"], tables["quarantine"], tuple(totals))
