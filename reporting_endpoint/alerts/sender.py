"""The sender and the alert service: background tasks beside the ingest path.

``AlertService`` runs two loops for the life of the app: the evaluator (``outbox.py``) and
the sender. The sender leases due outbox rows (one sender per row at a time, across processes
and hosts), delivers them outside any transaction, and records each attempt: delivered,
due again after an exponential backoff, or failed once the attempts or the time run out. A
delivery cut short (a crash, a restart) keeps its row pending: when its lease ends another
sender, or this one after the restart, delivers it again with the same idempotency key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
import uuid

import orjson

from reporting_endpoint import metrics
from reporting_endpoint.alerts.channels import Channels, Result
from reporting_endpoint.alerts.destinations import EmailChannel, SlackChannel, WebhookChannel
from reporting_endpoint.alerts.outbox import Evaluator
from reporting_endpoint.alerts.rules import AlertConfig, Delivery
from reporting_endpoint.storage.alert_store import DeliveryAttempt, OutboxAlert, Outcome
from reporting_endpoint.storage.base import Storage

log = logging.getLogger("reporting_endpoint.alerts")

# Outbox rows one sender holds at once (delivered concurrently).
CLAIM_BATCH = 100
# Finished alerts and their delivery log are kept this long.
KEEP_HISTORY_MS = 30 * 86_400_000
PRUNE_EVERY_MS = 3_600_000
# The metrics label a channel by its kind, never by its name (which an operator chose).
CHANNEL_KINDS: dict[type, str] = {
    WebhookChannel: "webhook",
    SlackChannel: "slack",
    EmailChannel: "email",
}


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def backoff_ms(delivery: Delivery, attempt: int) -> int:
    """The wait after failed attempt ``attempt`` (1-based): doubling from the first wait up
    to the longest, with up to a tenth of jitter so many senders do not retry in step."""
    wait = min(delivery.retry_max_ms, delivery.retry_initial_ms * 2 ** min(attempt - 1, 40))
    return int(wait * (1 + random.random() / 10))


def next_step(
    delivery: Delivery, alert: OutboxAlert, result: Result, now_ms: int
) -> tuple[Outcome, int]:
    """What follows an attempt: the outcome and when the row is due again."""
    attempt = alert.attempts + 1
    if result.ok:
        return "delivered", now_ms
    due = now_ms + backoff_ms(delivery, attempt)
    if attempt >= delivery.max_attempts or due - alert.created_at > delivery.give_up_after_ms:
        return "failed", now_ms
    return "retry", due


def receiver_down(result: Result) -> bool:
    """A failure that says the receiver, not this alert, is the trouble: no answer, 5xx, 429."""
    code = result.status_code
    return not result.ok and (code is None or code >= 500 or code == 429)


class Sender:
    def __init__(self, storage: Storage, config: AlertConfig, owner: str) -> None:
        self.storage = storage
        self.config = config
        self.owner = owner
        self.channels = Channels(config.delivery.timeout_ms)
        # Long enough for a delivery that runs into its timeout (an SMTP exchange has a few).
        self.lease_ms = 3 * config.delivery.timeout_ms + 5_000
        # Channels whose receiver is down: (failures in a row, when to probe it again).
        self.down: dict[str, tuple[int, int]] = {}

    async def run_once(self) -> int:
        """Deliver the rows due now; answers how many attempts were made.

        A channel whose receiver is down gets one probe at a time, spaced by the backoff,
        instead of an attempt per alert: a dead receiver costs next to nothing while the
        alerts for it wait, untried (so their attempts are not used up), until it answers.
        """
        now = _now_ms()
        down = sorted(self.down)
        claimed = list(
            await self.storage.claim_alerts(
                self.owner, CLAIM_BATCH, self.lease_ms, now, exclude=down
            )
        )
        for name in down:
            if self.down[name][1] <= now:
                claimed += await self.storage.claim_alerts(
                    self.owner, 1, self.lease_ms, now, channel=name
                )
        if claimed:
            results = await asyncio.gather(*(self._deliver(alert) for alert in claimed))
            for alert, (_, result) in zip(claimed, results, strict=True):
                if self.config.channel(alert.channel) is not None:
                    self._note(alert.channel, result)
            # One transaction for the round: the writer gets one small job per round.
            await self.storage.record_deliveries([attempt for attempt, _ in results])
        return len(claimed)

    def _note(self, channel: str, result: Result) -> None:
        if result.ok:
            self.down.pop(channel, None)
        elif receiver_down(result):
            failures = self.down.get(channel, (0, 0))[0] + 1
            self.down[channel] = (failures, _now_ms() + backoff_ms(self.config.delivery, failures))

    async def _deliver(self, alert: OutboxAlert) -> tuple[DeliveryAttempt, Result]:
        channel = self.config.channel(alert.channel)
        started = time.monotonic()
        if channel is None:
            result = Result(False, None, f"no channel named {alert.channel!r} in the rules")
        else:
            try:
                # One bound for the whole attempt: the clients' timeouts are per phase (an
                # SMTP exchange has several), and an attempt that outlived its lease would
                # be claimed and sent again by another sender.
                async with asyncio.timeout(2 * self.config.delivery.timeout_ms / 1000):
                    result = await self.channels.send(
                        channel, orjson.loads(alert.payload), alert.key
                    )
            except TimeoutError:
                result = Result(False, None, "the attempt took longer than twice the timeout")
        now = _now_ms()
        outcome, due = next_step(self.config.delivery, alert, result, now)
        if channel is None:
            outcome, due = "failed", now
        attempt = DeliveryAttempt(
            outbox_id=alert.id,
            attempt=alert.attempts + 1,
            at=now,
            outcome=outcome,
            status_code=result.status_code,
            error=result.error,
            duration_ms=int((time.monotonic() - started) * 1000),
            next_attempt_at=due,
        )
        if outcome in ("delivered", "failed"):
            # Final outcomes only: a retry still to come is neither sent nor failed yet.
            metrics.alert_delivery(
                CHANNEL_KINDS.get(type(channel), "unknown"),
                "sent" if outcome == "delivered" else "failed",
            )
        if outcome != "delivered":
            # A dead receiver fails every attempt: only the final failure is a warning.
            log.log(
                logging.WARNING if outcome == "failed" else logging.INFO,
                "alert %s to %s: attempt %d %s (%s)",
                alert.key, alert.channel, attempt.attempt, outcome, result.error,
            )  # fmt: skip
        return attempt, result

    async def close(self) -> None:
        await self.channels.close()


class AlertService:
    """The evaluator and sender loops of one process (each worker runs its own)."""

    def __init__(self, storage: Storage, config: AlertConfig, public_url: str | None) -> None:
        self.storage = storage
        self.config = config
        self.evaluator = Evaluator(storage, config, public_url)
        owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.sender = Sender(storage, config, owner)
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._evaluate_loop(), name="alerts-evaluator"),
            asyncio.create_task(self._send_loop(), name="alerts-sender"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self.sender.close()

    async def _evaluate_loop(self) -> None:
        delivery = self.config.delivery
        counters_due = 0
        prune_due = _now_ms() + PRUNE_EVERY_MS
        # Without rules only the events are consumed (so they never pile up), at the slow pace.
        interval = delivery.poll_interval_ms if self.config.rules else delivery.evaluate_interval_ms
        while True:
            try:
                now = _now_ms()
                await self.evaluator.events(now)
                if self.config.rules and now >= counters_due:
                    counters_due = now + delivery.evaluate_interval_ms
                    await self.evaluator.counters(now)
                if now >= prune_due:
                    prune_due = now + PRUNE_EVERY_MS
                    await self.storage.prune_alerts(now - KEEP_HISTORY_MS)
            except Exception:
                # Storage busy or down, a bug: log it and try again next round; alerts wait.
                log.exception("alert evaluation failed; retrying")
            await asyncio.sleep(interval / 1000)

    async def _send_loop(self) -> None:
        # Without channels nothing can be sent: the outbox waits (no write every poll).
        if not self.config.channels:
            return
        while True:
            try:
                sent = await self.sender.run_once()
            except Exception:
                log.exception("alert delivery round failed; retrying")
                sent = 0
            # A full round may mean more are due: go on at once, but yield to ingest first.
            await asyncio.sleep(
                self.config.delivery.poll_interval_ms / 1000 if sent < CLAIM_BATCH else 0
            )
