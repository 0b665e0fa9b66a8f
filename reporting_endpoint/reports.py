"""W3C Reporting API ingest: parse, validate, normalise, commit, then answer 2xx."""

from __future__ import annotations

import time
from typing import Any

import orjson
from starlette.types import Receive, Scope, Send

from reporting_endpoint.errors import RequestRejected, error_response
from reporting_endpoint.grouping import parse_user_agent, url_parts
from reporting_endpoint.records import NewReport
from reporting_endpoint.settings import Settings
from reporting_endpoint.storage.base import QueueFull, Storage, StorageError
from reporting_endpoint.validation import ReportValidator

MEDIA_TYPES = frozenset({"application/reports+json", "application/json"})

# How long a browser should wait before retrying when the queue is full (seconds).
RETRY_AFTER = "5"


def normalise(report: dict[str, Any], received_at: int, keep_query: bool) -> NewReport:
    """A validated report as a storage record; the stored raw JSON carries the stored URL."""
    url = report["url"]
    parts = url_parts(url, keep_query)
    if parts.url != url:
        report = {**report, "url": parts.url}
    user_agent = report["user_agent"]
    agent = parse_user_agent(user_agent)
    kind = report["type"]
    reason = report["body"].get("reason") if kind == "crash" else None
    age = report["age"]
    return NewReport(
        received_at=received_at,
        generated_at=received_at - age,
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
        raw=orjson.dumps(report).decode(),
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
        rejected: list[dict[str, Any]] = []
        check = self.validator.check
        for index, report in enumerate(batch):
            problem = check(report)
            if problem is None:
                accepted.append(normalise(report, received_at, keep_query))
            else:
                rejected.append(
                    {
                        "index": index,
                        "code": problem.code,
                        "field": problem.field,
                        "message": problem.message,
                    }
                )

        try:
            await self.storage.submit(accepted)
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
