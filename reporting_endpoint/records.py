"""Frozen records that cross from the parsing boundary into storage."""

from __future__ import annotations

from dataclasses import dataclass


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

    def row(self) -> tuple[object, ...]:
        """Column values in INSERT order (dataclasses.astuple deep-copies: 20x slower)."""
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
        )
