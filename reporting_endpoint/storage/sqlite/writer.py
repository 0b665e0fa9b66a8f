"""The SQLite group-commit writer: one task owns the only write connection and commits in
groups; maintenance jobs run on its thread between groups. ``backend.py`` builds the storage
protocol on top of it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

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
from reporting_endpoint.storage.rows import lenient_text
from reporting_endpoint.storage.sqlite.connection import is_busy, open_connection
from reporting_endpoint.storage.sqlite.quarantine import write_quarantine
from reporting_endpoint.storage.sqlite.rollups import write_reports
from reporting_endpoint.storage.sqlite.schema import apply_migrations

log = logging.getLogger("reporting_endpoint.storage")

# One transaction takes at most this many reports (bounds how long the inserts hold the loop).
MAX_REPORTS_PER_COMMIT = 1000
# While another process holds the write lock, the writer thread waits in steps this long, so it
# notices its deadline, and a writer that was torn down, within one step.
LOCK_WAIT_STEP_MS = 100
# One transaction takes at most this many groupable jobs (crash rows, parse results).
MAX_JOBS_PER_COMMIT = 256
# A crashed writer task is restarted this many times in a row (a commit resets the count), after
# a delay that doubles from the first value up to the second; then the storage stays down.
MAX_WRITER_RESTARTS = 5
RESTART_BACKOFF = (0.1, 5.0)


T = TypeVar("T")


@dataclass(slots=True)
class _Pending:
    rows: list[tuple[object, ...]]
    rejected: list[tuple[object, ...]]
    done: asyncio.Future[None] = field(repr=False)


@dataclass(slots=True)
class _Job:
    run: Callable[[sqlite3.Connection], Any]
    done: asyncio.Future[Any] = field(repr=False)
    # Small row writes (a crash row, a parse result) that may share a transaction with the
    # jobs queued next to them, each under a savepoint of its own.
    groupable: bool = False


class SQLiteWriter:
    """Writes to one SQLite file in WAL mode.

    Handlers call ``submit_reports``; their rows wait in a bounded queue. The writer task takes
    all that is queued, writes it in one ``BEGIN IMMEDIATE ... COMMIT`` and only then resolves every
    waiting handler, so a 2xx always follows a commit. A failing group is retried one submission
    at a time, so a poison row fails only its own request.

    Nothing here waits for a lock on the event loop: the write connection has no busy timeout,
    and when another process (``prune``, ``sqlite3``) holds the write lock, the writer thread
    waits for it, at most ``write_lock_timeout`` seconds, while the loop keeps serving. A writer
    task that crashes fails everything waiting on it, is restarted with backoff, and meanwhile
    refuses new work at once (``WriterDown``) instead of letting requests hang.
    """

    def __init__(
        self,
        path: Path,
        *,
        queue_size: int = 20000,
        synchronous: str = "FULL",
        write_lock_timeout: float = 30.0,
        quarantine_max_rows: int = 100_000,
    ) -> None:
        self.path = Path(path)
        self.queue_size = queue_size
        self.synchronous = synchronous
        self.write_lock_timeout = write_lock_timeout
        self.quarantine_max_rows = quarantine_max_rows
        self.restart_backoff = RESTART_BACKOFF
        self._pending: deque[_Pending] = deque()
        self._jobs: deque[_Job] = deque()
        # What the writer has taken off the queues and not resolved yet (failed if it crashes).
        self._inflight: list[_Pending] = []
        self._inflight_jobs: list[_Job] = []
        self._pending_rows = 0
        self._wakeup: asyncio.Event | None = None
        self._writer: asyncio.Task[None] | None = None
        self._write_conn: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.read_conn: aiosqlite.Connection | None = None
        self._accepting = False
        self._closing = False
        self._down = False
        # Consecutive crashes since the last commit; bounds the restarts.
        self._crashes = 0

    async def start(self) -> None:
        if self._writer is not None:
            return
        # The writer task inserts on the loop and hands only COMMIT (which may fsync), lock
        # waits and maintenance jobs to this one thread; see _write for why not aiosqlite.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="reporting-endpoint-writer")
        self._write_conn = await asyncio.get_running_loop().run_in_executor(
            self._executor, self._open_and_migrate
        )
        # Readers never share the write connection; this one cannot write at all.
        self.read_conn = await self._open_reader()
        self._wakeup = asyncio.Event()
        self._closing = False
        self._down = False
        self._crashes = 0
        self._accepting = True
        self._writer = asyncio.create_task(self._supervise(), name="reporting-endpoint-writer")
        self._writer.add_done_callback(self._writer_gone)

    async def _open_reader(self) -> aiosqlite.Connection:
        connection = await aiosqlite.connect(
            f"file:{self.path.resolve()}?mode=ro", uri=True, isolation_level=None
        )
        # Text that is not UTF-8 (written by another tool) is shown with U+FFFD; the default
        # raises, and one such row would fail a page or stop an export.
        connection.text_factory = lenient_text
        return connection

    def _open_and_migrate(self) -> sqlite3.Connection:
        connection = open_connection(self.path, self.synchronous)
        try:
            apply_migrations(connection)
            # From here on a lock is never waited for inside SQLite: BEGIN on the loop must fail
            # at once, and the writer thread waits in steps of its own (_begin_waiting).
            connection.execute("PRAGMA busy_timeout=0")
        except BaseException:
            connection.close()
            raise
        return connection

    async def stop(self) -> None:
        """Refuse new work, commit everything already queued, then close."""
        if self._writer is None:
            if self.read_conn is not None:  # opened for reading only
                await self.read_conn.close()
                self.read_conn = None
            return
        self._accepting = False
        self._closing = True
        assert self._wakeup is not None
        self._wakeup.set()
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        finally:
            self._writer = None
            if self.read_conn is not None:
                await self.read_conn.close()
                self.read_conn = None
            if self._write_conn is not None and self._executor is not None:
                await asyncio.get_running_loop().run_in_executor(
                    self._executor, self._write_conn.close
                )
                self._write_conn = None
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

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
        if self._down or self._writer is None or self._writer.done():
            raise WriterDown()

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
            _Pending([report.row() for report in reports], [r.row() for r in rejected], done)
        )
        self._pending_rows += size
        self._wakeup.set()
        # A client that hangs up cancels only this future; its rows are still written.
        await done

    async def run_job(
        self, job: Callable[[sqlite3.Connection], T], *, groupable: bool = False
    ) -> T:
        """Run ``job`` on the write connection in a transaction of its own, between groups.

        For crash rows and maintenance (pruning, deletion): it goes through the writer, so it
        never contends with it. ``groupable`` jobs queued together share one transaction (one
        fsync), each under a savepoint, so one that fails fails alone. Backend-internal:
        callers use the storage protocol.
        """
        self._check_accepting()
        assert self._wakeup is not None
        done: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._jobs.append(_Job(job, done, groupable))
        self._wakeup.set()
        return await done

    async def _supervise(self) -> None:
        while True:
            try:
                await self._run()
                return
            except Exception:
                log.exception("the storage writer crashed")
            # Every request waiting on the dead writer learns it now, and new ones are refused
            # at once (503 + Retry-After) until the restart below.
            self._down = True
            self._fail_waiting(WriterDown())
            self._crashes += 1
            if self._closing or self._crashes > MAX_WRITER_RESTARTS:
                log.error("the storage writer stays down after %d crashes", self._crashes)
                return
            first, cap = self.restart_backoff
            await asyncio.sleep(min(cap, first * 2 ** (self._crashes - 1)))
            try:
                await self._recover()
            except Exception:
                log.exception("the storage writer could not roll back; restarting anyway")
            self._down = False
            log.warning("the storage writer restarted")

    async def _recover(self) -> None:
        # Through the executor: after anything the dead writer still had running on the thread.
        def rollback(connection: sqlite3.Connection) -> None:
            if connection.in_transaction:
                connection.execute("ROLLBACK")

        assert self._write_conn is not None
        await asyncio.get_running_loop().run_in_executor(self._executor, rollback, self._write_conn)

    def _writer_gone(self, task: asyncio.Task[None]) -> None:
        # Covers a cancelled writer or one that gave up: nothing may wait on it forever.
        if not self._closing:
            self._down = True
        self._fail_waiting(WriterDown() if not self._closing else StorageClosed())

    def _fail_waiting(self, error: StorageError) -> None:
        for item in [*self._inflight, *self._pending]:
            _resolve(item, error)
        self._inflight = []
        self._pending.clear()
        self._pending_rows = 0
        for job in [*self._jobs, *self._inflight_jobs]:
            if not job.done.done():
                job.done.set_exception(_storage_error(error))
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

    def _begin_waiting(self, connection: sqlite3.Connection) -> None:
        """``BEGIN IMMEDIATE`` on the writer thread, waiting up to ``write_lock_timeout``."""
        deadline = time.monotonic() + self.write_lock_timeout
        connection.execute(f"PRAGMA busy_timeout={LOCK_WAIT_STEP_MS}")
        try:
            while True:
                try:
                    connection.execute("BEGIN IMMEDIATE")
                    return
                except sqlite3.OperationalError as exc:
                    if not is_busy(exc):
                        raise
                    if time.monotonic() >= deadline or self._down:
                        raise StorageBusy(
                            f"another process held the write lock for {self.write_lock_timeout:g} s"
                        ) from exc
        finally:
            connection.execute("PRAGMA busy_timeout=0")

    async def _begin(self, connection: sqlite3.Connection) -> None:
        try:
            # No busy timeout: a lock held elsewhere fails this at once instead of freezing the
            # loop, and the wait moves to the writer thread.
            connection.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if not is_busy(exc):
                raise
            await asyncio.get_running_loop().run_in_executor(
                self._executor, self._begin_waiting, connection
            )

    async def _run_job(self, job: _Job) -> None:
        def in_transaction(connection: sqlite3.Connection) -> Any:
            self._begin_waiting(connection)
            try:
                result = job.run(connection)
                connection.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(Exception):
                    connection.execute("ROLLBACK")
                raise
            return result

        connection = self._write_conn
        assert connection is not None
        try:
            # Off the loop: a prune may touch many rows, and ingest must keep going meanwhile.
            result = await asyncio.get_running_loop().run_in_executor(
                self._executor, in_transaction, connection
            )
        except Exception as exc:
            if not isinstance(exc, StorageBusy):
                log.exception("write job failed")
            if not job.done.done():
                job.done.set_exception(_storage_error(exc))
        else:
            self._crashes = 0
            if not job.done.done():
                job.done.set_result(result)

    def _take_jobs(self) -> list[_Job]:
        jobs = [self._jobs.popleft()]
        if jobs[0].groupable:
            while self._jobs and self._jobs[0].groupable and len(jobs) < MAX_JOBS_PER_COMMIT:
                jobs.append(self._jobs.popleft())
        return jobs

    async def _run_jobs(self, jobs: list[_Job]) -> None:
        """Several groupable jobs in one transaction, each under a savepoint."""

        def in_transaction(connection: sqlite3.Connection) -> list[tuple[bool, Any]]:
            self._begin_waiting(connection)
            outcomes: list[tuple[bool, Any]] = []
            try:
                for job in jobs:
                    connection.execute("SAVEPOINT job")
                    try:
                        outcomes.append((True, job.run(connection)))
                    except Exception as exc:
                        connection.execute("ROLLBACK TO job")
                        outcomes.append((False, exc))
                    connection.execute("RELEASE job")
                connection.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(Exception):
                    connection.execute("ROLLBACK")
                raise
            return outcomes

        connection = self._write_conn
        assert connection is not None
        try:
            outcomes = await asyncio.get_running_loop().run_in_executor(
                self._executor, in_transaction, connection
            )
        except Exception as exc:
            if not isinstance(exc, StorageBusy):
                log.exception("write jobs failed")
            for job in jobs:
                if not job.done.done():
                    job.done.set_exception(_storage_error(exc))
            return
        self._crashes = 0
        for job, (ok, value) in zip(jobs, outcomes, strict=True):
            if job.done.done():
                continue
            if ok:
                job.done.set_result(value)
            else:
                log.error("write job failed", exc_info=value)
                job.done.set_exception(_storage_error(value))

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

    async def _commit_group(self, group: list[_Pending]) -> None:
        rows = [row for item in group for row in item.rows]
        rejected = [row for item in group for row in item.rejected]
        try:
            await self._write(rows, rejected)
        except StorageBusy as exc:
            # A lock held elsewhere is not a poison row: retrying one by one would only wait
            # again, once per submission.
            log.warning("write of %d report(s) gave up: %s", len(rows), exc)
            for item in group:
                _resolve(item, exc)
            return
        except Exception as exc:
            if len(group) == 1:
                log.exception("write failed for %d report(s)", len(rows))
                _resolve(group[0], exc)
                return
            for index, item in enumerate(group):
                try:
                    await self._write(item.rows, item.rejected)
                except StorageBusy as busy:
                    for rest in group[index:]:
                        _resolve(rest, busy)
                    return
                except Exception as item_exc:
                    log.exception("write failed for %d report(s)", len(item.rows))
                    _resolve(item, item_exc)
                else:
                    _resolve(item, None)
            return
        for item in group:
            _resolve(item, None)

    async def _write(
        self, rows: list[tuple[object, ...]], rejected: list[tuple[object, ...]]
    ) -> None:
        # The inserts run on the event loop: sqlite3 drops and retakes the GIL for every row,
        # and on a thread each retake waits behind the busy loop (measured: 3 ms for 32 rows
        # against 0.3 ms inline). COMMIT, which may fsync, goes to the writer thread.
        connection = self._write_conn
        assert connection is not None
        started = time.perf_counter()
        await self._begin(connection)
        try:
            # The time triage compares an ignore's end with (not the reports' own times: a
            # report's clock is the browser's).
            finish = write_reports(connection, rows, time.time_ns() // 1_000_000)
            write_quarantine(connection, rejected, self.quarantine_max_rows)
            await asyncio.get_running_loop().run_in_executor(
                self._executor, _finish_and_commit, connection, finish
            )
        except BaseException:
            with contextlib.suppress(Exception):
                connection.execute("ROLLBACK")
            raise
        metrics.commit_observed(time.perf_counter() - started, len(rows) + len(rejected))
        self._crashes = 0


def _finish_and_commit(connection: sqlite3.Connection, finish: Callable[[], None]) -> None:
    # The issue counters are a few long single statements (the GIL is released while SQLite
    # runs them), so on this thread they overlap with the loop's request handling.
    finish()
    connection.execute("COMMIT")


def _size(item: _Pending) -> int:
    return len(item.rows) + len(item.rejected)


def _storage_error(error: BaseException) -> StorageError:
    # A fresh instance for each waiter: one exception raised in many tasks would pile their
    # tracebacks onto each other.
    if isinstance(error, StorageError):
        return type(error)(*error.args)
    return StorageError(str(error))


def _resolve(item: _Pending, error: BaseException | None) -> None:
    if item.done.done():
        return
    if error is None:
        item.done.set_result(None)
    else:
        item.done.set_exception(_storage_error(error))
