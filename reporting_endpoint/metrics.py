"""Prometheus collectors and ``GET /metrics``: no label ever takes a value a client sent."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Literal

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from starlette.types import Receive, Scope, Send

from reporting_endpoint.errors import error_response

log = logging.getLogger("reporting_endpoint.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Report types get their own label value; anything else a client invents is "other", so a
# sender cannot grow the label set (every type is still stored, see README "Endpoints").
KNOWN_TYPES = frozenset(
    {
        "crash",
        "deprecation",
        "intervention",
        "csp-violation",
        "network-error",
        "permissions-policy-violation",
        "document-policy-violation",
        "coep",
        "coop",
        "integrity-violation",
        "test",
    }
)
OTHER = "other"

Endpoint = Literal["reports", "crashpad"]
Outcome = Literal["stored", "quarantined", "duplicate", "site_not_allowed", "sampled_out"]

REPORTS_RECEIVED = Counter(
    "reporting_endpoint_reports_received",
    "W3C reports in uploads the service answered 2xx, by type and what became of each",
    ["type", "outcome"],
)
REPORTS_REFUSED = Counter(
    "reporting_endpoint_reports_refused",
    "W3C reports refused by the schema (kept in quarantine), by reason code",
    ["reason"],
)
REQUESTS_REJECTED = Counter(
    "reporting_endpoint_requests_rejected",
    "Uploads refused as a whole, by endpoint and reason code",
    ["endpoint", "reason"],
)
CRASH_UPLOADS = Counter(
    "reporting_endpoint_crash_uploads",
    "Crashpad uploads, by outcome (stored, or rejected: see requests_rejected for why)",
    ["outcome"],
)
CRASH_UPLOAD_BYTES = Counter(
    "reporting_endpoint_crash_upload_bytes",
    "Bytes of stored Crashpad uploads as sent (compressed)",
)
CRASH_PARSE = Counter(
    "reporting_endpoint_crash_parse",
    "Minidumps parsed after the upload was answered, by outcome",
    ["outcome"],
)
ALERT_DELIVERIES = Counter(
    "reporting_endpoint_alert_deliveries",
    "Alert notifications sent, by channel kind and outcome",
    ["channel", "outcome"],
)
QUEUE_DEPTH = Gauge(
    "reporting_endpoint_writer_queue_reports",
    "Reports waiting for the writer (summed over the live workers)",
    multiprocess_mode="livesum",
)
COMMIT_SECONDS = Histogram(
    "reporting_endpoint_writer_commit_duration_seconds",
    "Time of one group commit of reports, BEGIN to COMMIT",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
COMMIT_REPORTS = Histogram(
    "reporting_endpoint_writer_commit_reports",
    "Reports (stored and quarantined) written by one group commit",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
)
# Set at scrape time from a storage read, the same value whichever worker reads it: the most
# recent write wins across workers.
CRASH_BACKLOG = Gauge(
    "reporting_endpoint_crash_backlog_crashes",
    "Stored crashes whose dump is not processed yet",
    multiprocess_mode="mostrecent",
)
CRASH_BACKLOG_AGE = Gauge(
    "reporting_endpoint_crash_backlog_oldest_age_seconds",
    "Age of the oldest stored crash whose dump is not processed yet (0 when none)",
    multiprocess_mode="mostrecent",
)

# Label values come from code (reason codes, outcomes); this bounds them anyway, so a code
# built from input by mistake cannot grow the series without bound.
_SAFE_VALUE = re.compile(r"[a-z0-9_.-]{1,48}")
_report_children: dict[tuple[str, str], Counter] = {}


def _safe(value: str) -> str:
    return value if _SAFE_VALUE.fullmatch(value) else OTHER


def type_label(kind: object) -> str:
    """A report's ``type`` as a label value: the known types, else ``other``."""
    return kind if isinstance(kind, str) and kind in KNOWN_TYPES else OTHER


def reports_received(counts: Mapping[str | None, int], outcome: Outcome) -> None:
    """Count reports of one upload, by type (as sent: folded into its label here), that had
    ``outcome``."""
    for sent_type, count in counts.items():
        kind = sent_type if sent_type in KNOWN_TYPES else OTHER
        child = _report_children.get((kind, outcome))
        if child is None:
            child = REPORTS_RECEIVED.labels(kind, outcome)
            _report_children[kind, outcome] = child
        child.inc(count)


def reports_refused(reason: str, count: int = 1) -> None:
    REPORTS_REFUSED.labels(_safe(reason)).inc(count)


def request_rejected(endpoint: Endpoint, reason: str) -> None:
    REQUESTS_REJECTED.labels(endpoint, _safe(reason)).inc()
    if endpoint == "crashpad":
        CRASH_UPLOADS.labels("rejected").inc()


def crash_stored(upload_bytes: int) -> None:
    CRASH_UPLOADS.labels("stored").inc()
    CRASH_UPLOAD_BYTES.inc(upload_bytes)


def crash_parsed(outcome: str) -> None:
    """For the dump processing: ``parsed``, ``failed`` (the dump could not be read),
    ``gave_up`` (its attempts ran out) or ``processor_died`` (a processor died with it)."""
    CRASH_PARSE.labels(_safe(outcome)).inc()


def alert_delivery(channel: str, outcome: Literal["sent", "failed"]) -> None:
    """For the alert sender: ``channel`` is the channel's kind (``webhook``, ``email``, ...),
    never its URL or address."""
    ALERT_DELIVERIES.labels(_safe(channel), outcome).inc()


