"""The same as host_app.py for a FastAPI application.

Run it with: REPORT_URL=https://your.site/reporting/reports uvicorn examples.fastapi_app:app
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

import reporting_endpoint
from reporting_endpoint.headers import HeaderOptions, ReportingHeadersMiddleware, build_headers

REPORT_URL = os.environ.get("REPORT_URL", "https://localhost:8443/reporting/reports")

reporting = reporting_endpoint.create_app(reporting_endpoint.Settings.from_env())


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with reporting_endpoint.lifespan(reporting):
        yield


app = FastAPI(lifespan=lifespan)
app.mount("/reporting", reporting)
app.add_middleware(
    ReportingHeadersMiddleware,
    headers=build_headers(
        HeaderOptions(
            url=REPORT_URL, allow_insecure=os.environ.get("REPORT_URL_ALLOW_INSECURE") == "1"
        )
    ),
)


@app.get("/", response_class=HTMLResponse)
async def home() -> str:
    return "<!doctype html><title>FastAPI host</title><h1>Hello from FastAPI</h1>"
