"""The layout holds: only ``storage/`` writes SQL or imports a database driver, so a second
backend needs no change anywhere else."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "reporting_endpoint"
STORAGE = PACKAGE / "storage"
DRIVERS = {"sqlite3", "aiosqlite", "asyncpg", "psycopg", "psycopg2"}
SQL = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE FROM|CREATE TABLE|PRAGMA)\b")


def outside_storage() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if STORAGE not in p.parents)


def offences(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            names = []
        found += [
            f"line {getattr(node, 'lineno', 0)}: imports {name}"
            for name in names
            if name.split(".")[0] in DRIVERS
        ]
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = SQL.search(node.value)
            if match:
                found.append(f"line {node.lineno}: SQL in a string ({match.group(0)})")
    return found


def test_the_scan_sees_what_it_looks_for(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("import sqlite3\nq = 'SELECT id FROM t'\nfrom aiosqlite import connect\n")
    assert len(offences(probe)) == 3


@pytest.mark.parametrize("path", outside_storage(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_sql_and_no_driver_outside_storage(path: Path) -> None:
    assert offences(path) == [], f"{path.relative_to(PACKAGE)}: only storage/ talks to a database"
