"""Real servers for tests: a throw-away TLS certificate and `reporting-endpoint serve` processes."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import trustme


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class TlsCertificate:
    ca_file: Path
    cert_file: Path
    key_file: Path
    spki_sha256_b64: str  # for Chromium's --ignore-certificate-errors-spki-list

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


def make_certificate(folder: Path) -> TlsCertificate:
    """A CA and a leaf for 127.0.0.1 and localhost, written as PEM files."""
    import base64
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    folder.mkdir(parents=True, exist_ok=True)
    ca_file, cert_file, key_file = folder / "ca.pem", folder / "cert.pem", folder / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    leaf.private_key_pem.write_to_path(str(key_file))
    cert_file.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    certificate = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    spki_hash = base64.b64encode(hashlib.sha256(spki).digest()).decode()
    return TlsCertificate(ca_file, cert_file, key_file, spki_hash)


def wait_until_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before listening")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@dataclass
class RunningServer:
    process: subprocess.Popen[bytes]
    port: int
    scheme: str
    db: Path

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"


def start_service(
    db: Path,
    certificate: TlsCertificate | None = None,
    env: dict[str, str] | None = None,
    port: int | None = None,
    args: list[str] | None = None,
) -> RunningServer:
    port = port or free_port()
    command = [
        sys.executable, "-m", "reporting_endpoint", "serve",
        "--host", "127.0.0.1", "--port", str(port), "--db", str(db),
    ]  # fmt: skip
    if certificate is not None:
        command += ["--ssl-certfile", str(certificate.cert_file)]
        command += ["--ssl-keyfile", str(certificate.key_file)]
    command += args or []
    environment = {**os.environ, "REPORTING_ENDPOINT_LOG_LEVEL": "warning", **(env or {})}
    process = subprocess.Popen(command, env=environment)
    try:
        wait_until_listening(port, process)
    except BaseException:
        process.kill()
        process.wait()
        raise
    return RunningServer(process, port, "https" if certificate else "http", db)


def stop(server: RunningServer, timeout: float = 30) -> int:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGINT)
        try:
            server.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
    return int(server.process.returncode)


@contextmanager
def running_service(
    db: Path,
    certificate: TlsCertificate | None = None,
    env: dict[str, str] | None = None,
    args: list[str] | None = None,
) -> Iterator[RunningServer]:
    server = start_service(db, certificate, env, args=args)
    try:
        yield server
    finally:
        stop(server)
