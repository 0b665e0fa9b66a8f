"""Alerts under /api (read token): the outbox and the delivery log, keyset paged by id."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from reporting_endpoint.api.issues import query_params
from reporting_endpoint.api.read import answered, json_response
from reporting_endpoint.errors import RequestRejected
from reporting_endpoint.params import QueryError, parse_int, parse_limit
from reporting_endpoint.storage.alert_store import OUTBOX_STATUSES
from reporting_endpoint.storage.base import Storage

DEFAULT_ALERTS = 50
MAX_ALERTS = 500
ALERT_PARAMETERS = frozenset({"status", "limit", "cursor"})
DELIVERY_PARAMETERS = frozenset({"alert", "limit", "cursor"})


def _id(value: str | None, name: str, code: str) -> int | None:
    if value is None or value == "":
        return None
    number = parse_int(value, 1)
    if number is None:
        raise QueryError(code, f"{name} is not one this service gave out")
    return number


class AlertsApi:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    async def alerts(self, request: Request) -> Response:
        try:
            params = query_params(request, ALERT_PARAMETERS)
            status = params.get("status") or None
            if status is not None and status not in OUTBOX_STATUSES:
                raise QueryError("invalid_status", f"status is one of {', '.join(OUTBOX_STATUSES)}")
            limit = parse_limit(params.get("limit"), DEFAULT_ALERTS, MAX_ALERTS)
            before = _id(params.get("cursor"), "cursor", "invalid_cursor")
        except QueryError as exc:
            raise RequestRejected(400, exc.code, exc.message) from None
        page = await answered(self.storage.alerts_page(limit, before, status))
        next_cursor = None if page.next is None else str(page.next)
        return json_response({"alerts": list(page.items), "next_cursor": next_cursor})

    async def deliveries(self, request: Request) -> Response:
        try:
            params = query_params(request, DELIVERY_PARAMETERS)
            limit = parse_limit(params.get("limit"), DEFAULT_ALERTS, MAX_ALERTS)
            before = _id(params.get("cursor"), "cursor", "invalid_cursor")
            alert = _id(params.get("alert"), "alert", "invalid_alert")
        except QueryError as exc:
            raise RequestRejected(400, exc.code, exc.message) from None
        page = await answered(self.storage.alert_deliveries_page(limit, before, alert))
        next_cursor = None if page.next is None else str(page.next)
        return json_response({"deliveries": list(page.items), "next_cursor": next_cursor})

    def routes(self) -> list[Route]:
        return [
            Route("/alerts", self.alerts, methods=["GET"]),
            Route("/alerts/deliveries", self.deliveries, methods=["GET"]),
        ]
