"""``--database`` / ``REPORTING_ENDPOINT_DATABASE``: which store the service and the commands
use, and crash exports in keyset pages."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from reporting_endpoint.app import create_app
from reporting_endpoint.cli import build_parser, main, settings_from_args
from reporting_endpoint.settings import Settings, SettingsError, sqlite_file
from reporting_endpoint.storage import SQLiteStorage, open_storage
from reporting_endpoint.store_commands import command_settings
from tests.conftest import crash_report, post_reports


def cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


@pytest.mark.parametrize(
    ("database", "path"),
    [
        ("r.sqlite3", Path("r.sqlite3")),
        ("/var/lib/r.sqlite3", Path("/var/lib/r.sqlite3")),
        ("sqlite:///var/lib/r.sqlite3", Path("/var/lib/r.sqlite3")),
        ("sqlite://data/r.sqlite3", Path("data/r.sqlite3")),
        ("postgresql://u@/db?host=/run/postgresql", None),
    ],
)
def test_which_database_a_setting_names(database: str, path: Path | None) -> None:
    assert sqlite_file(database) == path


def test_the_data_folder_follows_the_sqlite_file(tmp_path: Path) -> None:
    settings = Settings(db=tmp_path / "ignored.sqlite3", database=f"sqlite://{tmp_path}/r.db")
    assert settings.database_url == f"sqlite://{tmp_path}/r.db"
    assert settings.data_dir == tmp_path / "r.db.data"
    assert Settings(db=tmp_path / "a.db").database_url == str(tmp_path / "a.db")


def test_postgresql_urls_pick_the_postgresql_backend_and_others_are_refused() -> None:
    settings = Settings(database="postgresql://localhost/reports")
    for url in ("postgresql://localhost/reports", "postgres://u@/db?host=/run/pg&port=5433"):
        assert type(open_storage(url, settings)).__name__ == "PostgresStorage"
    with pytest.raises(SettingsError, match="no storage engine"):
        open_storage("mysql://x/y", settings)
    # Nothing listens there: serve names the server instead of failing at startup.
    assert main(["serve", "--database", "postgresql://127.0.0.1:1/reports"]) == 2


def test_the_service_and_the_commands_use_a_sqlite_url(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path}/via-url.sqlite3"
    with TestClient(create_app(Settings(database=url))) as client:
        post_reports(client, [crash_report()] * 2)
    assert (tmp_path / "via-url.sqlite3").is_file()
    code, text = cli("stats", "--database", url, "--json")
    assert code == 0
    assert json.loads(text)["groups"][0]["count"] == 2
    code, text = cli("export", "--database", url)
    assert code == 0 and len(text.splitlines()) == 2
    code, text = cli("prune", "--database", url, "--older-than", "1d")
    assert (code, text.split(";")[0]) == (
        0,
        "deleted 0 report(s) and 0 crash(es) received before 1d",
    )
    assert cli("delete", "--database", url, "--report", "1")[0] == 0
    code, text = cli("export", "--database", url)
    assert len(text.splitlines()) == 1


def test_a_missing_database_is_not_created_by_any_command(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path}/none.sqlite3"
    for command in (["export"], ["stats"], ["prune", "--older-than", "1d"]):
        assert cli(*command, "--database", url)[0] == 2
    assert cli("delete", "--database", url, "--report", "1")[0] == 2
    assert not (tmp_path / "none.sqlite3").exists()


def test_the_variable_names_the_store_and_a_db_flag_beats_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REPORTING_ENDPOINT_DATABASE", f"sqlite://{tmp_path}/env.sqlite3")
    parser = build_parser()
    stats = parser.parse_args(["stats"])
    assert command_settings(stats).database_url == f"sqlite://{tmp_path}/env.sqlite3"
    flagged = parser.parse_args(["stats", "--db", str(tmp_path / "flag.sqlite3")])
    assert command_settings(flagged).database_url == str(tmp_path / "flag.sqlite3")
    serve = parser.parse_args(["serve", "--db", str(tmp_path / "flag.sqlite3")])
    assert settings_from_args(serve).database_url == str(tmp_path / "flag.sqlite3")
    both = parser.parse_args(["serve", "--db", "a.db", "--database", "sqlite:///b.db"])
    assert settings_from_args(both).database_url == "sqlite:///b.db"


def test_crash_export_pages_by_time_then_id(tmp_path: Path) -> None:
    """Crashes are exported oldest first in keyset pages, ties on time broken by id."""
    db = tmp_path / "c.sqlite3"
    storage = SQLiteStorage(db)
    ids = [f"{n:032x}" for n in range(7)]

    async def scenario() -> list[str]:
        from reporting_endpoint.records import NewCrash

        await storage.start()
        try:
            for n, crash_id in enumerate(reversed(ids)):
                await storage.insert_crash(
                    NewCrash(
                        id=crash_id, received_at=1_000 + n // 3, product="App", version="1",
                        guid=None, platform=None, process_type=None, electron_version=None,
                        annotations={}, query={}, dump_sha256="0" * 64, dump_size=1,
                        dump_path="blobs/00/" + "0" * 64, attachments=(), upload_bytes=1,
                    )
                )  # fmt: skip
            return [c["id"] async for c in storage.iter_crashes(page_size=2)]
        finally:
            await storage.stop()

    exported = asyncio.run(scenario())
    expected = sorted(ids, key=lambda i: (1_000 + (6 - ids.index(i)) // 3, i))
    assert exported == expected


def test_messages_show_a_server_database_without_its_password() -> None:
    from reporting_endpoint.storage import shown_database

    assert "secret" not in shown_database("postgresql://u:secret@db.internal/r")
    assert "secret" not in shown_database("postgresql://u@/r?host=/s&password=secret")
    assert shown_database("reports.sqlite3") == "reports.sqlite3"
