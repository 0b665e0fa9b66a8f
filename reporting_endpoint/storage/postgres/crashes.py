"""SQL for crash rows in PostgreSQL: insert after the upload, record the parsed facts later.

Jobs on the writer's connection; the caller owns the transaction. Text is cleaned first
(``values.clean_text``: NUL and lone surrogates), and every fact is coerced to its column's
type, since PostgreSQL, unlike SQLite, refuses an int in a text column and the reverse.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import asyncpg
import orjson

from reporting_endpoint.records import IssueKey, NewCrash
from reporting_endpoint.storage.issue_rows import crash_dims
from reporting_endpoint.storage.native_rows import NATIVE_COLUMNS, native_facts
from reporting_endpoint.storage.postgres import issue_writes, symbols
from reporting_endpoint.storage.postgres.values import clean_text
from reporting_endpoint.storage.rows import FACT_COLUMNS, U64_FACTS, u64_to_db

_INTEGER_FACTS = frozenset({"exception_code", "crash_address", "crashing_thread", "crash_offset"})
_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1


def _done(parameter: int) -> str:
    """A result ends the claim on the row (processing.py), with the time it came."""
    return f"claimed_by = NULL, lease_until = NULL, processed_at = ${parameter}"


def _text(value: str | None) -> str | None:
    return None if value is None else clean_text(value)


def _json(value: object) -> str:
    return clean_text(orjson.dumps(value).decode())


async def insert_crash(connection: asyncpg.Connection, crash: NewCrash) -> None:
    await connection.execute(
        "INSERT INTO crashes (id, received_at, product, version, guid, platform, process_type,"
        " electron_version, annotations, query, dump_sha256, dump_size, dump_path, attachments,"
        " upload_bytes, release) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,"
        " $13, $14, $15, $16)",
        crash.id, crash.received_at, _text(crash.product), _text(crash.version),
        _text(crash.guid), _text(crash.platform), _text(crash.process_type),
        _text(crash.electron_version), _json(crash.annotations), _json(crash.query),
        crash.dump_sha256, crash.dump_size, _text(crash.dump_path),
        _json(list(crash.attachments)), crash.upload_bytes, _text(crash.release),
    )  # fmt: skip


def fact_value(name: str, value: Any) -> object:
    """One fact as its column holds it; a value that does not fit becomes None (not a lost
    result): u64 facts in two's complement, other integers only within 64 bits."""
    if value is None:
        return None
    if name in _INTEGER_FACTS:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):  # bool included: it is an int
            return None
        if name in U64_FACTS:
            return u64_to_db(int(value))
        return int(value) if _I64_MIN <= value <= _I64_MAX else None
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, int | float):
        return str(value)
    return None


