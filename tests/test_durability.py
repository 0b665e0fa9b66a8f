"""A 2xx means committed: SIGKILL the server mid-stream, restart it, every 2xx is still there."""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from pathlib import Path

import httpx2

from tests.conftest import crash_report
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
    time.sleep(random.uniform(0.5, 2.0))
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
