"""Storage backends: the Storage protocol and its SQLite implementation."""

from reporting_endpoint.storage.base import (
    QueueFull,
    Storage,
    StorageBusy,
    StorageClosed,
    StorageError,
    StorageNotStarted,
    WriterDown,
)
from reporting_endpoint.storage.sqlite import SQLiteStorage

__all__ = [
    "QueueFull",
    "SQLiteStorage",
    "Storage",
    "StorageBusy",
    "StorageClosed",
    "StorageError",
    "StorageNotStarted",
    "WriterDown",
]
