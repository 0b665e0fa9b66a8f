"""W3C Reporting API ingest: parse, validate, normalise, commit, then answer 2xx."""

from __future__ import annotations

import time
from typing import Any

import orjson
from starlette.types import Receive, Scope, Send

from reporting_endpoint.errors import RequestRejected, error_response
from reporting_endpoint.grouping import parse_user_agent, strip_body_urls, url_parts
from reporting_endpoint.records import NewReport, RejectedReport
from reporting_endpoint.settings import Settings
from reporting_endpoint.storage.base import QueueFull, Storage, StorageError
from reporting_endpoint.validation import Invalid, ReportValidator

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


def normalise(report: dict[str, Any], received_at: int, keep_query: bool) -> NewReport:
    """A validated report as a storage record; the stored raw JSON carries the stored URLs.

    Raises ``orjson.JSONEncodeError`` when the report is nested too deeply to serialise.
    """
    url = report["url"]
    parts = url_parts(url, keep_query)
    body = strip_body_urls(report["body"], keep_query)
    if parts.url != url or body is not report["body"]:
        report = {**report, "url": parts.url, "body": body}
    user_agent = report["user_agent"]
    agent = parse_user_agent(user_agent)
    kind = report["type"]
    reason = report["body"].get("reason") if kind == "crash" else None
    age = report["age"]
    raw = orjson.dumps(report).decode()
    return NewReport(
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

    def __init__(self, settings: Settings, validator: ReportValidator, storage: Storage) -> None:
        self.settings = settings
        self.validator = validator
        self.storage = storage

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            summary = await self.ingest(scope, receive)
        except RequestRejected as exc:
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
        accepted: list[NewReport] = []
        quarantine: list[RejectedReport] = []
        rejected: list[dict[str, Any]] = []
        check = self.validator.check
        for index, report in enumerate(batch):
            problem = check(report)
            if problem is None:
                try:
                    accepted.append(normalise(report, received_at, keep_query))
                    continue
                except orjson.JSONEncodeError:
                    # orjson reads 1024 levels but writes 254: a valid report can be unstorable.
                    problem = TOO_DEEP
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
        return {"accepted": len(accepted), "rejected": rejected}


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
