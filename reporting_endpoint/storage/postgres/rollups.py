"""Writes reports with their roll-up counters in PostgreSQL; the caller owns the transaction.

The same four roll-up tables and keys as the SQLite backend (``''`` for a missing key). Rows
go in with COPY (one round trip whatever the group's size); each roll-up table then gets one
``INSERT ... SELECT FROM unnest(...) ON CONFLICT (<its primary key>) DO UPDATE`` with the
group's deltas. Several ingest processes commit in parallel here, so every writer touches the
tables in one fixed order and the keys of each table in one sorted order: two transactions
that share groups then wait for each other instead of deadlocking.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import asyncpg

from reporting_endpoint.storage.filters import HOUR_MS, REPORT_DIMENSIONS

# Column order of NewReport.row(), the order COPY sends.
REPORT_INSERT_COLUMNS = (
    "received_at", "generated_at", "age", "type", "url", "origin", "site", "user_agent",
    "browser", "browser_major", "os", "reason", "raw",
)  # fmt: skip

KEYS = REPORT_DIMENSIONS
# Positions of those keys in a NewReport.row() tuple.
_ROW_POSITIONS = (3, 6, 5, 8, 9, 10, 11, 7)
_RECEIVED_AT = 0
_group_key = operator.itemgetter(*_ROW_POSITIONS)

# All-time roll-ups, from the finest to the coarsest; a query reads the smallest table that
# has every column it groups or filters on.
TOTAL_TABLES: dict[str, tuple[str, ...]] = {
    "report_groups": KEYS,
    "report_groups_site": ("type", "site", "browser", "reason"),
}
# Hourly roll-ups, finest first, the same way.
HOURLY_TABLES: dict[str, tuple[str, ...]] = {
    "report_groups_hourly": KEYS,
    "report_groups_hourly_kind": ("type", "reason", "browser"),
}
# The order every transaction that writes roll-ups takes their locks in (writers, prune,
# deletion): one order everywhere, so they never wait for each other in a cycle.
LOCK_ORDER = (
    "report_groups_hourly",
    "report_groups_hourly_kind",
    "report_groups",
    "report_groups_site",
)


def table_for(columns: set[str]) -> str:
    """The smallest all-time roll-up holding all of ``columns``."""
    for table, keys in reversed(TOTAL_TABLES.items()):
        if columns <= set(keys):
            return table
    return "report_groups"


def hourly_table_for(columns: set[str]) -> str:
    """The smallest hourly roll-up holding all of ``columns``."""
    for table, keys in reversed(HOURLY_TABLES.items()):
        if columns <= set(keys):
            return table
    return "report_groups_hourly"


def _upsert(table: str, keys: tuple[str, ...]) -> str:
    """One statement upserting arrays of deltas, the conflict target named explicitly."""
    columns = ", ".join(keys)
    types = ["bigint" if k == "hour" else "text" for k in keys] + ["bigint"] * 3
    arrays = ", ".join(f"${n}::{kind}[]" for n, kind in enumerate(types, 1))
    return (
        f"INSERT INTO {table} AS g ({columns}, count, first_seen, last_seen)"
        f" SELECT * FROM unnest({arrays})"
        f" ON CONFLICT ({columns}) DO UPDATE SET count = g.count + excluded.count,"
        " first_seen = least(g.first_seen, excluded.first_seen),"
        " last_seen = greatest(g.last_seen, excluded.last_seen)"
    )


def _key_of(table: str) -> tuple[str, ...]:
    keys = HOURLY_TABLES.get(table)
    if keys is not None:
        return ("hour", *keys)
    return TOTAL_TABLES[table]


# (table, statement, positions of its keys in an (hour, *KEYS) tuple), in LOCK_ORDER.
_UPSERTS = [
    (
        table,
        _upsert(table, _key_of(table)),
        tuple(("hour", *KEYS).index(k) for k in _key_of(table)),
    )
    for table in LOCK_ORDER
]

Delta = list[int]  # [count, first_seen, last_seen]


def rollup(rows: Sequence[Sequence[object]]) -> dict[tuple[object, ...], Delta]:
    """Per (hour, *keys): how many rows, first and last received time; None keys as ''."""
    deltas: dict[tuple[object, ...], Delta] = {}
    for row in rows:
        received: int = row[_RECEIVED_AT]  # type: ignore[assignment]
        key = (received // HOUR_MS, *_group_key(row))
        delta = deltas.get(key)
        if delta is None:
            deltas[key] = [1, received, received]
        else:
            delta[0] += 1
            delta[1] = min(delta[1], received)
            delta[2] = max(delta[2], received)
    return {tuple("" if v is None else v for v in key): delta for key, delta in deltas.items()}


def project(
    deltas: dict[tuple[object, ...], Delta], positions: tuple[int, ...]
) -> dict[tuple[object, ...], Delta]:
    """Sum (hour, *KEYS) deltas onto the key at ``positions``."""
    out: dict[tuple[object, ...], Delta] = {}
    for key, (count, first, last) in deltas.items():
        projected = tuple(key[i] for i in positions)
        total = out.get(projected)
        if total is None:
            out[projected] = [count, first, last]
        else:
            total[0] += count
            total[1] = min(total[1], first)
            total[2] = max(total[2], last)
    return out


def _columns(deltas: dict[tuple[object, ...], Delta], width: int) -> list[list[object]]:
    """The deltas as one array per column, keys sorted (the lock order of their rows)."""
    arrays: list[list[object]] = [[] for _ in range(width + 3)]
    for key in sorted(deltas):
        for i, value in enumerate((*key, *deltas[key])):
            arrays[i].append(value)
    return arrays


async def write_reports(connection: asyncpg.Connection, rows: Sequence[tuple[object, ...]]) -> None:
    """COPY the (already cleaned) rows in and bump their counters; the caller owns the
    transaction and has made sure a partition exists for each row's day."""
    if not rows:
        return
    await connection.copy_records_to_table("reports", records=rows, columns=REPORT_INSERT_COLUMNS)
    await count_reports(connection, rows)


async def count_reports(connection: asyncpg.Connection, rows: Sequence[Sequence[object]]) -> None:
    """Bump the counters of rows (``NewReport.row()`` order) inserted in this transaction:
    the one path every insert of reports takes, ingest and ``copy`` alike."""
    if not rows:
        return
    hourly = rollup(rows)
    for _table, statement, positions in _UPSERTS:
        deltas = project(hourly, positions)
        await connection.execute(statement, *_columns(deltas, len(positions)))


INSERT_QUARANTINE = (
    "INSERT INTO quarantine (received_at, code, field, message, type, raw, truncated)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7)"
)


async def write_quarantine(
    connection: asyncpg.Connection, rows: Sequence[tuple[object, ...]], max_rows: int
) -> None:
    """Insert cleaned ``RejectedReport.row()`` tuples and drop the oldest past ``max_rows``
    (ids only grow: one range delete on the primary key). The caller owns the transaction."""
    if not rows:
        return
    await connection.executemany(INSERT_QUARANTINE, rows)
    await connection.execute(
        "DELETE FROM quarantine WHERE id <= (SELECT max(id) FROM quarantine) - $1", max_rows
    )
