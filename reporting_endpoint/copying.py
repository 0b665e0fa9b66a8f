"""``reporting-endpoint copy``: move a whole store into another database, resumable, verified.

Every report (its id, every column, the raw JSON as stored), every crash row and every
quarantined report goes from ``--from`` into ``--to``, whichever engines they are (SQLite into
PostgreSQL, back, or the same engine), and so do the blobs the crashes use when the two sides
keep them in different blob stores. Only the storage protocol is used here: ``export_batch``
reads whole rows in (received_at, id) order, ``import_batch`` commits them through the
target's writer (roll-up counters in the same transaction, id sequences moved past them).

Resuming: each batch is one transaction, taken in source order, so after a kill the target
holds a prefix of each table. A rerun starts every table at the target's newest received time
(inclusive: rows of that very millisecond may be half copied) and ``import_batch`` skips the
ids already present, so nothing is copied twice. A crash's blobs are stored before its row
commits, so no row ever points at a blob the target lacks.

At the end the counts of both sides are compared (rows per table, the target's roll-up sums
against its report count, the blobs the crash rows reference that each store holds); any
difference is named and the command exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Never, TextIO

from reporting_endpoint.settings import Settings, SettingsError, sqlite_file

if TYPE_CHECKING:
    from tqdm import tqdm

    from reporting_endpoint.blobstores import BlobStore
    from reporting_endpoint.storage.base import Counts, RawRow, RowKind, Storage

# Rows per transaction: large enough that a commit's fsync is paid rarely, small enough that
# a batch of crashes (each with its dump streamed first) commits every few seconds.
BATCH_SIZE = 1000
# The progress line redraws at most this often on a terminal, and this often in a log file
# (where every redraw is kept).
REDRAW_TERMINAL = 0.5
REDRAW_LOG = 30.0

# Called after each step that committed something: (what, batch number from 1). ``what`` is a
# table name after its batch committed, or "blobs" after a crash batch's blobs are stored and
# before its rows commit. Tests kill the process from here to prove a rerun completes.
Checkpoint = Callable[[str, int], None]
BlobOutcome = Literal["present", "copied", "missing", "corrupt"]


class CopyError(Exception):
    """The copy cannot start (a side cannot be opened, the same database twice)."""


@dataclass(frozen=True, slots=True)
class CopyPlan:
    """What to copy where. Blob stores are ``open_blob_store`` specs ("" = the database's
    data folder, as the service defaults)."""

    source: str
    target: str
    source_blobs: str = ""
    target_blobs: str = ""
    source_data_dir: Path = Path()
    target_data_dir: Path = Path()
    batch_size: int = BATCH_SIZE
    # Look at every source row again (skipping those present) instead of resuming at the
    # target's newest row: for a source written behind an earlier run.
    rescan: bool = False

    @classmethod
    def between(
        cls,
        source: str,
        target: str,
        *,
        source_blobs: str | None = None,
        target_blobs: str | None = None,
        batch_size: int = BATCH_SIZE,
        rescan: bool = False,
    ) -> CopyPlan:
        """A plan with each side's blob store defaulting as ``serve`` on that database
        would: the data folder beside a SQLite file, ``reporting-endpoint.data`` for a
        server."""
        if batch_size < 1:
            raise SettingsError("--batch-size must be positive")
        if _same_database(source, target):
            raise SettingsError(f"--from and --to name the same database ({source})")
        return cls(
            source=source,
            target=target,
            source_blobs=source_blobs or "",
            target_blobs=target_blobs or "",
            source_data_dir=Settings(database=source).data_dir,
            target_data_dir=Settings(database=target).data_dir,
            batch_size=batch_size,
            rescan=rescan,
        )

    def same_blob_store(self) -> bool:
        return _store_identity(self.source_blobs, self.source_data_dir) == _store_identity(
            self.target_blobs, self.target_data_dir
        )


@dataclass(frozen=True, slots=True)
class Tally:
    """One side's counts, as the verification compares them."""

    reports: int
    crashes: int
    quarantine: int
    blobs: int  # blobs referenced by crash rows that the side's store holds


