"""The PostgreSQL group-commit writer: one task owns one dedicated write connection.

Handlers put reports on a bounded queue and await a future; the writer takes what is queued,
writes it in one transaction (COPY of the rows, roll-up upserts, quarantine) and resolves the
futures only after COMMIT answered, so a 2xx always follows a commit. A failing group is
retried one submission at a time, so a poison row fails only its own request. Crash rows and
maintenance (prune, deletion) run as jobs on the same connection, between groups.

The database is a server that can go away: every await on it is bounded (a budget per
transaction; a transaction that overruns it has its connection terminated, since its state is
unknown). When the connection is lost, everything waiting fails at once with
``DatabaseUnavailable`` (503 + Retry-After), new work is refused at once while the writer
reconnects with bounded backoff, and ingest resumes by itself once the server is back. A
commit whose answer was lost is answered 503: the client sends again (a duplicate at worst),
never a 2xx for a report that might not be there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncpg

from reporting_endpoint import metrics
from reporting_endpoint.records import NewReport, RejectedReport
from reporting_endpoint.storage.base import (
    QueueFull,
    StorageBusy,
    StorageClosed,
    StorageError,
    StorageNotStarted,
    WriterDown,
    WriterHealth,
)
from reporting_endpoint.storage.postgres.connection import (
    TRANSIENT,
    DatabaseUnavailable,
    WriterLimits,
    connect,
    is_unavailable,
)
from reporting_endpoint.storage.postgres.rollups import write_quarantine, write_reports
from reporting_endpoint.storage.postgres.values import clean_row

log = logging.getLogger("reporting_endpoint.storage.postgres")

T = TypeVar("T")
Job = Callable[[asyncpg.Connection], Awaitable[Any]]

DAY_MS = 86_400_000
# One transaction takes at most this many reports (bounds one COPY and its round trip).
MAX_REPORTS_PER_COMMIT = 2000
# One transaction takes at most this many groupable jobs (crash rows, parse results).
MAX_JOBS_PER_COMMIT = 256
# A crashed writer task (a bug, not a lost connection) is restarted this many times in a row
# (a commit resets the count); then the storage stays down.
MAX_WRITER_RESTARTS = 5
# Reconnecting waits this long first, doubling up to the second value: bounded, so the
# writer is back within seconds of the server.
RECONNECT_BACKOFF = (0.1, 2.0)
# Transactions that lose a deadlock or a serialisation check are tried again this often.
MAX_TRANSIENT_RETRIES = 3
# Partitions made ahead of the days seen, so the midnight rush never waits for an ATTACH.
DAYS_AHEAD = 2


class _ConnectionLost(Exception):
    """Raised inside the writer when its connection is gone; the supervisor reconnects."""


@dataclass(slots=True)
class _Pending:
    rows: list[tuple[object, ...]]
    rejected: list[tuple[object, ...]]
    done: asyncio.Future[None] = field(repr=False)


@dataclass(slots=True)
class _Job:
    run: Job
    timeout: float
    done: asyncio.Future[Any] = field(repr=False)
    # Small row writes (a crash row, a parse result) that may share a transaction with the
    # jobs queued next to them, each under a savepoint of its own.
    groupable: bool = False


class PostgresWriter:
    """Group commit on one dedicated asyncpg connection; see the module docstring."""

    def __init__(self, url: str, limits: WriterLimits | None = None) -> None:
        self.url = url
        self.limits = limits or WriterLimits()
        self.queue_size = self.limits.queue_size
        self.reconnect_backoff = RECONNECT_BACKOFF
        self._pending: deque[_Pending] = deque()
        self._jobs: deque[_Job] = deque()
        self._inflight: list[_Pending] = []
        self._inflight_jobs: list[_Job] = []
        self._pending_rows = 0
        self._wakeup: asyncio.Event | None = None
        self._stopping: asyncio.Event | None = None
        self._writer: asyncio.Task[None] | None = None
        self._conn: asyncpg.Connection | None = None
        self._accepting = False
        self._closing = False
        self._down = False
        # Whether the writer is down because the server cannot be reached (else: it crashed).
        self._unreachable = False
        self._crashes = 0
        # UTC days (received_at // DAY_MS) known to have a partition; a day dropped by a prune
        # elsewhere shows up as SQLSTATE 23514 and is ensured again.
        self._days: set[int] = set()

    # --- life -------------------------------------------------------------------------

    async def connect(self) -> asyncpg.Connection:
        return await connect(self.url, self.limits)

    async def start_writer(self, connection: asyncpg.Connection) -> None:
        """Take ``connection`` (migrated) and start the writer task."""
        self._conn = connection
        await self._ensure_days({_today()}, ahead=True)
        self._wakeup = asyncio.Event()
        self._stopping = asyncio.Event()
        self._closing = False
        self._down = False
        self._crashes = 0
        self._accepting = True
        self._writer = asyncio.create_task(self._supervise(), name="reporting-endpoint-writer")
        self._writer.add_done_callback(self._writer_gone)

    async def stop_writer(self) -> None:
        """Refuse new work, commit everything already queued (bounded), close."""
        if self._writer is None:
            return
        self._accepting = False
        self._closing = True
        assert self._wakeup is not None and self._stopping is not None
        self._stopping.set()
        self._wakeup.set()
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        finally:
            self._writer = None
            await self._close_connection()

    async def _close_connection(self) -> None:
        connection, self._conn = self._conn, None
        if connection is None or connection.is_closed():
            return
        try:
            await connection.close(timeout=5)
        except Exception:
            connection.terminate()

    def health(self) -> WriterHealth:
        alive = (
            self._writer is not None
            and not self._writer.done()
            and self._accepting
            and not self._down
        )
        return WriterHealth(alive, self._pending_rows, self.queue_size)

    def _check_accepting(self) -> None:
        if not self._accepting:
            raise StorageClosed() if self._closing else StorageNotStarted()
        if self._down:
            if self._unreachable:
                raise DatabaseUnavailable("the database is not reachable; reconnecting")
            raise WriterDown()
        if self._writer is None or self._writer.done():
            raise WriterDown()

    # --- what handlers call -------------------------------------------------------------

    async def submit_reports(
        self, reports: Sequence[NewReport], rejected: Sequence[RejectedReport] = ()
    ) -> None:
        size = len(reports) + len(rejected)
        if not size:
            return
        self._check_accepting()
        # An empty queue takes any batch, so a batch larger than the queue is not refused forever.
        if self._pending_rows and self._pending_rows + size > self.queue_size:
            raise QueueFull()
        assert self._wakeup is not None
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append(
            _Pending(
                [clean_row(report.row()) for report in reports],
                [clean_row(r.row()) for r in rejected],
                done,
            )
        )
        self._pending_rows += size
        self._wakeup.set()
        # A client that hangs up cancels only this future; its rows are still written.
        await done

    async def run_job(
        self, job: Callable[[asyncpg.Connection], Awaitable[T]], *, groupable: bool = False
    ) -> T:
        """Run ``job`` on the write connection in a transaction of its own, between groups
        (crash rows, facts, prune, deletion); ``groupable`` jobs queued together share one
        transaction, each under a savepoint. Backend-internal."""
        self._check_accepting()
        assert self._wakeup is not None
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._jobs.append(_Job(job, self.limits.job_timeout, done, groupable))
        self._wakeup.set()
        return await done

    # --- the writer task ----------------------------------------------------------------

    async def _supervise(self) -> None:
        while True:
            try:
                await self._run()
                return
            except _ConnectionLost as exc:
                log.warning("lost the PostgreSQL connection: %s", exc.__cause__ or exc)
                self._down = self._unreachable = True
                self._fail_waiting(DatabaseUnavailable("the database connection was lost"))
                await self._close_connection()
                if not await self._reconnect():
                    return
                self._down = self._unreachable = False
                log.warning("reconnected to PostgreSQL; taking writes again")
            except Exception:
                log.exception("the storage writer crashed")
                self._down = True
                self._fail_waiting(WriterDown())
                self._crashes += 1
                if self._closing or self._crashes > MAX_WRITER_RESTARTS:
                    log.error("the storage writer stays down after %d crashes", self._crashes)
                    return
                # Whatever the crash left on the connection (an open transaction) goes with it.
                await self._close_connection()
                if not await self._reconnect():
                    return
                self._down = False
                log.warning("the storage writer restarted")

    async def _reconnect(self) -> bool:
        """Connect again, waiting between attempts (bounded backoff); False once closing."""
        first, cap = self.reconnect_backoff
        delay = first
        assert self._stopping is not None
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            if self._closing:
                return False
            delay = min(cap, delay * 2)
            try:
                connection = await self.connect()
            except Exception as exc:
                log.info("PostgreSQL not reachable yet: %s", exc)
                continue
            self._conn = connection
            try:
                # The day may have turned, or a prune elsewhere dropped what was known.
                self._days.clear()
                await self._ensure_days({_today()}, ahead=True)
            except Exception as exc:
                log.info("PostgreSQL not ready yet: %s", exc)
                await self._close_connection()
                continue
            return True
        return False

    async def _connection(self) -> asyncpg.Connection:
        """The write connection; one the server closed while idle (a restart, a failover,
        an idle timeout) is opened again once, so the next group is not refused for it."""
        connection = self._conn
        if connection is not None and not connection.is_closed():
            return connection
        try:
            connection = await self.connect()
        except Exception as exc:
            raise _ConnectionLost(f"cannot connect: {exc}") from exc
        log.warning("the PostgreSQL write connection was closed; opened it again")
        self._conn = connection
        self._days.clear()
        return connection

    def _writer_gone(self, task: asyncio.Task[None]) -> None:
        # Covers a cancelled writer or one that gave up: nothing may wait on it forever.
        if not self._closing:
            self._down = True
        self._fail_waiting(WriterDown() if not self._closing else StorageClosed())

    def _fail_waiting(self, error: StorageError) -> None:
        for item in [*self._inflight, *self._pending]:
            _resolve(item.done, error)
        self._inflight = []
        self._pending.clear()
        self._pending_rows = 0
        for job in [*self._jobs, *self._inflight_jobs]:
            _resolve(job.done, error)
        self._jobs.clear()
        self._inflight_jobs = []

    async def _run(self) -> None:
        assert self._wakeup is not None
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending or self._jobs:
                if self._jobs:
                    self._inflight_jobs = self._take_jobs()
                    if len(self._inflight_jobs) == 1:
                        await self._run_job(self._inflight_jobs[0])
                    else:
                        await self._run_jobs(self._inflight_jobs)
                    self._inflight_jobs = []
                if self._pending:
                    self._inflight = self._take_group()
                    await self._commit_group(self._inflight)
                    self._inflight = []
            if self._closing and not self._pending and not self._jobs:
                return

    def _take_jobs(self) -> list[_Job]:
        jobs = [self._jobs.popleft()]
        if jobs[0].groupable:
            while self._jobs and self._jobs[0].groupable and len(jobs) < MAX_JOBS_PER_COMMIT:
                jobs.append(self._jobs.popleft())
        return jobs

    async def _run_jobs(self, jobs: list[_Job]) -> None:
        """Several groupable jobs in one transaction, each under a savepoint: one that fails
        (its own data) fails alone; a lost connection, a lock timeout or a deadlock is the
        whole transaction's (retried, or failed for all)."""

        async def work(connection: asyncpg.Connection) -> list[tuple[bool, Any]]:
            outcomes: list[tuple[bool, Any]] = []
            for job in jobs:
                await connection.execute("SAVEPOINT job")
                try:
                    outcomes.append((True, await job.run(connection)))
                except TRANSIENT:
                    raise
                except asyncpg.exceptions.LockNotAvailableError:
                    raise
                except Exception as exc:
                    if is_unavailable(exc, connection):
                        raise
                    await connection.execute("ROLLBACK TO SAVEPOINT job")
                    outcomes.append((False, exc))
                await connection.execute("RELEASE SAVEPOINT job")
            return outcomes

        try:
            outcomes = await self._transaction(work, max(job.timeout for job in jobs))
        except _ConnectionLost:
            raise
        except Exception as exc:
            if not isinstance(exc, StorageBusy | StorageError):
                log.exception("write jobs failed")
            for job in jobs:
                _resolve(job.done, exc)
            return
        for job, (ok, value) in zip(jobs, outcomes, strict=True):
            if job.done.done():
                continue
            if ok:
                job.done.set_result(value)
            else:
                log.error("write job failed", exc_info=value)
                _resolve(job.done, value)

    def _take_group(self) -> list[_Pending]:
        group: list[_Pending] = []
        rows = 0
        while self._pending and (
            not group or rows + _size(self._pending[0]) <= MAX_REPORTS_PER_COMMIT
        ):
            item = self._pending.popleft()
            group.append(item)
            rows += _size(item)
        self._pending_rows -= rows
        metrics.queue_depth(self._pending_rows)
        return group

    # --- transactions -----------------------------------------------------------------

    async def _transaction(
        self, work: Callable[[asyncpg.Connection], Awaitable[T]], budget: float
    ) -> T:
        """``work`` between BEGIN and COMMIT within ``budget`` seconds, retried on a deadlock.

        Any sign that the connection is gone (or a budget overrun, after which its state is
        unknown: the connection is terminated) raises ``_ConnectionLost``; a lock wait past
        ``lock_timeout`` raises ``StorageBusy``; anything else is the statement's own error,
        rolled back, for the caller to pin on a submission.
        """
        connection = await self._connection()
        for attempt in range(MAX_TRANSIENT_RETRIES + 1):
            try:
                async with asyncio.timeout(budget):
                    await connection.execute("BEGIN")
                    try:
                        result = await work(connection)
                        await connection.execute("COMMIT")
                    except Exception as exc:
                        if not is_unavailable(exc, connection):
                            await connection.execute("ROLLBACK")
                        raise
            except TimeoutError as exc:
                connection.terminate()
                raise _ConnectionLost(f"no answer within {budget:g} s") from exc
            except TRANSIENT as exc:
                if attempt == MAX_TRANSIENT_RETRIES:
                    raise
                log.info("retrying a transaction: %s", exc)
                continue
            except asyncpg.exceptions.LockNotAvailableError as exc:
                raise StorageBusy(
                    f"another session held a lock for {self.limits.lock_timeout:g} s"
                ) from exc
            except Exception as exc:
                if is_unavailable(exc, connection):
                    connection.terminate()
                    raise _ConnectionLost(str(exc)) from exc
                raise
            self._crashes = 0
            return result
        raise AssertionError("unreachable")

    async def _ensure_days(
        self, days: set[int], *, ahead: bool = False, force: bool = False
    ) -> None:
        """Make sure a partition exists for each of ``days`` (and, for today's, the next
        ``DAYS_AHEAD``), each call a transaction of its own: never inside the ingest one,
        where its advisory lock and ATTACH would be held until that commits."""
        missing = sorted(days if force else days - self._days)
        if not missing:
            return
        connection = await self._connection()
        today = _today()
        try:
            async with asyncio.timeout(self.limits.transaction_timeout):
                for day in missing:
                    last = day + DAYS_AHEAD if (ahead or day >= today - 1) else day
                    await connection.fetchval(
                        "SELECT ensure_report_partitions($1, $2)", day * DAY_MS, last * DAY_MS
                    )
                    self._days.update(range(day, last + 1))
        except TimeoutError as exc:
            connection.terminate()
            raise _ConnectionLost("no answer while ensuring partitions") from exc
        except Exception as exc:
            if is_unavailable(exc, connection):
                connection.terminate()
                raise _ConnectionLost(str(exc)) from exc
            raise

    async def _write(
        self, rows: list[tuple[object, ...]], rejected: list[tuple[object, ...]]
    ) -> None:
        started = time.perf_counter()
        days = {int(row[0]) // DAY_MS for row in rows}  # type: ignore[call-overload]
        await self._ensure_days(days)

        async def work(connection: asyncpg.Connection) -> None:
            await write_reports(connection, rows, int(time.time() * 1000))
            await write_quarantine(connection, rejected, self.limits.quarantine_max_rows)

        try:
            await self._transaction(work, self.limits.transaction_timeout)
        except asyncpg.exceptions.CheckViolationError:
            # No partition for a row's day (dropped by a prune elsewhere since this process
            # saw it): ensure them all again, then once more.
            self._days -= days
            await self._ensure_days(days, force=True)
            await self._transaction(work, self.limits.transaction_timeout)
        metrics.commit_observed(time.perf_counter() - started, len(rows) + len(rejected))

    async def _commit_group(self, group: list[_Pending]) -> None:
        rows = [row for item in group for row in item.rows]
        rejected = [row for item in group for row in item.rejected]
        try:
            await self._write(rows, rejected)
        except _ConnectionLost:
            raise
        except StorageBusy as exc:
            # A lock held elsewhere is not a poison row: retrying one by one would only wait
            # again, once per submission.
            log.warning("write of %d report(s) gave up: %s", len(rows), exc)
            for item in group:
                _resolve(item.done, exc)
            return
        except Exception as exc:
            if len(group) == 1:
                log.exception("write failed for %d report(s)", len(rows))
                _resolve(group[0].done, exc)
                return
            for index, item in enumerate(group):
                try:
                    await self._write(item.rows, item.rejected)
                except _ConnectionLost:
                    # The supervisor fails this item and the rest (still in _inflight).
                    self._inflight = group[index:]
                    raise
                except StorageBusy as busy:
                    for rest in group[index:]:
                        _resolve(rest.done, busy)
                    return
                except Exception as item_exc:
                    log.exception("write failed for %d report(s)", len(item.rows))
                    _resolve(item.done, item_exc)
                else:
                    _resolve(item.done, None)
            return
        for item in group:
            _resolve(item.done, None)

    async def _run_job(self, job: _Job) -> None:
        try:
            result = await self._transaction(job.run, job.timeout)
        except _ConnectionLost:
            raise
        except Exception as exc:
            if not isinstance(exc, StorageBusy | StorageError):
                log.exception("write job failed")
            _resolve(job.done, exc)
        else:
            if not job.done.done():
                job.done.set_result(result)


def _today() -> int:
    return int(time.time() * 1000) // DAY_MS


def _size(item: _Pending) -> int:
    return len(item.rows) + len(item.rejected)


def storage_error(error: BaseException) -> StorageError:
    """A fresh StorageError for each waiter: one exception raised in many tasks would pile
    their tracebacks onto each other."""
    if isinstance(error, StorageError):
        return type(error)(*error.args)
    return StorageError(f"{type(error).__name__}: {error}")


def _resolve(done: asyncio.Future[Any], error: BaseException | None) -> None:
    if done.done():
        return
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(storage_error(error))
