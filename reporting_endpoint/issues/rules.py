"""Fingerprint rules as data: ordered rules, read from TOML or JSON, tried before the defaults.

A rules file lists rules in order; the first rule whose every condition matches an event makes
its fingerprint, and an event no rule matches gets the default fingerprint
(`reporting_endpoint.issues.fingerprint`). The file is validated when it is loaded (at
startup), so a typo fails the start with a message naming the rule, not a report later.

TOML (``rules.toml``)::

    # Every OOM crash in the checkout is one issue, whatever the URL.
    [[rule]]
    name = "checkout-oom"
    fixed = "checkout-oom"
    title = "OOM in the checkout ({site})"
    [rule.match]  # the same as match = { type = "crash", ... } on one line
    type = "crash"
    reason = "oom"
    url = { glob = "https://shop.example.com/checkout/*" }

    # Deprecations: one issue per feature across all sites (the default splits by site).
    [[rule]]
    match = { type = ["deprecation", "intervention"] }
    group_by = ["type", "body.id"]
    title = "{type}: {body.id}"

    # Native crashes in the GPU process: by signature only, whatever the product.
    [[rule]]
    match = { process_type = "gpu-process", signature = { regex = "^EXCEPTION_" } }
    group_by = ["signature"]

JSON (``rules.json``) is the same document: ``{"rule": [{"match": {...}, "fixed": "..."}]}``
(a bare array of rules is accepted too).

A rule has:

- ``match`` (required, not empty): field -> condition (TOML dotted keys work: ``body.id =
  "x"`` and ``"body.id" = "x"`` are the same). A condition is a string, integer or
  boolean (the field equals it, compared as text: ``true``/``false`` for booleans), a list of
  those (any of them), or a table with one key: ``glob`` (shell pattern over the whole value,
  ``*`` crosses ``/``), ``regex`` (Python ``re.search``) or ``exists`` (true/false). A field the
  event does not have matches only ``{ exists = false }``.
- exactly one of ``group_by`` (a non-empty list of fields whose values make the fingerprint)
  or ``fixed`` (a string: every matching event is one issue).
- ``title`` (optional): a template where ``{field}`` is the field's value; without it the
  default title is kept.
- ``name`` (optional): shown in errors and kept as ``Fingerprint.rule`` (else ``rule N``).

Fields of a W3C report: ``kind`` (= ``type``), ``type``, ``url`` (as stored), ``path`` (its
path shape, ids collapsed to ``*``), ``site``, ``origin``, ``reason``, ``browser``,
``browser_major``, ``os``, ``user_agent``, and ``body.<name>[.<name>...]`` (e.g. ``body.id``,
``body.crash_report_api.route``). Fields of a native crash: ``kind`` (``native``), ``product``,
``version``, ``platform``, ``process_type``, ``signature``, and ``annotations.<key>``. A rule
applies to reports or to native crashes according to its fields (``kind`` serves both);
mixing fields of both is an error.

The fingerprint's kind stays the event's kind (report type or ``native``), so a rule cannot
merge reports of different types into one issue: ``fixed = "x"`` on deprecations and on
interventions gives two issues. Changing the rules applies to new events; regrouping
recomputes stored ones.

Errors (`RulesError`) name the rule by its 1-based position and its name, e.g.
``rules.toml: rule 2 ("checkout-oom"): match: unknown field 'bdy.id'``.
"""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from reporting_endpoint.issues.fingerprint import (
    NATIVE,
    Fingerprint,
    crash_fingerprint,
    fingerprint_hash,
    path_shape,
    report_fingerprint,
)
from reporting_endpoint.records import NewCrash, NewReport

REPORT = "report"
CRASH = "crash"
REPORT_FIELDS = frozenset(
    {
        "kind", "type", "url", "path", "site", "origin", "reason", "browser", "browser_major",
        "os", "user_agent",
    }
)  # fmt: skip
CRASH_FIELDS = frozenset({"kind", "product", "version", "platform", "process_type", "signature"})
REPORT_PREFIX = "body."
CRASH_PREFIX = "annotations."
RULE_KEYS = frozenset({"name", "match", "group_by", "fixed", "title"})
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")

# An event as rules see it: a field name -> its value as text, None when absent.
Lookup = Callable[[str], "str | None"]


