"""Writes reports with their roll-up and issue counters in PostgreSQL; the caller owns the
transaction.

The same four roll-up tables and keys as the SQLite backend (``''`` for a missing key). Each
roll-up table gets one ``INSERT ... SELECT FROM unnest(...) ON CONFLICT (<its primary key>) DO
UPDATE`` with the group's deltas, the issues theirs (``issue_writes``), and the rows go in last
with COPY (one round trip whatever the group's size), carrying their issue ids. Several ingest
processes commit in parallel here, so every writer touches the tables in one fixed order and
the keys of each table in one sorted order: two transactions that share groups then wait for
each other instead of deadlocking.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import asyncpg

from reporting_endpoint.records import REPORT_BASE_WIDTH
from reporting_endpoint.storage.filters import HOUR_MS, REPORT_DIMENSIONS
from reporting_endpoint.storage.postgres import issue_writes

# The columns COPY sends: NewReport.row()'s first REPORT_BASE_WIDTH values, then the issue
# columns (the title belongs to the issue, not to the report row).
REPORT_INSERT_COLUMNS = (
    "received_at", "generated_at", "age", "type", "url", "origin", "site", "user_agent",
    "browser", "browser_major", "os", "reason", "raw", "fingerprint", "release", "issue_id",
)  # fmt: skip
_FINGERPRINT, _RELEASE = REPORT_BASE_WIDTH, REPORT_BASE_WIDTH + 2

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
# deletion): one order everywhere, so they never wait for each other in a cycle. The whole
# order is: reports, these, crashes, then issue_writes.ISSUE_LOCK_ORDER.
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


async def write_reports(
    connection: asyncpg.Connection, rows: Sequence[tuple[object, ...]], now_ms: int
) -> None:
    """Bump the rows' roll-up and issue counters, then COPY them in with their issue ids; the
    caller owns the transaction and has made sure a partition exists for each row's day.

    The rows go in last because they need the ids of their issues, yet ``reports`` must be
    the first table locked (prune takes it before the roll-ups and the issues): its lock is
    taken first, on the partitioned parent only, which is what prune's lock conflicts with.
    """
    if not rows:
        return
    await connection.execute("LOCK TABLE ONLY reports IN ROW EXCLUSIVE MODE")
    await count_reports(connection, rows)
    ids = await issue_writes.add(connection, issue_writes.tally_reports(rows), now_ms)
    records = [
        (*row[:REPORT_BASE_WIDTH], row[_FINGERPRINT] or None, row[_RELEASE],
         ids.get(row[_FINGERPRINT]))  # type: ignore[call-overload]
        for row in rows
    ]  # fmt: skip
    await connection.copy_records_to_table(
        "reports", records=records, columns=REPORT_INSERT_COLUMNS
    )


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
