"""Where an upload's time goes: the three bodies of crashpad_bodies.py through the real app,
in this process, under cProfile (no HTTP, no load generator: the handler's own work).

Prints, per body, the wall time per upload and the profile's own time grouped by step: gunzip,
multipart parsing, hashing, temp files (create, write, unlink), fsync, rename, the row commit
(the awaited storage write: its inserts and the COMMIT's fsync on the writer thread show as
waiting), and everything else. Usage: python benchmarks/crashpad_profile.py [--uploads 200]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from crashpad_bodies import Body, bodies

from reporting_endpoint.app import create_app
from reporting_endpoint.settings import Settings

# (step, substring of "file:line(function)" in the profile)
STEPS = (
    ("gunzip", "zlib.Decompress"),
    ("multipart", "python_multipart"),
    ("hashing", "sha256"),
    ("hashing", "_hashlib"),
    ("temp files", "mkstemp"),
    ("temp files", "BufferedWriter"),
    ("temp files", "posix.unlink"),
    ("temp files", "posix.open"),
    ("temp files", "fdopen"),
    ("fsync", "posix.fsync"),
    ("rename", "posix.replace"),
    ("utime", "posix.utime"),
    ("row commit (waiting)", "select.epoll"),
    ("row commit (waiting)", "lock' objects}"),
    ("row commit (waiting)", "_thread.lock"),
)

TOP = 8


async def upload(app: Any, body: Body) -> int:
    chunks = [body.gzip[i : i + 65536] for i in range(0, len(body.gzip), 65536)]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        chunk = chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "method": "POST", "path": "/crashpad", "raw_path": b"/crashpad",
        "query_string": b"", "root_path": "", "scheme": "http", "http_version": "1.1",
        "server": ("127.0.0.1", 80), "client": ("127.0.0.1", 1),
        "headers": [(b"content-type", body.content_type.encode()),
                    (b"content-encoding", b"gzip")],
    }  # fmt: skip
    await app(scope, receive, send)
    return int(sent[0]["status"])


async def profile(body: Body, uploads: int, folder: Path) -> None:
    settings = Settings(db=folder / "profile.sqlite3", processors=0)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        assert await upload(app, body) == 200  # the blobs exist from here on, as in a run
        profiler = cProfile.Profile()
        start = time.perf_counter()
        profiler.enable()
        for _ in range(uploads):
            status = await upload(app, body)
            assert status == 200, status
        profiler.disable()
        wall = time.perf_counter() - start
    stats = pstats.Stats(profiler)
    total = 0.0
    steps: dict[str, float] = defaultdict(float)
    rest: list[tuple[float, str]] = []
    for (file, line, function), (_, _, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        name = f"{file}:{line}({function})"
        total += tottime
        for step, needle in STEPS:
            if needle in name:
                steps[step] += tottime
                break
        else:
            steps["everything else (Python)"] += tottime
            rest.append((tottime, f"{Path(file).name}:{line}({function})"))
    print(f"{body.name}: {wall / uploads * 1000:.2f} ms wall per upload"
          f" ({uploads / wall:.0f} uploads/s, one at a time); profile per upload:")  # fmt: skip
    for step, seconds in sorted(steps.items(), key=lambda item: -item[1]):
        print(f"    {step:26} {seconds / uploads * 1000:7.3f} ms  {seconds / total:5.1%}")
    print("    largest in everything else:")
    for seconds, name in sorted(rest, reverse=True)[:TOP]:
        print(f"      {seconds / uploads * 1000:7.3f} ms  {name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--uploads", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for n, body in enumerate(bodies()):
            folder = Path(tmp) / str(n)
            os.makedirs(folder)
            asyncio.run(profile(body, args.uploads, folder))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
