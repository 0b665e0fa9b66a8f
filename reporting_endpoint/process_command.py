"""``reporting-endpoint process``: crash processors without the HTTP service, for another host
that shares the database and the blob store (or for a ``serve --processors 0``)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal

from reporting_endpoint.analysis import DumpAnalyzer
from reporting_endpoint.blobstores import blob_locks_of, open_blob_store
from reporting_endpoint.native.blob_cache import symbol_cache_from
from reporting_endpoint.native.upstream import upstream_from_settings
from reporting_endpoint.processing import default_processors
from reporting_endpoint.settings import Settings
from reporting_endpoint.storage import open_storage

log = logging.getLogger("reporting_endpoint.process")


async def run(settings: Settings, stop: asyncio.Event) -> None:
    """Process crashes until ``stop`` is set."""
    options = settings.processing_options()
    if settings.processors is None:
        # A host of its own: every core is spare.
        options = dataclasses.replace(options, processors=default_processors(workers=0))
    if options.processors <= 0:
        raise SystemExit("reporting-endpoint process: --processors must be 1 or more here")
    storage = open_storage(settings.database_url, settings)
    blobs = open_blob_store(
        settings.blob_store or "", settings.data_dir, locks=blob_locks_of(storage)
    )
    analyzer = DumpAnalyzer(
        storage,
        blobs,
        settings.fingerprint_rule_set(),
        options,
        upstream_from_settings(settings),
        symbol_cache_from(settings, blobs),
    )
    await blobs.start()
    try:
        await storage.start()
        try:
            await analyzer.start()
            log.warning(
                "processing crashes with %d processor(s) as %s",
                options.processors,
                analyzer.owner,
            )
            await stop.wait()
            await analyzer.stop()
        finally:
            await storage.stop()
    finally:
        await blobs.close()


def process(settings: Settings) -> int:
    logging.basicConfig(level=settings.log_level.upper() if settings.log_level != "trace" else 5)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await run(settings, stop)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    return 0
