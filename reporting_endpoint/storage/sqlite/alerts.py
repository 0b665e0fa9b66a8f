"""Alerts in SQLite: events recorded by ingest, the outbox, its leases and delivery log.

Writes run on the writer's connection inside its transaction (``BEGIN IMMEDIATE``: the write
lock makes a claim exclusive across processes); reads use the read connection.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

import aiosqlite
import orjson

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


def record_events(
    connection: sqlite3.Connection, events: Sequence[tuple[int, str]], now_ms: int
) -> None:
    """Record (issue id, trigger) pairs in the caller's (the ingest) transaction."""
    if events:
        connection.executemany(
            "INSERT INTO alert_events (issue_id, trigger, at) VALUES (?,?,?)",
            [(issue_id, trigger, now_ms) for issue_id, trigger in events],
        )


_THROTTLE = (
    "INSERT INTO alert_throttle (rule, scope, until_ms) VALUES (?,?,?)"
    " ON CONFLICT (rule, scope) DO UPDATE SET until_ms = excluded.until_ms"
    " WHERE alert_throttle.until_ms <= ? RETURNING 1"
)
_INSERT_OUTBOX = (
    "INSERT INTO alert_outbox (idempotency_key, rule, channel, trigger, issue_id, payload,"
    " created_at, next_attempt_at) VALUES (?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING"
)


def queue_alerts(
    connection: sqlite3.Connection,
    alerts: Sequence[NewAlert],
    consumed: Sequence[int],
    now_ms: int,
) -> int:
    taken = {
        event_id
        for event_id in consumed
        if connection.execute("DELETE FROM alert_events WHERE id = ?", (event_id,)).rowcount
    }
    queued = 0
    for alert in alerts:
        if alert.event_id is not None and alert.event_id not in taken:
            continue
        if alert.throttle_ms > 0:
            until = now_ms + alert.throttle_ms
            if (
                connection.execute(_THROTTLE, (alert.rule, alert.scope, until, now_ms)).fetchone()
                is None
            ):
                continue
        connection.executemany(
            _INSERT_OUTBOX,
            [
                (
                    key,
                    alert.rule,
                    channel,
                    alert.trigger,
                    alert.issue_id,
                    alert.payload,
                    now_ms,
                    now_ms,
                )
                for channel, key in alert.channels
            ],
        )
        queued += 1
    return queued


_CLAIM = (
    "UPDATE alert_outbox SET lease_owner = ?, lease_until = ? WHERE id IN ("
    " SELECT id FROM alert_outbox WHERE status = 'pending' AND next_attempt_at <= ?"
    " AND (lease_until IS NULL OR lease_until <= ?) AND (? IS NULL OR channel = ?)"
    " AND channel NOT IN (SELECT value FROM json_each(?)) ORDER BY next_attempt_at, id LIMIT ?)"
    " RETURNING id, idempotency_key, rule, channel, trigger, issue_id, payload, attempts,"
    " created_at"
)


def claim(
    connection: sqlite3.Connection,
    owner: str,
    limit: int,
    lease_ms: int,
    now_ms: int,
    channel: str | None = None,
    exclude: Sequence[str] = (),
) -> tuple[OutboxAlert, ...]:
    parameters = (owner, now_ms + lease_ms, now_ms, now_ms, channel, channel,
                  orjson.dumps(list(exclude)).decode(), limit)  # fmt: skip
    rows = connection.execute(_CLAIM, parameters).fetchall()
    return tuple(sorted((OutboxAlert(*row) for row in rows), key=lambda a: a.id))


def record_deliveries(connection: sqlite3.Connection, attempts: Sequence[DeliveryAttempt]) -> None:
    for attempt in attempts:
        _record(connection, attempt)


def _record(connection: sqlite3.Connection, attempt: DeliveryAttempt) -> None:
    error = None if attempt.error is None else attempt.error[:MAX_ERROR]
    connection.execute(
        "INSERT INTO alert_deliveries (outbox_id, attempt, at, outcome, status_code, error,"
        " duration_ms) VALUES (?,?,?,?,?,?,?)",
        (attempt.outbox_id, attempt.attempt, attempt.at, attempt.outcome, attempt.status_code,
         error, attempt.duration_ms),
    )  # fmt: skip
    status = "pending" if attempt.outcome == "retry" else attempt.outcome
    connection.execute(
        "UPDATE alert_outbox SET status = ?, attempts = max(attempts, ?), next_attempt_at = ?,"
        " lease_owner = NULL, lease_until = NULL, finished_at = ?, last_error = ?"
        " WHERE id = ? AND status = 'pending'",
        (status, attempt.attempt, attempt.next_attempt_at,
         None if status == "pending" else attempt.at, error, attempt.outbox_id),
    )  # fmt: skip


