"""Storing uploaded symbol files: unpack every input, then commit the blobs, then the rows.

``POST /symbols/upload`` and ``reporting-endpoint symbols upload`` both come through here, so an
upload by HTTP and one from the command line store the same rows and blobs. An import is all or
nothing for bad input: every file is unpacked (and so checked) before anything is stored.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from reporting_endpoint.blobstores import BlobStore, BlobWriter
from reporting_endpoint.blobstores.base import key_for
from reporting_endpoint.native.records import SymbolFile
from reporting_endpoint.native.symbol_upload import (
    SymbolUploadError,
    UnpackedSymbols,
    UploadLimits,
    unpack_symbols,
)
from reporting_endpoint.storage.base import Storage

WORKSPACE_PREFIX = "symbols-"
# A workspace untouched this long was left by a killed process (a live upload writes to it).
STALE_WORKSPACE_SECONDS = 24 * 3600
# Files copied into blob writers at once: each may hold a temp file open until its commit.
COMMIT_BATCH = 32
READ_CHUNK = 1024 * 1024
# Unpacking (a PDB or ELF converted to Breakpad text) is CPU and memory heavy: the service
# runs at most this many at once (its ``gate``), whatever the number of uploads.
MAX_UNPACKING = 2
MAX_FILENAME = 256


class SymbolImportError(Exception):
    """An input that cannot be used; nothing of its import was stored. ``code`` is the
    unpacker's stable reason code, ``filename`` the input's name as given."""

    def __init__(self, code: str, filename: str, message: str) -> None:
        super().__init__(f"{filename}: {message}")
        self.code = code
        self.filename = filename
        self.message = message


@dataclass(frozen=True, slots=True)
class Imported:
    """What an import stored, and how many crashes waiting for these symbols were re-queued."""

    stored: tuple[SymbolFile, ...]
    requeued: int


def display_name(filename: str) -> str:
    """A client's file name as the unpacker sees it: the last path segment, bounded."""
    tail = filename.replace("\\", "/").rsplit("/", 1)[-1]
    return (tail or "upload")[:MAX_FILENAME]


@asynccontextmanager
async def workspace(folder: Path) -> AsyncIterator[Path]:
    """A private folder under ``folder`` for one import's temp files, removed afterwards
    (whatever happened); folders a killed process left are removed on the way in."""
    path = Path(await asyncio.to_thread(_make_workspace, folder))
    try:
        yield path
    finally:
        await asyncio.to_thread(shutil.rmtree, path, True)


def _make_workspace(folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    sweep_workspaces(folder)
    return tempfile.mkdtemp(prefix=WORKSPACE_PREFIX, dir=folder)


def sweep_workspaces(folder: Path, older_than: float = STALE_WORKSPACE_SECONDS) -> int:
    """Remove workspaces in which nothing changed for ``older_than`` seconds."""
    cutoff = time.time() - older_than
    removed = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            if not entry.name.startswith(WORKSPACE_PREFIX) or not entry.is_dir():
                continue
            with contextlib.suppress(OSError):
                if _newest_change(Path(entry.path)) < cutoff:
                    shutil.rmtree(entry.path, ignore_errors=True)
                    removed += 1
    return removed


def _newest_change(folder: Path) -> float:
    newest = folder.stat().st_mtime
    for root, _, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(OSError):
                newest = max(newest, (Path(root) / name).stat().st_mtime)
    return newest


async def unpack_all(
    inputs: Sequence[tuple[Path, str]],
    workdir: Path,
    limits: UploadLimits | None = None,
    gate: asyncio.Semaphore | None = None,
) -> list[UnpackedSymbols]:
    """Every input (a path and the name it was given) unpacked, off the event loop, one at a
    time under ``gate``; the first that cannot be used raises ``SymbolImportError``."""
    found: list[UnpackedSymbols] = []
    loop = asyncio.get_running_loop()
    # In a process of its own, not a thread: reading a .sym through and converting a debug
    # file are seconds to minutes of Python and native work that would hold the GIL against
    # ingest in the serving process.
    pool = concurrent.futures.ProcessPoolExecutor(
        1, mp_context=multiprocessing.get_context("spawn")
    )
    finished = False
    try:
        for index, (path, filename) in enumerate(inputs):
            name = display_name(filename)
            # One folder per input: two inputs never write over each other's output.
            target = workdir / f"unpacked-{index}"
            await asyncio.to_thread(target.mkdir, mode=0o700)
            async with gate or contextlib.nullcontext():
                try:
                    unpacked = await loop.run_in_executor(
                        pool, unpack_symbols, path, name, target, limits or UploadLimits()
                    )
                except SymbolUploadError as exc:
                    raise SymbolImportError(exc.code, name, str(exc)) from None
            if not unpacked:
                raise SymbolImportError("no_symbols", name, "it holds no symbol file")
            found.extend(unpacked)
        finished = True
    finally:
        if not finished:
            # Given up (a refused input, the client gone): an unpack still running in the
            # process is of no use, and would hold the upload's folder for minutes.
            for process in list(getattr(pool, "_processes", {}).values()):
                process.kill()
        await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)
    return found