def crash_backlog(count: int, oldest_age_seconds: float) -> None:
    """For a scrape hook: the unprocessed crashes, read from storage at scrape time."""
    CRASH_BACKLOG.set(count)
    CRASH_BACKLOG_AGE.set(oldest_age_seconds)


def queue_depth(rows: int) -> None:
    QUEUE_DEPTH.set(rows)


def commit_observed(seconds: float, reports: int) -> None:
    COMMIT_SECONDS.observe(seconds)
    COMMIT_REPORTS.observe(reports)


# --- several workers: one folder of per-process value files per server run ------------------


@contextlib.contextmanager
def multiprocess_dir() -> Iterator[Path]:
    """The client's multiprocess folder for one ``serve --workers N`` run, set in the
    environment before the workers start (each is a fresh interpreter that reads it when the
    collectors are made). A folder named by the operator is emptied of value files at start;
    one made here is removed at the end."""
    named = os.environ.get(MULTIPROC_ENV)
    if named:
        path = Path(named)
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("*.db"):
            stale.unlink()
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix="reporting-endpoint-metrics-"))
    os.environ[MULTIPROC_ENV] = str(path)
    try:
        yield path
    finally:
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(path, ignore_errors=True)


def _multiproc_path() -> Path | None:
    named = os.environ.get(MULTIPROC_ENV)
    return Path(named) if named else None


_PID_OF_FILE = re.compile(r"_(\d+)\.db$")


def _pids(path: Path) -> set[int]:
    found = set()
    for entry in path.glob("*.db"):
        match = _PID_OF_FILE.search(entry.name)
        if match:
            found.add(int(match.group(1)))
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def worker_exiting() -> None:
    """A worker's live gauges leave the sum when it stops (the scrape also drops those of a
    worker that was killed)."""
    path = _multiproc_path()
    if path is not None:
        mark_process_dead(os.getpid(), str(path))  # type: ignore[no-untyped-call]


class WorkerProcessCollector(Collector):
    """``process_*`` summed over the live workers: the client's own process collector sees
    one process, and a scrape reaches one worker at random. CPU, memory and open files add
    up; the start time is the oldest worker's; the file limit is the largest. A worker that
    died takes its CPU seconds with it (a counter reset, which Prometheus handles)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def collect(self) -> Iterable[Metric]:
        totals: dict[str, float] = {}
        kinds: dict[str, tuple[str, str]] = {}
        for pid in sorted(p for p in _pids(self.path) if _alive(p)):
            collector = ProcessCollector(pid=lambda pid=pid: pid, registry=None)  # type: ignore[misc]
            for family in collector.collect():
                for sample in family.samples:
                    kinds.setdefault(sample.name, (family.type, family.documentation))
                    old = totals.get(sample.name)
                    if sample.name == "process_start_time_seconds":
                        value = sample.value if old is None else min(old, sample.value)
                    elif sample.name == "process_max_fds":
                        value = sample.value if old is None else max(old, sample.value)
                    else:
                        value = sample.value + (old or 0.0)
                    totals[sample.name] = value
        for name, value in totals.items():
            kind, documentation = kinds[name]
            if kind == "counter":
                counter = CounterMetricFamily(name.removesuffix("_total"), documentation)
                counter.add_metric([], value)
                yield counter
            else:
                gauge = GaugeMetricFamily(name, documentation)
                gauge.add_metric([], value)
                yield gauge


def _registry() -> CollectorRegistry:
    path = _multiproc_path()
    if path is None:
        # One process (or mounted in a host): the default registry, with the client's own
        # process, platform and GC collectors.
        return REGISTRY
    for pid in _pids(path):
        if not _alive(pid):
            mark_process_dead(pid, str(path))  # type: ignore[no-untyped-call]
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(path))  # type: ignore[no-untyped-call]
    registry.register(WorkerProcessCollector(path))
    return registry


def render() -> bytes:
    """The Prometheus text of every worker's collectors (or this process's)."""
    return generate_latest(_registry())


# --- GET /metrics --------------------------------------------------------------------------

ScrapeHook = Callable[[], Awaitable[None]]
# A hook that takes longer is abandoned: a slow storage read must not hold up the scrape.
SCRAPE_HOOK_TIMEOUT = 5.0


class MetricsEndpoint:
    """``GET /metrics``: runs the scrape hooks (async callbacks that set gauges from a storage
    read, e.g. the crash backlog), then answers the text format. With a token, only
    ``Authorization: Bearer <token>`` is let in."""

    def __init__(self, token: str | None, hooks: list[ScrapeHook]) -> None:
        self.token = f"Bearer {token}".encode() if token else None
        # The caller's list, kept by reference: hooks added to it later run too.
        self.hooks = hooks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.token is not None and not self._authorised(scope):
            response = error_response(
                401,
                "unauthorized",
                "send Authorization: Bearer <metrics token>",
                {"WWW-Authenticate": 'Bearer realm="reporting-endpoint metrics"'},
            )
            await response(scope, receive, send)
            return
        for hook in list(self.hooks):
            try:
                await asyncio.wait_for(hook(), SCRAPE_HOOK_TIMEOUT)
            except Exception:
                log.exception("a metrics scrape hook failed; its gauges keep their last value")
        # Reading every worker's files is disk work: off the event loop.
        body = await asyncio.to_thread(render)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", CONTENT_TYPE_LATEST.encode()),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def _authorised(self, scope: Scope) -> bool:
        assert self.token is not None
        for key, value in scope["headers"]:
            if key == b"authorization":
                return hmac.compare_digest(bytes(value), self.token)
        return False