@dataclass(frozen=True, slots=True)
class Verification:
    source: Tally
    target: Tally
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass(frozen=True, slots=True)
class CopyResult:
    """What this run added (a rerun after a complete copy adds nothing) and the check."""

    reports: int
    crashes: int
    quarantine: int
    blobs_copied: int
    # Keys crash rows reference that the source store lacks (or holds with other content):
    # nothing to copy, said rather than hidden.
    blobs_missing: tuple[str, ...]
    verification: Verification


def _same_database(source: str, target: str) -> bool:
    a, b = sqlite_file(source), sqlite_file(target)
    if a is not None and b is not None:
        return a.resolve() == b.resolve()
    return source == target


def _store_identity(spec: str, data_dir: Path) -> str:
    if spec.startswith("s3://"):
        return spec.rstrip("/")
    return str((Path(spec) if spec else data_dir).resolve())


def _shown(database: str) -> str:
    """The database for a message, without a password."""
    from reporting_endpoint.storage import shown_database

    return shown_database(database)


# --- the blobs a crash row uses -------------------------------------------------------------


def _blob_keys(rows: Iterable[RawRow]) -> dict[str, str]:
    """Blob key -> sha256 of every dump and attachment of these crash rows (in
    ``CRASH_COLUMNS`` order); a hash that is no content address names no blob of ours."""
    from reporting_endpoint.blobstores.base import key_for
    from reporting_endpoint.storage.rows import CRASH_COLUMNS, stored_json

    dump, attachments = CRASH_COLUMNS.index("dump_sha256"), CRASH_COLUMNS.index("attachments")
    hashes: list[object] = []
    for row in rows:
        hashes.append(row[dump])
        listed = stored_json(row[attachments])
        if isinstance(listed, list):
            hashes.extend(a.get("sha256") for a in listed if isinstance(a, dict))
    keys: dict[str, str] = {}
    for sha256 in hashes:
        if not isinstance(sha256, str):
            continue
        try:
            keys[key_for(sha256)] = sha256
        except ValueError:
            continue
    return keys


async def _referenced(storage: Storage, batch_size: int) -> dict[str, str]:
    """Every blob key the crash rows of ``storage`` reference (a keyset walk of the rows)."""
    from reporting_endpoint.storage.filters import Position

    keys: dict[str, str] = {}
    after: Position | None = None
    while True:
        rows = await storage.export_batch("crashes", batch_size, after)
        keys.update(_blob_keys(rows))
        if len(rows) < batch_size:
            return keys
        after = Position(int(rows[-1][1]), rows[-1][0])


async def _held(store: BlobStore, keys: Iterable[str]) -> set[str]:
    """Those of ``keys`` the store holds: one listing (S3: a request per thousand keys)
    rather than one request per key."""
    wanted = set(keys)
    if not wanted:
        return set()
    return {info.key async for info in store.list_blobs() if info.key in wanted}


async def copy_blob(source: BlobStore, target: BlobStore, key: str, sha256: str) -> BlobOutcome:
    """Stream one blob from ``source`` into ``target`` unless the target holds it; its bytes
    are checked against the address before it is committed there."""
    from reporting_endpoint.blobstores import BlobNotFound

    if await target.exists(key):
        return "present"
    try:
        stream = await source.open(key)
    except BlobNotFound:
        return "missing"
    writer = target.writer()
    try:
        try:
            async for chunk in stream:
                writer.write(chunk)
        finally:
            await stream.aclose()
        if writer.sha256 != sha256:
            # A damaged source file: stored, it would sit under another address and the row
            # would still point at nothing.
            writer.discard()
            return "corrupt"
        await target.commit(writer)
    except BaseException:
        writer.discard()
        raise
    return "copied"


