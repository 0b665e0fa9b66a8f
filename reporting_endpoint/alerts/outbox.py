"""The evaluator: turns what became true (new issues, regressions) and what the counters say
(thresholds, rates, the daily digest) into alerts in the outbox.

It runs beside the service, never on the ingest path: ingest only records a small event row
for a new issue or a regression in its own transaction. Here the events are matched against
the rules, throttled, rendered as a channel-neutral payload, and queued in one transaction
that also consumes the events and moves the throttles on (``Storage.queue_alerts``), so a
crash in between neither loses an alert nor queues one twice, however many processes run.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

from reporting_endpoint.alerts.rules import AlertConfig, Rule
from reporting_endpoint.storage.alert_store import AlertEvent, NewAlert
from reporting_endpoint.storage.base import IssueFilters, Storage
from reporting_endpoint.storage.filters import HOUR_MS, Filters
from reporting_endpoint.storage.rows import iso_time

# Events taken per round; the rest wait for the next one.
EVENT_BATCH = 200
# Issues a threshold rule looks at per round (largest window count first).
MAX_THRESHOLD_ISSUES = 1000
DAY_MS = 86_400_000
_HEADLINES = {"new_issue": "New issue", "regressed": "Regressed", "threshold": "Spike"}


def issue_path(issue_id: int) -> str:
    return f"/dashboard/issues/{issue_id}"


def issue_link(public_url: str | None, issue_id: int) -> str | None:
    """Where the dashboard shows the issue; None without ``public_url``."""
    return None if not public_url else public_url.rstrip("/") + issue_path(issue_id)


def _issue_summary(issue: Mapping[str, Any], public_url: str | None) -> dict[str, Any]:
    issue_id = int(issue["id"])
    summary: dict[str, Any] = {
        "id": issue_id,
        "title": issue.get("title"),
        "kind": issue.get("kind"),
        "site": issue.get("site"),
        "status": issue.get("status"),
        "count": issue.get("event_count", issue.get("count")),
        "first_release": issue.get("first_release"),
        "last_release": issue.get("last_release"),
        "link": issue_link(public_url, issue_id),
        "path": issue_path(issue_id),
    }
    for name in ("first_seen", "last_seen"):
        value = issue.get(name)
        summary[name] = iso_time(value) if isinstance(value, int) else value
    return summary


def new_alert(
    rule: Rule,
    scope: str,
    title: str,
    text: str,
    now_ms: int,
    *,
    issue: Mapping[str, Any] | None = None,
    public_url: str | None = None,
    event_id: int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> NewAlert:
    """One alert of ``rule``, to each of its channels with a key of its own (stable across
    retries: receivers drop repeats by it)."""
    summary = None if issue is None else _issue_summary(issue, public_url)
    payload: dict[str, Any] = {
        "rule": rule.name,
        "trigger": rule.trigger,
        "created_at": iso_time(now_ms),
        "title": title,
        "text": text,
        "link": None if summary is None else summary["link"],
        "path": None if summary is None else summary["path"],
        "issue": summary,
        **(extra or {}),
    }
    base = uuid.uuid4().hex
    return NewAlert(
        rule=rule.name,
        scope="rule" if rule.throttle_by == "rule" and rule.trigger != "digest" else scope,
        # A digest's scope is its day: the throttle only has to outlast that day.
        throttle_ms=DAY_MS if rule.trigger == "digest" else rule.throttle_ms,
        trigger=rule.trigger,
        issue_id=None if issue is None else int(issue["id"]),
        event_id=event_id,
        payload=orjson.dumps(payload).decode(),
        channels=tuple((channel, f"{base}-{n}") for n, channel in enumerate(rule.channels)),
    )


class Evaluator:
    """Matches rules; every method answers how many alerts it queued."""

    def __init__(self, storage: Storage, config: AlertConfig, public_url: str | None) -> None:
        self.storage = storage
        self.config = config
        self.public_url = public_url

    async def _reason(self, issue_id: int) -> str | None:
        # Issues keep no reason; their latest event has it (a read, only for rules that ask).
        page = await self.storage.issue_events(issue_id, 1)
        reason = page.items[0].get("reason") if page.items else None
        return reason if isinstance(reason, str) else None

    async def events(self, now_ms: int) -> int:
        """Consume recorded new issues and regressions, queueing the alerts they match."""
        events = await self.storage.alert_events(EVENT_BATCH)
        if not events:
            return 0
        alerts: list[NewAlert] = []
        for event in events:
            alerts.extend(await self._event_alerts(event, now_ms))
        return await self.storage.queue_alerts(alerts, [e.id for e in events], now_ms)

    async def _event_alerts(self, event: AlertEvent, now_ms: int) -> list[NewAlert]:
        rules = [r for r in self.config.rules if r.trigger == event.trigger]
        if event.issue is None or not rules:
            return []
        issue = event.issue
        reason = None
        if any(rule.filter.reason for rule in rules):
            reason = await self._reason(event.issue_id)
        headline = _HEADLINES[event.trigger]
        text = f"{issue.get('kind')} on {issue.get('site') or 'no site'}: " + (
            f"{issue.get('event_count')} events so far"
            if event.trigger == "new_issue"
            else f"a new event after it was resolved ({issue.get('event_count')} in all)"
        )
        return [
            new_alert(
                rule,
                f"issue:{event.issue_id}",
                f"{headline}: {issue.get('title')}",
                text,
                now_ms,
                issue=issue,
                public_url=self.public_url,
                event_id=event.id,
            )
            for rule in rules
            if rule.filter.matches(issue, reason)
        ]

    async def counters(self, now_ms: int) -> int:
        """Threshold, rate and digest rules, from the hourly counters."""
        alerts: list[NewAlert] = []
        for rule in self.config.rules:
            if rule.trigger == "threshold":
                alerts.extend(await self._threshold(rule, now_ms))
            elif rule.trigger == "rate":
                alerts.extend(await self._rate(rule, now_ms))
            elif rule.trigger == "digest":
                alerts.extend(await self._digest(rule, now_ms))
        return await self.storage.queue_alerts(alerts, (), now_ms) if alerts else 0

    async def _threshold(self, rule: Rule, now_ms: int) -> list[NewAlert]:
        f = rule.filter
        # Throttled issues are left out by the read itself: a storm that goes on costs one
        # query per round, not a throttle check per issue in the writer.
        issues = await self.storage.issues_over(
            rule.name,
            rule.throttle_by == "rule",
            now_ms - rule.window_hours * HOUR_MS,
            rule.events,
            now_ms,
            kind=f.kind[0] if len(f.kind) == 1 else None,
            site=f.site[0] if len(f.site) == 1 else None,
            limit=MAX_THRESHOLD_ISSUES,
        )
        alerts: list[NewAlert] = []
        for issue in issues:
            reason = await self._reason(int(issue["id"])) if f.reason else None
            if not f.matches(issue, reason):
                continue
            count = int(issue["window_count"])
            text = f"{count} events in the last {rule.window_hours} h (more than {rule.events})"
            alerts.append(
                new_alert(
                    rule, f"issue:{issue['id']}", f"Spike: {issue.get('title')}", text, now_ms,
                    issue=issue, public_url=self.public_url,
                    extra={"window": {"hours": rule.window_hours, "count": count,
                                      "threshold": rule.events}},
                )
            )  # fmt: skip
        return alerts

    async def _rate(self, rule: Rule, now_ms: int) -> list[NewAlert]:
        hour = now_ms // HOUR_MS
        first_window_hour = hour - rule.window_hours + 1
        first_baseline_hour = first_window_hour - rule.baseline_hours
        alerts: list[NewAlert] = []
        for kind in rule.filter.kind:
            equal = [("type", kind)]
            if rule.filter.site:
                equal.append(("site", rule.filter.site[0]))
            if rule.filter.reason:
                equal.append(("reason", rule.filter.reason[0]))
            series = await self.storage.timeseries(
                "reports",
                "hour",
                (),
                Filters(tuple(equal), first_baseline_hour * HOUR_MS, (hour + 1) * HOUR_MS),
            )
            current = sum(s.count for s in series if s.bucket >= first_window_hour)
            baseline = sum(s.count for s in series if s.bucket < first_window_hour)
            usual = baseline / rule.baseline_hours * rule.window_hours
            if current < rule.min_events or current <= rule.factor * usual:
                continue
            text = (
                f"{current} {kind} reports in the last {rule.window_hours} h, usually"
                f" {usual:.1f} ({rule.factor:g} times is the limit)"
            )
            alerts.append(
                new_alert(
                    rule, f"kind:{kind}", f"Surge of {kind} reports", text, now_ms,
                    extra={"window": {"hours": rule.window_hours, "count": current,
                                      "usual": round(usual, 3), "factor": rule.factor,
                                      "kind": kind}},
                )
            )  # fmt: skip
        return alerts

    async def _digest(self, rule: Rule, now_ms: int) -> list[NewAlert]:
        day = datetime.fromtimestamp(now_ms / 1000, UTC)
        if day.hour * 60 + day.minute < rule.digest_minute:
            return []
        since = now_ms - DAY_MS
        window = IssueFilters(since=since, until=now_ms)
        top = await self.storage.issues_page(window, "count", rule.top)
        newest = await self.storage.issues_page(window, "first_seen", 200)
        regressed = await self.storage.issues_page(
            IssueFilters(status="regressed", since=since, until=now_ms), "last_seen", 200
        )
        sections = {
            "new": [i for i in newest.items if _after(i.get("first_seen"), since)][: rule.top],
            "regressed": list(regressed.items[: rule.top]),
            "top": list(top.items),
        }
        digest = {name: [self._digest_item(i) for i in items] for name, items in sections.items()}
        text = (
            f"The last 24 hours: {len(digest['new'])} new, {len(digest['regressed'])}"
            f" regressed, the top {len(digest['top'])} issues below"
        )
        title = f"Daily digest {day.date().isoformat()}"
        return [
            new_alert(
                rule, f"day:{day.date().isoformat()}", title, text, now_ms, extra={"digest": digest}
            )
        ]

    def _digest_item(self, issue: Mapping[str, Any]) -> dict[str, Any]:
        issue_id = int(issue["id"])
        return {
            "id": issue_id,
            "title": issue.get("title"),
            "count": issue.get("window_count", issue.get("count")),
            "link": issue_link(self.public_url, issue_id),
            "path": issue_path(issue_id),
        }


def _after(value: object, since: int) -> bool:
    if isinstance(value, int):
        return value >= since
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1000 >= since
        except ValueError:
            return False
    return False
