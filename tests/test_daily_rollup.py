"""The daily roll-up of the issue counters, the same on every backend, through the protocol.

Completed days are rolled into daily counters off the ingest path; a long window reads them
for its whole days and the hourly counters for the rest. Every window count must stay equal to
the hourly figures (an issue's series, read hourly) and to the events stored, after the roll-up
and after each operation that changes past hours: a late event, delete, prune, regroup, copy.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from reporting_endpoint.records import IssueKey
from reporting_endpoint.storage import Storage
from reporting_endpoint.storage.base import IssueFilters
from reporting_endpoint.storage.filters import Filters
from reporting_endpoint.storage.spans import ROLL_UP_GRACE_MS, next_mark, span
from tests.test_issues_storage import rep
from tests.test_storage_parity import BASE, HOUR, run

DAY = 24 * HOUR
DAY0 = (BASE // DAY + 1) * DAY  # a UTC midnight, days before now: every day rolls up
# Windows with whole days only, partial days at both edges, one day, and 24 hours astride.
WINDOWS = (
    (DAY0, DAY0 + 5 * DAY),
    (DAY0 + 5 * HOUR, DAY0 + 3 * DAY + 7 * HOUR),
    (DAY0 + DAY, DAY0 + 2 * DAY),
    (DAY0 + 12 * HOUR, DAY0 + 36 * HOUR),
    (DAY0 - 2 * DAY, DAY0 + 9 * DAY + 1),
)


def events() -> list[tuple[int, str]]:
    """(received_at, fingerprint): three issues over five days, several hours each day."""
    out = []
    for day in range(5):
        for hour in (0, 5, 11, 23):
            for n, fingerprint in enumerate(("a", "b", "c")[: 1 + (day + hour) % 3]):
                out.append((DAY0 + day * DAY + hour * HOUR + n, fingerprint))
    return out


SITES, SYSTEMS, BROWSERS = (
    ("s0.example", "s1.example", "s2.example"),
    ("Linux", "Windows"),
    (
        "Chrome",
        "Firefox",
    ),
)


def dims(at: int) -> dict[str, str]:
    """The site, os, browser and user agent of an event, varied with its time."""
    hour = at // HOUR
    return {
        "site": SITES[hour % 3],
        "os": SYSTEMS[hour // 24 % 2],
        "browser": BROWSERS[at % 2],
        "user_agent": f"UA/{at % 5}",
        "origin": f"https://o{at % 4}.{SITES[hour % 3]}",
    }


def stored_event(at: int, fingerprint: str) -> Any:
    return rep(at, fingerprint, **dims(at))


async def roll_up(storage: Storage, now: int) -> int:
    """Roll-up steps (a day each at most) until caught up; how many moved a mark."""
    for steps in range(100):
        if not await storage.roll_up_days(now):
            return steps
    raise AssertionError("the roll-up never caught up")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def check(storage: Storage, stored: list[tuple[int, str]] | None = None) -> int:
    """Every window's and previous window's counts equal the hourly series and (given the
    events ``stored``) the events in those hours; the number of issues checked."""
    checked = 0
    for since, until in WINDOWS:
        first_hour, last_hour = since // HOUR, (until - 1) // HOUR
        length = last_hour - first_hour + 1
        for start, end in ((since, until), ((first_hour - length) * HOUR, first_hour * HOUR)):
            page = await storage.issues_page(
                IssueFilters(status="unresolved", since=start, until=end), "count", 100
            )
            assert page.next is None
            for item in page.items:
                found = await storage.get_issue(item["id"], start, end)
                assert found is not None
                counts = (item["window_count"], found["window_count"], sum(found["series"]))
                assert counts[0] == counts[1] == counts[2], (start, end, item, counts)
                assert found["previous_count"] == item["previous_count"]
                if stored is not None:
                    real = sum(
                        1 for at, fp in stored if fp == item["fingerprint"] and start <= at < end
                    )
                    assert item["window_count"] == real, (start, end, item["fingerprint"])
                checked += 1
    if stored is not None:
        await check_groups(storage, stored)
    return checked


async def check_groups(storage: Storage, stored: list[tuple[int, str]]) -> None:
    """Every window's top sites, systems, browsers and types: counts, first and last seen
    equal to the events stored in its hours."""
    for since, until in (*WINDOWS, (DAY0 + 2 * DAY + 7 * HOUR + 5, DAY0 + 4 * DAY + 3)):
        first_hour, last_hour = since // HOUR, (until - 1) // HOUR
        inside = [at for at, _ in stored if first_hour <= at // HOUR <= last_hour]
        for name in ("site", "os", "browser", "type"):
            page = await storage.groups("reports", (name,), Filters((), since, until), 100)
            found = {
                g[name]: (g["count"], _ms(g["first_seen"]), _ms(g["last_seen"]))
                for g in page.groups
            }
            real: dict[str, tuple[int, int, int]] = {}
            for at in inside:
                key = dims(at).get(name, "crash")
                n, first, last = real.get(key, (0, at, at))
                real[key] = (n + 1, min(first, at), max(last, at))
            assert found == real, (since, until, name)
        crashes = Filters((("type", "crash"),), since, until)
        page = await storage.groups("reports", ("site",), crashes, 100)
        assert sum(g["count"] for g in page.groups) == len(inside)


def test_spans_read_whole_rolled_up_days_daily() -> None:
    assert span(0, 71, 3).days == ((0, 2),) and span(0, 71, 3).hours == ()
    assert span(5, 80, 9) == span(5, 80, 9).__class__(((5, 23), (72, 80)), ((1, 2),))
    assert span(5, 80, 2).days == ((1, 1),) and span(5, 80, 2).hours == ((5, 23), (48, 80))
    assert span(5, 40, 9).days == () and span(5, 40, 9).hours == ((5, 40),)
    assert span(-48, 23, 9).days == ((0, 0),)  # no day before 0 is rolled up


def test_daily_counts_stay_equal_to_hourly_ones(database_url: str) -> None:
    async def scenario(storage: Storage) -> None:
        stored = events()
        await storage.submit_reports([stored_event(at, fp) for at, fp in stored])
        # Days 0 to 2 first (the mark inside the data: windows astride it), then the rest.
        assert await roll_up(storage, DAY0 + 3 * DAY + ROLL_UP_GRACE_MS) > 0
        assert await storage.roll_up_days(DAY0 + 3 * DAY + ROLL_UP_GRACE_MS) == 0
        assert await check(storage, stored) > 20
        late = [(DAY0 + 2 * DAY + 23 * HOUR + 9, "b"), (DAY0 + 4 * DAY + 1, "a")]
        await storage.submit_reports([stored_event(at, fp) for at, fp in late])
        stored += late
        await check(storage, stored)
        assert await roll_up(storage, now_ms()) > 0
        assert await storage.roll_up_days(now_ms()) == 0  # idempotent
        await check(storage, stored)

        # A late event in a rolled-up day, and another outside every window.
        late = [(DAY0 + 2 * DAY + 3 * HOUR, "a"), (DAY0 + DAY + 1, "c")]
        await storage.submit_reports([stored_event(at, fp) for at, fp in late])
        stored += late
        await check(storage, stored)

        # Delete: one event of a rolled-up day.
        whole = IssueFilters(since=DAY0, until=DAY0 + 5 * DAY)
        page = await storage.issues_page(whole, "count", 10)
        b = next(i for i in page.items if i["fingerprint"] == "b")
        victims = (await storage.issue_events(b["id"], 3)).items
        for victim in victims:
            assert await storage.delete_report(victim["id"])
            stored.remove((_ms(victim["received_at"]), "b"))
        await check(storage, stored)

        # Prune: part of a rolled-up day goes.
        cutoff = DAY0 + DAY + 6 * HOUR
        await storage.prune(cutoff, crashes=False)
        stored = [(at, fp) for at, fp in stored if at >= cutoff]
        await check(storage, stored)

        # Regroup: every event moves to another issue.
        def report_key(row: Mapping[str, Any]) -> IssueKey:
            return IssueKey(f"by-hour:{_ms(row['received_at']) // HOUR % 2}", "crash", "Odd", None)

        def no_key(row: Mapping[str, Any]) -> None:
            return None

        assert await storage.regroup(report_key, no_key) > 0
        await check(storage)
        await check_groups(storage, stored)
        assert await storage.roll_up_days(now_ms()) == 0
        await check(storage)

    run(database_url, scenario)


def test_a_copy_into_a_rolled_up_store_keeps_daily_counts_exact(
    database_url: str, tmp_path: Path
) -> None:
    async def fill(source: Storage) -> list[Any]:
        await source.submit_reports([stored_event(at, fp) for at, fp in events()])
        return list(await source.export_batch("reports", 10_000))

    rows = run(f"sqlite://{tmp_path}/source.sqlite3", fill)

    async def scenario(target: Storage) -> None:
        await roll_up(target, now_ms())  # the triggers are in place before the rows come
        assert await target.import_batch("reports", rows) == len(rows)

        def report_key(row: Mapping[str, Any]) -> IssueKey:
            return IssueKey(f"copied:{row['site']}", "crash", "Copied", row["site"])

        def no_key(row: Mapping[str, Any]) -> None:
            return None

        await target.regroup(report_key, no_key)
        assert await check(target) > 0
        await check_groups(target, events())
        assert await target.roll_up_days(now_ms()) == 0
        await check(target)
        await check_groups(target, events())

    run(database_url, scenario)


def _ms(iso: str) -> int:
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)


def test_next_mark_moves_a_week_at_most_from_the_data() -> None:
    assert next_mark(0, 1000, None, 7) == 1000  # nothing stored: straight to the target
    assert next_mark(0, 1000, 500, 7) == 507  # empty days before the data are skipped
    assert next_mark(600, 1000, 500, 7) == 607
    assert next_mark(998, 1000, 998, 7) == 1000
    assert next_mark(1000, 1000, 990, 7) == 1000


def test_a_long_history_rolls_up_a_day_per_step(database_url: str) -> None:
    async def scenario(storage: Storage) -> None:
        stored = [(DAY0 + day * DAY + 5 * HOUR + day, "a") for day in range(20)]
        await storage.submit_reports([stored_event(at, fp) for at, fp in stored])
        steps = 0
        while await storage.roll_up_days(now_ms()):
            steps += 1
            await check(storage, stored)  # exact at every step, the marks partway
            assert steps < 50
        assert steps >= 20  # a day of data per step at most

    run(database_url, scenario)


async def _holding(url: str, *statements: str) -> Any:
    """Another session, in a transaction left open after ``statements`` (its locks held)."""
    import asyncpg

    other = await asyncpg.connect(url)
    await other.execute("BEGIN")
    for statement in statements:
        await other.execute(statement)
    return other


def test_postgres_roll_up_does_not_wait_for_readers(postgres_url: str) -> None:
    """The job never takes ACCESS EXCLUSIVE on the hourly tables (no DROP TRIGGER): a reader's
    open transaction (a long dashboard read, an idle one) does not hold it up."""

    async def scenario(storage: Storage) -> None:
        stored = events()
        await storage.submit_reports([stored_event(at, fp) for at, fp in stored])
        for _ in range(2):  # the triggers made, then remade in place
            reader = await _holding(
                postgres_url,
                "SELECT count(*) FROM report_groups_hourly",
                "SELECT count(*) FROM issue_hourly",
                "SELECT count(*) FROM report_groups_coarse",
            )
            try:
                started = time.monotonic()
                assert await storage.roll_up_days(DAY0 + 2 * DAY + ROLL_UP_GRACE_MS) > 0
                await roll_up(storage, now_ms())
                assert time.monotonic() - started < 5
            finally:
                await reader.close()
            await check(storage, stored)
            late = [(DAY0 + DAY + 3 * HOUR, "a")]
            await storage.submit_reports([stored_event(at, fp) for at, fp in late])
            stored += late
            await check(storage, stored)
            # Back to the start: the next pass rolls up and makes the triggers again.
            await storage.run_job(_reset_marks)  # type: ignore[attr-defined]
            await check(storage, stored)

    run(postgres_url, scenario)


async def _reset_marks(connection: Any) -> None:
    await connection.execute("UPDATE daily_mark SET day = 0")
    await connection.execute("DELETE FROM report_groups_coarse")
    await connection.execute("DELETE FROM report_groups_daily")
    await connection.execute("DELETE FROM issue_daily")


def test_postgres_roll_up_backs_off_a_held_lock(postgres_url: str) -> None:
    """A write transaction left open on an hourly table: the job gives up within a second or
    so (no ingest queued behind it for the whole lock_timeout), the loop logs it and goes
    on, the ingest commits meanwhile, and the next run rolls up exactly."""
    from reporting_endpoint.daily import roll_up_steps
    from reporting_endpoint.storage.base import StorageBusy

    async def scenario(storage: Storage) -> None:
        stored = events()
        await storage.submit_reports([stored_event(at, fp) for at, fp in stored])
        writer = await _holding(
            postgres_url, "LOCK TABLE report_groups_hourly IN ROW EXCLUSIVE MODE"
        )
        try:
            started = time.monotonic()
            try:
                await storage.roll_up_days(now_ms())
            except StorageBusy:
                pass
            else:
                raise AssertionError("the roll-up did not back off")
            assert time.monotonic() - started < 3
            started = time.monotonic()
            assert await roll_up_steps(storage) == 0  # logged and swallowed
            late = [(DAY0 + DAY + 5, "b")]
            await storage.submit_reports([stored_event(at, fp) for at, fp in late])
            stored += late
            assert time.monotonic() - started < 4
        finally:
            await writer.close()
        assert await roll_up_steps(storage) > 0
        await check(storage, stored)

    run(postgres_url, scenario)
