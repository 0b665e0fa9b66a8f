"""W3C Reporting API ingest: parse, validate, normalise (with the report's fingerprint and
release), skip retries of reports already stored, commit, then answer 2xx."""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import orjson
from starlette.types import Receive, Scope, Send

from reporting_endpoint import intake, metrics
from reporting_endpoint.errors import RequestRejected, error_response
from reporting_endpoint.grouping import parse_user_agent, strip_body_urls, url_parts
from reporting_endpoint.issues.duplicates import (
    DuplicateKey,
    DuplicateWindow,
    duplicate_key,
    report_duplicate_key,
)
from reporting_endpoint.issues.fingerprint import report_fingerprint
from reporting_endpoint.issues.releases import ReleaseSource, report_release
from reporting_endpoint.issues.rules import RuleSet
from reporting_endpoint.records import NewReport, RejectedReport
from reporting_endpoint.settings import Settings
from reporting_endpoint.storage.base import QueueFull, Storage, StorageError
from reporting_endpoint.validation import Invalid, ReportValidator

log = logging.getLogger("reporting_endpoint.reports")

MEDIA_TYPES = frozenset({"application/reports+json", "application/json"})

# How long a browser should wait before retrying when the queue is full (seconds).
RETRY_AFTER = "5"


# A quarantined report's raw JSON is cut here: one upload may hold a 1 MiB report, and the
# quarantine is for an operator to see what was refused, not to keep every byte of it.
MAX_QUARANTINE_RAW = 64 * 1024
# Containers deeper than this are replaced by a marker in a quarantined too-deep report; orjson
# serialises at most 254 levels, and the envelope and body take two of them.
QUARANTINE_MAX_DEPTH = 64
DEEPER = "\u2026 nested deeper, not kept"

TOO_DEEP = Invalid(
    "too_deeply_nested", "", "the report is nested deeper than 254 levels and cannot be stored"
)


def _privacy_stripped(report: dict[str, Any], keep_query: bool) -> dict[str, Any]:
    """The report with its own URL and the URLs in its body stored by the same rule."""
    url = report.get("url")
    stored: str | None = None
    if isinstance(url, str):
        stored = url_parts(url, keep_query).url
    body = report.get("body")
    stored_body = strip_body_urls(body, keep_query) if isinstance(body, dict) else body
    if (stored is None or stored == url) and stored_body is body:
        return report
    copy = dict(report)
    if stored is not None:
        copy["url"] = stored
    if stored_body is not body:
        copy["body"] = stored_body
    return copy


# No rules file: the default fingerprints only.
DEFAULT_RULES = RuleSet()


def normalise(
    report: dict[str, Any],
    received_at: int,
    keep_query: bool,
    *,
    rules: RuleSet = DEFAULT_RULES,
    release: ReleaseSource | None = None,
    headers: Mapping[str, str] | None = None,
) -> NewReport:
    """A validated report as a storage record: the stored raw JSON carries the stored URLs,
    and the record its fingerprint, issue title and release (see `normalised`).

    Raises ``orjson.JSONEncodeError`` when the report is nested too deeply to serialise.
    """
    return normalised(report, received_at, keep_query, rules, release, headers)[0]


class Normalised(NamedTuple):
    """A stored record, and what the ingest needs besides it for retry detection."""

    record: NewReport
    # The body as stored, and the raw JSON as bytes (before the decode into ``record.raw``).
    body: dict[str, Any]
    raw: bytes
    # The URL as the browser sent it when storing changed it (its query dropped), else None.
    sent_url: str | None = None