# --- progress -----------------------------------------------------------------------------


def _bar(kind: str, total: int, initial: int, shown: bool) -> tqdm[Never]:
    from tqdm import tqdm

    terminal = sys.stderr.isatty()
    return tqdm(
        desc=f"{kind:<10}",
        total=total,
        initial=min(initial, total),
        unit=" rows",
        file=sys.stderr,
        disable=not shown,
        dynamic_ncols=terminal,
        mininterval=REDRAW_TERMINAL if terminal else REDRAW_LOG,
        leave=True,
    )


# --- the copy -------------------------------------------------------------------------------


class _Copier:
    def __init__(
        self,
        plan: CopyPlan,
        source: Storage,
        target: Storage,
        source_blobs: BlobStore,
        target_blobs: BlobStore,
        progress: bool,
        checkpoint: Checkpoint | None,
    ) -> None:
        self.plan = plan
        self.source = source
        self.target = target
        self.source_blobs = source_blobs
        self.target_blobs = target_blobs
        self.progress = progress
        self.checkpoint = checkpoint
        self.blobs_copied = 0
        self.blobs_missing: list[str] = []
        # One store on both sides (the same folder or bucket): nothing to copy.
        self.one_store = plan.same_blob_store()

    def _reached(self, what: str, batch: int) -> None:
        if self.checkpoint is not None:
            self.checkpoint(what, batch)

    async def run(self) -> CopyResult:
        source_counts = await self.source.counts()
        target_counts = await self.target.counts()
        copied = {
            kind: await self._copy_table(kind, source_counts, target_counts)
            for kind in ("reports", "crashes", "quarantine")
        }
        if any(copied.values()):
            await self._regroup_target()
        if self.progress:
            print("verifying...", file=sys.stderr, flush=True)
        return CopyResult(
            reports=copied["reports"],
            crashes=copied["crashes"],
            quarantine=copied["quarantine"],
            blobs_copied=self.blobs_copied,
            blobs_missing=tuple(self.blobs_missing),
            verification=await self._verify(),
        )

    async def _regroup_target(self) -> None:
        """Give the copied events their issues at the target: rows travel without issue
        columns (the same shape for every engine) but with each event's release, so the
        target computes them, with their release breakdowns and first and last releases,
        with the rules in force there (REPORTING_ENDPOINT_FINGERPRINT_RULES), as ``regroup``
        does. Triage status and history stay with the source."""
        from reporting_endpoint.issue_keys import stored_crash_key, stored_report_key
        from reporting_endpoint.settings import Settings

        rules = Settings.from_env().fingerprint_rule_set()
        if self.progress:
            print("grouping into issues...", file=sys.stderr, flush=True)
        await self.target.regroup(stored_report_key(rules), stored_crash_key(rules))

    async def _copy_table(self, kind: RowKind, source: Counts, target: Counts) -> int:
        from reporting_endpoint.storage.filters import Position

        start = target.of(kind)
        since = None if self.plan.rescan else start.last_received_at
        after: Position | None = None
        added = batch = 0
        with _bar(kind, source.of(kind).rows, start.rows, self.progress) as bar:
            while True:
                rows = await self.source.export_batch(
                    kind, self.plan.batch_size, after, since=since
                )
                if not rows:
                    break
                batch += 1
                if kind == "crashes":
                    new = await self._crash_batch(rows, batch)
                    bar.set_postfix_str(f"blobs copied: {self.blobs_copied}", refresh=False)
                else:
                    new = await self.target.import_batch(kind, rows)
                added += new
                bar.update(new)
                self._reached(kind, batch)
                if len(rows) < self.plan.batch_size:
                    break
                after = Position(int(rows[-1][1]), rows[-1][0])
        return added

    async def _crash_batch(self, rows: Sequence[RawRow], batch: int) -> int:
        keys = {} if self.one_store else _blob_keys(rows)
        # Held until the rows commit, as an upload holds it: a prune at the target meanwhile
        # cannot take a blob whose row is on its way.
        async with self.target_blobs.uploading(sorted(keys)):
            for key, sha256 in keys.items():
                outcome = await copy_blob(self.source_blobs, self.target_blobs, key, sha256)
                if outcome == "copied":
                    self.blobs_copied += 1
                elif outcome in ("missing", "corrupt"):
                    self.blobs_missing.append(key)
            self._reached("blobs", batch)
            return await self.target.import_batch("crashes", rows)

    async def _verify(self) -> Verification:
        source, target = await self.source.counts(), await self.target.counts()
        source_keys = await _referenced(self.source, self.plan.batch_size)
        target_keys = await _referenced(self.target, self.plan.batch_size)
        source_held = await _held(self.source_blobs, source_keys)
        target_held = (
            source_held
            if self.one_store and source_keys == target_keys
            else await _held(self.target_blobs, target_keys)
        )
        problems = [
            f"{kind}: {source.of(kind).rows} in the source, {target.of(kind).rows} in the target"
            for kind in ("reports", "crashes", "quarantine")
            if source.of(kind).rows != target.of(kind).rows
        ]
        wrong = [t for t in target.rollup_totals if t != target.reports.rows]
        if wrong:
            problems.append(
                f"report counters: the target's roll-ups count {wrong[0]} report(s),"
                f" its table holds {target.reports.rows}"
            )
        lacking = source_held - target_held
        if lacking:
            problems.append(
                f"blobs: {len(lacking)} of the source's are not in the target store,"
                f" e.g. {sorted(lacking)[0]}"
            )

        def tally(counts: Counts, blobs: int) -> Tally:
            return Tally(counts.reports.rows, counts.crashes.rows, counts.quarantine.rows, blobs)

        return Verification(
            tally(source, len(source_held)), tally(target, len(target_held)), tuple(problems)
        )