async def store_unpacked(
    storage: Storage,
    blobs: BlobStore,
    unpacked: Sequence[UnpackedSymbols],
    *,
    source: str = "upload",
) -> Imported:
    """Commit the symbol text (and the native file it came from) as content-addressed blobs,
    then upsert the rows in one call; a module given twice keeps the last one."""
    latest: dict[tuple[str, str], UnpackedSymbols] = {}
    for item in unpacked:
        latest.pop((item.debug_file, item.debug_id), None)
        latest[(item.debug_file, item.debug_id)] = item
    modules = list(latest.values())
    files = _files_of(modules)
    # Hashed first, so the blob locks (taken before any commit, held until the rows have
    # committed) are known up front and taken at once, in order.
    digests = await asyncio.to_thread(_hash_all, files)
    keys = [key_for(digest) for digest, _ in digests.values()]
    async with blobs.uploading(keys):
        for start in range(0, len(files), COMMIT_BATCH):
            batch = files[start : start + COMMIT_BATCH]
            writers = await asyncio.to_thread(_copy_all, blobs, batch)
            try:
                for path, writer in zip(batch, writers, strict=True):
                    if writer.sha256 != digests[path][0]:
                        raise SymbolImportError(
                            "file_changed", path.name, "it changed while it was stored"
                        )
                await blobs.commit_all(writers)
            except BaseException:
                # commit_all stops at the first failure: the writers after it still hold
                # temp files (a committed one has none left to remove).
                for writer in writers:
                    writer.discard()
                raise
        now = time.time_ns() // 1_000_000
        rows = [_row(item, digests, source, now) for item in modules]
        requeued = await storage.put_symbol_files(rows)
    return Imported(tuple(rows), requeued)


async def import_files(
    storage: Storage,
    blobs: BlobStore,
    inputs: Sequence[tuple[Path, str]],
    workdir: Path,
    limits: UploadLimits | None = None,
    gate: asyncio.Semaphore | None = None,
) -> Imported:
    """``unpack_all`` then ``store_unpacked``: nothing is stored unless every input is usable."""
    unpacked = await unpack_all(inputs, workdir, limits, gate)
    return await store_unpacked(storage, blobs, unpacked)


def _files_of(modules: Iterable[UnpackedSymbols]) -> list[Path]:
    files: list[Path] = []
    for item in modules:
        for path in (item.sym_path, item.object_path):
            if path is not None and path not in files:
                files.append(path)
    return files


def _row(
    item: UnpackedSymbols, digests: dict[Path, tuple[str, int]], source: str, now: int
) -> SymbolFile:
    sym_sha256, sym_size = digests[item.sym_path]
    object_sha256: str | None = None
    object_size: int | None = None
    if item.object_path is not None:
        object_sha256, object_size = digests[item.object_path]
    return SymbolFile(
        debug_file=item.debug_file,
        debug_id=item.debug_id,
        name=item.name,
        code_file=item.code_file,
        code_id=item.code_id,
        os=item.os,
        arch=item.arch,
        sym_sha256=sym_sha256,
        sym_size=sym_size,
        object_sha256=object_sha256,
        object_size=object_size,
        source=source,
        uploaded_at=now,
    )


def _hash_all(paths: Sequence[Path]) -> dict[Path, tuple[str, int]]:
    digests: dict[Path, tuple[str, int]] = {}
    for path in paths:
        digest = hashlib.sha256()
        size = 0
        with path.open("rb") as source:
            while chunk := source.read(READ_CHUNK):
                digest.update(chunk)
                size += len(chunk)
        digests[path] = (digest.hexdigest(), size)
    return digests


def _copy_all(blobs: BlobStore, paths: Sequence[Path]) -> list[BlobWriter]:
    writers: list[BlobWriter] = []
    try:
        for path in paths:
            writer = blobs.writer()
            writers.append(writer)
            with path.open("rb") as source:
                while chunk := source.read(READ_CHUNK):
                    writer.write(chunk)
    except BaseException:
        for writer in writers:
            writer.discard()
        raise
    return writers