class RulesError(ValueError):
    """A rules file that cannot be used; the message says where and why."""


def _domains(field: str) -> frozenset[str]:
    """Which events (reports, crashes) have this field; empty when none does."""
    domains = set()
    if field in REPORT_FIELDS or (field.startswith(REPORT_PREFIX) and len(field) > 5):
        domains.add(REPORT)
    if field in CRASH_FIELDS or (field.startswith(CRASH_PREFIX) and len(field) > 12):
        domains.add(CRASH)
    return frozenset(domains)


def _as_text(value: object) -> str | None:
    """A field value as the text conditions compare with; containers as compact JSON."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


@dataclass(frozen=True, slots=True)
class Condition:
    """One field's test. Exactly one of ``values``, ``pattern`` or ``exists`` is in use."""

    field: str
    values: frozenset[str] | None = None
    pattern: re.Pattern[str] | None = None
    exists: bool | None = None

    def matches(self, value: str | None) -> bool:
        if self.exists is not None:
            return (value is not None) is self.exists
        if value is None:
            return False
        if self.values is not None:
            return value in self.values
        assert self.pattern is not None
        return self.pattern.search(value) is not None


@dataclass(frozen=True, slots=True)
class Rule:
    """One validated rule."""

    index: int
    name: str
    domain: str
    conditions: tuple[Condition, ...]
    group_by: tuple[str, ...]
    fixed: str | None
    title: str | None
    # The kinds (report types) an exact ``type``/``kind`` condition allows, None for any: a
    # set lookup skips most rules before any field is read.
    kinds: frozenset[str] | None = None

    def matches(self, lookup: Lookup) -> bool:
        # A plain loop: all() over a generator costs ~0.5 us more per rule on the hot path.
        for condition in self.conditions:  # noqa: SIM110
            if not condition.matches(lookup(condition.field)):
                return False
        return True

    def fingerprint(
        self, kind: str, lookup: Lookup, default_title: Callable[[], str]
    ) -> Fingerprint:
        if self.fixed is not None:
            parts: tuple[str, ...] = ("fixed", self.fixed)
        else:
            # Absent fields hash as "\x00" so that absent and "" stay apart.
            parts = (
                "fields",
                *(
                    f"{f}={v}" if (v := lookup(f)) is not None else f"{f}\x00"
                    for f in self.group_by
                ),
            )
        if self.title is None:
            title = default_title()
        else:
            title = _PLACEHOLDER.sub(lambda m: lookup(m.group(1)) or "", self.title)[:200]
        return Fingerprint(fingerprint_hash(kind, parts, source="rule"), kind, title, self.name)


class _Where:
    """Builds error messages that name the rule."""

    def __init__(self, source: str, index: int, name: str | None) -> None:
        self.prefix = f"{source}: rule {index}" + (f' ("{name}")' if name else "")

    def error(self, message: str) -> RulesError:
        return RulesError(f"{self.prefix}: {message}")


def _check_field(where: _Where, context: str, field: object) -> frozenset[str]:
    if not isinstance(field, str):
        raise where.error(f"{context}: a field name must be a string, not {field!r}")
    domains = _domains(field)
    if not domains:
        raise where.error(
            f"{context}: unknown field {field!r}; fields are "
            f"{', '.join(sorted(REPORT_FIELDS | CRASH_FIELDS))}, body.<name>, annotations.<key>"
        )
    return domains


