"""Values read recently, kept per key: answered as kept while young, and past that answered
still while one task reads them again, so only the first view of a key waits for the read."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from reporting_endpoint.storage.base import StorageError

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Recent(Generic[K, V]):
    """At most ``size`` keys (the oldest read goes first); per process."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._kept: dict[K, tuple[float, V]] = {}
        self._reading: set[K] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def clear(self) -> None:
        self._kept.clear()

    def _keep(self, key: K, value: V) -> None:
        if key not in self._kept and len(self._kept) >= self.size:
            oldest = min(self._kept, key=lambda k: self._kept[k][0])
            del self._kept[oldest]
        self._kept[key] = (time.monotonic(), value)

    async def _read_again(self, key: K, read: Callable[[], Awaitable[V]]) -> None:
        try:
            self._keep(key, await read())
        except StorageError:
            pass  # the kept value stays; the next view past the age tries again
        finally:
            self._reading.discard(key)

    async def get(self, key: K, read: Callable[[], Awaitable[V]], max_age: float) -> V:
        """The value of ``key``: read now when none is kept; kept when younger than
        ``max_age`` seconds; else kept, while a task reads it again for the next view."""
        found = self._kept.get(key)
        if found is None:
            value = await read()
            self._keep(key, value)
            return value
        taken, value = found
        if time.monotonic() - taken >= max_age and key not in self._reading:
            self._reading.add(key)
            task = asyncio.create_task(self._read_again(key, read))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return value
