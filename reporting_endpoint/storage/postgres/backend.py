"""The PostgreSQL backend: the storage protocol on one PostgreSQL database.

``start`` opens one dedicated write connection (migrations through ``migrate.py``, applied
once however many processes start together; partitions for today and the next days), hands
it to the group-commit writer (``writer.py``), and opens a pool for reads (``reads.py``),
whose sessions are read-only. Reports go in groups; crash rows, facts and deletions are jobs
on the writer's connection between groups. ``blob_locks`` hands the blob store shard locks
every host on the database sees (advisory locks, ``bloblocks.py``).

A driver error never leaves this package as itself: an unreachable server, a lost
connection or a timeout is ``DatabaseUnavailable`` (a ``StorageError``: the API answers 503
with Retry-After), a lock held too long ``StorageBusy``; anything else a ``StorageFailure``
that keeps the driver's error as its cause (the API answers 500, the CLI names the database).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from functools import partial
from typing import Any, TypeVar

import asyncpg

from reporting_endpoint.issues.triage import StatusChange
from reporting_endpoint.native.records import MissingSymbols, SymbolFile
from reporting_endpoint.records import IssueKey, NewCrash
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
    StorageError,
    StorageFailure,
    StorageNotStarted,
    WriterHealth,
)
from reporting_endpoint.storage.filters import Bucket, Filters, Position, Source
from reporting_endpoint.storage.postgres import alerts as alert_sql
from reporting_endpoint.storage.postgres import (
    crashes,
    daily,
    deletion,
    issue_admin,
    issues,
    processing,
    reads,
    symbols,
    transfer,
)
from reporting_endpoint.storage.postgres.bloblocks import PostgresBlobLocks
from reporting_endpoint.storage.postgres.connection import (
    DatabaseUnavailable,
    WriterLimits,
    is_unavailable,
)
from reporting_endpoint.storage.postgres.migrate import MigrationError, apply_migrations
from reporting_endpoint.storage.postgres.writer import PostgresWriter
from reporting_endpoint.storage.rows import check_rows

T = TypeVar("T")
SCHEMES = ("postgresql", "postgres")
# Tables every version of this service's database has.
OUR_TABLES = ("reports", "crashes")
# Read pool size per process: reads are short, keyset pages; exports hold none between pages.
POOL_MAX_SIZE = 10
# A read (one page, one group query) answers within this or is answered 503.
READ_TIMEOUT = 30.0
# Connecting, checking and migrating at start, all together.
START_TIMEOUT = 120.0


def is_postgres_url(database: str) -> bool:
    return database.partition("://")[0].lower() in SCHEMES


_USERINFO_PASSWORD = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:@/?#]*):[^/?#]*@")
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)


def display_url(url: str) -> str:
    """``url`` without its password (in the user part or as ``?password=``), for messages
    and logs. Plain text matching, not a URL parser: it must work on any text a user gave,
    parseable or not."""
    url = _USERINFO_PASSWORD.sub(r"\1:***@", url)
    return _QUERY_PASSWORD.sub(r"\1***", url)


def check_url(url: str, connect_timeout: float = 10.0) -> str | None:
    """Before ``serve``: why the service could not use ``url`` (None when it can): a URL
    asyncpg cannot parse, or a server that refuses or does not answer (bounded wait). The
    URL is left to asyncpg whole: libpq's forms (``host1:5432,host2:5432``, ``?host=``)
    are not what ``urllib`` parses."""

    async def probe() -> None:
        connection = await asyncpg.connect(url, timeout=connect_timeout)
        await connection.close(timeout=connect_timeout)

    try:
        asyncio.run(probe())
    except Exception as exc:  # every failure becomes a message, none a traceback
        return f"cannot connect to {display_url(url)} ({type(exc).__name__}: {exc})"
    return None


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _failure(url: str, exc: BaseException) -> StorageFailure:
    return StorageFailure(f"{display_url(url)}: {type(exc).__name__}: {exc}")


async def _is_ours(connection: asyncpg.Connection) -> str | None:
    """The first of our tables the database lacks, or None when it has them all."""
    for table in OUR_TABLES:
        if not await connection.fetchval("SELECT to_regclass($1) IS NOT NULL", table):
            return table
    return None


class PostgresStorage(PostgresWriter):
    """The storage protocol on one PostgreSQL database (see ``PostgresWriter`` for writes).

    ``read_only``: only the read pool is opened, and only on a database of this service (the
    CLI's read commands: a wrong database is refused without writing). ``must_exist``: the
    same check before the writer migrates anything (``prune``, ``delete``, which must not
    create the schema where there was none).
    """

    def __init__(
        self,
        url: str,
        *,
        read_only: bool = False,
        must_exist: bool = False,
        limits: WriterLimits | None = None,
        pool_max_size: int = POOL_MAX_SIZE,
        read_timeout: float = READ_TIMEOUT,
    ) -> None:
        super().__init__(url, limits)
        self.read_only = read_only
        self.must_exist = must_exist
        self.pool_max_size = pool_max_size
        self.read_timeout = read_timeout
        self.pool: reads.PgPool | None = None
        self._blob_locks: PostgresBlobLocks | None = None

    def __repr__(self) -> str:
        return f"PostgresStorage({display_url(self.url)!r})"

    # --- life -------------------------------------------------------------------------

    async def start(self) -> None:
        if self.pool is not None:
            return
        try:
            # Bounded as a whole: a server that accepts connections but never answers (or a
            # migration of another process that never ends) fails the start, not hangs it.
            async with asyncio.timeout(START_TIMEOUT):
                if not self.read_only:
                    await self._start_writer()
                await self._check_reader()
            self.pool = await asyncpg.create_pool(
                self.url,
                min_size=1,
                max_size=self.pool_max_size,
                timeout=self.limits.connect_timeout,
                command_timeout=self.read_timeout,
                server_settings={
                    "application_name": "reporting-endpoint reader",
                    # Readers cannot write, whatever a bug asks of them.
                    "default_transaction_read_only": "on",
                },
            )
        except (StorageError, StorageFailure):
            await self.stop_writer()
            raise
        except MigrationError as exc:
            await self.stop_writer()
            raise StorageFailure(f"{display_url(self.url)}: {exc}") from exc
        except Exception as exc:
            await self.stop_writer()
            raise _failure(self.url, exc) from exc

    async def _start_writer(self) -> None:
        connection = await self.connect()
        try:
            if self.must_exist:
                missing = await _is_ours(connection)
                if missing is not None:
                    raise NotOurDatabase(
                        f"{display_url(self.url)} is not a reporting-endpoint database"
                        f" (it has no {missing} table)"
                    )
            await apply_migrations(connection, lock_timeout=self.limits.connect_timeout * 6)
            await self.start_writer(connection)
        except BaseException:
            connection.terminate()
            raise

    async def _check_reader(self) -> None:
        if not self.read_only:
            return
        connection = await asyncpg.connect(self.url, timeout=self.limits.connect_timeout)
        try:
            missing = await _is_ours(connection)
        finally:
            await connection.close(timeout=self.limits.connect_timeout)
        if missing is not None:
            raise NotOurDatabase(
                f"{display_url(self.url)} is not a reporting-endpoint database"
                f" (it has no {missing} table)"
            )

    async def stop(self) -> None:
        """Refuse new work, commit everything already queued (bounded), close."""
        try:
            await self.stop_writer()
        finally:
            pool, self.pool = self.pool, None
            if pool is not None:
                try:
                    await asyncio.wait_for(pool.close(), self.limits.connect_timeout)
                except (TimeoutError, Exception):
                    pool.terminate()
            if self._blob_locks is not None:
                await self._blob_locks.close()  # bounded; reopened by a later use

    def blob_locks(self) -> PostgresBlobLocks:
        """Blob shard locks every host on this database sees (``bloblocks.py``), for the
        blob store (``blobstores.SharesBlobLocks``): without them a deletion on one host could
        remove the blob of an upload in flight on another. One object per storage, so all of
        its callers share one pool; nothing connects before the first lock is taken (the app
        asks for them before ``start``)."""
        if self._blob_locks is None:
            self._blob_locks = PostgresBlobLocks(
                self.url, connect_timeout=self.limits.connect_timeout
            )
        return self._blob_locks

    def health(self) -> WriterHealth:
        if self.read_only:
            return WriterHealth(self.pool is not None, 0, self.queue_size)
        return super().health()

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
        reports = await self.run_job(partial(deletion.prune_reports, older_than_ms=older_than_ms))
        return Deletion(reports=reports)

    async def delete_report(self, report_id: int) -> bool:
        if not -(1 << 63) <= report_id < 1 << 63:
            return False  # no bigint id: asyncpg could not even send it
        return await self.run_job(partial(deletion.delete_report, report_id=report_id))

    async def delete_crash(self, crash_id: str) -> Deletion:
        if "\x00" in crash_id:
            return Deletion()  # PostgreSQL cannot hold it, so no row has it
        return await self.run_job(partial(deletion.delete_crash, crash_id=crash_id))

    async def unreferenced_blobs(self, blobs: Sequence[Blob]) -> tuple[Blob, ...]:
        # Through the writer, as on SQLite: after every crash row this process queued before
        # the check has committed, so an upload of the same content in flight keeps its blob.
        return await self.run_job(partial(deletion.unreferenced, blobs=blobs))

    async def referenced_blobs(self) -> frozenset[str]:
        return await self._read(reads.referenced_blobs)

    async def roll_up_days(self, now_ms: int) -> int:
        return await self.run_job(partial(daily.roll_up, now_ms=now_ms))

    async def put_symbol_files(self, files: Sequence[SymbolFile]) -> int:
        if not files:
            return 0
        return await self.run_job(partial(symbols.put_files, files=files))

    async def requeue_late_symbols(self) -> int:
        return await self.run_job(symbols.requeue_late)

    async def set_issue_status(
        self, issue_id: int, change: StatusChange, now_ms: int
    ) -> dict[str, Any] | None:
        if not -(1 << 63) <= issue_id < 1 << 63:
            return None  # no bigint id: no such issue
        found = await self.run_job(
            partial(issue_admin.set_status, issue_id=issue_id, change=change, now_ms=now_ms)
        )
        # Read back after the commit, through the read pool, as the API shows it.
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
        if kind == "reports":
            # The partitions first, in a transaction of their own (as the writer makes them
            # for ingest): their advisory lock and ATTACH are not held through the COPY.
            days = [int(row[1]) // transfer.DAY_MS for row in rows]
            await self.run_job(partial(transfer.ensure_days, days=days))
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

    def _translate(self, exc: Exception) -> Exception:
        """The storage error a driver error stands for."""
        if isinstance(exc, StorageError | StorageFailure):
            return exc
        if is_unavailable(exc):
            return DatabaseUnavailable(f"the database did not answer: {type(exc).__name__}")
        if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError):
            return _failure(self.url, exc)
        return exc

    async def _read(self, query: Callable[..., Awaitable[T]], *args: object) -> T:
        pool = self.pool
        if pool is None:
            raise StorageNotStarted()
        try:
            # One bound for the whole call: the pool's acquire and each query have their own,
            # but a read must never outlast this whatever the server does.
            async with asyncio.timeout(self.read_timeout):
                return await query(pool, *args)
        except Exception as exc:
            translated = self._translate(exc)
            if translated is exc:
                raise
            raise translated from exc

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

    async def _iterate(
        self, rows: Callable[[reads.PgPool], AsyncIterator[dict[str, Any]]]
    ) -> AsyncIterator[dict[str, Any]]:
        pool = self.pool
        if pool is None:
            raise StorageNotStarted()
        iterator = rows(pool)
        try:
            while True:
                try:
                    # Each page is one bounded read; the caller's time between rows is its own.
                    async with asyncio.timeout(self.read_timeout):
                        row = await anext(iterator)
                except StopAsyncIteration:
                    return
                except Exception as exc:
                    translated = self._translate(exc)
                    if translated is exc:
                        raise
                    raise translated from exc
                yield row
        finally:
            with contextlib.suppress(Exception):
                await iterator.aclose()  # type: ignore[attr-defined]

    async def iter_reports(
        self, filters: Filters | None = None, *, page_size: int = 1000
    ) -> AsyncIterator[dict[str, Any]]:
        async for report in self._iterate(
            lambda pool: reads.iter_reports(pool, filters, page_size)
        ):
            yield report

    async def iter_crashes(
        self, filters: Filters | None = None, *, page_size: int = 1000
    ) -> AsyncIterator[dict[str, Any]]:
        async for crash in self._iterate(lambda pool: reads.iter_crashes(pool, filters, page_size)):
            yield crash
