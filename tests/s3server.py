"""A real S3 server on 127.0.0.1 for the tests: moto's server mode in a child process.

``s3_server`` is a session fixture body: it starts ``python -m moto.server`` on a free port,
waits a bounded time for it to answer, creates a bucket and yields the endpoint and
credentials. When it cannot start (moto not installed, the port never answers) the tests that
use it are skipped with the reason printed. Register it in conftest.py with
``from tests.s3server import s3_server  # noqa: F401``.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

START_TIMEOUT = 30.0
BUCKET = "crash-blobs"


@dataclass(frozen=True, slots=True)
class S3Server:
    endpoint: str
    bucket: str
    region: str = "us-east-1"
    access_key_id: str = "testing-key"
    secret_access_key: str = "testing-secret"

    def env(self) -> dict[str, str]:
        """The standard variables a client reads (what an operator sets in production)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": self.region,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
        }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _answers(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(endpoint + "/", timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer means it is serving
    except OSError:
        return False


def _create_bucket(server: S3Server) -> None:
    # boto3 comes with moto; signed like any client, so the server sees a normal CreateBucket.
    import boto3  # type: ignore[import-untyped]  # no stubs shipped; a test helper only

    boto3.client(
        "s3",
        endpoint_url=server.endpoint,
        region_name=server.region,
        aws_access_key_id=server.access_key_id,
        aws_secret_access_key=server.secret_access_key,
    ).create_bucket(Bucket=server.bucket)


@contextlib.contextmanager
def running_s3_server() -> Iterator[S3Server]:
    """Start the server, or skip with the reason; stop it on exit."""
    try:
        import moto.server  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"no S3 server: moto[server] is not installed ({exc})")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    # Its log goes to a temp file (read back only for the skip reason): a pipe nobody reads
    # would fill up and block the server.
    log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in the finally below)
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _answers(endpoint):
            if process.poll() is not None:
                log.seek(0)
                tail = log.read().decode(errors="replace")[-500:]
                pytest.skip(f"no S3 server: moto exited with {process.returncode}: {tail}")
            if time.monotonic() > deadline:
                pytest.skip(f"no S3 server: moto did not answer within {START_TIMEOUT:.0f} s")
            time.sleep(0.1)
        server = S3Server(endpoint, BUCKET)
        _create_bucket(server)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    with running_s3_server() as server:
        yield server
