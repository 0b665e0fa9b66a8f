"""The whole loop on a real crash: gcc build, real Crashpad handler, upload, symbols, regroup."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tests.crashpad_client import find_handlers
from tests.native_program import build, crash_and_upload, line_of
from tests.servers import running_service

HANDLERS = find_handlers()
READ, WRITE = "read-token", "write-token"
ENV = {"REPORTING_ENDPOINT_READ_TOKEN": READ, "REPORTING_ENDPOINT_WRITE_TOKEN": WRITE}
ANNOTATIONS = {"prod": "Crasher", "ver": "1.0.0", "_productName": "Crasher", "_version": "1.0.0"}

pytestmark = [
    pytest.mark.skipif(not HANDLERS, reason="no Crashpad handler: install chromium"),
    pytest.mark.skipif(
        __import__("shutil").which("gcc") is None, reason="gcc is missing: apt-get install gcc"
    ),
]


def _auth(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def _crash(url: str, crash_id: str, *, until: Any = None, timeout: float = 30) -> dict[str, Any]:
    """The crash as the API answers it, once processed (and ``until(crash)`` holds)."""
    deadline = time.monotonic() + timeout
    while True:
        crash: dict[str, Any] = httpx2.get(
            f"{url}/api/crashes/{crash_id}", headers=_auth(READ)
        ).json()
        done = crash.get("parse_status") == "parsed" and (until is None or until(crash))
        if done or time.monotonic() > deadline:
            return crash
        time.sleep(0.1)


def _upload_symbols(url: str, path: Path) -> dict[str, Any]:
    with open(path, "rb") as file:
        answer = httpx2.post(
            f"{url}/symbols/upload",
            files={"symbols": (path.name, file, "application/octet-stream")},
            headers=_auth(WRITE),
            timeout=60,
        )
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def _issue(url: str, issue_id: int) -> dict[str, Any]:
    answer = httpx2.get(f"{url}/api/issues/{issue_id}", headers=_auth(READ))
    assert answer.status_code == 200, answer.text
    issue: dict[str, Any] = answer.json()
    return issue


def _named(frames: list[dict[str, Any]]) -> list[tuple[str | None, int | None]]:
    return [(frame.get("function"), frame.get("line")) for frame in frames]


def test_a_real_crash_symbolicates_once_its_elf_is_uploaded_and_a_rebuild_joins_its_issue(
    tmp_path: Path,
) -> None:
    handler = HANDLERS.get("debian") or next(iter(HANDLERS.values()))
    binary, source = build(tmp_path / "v1")
    expected = [
        ("level3", line_of(source, "return *pointer + 1;")),
        ("level2", line_of(source, "return level3(pointer) * 2;")),
        ("level1", line_of(source, "return level2(pointer) + 7;")),
    ]
    with running_service(tmp_path / "s.sqlite3", env=ENV) as server:
        first = crash_and_upload(
            binary, handler, tmp_path / "db1", server.url + "/crashpad", ANNOTATIONS
        )
        before = _crash(server.url, first)
        # Without symbols: module+offset of the instruction, and the module is listed missing.
        assert before["parse_status"] == "parsed"
        assert before["signature"].startswith("SIGSEGV | crasher+0x"), before["signature"]
        crasher = [m for m in before["modules"] if m["code_file"].endswith("/crasher")]
        assert len(crasher) == 1 and crasher[0]["has_symbols"] is False
        assert crasher[0]["debug_file"] == "crasher" and len(crasher[0]["debug_id"]) == 33
        missing = httpx2.get(f"{server.url}/api/symbols/missing", headers=_auth(READ)).json()
        assert any(
            entry["debug_id"] == crasher[0]["debug_id"] and entry["crashes"] == 1
            for entry in missing["missing"]
        ), missing
        old_title = _issue(server.url, before["issue_id"])["title"]
        assert "crasher+0x" in old_title, old_title

        # The ELF itself is the debug file: converted on upload, and the crash re-processed.
        stored = _upload_symbols(server.url, binary)
        assert [(s["debug_file"], s["debug_id"]) for s in stored["stored"]] == [
            ("crasher", crasher[0]["debug_id"])
        ]
        assert stored["requeued"] == 1
        after = _crash(server.url, first, until=lambda c: c["signature"] != before["signature"])
        assert _named(after["frames"][:3]) == expected, after["frames"][:4]
        assert [frame["trust"] for frame in after["frames"][:3]] == ["context", "cfi", "cfi"]
        assert after["frames"][0]["file"].endswith("crasher.c")
        assert after["signature"] == "level3"
        # Regrouped: the crash left its module+offset issue for one named by the function.
        issue = _issue(server.url, after["issue_id"])
        assert "level3" in issue["title"] and "crasher+0x" not in issue["title"], issue
        assert issue["count"] == 1
        assert [m["has_symbols"] for m in after["modules"] if m["debug_file"] == "crasher"] == [
            True
        ]

        # A second build with an unrelated change: other offsets, another build id, same bug.
        binary2, source2 = build(
            tmp_path / "v2",
            extra="".join(f"int unrelated{n}(int x) {{ return x * {n} + 1; }}\n" for n in range(9)),
        )
        assert line_of(source2, "return *pointer + 1;") != expected[0][1]
        _upload_symbols(server.url, binary2)
        second = crash_and_upload(
            binary2, handler, tmp_path / "db2", server.url + "/crashpad", ANNOTATIONS
        )
        again = _crash(server.url, second)
        assert again["modules"] and again["signature"] == "level3", again["signature"]
        assert again["issue_id"] == after["issue_id"]
        assert _issue(server.url, after["issue_id"])["count"] == 2
        assert again["frames"][0]["module_offset"] != after["frames"][0]["module_offset"]
