"""The PostgreSQL storage backend (asyncpg), for several ingest processes and hosts sharing one
database: the same tables and roll-ups as the SQLite backend, with ``reports`` partitioned by
UTC day so retention drops whole partitions.

``backend.py`` implements the storage protocol; ``writer.py`` is the group-commit writer it
builds on (one dedicated connection, reconnecting by itself), ``connection.py`` opens that
connection and tells a lost server from a bad statement; ``reads.py``, ``rollups.py``,
``crashes.py``, ``deletion.py`` and ``transfer.py`` (whole rows out and in, for ``copy``) hold
the SQL; issues (issue 11) are ``issue_writes.py`` (counters and triage in the writers'
transactions), ``issue_admin.py`` (status changes, regroup) and ``issues.py`` (reads);
``values.py`` cleans text PostgreSQL cannot hold; ``migrations/`` holds the numbered schema
files and ``migrate.py`` applies them exactly once under an advisory lock, however many
processes start together. Nothing outside ``storage/postgres/`` imports asyncpg or writes
PostgreSQL SQL.
"""

from reporting_endpoint.storage.postgres.backend import (
    PostgresStorage,
    check_url,
    display_url,
    is_postgres_url,
)
from reporting_endpoint.storage.postgres.connection import DatabaseUnavailable, WriterLimits

__all__ = [
    "DatabaseUnavailable",
    "PostgresStorage",
    "WriterLimits",
    "check_url",
    "display_url",
    "is_postgres_url",
]
