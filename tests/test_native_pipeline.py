"""Public dumps through the whole service on both engines: upload, process, upload symbols late,
and the frames Breakpad printed for them; hostile dumps and symbol uploads never give a 5xx."""

from __future__ import annotations

import io
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from reporting_endpoint.app import create_app
from reporting_endpoint.native.dumpfile import read_dump
from reporting_endpoint.settings import Settings
from tests.crashpad_client import MINIDUMPS, content_type, dump_upload
from tests.s3server import S3Server, s3_server  # noqa: F401 (the fixture)
from tests.test_stackwalk import EXPECTED, breakpad_frames

SYMBOLS = MINIDUMPS / "symbols"
READ = {"Authorization": "Bearer read-secret"}
WRITE = {"Authorization": "Bearer write-secret"}
APP = SYMBOLS / "test_app.pdb" / "5A9832E5287241C1838ED98914E9B7FF1" / "test_app.sym"
KERNEL = SYMBOLS / "kernel32.pdb" / "BCE8785C57B44245A669896B6A19B9542" / "kernel32.sym"
NULL_READ = SYMBOLS / "null_read_av" / "7B7D1968FF0D47AE4366E9C3A7E1B6750" / "null_read_av.sym"


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


def upload_crash(client: TestClient, dump: bytes) -> str:
    answer = client.post(
        "/crashpad",
        content=dump_upload(dump, {"prod": "TestApp", "ver": "1.0"}),
        headers={"content-type": content_type()},
    )
    assert answer.status_code == 200, answer.text
    return answer.text


def processed(client: TestClient, crash_id: str, until: Any = None) -> dict[str, Any]:
    analyzer = client.app.state.analyzer  # type: ignore[attr-defined]
    deadline = time.monotonic() + 30
    while True:
        client.portal.call(analyzer.idle)  # type: ignore[union-attr]
        crash: dict[str, Any] = client.get(f"/api/crashes/{crash_id}", headers=READ).json()
        if crash["parse_status"] != "pending" and (until is None or until(crash)):
            return crash
        assert time.monotonic() < deadline, crash
        time.sleep(0.05)


def upload_symbols(client: TestClient, *paths: Path) -> dict[str, Any]:
    files = [("file", (path.name, path.read_bytes(), "text/plain")) for path in paths]
    answer = client.post("/symbols/upload", files=files, headers=WRITE)
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def as_breakpad(frame: dict[str, Any]) -> dict[str, object]:
    file = frame["file"].replace("\\", "/").rsplit("/", 1)[-1] if frame["file"] else None
    return {
        "module": frame["module"],
        "function": frame["function"],
        "file": file,
        "line": frame["line"] if file else None,
        "function_offset": None if file else frame["function_offset"],
        "instruction": frame["instruction"],
        "trust": frame["trust"],
    }


def test_minidump2_symbolicates_to_breakpads_frames_once_its_symbols_arrive(
    client: TestClient,
) -> None:
    crash_id = upload_crash(client, (MINIDUMPS / "win-x86_breakpad_minidump2.dmp").read_bytes())
    before = processed(client, crash_id)
    assert before["signature"] == "EXCEPTION_ACCESS_VIOLATION_WRITE | test_app.exe+0x429e"
    assert all(frame["function"] is None for frame in before["frames"])

    result = upload_symbols(client, APP, KERNEL)
    assert result["requeued"] == 1
    after = processed(client, crash_id, until=lambda c: c["signature"] != before["signature"])
    assert [as_breakpad(frame) for frame in after["frames"]] == breakpad_frames(
        EXPECTED.read_text()
    )
    assert after["signature"] == "`anonymous namespace'::CrashFunction"
    modules = {m["debug_file"]: m["has_symbols"] for m in after["modules"]}
    assert modules["test_app.pdb"] and modules["kernel32.pdb"] and not modules["ntdll.pdb"]
    missing = client.get("/api/symbols/missing", headers=READ).json()["missing"]
    assert "test_app.pdb" not in {m["debug_file"] for m in missing}


