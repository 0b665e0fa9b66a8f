"""Query parameters of the API and the CLI, parsed into plain data for the storage.

Times, limits, group keys, filters and cursors are checked here, each refusal a ``QueryError``
with a stable code; the storage gets a ``Filters`` and a ``Position`` and never sees a raw
parameter. Time series windows are filled here too, so every backend answers sparse counts.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from reporting_endpoint.storage.base import SeriesCount
from reporting_endpoint.storage.filters import (
    BUCKET_HOURS,
    HOUR_MS,
    REPORT_DIMENSIONS,
    Bucket,
    Filters,
    Position,
)
from reporting_endpoint.storage.rows import iso_time

DIMENSIONS = REPORT_DIMENSIONS  # what report groups can be keyed by and filtered on
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100

_RELATIVE = re.compile(r"^([0-9]{1,6})([smhdw])$")
# Whole numbers as this service writes them: ASCII digits only (str.isdigit() also takes "²",
# which int() refuses), short enough to fit a signed 64-bit database integer.
_INTEGER = re.compile(r"-?[0-9]{1,19}", re.ASCII)
_CRASH_ID = re.compile(r"[0-9a-f]{32}", re.ASCII)
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
# A time series answers every bucket of its window (zeros included), so the window is bounded.
MAX_BUCKETS = 10_000
MAX_POINTS = 100_000
_TOO_WIDE = "a time series holds at most {} buckets: narrow since/until or use bucket=day"
_UNIT_MS = {"s": 1000, "m": 60_000, "h": HOUR_MS, "d": 24 * HOUR_MS, "w": 7 * 24 * HOUR_MS}


class QueryError(ValueError):
    """A bad query parameter; ``code`` is the stable reason sent back."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def is_crash_id(value: str) -> bool:
    """A crash id as the service makes them: 32 lowercase hex digits (checked before any
    lookup, so an odd path segment is a 400, never a query)."""
    return len(value) == 32 and all(c in "0123456789abcdef" for c in value)


def parse_int(value: str, minimum: int = INT64_MIN, maximum: int = INT64_MAX) -> int | None:
    """A whole number in ASCII digits within [minimum, maximum], or None."""
    if not _INTEGER.fullmatch(value):
        return None
    number = int(value)
    return number if minimum <= number <= maximum else None


def parse_time(value: str, name: str, now: int | None = None) -> int:
    """``7d`` / ``24h`` / ``30m`` / ``90s`` / ``2w`` ago, or an ISO 8601 time (UTC if naive)."""
    text = value.strip()
    relative = _RELATIVE.match(text)
    if relative:
        return (now if now is not None else now_ms()) - int(relative.group(1)) * _UNIT_MS[
            relative.group(2)
        ]
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return int(moment.timestamp() * 1000)
    except (ValueError, OverflowError):
        raise QueryError(
            "invalid_time", f"{name} must be like 7d, 24h, 30m or an ISO 8601 time, not {value!r}"
        ) from None


def parse_limit(value: str | None, default: int = DEFAULT_LIMIT, maximum: int = MAX_LIMIT) -> int:
    if value is None or value == "":
        return default
    if parse_int(value, 1, maximum) is None:
        raise QueryError("invalid_limit", f"limit must be a whole number from 1 to {maximum}")
    return int(value)


def parse_by(
    value: str | None,
    default: Sequence[str] = ("type",),
    dimensions: Sequence[str] = DIMENSIONS,
) -> tuple[str, ...]:
    if value is None or not value.strip():
        return tuple(default)
    names = tuple(part.strip() for part in value.split(",") if part.strip())
    unknown = [name for name in names if name not in dimensions]
    if unknown or not names or len(set(names)) != len(names):
        raise QueryError(
            "invalid_by",
            f"by takes distinct names among {', '.join(dimensions)}; got {value!r}",
        )
    return names


def parse_filters(
    params: Mapping[str, str],
    now: int | None = None,
    dimensions: Sequence[str] = DIMENSIONS,
) -> Filters:
    """Exact matches on ``dimensions`` and the [since, until) window named in ``params``."""
    equal = tuple((name, params[name]) for name in dimensions if name in params)
    since = parse_time(params["since"], "since", now) if params.get("since") else None
    until = parse_time(params["until"], "until", now) if params.get("until") else None
    if since is not None and until is not None and since >= until:
        raise QueryError("invalid_time", "since must be before until")
    return Filters(equal, since, until)


