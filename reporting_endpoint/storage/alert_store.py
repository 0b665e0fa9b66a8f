"""The alert part of the storage protocol (``AlertStore``, which ``Storage`` includes): its
records (alert events, the outbox, its delivery log) and the engine-neutral JSON of an outbox
row and of a delivery attempt."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

# What an ingest transaction records for the evaluator (README "Alerts").
EventTrigger = Literal["new_issue", "regressed"]
NEW_ISSUE: EventTrigger = "new_issue"
REGRESSED: EventTrigger = "regressed"
# An outbox row's state, and what one delivery attempt ended in.
OutboxStatus = Literal["pending", "delivered", "failed"]
OUTBOX_STATUSES: tuple[OutboxStatus, ...] = ("pending", "delivered", "failed")
Outcome = Literal["delivered", "retry", "failed"]
# Stored error texts are for people reading the delivery log, not documents.
MAX_ERROR = 500


@dataclass(frozen=True, slots=True)
class AlertEvent:
    """A new issue or a regression, as the ingest transaction recorded it, with the issue's
    fields now (``issue`` None: the issue is gone since, e.g. regrouped away)."""

    id: int
    issue_id: int
    trigger: EventTrigger
    at: int
    issue: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class NewAlert:
    """An alert to queue: one outbox row per ``(channel, idempotency key)``.

    ``event_id``: the alert event it answers; it is queued only if that event is consumed in
    the same transaction (another evaluator that took it first queued it). ``throttle_ms`` > 0:
    queued only when no alert of ``rule`` for ``scope`` was queued in the last that many ms.
    """

    rule: str
    scope: str
    throttle_ms: int
    trigger: str
    issue_id: int | None
    event_id: int | None
    payload: str
    channels: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class OutboxAlert:
    """An outbox row a sender holds the lease of."""

    id: int
    key: str
    rule: str
    channel: str
    trigger: str
    issue_id: int | None
    payload: str
    attempts: int
    created_at: int


@dataclass(frozen=True, slots=True)
class DeliveryAttempt:
    """One try at delivering an outbox row, and what follows: ``delivered`` and ``failed``
    end it; ``retry`` makes it due again at ``next_attempt_at``."""

    outbox_id: int
    attempt: int
    at: int
    outcome: Outcome
    status_code: int | None
    error: str | None
    duration_ms: int
    next_attempt_at: int


@dataclass(frozen=True, slots=True)
class AlertPage:
    """One keyset page, newest first; ``next`` is the id the next page starts below."""

    items: tuple[dict[str, Any], ...]
    next: int | None


# Columns of an outbox row as ``alert_json`` reads them.
OUTBOX_COLUMNS = (
    "id", "idempotency_key", "rule", "channel", "trigger", "issue_id", "payload", "created_at",
    "status", "attempts", "next_attempt_at", "finished_at", "last_error",
)  # fmt: skip
DELIVERY_COLUMNS = (
    "d.id", "d.outbox_id", "o.idempotency_key", "o.rule", "o.channel", "d.attempt", "d.at",
    "d.outcome", "d.status_code", "d.error", "d.duration_ms",
)  # fmt: skip
# Columns of an alert event joined with its issue.
EVENT_ISSUE_COLUMNS = (
    "kind", "title", "site", "status", "event_count", "first_seen", "last_seen",
    "first_release", "last_release",
)  # fmt: skip


def _time(ms: object) -> str | None:
    # Imported here: storage.base includes this module, and commands such as `header` import
    # storage.base without wanting a JSON library loaded (tests/test_headers.py).
    from reporting_endpoint.storage.rows import iso_time

    return None if ms is None else iso_time(int(ms))  # type: ignore[call-overload]


def alert_json(row: Sequence[Any]) -> dict[str, Any]:
    """An outbox row (``OUTBOX_COLUMNS``) as ``GET /api/alerts`` shows it."""
    import orjson  # see _time

    (rid, key, rule, channel, trigger, issue_id, payload, created, status, attempts,
     next_at, finished, error) = row  # fmt: skip
    return {
        "id": int(rid),
        "idempotency_key": key,
        "rule": rule,
        "channel": channel,
        "trigger": trigger,
        "issue_id": None if issue_id is None else int(issue_id),
        "created_at": _time(created),
        "status": status,
        "attempts": int(attempts),
        "next_attempt_at": _time(next_at) if status == "pending" else None,
        "finished_at": _time(finished),
        "last_error": error,
        "alert": orjson.loads(payload),
    }


def delivery_json(row: Sequence[Any]) -> dict[str, Any]:
    """A delivery attempt (``DELIVERY_COLUMNS``) as ``GET /api/alerts/deliveries`` shows it."""
    rid, outbox_id, key, rule, channel, attempt, at, outcome, code, error, duration = row
    return {
        "id": int(rid),
        "alert_id": int(outbox_id),
        "idempotency_key": key,
        "rule": rule,
        "channel": channel,
        "attempt": int(attempt),
        "at": _time(at),
        "outcome": outcome,
        "status_code": None if code is None else int(code),
        "error": error,
        "duration_ms": int(duration),
    }


def event_of(row: Sequence[Any]) -> AlertEvent:
    """An alert event from ``id, issue_id, trigger, at`` and ``EVENT_ISSUE_COLUMNS``."""
    issue = None
    if row[4] is not None:
        issue = dict(zip(EVENT_ISSUE_COLUMNS, row[4:], strict=True))
        issue["id"] = int(row[1])
    return AlertEvent(int(row[0]), int(row[1]), row[2], int(row[3]), issue)


def issue_over(row: Sequence[Any]) -> dict[str, Any]:
    """An issue from ``id``, ``EVENT_ISSUE_COLUMNS`` and its window's count."""
    issue = dict(zip(EVENT_ISSUE_COLUMNS, row[1:-1], strict=True))
    issue["id"] = int(row[0])
    issue["window_count"] = int(row[-1])
    return issue


