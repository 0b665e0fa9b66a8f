"""Deleting reports and crashes in SQL, keeping every roll-up exact.

The rows go in one transaction (``delete_report``, ``delete_crash``, ``prune_everything``);
they answer the blobs no remaining crash row references, and only after the commit does the
caller remove those files (``reporting_endpoint.deletion``), so a crash between the two steps
leaves an orphan file, never a row without its file. Plain sqlite3; the caller owns the
transaction.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

import orjson

from reporting_endpoint.storage.base import Blob, Deletion
from reporting_endpoint.storage.filters import HOUR_MS
from reporting_endpoint.storage.sqlite import issue_counts
from reporting_endpoint.storage.sqlite.rollups import (
    HOURLY_TABLES,
    KEYS,
    TOTAL_TABLES,
    prune,
)

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
    touched = issue_counts.forget_events(connection, "reports", "id = ?", (report_id,))
    connection.execute("DELETE FROM reports WHERE id = ?", (report_id,))
    issue_counts.settle(connection, touched, "reports")
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
    """The files of ``files`` that no crash row (dump or attachment) and no symbol file
    (its text or its native debug file) still points at."""
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
            " AND json_extract(a.value, '$.sha256') IN (SELECT value FROM json_each(?1))"
            " UNION SELECT sym_sha256 FROM symbol_files"
            " WHERE sym_sha256 IN (SELECT value FROM json_each(?1))"
            " UNION SELECT object_sha256 FROM symbol_files"
            " WHERE object_sha256 IN (SELECT value FROM json_each(?1))",
            (wanted,),
        )
    }
    return tuple(Blob(sha, path) for sha, path in sorted(files.items()) if sha not in still)


def delete_crash(connection: sqlite3.Connection, crash_id: str) -> Deletion:
    """Delete one crash row; ``crashes`` is 0 when there was none. The caller owns the
    transaction and, after it commits, removes the files of ``blobs``."""
    rows = connection.execute(
        "SELECT dump_sha256, dump_path, attachments FROM crashes WHERE id = ?", (crash_id,)
    ).fetchall()
    if not rows:
        return Deletion()
    touched = issue_counts.forget_events(connection, "crashes", "id = ?", (crash_id,))
    connection.execute("DELETE FROM crash_modules WHERE crash_id = ?", (crash_id,))
    connection.execute("DELETE FROM crashes WHERE id = ?", (crash_id,))
    issue_counts.settle(connection, touched, "crashes")
    return Deletion(crashes=1, blobs=_unreferenced(connection, _blobs_of(rows)))


def prune_crashes(connection: sqlite3.Connection, older_than_ms: int) -> Deletion:
    """Delete crashes received before ``older_than_ms`` (the caller owns the transaction)."""
    rows = connection.execute(
        "SELECT dump_sha256, dump_path, attachments FROM crashes WHERE received_at < ?",
        (older_than_ms,),
    ).fetchall()
    touched = issue_counts.forget_events(connection, "crashes", "received_at < ?", (older_than_ms,))
    connection.execute(
        "DELETE FROM crash_modules WHERE crash_id IN"
        " (SELECT id FROM crashes WHERE received_at < ?)",
        (older_than_ms,),
    )
    deleted = connection.execute(
        "DELETE FROM crashes WHERE received_at < ?", (older_than_ms,)
    ).rowcount
    issue_counts.settle(connection, touched, "crashes")
    return Deletion(crashes=int(deleted), blobs=_unreferenced(connection, _blobs_of(rows)))


def prune_everything(connection: sqlite3.Connection, older_than_ms: int) -> Deletion:
    """Reports (counters kept exact) and crashes received before ``older_than_ms``."""
    reports = prune(connection, older_than_ms)
    return replace(prune_crashes(connection, older_than_ms), reports=reports)


# --- blobs still in use ---------------------------------------------------------------


def unreferenced(connection: sqlite3.Connection, blobs: Sequence[Blob]) -> tuple[Blob, ...]:
    """Those of ``blobs`` that no crash row references (checked again after a deletion)."""
    return _unreferenced(connection, {blob.sha256: blob.path for blob in blobs})


def referenced(connection: sqlite3.Connection) -> frozenset[str]:
    """The sha256 of every dump and attachment some crash row points at, and of every symbol
    file's text and native debug file."""
    return frozenset(
        str(row[0])
        for row in connection.execute(
            "SELECT dump_sha256 FROM crashes UNION SELECT json_extract(a.value, '$.sha256')"
            " FROM crashes, json_each(crashes.attachments) AS a"
            " WHERE json_valid(crashes.attachments)"
            " UNION SELECT sym_sha256 FROM symbol_files"
            " UNION SELECT object_sha256 FROM symbol_files"
        )
        if row[0] is not None
    )
