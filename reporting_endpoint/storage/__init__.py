"""Storage backends: the Storage protocol and its SQLite implementation."""

from reporting_endpoint.storage.base import (
    QueueFull,
    Storage,
    StorageClosed,
    StorageError,
    StorageNotStarted,
)
from reporting_endpoint.storage.sqlite import SQLiteStorage

__all__ = [
    "QueueFull",
    "SQLiteStorage",
    "Storage",
    "StorageClosed",
    "StorageError",
    "StorageNotStarted",
]
