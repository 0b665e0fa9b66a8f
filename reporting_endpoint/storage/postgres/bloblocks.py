"""Blob shard locks every host on one PostgreSQL database sees: advisory locks.

Uploads and blob removals of the same content must be ordered across every process that writes
to one blob store (``blobstores/locks.py`` says why: a deletion's "is this blob still
referenced?" and its removal are two steps, and an upload's row can commit between them). The
local ``flock`` locks cover one host; two hosts sharing a bucket share only the database, so
the locks live there: one advisory lock per content shard (the first two hex digits of the
sha256, 256 shards as locally), in the two-key form ``(NAMESPACE, shard)``.

- ``uploading`` takes its shards with ``pg_try_advisory_lock_shared``: uploads never wait for
  each other; ``removing`` with ``pg_try_advisory_lock``, which excludes them.
- They are session locks on a connection of a small pool of their own, held for the whole
  context (from an upload's blob commit until its row has committed, which happens on the
  writer's connection, so the lock cannot be a transaction lock of that one).
- They are taken without waiting and polled from the event loop with the timeouts and the
  outcome of ``locks.py``: an upload gets ``BlobStoreBusy`` after ``UPLOAD_WAIT``, a removal
  yields False after ``REMOVAL_WAIT`` (it then removes nothing; the orphan sweep does later).
  A database that cannot be reached is ``BlobStoreError``, as a failing ``flock`` is locally.
- The server drops a session's locks when the session ends, so a killed process never leaves
  one held; keepalives make a host that vanished without closing its socket count as ended
  within about a minute instead of the kernel's two hours.
- A connection goes back to the pool only after every lock it took was unlocked; when that is
  not certain (an unlock failed, a query was cancelled with its answer unread) the connection
  is terminated instead, which ends the session and its locks.

An upload whose lock session died while it was held (the server ended it, the network went)
may have had its blob removed by another host before its row committed: the upload then fails
with ``BlobStoreError`` (503, the client sends again and the blob is written again) rather than
answering 200 for a row that may point at nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from reporting_endpoint.blobstores.base import BlobStoreBusy, BlobStoreError, validate_key
from reporting_endpoint.blobstores.locks import FIRST_POLL, MAX_POLL, REMOVAL_WAIT, UPLOAD_WAIT

log = logging.getLogger("reporting_endpoint.storage.postgres")

# The first key of every blob shard lock. The two-int4-key form is a key space of its own (in
# pg_locks: objsubid 2), apart from the one-bigint-key locks of migrations and partitions; a
# fixed namespace keeps it apart from another application's two-key locks in the database.
# 0x52454253 is "REBS" (reporting-endpoint blob shards) in ASCII, within int4.
NAMESPACE = 0x52454253
# Connections per process that can hold blob locks at once: one per upload between its blob
# commit and its row commit (one group commit), one per deletion batch. A context finding all
# of them in use waits for one like for a lock, within the same bound.
POOL_MAX_SIZE = 10
# One lock or unlock round trip; past it the database counts as unreachable.
QUERY_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0
# TCP keepalives (seconds) for the server's side of the socket: a host that vanished without
# closing it (power loss, network partition) loses its locks after idle + interval * count.
KEEPALIVES = {
    "tcp_keepalives_idle": "30",
    "tcp_keepalives_interval": "10",
    "tcp_keepalives_count": "3",
}

_TRY_SHARED = "SELECT pg_try_advisory_lock_shared($1::int4, $2::int4)"
_TRY_EXCLUSIVE = "SELECT pg_try_advisory_lock($1::int4, $2::int4)"
# bool_and reads every row, so every shard is unlocked even when one was not held any more.
_UNLOCK_SHARED = (
    "SELECT bool_and(pg_advisory_unlock_shared($1::int4, shard)) FROM unnest($2::int4[]) AS shard"
)
_UNLOCK_EXCLUSIVE = (
    "SELECT bool_and(pg_advisory_unlock($1::int4, shard)) FROM unnest($2::int4[]) AS shard"
)

Pool: TypeAlias = "asyncpg.Pool[asyncpg.Record]"
Connection: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"


def shards_of(keys: Iterable[str]) -> list[int]:
    """The shard numbers (0-255) of blob keys, sorted: two holders of several shards always
    take them in the same order, so neither holds one the other polls for while polling for
    one the other holds until both time out."""
    return sorted({int(validate_key(key).split("/")[1], 16) for key in keys})


@dataclass(slots=True)
class _Held:
    """What one context holds: its shards on a connection of ``pool`` (no connection when
    there are no shards)."""

    pool: Pool | None
    connection: Connection | None
    shards: list[int]
    unlock: str


class PostgresBlobLocks:
    """``base.BlobLocks`` on advisory locks of one PostgreSQL database (module docstring).

    Nothing is opened before the first lock is taken (the composition asks for the locks
    before the storage starts); ``close`` ends the pool (the storage's ``stop``).
    """

    def __init__(
        self,
        url: str,
        *,
        pool_max_size: int = POOL_MAX_SIZE,
        connect_timeout: float = CONNECT_TIMEOUT,
        query_timeout: float = QUERY_TIMEOUT,
    ) -> None:
        self.url = url
        self.pool_max_size = pool_max_size
        self.connect_timeout = connect_timeout
        self.query_timeout = query_timeout
        self._pool: Pool | None = None
        # Only so that two first uses at once do not both create a pool.
        self._opening = asyncio.Lock()

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            # Bounded: a context still holding a connection (a stuck upload) would keep close
            # waiting; terminating ends its session, and with it the locks.
            await asyncio.wait_for(pool.close(), self.connect_timeout)
        except (TimeoutError, Exception):
            pool.terminate()

    @asynccontextmanager
    async def uploading(
        self, keys: Iterable[str], wait: float = UPLOAD_WAIT
    ) -> AsyncIterator[None]:
        """Hold the shards of ``keys`` shared; BlobStoreBusy after ``wait`` seconds."""
        held = await self._take(shards_of(keys), _TRY_SHARED, _UNLOCK_SHARED, wait)
        if held is None:
            raise BlobStoreBusy("a deletion held the blob lock for too long")
        try:
            yield
        except BaseException:
            await self._let_go(held)
            raise
        if not await self._let_go(held):
            raise BlobStoreError(
                "the blob lock's database session ended before the upload's row committed"
            )

    @asynccontextmanager
    async def removing(
        self, keys: Iterable[str], wait: float = REMOVAL_WAIT
    ) -> AsyncIterator[bool]:
        """Hold the shards of ``keys`` exclusively; yields False (holding nothing) when
        uploads kept them busy for ``wait`` seconds: the caller then removes nothing."""
        held = await self._take(shards_of(keys), _TRY_EXCLUSIVE, _UNLOCK_EXCLUSIVE, wait)
        if held is None:
            yield False
            return
        try:
            yield True
        except BaseException:
            await self._let_go(held)
            raise
        if not await self._let_go(held):
            # The removal is done and cannot be undone; an upload of these shards on another
            # host may have overlapped it after the session ended. Said, not raised: the rows
            # are deleted and the blobs are gone either way.
            log.warning("the blob removal lock's database session ended before it let go")

    # --- taking and letting go ----------------------------------------------------------

    async def _take(
        self, shards: list[int], try_lock: str, unlock: str, wait: float
    ) -> _Held | None:
        """Every shard held on one connection, None when they stayed busy for ``wait``
        seconds (nothing held then); BlobStoreError when the database cannot be used."""
        if not shards:
            return _Held(None, None, [], unlock)
        deadline = time.monotonic() + wait
        try:
            pool = await self._open()
            try:
                connection = await pool.acquire(timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                # Every lock connection of this process stayed in use (or a new one did not
                # connect) for the whole wait: the same outcome as a lock held that long.
                return None
        except Exception as exc:
            raise BlobStoreError(f"blob lock: {type(exc).__name__}: {exc}") from exc
        held = _Held(pool, connection, [], unlock)
        try:
            for shard in shards:
                poll = FIRST_POLL
                while not await connection.fetchval(
                    try_lock, NAMESPACE, shard, timeout=self.query_timeout
                ):
                    if time.monotonic() >= deadline:
                        # The shards taken so far are let go before the connection goes
                        # back (or it is terminated when that fails).
                        await self._let_go(held)
                        return None
                    await asyncio.sleep(poll)
                    poll = min(poll * 2, MAX_POLL)
                held.shards.append(shard)
        except BaseException as exc:
            # A query cancelled or timed out may have taken its lock with its answer unread:
            # only ending the session is sure to drop everything it holds.
            await self._end(held)
            if isinstance(exc, Exception):
                raise BlobStoreError(f"blob lock: {type(exc).__name__}: {exc}") from exc
            raise
        return held

    async def _let_go(self, held: _Held) -> bool:
        """Unlock the shards and give the connection back; True when every one was still
        held (the session lived throughout). Any doubt ends the session instead."""
        connection = held.connection
        if connection is None:
            return True
        still_held = False
        try:
            if held.shards:
                answer = await connection.fetchval(
                    held.unlock, NAMESPACE, held.shards, timeout=self.query_timeout
                )
                still_held = answer is True
            else:
                still_held = not connection.is_closed()
        except Exception:
            still_held = False
        except BaseException:
            await self._end(held)
            raise
        if still_held:
            await self._give_back(held)
        else:
            await self._end(held)
        return still_held

    async def _end(self, held: _Held) -> None:
        """Terminate the session (the server drops every lock it holds), then return the
        pool's slot."""
        if held.connection is not None:
            # InterfaceError: the connection was lost already, and asyncpg detached it from
            # the pool by itself (the session, with its locks, is gone).
            with contextlib.suppress(asyncpg.InterfaceError):
                held.connection.terminate()
        await self._give_back(held)

    async def _give_back(self, held: _Held) -> None:
        connection, held.connection = held.connection, None
        if connection is None or held.pool is None:
            return
        # The pool's own reset runs pg_advisory_unlock_all() too, and when that reset fails
        # the pool terminates the connection: no lock stays with a pooled session. A
        # terminated connection is only counted back (asyncpg returns at once).
        with contextlib.suppress(Exception):
            await held.pool.release(connection, timeout=self.query_timeout)

    async def _open(self) -> Pool:
        async with self._opening:
            if self._pool is None:
                settings: dict[str, str] = {
                    "application_name": "reporting-endpoint blob locks",
                    **KEEPALIVES,
                }
                # min_size=0: nothing connects until a lock is wanted, so a process that
                # never uploads or deletes holds no connection for this.
                self._pool = await asyncpg.create_pool(
                    self.url,
                    min_size=0,
                    max_size=self.pool_max_size,
                    timeout=self.connect_timeout,
                    command_timeout=self.query_timeout,
                    server_settings=settings,
                )
            return self._pool
