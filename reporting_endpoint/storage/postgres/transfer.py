"""Whole rows out and in, for ``copy``: export in (received_at, id) order, import keeping ids.

Exports and counts read the backend's pool; imports are writer jobs (the writer owns the
transaction). An import first asks which of the batch's ids are present, then COPYs only the
others: the roll-up counters are bumped for exactly the rows inserted, so a batch imported
twice (a copy resumed after a kill) changes nothing. Rows taken with explicit ids move their
table's id sequence past them in the same job, so the service's later inserts never collide.

Crash ids are compared ``COLLATE "C"`` (bytes, as SQLite), so a copy pages the same rows in
the same order whichever engine it reads.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from reporting_endpoint.storage.base import Counts, RawRow, RowKind, TableCount
from reporting_endpoint.storage.filters import Position
from reporting_endpoint.storage.postgres.reads import PgPool
from reporting_endpoint.storage.postgres.rollups import HOURLY_TABLES, TOTAL_TABLES, count_reports
from reporting_endpoint.storage.postgres.values import clean_row
from reporting_endpoint.storage.rows import EXPORT_COLUMNS, REPORT_COLUMNS

DAY_MS = 86_400_000
# The array type of each table's id, for ``id = ANY($1)``.
_ID_ARRAY = {"reports": "bigint[]", "crashes": "text[]", "quarantine": "bigint[]"}
# Tables whose ids come from a sequence (crash ids are made by the upload handler).
_SEQUENCED = frozenset({"reports", "quarantine"})


def _columns(kind: RowKind) -> tuple[str, ...]:
    # The table name is the kind; checked here because it becomes part of a statement.
    if kind not in EXPORT_COLUMNS:
        raise ValueError(f"no such table: {kind!r}")
    return EXPORT_COLUMNS[kind]


async def export_batch(
    pool: PgPool, kind: RowKind, limit: int, after: Position | None, since: int | None
) -> tuple[RawRow, ...]:
    columns = ", ".join(_columns(kind))
    text_ids = kind == "crashes"
    order = 'received_at, id COLLATE "C"' if text_ids else "received_at, id"
    args: tuple[object, ...]
    if after is not None:
        # received_at >= $1 first, so the index (and, for reports, the day partitions)
        # bound the range whatever the collation of the id.
        after_id = 'id COLLATE "C" > $2' if text_ids else "id > $2"
        where = f" WHERE received_at >= $1 AND (received_at > $1 OR {after_id})"
        args = (after.received_at, str(after.id) if text_ids else int(after.id))
    elif since is not None:
        where, args = " WHERE received_at >= $1", (since,)
    else:
        where, args = "", ()
    sql = f"SELECT {columns} FROM {kind}{where} ORDER BY {order} LIMIT ${len(args) + 1}"
    return tuple(tuple(record) for record in await pool.fetch(sql, *args, limit))


async def ensure_days(connection: asyncpg.Connection, days: Sequence[int]) -> None:
    """A partition for each UTC day of ``days`` (a copy's rows can be years old and sparse:
    one day at a time, never a range of empty days between them)."""
    for day in sorted(set(days)):
        await connection.fetchval("SELECT ensure_report_partitions($1, $1)", day * DAY_MS)


async def import_rows(connection: asyncpg.Connection, kind: RowKind, rows: Sequence[RawRow]) -> int:
    """COPY the rows whose ids are not present yet (with their ids); counters for reports;
    the id sequence past the largest id taken. The caller owns the transaction and has
    ensured the partitions of the reports' days."""
    columns = _columns(kind)
    if not rows:
        return 0
    ids = [row[0] for row in rows]
    present = {
        record[0]
        for record in await connection.fetch(
            f"SELECT id FROM {kind} WHERE id = ANY($1::{_ID_ARRAY[kind]})", ids
        )
    }
    # Text PostgreSQL cannot hold (NUL, lone surrogates: a SQLite row may have them) is
    # cleaned as the writer cleans what it ingests.
    taken = [row for row in rows if row[0] not in present]
    new = [clean_row(row) for row in taken]
    if not new:
        return 0
    await connection.copy_records_to_table(kind, records=new, columns=columns)
    if kind == "reports":
        # The id is the first column; the roll-ups take the report columns after it, in
        # NewReport.row() order (the release after them is no roll-up key). Issues do not
        # travel, as on SQLite: the exported row has no issue columns (one shape for every
        # engine), so imported events belong to no issue (their issue columns stay NULL)
        # until ``regroup`` runs at the target with its rules and each event's release,
        # which does travel.
        await count_reports(connection, [row[1 : len(REPORT_COLUMNS)] for row in new])
    if kind in _SEQUENCED:
        # Never backwards (greatest): the sequence may be past these ids already.
        await connection.execute(
            "SELECT setval(s, greatest($2::bigint, coalesce(pg_sequence_last_value(s), 1)))"
            " FROM (SELECT pg_get_serial_sequence($1, 'id')::regclass AS s) AS q",
            kind,
            max(int(row[0]) for row in taken),
        )
    return len(new)


async def counts(pool: PgPool) -> Counts:
    tables: dict[str, TableCount] = {}
    for kind in EXPORT_COLUMNS:
        record = await pool.fetchrow(f"SELECT count(*), max(received_at) FROM {kind}")
        assert record is not None  # an aggregate without GROUP BY answers one row
        tables[kind] = TableCount(int(record[0]), None if record[1] is None else int(record[1]))
    totals = []
    for table in (*HOURLY_TABLES, *TOTAL_TABLES):
        # sum(bigint) is numeric (asyncpg: Decimal): cast back.
        total = await pool.fetchval(f"SELECT coalesce(sum(count), 0)::bigint FROM {table}")
        totals.append(int(total))
    return Counts(tables["reports"], tables["crashes"], tables["quarantine"], tuple(totals))
