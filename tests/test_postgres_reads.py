"""The PostgreSQL read side against a real server, answer for answer the same as SQLite's.

Each test writes the same records twice: straight into a migrated PostgreSQL database
(``tests/pg_rows.py``: day partitions, roll-ups kept in the same transaction) and through
``SQLiteStorage`` (the reference), then asks both the same questions and compares the answers
as the JSON bytes the API would send. Paging under concurrent inserts and keyset iteration
over several pages and partitions are checked on PostgreSQL alone.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from reporting_endpoint.records import NewCrash, NewReport, RejectedReport
from reporting_endpoint.storage.base import Blob
from reporting_endpoint.storage.filters import CRASH_DEFAULT_BY, HOUR_MS, Filters, Position
from reporting_endpoint.storage.postgres import reads
from reporting_endpoint.storage.postgres.migrate import migrate
from reporting_endpoint.storage.sqlite import SQLiteStorage
from tests.pg_rows import insert_crash, insert_rejected, insert_reports
from tests.postgres import PostgresServer

DAY = 86_400_000
START = 1_709_251_200_000 + 5 * HOUR_MS + 123  # 2024-03-01T05:00:00.123Z
VSYSCALL = 0xFFFF_FFFF_FF60_0000  # an address above 2**63
# Upper and lower case, and non-ASCII: the order of equal counts is byte order on both.
SITES = ["example.com", "shop.example.co.uk", "Zeta.example", "alpha.example", "bücher.example"]
BROWSERS = ["Chrome", "Firefox", "Safari", None]
UAS = ["Mozilla/5.0 Chrome/120", "Mozilla/5.0 Firefox/121", "curl/8", "Zzz bot"]


def make_reports(rng: random.Random, count: int, start: int, span: int) -> list[NewReport]:
    """Reports in random time order (ids out of time order), some at the same millisecond,
    with missing keys as real ones have."""
    times = [start + rng.randrange(span) for _ in range(count)]
    for i in range(0, count, 9):
        times[i] = times[i // 2]  # ties on received_at: only the id orders them
    reports = []
    for received_at in times:
        site = rng.choice([*SITES, None])
        browser = rng.choice(BROWSERS)
        kind = rng.choice(["crash", "crash", "deprecation", "csp-violation"])
        reason = rng.choice(["oom", "unresponsive", None]) if kind == "crash" else None
        age = rng.randrange(0, 60_000)
        url = f"https://{site or '127.0.0.1'}/page"
        user_agent = rng.choice(UAS)
        raw = {"age": age, "body": {"reason": reason} if reason else {}, "type": kind}
        reports.append(
            NewReport(
                received_at=received_at,
                generated_at=received_at - age,
                age=age,
                type=kind,
                url=url,
                origin=f"https://{site}" if site else None,
                site=site,
                user_agent=user_agent,
                browser=browser,
                browser_major=rng.choice(["120", "121"]) if browser else None,
                os=rng.choice(["Linux", "Windows", None]),
                reason=reason,
                raw=orjson.dumps({**raw, "url": url, "user_agent": user_agent}).decode(),
            )
        )
    return reports


def make_rejected(rng: random.Random, count: int) -> list[RejectedReport]:
    rejected = []
    for i in range(count):
        truncated = i % 7 == 3
        rejected.append(
            RejectedReport(
                received_at=START + rng.randrange(3 * HOUR_MS) // 1000 * 1000,  # ties
                code=rng.choice(["invalid_report", "too_deep", "Bad_code", "invalid_url"]),
                field=rng.choice(["", "body", "url"]),
                message="refused",
                type=rng.choice(["crash", "deprecation", None]),
                raw='{"type": "crash", "body": {"x' if truncated else '{"type": "crash"}',
                truncated=truncated,
            )
        )
    return rejected


Crash = tuple[NewCrash, dict[str, Any] | None, str | None]


def make_crashes(rng: random.Random, count: int) -> list[Crash]:
    """Pending, parsed (u64 facts at and above 2**63) and failed crashes; shared dumps."""
    crashes: list[Crash] = []
    for i in range(count):
        dump = f"{rng.randrange(6):064x}"
        attachments = tuple(
            {"name": "log", "filename": "a.log", "sha256": f"{100 + i:064x}", "size": 3,
             "path": f"blobs/{100 + i:064x}"}
            for _ in range(i % 2)
        )  # fmt: skip
        crash = NewCrash(
            id=f"{rng.getrandbits(128):032x}",
            received_at=START + rng.randrange(30) * 600_000,  # ties on received_at
            product=rng.choice(["App", "app", "Électron", None]),
            version=rng.choice(["1.0", "2.0", None]),
            guid=None,
            platform=rng.choice(["linux", "win32"]),
            process_type=rng.choice(["browser", "renderer", None]),
            electron_version="30.0.0",
            annotations={"prod": "App", "note": "ü\u2028"},
            query={"guid": "x"},
            dump_sha256=dump,
            dump_size=1234,
            dump_path=f"blobs/{dump}",
            attachments=attachments,
            upload_bytes=2000 + i,
        )
        facts: dict[str, Any] | None = None
        failure: str | None = None
        if i % 3 == 1:
            facts = {
                "os": "Linux", "os_version": "6.1", "cpu": rng.choice(["amd64", "arm64"]),
                "exception_code": rng.choice([0xC000_0005, (1 << 64) - 1, 11]),
                "exception_name": "SIGSEGV", "crash_address": rng.choice([VSYSCALL, 0, 1 << 63]),
                "crashing_thread": 0, "main_module": "app", "main_module_version": "1.0",
                "crash_module": "libc.so.6", "crash_offset": rng.choice([(1 << 64) - 16, 42]),
                "signature": rng.choice(["abort", "memcpy", "Zap"]),
            }  # fmt: skip
        elif i % 3 == 2:
            failure = "not a minidump"
        crashes.append((crash, facts, failure))
    return crashes


@dataclass
class Data:
    reports: Sequence[NewReport] = ()
    rejected: Sequence[RejectedReport] = ()
    crashes: Sequence[Crash] = field(default_factory=list)


Check = Callable[["reads.PgPool", SQLiteStorage], Awaitable[None]]


def compare(postgres_url: str, tmp_path: Path, data: Data, check: Check) -> None:
    """Write ``data`` to a fresh PostgreSQL database and through ``SQLiteStorage``, then run
    ``check(pool, sqlite)``."""

    async def main() -> None:
        await migrate(postgres_url)
        sqlite = SQLiteStorage(tmp_path / "reference.sqlite3")
        await sqlite.start()
        pool = await asyncpg.create_pool(postgres_url, min_size=1, max_size=2)
        try:
            async with pool.acquire() as connection:
                await insert_reports(connection, data.reports)
                await insert_rejected(connection, data.rejected)
                for crash, facts, failure in data.crashes:
                    await insert_crash(connection, crash, facts, failure)
            if data.reports or data.rejected:
                await sqlite.submit_reports(data.reports, data.rejected)
            for crash, facts, failure in data.crashes:
                await sqlite.insert_crash(crash)
                if facts is not None:
                    await sqlite.record_crash_facts(crash.id, facts)
                elif failure is not None:
                    await sqlite.record_crash_failure(crash.id, failure)
            await check(pool, sqlite)
        finally:
            await pool.close()
            await sqlite.stop()

    asyncio.run(main())


def same(postgres: object, sqlite: object, what: object = "") -> None:
    """The same JSON, byte for byte (orjson writes the records' dataclasses as objects)."""
    assert orjson.loads(orjson.dumps(postgres)) == orjson.loads(orjson.dumps(sqlite)), what
    assert orjson.dumps(postgres) == orjson.dumps(sqlite), what


REPORT_FILTERS = [
    Filters(),
    Filters((("site", "example.com"),)),
    Filters((("type", "crash"), ("browser", "Chrome"))),
    Filters((("site", "bücher.example"), ("os", "Linux"))),
    Filters(since=START + 5 * HOUR_MS + 17, until=START + 2 * DAY - 3),
    Filters((("reason", "oom"),), since=START + 30 * HOUR_MS + 999),
    Filters((("user_agent", "curl/8"),), until=START + DAY + 1),
    Filters((("site", "nowhere.example"),)),
    Filters((("site", "example.com\x00"),)),  # U+0000 cannot be stored: matches nothing
]


def test_report_pages_and_reports_match_sqlite(postgres_url: str, tmp_path: Path) -> None:
    reports = make_reports(random.Random(1), 240, START, 3 * DAY)

    async def check(pool: reads.PgPool, sqlite: SQLiteStorage) -> None:
        for filters in REPORT_FILTERS:
            for limit in (7, 100):
                after: Position | None = None
                pages = 0
                while True:
                    mine = await reads.reports_page(pool, filters, limit, after)
                    theirs = await sqlite.reports_page(filters, limit, after)
                    same(mine, theirs, (filters, limit, after))
                    pages += 1
                    if theirs.next is None:
                        break
                    assert isinstance(mine.next, Position) and isinstance(mine.next.id, int)
                    after = theirs.next
                assert pages > 1 or limit == 100 or filters.equal
        for report_id in (1, 17, 120, 240, 241, 0, -5):
            same(await reads.get_report(pool, report_id), await sqlite.get_report(report_id))
        shown = await reads.get_report(pool, 5)
        assert shown is not None and shown["raw"]["type"] == shown["type"]  # raw included
        assert await reads.get_report(pool, 1 << 63) is None  # past bigint: no such row

    compare(postgres_url, tmp_path, Data(reports=reports), check)


GROUP_BYS: list[tuple[str, ...]] = [
    ("type",),
    ("site",),
    ("user_agent",),
    ("type", "site", "browser", "reason"),  # the site roll-up
    ("browser", "reason"),  # the kind roll-up when windowed
    ("origin", "browser_major", "os"),
]


def test_groups_match_sqlite(postgres_url: str, tmp_path: Path) -> None:
    reports = make_reports(random.Random(2), 300, START, 3 * DAY)

    async def check(pool: reads.PgPool, sqlite: SQLiteStorage) -> None:
        saw_more = saw_none = False
        for by in GROUP_BYS:
            for filters in REPORT_FILTERS:
                for limit in (1, 3, 50):
                    mine = await reads.groups(pool, "reports", by, filters, limit)
                    theirs = await sqlite.groups("reports", by, filters, limit)
                    same(mine, theirs, (by, filters, limit))
                    saw_more |= mine.more and len(mine.groups) == limit
                    saw_none |= any(None in g.values() for g in mine.groups)
        assert saw_more and saw_none

    compare(postgres_url, tmp_path, Data(reports=reports), check)


def test_timeseries_match_sqlite(postgres_url: str, tmp_path: Path) -> None:
    reports = make_reports(random.Random(3), 200, START, 4 * DAY)

    async def check(pool: reads.PgPool, sqlite: SQLiteStorage) -> None:
        for bucket in ("hour", "day"):
            for by in [(), ("type",), ("site",), ("browser", "reason")]:
                for filters in REPORT_FILTERS:
                    mine = await reads.timeseries(pool, "reports", bucket, by, filters)
                    theirs = await sqlite.timeseries("reports", bucket, by, filters)
                    same(mine, theirs, (bucket, by, filters))
        day = await reads.timeseries(pool, "reports", "day", (), Filters())
        assert [s.bucket % 24 for s in day] == [0] * len(day) and len(day) >= 4
        assert sum(s.count for s in day) == len(reports)

    compare(postgres_url, tmp_path, Data(reports=reports), check)


CRASH_FILTERS = [
    Filters(),
    Filters((("product", "App"),)),
    Filters((("parse_status", "pending"),)),
    Filters((("signature", "abort"), ("cpu", "amd64"))),
    Filters(since=START + HOUR_MS + 1, until=START + 4 * HOUR_MS),
    Filters((("product", "App\x00"),)),
]


def test_crashes_match_sqlite(postgres_url: str, tmp_path: Path) -> None:
    crashes = make_crashes(random.Random(4), 40)

    async def check(pool: reads.PgPool, sqlite: SQLiteStorage) -> None:
        for filters in CRASH_FILTERS:
            after: Position | None = None
            while True:
                mine = await reads.crash_page(pool, filters, 4, after)
                theirs = await sqlite.crash_page(filters, 4, after)
                same(mine, theirs, (filters, after))
                if theirs.next is None:
                    break
                assert isinstance(mine.next, Position) and isinstance(mine.next.id, str)
                after = theirs.next
            for page_size in (3, 1000):
                mine_all = [c async for c in reads.iter_crashes(pool, filters, page_size)]
                theirs_all = [c async for c in sqlite.iter_crashes(filters, page_size=page_size)]
                same(mine_all, theirs_all, (filters, page_size))
            for bucket in ("hour", "day"):
                for series_by in [(), ("product",), ("signature", "os")]:
                    same(
                        await reads.timeseries(pool, "crashes", bucket, series_by, filters),
                        await sqlite.timeseries("crashes", bucket, series_by, filters),
                    )
            for by in [CRASH_DEFAULT_BY, ("signature",), ("os", "cpu", "parse_status")]:
                for limit in (2, 50):
                    same(
                        await reads.groups(pool, "crashes", by, filters, limit),
                        await sqlite.groups("crashes", by, filters, limit),
                        (by, filters, limit),
                    )
        for crash, _, _ in crashes:
            same(await reads.get_crash(pool, crash.id), await sqlite.get_crash(crash.id))
            assert await reads.crash_dump_path(pool, crash.id) == crash.dump_path
        for missing in ("nope", "a\x00b"):
            assert await reads.get_crash(pool, missing) is None
            assert await reads.crash_dump_path(pool, missing) is None
        # Oldest first; SQLite leaves crashes of the same millisecond in no set order, this
        # backend orders them by id.
        pending = sorted(
            (c.received_at, c.id) for c, facts, failure in crashes if not (facts or failure)
        )
        for limit in (3, 100):
            found = await reads.pending_crashes(pool, limit)
            assert [p.id for p in found] == [crash_id for _, crash_id in pending[:limit]]
        assert set(found) == set(await sqlite.pending_crashes(100))
        # u64 facts at and above 2**63 come back unsigned, as uploaded.
        parsed = [c for c, facts, _ in crashes if facts and facts["crash_address"] == VSYSCALL]
        shown = await reads.get_crash(pool, parsed[0].id)
        assert shown is not None and shown["crash_address"] == VSYSCALL
        assert shown["crash_address_hex"] == "0xffffffffff600000"

    compare(postgres_url, tmp_path, Data(crashes=crashes), check)


def test_quarantine_matches_sqlite(postgres_url: str, tmp_path: Path) -> None:
    rejected = make_rejected(random.Random(5), 45)

    async def check(pool: reads.PgPool, sqlite: SQLiteStorage) -> None:
        for filters in [
            Filters(),
            Filters((("code", "too_deep"),)),
            Filters((("type", "crash"), ("code", "invalid_url"))),
            Filters(since=START + HOUR_MS, until=START + 2 * HOUR_MS + 5),
        ]:
            after: Position | None = None
            while True:
                mine = await reads.quarantine_page(pool, filters, 4, after)
                theirs = await sqlite.quarantine_page(filters, 4, after)
                same(mine, theirs, (filters, after))
                if theirs.next is None:
                    break
                after = theirs.next
        for row_id in (1, 4, 45, 46, 0):
            same(await reads.get_quarantined(pool, row_id), await sqlite.get_quarantined(row_id))
        assert await reads.get_quarantined(pool, 1 << 64) is None
        same(await reads.quarantine_counts(pool), await sqlite.quarantine_counts())

    compare(postgres_url, tmp_path, Data(rejected=rejected), check)


def test_iter_reports_walks_keyset_pages_across_partitions(
    postgres_url: str, tmp_path: Path
) -> None:
    """Oldest first on (received_at, id) over five day partitions; no connection is held
    between pages (a pool of one connection still answers other queries meanwhile)."""
    reports = make_reports(random.Random(6), 210, START, 5 * DAY)

    async def check(pool: reads.PgPool, sqlite: SQLiteStorage) -> None:
        partitions = await pool.fetchval("SELECT count(*) FROM report_partitions()")
        assert partitions >= 5
        for filters in [REPORT_FILTERS[0], REPORT_FILTERS[1], REPORT_FILTERS[4]]:
            # SQLite's export walks ids; with ids out of time order, sort it the same way.
            theirs = [r async for r in sqlite.iter_reports(filters)]
            theirs.sort(key=lambda r: (r["received_at"], r["id"]))
            for page_size in (1, 7, 105, 210, 1000):
                mine = [r async for r in reads.iter_reports(pool, filters, page_size)]
                same(mine, theirs, (filters, page_size))
        assert len(theirs) > 0

        single = await asyncpg.create_pool(postgres_url, min_size=1, max_size=1)
        try:
            seen = 0
            async for _ in reads.iter_reports(single, None, 10):
                seen += 1
                if seen % 10 == 0:
                    assert await asyncio.wait_for(single.fetchval("SELECT 1"), 5) == 1
            assert seen == len(reports)
        finally:
            await single.close()

    compare(postgres_url, tmp_path, Data(reports=reports), check)


def test_pages_have_no_gaps_or_repeats_under_concurrent_inserts(postgres_url: str) -> None:
    """Newer reports committed between (and during) page reads never shift the walk: every
    report there at the start is seen exactly once, in order."""
    rng = random.Random(7)
    first = make_reports(rng, 150, START, 2 * DAY)

    async def main() -> None:
        await migrate(postgres_url)
        pool = await asyncpg.create_pool(postgres_url, min_size=1, max_size=3)
        writer = await asyncpg.connect(postgres_url)
        try:
            await insert_reports(writer, first)
            before = {r["id"] for r in await pool.fetch("SELECT id FROM reports")}
            stop = asyncio.Event()

            async def keep_inserting() -> None:
                newer = START + 2 * DAY
                while not stop.is_set():
                    await insert_reports(writer, make_reports(rng, 5, newer, HOUR_MS))
                    newer += HOUR_MS
                    await asyncio.sleep(0)

            inserting = asyncio.create_task(keep_inserting())
            seen: list[tuple[str, int]] = []
            after: Position | None = None
            try:
                while True:
                    page = await reads.reports_page(pool, Filters(), 9, after)
                    seen += [(r["received_at"], r["id"]) for r in page.items]
                    await asyncio.sleep(0.005)  # let a batch commit between pages
                    if page.next is None:
                        break
                    after = page.next
            finally:
                stop.set()
                await inserting
            ids = [rid for _, rid in seen]
            assert len(ids) == len(set(ids))  # no repeats
            assert before <= set(ids)  # no gaps
            total = await pool.fetchval("SELECT count(*) FROM reports")
            assert total > len(before)  # the inserts did happen meanwhile
            order = await pool.fetch(
                "SELECT id FROM reports WHERE id = ANY($1::bigint[])"
                " ORDER BY received_at DESC, id DESC",
                ids,
            )
            assert [r["id"] for r in order] == ids
        finally:
            await writer.close()
            await pool.close()

    asyncio.run(main())


def test_blob_references_match_sqlite(postgres_url: str, tmp_path: Path) -> None:
    crashes = make_crashes(random.Random(8), 12)
    referenced_dumps = {c.dump_sha256 for c, _, _ in crashes}
    attachment_hashes = [a["sha256"] for c, _, _ in crashes for a in c.attachments]
    probes = [
        Blob(sorted(referenced_dumps)[0], "blobs/dump"),
        Blob(attachment_hashes[0], "blobs/attachment"),
        Blob(f"{999:064x}", "blobs/gone"),
        Blob(f"{5:064x}", "blobs/maybe"),
        Blob("a%_\\", "blobs/odd"),  # LIKE's own characters, taken literally
        Blob(attachment_hashes[1][:20], "blobs/prefix"),  # a substring is not a reference
    ]

    async def check(pool: reads.PgPool, sqlite: SQLiteStorage) -> None:
        mine = await reads.referenced_blobs(pool)
        assert mine == await sqlite.referenced_blobs()
        assert set(attachment_hashes) <= mine and referenced_dumps <= mine
        same(await reads.unreferenced_blobs(pool, probes), await sqlite.unreferenced_blobs(probes))
        assert await reads.unreferenced_blobs(pool, []) == ()
        # A list another tool wrote that is not JSON does not fail the sweep.
        await pool.execute(
            "INSERT INTO crashes (id, received_at, annotations, query, dump_sha256, dump_size,"
            " dump_path, attachments, upload_bytes) VALUES"
            " ('odd1', 1, '{}', '{}', 'd1', 1, 'p', 'not json [', 1),"
            " ('odd2', 2, '{}', '{}', 'd2', 1, 'p', '{\"x\": {\"sha256\": \"objval\"}}', 1)"
        )
        assert await reads.referenced_blobs(pool) == mine | {"d1", "d2", "objval"}
        assert await reads.unreferenced_blobs(pool, [Blob("objval", "p")]) == ()

    compare(postgres_url, tmp_path, Data(crashes=crashes), check)


def test_order_is_bytes_whatever_the_database_collation(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    """On a database whose default collation is ICU en-US ('alpha' before 'Zeta', 'app'
    before 'App'), ties, crash ids and group keys still come in SQLite's byte order."""
    name = f"re_test_icu_{os.getpid()}"
    owner = f' OWNER "{postgres.role}"' if postgres.role else ""
    postgres.execute(
        f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)',
        f'CREATE DATABASE "{name}"{owner} TEMPLATE template0 LOCALE_PROVIDER icu'
        " ICU_LOCALE 'en-US' LOCALE 'C'",
    )
    url = postgres.url(name)
    rng = random.Random(9)
    data = Data(
        reports=make_reports(rng, 150, START, DAY),
        rejected=make_rejected(rng, 20),
        crashes=make_crashes(rng, 30),
    )

    async def check(pool: reads.PgPool, sqlite: SQLiteStorage) -> None:
        collation = await pool.fetchval(
            "SELECT daticulocale FROM pg_database WHERE datname = current_database()"
        )
        assert collation == "en-US"
        for by in GROUP_BYS:
            same(
                await reads.groups(pool, "reports", by, Filters(), 100),
                await sqlite.groups("reports", by, Filters(), 100),
            )
        for by in [CRASH_DEFAULT_BY, ("product",), ("signature", "os")]:
            same(
                await reads.groups(pool, "crashes", by, Filters(), 100),
                await sqlite.groups("crashes", by, Filters(), 100),
            )
            same(
                await reads.timeseries(pool, "crashes", "hour", by, Filters()),
                await sqlite.timeseries("crashes", "hour", by, Filters()),
            )
        same(
            await reads.timeseries(pool, "reports", "hour", ("site",), Filters()),
            await sqlite.timeseries("reports", "hour", ("site",), Filters()),
        )
        same(await reads.crash_page(pool, Filters(), 100), await sqlite.crash_page(Filters(), 100))
        same(
            [c async for c in reads.iter_crashes(pool, None, 4)],
            [c async for c in sqlite.iter_crashes(None, page_size=4)],
        )
        same(await reads.quarantine_counts(pool), await sqlite.quarantine_counts())

    try:
        compare(url, tmp_path, data, check)
    finally:
        postgres.drop_database(url)