@asynccontextmanager
async def _opened(
    database: str, settings: Settings, side: str, *, read_only: bool
) -> AsyncIterator[Storage]:
    from reporting_endpoint.storage import StorageError, StorageFailure, open_storage

    storage = open_storage(database, settings, read_only=read_only)
    try:
        await storage.start()
    except (StorageError, StorageFailure, FileNotFoundError, ValueError) as exc:
        raise CopyError(f"cannot open the {side} database {_shown(database)}: {exc}") from exc
    try:
        yield storage
    finally:
        await storage.stop()


async def copy_store(
    plan: CopyPlan,
    settings: Settings | None = None,
    *,
    progress: bool = False,
    checkpoint: Checkpoint | None = None,
) -> CopyResult:
    """Copy everything ``plan`` names; see the module docstring. ``settings`` shape the
    target's writer (queue, lock timeout, SQLite synchronous) as they would the service's."""
    from reporting_endpoint.blobstores import blob_locks_of, open_blob_store

    settings = settings or Settings()
    async with AsyncExitStack() as stack:
        # The source only ever reads: opened read-only, refused when it is not a database of
        # this service, never migrated.
        source = await stack.enter_async_context(
            _opened(plan.source, settings, "source", read_only=True)
        )
        target = await stack.enter_async_context(
            _opened(plan.target, settings, "target", read_only=False)
        )
        # The source store is only read, so it is not started (start prepares uploads: it
        # would make folders beside the source database).
        source_blobs = open_blob_store(plan.source_blobs, plan.source_data_dir)
        stack.push_async_callback(source_blobs.close)
        target_blobs = open_blob_store(
            plan.target_blobs, plan.target_data_dir, locks=blob_locks_of(target)
        )
        await target_blobs.start()
        stack.push_async_callback(target_blobs.close)
        copier = _Copier(plan, source, target, source_blobs, target_blobs, progress, checkpoint)
        return await copier.run()
    raise AssertionError("unreachable")  # mypy: the stack does not swallow exceptions


