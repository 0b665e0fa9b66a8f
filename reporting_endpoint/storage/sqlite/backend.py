"""The SQLite backend: the storage protocol on one SQLite file.

Writes go through the group-commit writer (``writer.py``): reports in groups, crash rows,
facts and deletions as jobs between groups. Reads use the writer's separate read-only
connection. A driver error never leaves this package as itself: a lock or a dead writer is a
``StorageError`` (the API answers 503), anything else a ``StorageFailure`` that keeps the
driver's error as its cause (the API answers 500, the CLI names the database).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from reporting_endpoint.issues.triage import StatusChange
from reporting_endpoint.native.records import MissingSymbols, SymbolFile
from reporting_endpoint.records import IssueKey, NewCrash
from reporting_endpoint.settings import SettingsError
from reporting_endpoint.storage.alert_store import (
    AlertEvent,
    AlertPage,
    DeliveryAttempt,
    NewAlert,
    OutboxAlert,
)
from reporting_endpoint.storage.base import (
    Backlog,
    Blob,
    Claim,
    Counts,
    Deletion,
    GroupPage,
    IssueFilters,
    IssuePage,
    IssueSort,
    NotOurDatabase,
    Page,
    PendingCrash,
    RawRow,
    RowKind,
    SeriesCount,
    StorageFailure,
    StorageNotStarted,
)
from reporting_endpoint.storage.filters import Bucket, Filters, Position, Source
from reporting_endpoint.storage.rows import check_rows
from reporting_endpoint.storage.sqlite import alerts as alert_sql
from reporting_endpoint.storage.sqlite import (
    crashes,
    daily,
    deletion,
    issue_admin,
    issues,
    processing,
    reads,
    rollups,
    symbols,
    transfer,
)
from reporting_endpoint.storage.sqlite.writer import SQLiteWriter

T = TypeVar("T")
# Tables every version of this service's database has.
OUR_TABLES = frozenset({"reports", "crashes"})


def check_ours(path: Path) -> None:
    """Refuse, by name, a missing file or one that is not this service's database, without
    writing anything (a read-only connection)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no database at {path}")
    try:
        connection = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True)
        try:
            tables = {
                row[0]
                for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
        finally:
            connection.close()
    except sqlite3.DatabaseError as exc:
        raise NotOurDatabase(f"{path} is not a reporting-endpoint database ({exc})") from None
    missing = OUR_TABLES - tables
    if missing:
        raise NotOurDatabase(
            f"{path} is not a reporting-endpoint database (it has no {sorted(missing)[0]} table)"
        )


def check_file(path: Path) -> None:
    """Before ``serve``: a file that exists must be SQLite (created by the first start when
    missing or empty); said by name instead of a traceback from startup."""
    if path.exists() and not path.is_file():
        raise SettingsError(f"db: {path} is not a file")
    if not path.is_file() or path.stat().st_size == 0:
        return
    try:
        connection = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True)
        try:
            connection.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            connection.close()
    except sqlite3.Error as exc:
        raise SettingsError(f"db: {path} is not a reporting-endpoint database ({exc})") from None


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _failure(exc: sqlite3.Error) -> StorageFailure:
    return StorageFailure(f"{type(exc).__name__}: {exc}")


