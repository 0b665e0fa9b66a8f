"""The Starlette application factory: routes and middleware as lists, storage and the blob
store in the lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Mount, Route

from reporting_endpoint.alerts.rules import AlertConfig
from reporting_endpoint.alerts.sender import AlertService
from reporting_endpoint.analysis import DumpAnalyzer
from reporting_endpoint.api import BearerTokenMiddleware, api_routes
from reporting_endpoint.api.symbols import SymbolsApi
from reporting_endpoint.blobstores import blob_locks_of, open_blob_store
from reporting_endpoint.crashpad import CrashpadEndpoint, discarded
from reporting_endpoint.daily import roll_up_loop
from reporting_endpoint.dashboard import dashboard_routes
from reporting_endpoint.errors import EXCEPTION_HANDLERS
from reporting_endpoint.grouping import warm_up
from reporting_endpoint.health import HealthEndpoint
from reporting_endpoint.intake import RateLimitMiddleware, TokenBuckets
from reporting_endpoint.metrics import (
    Endpoint,
    MetricsEndpoint,
    ScrapeHook,
    crash_backlog,
    crash_parsed,
    queue_depth,
    worker_exiting,
)
from reporting_endpoint.middleware import (
    BodyLimitMiddleware,
    CORSMiddleware,
    Responder,
    json_rejection,
)
from reporting_endpoint.native.blob_cache import symbol_cache_from
from reporting_endpoint.native.upstream import upstream_from_settings
from reporting_endpoint.reports import ReportsEndpoint
from reporting_endpoint.retention import retention_loop
from reporting_endpoint.settings import Settings
from reporting_endpoint.storage import Storage, open_storage
from reporting_endpoint.validation import default_validator


def service_lifespan(
    storage: Storage,
    analyzer: DumpAnalyzer,
    retention_days: int | None = None,
    tune_gc: bool = False,
    alerts: AlertService | None = None,
) -> Callable[[Starlette], AbstractAsyncContextManager[None]]:
    blobs = analyzer.blobs

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # The blob store first (its folders, the sweep of temp files a kill left) and closed
        # last: the storage's start hands pending dumps to the analyzer, which reads them.
        await blobs.start()
        try:
            await storage.start()
            await analyzer.start()
            await asyncio.to_thread(warm_up)
            if tune_gc:
                # Everything loaded so far lives as long as the process: moving it out of the
                # collector's reach cut the ingest path from 68 to 49 us a request (measured).
                gc.freeze()
            # Every process rolls up (the first does the work; for the others it is one read).
            roller = asyncio.create_task(roll_up_loop(storage))
            pruner = None
            if retention_days is not None:
                # With the blob store, retention covers crashes and their blobs too.
                pruner = asyncio.create_task(retention_loop(storage, retention_days, blobs=blobs))
            if alerts is not None:
                # Beside the ingest path: its own tasks, reading and queueing through storage.
                alerts.start()
            try:
                yield
            finally:
                if alerts is not None:
                    await alerts.stop()
                for task in (pruner, roller):
                    if task is not None:
                        task.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await task
                await analyzer.stop()
                # Drains the queue: every report already accepted is committed before exit.
                await storage.stop()
                worker_exiting()
        finally:
            await blobs.close()

    return lifespan


def _rate_limits(settings: Settings, respond: Responder, endpoint: Endpoint) -> list[Middleware]:
    if not settings.rate_limit_per_minute:
        return []
    # One set of buckets per endpoint: a flood of browser reports does not use up the
    # allowance of crash uploads from the same address.
    buckets = TokenBuckets(
        settings.rate_limit_per_minute,
        settings.rate_limit_burst or settings.rate_limit_per_minute,
    )
    return [Middleware(RateLimitMiddleware, buckets=buckets, respond=respond, endpoint=endpoint)]


def routes(
    settings: Settings,
    storage: Storage,
    analyzer: DumpAnalyzer,
    scrape_hooks: list[ScrapeHook] | None = None,
) -> list[BaseRoute]:
    # One rule set for reports and crashes, loaded with the analyzer's (create_app).
    reports = ReportsEndpoint(settings, default_validator(), storage, analyzer.rules)
    crashpad = CrashpadEndpoint(settings, storage, analyzer.blobs, analyzer.stored)
    health = HealthEndpoint(storage, processing=analyzer.options.processors)
    symbols = SymbolsApi(settings, storage, analyzer.blobs)
    # The read token for reading, the write token for uploading: the same rule as /api.
    tokens = [Middleware(BearerTokenMiddleware, token=settings.read_token)]

    async def queue_now() -> None:
        queue_depth(storage.health().queue_depth)

    async def backlog_now() -> None:
        backlog = await health.backlog()
        if backlog is not None:
            age = 0.0
            if backlog.oldest_received_at is not None:
                age = max(0.0, time.time() - backlog.oldest_received_at / 1000)
            crash_backlog(backlog.pending, age)

    hooks = scrape_hooks if scrape_hooks is not None else []
    hooks[:0] = [queue_now, backlog_now]
    ingest_middleware = [
        Middleware(
            CORSMiddleware,
            allow_origins=settings.cors_allow_origins,
            max_age=settings.cors_max_age,
        ),
        # Inside CORS, so that a 429 carries the CORS headers; before the body is read.
        *_rate_limits(settings, json_rejection, "reports"),
        Middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes),
    ]
    return [
        Route("/reports", reports, methods=["POST", "OPTIONS"], middleware=ingest_middleware),
        Route(
            "/crashpad",
            crashpad,
            methods=["POST"],
            middleware=[
                *_rate_limits(settings, discarded, "crashpad"),
                Middleware(
                    BodyLimitMiddleware,
                    max_bytes=settings.crashpad_max_body_bytes,
                    respond=discarded,
                    endpoint="crashpad",
                    too_large="too_large",
                ),
            ],
        ),
        Route("/healthz", health.handle, methods=["GET"]),
        Route("/metrics", MetricsEndpoint(settings.metrics_token, hooks), methods=["GET"]),
        Mount(
            "/api",
            routes=[*api_routes(storage, analyzer.blobs), *symbols.api_routes()],
            middleware=tokens,
        ),
        # Breakpad's symbol-server layout (what symbol clients fetch) and symbol uploads.
        Mount("/symbols", routes=symbols.server_routes(), middleware=tokens),
        *dashboard_routes(settings, storage, analyzer.blobs),
    ]


def create_app(
    settings: Settings | None = None, *, storage: Storage | None = None, tune_gc: bool = False
) -> Starlette:
    """Build the service. Nothing is opened until the lifespan starts.

    ``tune_gc`` freezes the objects alive at startup out of the garbage collector's scans; it
    is process-wide, so only the standalone server (``serve``) turns it on.
    """
    settings = settings or Settings.from_env()
    storage = storage or open_storage(settings.database_url, settings)
    blobs = open_blob_store(
        settings.blob_store or "", settings.data_dir, locks=blob_locks_of(storage)
    )
    # Read and checked now: a bad rules file stops the service before it takes a report
    # (SettingsError naming the file, the rule and the problem).
    rules = settings.fingerprint_rule_set()
    alert_config: AlertConfig = settings.alert_config()
    alerts = AlertService(storage, alert_config, settings.public_url)
    analyzer = DumpAnalyzer(
        storage,
        blobs,
        rules,
        settings.processing_options(),
        upstream_from_settings(settings),
        symbol_cache_from(settings, blobs),
    )
    analyzer.on_outcome = crash_parsed
    # Async callbacks /metrics awaits before it renders, to set gauges from a storage read;
    # add to app.state.metrics_hooks (README "Metrics").
    scrape_hooks: list[ScrapeHook] = []
    app = Starlette(
        routes=routes(settings, storage, analyzer, scrape_hooks),
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=service_lifespan(storage, analyzer, settings.retention_days, tune_gc, alerts),
    )
    app.state.settings = settings
    app.state.storage = storage
    app.state.analyzer = analyzer
    app.state.blobs = blobs
    app.state.metrics_hooks = scrape_hooks
    app.state.alerts = alerts
    return app


def lifespan(app: Starlette) -> AbstractAsyncContextManager[object]:
    """Start and stop a service app from a host application's own lifespan.

    Starlette does not run the lifespan of a mounted app, so a host does::

        async with reporting_endpoint.lifespan(reporting_app):
            yield
    """
    return app.router.lifespan_context(app)
