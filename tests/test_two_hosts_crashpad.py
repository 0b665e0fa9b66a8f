"""Two hosts on one PostgreSQL and one bucket (issue 10): SIGKILL both ``serve`` processes under
Crashpad upload load; every crash that got a 200 from either keeps its row and its object.

Each server runs in a folder of its own (``cwd``: its ``reporting-endpoint.data`` with temp
files and local locks is not shared), as two machines would; what they share is the database
(PostgreSQL, ``postgres_url``) and the bucket (moto's server on 127.0.0.1, ``s3_server``).
The senders upload the real fixture dumps: known content (already stored: reused), and content
new to the bucket that several senders send to both servers at about the same time, so both
hosts upload the same key at once and the shard locks (PostgreSQL advisory locks) are what
orders them. Skipped with the reason printed when PostgreSQL or moto is not available.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx2
import pytest

from reporting_endpoint.blobstores import BlobNotFound, open_blob_store
from reporting_endpoint.settings import Settings
from reporting_endpoint.storage import open_storage
from tests.crashpad_client import MINIDUMPS, content_type, dump_upload
from tests.s3server import S3Server, s3_server  # noqa: F401 (the fixture, until conftest has it)
from tests.servers import free_port, wait_until_listening

SENDERS = 8
MAX_SECONDS = 12.0  # hard end of the load, whatever happens to the kill
REQUEST_TIMEOUT = 10.0
KILL_WAIT = 10.0
DUMPS = sorted(MINIDUMPS.glob("*.dmp"))


class Host:
    """One ``serve`` process in a folder of its own, in a process group of its own."""

    def __init__(self, folder: Path, database: str, blob_store: str, env: dict[str, str]):
        folder.mkdir()
        self.port = free_port()
        command = [
            sys.executable, "-m", "reporting_endpoint", "serve",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--database", database, "--blob-store", blob_store,
        ]  # fmt: skip
        environment = {**os.environ, "REPORTING_ENDPOINT_LOG_LEVEL": "warning", **env}
        self.process = subprocess.Popen(
            command, cwd=folder, env=environment, start_new_session=True
        )
        try:
            wait_until_listening(self.port, self.process)
        except BaseException:
            self.kill()
            raise

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kill(self) -> None:
        """SIGKILL the whole process group (the server and anything it started)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        try:
            self.process.wait(timeout=KILL_WAIT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=KILL_WAIT)


def test_two_hosts_keep_every_acknowledged_crashpad_upload_after_sigkill(
    tmp_path: Path,
    postgres_url: str,
    s3_server: S3Server,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # the reader's data folder (S3 temp files) lands here
    for name, value in s3_server.env().items():  # the reader below is a client like the hosts
        monkeypatch.setenv(name, value)
    run = uuid.uuid4().hex
    spec = f"s3://{s3_server.bucket}/two-hosts/{run}"
    hosts: list[Host] = []
    try:
        for name in ("host-a", "host-b"):
            hosts.append(Host(tmp_path / name, postgres_url, spec, s3_server.env()))
    except BaseException:
        for host in hosts:
            host.kill()
        raise

    dumps = [path.read_bytes() for path in DUMPS]
    acknowledged: dict[str, str] = {}  # crash id -> sha256 of the dump sent
    by_host: Counter[int] = Counter()  # port -> 200s
    answers: Counter[int] = Counter()  # status -> count
    hosts_of_content: dict[str, set[int]] = {}  # sha256 -> ports that acknowledged it
    lock = threading.Lock()
    stop = threading.Event()
    deadline = time.monotonic() + MAX_SECONDS

    def send(sender: int) -> None:
        with httpx2.Client(timeout=REQUEST_TIMEOUT) as client:
            n = 0
            while not stop.is_set() and time.monotonic() < deadline:
                host = hosts[(sender + n) % len(hosts)]
                # Every sender walks the same sequence, so at step n the senders upload the
                # same content to both hosts at about the same time. Every third step the
                # content is new to the bucket (the fixture plus a per-step tail): the first
                # upload of one key from both hosts at once.
                dump = dumps[n % len(dumps)]
                if n % 3 == 0:
                    dump += f"two-hosts/{run}/{n}".encode()
                n += 1
                try:
                    answer = client.post(
                        host.url + "/crashpad",
                        content=dump_upload(dump, {"prod": f"TwoHosts{sender}", "ver": f"{n}"}),
                        headers={"content-type": content_type()},
                    )
                except httpx2.HTTPError:
                    return  # the host is gone (killed on purpose)
                digest = hashlib.sha256(dump).hexdigest()
                with lock:
                    answers[answer.status_code] += 1
                    if answer.status_code == 200:
                        acknowledged[answer.text] = digest
                        by_host[host.port] += 1
                        hosts_of_content.setdefault(digest, set()).add(host.port)
                if answer.status_code != 200:
                    time.sleep(0.05)

    threads = [threading.Thread(target=send, args=(i,), daemon=True) for i in range(SENDERS)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(random.uniform(2.0, 4.0))
    finally:
        for host in hosts:
            host.kill()
        stop.set()
        for thread in threads:
            thread.join(timeout=REQUEST_TIMEOUT + 5)
    assert not any(thread.is_alive() for thread in threads), "a sender hung"
    assert all(host.process.returncode == -signal.SIGKILL for host in hosts)

    on_both = sum(1 for ports in hosts_of_content.values() if len(ports) == len(hosts))
    print(
        f"\nacknowledged: {len(acknowledged)} crashes, per host {dict(by_host)}, "
        f"{len(hosts_of_content)} distinct dumps ({on_both} acknowledged by both hosts), "
        f"answers {dict(answers)}"
    )
    assert all(by_host[host.port] >= 5 for host in hosts), f"load never got going: {by_host}"
    assert on_both >= 1, "no content was acknowledged by both hosts"

    async def stored() -> tuple[dict[str, tuple[str, str | None]], dict[str, str | None]]:
        """Per acknowledged crash id its row's (dump_sha256, dump key); per key the sha256
        of the object in the bucket (None: no object)."""
        storage = open_storage(postgres_url, Settings(), read_only=True)
        await storage.start()
        try:
            shas = {
                str(crash["id"]): str(crash["dump_sha256"])
                async for crash in storage.iter_crashes()
            }
            rows = {
                crash_id: (shas[crash_id], await storage.crash_dump_path(crash_id))
                for crash_id in acknowledged
                if crash_id in shas
            }
        finally:
            await storage.stop()
        store = open_blob_store(spec, tmp_path / "reader")
        objects: dict[str, str | None] = {}
        try:
            for key in {key for _, key in rows.values() if key is not None}:
                try:
                    stream = await store.open(key)
                except BlobNotFound:
                    objects[key] = None
                    continue
                digest = hashlib.sha256()
                try:
                    async for chunk in stream:
                        digest.update(chunk)
                finally:
                    await stream.aclose()
                objects[key] = digest.hexdigest()
        finally:
            await store.close()
        return rows, objects

    rows, objects = asyncio.run(asyncio.wait_for(stored(), timeout=60))
    missing = [crash_id for crash_id in acknowledged if crash_id not in rows]
    assert not missing, f"{len(missing)} acknowledged crashes have no row, e.g. {missing[:3]}"
    for crash_id, digest in acknowledged.items():
        row_sha, key = rows[crash_id]
        assert row_sha == digest, f"crash {crash_id}: its row names {row_sha}, sent {digest}"
        assert key is not None, f"crash {crash_id}: its row names no dump"
        assert objects[key] == digest, f"crash {crash_id}: its object {key} is gone or differs"
