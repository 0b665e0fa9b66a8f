"""Symbol files fetched from upstream Breakpad symbol servers into a bounded local cache."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
import uuid
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO
from urllib.parse import quote

import httpx2

if TYPE_CHECKING:
    from reporting_endpoint.settings import Settings

log = logging.getLogger("reporting_endpoint.native.upstream")

USER_AGENT = "reporting-endpoint-symbols/1"
MODULE_PREFIX = b"MODULE "
# A MODULE line is an OS, an arch, an id and a file name: far shorter than this.
MAX_FIRST_LINE = 4096
# Microsoft's and Mozilla's servers answer with one redirect to blob storage.
MAX_REDIRECTS = 5
# Misses remembered at once; the oldest are forgotten first (asking again is the only cost).
MAX_MISSES = 10_000
# Downloads at once, whatever the number of modules asked for.
MAX_DOWNLOADS = 4
# A whole download may take this many times the silence timeout.
DEADLINE_FACTOR = 30
# Bytes per write to the cache file (each off the event loop) and per step of un-gzipping.
WRITE_CHUNK = 1024 * 1024
INFLATE_CHUNK = 256 * 1024
# Identifiers from a dump (an attacker can craft one) are at most this long.
MAX_PART = 512
PART_SUFFIX = ".part"
# Temp files older than this in the cache folder were left by a killed process.
STALE_PART_SECONDS = 3600
CACHE_FOLDER = "symbol-cache"

Key = tuple[str, str, str]


class _Unusable(Exception):
    """This server's answer cannot be cached (an error status, too large, not the module)."""


def upstream_from_settings(settings: Settings) -> UpstreamSymbols | None:
    """The fetcher the settings describe (cache in the data folder), None without servers."""
    if not settings.symbol_servers:
        return None
    return UpstreamSymbols(
        settings.symbol_servers,
        settings.data_dir / CACHE_FOLDER,
        max_bytes=settings.symbol_cache_bytes,
        timeout=settings.symbol_fetch_timeout,
        negative_ttl=settings.symbol_negative_cache_seconds,
    )


def _usable(part: str) -> bool:
    return 0 < len(part) <= MAX_PART and part.isprintable()


def cache_name(key: Key) -> str:
    """The cache file of a module: a digest, so no name from a dump ever becomes a path."""
    return hashlib.sha256("\0".join(key).encode()).hexdigest() + ".sym"


def module_line_matches(head: bytes, debug_id: str) -> bool:
    """Whether ``head`` (the first line of a body) is a Breakpad MODULE line for that id."""
    parts = head.decode("latin-1").strip().split(maxsplit=4)
    return len(parts) >= 4 and parts[0] == "MODULE" and parts[3].upper() == debug_id.upper()


