"""Alert rules as data: channels, rules and delivery limits read from TOML or JSON at start.

The file is checked when it is loaded, so a typo stops the service at start with a message
naming the file, the rule (1-based position and name) or channel, and the problem, e.g.
``alerts.toml: rule 2 ("storm"): events: must be a positive integer``. README "Alerts" is the
reference for every key; the channels are parsed in ``destinations.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from reporting_endpoint.alerts.destinations import (
    AlertRulesError,
    Channel,
    EmailChannel,
    SlackChannel,
    WebhookChannel,
    http_url,
    known,
    parse_channel,
    text,
)

Trigger = Literal["new_issue", "regressed", "threshold", "rate", "digest"]
TRIGGERS: tuple[Trigger, ...] = ("new_issue", "regressed", "threshold", "rate", "digest")
ISSUE_TRIGGERS = frozenset({"new_issue", "regressed", "threshold"})
FILTER_FIELDS = ("kind", "site", "release", "reason")
# Hours a threshold or rate window may span: the hourly counters reach that far back cheaply.
MAX_WINDOW_HOURS = 24 * 7
MAX_BASELINE_HOURS = 24 * 28
MAX_RULES = 100
MAX_CHANNELS = 20
_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d)?\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_CLOCK = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


@dataclass(frozen=True, slots=True)
class Filter:
    """Exact values per field (empty: any); a rule matches when every given field does."""

    kind: tuple[str, ...] = ()
    site: tuple[str, ...] = ()
    release: tuple[str, ...] = ()
    reason: tuple[str, ...] = ()

    def matches(self, issue: Mapping[str, Any], reason: str | None = None) -> bool:
        """Whether an issue (as the storage answers it; its release is the newest seen) and
        the reason of its latest event pass."""
        checks = (
            (self.kind, issue.get("kind")),
            (self.site, issue.get("site")),
            (self.release, issue.get("last_release")),
            (self.reason, reason),
        )
        return all(not wanted or value in wanted for wanted, value in checks)


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    trigger: Trigger
    channels: tuple[str, ...]
    filter: Filter = Filter()
    throttle_ms: int = 3_600_000
    # "issue": one alert per issue (or type, for rate) per throttle; "rule": one per rule.
    throttle_by: str = "issue"
    events: int = 0  # threshold: more than this many events in the window
    window_hours: int = 1  # threshold, rate
    factor: float = 0.0  # rate: this many times the baseline's hourly mean
    baseline_hours: int = 168
    min_events: int = 10  # rate: never below this many events in the window
    digest_minute: int = 9 * 60  # digest: minutes after midnight UTC
    top: int = 10  # digest: how many top issues


@dataclass(frozen=True, slots=True)
class Delivery:
    """Retries with exponential backoff, bounded in count and in time; then failed."""

    retry_initial_ms: int = 30_000
    retry_max_ms: int = 3_600_000
    max_attempts: int = 12
    give_up_after_ms: int = 86_400_000
    timeout_ms: int = 10_000
    poll_interval_ms: int = 2_000
    evaluate_interval_ms: int = 60_000


@dataclass(frozen=True, slots=True)
class AlertConfig:
    rules: tuple[Rule, ...] = ()
    channels: tuple[Channel, ...] = ()
    delivery: Delivery = Delivery()

    def channel(self, name: str) -> Channel | None:
        return next((c for c in self.channels if c.name == name), None)

    @classmethod
    def default(cls, webhook_url: str, secret: str | None) -> AlertConfig:
        """The rules of a deployment without a rules file: new issues and regressions to
        the one signed webhook of ``webhook_url``."""
        channel = WebhookChannel("webhook", http_url(webhook_url, "webhook_url"), secret)
        return cls(
            rules=(
                Rule("new-issue", "new_issue", (channel.name,)),
                Rule("regression", "regressed", (channel.name,)),
            ),
            channels=(channel,),
        )

    @classmethod
    def load(
        cls, path: Path, env: Mapping[str, str] | None = None, extra: Sequence[Channel] = ()
    ) -> AlertConfig:
        """Read and check a rules file; ``extra`` channels (the ``webhook_url`` one) can be
        named by its rules too."""
        try:
            text = path.read_bytes()
        except OSError as exc:
            raise AlertRulesError(
                f"{path}: cannot read the rules file: {exc.strerror or exc}"
            ) from None
        try:
            if path.suffix == ".json":
                data = json.loads(text)
            elif path.suffix == ".toml":
                data = tomllib.loads(text.decode("utf-8"))
            else:
                raise AlertRulesError(f"{path}: a rules file ends in .toml or .json")
        except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AlertRulesError(f"{path}: not valid {path.suffix[1:].upper()}: {exc}") from None
        try:
            return parse(data, os.environ if env is None else env, extra)
        except AlertRulesError as exc:
            raise AlertRulesError(f"{path}: {exc}") from None


def parse(data: object, env: Mapping[str, str], extra: Sequence[Channel] = ()) -> AlertConfig:
    if not isinstance(data, dict):
        raise AlertRulesError("the file must hold a table with 'rule' and 'channels'")
    known(data, {"rule", "channels", "delivery"}, "")
    raw_channels = data.get("channels", {})
    if not isinstance(raw_channels, dict):
        raise AlertRulesError("channels: must be a table of named channels")
    if len(raw_channels) > MAX_CHANNELS:
        raise AlertRulesError(f"channels: at most {MAX_CHANNELS}")
    channels = {c.name: c for c in extra}
    for name, spec in raw_channels.items():
        channels[name] = parse_channel(name, spec, env)
    raw_rules = data.get("rule", [])
    if not isinstance(raw_rules, list) or not raw_rules:
        raise AlertRulesError("'rule' must be a non-empty list of rules ([[rule]] in TOML)")
    if len(raw_rules) > MAX_RULES:
        raise AlertRulesError(f"at most {MAX_RULES} rules")
    rules: list[Rule] = []
    for position, spec in enumerate(raw_rules, 1):
        label = f"rule {position}"
        if isinstance(spec, dict) and isinstance(spec.get("name"), str):
            label += f" ({spec['name']!r})".replace("'", '"')
        try:
            rule = _rule(position, spec, channels)
        except AlertRulesError as exc:
            raise AlertRulesError(f"{label}: {exc}") from None
        if any(r.name == rule.name for r in rules):
            raise AlertRulesError(f"{label}: name: another rule has the name {rule.name!r}")
        rules.append(rule)
    delivery = _delivery(data.get("delivery", {}))
    return AlertConfig(tuple(rules), tuple(channels.values()), delivery)


def duration_ms(value: object, key: str) -> int:
    """Seconds as a number, or text with a unit: ``500ms``, ``30s``, ``5m``, ``1h``, ``7d``."""
    if isinstance(value, bool):
        raise AlertRulesError(f"{key}: must be a duration like 30s, 5m, 1h or a number of seconds")
    if isinstance(value, int | float) and value >= 0:
        return int(value * 1000)
    match = _DURATION.match(value) if isinstance(value, str) else None
    if match is None:
        raise AlertRulesError(f"{key}: must be a duration like 30s, 5m, 1h or a number of seconds")
    return int(match.group(1)) * _UNIT_MS[match.group(2) or "s"]


def _hours(spec: Mapping[str, Any], key: str, default: int, most: int) -> int:
    if key not in spec:
        return default
    ms = duration_ms(spec[key], key)
    if ms % 3_600_000 or not 0 < ms // 3_600_000 <= most:
        raise AlertRulesError(f"{key}: must be whole hours, 1h to {most}h (counts are hourly)")
    return ms // 3_600_000


def _positive(spec: Mapping[str, Any], key: str, default: float, *, integer: bool = True) -> Any:
    value = spec.get(key, default)
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value <= 0:
        raise AlertRulesError(f"{key}: must be a positive {'integer' if integer else 'number'}")
    return value


def _filter(spec: object, trigger: str) -> Filter:
    if not isinstance(spec, dict):
        raise AlertRulesError("filter: must be a table")
    known(spec, set(FILTER_FIELDS), "filter: ")
    values: dict[str, tuple[str, ...]] = {}
    for key, value in spec.items():
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items or not all(isinstance(v, str) for v in items):
            raise AlertRulesError(f"filter: {key}: must be a string or a list of strings")
        values[key] = tuple(items)
    result = Filter(**values)
    if trigger == "digest" and spec:
        raise AlertRulesError("filter: a digest covers every issue (no filter)")
    if trigger == "rate":
        if not result.kind:
            raise AlertRulesError("filter: kind: a rate rule names the report types it watches")
        if result.release or len(result.site) > 1 or len(result.reason) > 1:
            raise AlertRulesError("filter: a rate rule takes kind, one site and one reason")
    return result


_RULE_KEYS = {
    "name", "trigger", "channels", "filter", "throttle", "throttle_by", "events", "window",
    "factor", "baseline", "min_events", "at", "top",
}  # fmt: skip
_TRIGGER_KEYS: dict[str, set[str]] = {
    "new_issue": set(), "regressed": set(), "threshold": {"events", "window"},
    "rate": {"factor", "window", "baseline", "min_events"}, "digest": {"at", "top"},
}  # fmt: skip


def _rule(position: int, spec: object, channels: Mapping[str, Channel]) -> Rule:
    if not isinstance(spec, dict):
        raise AlertRulesError("must be a table")
    known(spec, _RULE_KEYS, "")
    name = text(spec, "name", required=False) or f"rule {position}"
    trigger = spec.get("trigger")
    if trigger not in TRIGGERS:
        raise AlertRulesError(f"trigger: must be one of {', '.join(TRIGGERS)}")
    common = {"name", "trigger", "channels", "filter", "throttle", "throttle_by"}
    extra = sorted(set(spec) - common - _TRIGGER_KEYS[trigger])
    if extra:
        raise AlertRulesError(f"{extra[0]}: not a key of a {trigger} rule")
    named = spec.get("channels")
    if not isinstance(named, list) or not named or not all(isinstance(c, str) for c in named):
        raise AlertRulesError("channels: must be a non-empty list of channel names")
    for channel in named:
        if channel not in channels:
            raise AlertRulesError(f"channels: no channel named {channel!r}")
    throttle_by = spec.get("throttle_by", "issue")
    if throttle_by not in {"issue", "rule"}:
        raise AlertRulesError("throttle_by: must be issue or rule")
    rule = Rule(
        name=name,
        trigger=trigger,
        channels=tuple(dict.fromkeys(named)),
        filter=_filter(spec.get("filter", {}), trigger),
        throttle_ms=duration_ms(spec.get("throttle", "1h"), "throttle"),
        throttle_by=throttle_by,
        window_hours=_hours(spec, "window", 1, MAX_WINDOW_HOURS),
        baseline_hours=_hours(spec, "baseline", 168, MAX_BASELINE_HOURS),
        top=_positive(spec, "top", 10),
        min_events=_positive(spec, "min_events", 10),
    )
    if trigger == "threshold":
        if "events" not in spec:
            raise AlertRulesError("events: a threshold rule needs events (more than N)")
        rule = _replace(rule, events=_positive(spec, "events", 1))
    if trigger == "rate":
        if "factor" not in spec:
            raise AlertRulesError("factor: a rate rule needs factor (K times the usual rate)")
        rule = _replace(rule, factor=float(_positive(spec, "factor", 1, integer=False)))
    if trigger == "digest":
        clock = spec.get("at", "09:00")
        match = _CLOCK.match(clock) if isinstance(clock, str) else None
        if match is None:
            raise AlertRulesError("at: must be a UTC time of day like 09:00")
        rule = _replace(rule, digest_minute=int(match.group(1)) * 60 + int(match.group(2)))
        if rule.top > 100:
            raise AlertRulesError("top: at most 100")
    return rule


def _replace(rule: Rule, **changes: Any) -> Rule:
    return dataclasses.replace(rule, **changes)


def _delivery(spec: object) -> Delivery:
    if not isinstance(spec, dict):
        raise AlertRulesError("delivery: must be a table")
    keys = {
        "retry_initial": "retry_initial_ms", "retry_max": "retry_max_ms",
        "give_up_after": "give_up_after_ms", "timeout": "timeout_ms",
        "poll_interval": "poll_interval_ms", "evaluate_interval": "evaluate_interval_ms",
    }  # fmt: skip
    known(spec, {*keys, "max_attempts"}, "delivery: ")
    values: dict[str, int] = {}
    try:
        for key, attribute in keys.items():
            if key in spec:
                values[attribute] = duration_ms(spec[key], key)
                if values[attribute] <= 0:
                    raise AlertRulesError(f"{key}: must be positive")
        if "max_attempts" in spec:
            values["max_attempts"] = _positive(spec, "max_attempts", 1)
    except AlertRulesError as exc:
        raise AlertRulesError(f"delivery: {exc}") from None
    return Delivery(**values)


__all__ = [
    "AlertConfig", "AlertRulesError", "Channel", "Delivery", "EmailChannel", "Filter", "Rule",
    "SlackChannel", "WebhookChannel", "duration_ms", "parse",
]  # fmt: skip
