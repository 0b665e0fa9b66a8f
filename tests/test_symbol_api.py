"""Symbols over HTTP: uploads (a .sym, Electron's symbols zip) read back byte for byte at their
Breakpad path, tokens, the size cap, bad files refused whole, the /api lists; on a real service
and on both storage engines."""

from __future__ import annotations

import io
import re
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from starlette.testclient import TestClient

from reporting_endpoint.app import create_app
from reporting_endpoint.settings import Settings
from tests.crashpad_client import MINIDUMPS, content_type, dump_upload, multipart
from tests.servers import running_service

SYMBOLS = MINIDUMPS / "symbols"
READ = {"Authorization": "Bearer read-secret"}
WRITE = {"Authorization": "Bearer write-secret"}
TOKENS = {
    "REPORTING_ENDPOINT_READ_TOKEN": "read-secret",
    "REPORTING_ENDPOINT_WRITE_TOKEN": "write-secret",
}
APP = ("test_app.pdb", "5A9832E5287241C1838ED98914E9B7FF1", "test_app.sym")
KERNEL = ("kernel32.pdb", "BCE8785C57B44245A669896B6A19B9542", "kernel32.sym")
NULL_READ = ("null_read_av", "7B7D1968FF0D47AE4366E9C3A7E1B6750", "null_read_av.sym")
ALL = (APP, KERNEL, NULL_READ)
UPLOADED_FIELDS = {"debug_file", "debug_id", "name", "code_file", "code_id", "os", "arch", "path"}


def sym(key: tuple[str, str, str]) -> bytes:
    return (SYMBOLS / key[0] / key[1] / key[2]).read_bytes()


def breakpad_path(key: tuple[str, str, str]) -> str:
    return "/symbols/" + "/".join(key)


def fresh_sym() -> tuple[tuple[str, str, str], bytes]:
    """test_app.sym under a debug id no other test uses."""
    debug_id = uuid.uuid4().hex.upper() + "1"
    head, rest = sym(APP).split(b"\n", 1)
    return ("test_app.pdb", debug_id, "test_app.sym"), re.sub(
        rb"[0-9A-F]{33}", debug_id.encode(), head
    ) + b"\n" + rest


