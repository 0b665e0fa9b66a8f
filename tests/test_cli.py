"""stats, export filters and CSV, prune, and retention by the running service."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import sqlite3
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from reporting_endpoint.app import create_app
from reporting_endpoint.cli import main
from reporting_endpoint.retention import prune_once
from reporting_endpoint.settings import Settings
from reporting_endpoint.storage import SQLiteStorage
from tests.conftest import crash_report, post_reports

FIREFOX = "Mozilla/5.0 (X11; Linux x86_64; rv:145.0) Gecko/20100101 Firefox/145.0"


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "r.sqlite3"
    with TestClient(create_app(Settings(db=path))) as client:
        post_reports(
            client,
            [crash_report(url="https://a.example.co.uk/", body={"reason": "oom"})] * 3
            + [crash_report(url="https://x.github.io/", user_agent=FIREFOX, body={})] * 2
            + [crash_report(type="deprecation", url="https://x.github.io/", body={"id": "U"})],
        )
    return path


def cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


def test_stats_table(db: Path) -> None:
    code, text = cli("stats", "--db", str(db), "--by", "site,browser", "--type", "crash")
    assert code == 0
    lines = text.splitlines()
    assert lines[0].split() == ["site", "browser", "count", "first_seen", "last_seen"]
    assert lines[1].split()[:3] == ["https://example.co.uk", "HeadlessChrome", "3"]
    assert lines[2].split()[:3] == ["https://x.github.io", "Firefox", "2"]
    assert len(lines) == 3


def test_stats_json_matches_the_api_shape(db: Path) -> None:
    code, text = cli("stats", "--db", str(db), "--by", "type", "--since", "7d", "--json")
    assert code == 0
    data = json.loads(text)
    assert data["by"] == ["type"]
    assert {g["type"]: g["count"] for g in data["groups"]} == {"crash": 5, "deprecation": 1}


def test_stats_bad_arguments(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("stats", "--db", str(db), "--by", "colour")[0] == 2
    assert "by takes" in capsys.readouterr().err
    assert cli("stats", "--db", str(db), "--since", "last tuesday")[0] == 2
    assert "since must be" in capsys.readouterr().err


def test_export_filters_and_csv(db: Path) -> None:
    code, text = cli("export", "--db", str(db), "--browser", "Firefox")
    assert code == 0
    rows = [json.loads(line) for line in text.splitlines()]
    assert [r["browser"] for r in rows] == ["Firefox", "Firefox"]
    code, text = cli("export", "--db", str(db), "--format", "csv", "--type", "deprecation")
    assert code == 0
    [row] = list(csv.DictReader(io.StringIO(text)))
    assert row["type"] == "deprecation"
    assert json.loads(row["body"]) == {"id": "U"}
    assert row["site"] == "https://x.github.io"


def counts(db: Path) -> tuple[int, int, int]:
    """Reports, and what each roll-up table sums to (every table must agree)."""
    connection = sqlite3.connect(db)
    reports = connection.execute("SELECT count(*) FROM reports").fetchone()[0]
    sums = {
        table: connection.execute(f"SELECT coalesce(sum(count), 0) FROM {table}").fetchone()[0]
        for table in (
            "report_groups_hourly",
            "report_groups_hourly_kind",
            "report_groups",
            "report_groups_site",
        )
    }
    assert sums["report_groups_hourly"] == sums["report_groups_hourly_kind"]
    assert sums["report_groups"] == sums["report_groups_site"]
    return reports, sums["report_groups_hourly"], sums["report_groups"]


def backdate(db: Path, days: int, where: str) -> None:
    """Make some reports old, as if received ``days`` ago, counters included."""
    from reporting_endpoint.storage.rollups import prune

    connection = sqlite3.connect(db, isolation_level=None)
    shift = days * 86_400_000
    connection.execute(
        f"UPDATE reports SET received_at = received_at - ?, generated_at = generated_at - ?"
        f" WHERE {where}",
        (shift, shift),
    )
    # Recount the hourly counters from the rows, as migration 0002 does for existing rows; a
    # prune with cut 0 deletes nothing and rebuilds the all-time table from the hourly one.
    connection.execute("DELETE FROM report_groups_hourly")
    connection.execute(
        "INSERT INTO report_groups_hourly SELECT received_at / 3600000, type, coalesce(site,''),"
        " coalesce(origin,''), coalesce(browser,''), coalesce(browser_major,''), coalesce(os,''),"
        " coalesce(reason,''), user_agent, count(*), min(received_at), max(received_at)"
        " FROM reports GROUP BY 1,2,3,4,5,6,7,8,9"
    )
    connection.execute("DELETE FROM report_groups_hourly_kind")
    connection.execute(
        "INSERT INTO report_groups_hourly_kind SELECT hour, type, reason, browser, sum(count),"
        " min(first_seen), max(last_seen) FROM report_groups_hourly GROUP BY 1, 2, 3, 4"
    )
    prune(connection, 0)
    connection.close()


def test_prune_deletes_old_reports_and_keeps_counters_exact(db: Path) -> None:
    backdate(db, 40, "browser = 'Firefox'")
    assert counts(db) == (6, 6, 6)
    code, text = cli("prune", "--db", str(db), "--older-than", "30d")
    assert code == 0
    assert text.startswith("deleted 2 report(s)")
    assert counts(db) == (4, 4, 4)
    code, text = cli("stats", "--db", str(db), "--by", "browser", "--json")
    assert {g["browser"]: g["count"] for g in json.loads(text)["groups"]} == {"HeadlessChrome": 4}


def test_prune_missing_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("prune", "--db", str(tmp_path / "none.db"), "--older-than", "1d")[0] == 2
    assert "no database" in capsys.readouterr().err


def test_running_service_applies_retention(db: Path) -> None:
    backdate(db, 10, "type = 'deprecation'")

    async def scenario() -> int:
        storage = SQLiteStorage(db)
        await storage.start()
        try:
            return await prune_once(storage, days=7)
        finally:
            await storage.stop()

    assert asyncio.run(scenario()) == 1
    assert counts(db) == (5, 5, 5)


def test_retention_runs_at_startup(db: Path) -> None:
    backdate(db, 10, "type = 'deprecation'")
    with TestClient(create_app(Settings(db=db, retention_days=7))) as client:
        assert client.get("/healthz").status_code == 200
    assert counts(db)[0] == 5