def _condition(where: _Where, field: str, spec: object) -> Condition:
    context = f"match.{field}"
    scalar = (str, int, bool)
    if isinstance(spec, scalar) and not isinstance(spec, float):
        return Condition(field, values=frozenset({_as_text(spec) or ""}))
    if isinstance(spec, list):
        if not spec:
            raise where.error(f"{context}: an empty list matches nothing")
        bad = [item for item in spec if not isinstance(item, scalar)]
        if bad:
            raise where.error(
                f"{context}: list items must be strings, integers or booleans, not {bad[0]!r}"
            )
        return Condition(field, values=frozenset(_as_text(item) or "" for item in spec))
    if isinstance(spec, dict):
        if len(spec) != 1:
            raise where.error(
                f"{context}: a table needs exactly one of glob, regex, exists; got {sorted(spec)}"
            )
        ((op, argument),) = spec.items()
        if op == "exists":
            if not isinstance(argument, bool):
                raise where.error(f"{context}.exists: must be true or false, not {argument!r}")
            return Condition(field, exists=argument)
        if op in ("glob", "regex"):
            if not isinstance(argument, str):
                raise where.error(f"{context}.{op}: must be a string, not {argument!r}")
            source = fnmatch.translate(argument) if op == "glob" else argument
            try:
                pattern = re.compile(source)
            except re.error as exc:
                raise where.error(
                    f"{context}.regex: bad regular expression {argument!r}: {exc}"
                ) from None
            return Condition(field, pattern=pattern)
        raise where.error(f"{context}: unknown operator {op!r}; use glob, regex or exists")
    raise where.error(
        f"{context}: wrong type {type(spec).__name__}; use a string, integer, boolean, list or "
        "a table with glob, regex or exists"
    )


OPERATORS = frozenset({"glob", "regex", "exists"})


def _flattened(match: Mapping[str, object], prefix: str = "") -> list[tuple[str, object]]:
    """``match`` with TOML's dotted keys joined back: ``body.id = "x"`` parses as
    ``{"body": {"id": "x"}}``. A table whose keys are all operators is a condition, any other
    table under ``body``/``annotations`` a path."""
    items: list[tuple[str, object]] = []
    for key, spec in match.items():
        field = f"{prefix}{key}"
        nested = isinstance(spec, dict) and spec and not spec.keys() <= OPERATORS
        if nested and (prefix or field in ("body", "annotations")):
            assert isinstance(spec, dict)
            items.extend(_flattened(spec, field + "."))
        else:
            items.append((field, spec))
    return items


def _rule(source: str, index: int, data: object) -> Rule:
    if not isinstance(data, dict):
        raise _Where(source, index, None).error(
            f"a rule must be a table, not {type(data).__name__}"
        )
    name = data.get("name")
    where = _Where(source, index, name if isinstance(name, str) else None)
    if name is not None and (not isinstance(name, str) or not name):
        raise where.error("name: must be a non-empty string")
    unknown = sorted(set(data) - RULE_KEYS)
    if unknown:
        raise where.error(f"unknown key {unknown[0]!r}; a rule has {', '.join(sorted(RULE_KEYS))}")
    if not data.keys() - {"name"}:
        raise where.error("empty rule: it needs match and one of group_by or fixed")
    match = data.get("match")
    if match is None:
        raise where.error(
            "match: missing (a rule that matches everything would hide every default)"
        )
    if not isinstance(match, dict):
        raise where.error(
            f"match: must be a table of field = condition, not {type(match).__name__}"
        )
    if not match:
        raise where.error("match: empty (a rule that matches everything would hide every default)")
    domains = frozenset({REPORT, CRASH})
    conditions = []
    for field, spec in _flattened(match):
        domains &= _check_field(where, "match", field)
        conditions.append(_condition(where, field, spec))
    group_by, fixed = data.get("group_by"), data.get("fixed")
    if (group_by is None) == (fixed is None):
        raise where.error("needs exactly one of group_by (a list of fields) or fixed (a string)")
    if fixed is not None and (not isinstance(fixed, str) or not fixed):
        raise where.error(f"fixed: must be a non-empty string, not {fixed!r}")
    if group_by is not None:
        if not isinstance(group_by, list) or not group_by:
            raise where.error(f"group_by: must be a non-empty list of fields, not {group_by!r}")
        for field in group_by:
            domains &= _check_field(where, "group_by", field)
    title = data.get("title")
    if title is not None:
        if not isinstance(title, str) or not title:
            raise where.error(f"title: must be a non-empty string, not {title!r}")
        for field in _PLACEHOLDER.findall(title):
            domains &= _check_field(where, "title", field)
    if not domains:
        raise where.error("mixes fields of W3C reports and of native crashes; no event has both")
    kinds: frozenset[str] | None = None
    for condition in conditions:
        if condition.field in ("type", "kind") and condition.values is not None:
            kinds = condition.values if kinds is None else kinds & condition.values
    return Rule(
        kinds=kinds,
        index=index,
        name=name if isinstance(name, str) else f"rule {index}",
        # A rule whose fields all serve both (kind only) applies to both.
        domain=REPORT if domains == {REPORT} else CRASH if domains == {CRASH} else "any",
        conditions=tuple(conditions),
        group_by=tuple(group_by or ()),
        fixed=fixed,
        title=title,
    )


