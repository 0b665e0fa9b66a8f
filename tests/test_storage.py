"""The SQLite writer: group commit, bounded queue, drain on shutdown, poison rows."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from reporting_endpoint.records import NewReport, RejectedReport
from reporting_endpoint.storage import QueueFull, SQLiteStorage, StorageError, StorageNotStarted
from reporting_endpoint.storage.sqlite.schema import migrations


def report(n: int = 0, raw: object = None) -> NewReport:
    return NewReport(
        received_at=1_700_000_000_000 + n,
        generated_at=1_700_000_000_000 + n - 5,
        age=5,
        type="crash",
        url=f"https://a.example/{n}",
        origin="https://a.example",
        site="https://a.example",
        user_agent="UA",
        browser=None,
        browser_major=None,
        os=None,
        reason=None,
        raw=raw if raw is not None else "{}",  # type: ignore[arg-type]
    )


def count(db: Path) -> int:
    return int(sqlite3.connect(db).execute("SELECT count(*) FROM reports").fetchone()[0])


def test_concurrent_submits_share_commits_and_all_land(tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite3"
    statements: list[str] = []

    async def scenario() -> None:
        storage = SQLiteStorage(db)
        await storage.start()
        # Every statement the write connection runs, whichever thread runs it.
        assert storage._write_conn is not None
        storage._write_conn.set_trace_callback(statements.append)
        await asyncio.gather(*(storage.submit_reports([report(i)]) for i in range(300)))
        await storage.stop()

    asyncio.run(scenario())
    assert count(db) == 300
    commits = sum(1 for statement in statements if statement.strip().upper() == "COMMIT")
    # 300 submissions queued at once: a handful of transactions, not one per submission.
    assert 1 <= commits <= 300 // 30, commits
    connection = sqlite3.connect(db)
    assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert connection.execute("PRAGMA user_version").fetchone()[0] == len(migrations())


def test_queue_full_is_refused_not_lost(tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite3"

    async def scenario() -> list[BaseException | None]:
        storage = SQLiteStorage(db, queue_size=2)
        await storage.start()
        results = await asyncio.gather(
            storage.submit_reports([report(1), report(2)]),
            storage.submit_reports([report(3)]),
            return_exceptions=True,
        )
        await storage.stop()
        return list(results)

    first, second = asyncio.run(scenario())
    assert first is None
    assert isinstance(second, QueueFull)
    assert count(db) == 2


def test_a_batch_larger_than_the_queue_still_fits_an_empty_queue(tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite3"

    async def scenario() -> None:
        storage = SQLiteStorage(db, queue_size=1)
        await storage.start()
        await storage.submit_reports([report(i) for i in range(5)])
        await storage.stop()

    asyncio.run(scenario())
    assert count(db) == 5


def test_stop_drains_everything_already_queued(tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite3"

    async def scenario() -> None:
        storage = SQLiteStorage(db)
        await storage.start()
        waiting = [asyncio.create_task(storage.submit_reports([report(i)])) for i in range(50)]
        await asyncio.sleep(0)  # every submit is queued, none committed yet
        await storage.stop()
        await asyncio.gather(*waiting)
        with pytest.raises(StorageError):
            await storage.submit_reports([report(99)])

    asyncio.run(scenario())
    assert count(db) == 50


def test_not_started(tmp_path: Path) -> None:
    async def scenario() -> None:
        with pytest.raises(StorageNotStarted):
            await SQLiteStorage(tmp_path / "r.sqlite3").submit_reports([report()])

    asyncio.run(scenario())


def test_a_poison_row_fails_only_its_own_submit(tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite3"

    async def scenario() -> list[BaseException | None]:
        storage = SQLiteStorage(db)
        await storage.start()
        results = await asyncio.gather(
            storage.submit_reports([report(1)]),
            storage.submit_reports([report(2, raw=object())]),  # sqlite3 cannot bind it
            storage.submit_reports([report(3)]),
            return_exceptions=True,
        )
        await storage.stop()
        return list(results)

    results = asyncio.run(scenario())
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], StorageError)
    assert count(db) == 2


def test_migrations_are_idempotent(tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite3"

    async def start_stop() -> None:
        storage = SQLiteStorage(db)
        await storage.start()
        await storage.submit_reports([report()])
        await storage.stop()

    asyncio.run(start_stop())
    asyncio.run(start_stop())
    assert count(db) == 2


def rejected(n: int) -> RejectedReport:
    return RejectedReport(
        received_at=1_700_000_000_000 + n,
        code="unknown_reason",
        field="body.reason",
        message="not a known reason",
        type="crash",
        raw=f'{{"n": {n}}}',
        truncated=False,
    )


def test_rejected_reports_land_in_quarantine_trimmed_to_the_newest(tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite3"

    async def scenario() -> None:
        storage = SQLiteStorage(db, quarantine_max_rows=3)
        await storage.start()
        # Mixed with accepted reports, and alone: both are committed before submit returns.
        await storage.submit_reports([report(1)], [rejected(1), rejected(2)])
        await storage.submit_reports([], [rejected(3)])
        # Checked before stop: a submit of refused rows only must not wait for the drain.
        assert _quarantined(db) == ['{"n": 1}', '{"n": 2}', '{"n": 3}']
        await asyncio.gather(*(storage.submit_reports([], [rejected(n)]) for n in range(4, 8)))
        await storage.stop()

    asyncio.run(scenario())
    assert count(db) == 1
    assert _quarantined(db) == ['{"n": 5}', '{"n": 6}', '{"n": 7}']
    row = (
        sqlite3.connect(db)
        .execute("SELECT code, field, type, truncated FROM quarantine")
        .fetchone()
    )
    assert row == ("unknown_reason", "body.reason", "crash", 0)


def test_rejected_rows_count_against_the_queue_bound(tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite3"

    async def scenario() -> list[BaseException | None]:
        storage = SQLiteStorage(db, queue_size=2)
        await storage.start()
        results = await asyncio.gather(
            storage.submit_reports([report(1)], [rejected(1)]),
            storage.submit_reports([], [rejected(2)]),
            return_exceptions=True,
        )
        await storage.stop()
        return list(results)

    first, second = asyncio.run(scenario())
    assert first is None
    assert isinstance(second, QueueFull)
    assert _quarantined(db) == ['{"n": 1}']


def _quarantined(db: Path) -> list[str]:
    connection = sqlite3.connect(db)
    try:
        return [str(raw) for (raw,) in connection.execute("SELECT raw FROM quarantine ORDER BY id")]
    finally:
        connection.close()