async def record_facts(
    connection: asyncpg.Connection,
    crash_id: str,
    facts: Mapping[str, Any],
    issue: IssueKey | None = None,
    now_ms: int = 0,
    owner: str | None = None,
) -> None:
    """Mark the crash parsed with its facts; if they still cannot be written, mark it failed.

    Either way the row leaves ``pending``: a result that cannot be stored must not leave the
    crash to be parsed again, and fail again, at every start. The first attempt runs under a
    savepoint, so its failure does not abort the transaction the fallback runs in. With
    ``issue`` the crash is counted in that issue in the same transaction (as in SQLite, a
    crash parsed again leaves the issue it was counted in first, so it never counts twice).
    The modules, frames and missing symbols are written with the rest, and the crash's
    ``crash_modules`` rows become its missing symbols (none when the result cannot be stored).

    The crash row is locked first, then the issues: the order every transaction takes
    (``issue_writes``), so a parse never deadlocks with a prune or another host's parse.

    With ``owner`` (a processor's claim), nothing at all is written unless the crash is still
    pending and leased to ``owner`` (checked on the locked row: ``FOR UPDATE`` re-reads a row
    another transaction changed before returning it): a claimer whose lease ran out, and whose
    crash another processor took and recorded, must not record it a second time.
    """
    if owner is None:
        event = await connection.fetchrow(
            "SELECT issue_id, received_at, os, release FROM crashes WHERE id = $1 FOR UPDATE",
            crash_id,
        )
    else:
        event = await connection.fetchrow(
            "SELECT issue_id, received_at, os, release FROM crashes WHERE id = $1"
            " AND claimed_by = $2 AND parse_status = 'pending' FOR UPDATE",
            crash_id,
            owner,
        )
        if event is None:
            return
    if event is not None and event[0] is not None:
        await connection.execute(
            "UPDATE crashes SET issue_id = NULL, fingerprint = NULL WHERE id = $1", crash_id
        )
        await issue_writes.forget(
            connection, issue_writes.tally_crash_rows([tuple(event)]), "crashes"
        )
    columns = (*FACT_COLUMNS, *NATIVE_COLUMNS)
    assignments = ", ".join(f"{name} = ${n}" for n, name in enumerate(columns, 1))
    values = [fact_value(name, facts.get(name)) for name in FACT_COLUMNS]
    await connection.execute("SAVEPOINT facts")
    try:
        native = native_facts(facts)
        status = await connection.execute(
            f"UPDATE crashes SET parse_status = 'parsed', parse_error = NULL, {assignments},"
            f" {_done(len(columns) + 1)} WHERE id = ${len(columns) + 2}",
            *values,
            native.modules,
            native.frames,
            now_ms,
            crash_id,
        )
        if status != "UPDATE 0":  # no rows for a crash deleted meanwhile
            await symbols.replace_missing(connection, crash_id, native.missing)
    # Server-side data errors (class 22), and asyncpg's own when it cannot encode a value.
    except (asyncpg.DataError, OverflowError, ValueError) as exc:
        await connection.execute("ROLLBACK TO SAVEPOINT facts")
        signature = facts.get("signature")
        await connection.execute(
            "UPDATE crashes SET parse_status = 'failed', parse_error = $1, signature = $2,"
            f" modules = NULL, frames = NULL, {_done(3)} WHERE id = $4",
            clean_text(f"facts not stored: {type(exc).__name__}: {exc}"[:500]),
            clean_text(signature) if isinstance(signature, str) else "unparseable dump",
            now_ms,
            crash_id,
        )
        await symbols.replace_missing(connection, crash_id, ())
    else:
        await connection.execute("RELEASE SAVEPOINT facts")
    if issue is not None and issue.fingerprint and event is not None:
        await _assign_issue(connection, crash_id, issue_writes.key_text(issue), now_ms)


async def _assign_issue(
    connection: asyncpg.Connection, crash_id: str, issue: IssueKey, now_ms: int
) -> None:
    """Count the (stored, parsed, locked) crash in ``issue``, creating it when new."""
    event = await connection.fetchrow(
        "SELECT received_at, os, release FROM crashes WHERE id = $1", crash_id
    )
    if event is None:
        return
    tally = issue_writes.Tally(issue)
    tally.add(int(event[0]), event[2], crash_dims(event[1], event[2]))
    ids = await issue_writes.add(connection, {issue.fingerprint: tally}, now_ms)
    await connection.execute(
        "UPDATE crashes SET fingerprint = $1, issue_id = $2 WHERE id = $3",
        issue.fingerprint,
        ids[issue.fingerprint],
        crash_id,
    )


async def record_failure(
    connection: asyncpg.Connection,
    crash_id: str,
    error: str,
    now_ms: int = 0,
    owner: str | None = None,
) -> None:
    """Mark the crash failed; with ``owner``, only while it is pending and leased to it."""
    mine = "" if owner is None else " AND claimed_by = $5 AND parse_status = 'pending'"
    await connection.execute(
        "UPDATE crashes SET parse_status = 'failed', parse_error = $1, signature = $2,"
        f" {_done(3)} WHERE id = $4{mine}",
        clean_text(error[:500]),
        "unparseable dump",
        now_ms,
        crash_id,
        *(() if owner is None else (owner,)),
    )
