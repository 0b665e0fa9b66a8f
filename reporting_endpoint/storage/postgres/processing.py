"""SQL for crash processing in PostgreSQL: claim pending crashes under a lease, read the backlog.

Claims run as writer jobs; ``FOR UPDATE SKIP LOCKED`` lets processes on several hosts claim at
once without waiting for each other or taking the same row.
"""

from __future__ import annotations

import asyncpg

from reporting_endpoint.storage.base import Backlog, Claim, PendingCrash
from reporting_endpoint.storage.postgres.reads import PgPool


async def claim(
    connection: asyncpg.Connection,
    owner: str,
    limit: int,
    now_ms: int,
    lease_ms: int,
    max_attempts: int,
) -> Claim:
    """As the SQLite backend's ``claim``: oldest unleased pending crashes, leased to ``owner``
    with an attempt counted; those out of attempts marked failed."""
    rows = await connection.fetch(
        "SELECT id, dump_path, attempts FROM crashes WHERE parse_status = 'pending'"
        " AND (lease_until IS NULL OR lease_until <= $1) ORDER BY received_at, id"
        " LIMIT $2 FOR UPDATE SKIP LOCKED",
        now_ms,
        limit,
    )
    exhausted = [row[0] for row in rows if row[2] >= max_attempts]
    taken = [(row[0], row[1]) for row in rows if row[2] < max_attempts]
    if exhausted:
        await connection.execute(
            "UPDATE crashes SET parse_status = 'failed', signature = 'unparseable dump',"
            " parse_error = $1, claimed_by = NULL, lease_until = NULL, processed_at = $2"
            " WHERE id = ANY($3::text[])",
            f"gave up after {max_attempts} attempts: each ended without a result"
            " (the parse killed its processor, or the process died)",
            now_ms,
            exhausted,
        )
    if taken:
        await connection.execute(
            "UPDATE crashes SET claimed_by = $1, lease_until = $2, attempts = attempts + 1"
            " WHERE id = ANY($3::text[])",
            owner,
            now_ms + lease_ms,
            [crash_id for crash_id, _ in taken],
        )
    return Claim(
        tuple(PendingCrash(str(crash_id), str(path)) for crash_id, path in taken),
        failed=len(exhausted),
    )


async def release(
    connection: asyncpg.Connection, owner: str, crash_ids: list[str], refund: bool = False
) -> None:
    """As the SQLite backend's ``release``."""
    attempts = ", attempts = greatest(attempts - 1, 0)" if refund else ""
    await connection.execute(
        f"UPDATE crashes SET claimed_by = NULL, lease_until = NULL{attempts}"
        " WHERE id = ANY($1::text[]) AND claimed_by = $2 AND parse_status = 'pending'",
        crash_ids,
        owner,
    )


async def backlog(pool: PgPool) -> Backlog:
    async with pool.acquire() as connection:
        row = await connection.fetchrow(
            "SELECT count(*), min(received_at) FROM crashes WHERE parse_status = 'pending'"
        )
    assert row is not None
    return Backlog(int(row[0]), None if row[1] is None else int(row[1]))
