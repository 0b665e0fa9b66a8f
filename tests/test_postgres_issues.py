"""Issues on PostgreSQL where it differs from SQLite: several writers, partitions, the schema.

tests/test_issues_storage.py checks the behaviour on both engines through the protocol; this
file checks what only PostgreSQL has: writer processes committing the same issues in parallel
(no deadlock, exact counts), retention dropping whole day partitions (the issues of the
dropped rows are recounted), the migration on a database with partitions, and that both
engines answer the same issues byte for byte.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

import asyncpg
import orjson
import pytest

from reporting_endpoint.issues.triage import StatusChange
from reporting_endpoint.records import IssueKey, NewReport
from reporting_endpoint.settings import Settings
from reporting_endpoint.storage import Storage, open_storage
from reporting_endpoint.storage.base import IssueFilters
from reporting_endpoint.storage.filters import Filters
from reporting_endpoint.storage.postgres import PostgresStorage
from tests.test_storage_parity import BASE, HOUR, crash, report

DAY = 24 * HOUR
FINGERPRINTS = [f"fp{n}" for n in range(12)]
# Many issues per group in the parallel test: each upsert then takes long enough (locking
# its issues one by one) for the two writers' upserts to overlap.
MANY = [f"fp{n:04d}" for n in range(600)]
RELEASES = [None, "1.9", "1.10", "2.0rc1", "2.0"]


def rep(received_at: int, fingerprint: str, release: str | None = None, **extra: Any) -> NewReport:
    return report(
        received_at,
        fingerprint=fingerprint,
        issue_title=f"Issue {fingerprint}",
        release=release,
        **extra,
    )


# Every event with the columns the recount needs (crashes have no browser).
EVENTS = (
    "(SELECT issue_id, received_at, release, browser FROM reports"
    " UNION ALL SELECT issue_id, received_at, release, NULL FROM crashes) AS e"
)


async def recounted(url: str) -> dict[str, Any]:
    """Every issue counter as stored, and the same counted again from the events."""
    connection = await asyncpg.connect(url)
    try:
        stored = {
            "issues": sorted(
                tuple(r)
                for r in await connection.fetch(
                    "SELECT id, event_count, first_seen, last_seen FROM issues"
                )
            ),
            "hourly": sorted(
                tuple(r) for r in await connection.fetch("SELECT * FROM issue_hourly")
            ),
            "release": sorted(
                tuple(r)
                for r in await connection.fetch(
                    "SELECT issue_id, value, count FROM issue_breakdown WHERE dimension = 'release'"
                )
            ),
            "browser": sorted(
                tuple(r)
                for r in await connection.fetch(
                    "SELECT issue_id, value, count FROM issue_breakdown WHERE dimension = 'browser'"
                )
            ),
        }
        counted = {
            "issues": sorted(
                tuple(r)
                for r in await connection.fetch(
                    "SELECT issue_id, count(*), min(received_at), max(received_at)"
                    f" FROM {EVENTS} WHERE issue_id IS NOT NULL GROUP BY issue_id"
                )
            ),
            "hourly": sorted(
                tuple(r)
                for r in await connection.fetch(
                    f"SELECT issue_id, received_at / 3600000, count(*) FROM {EVENTS}"
                    " WHERE issue_id IS NOT NULL GROUP BY 1, 2"
                )
            ),
            "release": sorted(
                tuple(r)
                for r in await connection.fetch(
                    f"SELECT issue_id, release, count(*) FROM {EVENTS}"
                    " WHERE issue_id IS NOT NULL AND release IS NOT NULL GROUP BY 1, 2"
                )
            ),
            "browser": sorted(
                tuple(r)
                for r in await connection.fetch(
                    f"SELECT issue_id, browser, count(*) FROM {EVENTS}"
                    " WHERE issue_id IS NOT NULL AND browser IS NOT NULL GROUP BY 1, 2"
                )
            ),
        }
        return {"stored": stored, "counted": counted}
    finally:
        await connection.close()


def retried(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The writer's retries of a transaction that lost a deadlock (the server's own count
    may not be flushed yet when the test reads it)."""
    return [r.getMessage() for r in caplog.records if "retrying a transaction" in r.getMessage()]


