"""The Storage protocol every backend implements, and the errors it raises."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from reporting_endpoint.records import NewReport


class StorageError(Exception):
    """Storage could not take the write; ``code`` is the reason sent to the client."""

    code = "storage_error"


class StorageNotStarted(StorageError):
    code = "storage_not_started"


class StorageClosed(StorageError):
    code = "storage_closed"


class QueueFull(StorageError):
    code = "queue_full"


@dataclass(frozen=True, slots=True)
class WriterHealth:
    alive: bool
    queue_depth: int
    queue_capacity: int


class Storage(Protocol):
    """Durable report storage. ``submit`` returns only once the reports are committed."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def submit(self, reports: Sequence[NewReport]) -> None: ...

    def health(self) -> WriterHealth: ...
