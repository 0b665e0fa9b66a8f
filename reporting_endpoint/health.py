"""``GET /healthz``: whether the writer is alive, how deep its queue is, and the crash
processing backlog (how many crashes wait to be parsed, and for how long the oldest has)."""

from __future__ import annotations

import time

import orjson
from starlette.requests import Request
from starlette.responses import Response

from reporting_endpoint.storage.base import Backlog, Storage, StorageError, StorageFailure

# The backlog is read at most this often (an index count): a load balancer polling /healthz
# every few hundred milliseconds costs one query a second.
BACKLOG_TTL = 1.0


class HealthEndpoint:
    def __init__(self, storage: Storage, processing: int = 0) -> None:
        self.storage = storage
        self.processing = processing
        self._backlog: tuple[float, Backlog] | None = None

    async def backlog(self) -> Backlog | None:
        now = time.monotonic()
        if self._backlog is not None and now - self._backlog[0] < BACKLOG_TTL:
            return self._backlog[1]
        try:
            backlog = await self.storage.processing_backlog()
        except (StorageError, StorageFailure):
            return None  # the database is down: the writer's state says so
        self._backlog = (now, backlog)
        return backlog

    async def handle(self, request: Request) -> Response:
        health = self.storage.health()
        backlog = await self.backlog()
        body = {
            "status": "ok" if health.alive else "unavailable",
            "writer_alive": health.alive,
            "queue_depth": health.queue_depth,
            "queue_capacity": health.queue_capacity,
            # Crashes stored and not processed yet, by every processor sharing the database.
            "crash_backlog": None if backlog is None else backlog.pending,
            "crash_backlog_age_seconds": (
                None
                if backlog is None or backlog.oldest_received_at is None
                else round(max(0.0, time.time() - backlog.oldest_received_at / 1000), 1)
            ),
            "crash_processors": self.processing,
        }
        # 503 lets a load balancer take an instance whose writer is down out of rotation.
        return Response(
            orjson.dumps(body),
            status_code=200 if health.alive else 503,
            media_type="application/json",
        )