# --- the command ----------------------------------------------------------------------------


def add_copy_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``copy`` subcommand's options (cli.py registers it with the other store commands)."""
    copy = commands.add_parser(
        "copy",
        help="copy every report, crash (with its blobs) and quarantined report into another"
        " database, e.g. SQLite into PostgreSQL; resumable, verified at the end",
    )
    copy.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="DATABASE",
        help="database to read: a SQLite path or sqlite:///path, or postgresql://...",
    )
    copy.add_argument(
        "--to",
        dest="target",
        required=True,
        metavar="DATABASE",
        help="database to fill (created and migrated when missing); should be empty or an"
        " earlier, interrupted copy of the same source: a rerun continues where it stopped",
    )
    copy.add_argument(
        "--from-blob-store",
        metavar="STORE",
        help="where the source's dumps are: a folder, or s3://bucket/prefix"
        " (default: the source database's data folder, as serve's)",
    )
    copy.add_argument(
        "--to-blob-store",
        metavar="STORE",
        help="where the target's dumps go (default: the target database's data folder)",
    )
    copy.add_argument(
        "--batch-size",
        type=int,
        default=BATCH_SIZE,
        metavar="N",
        help=f"rows per transaction (default {BATCH_SIZE})",
    )
    copy.add_argument(
        "--rescan",
        action="store_true",
        help="look at every source row again instead of resuming at the target's newest"
        " (slower; for a source that was written to behind an earlier run)",
    )
    copy.add_argument("--quiet", action="store_true", help="no progress display on stderr")


def copy_command(args: argparse.Namespace, out: TextIO) -> int:
    """Run ``copy`` from parsed arguments: 0 when verified, 1 when the counts differ or a
    side fails during the copy, 2 when it cannot start."""
    from reporting_endpoint.blobstores import BlobStoreError
    from reporting_endpoint.storage.base import StorageError, StorageFailure

    def fail(message: str, code: int) -> int:
        print(f"reporting-endpoint copy: {message}", file=sys.stderr)
        return code

    try:
        plan = CopyPlan.between(
            args.source,
            args.target,
            source_blobs=args.from_blob_store,
            target_blobs=args.to_blob_store,
            batch_size=args.batch_size,
            rescan=args.rescan,
        )
        result = asyncio.run(copy_store(plan, Settings.from_env(), progress=not args.quiet))
    except (CopyError, SettingsError) as exc:
        return fail(str(exc), 2)
    except (StorageError, StorageFailure, BlobStoreError, OSError) as exc:
        return fail(f"{type(exc).__name__}: {exc}; run the same command again to continue", 1)
    except KeyboardInterrupt:
        return fail("interrupted; run the same command again to continue", 130)
    _report(result, out)
    check = result.verification
    if result.blobs_missing:
        print(
            f"reporting-endpoint copy: {len(result.blobs_missing)} blob(s) the crash rows"
            f" reference are missing or damaged in the source store, e.g."
            f" {result.blobs_missing[0]}",
            file=sys.stderr,
        )
    if not check.ok:
        return fail("verification failed: " + "; ".join(check.problems), 1)
    return 0


def _report(result: CopyResult, out: TextIO) -> None:
    out.write(
        f"copied {result.reports} report(s), {result.crashes} crash(es),"
        f" {result.quarantine} quarantined report(s) and {result.blobs_copied} blob(s)\n"
    )
    source, target = result.verification.source, result.verification.target
    out.write(f"{'':<12}{'source':>12}{'target':>12}\n")
    for name in ("reports", "crashes", "quarantine", "blobs"):
        mine, theirs = getattr(source, name), getattr(target, name)
        mark = "" if mine == theirs else "  <- differs"
        out.write(f"{name:<12}{mine:>12}{theirs:>12}{mark}\n")