class UpstreamSymbols:
    """``fetch`` asks each server in turn for ``<base>/<debug_file>/<debug_id>/<name>`` and
    keeps a hit in ``cache_dir``; a module no server had is not asked for again for
    ``negative_ttl`` seconds.

    Bounded everywhere: each server may stay silent ``timeout`` seconds and a whole download
    takes at most ``deadline`` seconds (default 30 x ``timeout``); a body over
    ``max_file_bytes`` (default ``max_bytes``) is dropped while it streams; the cache holds at
    most ``max_bytes`` (least recently used files go first); ``MAX_MISSES`` misses are
    remembered and ``MAX_DOWNLOADS`` downloads run at once. Concurrent fetches of one module
    share one download. Only a body that starts with the module's own ``MODULE`` line is
    cached. A path returned stays valid until the cache evicts it: open it promptly.

    Several processes may share ``cache_dir``: each counts the files it has seen, and a file
    another process evicted is fetched again.
    """

    def __init__(
        self,
        servers: Sequence[str],
        cache_dir: Path,
        max_bytes: int,
        timeout: float,
        negative_ttl: float,
        *,
        max_file_bytes: int | None = None,
        deadline: float | None = None,
        max_misses: int = MAX_MISSES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.servers = tuple(server.rstrip("/") for server in servers)
        self.cache_dir = cache_dir
        self.max_bytes = max_bytes
        self.max_file_bytes = min(max_file_bytes or max_bytes, max_bytes)
        self.timeout = timeout
        self.deadline = deadline if deadline is not None else timeout * DEADLINE_FACTOR
        self.negative_ttl = negative_ttl
        self.max_misses = max_misses
        self.clock = clock
        # Cache file name -> size, least recently used first; only touched on the event loop.
        self._index: OrderedDict[str, int] = OrderedDict()
        self._total = 0
        self._misses: OrderedDict[Key, float] = OrderedDict()
        self._inflight: dict[Key, asyncio.Task[Path | None]] = {}
        self._loaded = False
        self._client: httpx2.AsyncClient | None = None
        self._downloads: asyncio.Semaphore | None = None
        # Answers from the servers, counted for tests and logs: one per server asked.
        self.requests = 0

    @property
    def cached_bytes(self) -> int:
        return self._total

    async def fetch(self, debug_file: str, debug_id: str, name: str) -> Path | None:
        """A local file with the module's Breakpad symbols, or None when no server has it."""
        key: Key = (debug_file, debug_id, name)
        if not self.servers or not all(_usable(part) for part in key):
            return None
        expiry = self._misses.get(key)
        if expiry is not None:
            if expiry > self.clock():
                return None
            del self._misses[key]
        await self._load()
        cached = await self._cached(cache_name(key))
        if cached is not None:
            return cached
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._fetch(key))
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._forget_inflight(key, done))
        # Shielded: a caller that gives up does not cancel the download the others wait for.
        return await asyncio.shield(task)

    async def aclose(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # --- the cache ----------------------------------------------------------------------

    def _forget_inflight(self, key: Key, done: asyncio.Task[Path | None]) -> None:
        if self._inflight.get(key) is done:
            del self._inflight[key]

    async def _load(self) -> None:
        if self._loaded:
            return
        entries = await asyncio.to_thread(self._scan)
        if self._loaded:  # another fetch loaded it meanwhile
            return
        for name, size in entries:
            self._index[name] = size
            self._total += size
        self._loaded = True
        await self._evict()

    def _scan(self) -> list[tuple[str, int]]:
        self.cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        found: list[tuple[float, str, int]] = []
        stale = time.time() - STALE_PART_SECONDS
        for entry in os.scandir(self.cache_dir):
            with contextlib.suppress(OSError):
                info = entry.stat(follow_symlinks=False)
                if entry.name.endswith(PART_SUFFIX):
                    if info.st_mtime < stale:
                        os.unlink(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    found.append((info.st_mtime, entry.name, info.st_size))
        found.sort()
        return [(name, size) for _, name, size in found]

    async def _cached(self, name: str) -> Path | None:
        path = self.cache_dir / name
        try:
            size = await asyncio.to_thread(_touch, path)
        except FileNotFoundError:
            self._drop(name)
            return None
        if name not in self._index:
            # Fetched by another process sharing the folder.
            self._index[name] = size
            self._total += size
            await self._evict(keep=name)
        self._index.move_to_end(name)
        return path

    def _drop(self, name: str) -> None:
        size = self._index.pop(name, None)
        if size is not None:
            self._total -= size

    async def _add(self, name: str, size: int) -> None:
        self._drop(name)
        self._index[name] = size
        self._total += size
        await self._evict(keep=name)

    async def _evict(self, keep: str | None = None) -> None:
        victims: list[Path] = []
        for name in list(self._index):
            if self._total <= self.max_bytes:
                break
            if name == keep:
                continue
            self._drop(name)
            victims.append(self.cache_dir / name)
        if victims:
            await asyncio.to_thread(_unlink_all, victims)

    def _miss(self, key: Key) -> None:
        if self.negative_ttl <= 0:
            return
        self._misses.pop(key, None)
        self._misses[key] = self.clock() + self.negative_ttl
        while len(self._misses) > self.max_misses:
            self._misses.popitem(last=False)

    # --- the servers --------------------------------------------------------------------

    def _http(self) -> httpx2.AsyncClient:
        if self._client is None:
            self._client = httpx2.AsyncClient(
                timeout=httpx2.Timeout(self.timeout),
                follow_redirects=True,
                max_redirects=MAX_REDIRECTS,
                headers={"User-Agent": USER_AGENT},
                limits=httpx2.Limits(max_connections=MAX_DOWNLOADS * 2),
            )
        return self._client

    async def _fetch(self, key: Key) -> Path | None:
        if self._downloads is None:
            self._downloads = asyncio.Semaphore(MAX_DOWNLOADS)
        name = cache_name(key)
        async with self._downloads:
            for base in self.servers:
                url = "/".join([base, *(quote(part, safe="") for part in key)])
                try:
                    size = await self._download(url, key[1], name)
                except (_Unusable, httpx2.HTTPError, TimeoutError, OSError) as exc:
                    # A server that fails is a miss too: the next one is asked.
                    log.info("symbol server refused or failed %s: %s", url, _reason(exc))
                    continue
                except Exception:
                    # Whatever a server sends must not fail the crash that asked.
                    log.warning("fetching %s failed unexpectedly", url, exc_info=True)
                    continue
                if size is not None:
                    await self._add(name, size)
                    return self.cache_dir / name
        self._miss(key)
        return None

    async def _download(self, url: str, debug_id: str, name: str) -> int | None:
        """The body's size once it is in the cache under ``name``; None on a 404."""
        self.requests += 1
        temp = self.cache_dir / f"{uuid.uuid4().hex}{PART_SUFFIX}"
        try:
            async with asyncio.timeout(self.deadline):
                return await self._stream(url, debug_id, temp, self.cache_dir / name)
        finally:
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(temp.unlink)

    async def _stream(self, url: str, debug_id: str, temp: Path, final: Path) -> int | None:
        request = {"Accept-Encoding": "gzip"}
        async with self._http().stream("GET", url, headers=request) as response:
            if response.status_code in (404, 410):
                return None
            if response.status_code != 200:
                raise _Unusable(f"HTTP {response.status_code}")
            encoding = response.headers.get("content-encoding", "").strip().lower()
            if encoding not in ("", "identity", "gzip", "x-gzip"):
                raise _Unusable(f"content encoding {encoding!r}")
            declared = response.headers.get("content-length", "")
            gzip = encoding.endswith("gzip")
            if not gzip and declared.isdigit() and int(declared) > self.max_file_bytes:
                raise _Unusable(f"{declared} bytes is over {self.max_file_bytes}")
            body = _Body(self.max_file_bytes, debug_id, gzip=gzip)
            sink = await asyncio.to_thread(_open_exclusive, temp)
            try:
                async for raw in response.aiter_raw():
                    ready = body.feed(raw)
                    if ready:
                        await asyncio.to_thread(sink.write, ready)
                await asyncio.to_thread(sink.write, body.finish())
                await asyncio.to_thread(_finish, sink, temp, final)
            finally:
                sink.close()
        return body.size


class _Body:
    """A streamed body: un-gzipped in bounded steps, counted against the cap, its first line
    checked before anything is kept; ``feed`` hands back what is ready to write."""

    def __init__(self, limit: int, debug_id: str, *, gzip: bool) -> None:
        self.limit = limit
        self.debug_id = debug_id
        self.size = 0
        self.checked = False
        self._head = bytearray()
        self._pending = bytearray()
        self._inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS) if gzip else None

    def feed(self, raw: bytes) -> bytes:
        if self._inflater is None:
            self._take(raw)
        else:
            data = raw
            while data and not self._inflater.eof:
                try:
                    out = self._inflater.decompress(data, INFLATE_CHUNK)
                except zlib.error:
                    raise _Unusable("the gzip body is corrupt") from None
                self._take(out)
                data = self._inflater.unconsumed_tail
        if len(self._pending) < WRITE_CHUNK or not self.checked:
            return b""
        ready = bytes(self._pending)
        self._pending.clear()
        return ready

    def _take(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise _Unusable(f"the body is over {self.limit} bytes")
        self._pending += data
        if not self.checked:
            self._head += data[: MAX_FIRST_LINE + 1]
            end = self._head.find(b"\n")
            if end >= 0:
                self._check(bytes(self._head[:end]))
            elif len(self._head) > MAX_FIRST_LINE:
                raise _Unusable("not a Breakpad symbol file (no MODULE line)")

    def _check(self, line: bytes) -> None:
        if not line.startswith(MODULE_PREFIX):
            raise _Unusable("not a Breakpad symbol file (no MODULE line)")
        if not module_line_matches(line, self.debug_id):
            raise _Unusable("the MODULE line names another debug id")
        self.checked = True

    def finish(self) -> bytes:
        if self._inflater is not None and not self._inflater.eof:
            raise _Unusable("the gzip body is cut short")
        if not self.checked:
            self._check(bytes(self._head))
        ready = bytes(self._pending)
        self._pending.clear()
        return ready


def _open_exclusive(path: Path) -> BinaryIO:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    return os.fdopen(descriptor, "wb")


def _finish(sink: BinaryIO, temp: Path, final: Path) -> None:
    # Synced before the rename: after a power loss the name holds all of the file or nothing.
    sink.flush()
    os.fsync(sink.fileno())
    sink.close()
    os.replace(temp, final)


def _touch(path: Path) -> int:
    # Its time is the least-recently-used order another process (or a restart) sees.
    os.utime(path)
    return path.stat().st_size


def _unlink_all(paths: Sequence[Path]) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | httpx2.TimeoutException):
        return "timed out"
    return str(exc) or type(exc).__name__
