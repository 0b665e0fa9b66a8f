"""Alerts in PostgreSQL: events recorded by ingest, the outbox, its leases and delivery log.

The same tables and behaviour as ``storage/sqlite/alerts.py``. Writes run on the writer's
connection in a transaction of their own; several processes or hosts claim outbox rows with
``FOR UPDATE SKIP LOCKED``, so each row has one sender at a time and no one waits for another.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from reporting_endpoint.storage.alert_store import (
    DELIVERY_COLUMNS,
    EVENT_ISSUE_COLUMNS,
    MAX_ERROR,
    OUTBOX_COLUMNS,
    AlertEvent,
    AlertPage,
    DeliveryAttempt,
    NewAlert,
    OutboxAlert,
    alert_json,
    delivery_json,
    event_of,
    issue_over,
)
from reporting_endpoint.storage.filters import HOUR_MS
from reporting_endpoint.storage.postgres.reads import PgPool
from reporting_endpoint.storage.postgres.values import clean_text


async def record_events(
    connection: asyncpg.Connection, events: Sequence[tuple[int, str]], now_ms: int
) -> None:
    """Record (issue id, trigger) pairs in the caller's (the ingest) transaction."""
    if events:
        await connection.execute(
            "INSERT INTO alert_events (issue_id, trigger, at)"
            " SELECT i, t, $3 FROM unnest($1::bigint[], $2::text[]) AS u(i, t)",
            [issue_id for issue_id, _ in events],
            [trigger for _, trigger in events],
            now_ms,
        )


# Throttles and outbox rows of a whole round in one statement each: the writer connection is
# shared with ingest, so a round costs it three round trips, not several per alert.
_THROTTLE = (
    "INSERT INTO alert_throttle AS t (rule, scope, until_ms)"
    " SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[])"
    " ON CONFLICT (rule, scope) DO UPDATE SET until_ms = excluded.until_ms"
    " WHERE t.until_ms <= $4 RETURNING rule, scope"
)
_INSERT_OUTBOX = (
    "INSERT INTO alert_outbox (idempotency_key, rule, channel, trigger, issue_id, payload,"
    " created_at, next_attempt_at) SELECT k, r, c, t, i, p, $7, $7"
    " FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[])"
    " AS u(k, r, c, t, i, p) ON CONFLICT DO NOTHING"
)


async def queue_alerts(
    connection: asyncpg.Connection,
    alerts: Sequence[NewAlert],
    consumed: Sequence[int],
    now_ms: int,
) -> int:
    # Another evaluator deleting the same rows makes this wait for its COMMIT, then answer
    # none of them: each event is queued by exactly one.
    taken = {
        int(row[0])
        for row in await connection.fetch(
            "DELETE FROM alert_events WHERE id = ANY($1::bigint[]) RETURNING id", list(consumed)
        )
    }
    wanted = [a for a in alerts if a.event_id is None or a.event_id in taken]
    # One row per (rule, scope) in the upsert (a row cannot be changed twice by one
    # statement); later alerts of a pair the round already throttles wait for the throttle.
    throttled: dict[tuple[str, str], NewAlert] = {}
    for alert in wanted:
        if alert.throttle_ms > 0:
            throttled.setdefault((alert.rule, alert.scope), alert)
    passed: set[tuple[str, str]] = set()
    if throttled:
        pairs = list(throttled.values())
        passed = {
            (str(row[0]), str(row[1]))
            for row in await connection.fetch(
                _THROTTLE,
                [a.rule for a in pairs],
                [a.scope for a in pairs],
                [now_ms + a.throttle_ms for a in pairs],
                now_ms,
            )
        }
    queued = [
        a
        for a in wanted
        if a.throttle_ms <= 0
        or (throttled.get((a.rule, a.scope)) is a and (a.rule, a.scope) in passed)
    ]
    rows = [
        (key, a.rule, channel, a.trigger, a.issue_id, clean_text(a.payload))
        for a in queued
        for channel, key in a.channels
    ]
    if rows:
        columns = [list(column) for column in zip(*rows, strict=True)]
        await connection.execute(_INSERT_OUTBOX, *columns, now_ms)
    return len(queued)


_CLAIM = """
UPDATE alert_outbox SET lease_owner = $1, lease_until = $2 WHERE id IN (
    SELECT id FROM alert_outbox WHERE status = 'pending' AND next_attempt_at <= $3
    AND (lease_until IS NULL OR lease_until <= $3) AND ($5::text IS NULL OR channel = $5)
    AND NOT (channel = ANY($6::text[])) ORDER BY next_attempt_at, id LIMIT $4
    FOR UPDATE SKIP LOCKED)
RETURNING id, idempotency_key, rule, channel, trigger, issue_id, payload, attempts, created_at
"""


async def claim(
    connection: asyncpg.Connection,
    owner: str,
    limit: int,
    lease_ms: int,
    now_ms: int,
    channel: str | None = None,
    exclude: Sequence[str] = (),
) -> tuple[OutboxAlert, ...]:
    rows = await connection.fetch(
        _CLAIM, owner, now_ms + lease_ms, now_ms, limit, channel, list(exclude)
    )
    return tuple(sorted((OutboxAlert(*tuple(row)) for row in rows), key=lambda a: a.id))


