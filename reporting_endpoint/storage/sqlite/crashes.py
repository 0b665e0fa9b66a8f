"""SQL for crash rows: insert after the upload, record the parsed facts later.

Plain sqlite3 on the writer's connection; the caller owns the transaction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from typing import Any

import orjson

from reporting_endpoint.records import IssueKey, NewCrash
from reporting_endpoint.storage.native_rows import NATIVE_COLUMNS, native_facts
from reporting_endpoint.storage.rows import FACT_COLUMNS, U64_FACTS, u64_to_db
from reporting_endpoint.storage.sqlite import issue_counts, symbols
from reporting_endpoint.storage.sqlite.issue_tally import (
    CRASH_EVENT_COLUMNS,
    Tally,
    tally_crash_event,
)


def insert_crash(connection: sqlite3.Connection, crash: NewCrash) -> None:
    connection.execute(
        "INSERT INTO crashes (id, received_at, product, version, guid, platform, process_type,"
        " electron_version, annotations, query, dump_sha256, dump_size, dump_path, attachments,"
        " upload_bytes, release) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (
            crash.id, crash.received_at, crash.product, crash.version, crash.guid,
            crash.platform, crash.process_type, crash.electron_version,
            orjson.dumps(crash.annotations).decode(), orjson.dumps(crash.query).decode(),
            crash.dump_sha256, crash.dump_size, crash.dump_path,
            orjson.dumps(list(crash.attachments)).decode(), crash.upload_bytes,
            None if crash.release is None else _text(crash.release),
        ),
    )  # fmt: skip


_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1
# A result ends the claim on the row (processing.py), with the time it came.
_DONE = "claimed_by = NULL, lease_until = NULL, processed_at = ?"


def _text(value: str) -> str:
    """``value`` as UTF-8 can carry it: a lone surrogate (from a dump's UTF-16 names) is kept
    as its escape rather than failing the whole row."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def _fact_value(name: str, value: Any) -> object:
    """One fact as a value SQLite can bind; anything else becomes None, not a lost result."""
    if value is None or isinstance(value, float):
        return value
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, int):  # bool included: it is an int
        if name in U64_FACTS:
            return u64_to_db(int(value))
        return int(value) if _I64_MIN <= value <= _I64_MAX else None
    return None


def record_facts(
    connection: sqlite3.Connection,
    crash_id: str,
    facts: Mapping[str, Any],
    issue: IssueKey | None = None,
    now_ms: int = 0,
    owner: str | None = None,
) -> None:
    """Mark the crash parsed with its facts; if they still cannot be written, mark it failed.

    Either way the row leaves ``pending``: a result that cannot be stored must not leave the
    crash to be parsed again, and fail again, at every start. With ``issue``, the crash is
    counted in that issue in the same transaction (a crash parsed again leaves its old issue
    first, so it is never counted twice). The modules, frames and missing symbols
    (``native_rows.native_facts``) are written with the rest, and the crash's ``crash_modules``
    rows become its missing symbols (none when the result cannot be stored).

    With ``owner`` (a processor's claim), nothing at all is written unless the crash is still
    pending and leased to ``owner``: a claimer whose lease ran out, and whose crash another
    processor took and recorded, must not record it a second time (and touch its issue).
    """
    if owner is not None and not _still_ours(connection, crash_id, owner):
        return
    forget_issue(connection, crash_id)
    assignments = ", ".join(f"{name} = ?" for name in (*FACT_COLUMNS, *NATIVE_COLUMNS))
    values = [_fact_value(name, facts.get(name)) for name in FACT_COLUMNS]
    try:
        native = native_facts(facts)
        # Under a savepoint, as on PostgreSQL: a result half written (the row without its
        # missing modules) is taken back whole before the fallback below.
        connection.execute("SAVEPOINT facts")
        try:
            updated = connection.execute(
                f"UPDATE crashes SET parse_status = 'parsed', parse_error = NULL, {assignments},"
                f" {_DONE} WHERE id = ?",
                (*values, native.modules, native.frames, now_ms, crash_id),
            ).rowcount
            if updated:  # no rows for a crash deleted meanwhile
                symbols.replace_missing(connection, crash_id, native.missing)
        except BaseException:
            connection.execute("ROLLBACK TO SAVEPOINT facts")
            raise
        finally:
            connection.execute("RELEASE SAVEPOINT facts")
    except (OverflowError, ValueError, sqlite3.InterfaceError, sqlite3.ProgrammingError) as exc:
        signature = facts.get("signature")
        connection.execute(
            "UPDATE crashes SET parse_status = 'failed', parse_error = ?, signature = ?,"
            f" modules = NULL, frames = NULL, {_DONE} WHERE id = ?",
            (
                _text(f"facts not stored: {type(exc).__name__}: {exc}"[:500]),
                _text(signature) if isinstance(signature, str) else "unparseable dump",
                now_ms,
                crash_id,
            ),
        )
        symbols.replace_missing(connection, crash_id, ())
    if issue is not None and issue.fingerprint:
        assign_issue(connection, crash_id, issue, now_ms)


def forget_issue(connection: sqlite3.Connection, crash_id: str) -> None:
    """Take the crash out of the issue it is counted in, if any."""
    touched = issue_counts.forget_events(connection, "crashes", "id = ?", (crash_id,))
    if touched:
        connection.execute(
            "UPDATE crashes SET issue_id = NULL, fingerprint = NULL WHERE id = ?", (crash_id,)
        )
        issue_counts.settle(connection, touched, "crashes")


def assign_issue(
    connection: sqlite3.Connection, crash_id: str, issue: IssueKey, now_ms: int
) -> None:
    """Count the (stored, parsed) crash in ``issue``, creating it when new."""
    event = connection.execute(
        f"SELECT {CRASH_EVENT_COLUMNS} FROM crashes WHERE id = ?", (crash_id,)
    ).fetchone()
    if event is None:
        return
    tally = Tally(issue)
    tally_crash_event(tally, event)
    ids = issue_counts.add(connection, {issue.fingerprint: tally}, now_ms)
    connection.execute(
        "UPDATE crashes SET fingerprint = ?, issue_id = ? WHERE id = ?",
        (issue.fingerprint, ids[issue.fingerprint], crash_id),
    )


def _still_ours(connection: sqlite3.Connection, crash_id: str, owner: str) -> bool:
    """The crash is pending and leased to ``owner`` (in the writer's transaction: no other
    write comes between this and the caller's)."""
    row = connection.execute(
        "SELECT 1 FROM crashes WHERE id = ? AND claimed_by = ? AND parse_status = 'pending'",
        (crash_id, owner),
    ).fetchone()
    return row is not None


def record_failure(
    connection: sqlite3.Connection,
    crash_id: str,
    error: str,
    now_ms: int = 0,
    owner: str | None = None,
) -> None:
    """Mark the crash failed; with ``owner``, only while it is pending and leased to it."""
    mine = "" if owner is None else " AND claimed_by = ? AND parse_status = 'pending'"
    connection.execute(
        f"UPDATE crashes SET parse_status = 'failed', parse_error = ?, signature = ?, {_DONE}"
        f" WHERE id = ?{mine}",
        (error[:500], "unparseable dump", now_ms, crash_id, *(() if owner is None else (owner,))),
    )