def test_null_read_av_names_crash_at_line_18_with_symbols_stored_first(
    client: TestClient,
) -> None:
    upload_symbols(client, NULL_READ)
    dump = (MINIDUMPS / "linux-x64_breakpad_linux_null_read_av.dmp").read_bytes()
    crash = processed(client, upload_crash(client, dump))
    top = [(f["function"], f["line"], f["trust"]) for f in crash["frames"][:2]]
    assert top == [("crash()", 18, "context"), ("main", 27, "cfi")]
    assert crash["frames"][0]["file"].endswith("null_read_av.cc")
    assert crash["signature"] == "crash"
    # libc had no symbols: it is what this crash still misses.
    missing = client.get("/api/symbols/missing", headers=READ).json()["missing"]
    assert [m["debug_file"] for m in missing] == ["libc-2.13.so"]


def hostile_dumps() -> list[tuple[str, bytes]]:
    path = MINIDUMPS / "linux-x64_breakpad_linux_null_read_av.dmp"
    good = path.read_bytes()
    dump = read_dump(path)
    assert dump.crashing_thread_id is not None
    thread = dump.thread(dump.crashing_thread_id)
    assert thread is not None and thread.stack is not None
    stack = thread.stack
    # Every word of the crashing thread's stack points back into the stack: frame pointers
    # and scanned return addresses that go round in circles.
    cyclic = bytearray(good)
    for at in range(0, stack.size - 8, 8):
        target = stack.base + (at + 16) % stack.size
        cyclic[stack.offset + at : stack.offset + at + 8] = target.to_bytes(8, "little")
    return [
        ("truncated", good[: len(good) // 2]),
        ("header only", good[:32]),
        ("cyclic stack", bytes(cyclic)),
        ("stack cut short", good[: stack.offset + stack.size // 3]),
    ]


def test_hostile_dumps_are_processed_without_an_error_page(client: TestClient) -> None:
    for name, dump in hostile_dumps():
        started = time.monotonic()
        crash = processed(client, upload_crash(client, dump))
        assert crash["parse_status"] in {"parsed", "failed"}, name
        assert time.monotonic() - started < 10, name
        assert len(crash["frames"]) <= 128, name
        page = client.get(f"/api/crashes/{crash['id']}", headers=READ)
        assert page.status_code == 200, name


def zipped(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


HOSTILE_UPLOADS = {
    "bomb.zip": (lambda: zipped({"a.sym": b"MODULE " + b"0" * (64 * 2**20)}), "zip_bomb"),
    "escape.zip": (lambda: zipped({"../../etc/evil.sym": APP.read_bytes()}), "zip_path_escapes"),
    "junk.sym": (lambda: b"MODULE windows x86 NOT-AN-ID test_app.pdb\n", "bad_module_line"),
    "random.bin": (lambda: bytes(range(256)) * 64, "not_a_symbol_file"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_UPLOADS))
def test_hostile_symbol_uploads_are_refused_with_their_code_and_nothing_is_stored(
    client: TestClient, name: str
) -> None:
    make, code = HOSTILE_UPLOADS[name]
    body = make()
    started = time.monotonic()
    answer = client.post(
        "/symbols/upload", files=[("file", (name, body, "application/zip"))], headers=WRITE
    )
    assert (answer.status_code, answer.json()["error"]["code"]) == (400, code)
    assert time.monotonic() - started < 20
    assert client.get("/api/symbols", headers=READ).json()["symbols"] == []


PAYLOAD = '<img src=x onerror="window.pwned=1">'


def test_module_names_from_a_dump_are_shown_escaped_on_the_dashboard(
    database_url: str, tmp_path: Path
) -> None:
    """Module paths come from the uploader's dump: the crash page shows them as text."""
    from tests.dashboard_session import dashboard_client, dashboard_settings, login
    from tests.native_dumps import SynthDump, SynthModule, SynthThread, amd64_context, words

    base, sp = 0x5555_0000_0000, 0x7FFF_0000_0000
    dump = SynthDump(
        "amd64",
        modules=[SynthModule(base, 0x10000, f"/opt/{PAYLOAD}/app", bytes(range(1, 21)))],
        threads=[
            SynthThread(3, amd64_context({"rip": base + 0x1234, "rsp": sp}), sp, words([0] * 8))
        ],
        exception_thread=3,
    ).build()
    settings = dashboard_settings(database_url, tmp_path, processors=1)
    with dashboard_client(settings) as client:
        crash_id = upload_crash(client, dump)
        crash = processed(client, crash_id)
        assert crash["frames"][0]["module"] == f"{PAYLOAD}/app".rsplit("/", 1)[-1]
        assert any(PAYLOAD in m["code_file"] for m in crash["modules"])
        assert login(client).status_code == 303
        page = client.get(f"/dashboard/crashes/{crash_id}")
    assert page.status_code == 200
    assert "onerror=" not in page.text.replace("onerror=&#34;", "")
    assert "&lt;img src=x onerror=&#34;window.pwned=1&#34;&gt;" in page.text
    assert "context" in page.text


def test_symbols_the_store_lacks_are_fetched_from_an_upstream_server(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A processor asks the configured symbol server for the modules the walk needed, walks
    again with what came, and the next crash of that build is served from the local cache."""
    from tests.test_symbol_upstream import Answer, SymbolServer

    # With a database server the cache lives in the working directory's data folder.
    monkeypatch.chdir(tmp_path)

    upstream = SymbolServer().start()
    try:
        for path in (APP, KERNEL):
            key = tuple(path.relative_to(SYMBOLS).parts)
            upstream.answers["/" + "/".join(key)] = Answer(200, path.read_bytes())
        settings = Settings(
            database=database_url,
            db=tmp_path / "unused.sqlite3",
            blob_store=str(tmp_path / "blobs"),
            read_token="read-secret",
            write_token="write-secret",
            processors=1,
            symbol_servers=(upstream.url,),
        )
        dump = (MINIDUMPS / "win-x86_breakpad_minidump2.dmp").read_bytes()
        with TestClient(create_app(settings)) as client:
            first = processed(client, upload_crash(client, dump))
            asked = dict(upstream.hits)
            second = processed(client, upload_crash(client, dump))
            # Fetched symbols are a cache, not an upload: the store lists none.
            listed = client.get("/api/symbols", headers=READ).json()["symbols"]
    finally:
        upstream.stop()
    assert listed == []
    expected = breakpad_frames(EXPECTED.read_text())
    for crash in (first, second):
        assert [as_breakpad(frame) for frame in crash["frames"]] == expected
        assert crash["signature"] == "`anonymous namespace'::CrashFunction"
    # Each module once, for the first crash; the second came from the cache (hits unchanged
    # for the found ones; modules no server has are remembered as misses).
    app_path = "/test_app.pdb/5A9832E5287241C1838ED98914E9B7FF1/test_app.sym"
    assert asked[app_path] == 1 and upstream.hits[app_path] == 1
    assert upstream.hits == asked


def test_with_s3_symbol_blobs_are_downloaded_once_and_kept_locally(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    s3_server: S3Server,  # noqa: F811 (the fixture)
) -> None:
    """On a bucket each symbol file is downloaded once per host (content addressed, so the copy
    never goes stale): the second crash symbolicates with the bucket's copies gone."""
    import uuid

    from reporting_endpoint.blobstores.base import key_for

    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    settings = Settings(
        db=tmp_path / "r.sqlite3",
        blob_store=f"s3://{s3_server.bucket}/symbols/{uuid.uuid4().hex}",
        read_token="read-secret",
        write_token="write-secret",
        processors=1,
    )
    dump = (MINIDUMPS / "win-x86_breakpad_minidump2.dmp").read_bytes()
    expected = breakpad_frames(EXPECTED.read_text())
    with TestClient(create_app(settings)) as client:
        stored = upload_symbols(client, APP, KERNEL)["stored"]
        first = processed(client, upload_crash(client, dump))
        assert [as_breakpad(frame) for frame in first["frames"]] == expected
        cached = sorted(path.name for path in (settings.data_dir / "symbol-blobs").iterdir())
        listed = client.get("/api/symbols", headers=READ).json()["symbols"]
        assert cached == sorted(s["sym_sha256"] for s in listed) and len(stored) == 2
        blobs = client.app.state.blobs  # type: ignore[attr-defined]
        for sha in cached:
            client.portal.call(blobs.delete, key_for(sha))  # type: ignore[union-attr]
        second = processed(client, upload_crash(client, dump))
        assert [as_breakpad(frame) for frame in second["frames"]] == expected
