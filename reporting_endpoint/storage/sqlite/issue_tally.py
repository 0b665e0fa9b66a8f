"""Counting events into issues: what one report or crash adds to its issue's counters.

Pure (no SQL): ``issue_counts`` writes the tallies. Ingest takes ``tally_reports``, a fast
path over ``NewReport.row()`` tuples; every other path (deletion, prune, regroup, a parsed
crash) tallies rows read back from the tables with ``tally_report_event`` /
``tally_crash_event``. Both count the same values, so what ingest adds a deletion takes away
exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from reporting_endpoint.issues.fingerprint import path_shape
from reporting_endpoint.records import IssueKey
from reporting_endpoint.storage.filters import HOUR_MS
from reporting_endpoint.storage.issue_rows import (
    MAX_VALUE,
    bounded,
    crash_body_dims,
    crash_dims,
)

# Positions in a NewReport.row() tuple.
_FINGERPRINT, _TITLE, _RELEASE = 13, 14, 15
# The columns a report's tally reads, the same from a NewReport.row() and from the table.
REPORT_EVENT_COLUMNS = "received_at, type, url, browser, browser_major, os, raw, release"
CRASH_EVENT_COLUMNS = "received_at, os, release"


@dataclass(slots=True)
class Tally:
    """What a set of events adds to (or takes from) one issue."""

    key: IssueKey | None
    count: int = 0
    first: int = 0
    last: int = 0
    releases: set[str] = field(default_factory=set)
    hours: dict[int, int] = field(default_factory=dict)
    dims: dict[tuple[str, str], int] = field(default_factory=dict)

    def add(self, received: int, release: str | None, dims: Iterable[tuple[str, str]]) -> None:
        if self.count == 0 or received < self.first:
            self.first = received
        if self.count == 0 or received > self.last:
            self.last = received
        self.count += 1
        hour = received // HOUR_MS
        self.hours[hour] = self.hours.get(hour, 0) + 1
        if release is not None:
            self.releases.add(release)
        for dim in dims:
            self.dims[dim] = self.dims.get(dim, 0) + 1


def path_dim(url: object) -> tuple[str, str] | None:
    """The ``path`` breakdown value of a report's URL (``path_shape`` caches repeated URLs,
    and the fingerprint of a crash report computed the same shape moments before)."""
    if not isinstance(url, str) or not url:
        return None
    return ("path", path_shape(url)[:MAX_VALUE])


def _plain_dims(
    browser: object, major: object, os: object, release: object
) -> list[tuple[str, str]]:
    return [
        (name, value)
        for name, value in (
            ("browser", bounded(browser)),
            ("browser_major", bounded(major)),
            ("os", bounded(os)),
            ("release", bounded(release)),
        )
        if value is not None
    ]


def report_dims(
    kind: object, url: object, browser: object, major: object, os: object, raw: object,
    release: object,
) -> list[tuple[str, str]]:  # fmt: skip
    """The breakdown values of one report (values it lacks are left out)."""
    dims = _plain_dims(browser, major, os, release)
    path = path_dim(url)
    if path is not None:
        dims.append(path)
    if kind == "crash":
        dims.extend(crash_body_dims(raw))
    return dims


def tally_report_event(tally: Tally, event: Sequence[Any]) -> None:
    """Count one report given in ``REPORT_EVENT_COLUMNS`` order."""
    received, kind, url, browser, major, os, raw, release = event
    tally.add(int(received), release, report_dims(kind, url, browser, major, os, raw, release))


def tally_crash_event(tally: Tally, event: Sequence[Any]) -> None:
    """Count one crash given in ``CRASH_EVENT_COLUMNS`` order."""
    received, os, release = event
    tally.add(int(received), release, crash_dims(os, release))


def tally_reports(rows: Sequence[tuple[object, ...]]) -> dict[str, Tally]:
    """The rows' events per fingerprint (rows without one belong to no issue).

    The hot path of issues, so the loop calls no function per row: a few flat dict updates,
    and the breakdown values are cleaned (bounded, None left out, URL to path shape) once per
    distinct value at the end. It counts exactly what ``issue_counts.tally_report_event``
    counts (deletions use that one).
    """
    tallies: dict[str, Tally] = {}
    hours: dict[tuple[Any, int], int] = {}
    values: dict[tuple[Any, str, Any], int] = {}
    crash_raws: list[tuple[Any, Any]] = []
    for row in rows:
        fingerprint: Any = row[_FINGERPRINT]
        if not fingerprint:
            continue
        received: Any = row[0]
        tally = tallies.get(fingerprint)
        if tally is None:
            key = IssueKey(
                str(fingerprint), str(row[3]), str(row[_TITLE] or row[3]),
                row[6] if isinstance(row[6], str) else None,
            )  # fmt: skip
            tally = tallies[fingerprint] = Tally(key, 0, received, received)
        tally.count += 1
        if received < tally.first:
            tally.first = received
        elif received > tally.last:
            tally.last = received
        hour = (fingerprint, received // HOUR_MS)
        hours[hour] = hours.get(hour, 0) + 1
        for value in (
            (fingerprint, "browser", row[8]),
            (fingerprint, "browser_major", row[9]),
            (fingerprint, "os", row[10]),
            (fingerprint, "release", row[_RELEASE]),
            (fingerprint, "url", row[4]),
        ):
            values[value] = values.get(value, 0) + 1
        if row[3] == "crash":
            crash_raws.append((fingerprint, row[12]))
    for (fingerprint, hour_number), count in hours.items():
        tallies[fingerprint].hours[hour_number] = count
    for (fingerprint, dimension, value), count in values.items():
        if value is None or value == "":
            continue
        tally = tallies[fingerprint]
        if dimension == "url":
            dim = path_dim(value)
            if dim is None:
                continue
        elif isinstance(value, str) and len(value) <= MAX_VALUE:
            dim = (dimension, value)  # the common case, inline: no call per value
        else:
            dim = (dimension, str(value)[:MAX_VALUE])
        tally.dims[dim] = tally.dims.get(dim, 0) + count
        if dimension == "release":
            tally.releases.add(value)
    for fingerprint, raw in crash_raws:
        dims = tallies[fingerprint].dims
        for dim in crash_body_dims(raw):
            dims[dim] = dims.get(dim, 0) + 1
    return tallies
