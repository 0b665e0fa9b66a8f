"""The PostgreSQL schema against a real server: migrations applied exactly once under
concurrency, daily partitions made on demand and dropped by retention, and the roll-up
upserts' explicit conflict targets (several writers committing at once, '' for "none")."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import asyncpg
import pytest

from reporting_endpoint.storage.postgres.migrate import (
    MigrationError,
    apply_migrations,
    migrate,
    migrations,
)
from tests.postgres import PostgresServer

T = TypeVar("T")
DAY = 86_400_000
HOUR = 3_600_000
START = 1_709_251_200_000  # 2024-03-01T00:00:00Z
KEYS = ("type", "site", "origin", "browser", "browser_major", "os", "reason", "user_agent")
REPORT_COLUMNS = (
    "received_at", "generated_at", "age", "type", "url", "origin", "site", "user_agent",
    "browser", "browser_major", "os", "reason", "raw",
)  # fmt: skip


def run(url: str, job: Callable[[Any], Awaitable[T]]) -> T:
    """``job(connection)`` on a connection of its own, in a fresh event loop."""

    async def main() -> T:
        connection = await asyncpg.connect(url, timeout=30)
        try:
            return await job(connection)
        finally:
            await connection.close()

    return asyncio.run(main())


def report_row(received_at: int, rng: random.Random) -> tuple[object, ...]:
    """A reports row as the writer inserts it; None in key columns, as real reports have."""
    site = rng.choice(["example.com", "shop.example.co.uk", None])
    browser = rng.choice(["Chrome", "Firefox", None])
    return (
        received_at, received_at - 13, 13, rng.choice(["crash", "deprecation"]),
        f"https://{site or '127.0.0.1'}/", f"https://{site}" if site else None, site,
        rng.choice(["UA one", "UA two"]), browser, "120" if browser else None,
        rng.choice(["Linux", None]), rng.choice(["oom", "unresponsive", None]), "{}",
    )  # fmt: skip


def test_migrations_apply_and_are_recorded(postgres_url: str) -> None:
    newest = len(migrations())
    assert asyncio.run(migrate(postgres_url)) == newest
    assert asyncio.run(migrate(postgres_url)) == newest  # nothing left to do

    async def check(connection: Any) -> None:
        rows = await connection.fetch("SELECT version, name FROM schema_migrations ORDER BY 1")
        assert [(r["version"], r["name"]) for r in rows] == [
            (m.number, m.name) for m in migrations()
        ]
        tables = {
            r["relname"]
            for r in await connection.fetch(
                "SELECT relname FROM pg_class WHERE relnamespace = 'public'::regnamespace"
                " AND relkind IN ('r', 'p')"
            )
        }
        assert {
            "reports", "report_groups", "report_groups_site", "report_groups_hourly",
            "report_groups_hourly_kind", "crashes", "quarantine", "schema_migrations",
        } <= tables  # fmt: skip
        # Owned by the service's role, not the superuser: the backend can run later migrations.
        owner = await connection.fetchval(
            "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE relname = 'reports'"
        )
        assert owner == await connection.fetchval("SELECT current_user")

    run(postgres_url, check)


def test_processes_starting_at_once_apply_each_migration_once(postgres_url: str) -> None:
    """Four processes released at the same instant: all succeed (a second apply of any
    migration would fail on 'already exists'), and each migration is recorded once."""
    go = time.time() + 2.0  # after every interpreter has imported asyncpg
    script = (
        "import asyncio, sys, time\n"
        "from reporting_endpoint.storage.postgres.migrate import migrate\n"
        "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
        "print(asyncio.run(migrate(sys.argv[1])))\n"
    )
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, postgres_url, str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = [process.communicate(timeout=60) for process in processes]
    for process, (out, err) in zip(processes, results, strict=True):
        assert process.returncode == 0, err
        assert out.strip() == str(len(migrations()))

    async def check(connection: Any) -> None:
        counts = await connection.fetch(
            "SELECT version, count(*) AS n FROM schema_migrations GROUP BY version ORDER BY 1"
        )
        assert [(r["version"], r["n"]) for r in counts] == [(m.number, 1) for m in migrations()]

    run(postgres_url, check)


def test_connections_racing_in_one_process_apply_each_migration_once(postgres_url: str) -> None:
    async def main() -> list[int]:
        connections = [await asyncpg.connect(postgres_url, timeout=30) for _ in range(6)]
        try:
            return list(await asyncio.gather(*(apply_migrations(c) for c in connections)))
        finally:
            for connection in connections:
                await connection.close()

    assert asyncio.run(main()) == [len(migrations())] * 6


def test_a_changed_migration_file_is_refused(postgres_url: str) -> None:
    asyncio.run(migrate(postgres_url))

    async def tamper(connection: Any) -> None:
        await connection.execute("UPDATE schema_migrations SET checksum = 'x' WHERE version = 2")

    run(postgres_url, tamper)
    with pytest.raises(MigrationError, match="0002_"):
        asyncio.run(migrate(postgres_url))


async def _partitions(connection: Any) -> list[tuple[str, int, int]]:
    rows = await connection.fetch("SELECT name, from_ms, to_ms FROM report_partitions()")
    return [(r["name"], r["from_ms"], r["to_ms"]) for r in rows]


async def _insert(connection: Any, rows: Sequence[tuple[object, ...]]) -> None:
    # COPY is what a batching writer would use; it routes rows to partitions like INSERT.
    await connection.copy_records_to_table("reports", records=rows, columns=REPORT_COLUMNS)


def test_partitions_are_made_per_day_on_demand(postgres_url: str) -> None:
    asyncio.run(migrate(postgres_url))
    rng = random.Random(1)

    async def job(connection: Any) -> None:
        # No partition yet: the insert fails loudly (the writer ensures and retries).
        with pytest.raises(asyncpg.CheckViolationError):
            await _insert(connection, [report_row(START, rng)])
        created = await connection.fetchval(
            "SELECT ensure_report_partitions($1, $2)", START + 5 * HOUR, START + 2 * DAY + 1
        )
        assert created == 3
        assert await _partitions(connection) == [
            ("reports_20240301", START, START + DAY),
            ("reports_20240302", START + DAY, START + 2 * DAY),
            ("reports_20240303", START + 2 * DAY, START + 3 * DAY),
        ]
        # Idempotent; an overlapping range only adds the missing day.
        assert await connection.fetchval(
            "SELECT ensure_report_partitions($1, $2)", START, START + 3 * DAY
        ) == 1  # fmt: skip
        times = [START + d * DAY + h * HOUR for d in range(4) for h in (0, 11, 23)]
        await _insert(connection, [report_row(t, rng) for t in times])
        placed = await connection.fetch(
            "SELECT tableoid::regclass::text AS part, received_at FROM reports ORDER BY 2"
        )
        for row in placed:
            day = (row["received_at"] - START) // DAY
            assert row["part"] == f"reports_2024030{day + 1}"
        assert len(placed) == len(times)
        # Inherited from the parent: ids keep coming from the one sequence.
        assert await connection.fetchval("SELECT count(DISTINCT id) FROM reports") == len(times)
        with pytest.raises(asyncpg.RaiseError, match="per day"):
            await connection.fetchval("SELECT ensure_report_partitions(0, $1)", 1000 * DAY)

    run(postgres_url, job)


def test_partitions_are_made_without_waiting_for_readers(postgres_url: str) -> None:
    """Several writers ensuring the same days at once, while a reader holds a transaction open
    on reports: each day is made once and no one waits on the reader (ATTACH, not
    CREATE TABLE ... PARTITION OF, which would need an ACCESS EXCLUSIVE lock)."""
    asyncio.run(migrate(postgres_url))

    async def main() -> list[int]:
        reader = await asyncpg.connect(postgres_url, timeout=30)
        writers = [await asyncpg.connect(postgres_url, timeout=30) for _ in range(4)]
        try:
            transaction = reader.transaction()
            await transaction.start()
            await reader.fetch("SELECT * FROM reports")
            for writer in writers:
                await writer.execute("SET lock_timeout = '5s'")
            created = await asyncio.gather(
                *(
                    w.fetchval("SELECT ensure_report_partitions($1, $2)", START, START + 4 * DAY)
                    for w in writers
                )
            )
            await transaction.rollback()
            assert len(await _partitions(reader)) == 5
            return list(created)
        finally:
            for connection in (reader, *writers):
                await connection.close()

    assert sum(asyncio.run(main())) == 5


def test_retention_drops_whole_partitions_and_only_old_rows(postgres_url: str) -> None:
    asyncio.run(migrate(postgres_url))
    rng = random.Random(2)
    times = [START + d * DAY + h * HOUR for d in range(5) for h in range(0, 24, 3)]
    cut = START + 2 * DAY + 5 * HOUR  # inside the third day

    async def job(connection: Any) -> None:
        await connection.fetchval("SELECT ensure_report_partitions($1, $2)", START, START + 4 * DAY)
        await _insert(connection, [report_row(t, rng) for t in times])
        async with connection.transaction():
            await connection.execute("SET LOCAL lock_timeout = '5s'")
            dropped = await connection.fetchval("SELECT drop_report_partitions($1)", cut)
            deleted = await connection.execute("DELETE FROM reports WHERE received_at < $1", cut)
        assert dropped == sum(1 for t in times if t < START + 2 * DAY)
        assert int(deleted.split()[-1]) == sum(1 for t in times if START + 2 * DAY <= t < cut)
        assert [p[0] for p in await _partitions(connection)] == [
            "reports_20240303", "reports_20240304", "reports_20240305",
        ]  # fmt: skip
        left = [r["received_at"] for r in await connection.fetch("SELECT received_at FROM reports")]
        assert sorted(left) == [t for t in times if t >= cut]
        # Nothing before the cut is left to drop.
        assert await connection.fetchval("SELECT drop_report_partitions($1)", cut) == 0

    run(postgres_url, job)


# The writer's roll-up upserts, as storage/rollups.py does them in SQLite, with the explicit
# conflict target PostgreSQL needs: (hour,) + keys for hourly tables, keys for all-time ones.
ROLLUPS: dict[str, tuple[bool, tuple[str, ...]]] = {
    "report_groups_hourly": (True, KEYS),
    "report_groups_hourly_kind": (True, ("type", "reason", "browser")),
    "report_groups": (False, KEYS),
    "report_groups_site": (False, ("type", "site", "browser", "reason")),
}


def upsert_sql(table: str, hourly: bool, keys: tuple[str, ...]) -> str:
    columns = (("hour",) if hourly else ()) + keys
    values = ", ".join(f"${i}" for i in range(1, len(columns) + 4))
    return (
        f"INSERT INTO {table} AS g ({', '.join(columns)}, count, first_seen, last_seen)"
        f" VALUES ({values}) ON CONFLICT ({', '.join(columns)}) DO UPDATE SET"
        " count = g.count + excluded.count,"
        " first_seen = least(g.first_seen, excluded.first_seen),"
        " last_seen = greatest(g.last_seen, excluded.last_seen)"
    )


def deltas(
    rows: Sequence[tuple[object, ...]], hourly: bool, keys: tuple[str, ...]
) -> list[tuple[object, ...]]:
    """(key..., count, first, last) per group of ``rows``, None keys as '', sorted: every
    writer takes the row locks in the same order, so concurrent batches never deadlock."""
    positions = [REPORT_COLUMNS.index(k) for k in keys]
    out: dict[tuple[object, ...], list[int]] = {}
    for row in rows:
        received: int = row[0]  # type: ignore[assignment]
        key = tuple("" if row[p] is None else row[p] for p in positions)
        if hourly:
            key = (received // HOUR, *key)
        delta = out.setdefault(key, [0, received, received])
        delta[0] += 1
        delta[1] = min(delta[1], received)
        delta[2] = max(delta[2], received)
    return [(*key, *delta) for key, delta in sorted(out.items(), key=lambda kv: repr(kv[0]))]


async def write_batch(connection: Any, rows: Sequence[tuple[object, ...]]) -> None:
    async with connection.transaction():
        await _insert(connection, rows)
        for table, (hourly, keys) in ROLLUPS.items():
            await connection.executemany(
                upsert_sql(table, hourly, keys), deltas(rows, hourly, keys)
            )


def test_rollup_upserts_merge_on_their_conflict_targets(postgres_url: str) -> None:
    """Two writers committing batches at once into shared groups: every roll-up ends equal to
    a recount from the reports (the SQLite migration's backfill query), NULL keys merged."""
    asyncio.run(migrate(postgres_url))
    rng = random.Random(3)

    async def main() -> None:
        writers = [await asyncpg.connect(postgres_url, timeout=30) for _ in range(2)]
        try:
            await writers[0].fetchval("SELECT ensure_report_partitions($1, $2)", START, START + DAY)

            async def writer(connection: Any) -> None:
                for _ in range(15):
                    times = [START + rng.randrange(2 * DAY) for _ in range(40)]
                    await write_batch(connection, [report_row(t, rng) for t in times])

            await asyncio.gather(*(writer(w) for w in writers))
            await check(writers[0])
        finally:
            for connection in writers:
                await connection.close()

    async def check(connection: Any) -> None:
        assert await connection.fetchval("SELECT count(*) FROM reports") == 2 * 15 * 40
        for table, (hourly, keys) in ROLLUPS.items():
            columns = ", ".join(keys)
            expressions = ", ".join(f"coalesce({k}, '')" for k in keys)
            hour = "received_at / 3600000, " if hourly else ""
            hour_column = "hour, " if hourly else ""
            expected = await connection.fetch(
                f"SELECT {hour}{expressions}, count(*), min(received_at), max(received_at)"
                f" FROM reports GROUP BY {hour}{expressions} ORDER BY {hour}{expressions}"
            )
            stored = await connection.fetch(
                f"SELECT {hour_column}{columns}, count, first_seen, last_seen FROM {table}"
                f" ORDER BY {hour_column}{columns}"
            )
            assert [tuple(r) for r in stored] == [tuple(r) for r in expected], table
        # '' stands for none: reports without a site share one group row per other key.
        assert await connection.fetchval(
            "SELECT count(*) FROM report_groups_site WHERE site = ''"
        ) == await connection.fetchval(
            "SELECT count(DISTINCT (type, coalesce(browser, ''), coalesce(reason, '')))"
            " FROM reports WHERE site IS NULL"
        )  # fmt: skip

    asyncio.run(main())


def test_u64_facts_round_trip_in_twos_complement(postgres_url: str) -> None:
    asyncio.run(migrate(postgres_url))
    address = 0xFFFF_FFFF_FF60_0000  # vsyscall: above 2**63

    async def job(connection: Any) -> None:
        stored = address - (1 << 64)  # what storage/crashes.py u64_to_db gives
        await connection.execute(
            "INSERT INTO crashes (id, received_at, annotations, query, dump_sha256, dump_size,"
            " dump_path, attachments, upload_bytes, crash_address)"
            " VALUES ('c1', $1, '{}', '{}', 'aa', 1, 'blobs/aa', '[]', 1, $2)",
            START,
            stored,
        )
        row = await connection.fetchrow("SELECT crash_address, u64(crash_address) FROM crashes")
        assert row[0] == stored
        assert int(row[1]) == address

    run(postgres_url, job)


def test_committed_rows_survive_an_immediate_stop(
    postgres: PostgresServer, postgres_url: str
) -> None:
    """The cluster helper's crash: ``pg_ctl stop -m immediate`` and a start with recovery."""
    if not postgres.local:
        pytest.skip("stopping the server needs the suite's own cluster")
    from tests.postgres import PostgresCluster

    assert isinstance(postgres, PostgresCluster)
    asyncio.run(migrate(postgres_url))

    async def write(connection: Any) -> None:
        await connection.fetchval("SELECT ensure_report_partitions($1, $1)", START)
        await _insert(connection, [report_row(START, random.Random(4))])

    run(postgres_url, write)
    postgres.stop("immediate")
    with pytest.raises(OSError):
        run(postgres_url, lambda c: c.fetchval("SELECT 1"))
    postgres.start()

    async def count(connection: Any) -> int:
        return int(await connection.fetchval("SELECT count(*) FROM reports"))

    assert run(postgres_url, count) == 1