@dataclass(frozen=True, slots=True)
class RuleSet:
    """Validated rules in order; empty means the defaults only."""

    rules: tuple[Rule, ...] = ()

    @classmethod
    def from_data(cls, data: object, source: str = "rules") -> RuleSet:
        """Rules from a parsed document: ``{"rule": [...]}`` or a bare list of rules."""
        if isinstance(data, dict):
            unknown = sorted(set(data) - {"rule"})
            if unknown:
                raise RulesError(
                    f"{source}: unknown top-level key {unknown[0]!r}; rules go in [[rule]]"
                )
            data = data.get("rule", [])
        if not isinstance(data, list):
            raise RulesError(f"{source}: 'rule' must be a list of rules, not {type(data).__name__}")
        return cls(tuple(_rule(source, index, item) for index, item in enumerate(data, 1)))

    @classmethod
    def load(cls, path: Path) -> RuleSet:
        """Read and validate a ``.toml`` or ``.json`` rules file."""
        try:
            text = path.read_bytes()
        except OSError as exc:
            raise RulesError(f"{path}: cannot read the rules file: {exc.strerror or exc}") from None
        try:
            if path.suffix.lower() == ".json":
                data: object = json.loads(text)
            elif path.suffix.lower() == ".toml":
                data = tomllib.loads(text.decode("utf-8"))
            else:
                raise RulesError(f"{path}: a rules file ends in .toml or .json")
        except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RulesError(f"{path}: not valid {path.suffix[1:].upper()}: {exc}") from None
        return cls.from_data(data, str(path))

    def report_fingerprint(
        self, report: NewReport, body: Mapping[str, Any] | None = None
    ) -> Fingerprint:
        """The first matching rule's fingerprint of a W3C report, else the default."""
        if not self.rules:
            return report_fingerprint(report, body)
        if body is None:
            try:
                parsed = orjson.loads(report.raw).get("body")
            except (orjson.JSONDecodeError, AttributeError):
                parsed = None
            body = parsed if isinstance(parsed, dict) else {}
        lookup = _report_lookup(report, body)
        kind = report.type
        for rule in self.rules:
            if rule.kinds is not None and kind not in rule.kinds:
                continue
            if rule.domain != CRASH and rule.matches(lookup):
                return rule.fingerprint(
                    report.type, lookup, lambda: report_fingerprint(report, body).title
                )
        return report_fingerprint(report, body)

    def crash_fingerprint(self, crash: NewCrash, signature: str | None) -> Fingerprint:
        """The first matching rule's fingerprint of a native crash, else the default."""
        lookup = _crash_lookup(crash, signature)
        for rule in self.rules:
            if rule.kinds is not None and NATIVE not in rule.kinds:
                continue
            if rule.domain != REPORT and rule.matches(lookup):
                return rule.fingerprint(
                    NATIVE, lookup, lambda: crash_fingerprint(crash.product, signature).title
                )
        return crash_fingerprint(crash.product, signature)


def _body_value(body: Mapping[str, Any], path: Sequence[str]) -> object:
    value: object = body
    for name in path:
        if not isinstance(value, dict):
            return None
        value = value.get(name)
    return value


def _report_lookup(report: NewReport, body: Mapping[str, Any]) -> Lookup:
    def lookup(field: str) -> str | None:
        if field.startswith(REPORT_PREFIX):
            return _as_text(_body_value(body, field[len(REPORT_PREFIX) :].split(".")))
        if field == "kind":
            return report.type
        if field == "path":
            return path_shape(report.url)
        value = getattr(report, field, None) if field in REPORT_FIELDS else None
        return _as_text(value)

    return lookup


def _crash_lookup(crash: NewCrash, signature: str | None) -> Lookup:
    def lookup(field: str) -> str | None:
        if field.startswith(CRASH_PREFIX):
            return crash.annotations.get(field[len(CRASH_PREFIX) :])
        if field == "kind":
            return NATIVE
        if field == "signature":
            return signature
        return _as_text(getattr(crash, field, None)) if field in CRASH_FIELDS else None

    return lookup
