"""The Storage protocol every backend implements, and the errors it raises."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from reporting_endpoint.records import NewReport, RejectedReport


class StorageError(Exception):
    """Storage could not take the write; ``code`` is the reason sent to the client."""

    code = "storage_error"


class StorageNotStarted(StorageError):
    code = "storage_not_started"


class StorageClosed(StorageError):
    code = "storage_closed"


class QueueFull(StorageError):
    code = "queue_full"


class StorageBusy(StorageError):
    """Another process held the database's write lock for longer than the service waits."""

    code = "storage_busy"


class WriterDown(StorageError):
    """The writer task is gone (crashed, restarting or given up): nothing can be committed."""

    code = "writer_down"


@dataclass(frozen=True, slots=True)
class WriterHealth:
    alive: bool
    queue_depth: int
    queue_capacity: int


T = TypeVar("T")


class Storage(Protocol):
    """Durable report storage. ``submit`` returns only once the reports are committed."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def submit(
        self, reports: Sequence[NewReport], rejected: Sequence[RejectedReport] = ()
    ) -> None:
        """Commit ``reports`` (and the refused ``rejected`` ones, to quarantine) together."""
        ...

    async def run_job(self, job: Callable[[sqlite3.Connection], T]) -> T: ...

    async def read(self, sql: str, parameters: Sequence[object] = ()) -> list[tuple[Any, ...]]: ...

    def health(self) -> WriterHealth: ...
