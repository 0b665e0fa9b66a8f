"""The Storage protocol every backend implements, the records it answers, and its errors.

Everything here is in domain terms: reports, crashes, groups, pages. A backend (one folder
under ``storage/``) owns its SQL, its driver and its migrations; callers only see this.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from reporting_endpoint.issues.triage import StatusChange
from reporting_endpoint.native.records import MissingSymbols, SymbolFile
from reporting_endpoint.records import IssueKey, NewCrash, NewReport, RejectedReport
from reporting_endpoint.storage.alert_store import AlertStore
from reporting_endpoint.storage.filters import Bucket, Filters, Position, Source


class StorageError(Exception):
    """Storage could not take the write; ``code`` is the reason sent to the client."""

    code = "storage_error"


class StorageNotStarted(StorageError):
    code = "storage_not_started"


class StorageClosed(StorageError):
    code = "storage_closed"


class QueueFull(StorageError):
    code = "queue_full"


class StorageBusy(StorageError):
    """Another process held the database's write lock for longer than the service waits."""

    code = "storage_busy"


class WriterDown(StorageError):
    """The writer task is gone (crashed, restarting or given up): nothing can be committed."""

    code = "writer_down"


class StorageFailure(Exception):
    """The database failed in a way the service does not expect (a table gone, a corrupt
    file): a broken database or a bug, not a busy one, so not a ``StorageError`` (which means
    "try again later"). The driver's own error is its ``__cause__``."""


class NotOurDatabase(StorageError, ValueError):
    """The database exists but is not a reporting-endpoint database (nothing was written)."""

    code = "not_our_database"


@dataclass(frozen=True, slots=True)
class WriterHealth:
    alive: bool
    queue_depth: int
    queue_capacity: int


@dataclass(frozen=True, slots=True)
class Blob:
    """A content-addressed file a deleted crash pointed at (path relative to the data dir)."""

    sha256: str
    path: str


@dataclass(frozen=True, slots=True)
class Deletion:
    """What one deletion took away; ``blobs`` are the files no crash references now, for the
    caller to remove after the commit; ``files_removed`` is filled in by that caller."""

    reports: int = 0
    crashes: int = 0
    blobs: tuple[Blob, ...] = ()
    files_removed: int = 0


@dataclass(frozen=True, slots=True)
class PendingCrash:
    """A stored upload whose dump has not been parsed yet."""

    id: str
    dump_path: str


@dataclass(frozen=True, slots=True)
class Claim:
    """What one claim took: crashes leased to the claimer, and how many it marked failed
    instead (out of attempts: each earlier attempt ended without a result)."""

    crashes: tuple[PendingCrash, ...]
    failed: int = 0


@dataclass(frozen=True, slots=True)
class Backlog:
    """Crashes waiting to be processed, and when the oldest of them was received (ms since
    the epoch; None when none waits)."""

    pending: int
    oldest_received_at: int | None


@dataclass(frozen=True, slots=True)
class Page:
    """One keyset page of JSON-ready items (reports, crashes or quarantined reports), newest
    first; ``next`` is where the following page starts, None on the last one."""

    items: tuple[dict[str, Any], ...]
    next: Position | None


@dataclass(frozen=True, slots=True)
class GroupPage:
    """Counts per group, largest first, as JSON-ready dicts (the group key, ``count``,
    ``first_seen``, ``last_seen``); ``more`` says that groups past the limit exist."""

    groups: tuple[dict[str, Any], ...]
    more: bool


@dataclass(frozen=True, slots=True)
class SeriesCount:
    """How many reports or crashes one bucket holds for one key (the ``by`` values, an
    empty key stored as None). ``bucket`` is the bucket's first hour since the epoch."""

    bucket: int
    key: tuple[str | None, ...]
    count: int


# How ``issues_page`` orders issues: all-time count, last or first seen (newest first), or
# ``trend``: the growth of the window's count over the window before it.
IssueSort = Literal["count", "last_seen", "first_seen", "trend"]
ISSUE_SORTS: tuple[IssueSort, ...] = ("count", "last_seen", "first_seen", "trend")
# The window ``issues_page`` and ``get_issue`` count in when no ``since`` is given.
DEFAULT_ISSUE_WINDOW_MS = 86_400_000