async def deadlocks(url: str) -> int:
    connection = await asyncpg.connect(url)
    try:
        await connection.execute("SELECT pg_stat_clear_snapshot()")
        return int(
            await connection.fetchval(
                "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
            )
        )
    finally:
        await connection.close()


def test_parallel_writers_on_the_same_issues_never_deadlock_and_count_exactly(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two writers (two processes' worth: each its own connection) commit groups sharing
    every issue, in opposite arrival orders, while one issue is resolved (so triage writes
    history rows too): every group commits, no deadlock is ever detected (a retried one
    would hide in the writer), and the counters equal a recount from the reports."""
    rng = random.Random(11)

    caplog.set_level(logging.INFO, "reporting_endpoint.storage.postgres")

    async def main() -> None:
        first, second = PostgresStorage(postgres_url), PostgresStorage(postgres_url)
        await first.start()
        await second.start()
        try:
            await first.submit_reports([rep(BASE, "fp0000")])
            page = await first.issues_page(IssueFilters(since=BASE - HOUR), "count", 10)
            await first.set_issue_status(page.items[0]["id"], StatusChange("resolved", "ann"), BASE)
            before = await deadlocks(postgres_url)

            async def sender(storage: PostgresStorage, reverse: bool) -> int:
                sent = 0
                for _batch in range(8):
                    order = sorted(MANY, reverse=reverse)
                    # Each writer its own report type: no roll-up row in common, so the
                    # two meet on the issues alone (shared roll-up rows would serialise
                    # them before they reached the issues).
                    kind = "deprecation" if reverse else "crash"
                    reports = [
                        rep(
                            BASE + rng.randrange(6 * HOUR),
                            fingerprint,
                            rng.choice(RELEASES),
                            browser=rng.choice(["Chrome", "Firefox", "Safari"]),
                            kind=kind,
                            reason="oom" if kind == "crash" else None,
                        )
                        for fingerprint in order
                    ]
                    await storage.submit_reports(reports)
                    sent += len(reports)
                return sent

            # One sender per writer: each writer commits one group after the other, so the
            # two are nearly always in a transaction at the same time.
            sent = await asyncio.gather(sender(first, False), sender(second, True))
        finally:
            await first.stop()
            await second.stop()
        counts = await recounted(postgres_url)
        assert counts["stored"] == counts["counted"]
        total = sum(n for _, n, _, _ in counts["stored"]["issues"])
        assert total == sum(sent) + 1
        assert len(counts["stored"]["issues"]) == len(MANY)
        assert await deadlocks(postgres_url) == before
        assert not retried(caplog)
        connection = await asyncpg.connect(postgres_url)
        try:
            status = await connection.fetchval(
                "SELECT status FROM issues WHERE fingerprint = 'fp0000'"
            )
            history = await connection.fetch(
                "SELECT actor, to_status FROM issue_history ORDER BY id"
            )
        finally:
            await connection.close()
        # Regressed once, by whichever writer came first: the other saw "regressed".
        assert status == "regressed"
        assert [tuple(h) for h in history] == [("ann", "resolved"), ("system", "regressed")]

    asyncio.run(main())


def test_dropping_whole_partitions_recounts_the_issues_of_the_dropped_rows(
    postgres_url: str,
) -> None:
    """Retention drops the partitions of whole days (a DROP TABLE, whose rows are never
    deleted one by one) and deletes the rest of the cut's day: the issues of both kinds of
    rows lose them, an issue left without events goes, and its history with it."""
    day0 = BASE // DAY * DAY

    async def main() -> None:
        storage = PostgresStorage(postgres_url)
        await storage.start()
        try:
            await storage.submit_reports(
                [rep(day0 + n, "old", "1.0") for n in range(3)]  # day 0: dropped whole
                + [rep(day0 + DAY + n, "both", "1.0") for n in range(2)]  # day 1: dropped
                + [rep(day0 + 2 * DAY + n, "both", "2.0") for n in range(4)]  # day 2: cut
                + [rep(day0 + 2 * DAY + 3 * HOUR, "both", "3.0", browser="Firefox")]
                + [rep(day0 + 3 * DAY, "new")]
            )
            page = await storage.issues_page(IssueFilters(status="unresolved"), "count", 10)
            ids = {item["fingerprint"]: item["id"] for item in page.items}
            await storage.set_issue_status(ids["old"], StatusChange("ignored", "ann"), day0)
            deleted = await storage.prune(day0 + 2 * DAY + 2)
            assert deleted.reports == 3 + 2 + 2
            connection = await asyncpg.connect(postgres_url)
            try:
                partitions = await connection.fetch("SELECT name FROM report_partitions()")
                assert all(p[0] > f"reports_{_day_name(day0 + DAY)}" for p in partitions)
                left = await connection.fetchval(
                    "SELECT count(*) FROM issue_history WHERE issue_id = $1", ids["old"]
                )
                assert left == 0
            finally:
                await connection.close()
            assert await storage.get_issue(ids["old"]) is None
            both = await storage.get_issue(ids["both"], day0, day0 + 4 * DAY)
            assert both is not None
            assert both["count"] == 3
            assert both["first_seen"] == "2023-11-16T00:00:00.002Z"
            assert (both["first_release"], both["last_release"]) == ("2.0", "3.0")
            assert both["breakdowns"]["release"] == [
                {"value": "2.0", "count": 2},
                {"value": "3.0", "count": 1},
            ]
        finally:
            await storage.stop()
        counts = await recounted(postgres_url)
        assert counts["stored"] == counts["counted"]

    asyncio.run(main())


def test_prune_and_deletions_run_beside_writers_without_deadlock(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Retention, single deletions and crash parses run while two writers commit into the
    same issues: every transaction takes reports, the roll-ups, crashes and then the issues,
    so none waits for another in a cycle, and the counters stay equal to a recount."""
    rng = random.Random(7)
    day0 = BASE // DAY * DAY
    key = IssueKey("native-x", "native", "SIG", None)

    caplog.set_level(logging.INFO, "reporting_endpoint.storage.postgres")

    async def main() -> None:
        first, second = PostgresStorage(postgres_url), PostgresStorage(postgres_url)
        await first.start()
        await second.start()
        before = await deadlocks(postgres_url)
        try:
            for n in range(6):
                await first.insert_crash(crash(n, day0 + n * HOUR, release=f"1.{n}"))

            async def writer(storage: PostgresStorage) -> None:
                for _ in range(12):
                    await storage.submit_reports(
                        [
                            rep(day0 + rng.randrange(3 * DAY), rng.choice(FINGERPRINTS))
                            for _ in range(40)
                        ]
                    )

            async def maintenance() -> None:
                for step in range(6):
                    await second.record_crash_facts(f"{step:032x}", {"signature": "s"}, key)
                    page = await first.reports_page(Filters(), 3)
                    for item in page.items:
                        await first.delete_report(int(item["id"]))
                    await second.prune(day0 + step * HOUR)
                    await asyncio.sleep(0)

            await asyncio.gather(writer(first), writer(second), maintenance())
        finally:
            await first.stop()
            await second.stop()
        counts = await recounted(postgres_url)
        assert counts["stored"] == counts["counted"]
        assert await deadlocks(postgres_url) == before
        assert not retried(caplog)

    asyncio.run(main())


def _day_name(ms: int) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).strftime("%Y%m%d")


def test_the_migration_reaches_every_partition_old_and_new(postgres_url: str) -> None:
    """The issue columns and the events index exist on partitions made before the migration
    ran (the test database has none: the writer's start makes today's first) and after."""

    async def main() -> None:
        storage = PostgresStorage(postgres_url)
        await storage.start()
        try:
            # A day far from today: its partition is made after the migration.
            await storage.submit_reports([rep(BASE, "a", "1.0")])
        finally:
            await storage.stop()
        connection = await asyncpg.connect(postgres_url)
        try:
            partitions = [
                r[0] for r in await connection.fetch("SELECT name FROM report_partitions()")
            ]
            assert len(partitions) >= 2
            for name in partitions:
                columns = {
                    r[0]
                    for r in await connection.fetch(
                        "SELECT column_name FROM information_schema.columns WHERE table_name = $1",
                        name,
                    )
                }
                assert {"fingerprint", "issue_id", "release"} <= columns, name
                indexes = [
                    r[0]
                    for r in await connection.fetch(
                        "SELECT indexdef FROM pg_indexes WHERE tablename = $1", name
                    )
                ]
                assert any("(issue_id, received_at, id)" in d for d in indexes), (name, indexes)
        finally:
            await connection.close()

    asyncio.run(main())


def _batches() -> tuple[list[NewReport], list[NewReport]]:
    """The scenario's reports, made once (each carries a unique number in its body)."""
    first = [
        rep(BASE + 1, "a", "1.9", url="https://a.example/app/123"),
        rep(BASE + 2, "a", "1.10", browser="Firefox", browser_major="130"),
        rep(BASE + 2 * HOUR, "a", None, os="Windows", url="https://a.example/Zürich/1"),
        rep(BASE + 5, "b", kind="deprecation", site="b.example", reason=None),
        rep(BASE - HOUR, "b", "2.0", kind="deprecation", site="b.example", reason=None),
        rep(
            BASE + 7,
            "c",
            raw=orjson.dumps(
                {"type": "crash", "body": {"visibility_state": "hidden", "is_top_level": True}}
            ).decode(),
            browser="a" * 300,
        ),
        rep(BASE + 8, "B", browser="Zed"),
        rep(BASE + 9, "B", browser="Édge"),
        report(BASE + 6),
    ]
    return first, [rep(BASE + HOUR, "a", "1.11")]


async def _scenario(
    storage: Storage, batches: tuple[list[NewReport], list[NewReport]]
) -> dict[str, Any]:
    """Everything the issue reads answer for one history of events and decisions."""
    await storage.submit_reports(batches[0])
    await storage.insert_crash(crash(1, BASE + 10, release="3.1"))
    await storage.insert_crash(crash(2, BASE + 11, release="3.10"))
    key = IssueKey("native-1", "native", "SIG | app.exe", None)
    await storage.record_crash_facts(f"{1:032x}", {"os": "Linux", "signature": "s"}, key)
    await storage.record_crash_facts(f"{2:032x}", {"os": "Windows NT", "signature": "s"}, key)
    window = IssueFilters(since=BASE, until=BASE + 3 * HOUR)
    pages = {}
    for sort in ("count", "last_seen", "first_seen", "trend"):
        items, after = [], None
        while True:
            page = await storage.issues_page(window, sort, 2, after)  # type: ignore[arg-type]
            items.extend(page.items)
            if page.next is None:
                break
            after = page.next
        pages[sort] = items
    ids = {item["fingerprint"]: item["id"] for item in pages["count"]}
    await storage.set_issue_status(
        ids["a"], StatusChange("resolved", "ann", "fix", resolved_in_release="1.10"), BASE
    )
    await storage.submit_reports(batches[1])
    out: dict[str, Any] = {"pages": pages}
    for fingerprint, issue_id in sorted(ids.items()):
        issue = await storage.get_issue(issue_id, BASE - 7 * DAY, BASE + 3 * HOUR)
        assert issue is not None
        for entry in issue["history"]:
            entry["at"] = "<time>"  # the decision's time is the storage's clock
        events = await storage.issue_events(issue_id, 2)
        out[fingerprint] = {"issue": issue, "events": events.items}
    out["filtered"] = [
        (await storage.issues_page(f, "count", 10)).items
        for f in (
            IssueFilters(status="regressed"),
            IssueFilters(browser="Zed", since=BASE, until=BASE + HOUR),
            IssueFilters(release="2.0", since=BASE - DAY, until=BASE + HOUR),
            IssueFilters(os="Windows NT", since=BASE, until=BASE + HOUR),
        )
    ]
    return out


@pytest.mark.parametrize("engine", ["postgresql"])
def test_both_engines_answer_the_same_issues_byte_for_byte(
    engine: str, postgres_url: str, tmp_path: Any
) -> None:
    async def main() -> tuple[bytes, bytes]:
        answers = []
        batches = _batches()
        for url in (f"sqlite://{tmp_path}/parity.sqlite3", postgres_url):
            storage = open_storage(url, Settings())
            await storage.start()
            try:
                answers.append(
                    orjson.dumps(await _scenario(storage, batches), option=orjson.OPT_SORT_KEYS)
                )
            finally:
                await storage.stop()
        return answers[0], answers[1]

    sqlite, postgresql = asyncio.run(main())
    assert orjson.loads(postgresql) == orjson.loads(sqlite)
    assert postgresql == sqlite