def electron_zip(*keys: tuple[str, str, str]) -> bytes:
    """Electron's release asset electron-vX-<platform>-symbols.zip: breakpad_symbols/ with
    one <debug_file>/<debug_id>/<name> tree per module, and a few files that are not symbols."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("LICENSE", "MIT\n")
        archive.writestr("LICENSES.chromium.html", "<html></html>\n")
        for key in keys:
            archive.writestr("breakpad_symbols/" + "/".join(key), sym(key))
    return buffer.getvalue()


def upload(
    client: TestClient | httpx2.Client, *files: tuple[str, bytes], headers: dict[str, str] = WRITE
) -> Any:
    parts = [
        ("upload_file_symbols", (name, body, "application/octet-stream")) for name, body in files
    ]
    return client.post("/symbols/upload", files=parts, headers=headers)


def workspaces_left(data_dir: Path) -> list[Path]:
    return list((data_dir / "tmp").glob("symbols-*"))


@pytest.fixture
def client(database_url: str, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(
        database=database_url,
        db=tmp_path / "unused.sqlite3",
        blob_store=str(tmp_path / "blobs"),
        read_token="read-secret",
        write_token="write-secret",
        processors=1,
    )
    with TestClient(create_app(settings)) as test_client:
        yield test_client


# --- on a real service ----------------------------------------------------------------------


def test_a_sym_uploaded_is_served_back_byte_for_byte_at_its_breakpad_path(
    tmp_path: Path,
) -> None:
    db = tmp_path / "s.sqlite3"
    with running_service(db, env=TOKENS) as server, httpx2.Client(base_url=server.url) as http:
        response = upload(http, ("test_app.sym", sym(APP)))
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["requeued"] == 0
        (stored,) = answer["stored"]
        assert set(stored) == UPLOADED_FIELDS
        assert (stored["debug_file"], stored["debug_id"], stored["name"]) == APP
        assert (stored["os"], stored["arch"]) == ("windows", "x86")
        assert stored["path"] == "/".join(APP)

        fetched = http.get(breakpad_path(APP), headers=READ)
        assert fetched.status_code == 200
        assert fetched.headers["content-type"].startswith("text/plain")
        assert fetched.content == sym(APP)
        assert int(fetched.headers["content-length"]) == len(sym(APP))
        # Some symbol clients ask for the id in lower case.
        lower = f"/symbols/{APP[0]}/{APP[1].lower()}/{APP[2]}"
        assert http.get(lower, headers=READ).content == sym(APP)
    assert workspaces_left(tmp_path / "s.sqlite3.data") == []


def test_electron_symbols_zip_over_a_real_service(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite3"
    with running_service(db, env=TOKENS) as server, httpx2.Client(base_url=server.url) as http:
        response = upload(http, ("electron-v30.0.0-win32-ia32-symbols.zip", electron_zip(*ALL)))
        assert response.status_code == 200, response.text
        stored = {(s["debug_file"], s["debug_id"], s["name"]) for s in response.json()["stored"]}
        assert stored == set(ALL)
        for key in ALL:
            assert http.get(breakpad_path(key), headers=READ).content == sym(key)


def test_the_size_cap_is_413_declared_or_streamed_and_stores_nothing(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite3"
    cap = ["--symbol-upload-max-bytes", "500000"]
    with (
        running_service(db, env=TOKENS, args=cap) as server,
        httpx2.Client(base_url=server.url) as http,
    ):
        declared = upload(http, ("test_app.sym", sym(APP)))  # 818 KB, Content-Length sent
        assert declared.status_code == 413
        assert declared.json()["error"]["code"] == "body_too_large"

        body = multipart(files=[("symbols", "test_app.sym", sym(APP))])

        def chunks() -> Iterator[bytes]:
            for start in range(0, len(body), 65536):
                yield body[start : start + 65536]

        streamed = http.post(
            "/symbols/upload",
            content=chunks(),  # chunked: no Content-Length, counted as it arrives
            headers={**WRITE, "Content-Type": content_type()},
        )
        assert streamed.status_code == 413
        assert streamed.json()["error"]["code"] == "body_too_large"
        assert http.get(breakpad_path(APP), headers=READ).status_code == 404
        # Under the cap it is taken.
        assert upload(http, ("kernel32.sym", sym(NULL_READ))).status_code == 200
    assert workspaces_left(tmp_path / "s.sqlite3.data") == []


def test_uploads_need_the_write_token_and_reads_the_read_token(tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite3"
    only_read = {"REPORTING_ENDPOINT_READ_TOKEN": "read-secret"}
    with running_service(db, env=only_read) as server, httpx2.Client(base_url=server.url) as http:
        refused = upload(http, ("test_app.sym", sym(APP)), headers=READ)
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "write_api_disabled"
    with running_service(db, env=TOKENS) as server, httpx2.Client(base_url=server.url) as http:
        for headers in ({}, READ, {"Authorization": "Bearer nope"}):
            refused = upload(http, ("test_app.sym", sym(APP)), headers=headers)
            assert refused.status_code == 401
            assert refused.json()["error"]["code"] == "invalid_token"
        assert upload(http, ("test_app.sym", sym(APP))).status_code == 200
        for headers in ({}, WRITE):
            refused_read = http.get(breakpad_path(APP), headers=headers)
            assert refused_read.status_code == 401
            assert refused_read.json()["error"]["code"] == "invalid_token"
            assert http.get("/api/symbols", headers=headers).status_code == 401
        assert http.get(breakpad_path(APP), headers=READ).content == sym(APP)


# --- on both storage engines ----------------------------------------------------------------


def test_a_bad_file_refuses_the_whole_upload_with_the_unpackers_code(
    client: TestClient, tmp_path: Path
) -> None:
    from reporting_endpoint.native.symbol_upload import SymbolUploadError, unpack_symbols

    garbage = b"this is not a symbol file\x00\x01\x02" * 100
    (tmp_path / "garbage.dll").write_bytes(garbage)
    (tmp_path / "work").mkdir()
    with pytest.raises(SymbolUploadError) as expected:
        unpack_symbols(tmp_path / "garbage.dll", "garbage.dll", tmp_path / "work")

    key, good = fresh_sym()
    response = upload(client, ("test_app.sym", good), ("garbage.dll", garbage))
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(response.json()) == {"error"} and set(error) == {"code", "message"}
    assert error["code"] == expected.value.code
    assert "garbage.dll" in error["message"]
    # The good file of the same upload was not stored either.
    assert client.get(breakpad_path(key), headers=READ).status_code == 404
    listed = client.get("/api/symbols", headers=READ).json()["symbols"]
    assert key[1] not in {s["debug_id"] for s in listed}


@pytest.mark.parametrize(
    ("content_type", "body", "status", "code"),
    [
        ("application/json", b"{}", 415, "unsupported_media_type"),
        ("multipart/form-data", b"x", 400, "no_boundary"),
        (
            "multipart/form-data; boundary=b",
            b'--b\r\nContent-Disposition: form-data; name="a"\r\n\r\nvalue\r\n--b--\r\n',
            400,
            "no_symbol_files",
        ),
        (
            "multipart/form-data; boundary=b",
            b'--b\r\nContent-Disposition: form-data; name="f"; filename="a.sym"\r\n\r\nMODU',
            400,
            "truncated",
        ),
    ],
    ids=["json", "no-boundary", "no-file", "truncated"],
)
def test_bodies_that_are_not_an_upload_are_refused_with_a_code(
    client: TestClient, content_type: str, body: bytes, status: int, code: str
) -> None:
    response = client.post(
        "/symbols/upload", content=body, headers={**WRITE, "Content-Type": content_type}
    )
    assert response.status_code == status
    assert response.json()["error"]["code"] == code


def test_the_symbol_server_path_answers_404_in_the_error_shape(client: TestClient) -> None:
    assert upload(client, ("test_app.sym", sym(APP))).status_code == 200
    for path in (
        breakpad_path(("test_app.pdb", "0" * 33, "test_app.sym")),
        breakpad_path((APP[0], APP[1], "other.sym")),  # its name is part of the path
        "/symbols/" + "x" * 600 + f"/{APP[1]}/test_app.sym",
    ):
        response = client.get(path, headers=READ)
        assert response.status_code == 404
        assert response.json() == {
            "error": {"code": "symbol_not_found", "message": "no symbol file at that path"}
        }
    assert client.get(breakpad_path(APP), headers=READ).content == sym(APP)


def test_uploading_again_replaces_and_the_list_pages_by_key(client: TestClient) -> None:
    assert upload(client, ("all.zip", electron_zip(*ALL))).status_code == 200
    assert upload(client, ("test_app.sym", sym(APP))).status_code == 200  # same module again
    first = client.get("/api/symbols?limit=2", headers=READ).json()
    assert len(first["symbols"]) == 2 and first["next_cursor"]
    rest = client.get(f"/api/symbols?limit=2&cursor={first['next_cursor']}", headers=READ).json()
    listed = [*first["symbols"], *rest["symbols"]]
    assert [(s["debug_file"], s["debug_id"]) for s in listed] == sorted(
        (key[0], key[1]) for key in ALL
    )
    for entry in listed:
        key = (entry["debug_file"], entry["debug_id"], entry["name"])
        assert entry["path"] == "/".join(key)
        assert entry["sym_size"] == len(sym(key))
        assert entry["source"] == "upload"
        assert entry["uploaded_at"] > 1_600_000_000_000
        assert re.fullmatch(r"[0-9a-f]{64}", entry["sym_sha256"])
    for query, code in (
        ("?limit=0", "invalid_limit"),
        ("?cursor=bm9wZQ", "invalid_cursor"),
        ("?debug_file=x", "unknown_parameter"),
        ("?limit=1&limit=2", "repeated_parameter"),
    ):
        response = client.get(f"/api/symbols{query}", headers=READ)
        assert response.status_code == 400
        assert response.json()["error"]["code"] == code


def test_missing_symbols_are_listed_until_uploaded_and_the_crash_is_requeued(
    client: TestClient,
) -> None:
    empty = client.get("/api/symbols/missing", headers=READ)
    assert empty.status_code == 200 and empty.json() == {"missing": []}
    assert client.get("/api/symbols/missing?limit=x", headers=READ).status_code == 400

    # A crash whose modules have no symbols: processed, it names what it missed.
    body = dump_upload((MINIDUMPS / "win-x86_breakpad_minidump2.dmp").read_bytes())
    crash = client.post("/crashpad", content=body, headers={"Content-Type": content_type()})
    assert crash.status_code == 200
    analyzer = client.app.state.analyzer  # type: ignore[attr-defined]
    deadline = time.monotonic() + 30
    missing: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        client.portal.call(analyzer.idle)  # type: ignore[union-attr]
        missing = client.get("/api/symbols/missing", headers=READ).json()["missing"]
        if any(m["debug_file"] == APP[0] for m in missing):
            break
        time.sleep(0.1)
    (needed,) = [m for m in missing if m["debug_file"] == APP[0]]
    assert set(needed) == {"debug_file", "debug_id", "code_file", "crashes", "last_seen"}
    assert (needed["debug_id"], needed["crashes"]) == (APP[1], 1)

    response = upload(client, ("test_app.sym", sym(APP)))
    assert response.status_code == 200
    assert response.json()["requeued"] == 1
    missing = client.get("/api/symbols/missing", headers=READ).json()["missing"]
    assert APP[0] not in {m["debug_file"] for m in missing}
