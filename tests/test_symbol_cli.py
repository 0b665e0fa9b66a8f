"""``reporting-endpoint symbols upload|list|missing`` on both storage engines: a dump_syms
--store tree uploaded from the command line is what the service then serves and lists."""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from reporting_endpoint.app import create_app
from reporting_endpoint.cli import main
from reporting_endpoint.settings import Settings
from tests.crashpad_client import MINIDUMPS

SYMBOLS = MINIDUMPS / "symbols"
READ = {"Authorization": "Bearer read-secret"}
APP = ("test_app.pdb", "5A9832E5287241C1838ED98914E9B7FF1", "test_app.sym")
KERNEL = ("kernel32.pdb", "BCE8785C57B44245A669896B6A19B9542", "kernel32.sym")
NULL_READ = ("null_read_av", "7B7D1968FF0D47AE4366E9C3A7E1B6750", "null_read_av.sym")
ALL = (APP, KERNEL, NULL_READ)


def cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(args), out=out)
    return code, out.getvalue()


def sym(key: tuple[str, str, str]) -> bytes:
    return (SYMBOLS / key[0] / key[1] / key[2]).read_bytes()


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Iterator[Settings]:
    settings = Settings(
        database=database_url,
        blob_store=str(tmp_path / "blobs"),
        read_token="read-secret",
        processors=0,
    )
    # The service made the database (the commands refuse one that is not this service's).
    with TestClient(create_app(settings)):
        pass
    yield settings


def store_flags(settings: Settings) -> list[str]:
    return ["--database", settings.database_url, "--blob-store", str(settings.blob_store)]


def store_tree(tmp_path: Path) -> Path:
    """dump_syms --store output: <debug_file>/<debug_id>/<name>.sym, plus a stray file."""
    tree = tmp_path / "symbols"
    shutil.copytree(SYMBOLS, tree)
    (tree / "README.txt").write_text("not a symbol file\n")
    return tree


def test_a_store_tree_uploaded_from_the_cli_is_served_and_listed(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = cli("symbols", "upload", str(store_tree(tmp_path)), *store_flags(settings))
    assert code == 0, capsys.readouterr().err
    for key in ALL:
        assert "/".join(key) in out
    assert out.rstrip().endswith("stored 3 symbol file(s); 0 crash(es) re-queued for processing")

    code, out = cli("symbols", "list", *store_flags(settings)[:2])
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["path", "os", "arch"]
    assert sorted(line.split()[0] for line in lines[1:]) == sorted("/".join(k) for k in ALL)

    code, out = cli("symbols", "list", "--json", "--limit", "2", *store_flags(settings)[:2])
    assert code == 0
    listed = json.loads(out)["symbols"]
    assert len(listed) == 2
    assert {"path", "debug_file", "debug_id", "sym_sha256", "sym_size"} <= set(listed[0])

    # The service on the same database and blob store serves what the command stored.
    with TestClient(create_app(settings)) as client:
        for key in ALL:
            response = client.get("/symbols/" + "/".join(key), headers=READ)
            assert response.status_code == 200
            assert response.content == sym(key)
    data_dir = settings.data_dir
    assert not list((data_dir / "tmp").glob("symbols-*"))


def test_zips_and_single_files_are_taken_too(settings: Settings, tmp_path: Path) -> None:
    archive = tmp_path / "electron-v30.0.0-win32-ia32-symbols.zip"
    with zipfile.ZipFile(archive, "w") as out:
        out.writestr("breakpad_symbols/" + "/".join(KERNEL), sym(KERNEL))
    single = tmp_path / "test_app.sym"
    single.write_bytes(sym(APP))
    code, out = cli(
        "symbols", "upload", str(archive), str(single), "--json", *store_flags(settings)
    )
    assert code == 0
    answer = json.loads(out)
    assert {(s["debug_file"], s["debug_id"], s["name"]) for s in answer["stored"]} == {APP, KERNEL}
    assert answer["requeued"] == 0


def test_a_bad_file_exits_2_with_one_line_and_stores_nothing(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "broken.sym"
    bad.write_bytes(b"\x7fELF but not really\n")
    code, _ = cli("symbols", "upload", str(store_tree(tmp_path)), str(bad), *store_flags(settings))
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("reporting-endpoint symbols upload: broken.sym: ")
    assert "nothing was stored" in err
    code, out = cli("symbols", "list", "--json", *store_flags(settings)[:2])
    assert json.loads(out) == {"symbols": []}


def test_bad_arguments_exit_2(
    settings: Settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _ = cli("symbols", "upload", str(tmp_path / "nope.sym"), *store_flags(settings))
    assert code == 2
    assert "nope.sym" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _ = cli("symbols", "upload", str(empty), *store_flags(settings))
    assert code == 2
    assert "no symbol file found" in capsys.readouterr().err
    code, _ = cli("symbols", "list", "--limit", "0", *store_flags(settings)[:2])
    assert code == 2
    single = tmp_path / "test_app.sym"
    single.write_bytes(sym(APP))
    # A database that is not there is refused before anything is written.
    code, _ = cli("symbols", "upload", str(single), "--db", str(tmp_path / "typo.sqlite3"))
    assert code == 2
    assert not (tmp_path / "typo.sqlite3").exists()


def test_missing_prints_a_table_and_json(settings: Settings) -> None:
    code, out = cli("symbols", "missing", *store_flags(settings)[:2])
    assert code == 0
    assert out.splitlines()[0].split() == [
        "debug_file", "debug_id", "code_file", "crashes", "last_seen"
    ]  # fmt: skip
    assert out.rstrip().endswith("(no crash is waiting for symbols)")
    code, out = cli("symbols", "missing", "--json", *store_flags(settings)[:2])
    assert code == 0
    assert json.loads(out) == {"missing": []}
