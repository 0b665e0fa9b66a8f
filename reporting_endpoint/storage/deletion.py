"""Deleting reports and crashes, and then the blob files nothing references any more.

Two steps, in this order, so a crash between them leaves an orphan file, never a row without
its file: the rows go in one transaction (``delete_report``, ``delete_crash``,
``prune_everything``), and only after it committed ``remove_blobs`` unlinks the files whose
hash no remaining crash row references. Plain sqlite3; ``run_deletion`` and the async
``delete_through`` own the transactions.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import orjson

from reporting_endpoint.storage.base import Storage, StorageError
from reporting_endpoint.storage.rollups import (
    HOUR_MS,
    HOURLY_TABLES,
    KEYS,
    TOTAL_TABLES,
    prune,
)


@dataclass(frozen=True, slots=True)
class Blob:
    """A content-addressed file a deleted crash pointed at (path relative to the data dir)."""

    sha256: str
    path: str


@dataclass(frozen=True, slots=True)
class Deletion:
    """What one deletion took away; ``blobs`` are the files no crash row references now."""

    reports: int = 0
    crashes: int = 0
    blobs: tuple[Blob, ...] = ()
    files_removed: int = 0


T = TypeVar("T")
log = logging.getLogger("reporting_endpoint.deletion")


# --- reports ------------------------------------------------------------------------------

_KEY_EXPRESSIONS = ", ".join(f"coalesce({name}, '')" for name in KEYS)


def delete_report(connection: sqlite3.Connection, report_id: int) -> bool:
    """Delete one report and keep every roll-up exact; False when there is no such report.

    Its row of the finest hourly table is recounted from the reports left (one hour, one
    group); the coarser rows lose one, and take their first/last seen again from that exact
    table only when the report sat at an edge. The caller owns the transaction.
    """
    found = connection.execute(
        f"SELECT received_at, {_KEY_EXPRESSIONS} FROM reports WHERE id = ?", (report_id,)
    ).fetchone()
    if found is None:
        return False
    received_at: int = found[0]
    key = dict(zip(KEYS, found[1:], strict=True))
    connection.execute("DELETE FROM reports WHERE id = ?", (report_id,))
    hour = received_at // HOUR_MS
    match = " AND ".join(f"coalesce({name}, '') = ?" for name in KEYS)
    count, first, last = connection.execute(
        f"SELECT count(*), min(received_at), max(received_at) FROM reports"
        f" WHERE received_at >= ? AND received_at < ? AND {match}",
        (hour * HOUR_MS, (hour + 1) * HOUR_MS, *key.values()),
    ).fetchone()
    _set_row(connection, "report_groups_hourly", {"hour": hour, **key}, count, first, last)
    for table, keys in HOURLY_TABLES.items():
        if table != "report_groups_hourly":
            _take_one(connection, table, {"hour": hour} | _pick(key, keys), received_at)
    for table, keys in TOTAL_TABLES.items():
        _take_one(connection, table, _pick(key, keys), received_at)
    return True


def report_deletion(connection: sqlite3.Connection, report_id: int) -> Deletion:
    """``delete_report`` in the shape ``run_deletion`` and ``delete_through`` take."""
    return Deletion(reports=int(delete_report(connection, report_id)))


def _pick(key: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    return {name: key[name] for name in names}


def _set_row(
    connection: sqlite3.Connection,
    table: str,
    key: dict[str, Any],
    count: int,
    first: int | None,
    last: int | None,
) -> None:
    where = " AND ".join(f"{name} = ?" for name in key)
    connection.execute(f"DELETE FROM {table} WHERE {where}", tuple(key.values()))
    if count:
        columns = ", ".join(key)
        connection.execute(
            f"INSERT INTO {table} ({columns}, count, first_seen, last_seen)"
            f" VALUES ({', '.join('?' * (len(key) + 3))})",
            (*key.values(), count, first, last),
        )


def _take_one(
    connection: sqlite3.Connection, table: str, key: dict[str, Any], received_at: int
) -> None:
    """One report less in a coarser roll-up row (a primary-key lookup)."""
    where = " AND ".join(f"{name} = ?" for name in key)
    row = connection.execute(
        f"SELECT count, first_seen, last_seen FROM {table} WHERE {where}", tuple(key.values())
    ).fetchone()
    if row is None:
        return
    count, first, last = row[0] - 1, row[1], row[2]
    if count > 0 and (received_at <= first or received_at >= last):
        # The report was the group's first or last: take the edges again from the finest
        # table, exact already. Rare (one report per group sits at each edge), and a scan of
        # that table when the key has no hour; an operator deletes one report at a time.
        first, last = connection.execute(
            f"SELECT min(first_seen), max(last_seen) FROM report_groups_hourly WHERE {where}",
            tuple(key.values()),
        ).fetchone()
    _set_row(connection, table, key, max(count, 0), first, last)


# --- crashes ------------------------------------------------------------------------------


def _blobs_of(rows: Iterable[Sequence[Any]]) -> dict[str, str]:
    """sha256 -> path of every file the given (dump_sha256, dump_path, attachments) rows use."""
    files: dict[str, str] = {}
    for sha256, path, attachments in rows:
        files[sha256] = path
        with contextlib.suppress(orjson.JSONDecodeError, TypeError):
            for attachment in orjson.loads(attachments):
                if isinstance(attachment, dict) and attachment.get("sha256"):
                    files.setdefault(str(attachment["sha256"]), str(attachment.get("path", "")))
    return files


def _unreferenced(connection: sqlite3.Connection, files: dict[str, str]) -> tuple[Blob, ...]:
    """The files of ``files`` that no crash row (dump or attachment) still points at."""
    if not files:
        return ()
    wanted = orjson.dumps(sorted(files)).decode()
    still = {
        row[0]
        for row in connection.execute(
            "SELECT dump_sha256 FROM crashes WHERE dump_sha256 IN (SELECT value FROM json_each(?1))"
            " UNION SELECT json_extract(a.value, '$.sha256') FROM crashes,"
            " json_each(crashes.attachments) AS a"
            " WHERE json_valid(crashes.attachments)"
            " AND json_extract(a.value, '$.sha256') IN (SELECT value FROM json_each(?1))",
            (wanted,),
        )
    }
    return tuple(Blob(sha, path) for sha, path in sorted(files.items()) if sha not in still)


def delete_crash(connection: sqlite3.Connection, crash_id: str) -> Deletion:
    """Delete one crash row; ``crashes`` is 0 when there was none. The caller owns the
    transaction and, after it commits, hands ``blobs`` to ``remove_blobs``."""
    rows = connection.execute(
        "SELECT dump_sha256, dump_path, attachments FROM crashes WHERE id = ?", (crash_id,)
    ).fetchall()
    if not rows:
        return Deletion()
    connection.execute("DELETE FROM crashes WHERE id = ?", (crash_id,))
    return Deletion(crashes=1, blobs=_unreferenced(connection, _blobs_of(rows)))


def prune_crashes(connection: sqlite3.Connection, older_than_ms: int) -> Deletion:
    """Delete crashes received before ``older_than_ms`` (the caller owns the transaction)."""
    rows = connection.execute(
        "SELECT dump_sha256, dump_path, attachments FROM crashes WHERE received_at < ?",
        (older_than_ms,),
    ).fetchall()
    deleted = connection.execute(
        "DELETE FROM crashes WHERE received_at < ?", (older_than_ms,)
    ).rowcount
    return Deletion(crashes=int(deleted), blobs=_unreferenced(connection, _blobs_of(rows)))


def prune_everything(connection: sqlite3.Connection, older_than_ms: int) -> Deletion:
    """Reports (counters kept exact) and crashes received before ``older_than_ms``."""
    reports = prune(connection, older_than_ms)
    return replace(prune_crashes(connection, older_than_ms), reports=reports)


# --- files --------------------------------------------------------------------------------


def remove_blobs(
    connection: sqlite3.Connection, root: Path, blobs: Sequence[Blob], deleted_after_ns: int
) -> int:
    """Unlink the files of ``blobs`` under ``root`` (the data dir); returns how many went.

    Run it in a write transaction after the deleting one committed: holding the write lock,
    it checks again that no crash row points at each hash (an upload of the same content may
    have committed in between), and it skips a file written after ``deleted_after_ns`` (an
    upload of the same content replaced it and its row is on its way). Each folder that lost
    an entry is fsynced, so the removal survives a power loss too.
    """
    still_free = {
        blob.sha256 for blob in _unreferenced(connection, {b.sha256: b.path for b in blobs})
    }
    folders: set[Path] = set()
    removed = 0
    store = (root / "blobs").resolve()
    for blob in blobs:
        if blob.sha256 not in still_free:
            continue
        path = (root / blob.path).resolve()
        if store not in path.parents:
            continue  # never a path outside blobs/, whatever a row holds
        try:
            if path.stat().st_mtime_ns > deleted_after_ns:
                continue
            path.unlink()
        except FileNotFoundError:
            continue
        removed += 1
        folders.add(path.parent)
    for folder in folders:
        _fsync_dir(folder)
    return removed


# An upload renames its file into blobs/ a moment before its row commits; a file with no row
# for this long was left by an interrupted deletion (or upload) and will never get one.
ORPHAN_GRACE_NS = 3600 * 1_000_000_000


def sweep_orphans(connection: sqlite3.Connection, root: Path, written_before_ns: int) -> int:
    """Unlink blob files no crash row references, written before ``written_before_ns``;
    returns how many went. Run it in a write transaction (no row commits meanwhile).

    The safety net of the two-step deletion: whatever stopped between a commit and its
    unlinks (a kill, a shutdown, a failed job) is collected here.
    """
    store = root / "blobs"
    if not store.is_dir():
        return 0
    referenced = {
        row[0]
        for row in connection.execute(
            "SELECT dump_sha256 FROM crashes UNION SELECT json_extract(a.value, '$.sha256')"
            " FROM crashes, json_each(crashes.attachments) AS a"
            " WHERE json_valid(crashes.attachments)"
        )
    }
    folders: set[Path] = set()
    removed = 0
    for folder in store.iterdir():
        if not folder.is_dir() or folder.is_symlink():
            continue
        for entry in os.scandir(folder):
            if entry.name in referenced or not entry.is_file(follow_symlinks=False):
                continue
            with contextlib.suppress(FileNotFoundError):
                if entry.stat(follow_symlinks=False).st_mtime_ns >= written_before_ns:
                    continue
                os.unlink(entry.path)
                removed += 1
                folders.add(folder)
    for changed in folders:
        _fsync_dir(changed)
    return removed


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def run_deletion(
    connection: sqlite3.Connection,
    job: Callable[[sqlite3.Connection], Deletion],
    root: Path,
    sweep: bool = False,
) -> Deletion:
    """For a process of its own (the CLI): ``job`` in one write transaction, then the files,
    then with ``sweep`` the orphans earlier runs left (``sweep_orphans``).

    ``connection`` must be in autocommit mode (``isolation_level=None``), as ``open_connection``
    makes it.
    """
    started = time.time_ns()
    deletion = _in_transaction(connection, job)
    removed = 0
    if deletion.blobs:

        def files(c: sqlite3.Connection) -> int:
            return remove_blobs(c, root, deletion.blobs, started)

        removed = _in_transaction(connection, files)
    if sweep:
        cutoff = time.time_ns() - ORPHAN_GRACE_NS
        removed += _in_transaction(
            connection, partial(sweep_orphans, root=root, written_before_ns=cutoff)
        )
    return replace(deletion, files_removed=removed)


def _in_transaction(connection: sqlite3.Connection, job: Callable[[sqlite3.Connection], T]) -> T:
    connection.execute("BEGIN IMMEDIATE")
    try:
        result = job(connection)
        connection.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            connection.execute("ROLLBACK")
        raise
    return result


async def delete_through(
    storage: Storage, job: Callable[[sqlite3.Connection], Deletion], root: Path
) -> Deletion:
    """For the running service: both steps through the writer, so neither contends with it.

    The rows are gone once the first step returns; a failure of the second only leaves unused
    files behind (logged), so it does not turn a done deletion into an error.
    """
    started = time.time_ns()
    deletion = await storage.run_job(job)
    if not deletion.blobs:
        return deletion

    def files(c: sqlite3.Connection) -> int:
        return remove_blobs(c, root, deletion.blobs, started)

    try:
        removed = await storage.run_job(files)
    except StorageError:
        log.exception("deleted rows left %d unused file(s) behind", len(deletion.blobs))
        return deletion
    return replace(deletion, files_removed=removed)
