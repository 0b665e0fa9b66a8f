"""A 2xx means committed: SIGKILL the server mid-stream, restart it, every 2xx is still there.

For /reports every acknowledged report; for /crashpad every acknowledged crash id, with its row
and its dump file (same bytes).
"""

from __future__ import annotations

import hashlib
import json
import random
import signal
import sqlite3
import threading
import time
from pathlib import Path

import httpx2

from tests.conftest import crash_report
from tests.crashpad_client import MINIDUMPS, content_type, dump_upload
from tests.servers import start_service, stop
from tests.test_server import export

SENDERS = 8
MAX_REQUESTS_PER_SENDER = 5000
MAX_SECONDS = 20.0


def test_every_acknowledged_report_survives_sigkill(tmp_path: Path) -> None:
    db = tmp_path / "reports.sqlite3"
    server = start_service(db)
    acknowledged: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + MAX_SECONDS

    def send(sender: int) -> None:
        with httpx2.Client(timeout=5) as client:
            for n in range(MAX_REQUESTS_PER_SENDER):
                if time.monotonic() > deadline:
                    return
                marker = f"https://durable.example/{sender}/{n}"
                batch = [crash_report(url=marker), crash_report(url=marker + "/b")]
                try:
                    answer = client.post(
                        server.url + "/reports",
                        content=json.dumps(batch),
                        headers={"content-type": "application/reports+json"},
                    )
                except httpx2.HTTPError:
                    return  # the server is gone
                if answer.status_code == 200:
                    with lock:
                        acknowledged.extend([marker, marker + "/b"])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(SENDERS)]
    for thread in threads:
        thread.start()
    # Killed mid-load: once the load is going (on a busy machine that takes a while), at a
    # random moment after.
    going = time.monotonic() + MAX_SECONDS / 2
    while len(acknowledged) <= 200 and time.monotonic() < going:
        time.sleep(0.05)
    time.sleep(random.uniform(0.1, 1.0))
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(timeout=10)
    for thread in threads:
        thread.join(timeout=MAX_SECONDS + 10)
    assert server.process.returncode == -signal.SIGKILL
    assert len(acknowledged) > 100, "the load never got going"

    # Restart on the same file: recovery from the WAL must keep every acknowledged report.
    restarted = start_service(db)
    assert stop(restarted) == 0
    stored = {str(report["url"]) for report in export(db)}
    missing = [marker for marker in acknowledged if marker not in stored]
    assert not missing, f"{len(missing)} acknowledged reports lost, e.g. {missing[:3]}"


DUMPS = sorted(MINIDUMPS.glob("*.dmp"))


def test_every_acknowledged_crash_keeps_its_row_and_its_dump_after_sigkill(
    tmp_path: Path,
) -> None:
    db = tmp_path / "reports.sqlite3"
    server = start_service(db)
    acknowledged: dict[str, str] = {}  # crash id -> sha256 of the dump sent
    lock = threading.Lock()
    deadline = time.monotonic() + MAX_SECONDS
    dumps = [path.read_bytes() for path in DUMPS]

    def send(sender: int) -> None:
        with httpx2.Client(timeout=5) as client:
            for n in range(MAX_REQUESTS_PER_SENDER):
                if time.monotonic() > deadline:
                    return
                # Varied uploads: different dumps (new blobs/ab folders appear under load), and
                # now and then the same dump again (an existing address is replaced).
                dump = dumps[(sender * 7 + n) % len(dumps)]
                try:
                    answer = client.post(
                        server.url + "/crashpad",
                        content=dump_upload(dump, {"prod": f"Durable{sender}", "ver": f"1.{n}"}),
                        headers={"content-type": content_type()},
                    )
                except httpx2.HTTPError:
                    return  # the server is gone
                if answer.status_code == 200:
                    with lock:
                        acknowledged[answer.text] = hashlib.sha256(dump).hexdigest()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(SENDERS)]
    for thread in threads:
        thread.start()
    time.sleep(random.uniform(0.5, 2.0))
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(timeout=10)
    for thread in threads:
        thread.join(timeout=MAX_SECONDS + 10)
    assert server.process.returncode == -signal.SIGKILL
    assert len(acknowledged) > 20, "the load never got going"

    restarted = start_service(db)
    assert stop(restarted) == 0
    connection = sqlite3.connect(db)
    try:
        rows = dict(connection.execute("SELECT id, dump_path FROM crashes").fetchall())
    finally:
        connection.close()
    missing_rows = [crash_id for crash_id in acknowledged if crash_id not in rows]
    assert not missing_rows, (
        f"{len(missing_rows)} acknowledged crashes lost, e.g. {missing_rows[:3]}"
    )
    data = db.with_name(db.name + ".data")
    for crash_id, digest in acknowledged.items():
        dump = data / rows[crash_id]
        assert dump.is_file(), f"crash {crash_id}: its dump {dump} is gone"
        assert hashlib.sha256(dump.read_bytes()).hexdigest() == digest
