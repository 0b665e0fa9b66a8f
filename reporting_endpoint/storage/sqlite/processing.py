"""SQL for crash processing in SQLite: claim pending crashes under a lease, read the backlog.

Claims run as writer jobs (under the write lock, so two claimers never take the same row);
the backlog is a read on the partial index of pending rows.
"""

from __future__ import annotations

import sqlite3

import aiosqlite

from reporting_endpoint.storage.base import Backlog, Claim, PendingCrash


def claim(
    connection: sqlite3.Connection,
    owner: str,
    limit: int,
    now_ms: int,
    lease_ms: int,
    max_attempts: int,
) -> Claim:
    """Up to ``limit`` pending crashes no live lease holds, oldest first, leased to ``owner``
    with one more attempt counted; those already tried ``max_attempts`` times (each attempt
    ended without a result: the parse killed its processor, or the whole process died) are
    marked failed instead."""
    rows = connection.execute(
        "SELECT id, dump_path, attempts FROM crashes WHERE parse_status = 'pending'"
        " AND (lease_until IS NULL OR lease_until <= ?) ORDER BY received_at, id LIMIT ?",
        (now_ms, limit),
    ).fetchall()
    exhausted = [(crash_id,) for crash_id, _, attempts in rows if attempts >= max_attempts]
    taken = [(crash_id, path) for crash_id, path, attempts in rows if attempts < max_attempts]
    connection.executemany(
        "UPDATE crashes SET parse_status = 'failed', signature = 'unparseable dump',"
        f" parse_error = 'gave up after {max_attempts} attempts: each ended without a result"
        " (the parse killed its processor, or the process died)',"
        f" claimed_by = NULL, lease_until = NULL, processed_at = {int(now_ms)} WHERE id = ?",
        exhausted,
    )
    connection.executemany(
        "UPDATE crashes SET claimed_by = ?, lease_until = ?, attempts = attempts + 1 WHERE id = ?",
        [(owner, now_ms + lease_ms, crash_id) for crash_id, _ in taken],
    )
    return Claim(
        tuple(PendingCrash(str(crash_id), str(path)) for crash_id, path in taken),
        failed=len(exhausted),
    )


def release(
    connection: sqlite3.Connection, owner: str, crash_ids: list[str], refund: bool = False
) -> None:
    """End ``owner``'s leases on these crashes (still pending) early: its processor died
    under them, or it stops, and they are tried again at once rather than when the lease runs
    out. With ``refund`` the attempt their claim counted is given back (not below 0): they
    never ran, or were not the ones at fault."""
    attempts = ", attempts = max(attempts - 1, 0)" if refund else ""
    connection.executemany(
        f"UPDATE crashes SET claimed_by = NULL, lease_until = NULL{attempts}"
        " WHERE id = ? AND claimed_by = ? AND parse_status = 'pending'",
        [(crash_id, owner) for crash_id in crash_ids],
    )


async def backlog(connection: aiosqlite.Connection) -> Backlog:
    async with connection.execute(
        "SELECT count(*), min(received_at) FROM crashes WHERE parse_status = 'pending'"
    ) as cursor:
        row = await cursor.fetchone()
    assert row is not None
    return Backlog(int(row[0]), None if row[1] is None else int(row[1]))