def prune(connection: sqlite3.Connection, older_than_ms: int) -> int:
    """Forget finished alerts (and their delivery log) finished before ``older_than_ms``."""
    connection.execute(
        "DELETE FROM alert_deliveries WHERE outbox_id IN (SELECT id FROM alert_outbox"
        " WHERE status <> 'pending' AND finished_at < ?)",
        (older_than_ms,),
    )
    return connection.execute(
        "DELETE FROM alert_outbox WHERE status <> 'pending' AND finished_at < ?",
        (older_than_ms,),
    ).rowcount


# --- reads ---------------------------------------------------------------------------------


async def _fetch(
    connection: aiosqlite.Connection, sql: str, parameters: Sequence[object]
) -> list[tuple[object, ...]]:
    return [tuple(row) for row in await connection.execute_fetchall(sql, parameters)]


async def events(connection: aiosqlite.Connection, limit: int) -> tuple[AlertEvent, ...]:
    columns = ", ".join(f"i.{name}" for name in EVENT_ISSUE_COLUMNS)
    rows = await connection.execute_fetchall(
        f"SELECT e.id, e.issue_id, e.trigger, e.at, {columns} FROM alert_events e"
        " LEFT JOIN issues i ON i.id = e.issue_id ORDER BY e.id LIMIT ?",
        (limit,),
    )
    return tuple(event_of(tuple(row)) for row in rows)


async def issues_over(
    connection: aiosqlite.Connection,
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
    rows = await _fetch(
        connection,
        f"SELECT i.id, {columns}, sum(h.count) AS n FROM issues i"
        " JOIN issue_hourly h ON h.issue_id = i.id AND h.hour >= ?"
        " LEFT JOIN alert_throttle t ON t.rule = ?"
        " AND t.scope = CASE WHEN ? THEN 'rule' ELSE 'issue:' || i.id END"
        " WHERE i.last_seen >= ? AND (t.until_ms IS NULL OR t.until_ms <= ?)"
        " AND (? IS NULL OR i.kind = ?) AND (? IS NULL OR i.site = ?)"
        " GROUP BY i.id HAVING n > ? ORDER BY n DESC, i.id LIMIT ?",
        (since_ms // HOUR_MS, rule, per_rule, since_ms // HOUR_MS * HOUR_MS, now_ms,
         kind, kind, site, site, more_than, limit),
    )  # fmt: skip
    return tuple(issue_over(row) for row in rows)


async def alerts_page(
    connection: aiosqlite.Connection, limit: int, before: int | None, status: str | None
) -> AlertPage:
    rows = await _fetch(
        connection,
        f"SELECT {', '.join(OUTBOX_COLUMNS)} FROM alert_outbox"
        " WHERE (? IS NULL OR id < ?) AND (? IS NULL OR status = ?) ORDER BY id DESC LIMIT ?",
        (before, before, status, status, limit + 1),
    )
    items = tuple(alert_json(row) for row in rows[:limit])
    return AlertPage(items, items[-1]["id"] if len(rows) > limit else None)


async def deliveries_page(
    connection: aiosqlite.Connection, limit: int, before: int | None, alert_id: int | None
) -> AlertPage:
    rows = await _fetch(
        connection,
        f"SELECT {', '.join(DELIVERY_COLUMNS)} FROM alert_deliveries d"
        " JOIN alert_outbox o ON o.id = d.outbox_id"
        " WHERE (? IS NULL OR d.id < ?) AND (? IS NULL OR d.outbox_id = ?)"
        " ORDER BY d.id DESC LIMIT ?",
        (before, before, alert_id, alert_id, limit + 1),
    )
    items = tuple(delivery_json(row) for row in rows[:limit])
    return AlertPage(items, items[-1]["id"] if len(rows) > limit else None)