async def record_deliveries(
    connection: asyncpg.Connection, attempts: Sequence[DeliveryAttempt]
) -> None:
    for attempt in attempts:
        await _record(connection, attempt)


async def _record(connection: asyncpg.Connection, attempt: DeliveryAttempt) -> None:
    error = None if attempt.error is None else clean_text(attempt.error[:MAX_ERROR])
    await connection.execute(
        "INSERT INTO alert_deliveries (outbox_id, attempt, at, outcome, status_code, error,"
        " duration_ms) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        attempt.outbox_id, attempt.attempt, attempt.at, attempt.outcome, attempt.status_code,
        error, attempt.duration_ms,
    )  # fmt: skip
    status = "pending" if attempt.outcome == "retry" else attempt.outcome
    await connection.execute(
        "UPDATE alert_outbox SET status = $1, attempts = greatest(attempts, $2),"
        " next_attempt_at = $3, lease_owner = NULL, lease_until = NULL, finished_at = $4,"
        " last_error = $5 WHERE id = $6 AND status = 'pending'",
        status, attempt.attempt, attempt.next_attempt_at,
        None if status == "pending" else attempt.at, error, attempt.outbox_id,
    )  # fmt: skip


async def prune(connection: asyncpg.Connection, older_than_ms: int) -> int:
    """Forget finished alerts (and their delivery log) finished before ``older_than_ms``."""
    await connection.execute(
        "DELETE FROM alert_deliveries WHERE outbox_id IN (SELECT id FROM alert_outbox"
        " WHERE status <> 'pending' AND finished_at < $1)",
        older_than_ms,
    )
    removed = await connection.fetch(
        "DELETE FROM alert_outbox WHERE status <> 'pending' AND finished_at < $1 RETURNING id",
        older_than_ms,
    )
    return len(removed)


# --- reads ---------------------------------------------------------------------------------


async def events(pool: PgPool, limit: int) -> tuple[AlertEvent, ...]:
    columns = ", ".join(f"i.{name}" for name in EVENT_ISSUE_COLUMNS)
    rows = await pool.fetch(
        f"SELECT e.id, e.issue_id, e.trigger, e.at, {columns} FROM alert_events e"
        " LEFT JOIN issues i ON i.id = e.issue_id ORDER BY e.id LIMIT $1",
        limit,
    )
    return tuple(event_of(tuple(row)) for row in rows)


async def issues_over(
    pool: PgPool,
    rule: str,
    per_rule: bool,
    since_ms: int,
    more_than: int,
    now_ms: int,
    kind: str | None,
    site: str | None,
    limit: int,
) -> tuple[dict[str, Any], ...]:
    columns = ", ".join(f"i.{name}" for name in EVENT_ISSUE_COLUMNS)
    rows = await pool.fetch(
        f"SELECT i.id, {columns}, sum(h.count) AS n FROM issues i"
        " JOIN issue_hourly h ON h.issue_id = i.id AND h.hour >= $1"
        " LEFT JOIN alert_throttle t ON t.rule = $2"
        " AND t.scope = CASE WHEN $3 THEN 'rule' ELSE 'issue:' || i.id::text END"
        " WHERE i.last_seen >= $4 AND (t.until_ms IS NULL OR t.until_ms <= $5)"
        " AND ($6::text IS NULL OR i.kind = $6) AND ($7::text IS NULL OR i.site = $7)"
        " GROUP BY i.id HAVING sum(h.count) > $8 ORDER BY sum(h.count) DESC, i.id LIMIT $9",
        since_ms // HOUR_MS, rule, per_rule, since_ms // HOUR_MS * HOUR_MS, now_ms,
        kind, site, more_than, limit,
    )  # fmt: skip
    return tuple(issue_over(tuple(row)) for row in rows)


async def alerts_page(
    pool: PgPool, limit: int, before: int | None, status: str | None
) -> AlertPage:
    rows = await pool.fetch(
        f"SELECT {', '.join(OUTBOX_COLUMNS)} FROM alert_outbox"
        " WHERE ($1::bigint IS NULL OR id < $1) AND ($2::text IS NULL OR status = $2)"
        " ORDER BY id DESC LIMIT $3",
        before,
        status,
        limit + 1,
    )
    items = tuple(alert_json(tuple(row)) for row in rows[:limit])
    return AlertPage(items, items[-1]["id"] if len(rows) > limit else None)


async def deliveries_page(
    pool: PgPool, limit: int, before: int | None, alert_id: int | None
) -> AlertPage:
    rows = await pool.fetch(
        f"SELECT {', '.join(DELIVERY_COLUMNS)} FROM alert_deliveries d"
        " JOIN alert_outbox o ON o.id = d.outbox_id"
        " WHERE ($1::bigint IS NULL OR d.id < $1) AND ($2::bigint IS NULL OR d.outbox_id = $2)"
        " ORDER BY d.id DESC LIMIT $3",
        before,
        alert_id,
        limit + 1,
    )
    items = tuple(delivery_json(tuple(row)) for row in rows[:limit])
    return AlertPage(items, items[-1]["id"] if len(rows) > limit else None)
