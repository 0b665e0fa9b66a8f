"""Parsed query filters and keyset positions as plain data: what to match, never how.

Parameter parsing (``reporting_endpoint.params``) builds these; each backend translates them
into its own query language, and checks every name against the dimensions below before it
puts one into a statement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# What report groups can be keyed by and filtered on (the roll-up key, in this order).
REPORT_DIMENSIONS = (
    "type", "site", "origin", "browser", "browser_major", "os", "reason", "user_agent",
)  # fmt: skip
# Crashpad uploads: few enough to group straight from their table (indexed on the usual key).
CRASH_DIMENSIONS = (
    "product", "version", "platform", "process_type", "signature", "os", "cpu",
    "exception_name", "electron_version", "main_module", "crash_module", "parse_status",
)  # fmt: skip
CRASH_DEFAULT_BY = ("product", "version", "platform", "process_type", "signature")
# Reports refused at ingest, kept in the bounded quarantine.
QUARANTINE_DIMENSIONS = ("code", "type")

Source = Literal["reports", "crashes"]
Bucket = Literal["hour", "day"]
HOUR_MS = 3_600_000
BUCKET_HOURS: dict[str, int] = {"hour": 1, "day": 24}


@dataclass(frozen=True, slots=True)
class Filters:
    """Exact matches on dimensions, and a received-time window [since, until) in ms."""

    equal: tuple[tuple[str, str], ...] = ()
    since: int | None = None
    until: int | None = None

    def names(self) -> set[str]:
        return {name for name, _ in self.equal}

    def check(self, dimensions: tuple[str, ...]) -> None:
        """Refuse a name that is not one of ``dimensions`` (backends call it before building
        a statement: the names become column names)."""
        unknown = self.names() - set(dimensions)
        if unknown:
            raise ValueError(f"no such dimension: {sorted(unknown)[0]!r}")


@dataclass(frozen=True, slots=True)
class Position:
    """Where a keyset page ended: the last row's received time and id (newest first)."""

    received_at: int
    id: int | str


def check_by(by: tuple[str, ...] | list[str], dimensions: tuple[str, ...]) -> None:
    """Refuse a group key that is not one of ``dimensions`` (they become column names)."""
    unknown = set(by) - set(dimensions)
    if unknown:
        raise ValueError(f"no such dimension: {sorted(unknown)[0]!r}")
