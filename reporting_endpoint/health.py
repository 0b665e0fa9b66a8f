"""``GET /healthz``: whether the writer is alive and how deep its queue is."""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import Response

from reporting_endpoint.storage.base import Storage


class HealthEndpoint:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    async def handle(self, request: Request) -> Response:
        health = self.storage.health()
        body = {
            "status": "ok" if health.alive else "unavailable",
            "writer_alive": health.alive,
            "queue_depth": health.queue_depth,
            "queue_capacity": health.queue_capacity,
        }
        # 503 lets a load balancer take an instance whose writer is down out of rotation.
        return Response(
            orjson.dumps(body),
            status_code=200 if health.alive else 503,
            media_type="application/json",
        )