class SQLiteStorage(SQLiteWriter):
    """The storage protocol on one SQLite file (see ``SQLiteWriter`` for the writes).

    ``read_only``: only the read connection is opened, and only on an existing database of
    this service (the CLI's read commands: a wrong path is refused without writing).
    ``must_exist``: the same check before the writer opens the file (the CLI's ``prune`` and
    ``delete``, which must not create a database where there was none).
    """

    def __init__(
        self,
        path: Path,
        *,
        read_only: bool = False,
        must_exist: bool = False,
        queue_size: int = 20000,
        synchronous: str = "FULL",
        write_lock_timeout: float = 30.0,
        quarantine_max_rows: int = 100_000,
    ) -> None:
        super().__init__(
            path,
            queue_size=queue_size,
            synchronous=synchronous,
            write_lock_timeout=write_lock_timeout,
            quarantine_max_rows=quarantine_max_rows,
        )
        self.read_only = read_only
        self.must_exist = must_exist

    async def start(self) -> None:
        if self.read_conn is not None:
            return
        if self.read_only or self.must_exist:
            await asyncio.to_thread(check_ours, self.path)
        try:
            if self.read_only:
                self.read_conn = await self._open_reader()
            else:
                await super().start()
        except sqlite3.Error as exc:
            raise _failure(exc) from exc

    # --- writes ---------------------------------------------------------------------------

    async def insert_crash(self, crash: NewCrash) -> None:
        await self.run_job(partial(crashes.insert_crash, crash=crash), groupable=True)

    async def record_crash_facts(
        self,
        crash_id: str,
        facts: Mapping[str, Any],
        issue: IssueKey | None = None,
        *,
        owner: str | None = None,
    ) -> None:
        await self.run_job(
            partial(
                crashes.record_facts,
                crash_id=crash_id,
                facts=facts,
                issue=issue,
                now_ms=_now_ms(),
                owner=owner,
            ),
            groupable=True,
        )

    async def record_crash_failure(
        self, crash_id: str, error: str, *, owner: str | None = None
    ) -> None:
        await self.run_job(
            partial(
                crashes.record_failure,
                crash_id=crash_id,
                error=error,
                now_ms=_now_ms(),
                owner=owner,
            ),
            groupable=True,
        )

    async def claim_crashes(
        self, owner: str, limit: int, *, lease_ms: int, max_attempts: int
    ) -> Claim:
        return await self.run_job(
            partial(
                processing.claim,
                owner=owner,
                limit=limit,
                now_ms=_now_ms(),
                lease_ms=lease_ms,
                max_attempts=max_attempts,
            ),
            # With the upload rows queued beside it: one fsync, not one more per claim.
            groupable=True,
        )

    async def release_crashes(
        self, owner: str, crash_ids: Sequence[str], *, refund: bool = False
    ) -> None:
        if crash_ids:
            await self.run_job(
                partial(processing.release, owner=owner, crash_ids=list(crash_ids), refund=refund)
            )

    async def prune(self, older_than_ms: int, *, crashes: bool = True) -> Deletion:
        if crashes:
            return await self.run_job(
                partial(deletion.prune_everything, older_than_ms=older_than_ms)
            )
        reports = await self.run_job(partial(rollups.prune, older_than_ms=older_than_ms))
        return Deletion(reports=reports)

    async def delete_report(self, report_id: int) -> bool:
        return await self.run_job(partial(deletion.delete_report, report_id=report_id))

    async def delete_crash(self, crash_id: str) -> Deletion:
        return await self.run_job(partial(deletion.delete_crash, crash_id=crash_id))

    async def unreferenced_blobs(self, blobs: Sequence[Blob]) -> tuple[Blob, ...]:
        # Through the writer: after every crash row queued before it has committed.
        return await self.run_job(partial(deletion.unreferenced, blobs=blobs))

    async def referenced_blobs(self) -> frozenset[str]:
        return await self.run_job(deletion.referenced)

    async def roll_up_days(self, now_ms: int) -> int:
        return await self.run_job(partial(daily.roll_up, now_ms=now_ms))

    async def put_symbol_files(self, files: Sequence[SymbolFile]) -> int:
        if not files:
            return 0
        return await self.run_job(partial(symbols.put_files, files=files))

    async def requeue_late_symbols(self) -> int:
        # Nothing to do here: one writer commits uploads and results one after the other, so
        # each sees the other (put_symbol_files or replace_missing sends the crash back).
        return 0

    async def set_issue_status(
        self, issue_id: int, change: StatusChange, now_ms: int
    ) -> dict[str, Any] | None:
        found = await self.run_job(
            partial(issue_admin.set_status, issue_id=issue_id, change=change, now_ms=now_ms)
        )
        # Read back after the commit, on the read connection, as the API shows it.
        return await self.get_issue(issue_id) if found else None

    async def regroup(
        self,
        report_key: Callable[[Mapping[str, Any]], IssueKey],
        crash_key: Callable[[Mapping[str, Any]], IssueKey | None],
    ) -> int:
        return await self.run_job(
            partial(
                issue_admin.regroup,
                report_key=report_key,
                crash_key=crash_key,
                now_ms=_now_ms(),
            )
        )

    async def import_batch(self, kind: RowKind, rows: Sequence[RawRow]) -> int:
        check_rows(kind, rows)
        if not rows:
            return 0
        return await self.run_job(partial(transfer.import_rows, kind=kind, rows=rows))

    async def queue_alerts(
        self, alerts: Sequence[NewAlert], consumed: Sequence[int], now_ms: int
    ) -> int:
        return await self.run_job(
            partial(alert_sql.queue_alerts, alerts=alerts, consumed=consumed, now_ms=now_ms)
        )

    async def claim_alerts(
        self,
        owner: str,
        limit: int,
        lease_ms: int,
        now_ms: int,
        channel: str | None = None,
        exclude: Sequence[str] = (),
    ) -> tuple[OutboxAlert, ...]:
        return await self.run_job(
            partial(
                alert_sql.claim, owner=owner, limit=limit, lease_ms=lease_ms, now_ms=now_ms,
                channel=channel, exclude=tuple(exclude),
            )
        )  # fmt: skip

    async def record_deliveries(self, attempts: Sequence[DeliveryAttempt]) -> None:
        await self.run_job(partial(alert_sql.record_deliveries, attempts=attempts))

    async def prune_alerts(self, older_than_ms: int) -> int:
        return await self.run_job(partial(alert_sql.prune, older_than_ms=older_than_ms))

    # --- reads ----------------------------------------------------------------------------

    async def _read(self, query: Callable[..., Awaitable[T]], *args: object) -> T:
        if self.read_conn is None:
            raise StorageNotStarted()
        try:
            return await query(self.read_conn, *args)
        except sqlite3.Error as exc:
            raise _failure(exc) from exc

    async def pending_crashes(self, limit: int) -> tuple[PendingCrash, ...]:
        return await self._read(reads.pending_crashes, limit)

    async def processing_backlog(self) -> Backlog:
        return await self._read(processing.backlog)

    async def groups(
        self, source: Source, by: Sequence[str], filters: Filters, limit: int
    ) -> GroupPage:
        return await self._read(reads.groups, source, by, filters, limit)

    async def reports_page(
        self, filters: Filters, limit: int, after: Position | None = None
    ) -> Page:
        return await self._read(reads.reports_page, filters, limit, after)

    async def get_report(self, report_id: int) -> dict[str, Any] | None:
        return await self._read(reads.get_report, report_id)

    async def crash_page(self, filters: Filters, limit: int, after: Position | None = None) -> Page:
        return await self._read(reads.crash_page, filters, limit, after)

    async def get_crash(self, crash_id: str) -> dict[str, Any] | None:
        return await self._read(reads.get_crash, crash_id)

    async def crash_dump_path(self, crash_id: str) -> str | None:
        return await self._read(reads.crash_dump_path, crash_id)

    async def timeseries(
        self, source: Source, bucket: Bucket, by: Sequence[str], filters: Filters
    ) -> tuple[SeriesCount, ...]:
        return await self._read(reads.timeseries, source, bucket, by, filters)

    async def quarantine_page(
        self, filters: Filters, limit: int, after: Position | None = None
    ) -> Page:
        return await self._read(reads.quarantine_page, filters, limit, after)

    async def get_quarantined(self, row_id: int) -> dict[str, Any] | None:
        return await self._read(reads.get_quarantined, row_id)

    async def quarantine_counts(self) -> tuple[tuple[str, int], ...]:
        return await self._read(reads.quarantine_counts)

    async def issues_page(
        self, filters: IssueFilters, sort: IssueSort, limit: int, after: str | None = None
    ) -> IssuePage:
        return await self._read(issues.issues_page, filters, sort, limit, after)

    async def get_issue(
        self, issue_id: int, since: int | None = None, until: int | None = None
    ) -> dict[str, Any] | None:
        return await self._read(issues.get_issue, issue_id, since, until)

    async def issue_events(self, issue_id: int, limit: int, after: Position | None = None) -> Page:
        return await self._read(issues.issue_events, issue_id, limit, after)

    async def alert_events(self, limit: int) -> tuple[AlertEvent, ...]:
        return await self._read(alert_sql.events, limit)

    async def issues_over(
        self,
        rule: str,
        per_rule: bool,
        since_ms: int,
        more_than: int,
        now_ms: int,
        kind: str | None = None,
        site: str | None = None,
        limit: int = 1000,
    ) -> tuple[dict[str, Any], ...]:
        return await self._read(
            alert_sql.issues_over, rule, per_rule, since_ms, more_than, now_ms, kind, site, limit
        )

    async def alerts_page(
        self, limit: int, before: int | None = None, status: str | None = None
    ) -> AlertPage:
        return await self._read(alert_sql.alerts_page, limit, before, status)

    async def alert_deliveries_page(
        self, limit: int, before: int | None = None, alert_id: int | None = None
    ) -> AlertPage:
        return await self._read(alert_sql.deliveries_page, limit, before, alert_id)

    async def get_symbol_files(
        self, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], SymbolFile]:
        return await self._read(symbols.get_files, keys)

    async def get_symbol_file(self, debug_file: str, debug_id: str) -> SymbolFile | None:
        return await self._read(symbols.get_file, debug_file, debug_id)

    async def list_symbol_files(
        self, limit: int = 100, after: tuple[str, str] | None = None
    ) -> list[SymbolFile]:
        return await self._read(symbols.list_files, limit, after)

    async def missing_symbols(self, limit: int = 100) -> list[MissingSymbols]:
        return await self._read(symbols.missing, limit)

    async def export_batch(
        self,
        kind: RowKind,
        limit: int,
        after: Position | None = None,
        *,
        since: int | None = None,
    ) -> tuple[RawRow, ...]:
        return await self._read(transfer.export_batch, kind, limit, after, since)

    async def counts(self) -> Counts:
        return await self._read(transfer.counts)

    async def iter_reports(
        self, filters: Filters | None = None, *, page_size: int = 1000
    ) -> AsyncIterator[dict[str, Any]]:
        if self.read_conn is None:
            raise StorageNotStarted()
        try:
            async for report in reads.iter_reports(self.read_conn, filters, page_size):
                yield report
        except sqlite3.Error as exc:
            raise _failure(exc) from exc

    async def iter_crashes(
        self, filters: Filters | None = None, *, page_size: int = 1000
    ) -> AsyncIterator[dict[str, Any]]:
        if self.read_conn is None:
            raise StorageNotStarted()
        try:
            async for crash in reads.iter_crashes(self.read_conn, filters, page_size):
                yield crash
        except sqlite3.Error as exc:
            raise _failure(exc) from exc
