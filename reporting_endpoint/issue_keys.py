"""The issue of an event, as the service computes it: fingerprint rules first, then the
defaults (``issues.rules``), turned into the ``IssueKey`` the storage counts events under.

The ingest computes a report's fingerprint itself (``reports.normalised``, on the hot path,
from the body it already parsed); the analyzer a native crash's once its dump is parsed; and
``regroup`` recomputes both from stored rows, as the storage answers them. The functions for
stored rows live here so that ``regroup`` and the live path cannot drift apart: both end in
the same ``RuleSet`` calls on the same records.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import orjson

from reporting_endpoint.issues.rules import RuleSet
from reporting_endpoint.records import IssueKey, NewCrash, NewReport


def crash_issue_key(rules: RuleSet, crash: NewCrash, signature: str | None) -> IssueKey:
    """A native crash's issue once its dump is parsed (a crash has no site)."""
    fingerprint = rules.crash_fingerprint(crash, signature)
    return IssueKey(fingerprint.hash, fingerprint.kind, fingerprint.title, None)


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _texts(value: object) -> dict[str, str]:
    # Annotations and query were stored from text form parts; anything else (a row written by
    # another tool) is left out rather than failing the whole regroup.
    if not isinstance(value, Mapping):
        return {}
    return {str(k): v for k, v in value.items() if isinstance(v, str)}


def stored_report(row: Mapping[str, Any]) -> tuple[NewReport, dict[str, Any]]:
    """A report as ``get_report`` answers it (``raw`` included), back as the record the ingest
    built, and its body. Times are not part of a fingerprint and are left at 0."""
    raw = row.get("raw")
    body = row.get("body")
    if not isinstance(body, dict):
        body = raw.get("body") if isinstance(raw, dict) else None
    body = body if isinstance(body, dict) else {}
    raw_text = raw if isinstance(raw, str) else orjson.dumps(raw).decode()
    age = row.get("age")
    record = NewReport(
        received_at=0,
        generated_at=0,
        age=age if isinstance(age, int) else 0,
        type=_text(row.get("type")) or "",
        url=_text(row.get("url")) or "",
        origin=_text(row.get("origin")),
        site=_text(row.get("site")),
        user_agent=_text(row.get("user_agent")) or "",
        browser=_text(row.get("browser")),
        browser_major=_text(row.get("browser_major")),
        os=_text(row.get("os")),
        reason=_text(row.get("reason")),
        raw=raw_text,
    )
    return record, body


def stored_crash(row: Mapping[str, Any]) -> NewCrash:
    """A crash as ``get_crash`` answers it, back as the fields fingerprint rules read."""
    return NewCrash(
        id=_text(row.get("id")) or "",
        received_at=0,
        product=_text(row.get("product")),
        version=_text(row.get("version")),
        guid=_text(row.get("guid")),
        platform=_text(row.get("platform")),
        process_type=_text(row.get("process_type")),
        electron_version=_text(row.get("electron_version")),
        annotations=_texts(row.get("annotations")),
        query=_texts(row.get("query")),
        dump_sha256=_text(row.get("dump_sha256")) or "",
        dump_size=0,
        dump_path="",
        attachments=(),
        upload_bytes=0,
    )


def stored_report_key(rules: RuleSet) -> Callable[[Mapping[str, Any]], IssueKey]:
    """``regroup``'s function for reports: a stored report's issue under ``rules``."""

    def key(row: Mapping[str, Any]) -> IssueKey:
        record, body = stored_report(row)
        fingerprint = rules.report_fingerprint(record, body)
        return IssueKey(fingerprint.hash, fingerprint.kind, fingerprint.title, record.site)

    return key


def stored_crash_key(rules: RuleSet) -> Callable[[Mapping[str, Any]], IssueKey | None]:
    """``regroup``'s function for crashes: a parsed crash's issue under ``rules``; None for a
    crash whose dump is not parsed (it gets its issue when it is)."""

    def key(row: Mapping[str, Any]) -> IssueKey | None:
        if row.get("parse_status") != "parsed":
            return None
        return crash_issue_key(rules, stored_crash(row), _text(row.get("signature")))

    return key
