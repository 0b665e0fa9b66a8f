"""The SQLite backend: one file in WAL mode, a group-commit writer, read-only readers.

``backend.py`` implements the storage protocol; ``writer.py`` is the group-commit writer it
builds on; ``reads.py``, ``rollups.py``, ``crashes.py``, ``quarantine.py``, ``deletion.py`` and
``transfer.py`` (whole rows out and in, for ``copy``) hold the SQL; issues live in
``issue_tally.py`` (what events add to an issue, pure), ``issue_counts.py`` (counters and
triage state, in the insert's transaction), ``issue_admin.py`` (status changes, regroup) and
``issues.py`` (the issue reads); ``schema.py`` applies the numbered ``migrations/``.
"""

from reporting_endpoint.storage.sqlite.backend import SQLiteStorage, check_file, check_ours
from reporting_endpoint.storage.sqlite.connection import migrate, open_connection
from reporting_endpoint.storage.sqlite.writer import MAX_WRITER_RESTARTS

__all__ = [
    "MAX_WRITER_RESTARTS",
    "SQLiteStorage",
    "check_file",
    "check_ours",
    "migrate",
    "open_connection",
]