class AlertStore(Protocol):
    """What alerts need from the storage (README "Alerts"; never on the ingest path)."""

    async def alert_events(self, limit: int) -> tuple[AlertEvent, ...]:
        """New issues and regressions ingest recorded and no evaluator consumed yet, oldest
        first, with their issue's fields now."""
        ...

    async def issues_over(
        self,
        rule: str,
        per_rule: bool,
        since_ms: int,
        more_than: int,
        now_ms: int,
        kind: str | None = None,
        site: str | None = None,
        limit: int = 1000,
    ) -> tuple[dict[str, Any], ...]:
        """Issues (``kind`` and ``site`` when given) with more than ``more_than`` events in
        the hours from ``since_ms`` on, largest first, as ``AlertEvent.issue`` plus
        ``window_count``; those ``rule``'s throttle holds back now (scope ``issue:<id>``, or
        ``rule`` with ``per_rule``) are left out. Reads the hourly counters only."""
        ...

    async def queue_alerts(
        self, alerts: Sequence[NewAlert], consumed: Sequence[int], now_ms: int
    ) -> int:
        """In one transaction: consume the ``consumed`` alert events, and queue each alert
        whose event this call consumed (if it has one) and whose throttle lets it through,
        moving the throttle on. Answers how many alerts were queued."""
        ...

    async def claim_alerts(
        self,
        owner: str,
        limit: int,
        lease_ms: int,
        now_ms: int,
        channel: str | None = None,
        exclude: Sequence[str] = (),
    ) -> tuple[OutboxAlert, ...]:
        """Lease up to ``limit`` due outbox rows (of ``channel`` only when given, none of the
        ``exclude`` channels) to ``owner`` for ``lease_ms``: no other sender claims them
        until the lease ends or a delivery is recorded."""
        ...

    async def record_deliveries(self, attempts: Sequence[DeliveryAttempt]) -> None:
        """Log the attempts and move their outbox rows on (delivered, failed, or due again),
        in one transaction."""
        ...

    async def prune_alerts(self, older_than_ms: int) -> int:
        """Forget delivered and failed alerts (with their log) finished before then."""
        ...

    async def alerts_page(
        self, limit: int, before: int | None = None, status: str | None = None
    ) -> AlertPage:
        """Outbox rows, newest first, those with an id below ``before``."""
        ...

    async def alert_deliveries_page(
        self, limit: int, before: int | None = None, alert_id: int | None = None
    ) -> AlertPage:
        """Delivery attempts, newest first (of one outbox row with ``alert_id``)."""
        ...