def normalised(
    report: dict[str, Any],
    received_at: int,
    keep_query: bool,
    rules: RuleSet = DEFAULT_RULES,
    release: ReleaseSource | None = None,
    headers: Mapping[str, str] | None = None,
) -> Normalised:
    """`normalise`, with the stored body and raw bytes (the ingest hashes them for retry
    detection).

    The fingerprint is computed from the report as stored (stored URL, stripped body), so that
    a later ``regroup``, which only sees stored rows, computes the same one. The release is
    read from the report as the browser sent it: ``query:`` needs the query the stored URL
    loses. ``headers`` are the upload's request headers (lower-case names), for ``header:``.
    """
    url = report["url"]
    sent_body = report["body"]
    parts = url_parts(url, keep_query)
    body = strip_body_urls(sent_body, keep_query)
    if parts.url != url or body is not sent_body:
        report = {**report, "url": parts.url, "body": body}
    user_agent = report["user_agent"]
    agent = parse_user_agent(user_agent)
    kind = report["type"]
    reason = body.get("reason") if kind == "crash" else None
    age = report["age"]
    raw_bytes = orjson.dumps(report)
    raw = raw_bytes.decode()
    record = NewReport(
        received_at=received_at,
        # The schema bounds age, but a clock set far back could still put this before the
        # epoch, and no stored time may be one that reads cannot format.
        generated_at=max(0, received_at - age),
        age=age,
        type=kind,
        url=parts.url,
        origin=parts.origin,
        site=parts.site,
        user_agent=user_agent,
        browser=agent.browser,
        browser_major=agent.browser_major,
        os=agent.os,
        reason=reason,
        raw=raw,
    )
    # The fingerprint (and the rules) read the record itself, so its issue fields are filled
    # in afterwards, on the instance nothing else holds yet: building a second frozen record
    # (16 fields, each set through object.__setattr__) cost 3 us a report, a third of all
    # the issue work on the hot path (measured).
    try:
        fingerprint = rules.report_fingerprint(record, body)
    except Exception:
        # A rule must never cost a report (the rules are checked at start, but they run on
        # what browsers send): the default fingerprint, and the reason in the log.
        log.exception("fingerprint rules failed on a %s report; using the default", kind)
        fingerprint = report_fingerprint(record, body)
    _set = object.__setattr__
    _set(record, "fingerprint", fingerprint.hash)
    _set(record, "issue_title", fingerprint.title)
    if release is not None:
        _set(record, "release", report_release(release, url=url, body=sent_body, headers=headers))
    return Normalised(record, body, raw_bytes, url if parts.url != url else None)


def _pruned(value: Any, depth: int) -> Any:
    """``value`` with containers below ``depth`` levels replaced by a marker string."""
    if isinstance(value, dict):
        if depth <= 0:
            return DEEPER
        return {key: _pruned(item, depth - 1) for key, item in value.items()}
    if isinstance(value, list):
        if depth <= 0:
            return DEEPER
        return [_pruned(item, depth - 1) for item in value]
    return value


def quarantined(
    report: Any, problem: Invalid, received_at: int, keep_query: bool
) -> RejectedReport:
    """A refused report as kept in quarantine: URLs stripped like a stored report's, bounded."""
    kind: str | None = None
    truncated = False
    if isinstance(report, dict):
        report = _privacy_stripped(report, keep_query)
        if isinstance(report.get("type"), str):
            kind = report["type"][:128]
    try:
        raw = orjson.dumps(report).decode()
    except orjson.JSONEncodeError:
        # Too deep to serialise: keep the outer levels, which say what and where it came from.
        raw = orjson.dumps(_pruned(report, QUARANTINE_MAX_DEPTH)).decode()
        truncated = True
    if len(raw) > MAX_QUARANTINE_RAW:
        raw = raw[:MAX_QUARANTINE_RAW]
        truncated = True
    return RejectedReport(
        received_at=received_at,
        code=problem.code,
        field=problem.field,
        message=problem.message[:1024],
        type=kind,
        raw=raw,
        truncated=truncated,
    )