@dataclass(frozen=True, slots=True)
class IssueFilters:
    """Which issues ``issues_page`` lists, and the window it counts in (ms since the epoch;
    ``since`` None: the last 24 hours; ``until`` None: now). ``release``, ``browser`` and
    ``os`` keep the issues that have that value in their breakdown; ``first_seen_since``
    keeps those first seen at or after that time (the dashboard's new issues)."""

    status: str | None = None
    kind: str | None = None
    site: str | None = None
    release: str | None = None
    browser: str | None = None
    os: str | None = None
    since: int | None = None
    until: int | None = None
    first_seen_since: int | None = None


@dataclass(frozen=True, slots=True)
class IssuePage:
    """One keyset page of issues as JSON-ready dicts; ``next`` is an opaque cursor (the
    backend encodes the sort value and the id), None on the last page."""

    items: tuple[dict[str, Any], ...]
    next: str | None


# The tables ``copy`` moves whole, in the order it moves them.
RowKind = Literal["reports", "crashes", "quarantine"]
ROW_KINDS: tuple[RowKind, ...] = ("reports", "crashes", "quarantine")
# One stored row as it is, every column, in ``rows.EXPORT_COLUMNS[kind]`` order (the id first,
# the received time second): what ``export_batch`` answers and ``import_batch`` takes.
RawRow = tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class TableCount:
    """How many rows one table holds, and the newest received time among them (None when
    empty): where a resumed ``copy`` picks up."""

    rows: int
    last_received_at: int | None


@dataclass(frozen=True, slots=True)
class Counts:
    """Exact row counts of a database (a scan each: for ``copy``'s check, not for requests).

    ``rollup_totals`` is the sum of the counters of each report roll-up table, finest first:
    every one equals ``reports.rows`` when the counters are exact.
    """

    reports: TableCount
    crashes: TableCount
    quarantine: TableCount
    rollup_totals: tuple[int, ...]

    def of(self, kind: RowKind) -> TableCount:
        return {"reports": self.reports, "crashes": self.crashes, "quarantine": self.quarantine}[
            kind
        ]


