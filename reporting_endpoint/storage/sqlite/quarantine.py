"""Writes refused reports to the bounded quarantine table; plain sqlite3, no transactions."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

INSERT_QUARANTINE = (
    "INSERT INTO quarantine (received_at, code, field, message, type, raw, truncated)"
    " VALUES (?,?,?,?,?,?,?)"
)


def write_quarantine(
    connection: sqlite3.Connection, rows: Sequence[tuple[object, ...]], max_rows: int
) -> None:
    """Insert ``RejectedReport.row()`` tuples and drop the oldest past ``max_rows``.

    The caller owns the transaction (the same one as the accepted reports of the upload).
    Ids only grow, so the cut is one range delete on the primary key.
    """
    if not rows:
        return
    connection.executemany(INSERT_QUARANTINE, rows)
    connection.execute(
        "DELETE FROM quarantine WHERE id <= (SELECT max(id) FROM quarantine) - ?", (max_rows,)
    )
