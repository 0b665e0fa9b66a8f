"""Recognising a browser's retry of a report it already delivered.

A browser that did not see our 2xx (a timeout, a dropped connection after the commit) sends
the same report again later with its ``age`` grown by the time that passed, so
``generated_at = received_at - age`` stays nearly the same (PROTOCOLS.md section 7). A retry is
therefore: same type, URL, user agent and body, and a generation time within a small
tolerance. `duplicate_key` gives the content part of that test; `DuplicateWindow` remembers
recent keys and answers "seen within tolerance".

The tolerance is small on purpose (500 ms by default): a page that crashes twice a second apart
sends two reports identical but for their time, and both must count. Between two deliveries
of one report, ``generated_at`` moves only by the difference in delivery latency and in the
browser's own age rounding, tens of milliseconds in practice.

The window keeps keys whose generation time is within ``horizon_ms`` of now (20 minutes:
Chromium drops a report 15 minutes after it was made, or after 5 failed attempts, so no retry
is older) and at most ``max_entries`` keys; past either bound the oldest
generation-time buckets go first, so memory is bounded whatever the traffic (100,000 keys is
about 20 MB).

Trade-off: the window lives in one process. A retry that lands on another worker or another
host is not recognised and is stored twice; so is one that arrives after a restart. That costs
an overcount of a few retries, never a lost report, and keeps the hot path free of a storage
round trip. A storage-backed window (a unique index on key and generation bucket) can replace
it later behind the same two calls.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from reporting_endpoint.records import NewReport

DEFAULT_TOLERANCE_MS = 500
DEFAULT_HORIZON_MS = 20 * 60 * 1000
DEFAULT_MAX_ENTRIES = 100_000
_NONE: dict[bytes, list[int]] = {}  # shared empty bucket: a miss allocates nothing


@dataclass(frozen=True, slots=True)
class DuplicateKey:
    """A report's identity for retry detection: a content digest and its generation time."""

    digest: bytes
    generated_at: int


def duplicate_key(
    type: str, url: str, user_agent: str, body: Mapping[str, Any], generated_at: int
) -> DuplicateKey:
    """The retry key: a hash of type, URL, user agent and the body as canonical JSON (sorted
    keys, so a retry serialised in another member order still matches), and the time.

    Pass the same form of ``url`` for every report (the stored URL is fine: a retry strips to
    the same one).
    """
    hasher = hashlib.blake2b(digest_size=16)
    for text in (type, url, user_agent):
        data = text.encode("utf-8", "surrogatepass")
        # Length-prefixed, so ("ab", "c") and ("a", "bc") differ.
        hasher.update(len(data).to_bytes(4, "little"))
        hasher.update(data)
    hasher.update(orjson.dumps(body, option=orjson.OPT_SORT_KEYS))
    return DuplicateKey(hasher.digest(), generated_at)


def report_duplicate_key(report: NewReport, body: Mapping[str, Any] | None = None) -> DuplicateKey:
    """`duplicate_key` of a stored report (its ``raw`` also holds ``age``, which a retry
    changes, so only the body is hashed). ``body`` saves re-parsing ``report.raw``."""
    if body is None:
        parsed = orjson.loads(report.raw).get("body")
        body = parsed if isinstance(parsed, dict) else {}
    return duplicate_key(report.type, report.url, report.user_agent, body, report.generated_at)


@dataclass(slots=True)
class DuplicateWindow:
    """Recent retry keys, bucketed by generation time; not thread-safe (one event loop).

    Buckets are ``tolerance_ms`` wide, so a key within tolerance sits in its own bucket or a
    neighbour: a lookup reads three small dicts, whatever the window holds.
    """

    tolerance_ms: int = DEFAULT_TOLERANCE_MS
    horizon_ms: int = DEFAULT_HORIZON_MS
    max_entries: int = DEFAULT_MAX_ENTRIES
    # bucket (generated_at // tolerance) -> digest -> generation times seen
    _buckets: dict[int, dict[bytes, list[int]]] = field(default_factory=dict, repr=False)
    _size: int = field(default=0, repr=False)
    # The smallest bucket held, so that the common add needs no scan to know nothing expired.
    _oldest: int | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.tolerance_ms <= 0 or self.horizon_ms <= 0 or self.max_entries <= 0:
            raise ValueError("tolerance_ms, horizon_ms and max_entries must be positive")

    def __len__(self) -> int:
        return self._size

    def seen(self, key: DuplicateKey) -> bool:
        """Whether a key with the same digest and a generation time within tolerance is held."""
        bucket = key.generated_at // self.tolerance_ms
        for near in (bucket, bucket - 1, bucket + 1):
            times = self._buckets.get(near, _NONE).get(key.digest)
            if times and any(abs(t - key.generated_at) <= self.tolerance_ms for t in times):
                return True
        return False

    def add(self, key: DuplicateKey, now_ms: int) -> None:
        """Remember ``key``; forget what is older than the horizon or over the size bound.

        A key already past the horizon is not held: it would expire at once, and each such
        add would make ``_expire`` sort every bucket (a cheap way to burn CPU: the schema
        allows ages of days)."""
        bucket = key.generated_at // self.tolerance_ms
        if bucket < (now_ms - self.horizon_ms) // self.tolerance_ms:
            return
        self._buckets.setdefault(bucket, {}).setdefault(key.digest, []).append(key.generated_at)
        self._size += 1
        if self._oldest is None or bucket < self._oldest:
            self._oldest = bucket
        self._expire(now_ms)

    def check_and_add(self, key: DuplicateKey, now_ms: int) -> bool:
        """True when ``key`` is a retry of a held one (then it is not added), else remember it."""
        if self.seen(key):
            return True
        self.add(key, now_ms)
        return False

    def _expire(self, now_ms: int) -> None:
        oldest = (now_ms - self.horizon_ms) // self.tolerance_ms
        if self._size <= self.max_entries and (self._oldest is None or self._oldest >= oldest):
            return
        # Rare (once a bucket ages out, or on overflow): sorting a few thousand ints is cheap.
        for bucket in sorted(self._buckets):
            if bucket >= oldest and self._size <= self.max_entries:
                break
            entries = self._buckets.pop(bucket)
            self._size -= sum(len(times) for times in entries.values())
        self._oldest = min(self._buckets, default=None)
