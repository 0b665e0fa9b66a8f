"""A host Starlette app: mounts the service at /reporting and adds the reporting headers.

Run it with: REPORT_URL=https://your.site/reporting/reports uvicorn examples.host_app:app
(REPORTING_ENDPOINT_* variables configure the mounted service, e.g. REPORTING_ENDPOINT_DB).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Mount, Route

import reporting_endpoint
from reporting_endpoint.headers import HeaderOptions, ReportingHeadersMiddleware, build_headers

REPORT_URL = os.environ.get("REPORT_URL", "https://localhost:8443/reporting/reports")

reporting = reporting_endpoint.create_app(reporting_endpoint.Settings.from_env())
headers = build_headers(
    HeaderOptions(
        url=REPORT_URL,
        allow_insecure=os.environ.get("REPORT_URL_ALLOW_INSECURE") == "1",
    )
)


async def home(request: Request) -> HTMLResponse:
    return HTMLResponse("<!doctype html><title>Host app</title><h1>Hello from the host app</h1>")


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    # Starlette does not run a mounted app's lifespan: start and stop the service here.
    async with reporting_endpoint.lifespan(reporting):
        yield


app = Starlette(
    routes=[Route("/", home), Mount("/reporting", app=reporting)],
    middleware=[Middleware(ReportingHeadersMiddleware, headers=headers)],
    lifespan=lifespan,
)
