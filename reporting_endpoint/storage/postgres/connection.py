"""The writer's connection to PostgreSQL: its limits, how it is opened, and which driver
errors mean "the server cannot be reached" (503, reconnect) rather than "this statement is
wrong" (the submission's own failure)."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from reporting_endpoint.storage.base import WriterDown


class DatabaseUnavailable(WriterDown):
    """The PostgreSQL server cannot be reached (down, restarting, connection lost, or too
    slow to answer within the budget): nothing can be committed now; try again later."""

    code = "database_unavailable"


# Errors that mean the server (or the way to it) is gone, not that a statement is wrong.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.QueryCanceledError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
)
TRANSIENT: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
)


def is_unavailable(exc: BaseException, connection: asyncpg.Connection | None = None) -> bool:
    """Whether ``exc`` says the database cannot be reached (rather than a bad statement)."""
    if isinstance(exc, _UNAVAILABLE):
        return True
    if connection is not None and connection.is_closed():
        return True
    # asyncpg says "connection is closed" / "connection was closed in the middle of operation"
    # with its InterfaceError when the socket went away under a call.
    return isinstance(exc, asyncpg.InterfaceError) and "closed" in str(exc)


@dataclass(frozen=True, slots=True)
class WriterLimits:
    """How long the writer waits for what (seconds), and how much it holds."""

    queue_size: int = 20000
    # A lock held elsewhere (a prune in another process) is waited for this long per
    # statement (server-side lock_timeout); then the group gets 503 (StorageBusy).
    lock_timeout: float = 30.0
    # A whole ingest transaction; past it the connection is terminated and re-opened.
    transaction_timeout: float = 45.0
    # A maintenance job (prune of a large day, deletion).
    job_timeout: float = 600.0
    connect_timeout: float = 10.0
    quarantine_max_rows: int = 100_000


async def connect(url: str, limits: WriterLimits) -> asyncpg.Connection:
    """A new write connection (bounded wait). Lock waits are bounded on the server, and a
    writer that dies inside a transaction cannot hold its locks for ever."""
    lock_ms = max(1, int(limits.lock_timeout * 1000))
    idle_ms = max(1000, int(limits.job_timeout * 1000))
    return await asyncpg.connect(
        url,
        timeout=limits.connect_timeout,
        server_settings={
            "application_name": "reporting-endpoint writer",
            "lock_timeout": f"{lock_ms}ms",
            "idle_in_transaction_session_timeout": f"{idle_ms}ms",
        },
    )