class Storage(AlertStore, Protocol):
    """Durable storage of reports and crashes.

    Every write returns only once it is committed: the service answers 2xx after that. Reads
    never share a connection (or a transaction) with the writer. The alert outbox's methods
    are in ``AlertStore`` (``alert_store.py``).
    """

    async def start(self) -> None:
        """Open (creating and migrating when allowed), and start taking writes."""
        ...

    async def stop(self) -> None:
        """Refuse new work, commit everything already queued, then close."""
        ...

    def health(self) -> WriterHealth: ...

    # --- writes (group commit: a handler's future resolves after the COMMIT) ---------------

    async def submit_reports(
        self, reports: Sequence[NewReport], rejected: Sequence[RejectedReport] = ()
    ) -> None:
        """Commit ``reports`` (and the refused ``rejected`` ones, to quarantine) together."""
        ...

    async def insert_crash(self, crash: NewCrash) -> None:
        """Commit the row of an upload whose files are already durable."""
        ...

    async def record_crash_facts(
        self,
        crash_id: str,
        facts: Mapping[str, Any],
        issue: IssueKey | None = None,
        *,
        owner: str | None = None,
    ) -> None:
        """Mark the crash parsed with its facts (a fact that cannot be stored marks it failed:
        either way it leaves ``pending``) and, with ``issue``, count it in that issue in the
        same transaction (None: the crash belongs to no issue). Besides the scalar facts,
        ``modules`` and ``frames`` (lists of dicts) are stored as they are, and
        ``missing_symbols`` (``[debug_file, debug_id, code_file]`` lists) replace the crash's
        missing modules. With ``owner`` (the claimer)
        nothing is written unless the crash is still pending and leased to ``owner``: a lease
        that ran out may have let another processor record it already."""
        ...

    async def record_crash_failure(
        self, crash_id: str, error: str, *, owner: str | None = None
    ) -> None:
        """Mark the crash failed (with ``owner``: only if still pending and leased to it)."""
        ...

    async def claim_crashes(
        self, owner: str, limit: int, *, lease_ms: int, max_attempts: int
    ) -> Claim:
        """Lease up to ``limit`` pending crashes to ``owner`` for ``lease_ms``, oldest first,
        each with one more attempt counted; no two claimers get the same crash while its lease
        lasts. Crashes already tried ``max_attempts`` times are marked failed instead."""
        ...

    async def release_crashes(
        self, owner: str, crash_ids: Sequence[str], *, refund: bool = False
    ) -> None:
        """End ``owner``'s leases on these still pending crashes now; attempts stay counted,
        unless ``refund`` gives back the one their claim counted (not below 0)."""
        ...

    async def prune(self, older_than_ms: int, *, crashes: bool = True) -> Deletion:
        """Delete reports (counters kept exact) and, with ``crashes``, crash rows received
        before ``older_than_ms``; answers the blobs no remaining crash references."""
        ...

    async def delete_report(self, report_id: int) -> bool:
        """Delete one report, counters kept exact; False when there is no such report."""
        ...

    async def delete_crash(self, crash_id: str) -> Deletion:
        """Delete one crash row (``crashes`` is 0 when there was none); answers the blobs no
        remaining crash references."""
        ...

    async def unreferenced_blobs(self, blobs: Sequence[Blob]) -> tuple[Blob, ...]:
        """Those of ``blobs`` no crash row (dump or attachment) and no symbol file references
        now: checked again after a deletion committed, since an upload of the same content may
        have come in."""
        ...

    async def referenced_blobs(self) -> frozenset[str]:
        """The sha256 of every blob some crash row or symbol file references (for the orphan
        sweep)."""
        ...

    async def roll_up_days(self, now_ms: int) -> int:
        """One step of rolling the hours and UTC days completed by ``now_ms`` into the coarse
        and daily counters (off the ingest path; idempotent); how far it got, 0 once caught
        up (a step covers a day at most: call again until 0)."""
        ...

    # --- reads -------------------------------------------------------------------------

    async def pending_crashes(self, limit: int) -> tuple[PendingCrash, ...]:
        """Crashes not parsed yet, oldest first."""
        ...

    async def processing_backlog(self) -> Backlog:
        """How many crashes wait to be processed and the oldest one's time (an index read)."""
        ...

    async def groups(
        self, source: Source, by: Sequence[str], filters: Filters, limit: int
    ) -> GroupPage: ...

    async def reports_page(
        self, filters: Filters, limit: int, after: Position | None = None
    ) -> Page: ...

    async def get_report(self, report_id: int) -> dict[str, Any] | None:
        """One report as the API shows it, ``raw`` included."""
        ...

    async def crash_page(
        self, filters: Filters, limit: int, after: Position | None = None
    ) -> Page: ...

    async def get_crash(self, crash_id: str) -> dict[str, Any] | None:
        """One crash as ``crash_page`` shows it, plus ``modules`` (each module's dict with
        ``has_symbols``: whether a symbol file of its key is stored) and ``frames`` (the
        crashing thread's), both ``[]`` until the crash is processed."""
        ...

    async def crash_dump_path(self, crash_id: str) -> str | None:
        """The dump's blob path of a crash (never shown in the JSON)."""
        ...

    async def timeseries(
        self, source: Source, bucket: Bucket, by: Sequence[str], filters: Filters
    ) -> tuple[SeriesCount, ...]:
        """Counts per bucket and key, in bucket order; buckets without data are left out."""
        ...

    async def quarantine_page(
        self, filters: Filters, limit: int, after: Position | None = None
    ) -> Page: ...

    async def get_quarantined(self, row_id: int) -> dict[str, Any] | None: ...

    async def quarantine_counts(self) -> tuple[tuple[str, int], ...]:
        """How many quarantined reports per rejection code, largest first."""
        ...

    def iter_reports(
        self, filters: Filters | None = None, *, page_size: int = 1000
    ) -> AsyncIterator[dict[str, Any]]:
        """Every matching report, oldest first, in keyset pages so memory stays flat."""
        ...

    def iter_crashes(
        self, filters: Filters | None = None, *, page_size: int = 1000
    ) -> AsyncIterator[dict[str, Any]]:
        """Every matching crash, oldest first, in keyset pages."""
        ...

    # --- issues (issue 11) -------------------------------------------------------------

    async def issues_page(
        self, filters: IssueFilters, sort: IssueSort, limit: int, after: str | None = None
    ) -> IssuePage:
        """Issues with their counts in the window and the window before, an hourly series
        and their top browsers and OSes; issues without an event in the window are left out
        unless ``filters.status`` is given. ``after`` is a ``next`` cursor of the same query."""
        ...

    async def get_issue(
        self, issue_id: int, since: int | None = None, until: int | None = None
    ) -> dict[str, Any] | None:
        """One issue as ``issues_page`` shows it, with its breakdowns (top 20 per dimension)
        and its status history, oldest first; None when there is no such issue."""
        ...

    async def issue_events(self, issue_id: int, limit: int, after: Position | None = None) -> Page:
        """The issue's reports (or crashes, for a ``native`` issue), newest first, as
        ``reports_page`` / ``crash_page`` show them."""
        ...

    async def set_issue_status(
        self, issue_id: int, change: StatusChange, now_ms: int
    ) -> dict[str, Any] | None:
        """Apply a person's triage decision and record it in the history, in one transaction;
        answers the issue as ``get_issue`` does, None when there is no such issue."""
        ...

    async def regroup(
        self,
        report_key: Callable[[Mapping[str, Any]], IssueKey],
        crash_key: Callable[[Mapping[str, Any]], IssueKey | None],
    ) -> int:
        """Recompute the issue of every stored report and parsed crash (the functions take
        the dict ``get_report`` / ``get_crash`` answers, ``raw`` included), rebuild the
        issue counters, keep the status and history of issues whose fingerprint survives,
        delete issues left without events; answers how many events changed issue."""
        ...

    # --- symbols (issue 15) ----------------------------------------------------------------

    async def put_symbol_files(self, files: Sequence[SymbolFile]) -> int:
        """Store ``files`` by (debug_file, debug_id), replacing a stored one of the same key,
        and in the same transaction send every crash that missed symbols for one of those keys
        back to processing (pending, attempts 0, no lease: a processor holding one has its
        result refused by the owner check) with those keys taken off its missing list.
        ``uploaded_at`` is stamped with the storage's own clock at the commit (crashes compare
        it with when their processor looked). Answers how many crashes went back."""
        ...

    async def requeue_late_symbols(self) -> int:
        """Send back to processing the crashes (at most 1,000 a call) that miss symbols stored
        after their processor looked for them: an upload and a result that committed at the same
        time without seeing each other. Answers how many went back."""
        ...

    async def get_symbol_files(
        self, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], SymbolFile]:
        """The stored symbol files of those (debug_file, debug_id) keys, by key (keys without
        one are left out). A read."""
        ...

    async def get_symbol_file(self, debug_file: str, debug_id: str) -> SymbolFile | None: ...

    async def list_symbol_files(
        self, limit: int = 100, after: tuple[str, str] | None = None
    ) -> list[SymbolFile]:
        """Up to ``limit`` symbol files in (debug_file, debug_id) order (byte order), those
        after the key ``after`` (the last one of the previous page)."""
        ...

    async def missing_symbols(self, limit: int = 100) -> list[MissingSymbols]:
        """Modules processed crashes needed symbols for and that the store still lacks, with
        how many crashes miss each and when the newest of them came; most crashes first, then
        by key."""
        ...

    # --- moving whole databases (``copy``) ------------------------------------------------

    async def export_batch(
        self,
        kind: RowKind,
        limit: int,
        after: Position | None = None,
        *,
        since: int | None = None,
    ) -> tuple[RawRow, ...]:
        """Up to ``limit`` rows of ``kind`` as stored (every column, ``raw`` JSON text as it
        is), oldest first in (received_at, id) order, ids compared as SQLite does (numbers;
        text in byte order): those after ``after``, else those received at or after
        ``since``, else from the first. A read: a read-only storage answers it."""
        ...

    async def import_batch(self, kind: RowKind, rows: Sequence[RawRow]) -> int:
        """Commit ``rows`` (``export_batch``'s shape, from any backend) in one transaction,
        keeping their ids; a row whose id is present already is skipped, so importing twice
        adds nothing. Reports bump the roll-up counters in the same transaction, and id
        sequences move past the ids taken, so later inserts never collide. Answers how many
        rows were new."""
        ...

    async def counts(self) -> Counts:
        """Rows per table and the roll-up sums (see ``Counts``). A read."""
        ...