class ReportsEndpoint:
    """``POST /reports``: one invalid report never sinks the batch it came in.

    A bare ASGI app rather than a Starlette request/response function: this is the hot path,
    and skipping the Request and Response objects is a large share of the per-request budget.
    """

    def __init__(
        self,
        settings: Settings,
        validator: ReportValidator,
        storage: Storage,
        rules: RuleSet = DEFAULT_RULES,
    ) -> None:
        self.settings = settings
        self.validator = validator
        self.storage = storage
        # Loaded once by the caller (create_app), so a bad rules file stops the service at
        # start rather than failing uploads.
        self.rules = rules
        self.release = settings.release
        # Per process (and per app): a retry that reaches another worker is stored again;
        # README "Retries" explains why that is the trade-off taken.
        self.duplicates = (
            DuplicateWindow(
                tolerance_ms=settings.duplicate_tolerance_ms,
                horizon_ms=settings.duplicate_window_minutes * 60_000,
            )
            if settings.duplicate_tolerance_ms > 0
            else None
        )
        # Intake rules (README "Intake rules"): None when off, so the common path tests one
        # attribute and nothing else.
        self.allowed = intake.allowed_site_hosts(settings.allowed_sites) or None
        self.sample_rates = intake.parse_sample_rates(settings.sample_rates) or None
        self.random = random.random

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            summary = await self.ingest(scope, receive)
        except RequestRejected as exc:
            metrics.request_rejected("reports", exc.code)
            await error_response(exc.status, exc.code, exc.message, exc.headers)(
                scope, receive, send
            )
            return
        body = orjson.dumps(summary)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def ingest(self, scope: Scope, receive: Receive) -> dict[str, Any]:
        """Read, check and commit one upload; returns the summary sent back."""
        content_type = b""
        for key, value in scope["headers"]:
            if key == b"content-type":
                content_type = value
                break
        media_type = content_type.partition(b";")[0].strip().lower()
        if media_type.decode("latin-1") not in MEDIA_TYPES:
            raise RequestRejected(
                415,
                "unsupported_media_type",
                "send application/reports+json (or application/json)",
            )
        body = await read_body(receive)
        try:
            batch = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise RequestRejected(400, "invalid_json", f"the body is not JSON: {exc}") from None
        if not isinstance(batch, list):
            raise RequestRejected(400, "not_an_array", "the body must be a JSON array of reports")
        limit = self.settings.max_reports_per_batch
        if len(batch) > limit:
            raise RequestRejected(413, "too_many_reports", f"at most {limit} reports in one upload")

        received_at = time.time_ns() // 1_000_000
        keep_query = self.settings.keep_url_query
        rules, release, window = self.rules, self.release, self.duplicates
        horizon = received_at - window.horizon_ms if window is not None else 0
        headers = _release_header(scope, release)
        accepted: list[NewReport] = []
        quarantine: list[RejectedReport] = []
        rejected: list[dict[str, Any]] = []
        # Keys of the reports stored by this upload, remembered once they are committed.
        keys: list[DuplicateKey] = []
        retries = 0
        # Reports answered 2xx but not stored: (type label, outcome) -> count.
        dropped: dict[tuple[str, metrics.Outcome], int] = {}
        allowed, rates = self.allowed, self.sample_rates
        check = self.validator.check
        for index, report in enumerate(batch):
            problem = check(report)
            if problem is None:
                try:
                    record, stored_body, raw, sent_url = normalised(
                        report, received_at, keep_query, rules, release, headers
                    )
                except orjson.JSONEncodeError:
                    # orjson reads 1024 levels but writes 254: a valid report can be unstorable.
                    problem = TOO_DEEP
                else:
                    if allowed is not None and not intake.site_allowed(record.site, allowed):
                        intake.tally(dropped, record.type, "site_not_allowed")
                        continue
                    if rates is not None:
                        rate = rates.get(record.type)
                        if rate is not None and self.random() >= rate:
                            intake.tally(dropped, record.type, "sampled_out")
                            continue
                    # A report made before the window's horizon is never held (adding one
                    # would only make the window sort its buckets to drop it again at once).
                    if window is not None and record.generated_at >= horizon:
                        key = retry_key(record, stored_body, raw, sent_url)
                        if window.seen(key):
                            # A retry of a report already committed: the browser only needs
                            # its 2xx again. Counted as accepted (README "Retries").
                            retries += 1
                            intake.tally(dropped, record.type, "duplicate")
                            continue
                        keys.append(key)
                    accepted.append(record)
                    continue
            if allowed is not None and intake.off_site(report, allowed):
                # Junk from elsewhere, or from nowhere, is not kept in quarantine either.
                intake.tally(dropped, intake.type_of(report), "site_not_allowed")
                continue
            quarantine.append(quarantined(report, problem, received_at, keep_query))
            rejected.append(
                {
                    "index": index,
                    "code": problem.code,
                    "field": problem.field,
                    "message": problem.message,
                }
            )

        try:
            # Refused reports commit with the accepted ones: the browser deletes every report
            # of an upload it got a 200 for, so the 200 must come after both are durable.
            await self.storage.submit_reports(accepted, quarantine)
        except QueueFull:
            raise RequestRejected(
                503,
                "queue_full",
                "too many reports are waiting to be written; retry later",
                {"Retry-After": RETRY_AFTER},
            ) from None
        except StorageError as exc:
            raise RequestRejected(
                503,
                exc.code,
                "the report store is not available; retry later",
                {"Retry-After": RETRY_AFTER},
            ) from None
        if window is not None:
            # Only now: a report whose commit failed must not make its retry look like a
            # duplicate, or the browser's second delivery would be dropped too.
            for key in keys:
                window.add(key, received_at)
        try:
            intake.count_upload(accepted, quarantine, dropped)
        except Exception:
            # The upload is committed: a metrics failure (multiprocess mode writes files)
            # must not turn its 200 into a 500, which the browser would send again.
            log.exception("counting a committed upload failed")
        summary: dict[str, Any] = {"accepted": len(accepted) + retries, "rejected": rejected}
        not_stored = intake.by_outcome(dropped)
        if not_stored:
            summary["dropped"] = not_stored
        return summary


