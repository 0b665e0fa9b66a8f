"""Rows written straight into a migrated PostgreSQL database, for tests of the read side.

What the PostgreSQL writer stores for the same records, without going through it: reports
(their day partitions made first) with every roll-up counter bumped in the same transaction,
quarantined reports, and crash rows with their parsed facts. Ids come from the tables' own
sequences in the order given, so data written here and through ``SQLiteStorage`` in the same
order get the same ids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from reporting_endpoint.records import REPORT_BASE_WIDTH, NewCrash, NewReport, RejectedReport
from reporting_endpoint.storage.filters import HOUR_MS, REPORT_DIMENSIONS
from reporting_endpoint.storage.rows import FACT_COLUMNS, U64_FACTS, u64_to_db

INSERT_COLUMNS = (
    "received_at",
    "generated_at",
    "age",
    "type",
    "url",
    "origin",
    "site",
    "user_agent",
    "browser",
    "browser_major",
    "os",
    "reason",
    "raw",
)  # fmt: skip  (NewReport.row() order)
QUARANTINE_INSERT = ("received_at", "code", "field", "message", "type", "raw", "truncated")

# table -> (hourly, key columns), as migrations/0002_report_groups.sql makes them.
ROLLUPS: dict[str, tuple[bool, tuple[str, ...]]] = {
    "report_groups_hourly": (True, REPORT_DIMENSIONS),
    "report_groups_hourly_kind": (True, ("type", "reason", "browser")),
    "report_groups": (False, REPORT_DIMENSIONS),
    "report_groups_site": (False, ("type", "site", "browser", "reason")),
}
DAY_MS = 86_400_000


def _upsert(table: str, hourly: bool, keys: tuple[str, ...]) -> str:
    columns = (("hour",) if hourly else ()) + keys
    values = ", ".join(f"${i}" for i in range(1, len(columns) + 4))
    return (
        f"INSERT INTO {table} AS g ({', '.join(columns)}, count, first_seen, last_seen)"
        f" VALUES ({values}) ON CONFLICT ({', '.join(columns)}) DO UPDATE SET"
        " count = g.count + excluded.count,"
        " first_seen = least(g.first_seen, excluded.first_seen),"
        " last_seen = greatest(g.last_seen, excluded.last_seen)"
    )


def _deltas(
    reports: Sequence[NewReport], hourly: bool, keys: tuple[str, ...]
) -> list[tuple[object, ...]]:
    """(hour?, *key, count, first, last) per group, None keys as '', in one sorted order (so
    concurrent writers lock the same rows in the same order and never deadlock)."""
    out: dict[tuple[Any, ...], list[int]] = {}
    for report in reports:
        values = tuple(getattr(report, name) for name in keys)
        key: tuple[Any, ...] = tuple("" if v is None else v for v in values)
        if hourly:
            key = (report.received_at // HOUR_MS, *key)
        delta = out.setdefault(key, [0, report.received_at, report.received_at])
        delta[0] += 1
        delta[1] = min(delta[1], report.received_at)
        delta[2] = max(delta[2], report.received_at)
    return [(*key, *delta) for key, delta in sorted(out.items())]


async def insert_reports(connection: Any, reports: Sequence[NewReport]) -> None:
    """Insert ``reports`` in order, with their roll-ups, in one transaction."""
    if not reports:
        return
    for day in sorted({r.received_at // DAY_MS for r in reports}):
        # One call per day: the days may lie far apart (the function refuses 400 at once).
        await connection.fetchval(
            "SELECT ensure_report_partitions($1, $2)", day * DAY_MS, day * DAY_MS
        )
    async with connection.transaction():
        await connection.executemany(
            f"INSERT INTO reports ({', '.join(INSERT_COLUMNS)})"
            f" VALUES ({', '.join(f'${i}' for i in range(1, 14))})",
            # The columns that predate issues: these rows belong to no issue.
            [report.row()[:REPORT_BASE_WIDTH] for report in reports],
        )
        for table, (hourly, keys) in ROLLUPS.items():
            await connection.executemany(
                _upsert(table, hourly, keys), _deltas(reports, hourly, keys)
            )


async def insert_rejected(connection: Any, rejected: Sequence[RejectedReport]) -> None:
    """Quarantine rows in order (ids from the identity column)."""
    await connection.executemany(
        f"INSERT INTO quarantine ({', '.join(QUARANTINE_INSERT)})"
        " VALUES ($1, $2, $3, $4, $5, $6, $7)",
        [r.row() for r in rejected],
    )


async def insert_crash(
    connection: Any,
    crash: NewCrash,
    facts: Mapping[str, Any] | None = None,
    failure: str | None = None,
) -> None:
    """A crash row as uploaded, then parsed (``facts``) or failed (``failure``) or neither
    (pending), with the values the SQLite backend stores for the same calls."""
    await connection.execute(
        "INSERT INTO crashes (id, received_at, product, version, guid, platform, process_type,"
        " electron_version, annotations, query, dump_sha256, dump_size, dump_path, attachments,"
        " upload_bytes) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15)",
        crash.id, crash.received_at, crash.product, crash.version, crash.guid,
        crash.platform, crash.process_type, crash.electron_version,
        orjson.dumps(crash.annotations).decode(), orjson.dumps(crash.query).decode(),
        crash.dump_sha256, crash.dump_size, crash.dump_path,
        orjson.dumps(list(crash.attachments)).decode(), crash.upload_bytes,
    )  # fmt: skip
    if facts is not None:
        values = [
            u64_to_db(facts.get(name)) if name in U64_FACTS else facts.get(name)
            for name in FACT_COLUMNS
        ]
        assignments = ", ".join(f"{name} = ${i}" for i, name in enumerate(FACT_COLUMNS, 2))
        await connection.execute(
            f"UPDATE crashes SET parse_status = 'parsed', parse_error = NULL, {assignments}"
            " WHERE id = $1",
            crash.id,
            *values,
        )
    elif failure is not None:
        await connection.execute(
            "UPDATE crashes SET parse_status = 'failed', parse_error = $2,"
            " signature = 'unparseable dump' WHERE id = $1",
            crash.id,
            failure[:500],
        )