def parse_bucket(value: str) -> Bucket:
    if value not in BUCKET_HOURS:
        raise QueryError("invalid_bucket", "bucket is hour or day")
    return cast(Bucket, value)


def bucket_hours(bucket: str) -> int:
    return BUCKET_HOURS[parse_bucket(bucket)]


@dataclass(frozen=True, slots=True)
class Window:
    """The buckets a time series answers, in hours since the epoch: first to last by step."""

    first: int | None  # None: from the oldest bucket holding data
    last: int
    step: int

    @classmethod
    def of(cls, bucket: str, filters: Filters, now: int | None = None) -> Window:
        """The window the filters ask for (an open end is now), refused up front when it would
        hold too many buckets."""
        step = bucket_hours(bucket)
        end = filters.until - 1 if filters.until is not None else now_ms() if now is None else now
        first = None if filters.since is None else _floor(filters.since // HOUR_MS, step)
        window = cls(first, _floor(end // HOUR_MS, step), step)
        window.check()
        return window

    def check(self) -> None:
        if self.first is not None and (self.last - self.first) // self.step + 1 > MAX_BUCKETS:
            raise QueryError("window_too_large", _TOO_WIDE.format(MAX_BUCKETS))

    def widen(self, counts: Sequence[SeriesCount]) -> Window:
        """Stretched to the data: an open start begins at the oldest bucket, and a clock that
        went back does not hide rows stamped after now."""
        if not counts:
            return self
        hours = [count.bucket for count in counts]
        first = min(hours) if self.first is None else self.first
        window = Window(first, max(self.last, *hours), self.step)
        window.check()
        return window


def _floor(hour: int, step: int) -> int:
    return hour // step * step


def series_rows(
    by: Sequence[str], counts: Sequence[SeriesCount], window: Window | None = None
) -> list[dict[str, Any]]:
    """Points in time order; with a window, every bucket of it for every key seen (zeros
    included), so a chart needs no gap filling and a quiet hour is visibly quiet."""
    found = {(c.bucket, c.key): c.count for c in counts}
    if window is None or window.first is None:
        points = sorted(found.items(), key=lambda item: item[0][0])
    else:
        keys = sorted({key for _, key in found}, key=lambda k: tuple(str(v or "") for v in k))
        if not by:
            keys = [()]
        buckets = range(window.first, window.last + 1, window.step)
        if len(buckets) * max(len(keys), 1) > MAX_POINTS:
            raise QueryError(
                "window_too_large", f"more than {MAX_POINTS} points: narrow the window or by"
            )
        points = [((b, key), found.get((b, key), 0)) for b in buckets for key in keys]
    series = []
    for (hour, key), count in points:
        point: dict[str, Any] = {"time": iso_time(hour * HOUR_MS)}
        point.update(zip(by, key, strict=True))
        point["count"] = count
        series.append(point)
    return series


def encode_cursor(position: Position | None) -> str | None:
    """An opaque keyset position: the last row's received time and id."""
    if position is None:
        return None
    text = f"{position.received_at}.{position.id}"
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[int, str]:
    """The position ``encode_cursor`` made. The time must fit a 64-bit integer (a bigger one
    raised OverflowError in the driver: a 500); the id is checked by the caller."""
    bad = QueryError("invalid_cursor", "cursor is not one this service gave out")
    if len(cursor) > 200:
        raise bad
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        received_at, row_id = base64.urlsafe_b64decode(padded).decode("ascii").split(".")
    except (ValueError, UnicodeDecodeError):
        raise bad from None
    moment = parse_int(received_at)
    if moment is None:
        raise bad
    return moment, row_id


def decode_row_cursor(cursor: str | None) -> Position | None:
    """A cursor over rows with integer ids (reports, quarantine)."""
    if not cursor:
        return None
    received_at, raw_id = _decode_cursor(cursor)
    row_id = parse_int(raw_id, 0)
    if row_id is None:
        raise QueryError("invalid_cursor", "cursor is not one this service gave out")
    return Position(received_at, row_id)


def decode_crash_cursor(cursor: str | None) -> Position | None:
    """A cursor over crashes (ids of 32 hex digits)."""
    if not cursor:
        return None
    received_at, crash_id = _decode_cursor(cursor)
    if not _CRASH_ID.fullmatch(crash_id):
        raise QueryError("invalid_cursor", "cursor is not one this service gave out")
    return Position(received_at, crash_id)