def retry_key(
    record: NewReport, body: dict[str, Any], raw: bytes, sent_url: str | None = None
) -> DuplicateKey:
    """The retry key of a stored report: ``report_duplicate_key``'s test (same type, URL,
    user agent and body), from the JSON already serialised.

    ``raw`` without its ``"age":N`` member is exactly type, URL, user agent and body as
    stored; hashing those bytes costs a fifth of serialising the body again with sorted keys
    (1 us against 5 us a report, measured). A retry comes from the same browser, serialised
    in the same member order, so it hashes the same. The first ``"age":N`` followed by ``,``
    or ``}`` is taken: browsers put ``age`` first, and where a body member of that name and
    value came first, the retry merely goes unrecognised (stored twice), never the reverse.
    """
    needle = b'"age":%d' % record.age
    start = raw.find(needle)
    while start >= 0:
        end = start + len(needle)
        if raw[end : end + 1] in (b",", b"}"):
            hasher = hashlib.blake2b(raw[:start], digest_size=16)
            hasher.update(raw[end:])
            if sent_url is not None:
                # After a NUL, which JSON text never holds raw: the boundary is unambiguous.
                hasher.update(b"\x00")
                hasher.update(sent_url.encode("utf-8", "surrogatepass"))
            return DuplicateKey(hasher.digest(), record.generated_at)
        start = raw.find(needle, end)
    if sent_url is None:
        return report_duplicate_key(record, body)
    return duplicate_key(record.type, sent_url, record.user_agent, body, record.generated_at)


def _release_header(scope: Scope, release: ReleaseSource | None) -> dict[str, str] | None:
    """The one request header a ``header:`` release source reads (None for other sources:
    no header is decoded on the common path)."""
    if release is None or release.kind != "header":
        return None
    wanted = release.name.encode("latin-1", "replace")
    for key, value in scope["headers"]:
        if key == wanted:
            return {release.name: bytes(value).decode("latin-1")}
    return {}


async def read_body(receive: Receive) -> bytes:
    """The whole request body; limits are enforced by BodyLimitMiddleware around this."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise RequestRejected(400, "client_disconnected", "the client went away")
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
