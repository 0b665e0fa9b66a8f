"""Finding a dump's symbol files for a processor: the store first, then upstream servers."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reporting_endpoint.blobstores import BlobStore
from reporting_endpoint.blobstores.base import key_for
from reporting_endpoint.native.blob_cache import SymbolBlobCache
from reporting_endpoint.native.records import symbol_keys
from reporting_endpoint.native.symbol_upload import sym_name
from reporting_endpoint.native.symbolication import SymbolPaths
from reporting_endpoint.storage.base import Storage

if TYPE_CHECKING:
    from reporting_endpoint.native.upstream import UpstreamSymbols

log = logging.getLogger("reporting_endpoint.native")

# Modules fetched from upstream servers per crash at most (each fetch is bounded in time by the
# upstream client; this bounds how many a crash may wait for).
UPSTREAM_PER_CRASH = 8


class SymbolFinder:
    """Local paths of the symbol files of a dump's modules, held while a walk reads them."""

    def __init__(
        self,
        storage: Storage,
        blobs: BlobStore,
        upstream: UpstreamSymbols | None = None,
        cache: SymbolBlobCache | None = None,
    ) -> None:
        self.storage = storage
        self.blobs = blobs
        self.upstream = upstream
        # For a bucket: local copies, downloaded once (a folder store is read in place).
        self.cache = cache

    async def _local(self, stack: contextlib.AsyncExitStack, sha256: str) -> Path:
        if self.cache is not None:
            return await self.cache.path(sha256)
        return await stack.enter_async_context(self.blobs.local_file(key_for(sha256)))

    @contextlib.asynccontextmanager
    async def stored(
        self, modules: Sequence[Mapping[str, Any]]
    ) -> AsyncIterator[tuple[dict[tuple[str, str], SymbolPaths], dict[tuple[str, str], str]]]:
        """The symbol files the store has for ``modules`` (on S3, local copies), and the sha256
        of the .sym of every key the store has a row for: a missing module is recorded with the
        file its processor saw, so that only another file sends the crash round again. One
        whose blob cannot be read is left out of the first (its module is listed missing)."""
        keys = symbol_keys(modules)
        files = await self.storage.get_symbol_files(keys) if keys else {}
        found: dict[tuple[str, str], SymbolPaths] = {}
        async with contextlib.AsyncExitStack() as stack:
            for key, record in files.items():
                try:
                    sym = await self._local(stack, record.sym_sha256)
                    obj = (
                        await self._local(stack, record.object_sha256)
                        if record.object_sha256
                        else None
                    )
                except Exception as exc:  # a blob gone or unreadable: walk without it
                    log.warning("symbols %s/%s unavailable: %s", key[0], key[1], exc)
                    continue
                found[key] = SymbolPaths(
                    record.sym_sha256,
                    str(sym),
                    str(obj) if obj is not None else None,
                    record.object_sha256,
                )
            yield found, {key: record.sym_sha256 for key, record in files.items()}

    async def from_upstream(
        self, missing: Sequence[Sequence[str | None]]
    ) -> dict[tuple[str, str], SymbolPaths]:
        """Symbols fetched from the upstream servers for modules the walk found missing."""
        if self.upstream is None:
            return {}
        fetched: dict[tuple[str, str], SymbolPaths] = {}
        for entry in list(missing)[:UPSTREAM_PER_CRASH]:
            debug_file, debug_id = entry[0], entry[1]
            if not debug_file or not debug_id:
                continue
            try:
                path = await self.upstream.fetch(debug_file, debug_id, sym_name(debug_file))
            except Exception as exc:
                log.warning("upstream symbols for %s/%s failed: %s", debug_file, debug_id, exc)
                continue
            if path is not None:
                # A debug id names one build: its symbols never change, so the id is the key.
                key = f"upstream/{debug_file}/{debug_id}"
                fetched[(debug_file, debug_id)] = SymbolPaths(key, str(path))
        return fetched
