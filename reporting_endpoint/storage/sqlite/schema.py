"""The SQLite schema: numbered migrations in ``migrations/``, applied in order and recorded in
``PRAGMA user_version``."""

from __future__ import annotations

import re
import sqlite3
from importlib import resources

_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def migrations() -> list[tuple[int, str]]:
    """(number, SQL) for every file in the migrations folder, in order."""
    folder = resources.files("reporting_endpoint.storage.sqlite") / "migrations"
    found = []
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.read_text(encoding="utf-8")))
    found.sort()
    numbers = [number for number, _ in found]
    if numbers != list(range(1, len(numbers) + 1)):
        raise RuntimeError(f"migrations must be numbered 1..n without gaps, found {numbers}")
    return found


def apply_migrations(connection: sqlite3.Connection) -> int:
    """Bring the schema up to date in one transaction per migration; returns the version."""
    current = connection.execute("PRAGMA user_version").fetchone()[0]
    latest = current
    for number, sql in migrations():
        if number <= current:
            continue
        # executescript commits first; BEGIN/COMMIT make each migration all-or-nothing.
        connection.executescript(
            f"BEGIN IMMEDIATE;\n{sql}\nPRAGMA user_version = {number};\nCOMMIT;"
        )
        latest = number
    return int(latest)
