"""Storage: the protocol (``base``), plain-data filters (``filters``), the JSON rows every
backend answers (``rows``), and one folder per backend.

``open_storage`` picks the backend from a database URL (a path or ``sqlite:///path``: SQLite;
``postgresql://`` or ``postgres://``, any libpq URL: PostgreSQL); only ``app.py`` and ``cli.py``
call it, everything else takes a ``Storage``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from reporting_endpoint.settings import Settings, SettingsError, sqlite_file
from reporting_endpoint.storage.base import (
    ROW_KINDS,
    Blob,
    Counts,
    Deletion,
    GroupPage,
    IssueFilters,
    IssuePage,
    IssueSort,
    NotOurDatabase,
    Page,
    PendingCrash,
    QueueFull,
    RawRow,
    RowKind,
    SeriesCount,
    Storage,
    StorageBusy,
    StorageClosed,
    StorageError,
    StorageFailure,
    StorageNotStarted,
    TableCount,
    WriterDown,
    WriterHealth,
)

if TYPE_CHECKING:
    from reporting_endpoint.storage.postgres import PostgresStorage
    from reporting_endpoint.storage.sqlite import SQLiteStorage

__all__ = [
    "ROW_KINDS",
    "Blob",
    "Counts",
    "Deletion",
    "GroupPage",
    "IssueFilters",
    "IssuePage",
    "IssueSort",
    "NotOurDatabase",
    "Page",
    "PendingCrash",
    "PostgresStorage",
    "QueueFull",
    "RawRow",
    "RowKind",
    "SQLiteStorage",
    "SeriesCount",
    "Storage",
    "StorageBusy",
    "StorageClosed",
    "StorageError",
    "StorageFailure",
    "StorageNotStarted",
    "TableCount",
    "WriterDown",
    "WriterHealth",
    "check_database",
    "open_storage",
    "shown_database",
]


def __getattr__(name: str) -> Any:
    # Lazy: the light commands (`header`) import the errors without loading a driver.
    if name == "SQLiteStorage":
        from reporting_endpoint.storage.sqlite import SQLiteStorage

        return SQLiteStorage
    if name == "PostgresStorage":
        from reporting_endpoint.storage.postgres import PostgresStorage

        return PostgresStorage
    raise AttributeError(name)


# URL schemes of a PostgreSQL server (libpq accepts both).
POSTGRES_SCHEMES = frozenset({"postgresql", "postgres"})


def shown_database(database: str) -> str:
    """``database`` as a message may show it: a server URL without its password."""
    if _is_postgres(database):
        from reporting_endpoint.storage.postgres import display_url

        return display_url(database)
    return database


def _is_postgres(database: str) -> bool:
    # Checked here rather than in the backend: importing it loads asyncpg.
    return "://" in database and database.partition("://")[0].lower() in POSTGRES_SCHEMES


def _sqlite_path(database: str) -> Path:
    path = sqlite_file(database)
    if path is None:
        scheme = database.partition("://")[0]
        raise SettingsError(
            f"database: no storage engine for {scheme}:// URLs"
            " (a SQLite path or sqlite:///path, or postgresql://...)"
        )
    return path


def open_storage(
    database: str, settings: Settings, *, read_only: bool = False, must_exist: bool = False
) -> Storage:
    """The storage ``database`` names: a path or ``sqlite:///path`` is SQLite, a
    ``postgresql://`` / ``postgres://`` URL (libpq's form, e.g. ``postgresql://user@host/db``,
    ``postgresql://user@/db?host=/run/postgresql&port=5433``, several ``host:port`` pairs)
    is PostgreSQL.

    Nothing is opened until ``start``. ``read_only`` opens an existing database of this
    service for reading only (a wrong one is refused without writing); ``must_exist`` refuses
    the same way before a writer opens it, instead of creating a database.
    """
    if _is_postgres(database):
        from reporting_endpoint.storage.postgres import PostgresStorage, WriterLimits

        return PostgresStorage(
            database,
            read_only=read_only,
            must_exist=must_exist,
            limits=WriterLimits(
                queue_size=settings.queue_size,
                lock_timeout=settings.write_lock_timeout,
                # A transaction may wait for a lock in a statement or two, then must be done.
                transaction_timeout=settings.write_lock_timeout + 15,
                quarantine_max_rows=settings.quarantine_max_rows,
            ),
        )
    from reporting_endpoint.storage.sqlite import SQLiteStorage

    return SQLiteStorage(
        _sqlite_path(database),
        read_only=read_only,
        must_exist=must_exist,
        queue_size=settings.queue_size,
        synchronous=settings.sqlite_synchronous,
        write_lock_timeout=settings.write_lock_timeout,
        quarantine_max_rows=settings.quarantine_max_rows,
    )


def check_database(database: str) -> None:
    """Before ``serve``: refuse, with a SettingsError naming it, a database the service could
    not use, instead of a traceback from startup. A PostgreSQL server is asked once (a
    bounded wait): one that refuses or does not answer is named now."""
    if _is_postgres(database):
        from reporting_endpoint.storage.postgres import check_url

        problem = check_url(database)
        if problem is not None:
            raise SettingsError(f"database: {problem}")
        return
    from reporting_endpoint.storage.sqlite import check_file

    check_file(_sqlite_path(database))
