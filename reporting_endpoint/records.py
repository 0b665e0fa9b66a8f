"""Frozen records that cross from the parsing boundary into storage."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class NewReport:
    """One validated, normalised W3C report, ready to be written.

    Times are milliseconds since the Unix epoch (UTC). ``raw`` is the report's JSON as stored:
    the browser's object with ``url`` replaced by the stored (privacy-stripped) URL.
    """

    received_at: int
    generated_at: int
    age: int
    type: str
    url: str
    origin: str | None
    site: str | None
    user_agent: str
    browser: str | None
    browser_major: str | None
    os: str | None
    reason: str | None
    raw: str
    # Issue 11, appended with defaults so records built outside ingest still construct; an
    # empty fingerprint means "no issue".
    fingerprint: str = ""
    issue_title: str = ""
    release: str | None = None

    def row(self) -> tuple[object, ...]:
        """Column values in the order every backend writes them (dataclasses.astuple deep-copies:
        20x slower). The issue columns come last, so the older positions never move."""
        return (
            self.received_at,
            self.generated_at,
            self.age,
            self.type,
            self.url,
            self.origin,
            self.site,
            self.user_agent,
            self.browser,
            self.browser_major,
            self.os,
            self.reason,
            self.raw,
            self.fingerprint,
            self.issue_title,
            self.release,
        )


# How many values of ``NewReport.row()`` predate issues (what a backend without the issue
# columns writes).
REPORT_BASE_WIDTH = 13


@dataclass(frozen=True, slots=True)
class RejectedReport:
    """One report the service refused, kept in quarantine so nothing a browser sent vanishes.

    ``raw`` is the report's JSON text (its ``url`` stripped like an accepted report's), cut to
    a bounded size; ``truncated`` says it was cut. ``type`` is the report's own ``type`` when
    it had a string one.
    """

    received_at: int
    code: str
    field: str
    message: str
    type: str | None
    raw: str
    truncated: bool

    def row(self) -> tuple[object, ...]:
        """Column values in the order every backend writes a quarantined report."""
        return (
            self.received_at,
            self.code,
            self.field,
            self.message,
            self.type,
            self.raw,
            int(self.truncated),
        )


@dataclass(frozen=True, slots=True)
class NewCrash:
    """A stored Crashpad upload, ready to be committed; its dump file already exists."""

    id: str
    received_at: int
    product: str | None
    version: str | None
    guid: str | None
    platform: str | None
    process_type: str | None
    electron_version: str | None
    annotations: dict[str, str]
    query: dict[str, str]
    dump_sha256: str
    dump_size: int
    dump_path: str
    attachments: tuple[dict[str, Any], ...]
    upload_bytes: int
    # Issue 11: the app's release (``_version`` / ``ver``), stored on the crash row at insert.
    release: str | None = None


@dataclass(frozen=True, slots=True)
class IssueKey:
    """Which issue an event belongs to: its fingerprint, and what a new issue is created with
    (the kind is the report type or ``native``; the title is for people)."""

    fingerprint: str
    kind: str
    title: str
    site: str | None
