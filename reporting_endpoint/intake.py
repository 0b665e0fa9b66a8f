"""Intake rules: the allow-list of sites, per-type sampling, and a per-client rate limit."""

from __future__ import annotations

import ipaddress
import math
import operator
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from reporting_endpoint import metrics
from reporting_endpoint.errors import RequestRejected
from reporting_endpoint.grouping import site_of, url_parts
from reporting_endpoint.records import NewReport, RejectedReport

# Buckets kept at once: an attacker cycling through addresses evicts the least recently seen
# (which then starts full again, the lenient side); memory stays bounded (~150 bytes each).
MAX_CLIENTS = 65_536


_TYPE = operator.attrgetter("type")


class IntakeError(ValueError):
    """An allow-list entry or a sample rate the service cannot use."""


def allowed_site_hosts(entries: Iterable[str]) -> frozenset[str]:
    """Allow-list entries as the registrable domains the grouping computes (``site``
    without its scheme): ``example.com``, ``https://www.example.com`` and ``shop.example.com``
    all allow every page of example.com."""
    hosts = set()
    for entry in entries:
        text = entry.strip().lower()
        if not text:
            continue
        site = site_of(text if "://" in text else f"https://{text}")
        if site is None:
            raise IntakeError(f"not a host name or http(s) URL: {entry!r}")
        hosts.add(site.partition("://")[2])
    return frozenset(hosts)


def site_allowed(site: str | None, hosts: frozenset[str]) -> bool:
    """Whether a grouped ``site`` (``https://example.com``) is on the allow-list."""
    return site is not None and site.partition("://")[2] in hosts


def parse_sample_rates(entries: Iterable[str]) -> dict[str, float]:
    """``type=rate`` entries (``csp-violation=0.1``) as a dict; a rate is in [0, 1]."""
    rates: dict[str, float] = {}
    for entry in entries:
        kind, sep, raw = entry.partition("=")
        kind = kind.strip()
        if not sep or not kind:
            raise IntakeError(f"expected type=rate, got {entry!r}")
        try:
            rate = float(raw)
        except ValueError:
            raise IntakeError(f"{kind}: the rate {raw.strip()!r} is not a number") from None
        if not 0.0 <= rate <= 1.0:
            raise IntakeError(f"{kind}: the rate must be between 0 and 1, got {raw.strip()}")
        if kind in rates:
            raise IntakeError(f"{kind}: given twice")
        rates[kind] = rate
    return rates


# --- what became of each report of an upload -------------------------------------------------
def tally(
    counts: dict[tuple[str, metrics.Outcome], int], kind: object, outcome: metrics.Outcome
) -> None:
    key = (metrics.type_label(kind), outcome)
    counts[key] = counts.get(key, 0) + 1


def by_outcome(dropped: dict[tuple[str, metrics.Outcome], int]) -> dict[str, int]:
    """Reports answered 2xx but not stored, per reason (retries are in ``accepted``)."""
    totals: dict[str, int] = {}
    for (_, outcome), count in dropped.items():
        if outcome != "duplicate":
            totals[outcome] = totals.get(outcome, 0) + count
    return totals


def count_upload(
    accepted: list[NewReport],
    quarantine: list[RejectedReport],
    dropped: dict[tuple[str, metrics.Outcome], int],
) -> None:
    """Every report of a committed upload, counted once by what became of it."""
    # Counted by the type as sent (Counter counts in C: 100 reports cost ~3 us, a Python
    # loop ~25 us); the few distinct types are then folded into their labels.
    if len(accepted) == 1:
        metrics.reports_received({accepted[0].type: 1}, "stored")
    elif accepted:
        metrics.reports_received(Counter(map(_TYPE, accepted)), "stored")
    if quarantine:
        metrics.reports_received(Counter(map(_TYPE, quarantine)), "quarantined")
        for item in quarantine:
            metrics.reports_refused(item.code)
    for (label, outcome), count in dropped.items():
        metrics.reports_received({label: count}, outcome)


def type_of(report: Any) -> object:
    return report.get("type") if isinstance(report, dict) else None


def off_site(report: Any, allowed: frozenset[str]) -> bool:
    """A refused report not shown to come from a listed site: its URL names another site, or
    it has no URL that names a site at all. Only reports from listed sites are quarantined:
    anyone can send junk, and it must not churn the bounded quarantine."""
    url = report.get("url") if isinstance(report, dict) else None
    if not isinstance(url, str):
        return True
    return not site_allowed(url_parts(url).site, allowed)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class TokenBuckets:
    """One token bucket per client address, in memory, per process; never stored.

    ``per_minute`` tokens a minute refill each bucket, up to ``burst``. The least recently
    seen bucket goes when ``max_clients`` are held.
    """

    def __init__(
        self,
        per_minute: int,
        burst: int,
        max_clients: int = MAX_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.max_clients = max_clients
        self.clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, client: str) -> float:
        """0 when ``client`` may go ahead (a token is spent), else seconds until it may."""
        now = self.clock()
        buckets = self._buckets
        bucket = buckets.get(client)
        if bucket is None:
            if len(buckets) >= self.max_clients:
                buckets.popitem(last=False)
            bucket = buckets[client] = _Bucket(self.burst, now)
        else:
            buckets.move_to_end(client)
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.rate)
            bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate

    def waiting(self, client: str) -> float:
        """``take``'s answer without spending a token (nor refreshing the bucket's place):
        for limits that charge only some requests, such as failed logins."""
        bucket = self._buckets.get(client)
        if bucket is None:
            return 0.0
        tokens = min(self.burst, bucket.tokens + (self.clock() - bucket.at) * self.rate)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate


def client_key(host: str) -> str:
    """The rate-limit key of a client address: an IPv6 client's /64, since one host is
    usually handed a whole /64 and could otherwise rotate through it to escape its bucket;
    an IPv4-mapped IPv6 address (a dual-stack socket) as the IPv4 address it stands for."""
    if ":" not in host:
        return host  # IPv4 (or not an IP at all): as given, without a parse on the hot path
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host  # not an IP address: keyed as given
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))
    return str(address)


def client_of(scope: Scope) -> str:
    """The rate-limit key of the client a request came from (see ``client_key``)."""
    client = scope.get("client")
    return client_key(client[0]) if client else ""


Responder = Callable[[RequestRejected], Response]


class RateLimitMiddleware:
    """Answers a client over its rate with 429 and ``Retry-After`` before its body is read;
    ``respond`` writes the answer in the endpoint's own format. On ``/reports`` it sits inside
    the CORS middleware, which answers preflights itself: a preflight is never limited (a
    refused one would make the browser drop the report at once, without a retry)."""

    def __init__(
        self,
        app: ASGIApp,
        buckets: TokenBuckets,
        respond: Responder,
        endpoint: metrics.Endpoint,
    ) -> None:
        self.app = app
        self.buckets = buckets
        self.respond = respond
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        wait = self.buckets.take(client_of(scope))
        if not wait:
            await self.app(scope, receive, send)
            return
        metrics.request_rejected(self.endpoint, "rate_limited")
        retry_after = str(max(1, math.ceil(wait)))
        problem = RequestRejected(
            429,
            "rate_limited",
            f"too many uploads from this address; retry in {retry_after} s",
            {"Retry-After": retry_after},
        )
        response = self.respond(problem)
        response.headers.update(problem.headers)
        await response(scope, receive, send)
