"""The three Crashpad upload bodies of issue 14, built from the real capture and the public dumps.

(1) capture b (Debian's chrome_crashpad_handler uploading a public Electron dump) with its 7
handler annotations added as form fields, sorted, before the file part; (2) the same with the
dump replaced by the largest public dump; (3) (2) plus the other 19 valid public dumps as
attachment parts. Each gzip-compressed at level 6, as Crashpad sends it. The dumps are the public
samples in tests/fixtures/minidumps (attribution in SOURCES.md there).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
CAPTURE = FIXTURES / "crashpad" / "b_debian_gzip-chunked_win-electron-dump"
MINIDUMPS = FIXTURES / "minidumps"


@dataclass(frozen=True)
class Body:
    name: str
    content_type: str
    gzip: bytes
    unpacked: int
    files: int


def _capture() -> tuple[bytes, bytes, dict[str, str]]:
    """(boundary, the capture's multipart body, its handler annotations)."""
    headers = json.loads((CAPTURE / "headers.json").read_text())
    content_type = dict(headers["headers"])["Content-Type"]
    boundary = content_type.split("boundary=", 1)[1].encode()
    multipart = gzip.decompress((CAPTURE / "body.raw").read_bytes())
    annotations = dict(
        arg.removeprefix("--annotation=").split("=", 1)
        for arg in headers["handler_args"]
        if arg.startswith("--annotation=")
    )
    return boundary, multipart, annotations


def _field(boundary: bytes, name: str, value: str) -> bytes:
    return (
        b"--" + boundary + b'\r\nContent-Disposition: form-data; name="' + name.encode()
        + b'"\r\n\r\n' + value.encode() + b"\r\n"
    )  # fmt: skip


def _file(boundary: bytes, name: str, filename: str, data: bytes) -> bytes:
    return (
        b"--" + boundary + b'\r\nContent-Disposition: form-data; name="' + name.encode()
        + b'"; filename="' + filename.encode() + b'"\r\nContent-Type: application/octet-stream'
        b"\r\n\r\n" + data + b"\r\n"
    )  # fmt: skip


def valid_dumps() -> list[Path]:
    """The public dumps a parser reads (the ``bad_`` ones are fuzzing leftovers), largest first."""
    dumps = [p for p in MINIDUMPS.glob("*.dmp") if not p.name.startswith("bad_")]
    return sorted(dumps, key=lambda p: (-p.stat().st_size, p.name))


def bodies() -> list[Body]:
    boundary, multipart, annotations = _capture()
    fields = b"".join(_field(boundary, k, v) for k, v in sorted(annotations.items()))
    content_type = "multipart/form-data; boundary=" + boundary.decode()
    first = fields + multipart
    # The capture's file part, its dump swapped for the largest public dump.
    captured_dump = (MINIDUMPS / "win-x64_electron_node-minidump_windows.dmp").read_bytes()
    largest, *others = valid_dumps()
    assert multipart.count(captured_dump) == 1
    second = first.replace(captured_dump, largest.read_bytes())
    closing = b"--" + boundary + b"--\r\n"
    assert second.endswith(closing)
    attachments = b"".join(
        _file(boundary, f"attachment_{n}", dump.name, dump.read_bytes())
        for n, dump in enumerate(others)
    )
    third = second[: -len(closing)] + attachments + closing
    return [
        Body(name, content_type, gzip.compress(raw, compresslevel=6), len(raw), files)
        for name, raw, files in (
            ("(1) capture b + 7 annotations", first, 1),
            ("(2) largest public dump", second, 1),
            ("(3) (2) + 19 attachments", third, 20),
        )
    ]


if __name__ == "__main__":
    for body in bodies():
        print(f"{body.name}: {len(body.gzip) / 1024:.0f} KB gzip, {body.unpacked / 1024:.0f} KB"
              f" unpacked, {body.files} file part(s)")  # fmt: skip
