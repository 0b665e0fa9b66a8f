"""Slow and idle clients against a real `reporting-endpoint serve`, over raw sockets.

A client dribbling its headers, or sending headers and then stalling its body, must lose its
connection after the configured deadline while other clients are still served; past the
connection limit the server answers 503 instead of queueing.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from tests.conftest import crash_report
from tests.servers import RunningServer, running_service

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
# Scheduling on a loaded two-core machine: generous on the late side, strict on the early one.
SLACK = 2.5


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    db = tmp_path_factory.mktemp("slow") / "r.sqlite3"
    env = {
        "REPORTING_ENDPOINT_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
        "REPORTING_ENDPOINT_BODY_TIMEOUT": str(BODY_TIMEOUT),
    }
    with running_service(db, env=env) as running:
        yield running


def connect(server: RunningServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.settimeout(0.1)
    return sock


def wait_closed(
    sock: socket.socket, limit: float, dribble: bytes = b""
) -> tuple[bytes, float | None]:
    """What the server sent until it closed, and when (None: still open after ``limit`` s).

    With ``dribble``, one byte of it is sent every 0.1 s meanwhile, as a slowloris does.
    """
    received = b""
    deadline = time.monotonic() + limit
    position = 0
    while time.monotonic() < deadline:
        if position < len(dribble):
            try:
                sock.sendall(dribble[position : position + 1])
            except OSError:
                return received, time.monotonic()
            position += 1
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:  # reset by the server
            return received, time.monotonic()
        if not chunk:
            return received, time.monotonic()
        received += chunk
    return received, None


def healthy(server: RunningServer) -> bool:
    with httpx2.Client(timeout=5) as client:
        return client.get(server.url + "/healthz").status_code == 200


SLOW_START = b"POST /reports HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
# Long enough that a dribble at 10 bytes a second outlasts the header deadline several times.
DRIBBLE = b"a" * 100


@pytest.mark.parametrize("first", ["new connection", "after a first request"])
def test_dribbled_headers_are_cut_off_while_others_are_served(
    server: RunningServer, first: str
) -> None:
    sock = connect(server)
    with sock:
        if first == "after a first request":
            # On a kept-alive connection the deadline starts with the next request's first byte.
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = b""
            for _ in range(50):
                if b"\r\n\r\n" in answer and answer.rstrip().endswith(b"}"):
                    break
                try:
                    answer += sock.recv(65536)
                except TimeoutError:
                    continue
            assert answer.startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        sock.sendall(SLOW_START)
        received, closed_at = wait_closed(sock, HEADER_TIMEOUT / 2, DRIBBLE)
        assert closed_at is None, "closed before the deadline"
        assert healthy(server), "another client is not served meanwhile"
        received, closed_at = wait_closed(sock, HEADER_TIMEOUT + SLACK, DRIBBLE)
    assert closed_at is not None, f"still open {HEADER_TIMEOUT + SLACK}s after the deadline"
    elapsed = closed_at - started
    assert HEADER_TIMEOUT * 0.9 <= elapsed <= HEADER_TIMEOUT + SLACK
    assert received == b"" or received.startswith(b"HTTP/1.1 408 ")
    assert healthy(server)


def test_a_silent_connection_is_closed_after_the_header_deadline(server: RunningServer) -> None:
    with connect(server) as sock:
        started = time.monotonic()
        _, closed_at = wait_closed(sock, HEADER_TIMEOUT + SLACK)
    assert closed_at is not None
    assert closed_at - started >= HEADER_TIMEOUT * 0.9


def test_a_stalled_body_gets_408_json_on_reports(server: RunningServer) -> None:
    body = json.dumps([crash_report()]).encode()
    with connect(server) as sock:
        sock.sendall(
            b"POST /reports HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/reports+json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:10]
        )
        started = time.monotonic()
        received, closed_at = wait_closed(sock, BODY_TIMEOUT + SLACK)
    assert closed_at is not None, "the connection stays open"
    assert BODY_TIMEOUT * 0.9 <= closed_at - started <= BODY_TIMEOUT + SLACK
    head, _, payload = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), received
    assert b"connection: close" in head.lower()
    assert json.loads(payload)["error"]["code"] == "body_timeout"


def test_a_stalled_body_gets_408_text_on_crashpad(server: RunningServer) -> None:
    with connect(server) as sock:
        sock.sendall(
            b"POST /crashpad HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: multipart/form-data; boundary=XyZ\r\n"
            b"Content-Length: 5000\r\n\r\n"
            b'--XyZ\r\nContent-Disposition: form-data; name="prod"\r\n\r\nApp\r\n'
        )
        started = time.monotonic()
        received, closed_at = wait_closed(sock, BODY_TIMEOUT + SLACK)
    assert closed_at is not None, "the connection stays open"
    assert closed_at - started >= BODY_TIMEOUT * 0.9
    head, _, payload = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), received
    assert payload == b"Discarded=body_timeout"


@pytest.mark.parametrize(
    "request_head",
    [
        b"POST /reports HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n",
        b"DELETE /api/reports/1 HTTP/1.1\r\nHost: 127.0.0.1\r\n",
    ],
    ids=["415 before the body", "401 before the body"],
)
def test_an_early_answer_does_not_leave_the_body_unwatched(
    server: RunningServer, request_head: bytes
) -> None:
    """Answered before its body was read, a request must not keep its connection: nothing
    watches the rest of that body, so a client dribbling it would hold the connection."""
    with connect(server) as sock:
        sock.sendall(request_head + b"Content-Length: 100000\r\n\r\n")
        started = time.monotonic()
        received, closed_at = wait_closed(sock, HEADER_TIMEOUT + BODY_TIMEOUT + SLACK, DRIBBLE)
    assert received.startswith((b"HTTP/1.1 415 ", b"HTTP/1.1 401 ")), received
    assert b"connection: close" in received.partition(b"\r\n\r\n")[0].lower()
    assert closed_at is not None, "a dribbled body holds the connection after the answer"
    assert closed_at - started <= HEADER_TIMEOUT + BODY_TIMEOUT + SLACK


def test_requests_without_a_body_keep_their_connection(server: RunningServer) -> None:
    with connect(server) as sock:
        for _ in range(2):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = b""
            for _ in range(50):
                if answer.rstrip().endswith(b"}"):
                    break
                try:
                    answer += sock.recv(65536)
                except TimeoutError:
                    continue
            assert answer.startswith(b"HTTP/1.1 200"), answer
            assert b"connection: close" not in answer.lower()


def test_a_slow_but_steady_body_is_stored(server: RunningServer) -> None:
    """The body deadline is per chunk: each piece in time, the whole may take longer."""
    body = json.dumps([crash_report(url="https://slow.example/")]).encode()
    pieces = [body[i : i + len(body) // 4 + 1] for i in range(0, len(body), len(body) // 4 + 1)]
    with connect(server) as sock:
        sock.sendall(
            b"POST /reports HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Content-Type: application/reports+json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
        )
        started = time.monotonic()
        for piece in pieces:
            time.sleep(BODY_TIMEOUT * 0.5)
            sock.sendall(piece)
        received, _ = wait_closed(sock, 10)
    assert time.monotonic() - started > BODY_TIMEOUT  # the whole took longer than one deadline
    head, _, payload = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), received
    assert json.loads(payload)["accepted"] == 1


def test_past_the_connection_limit_the_answer_is_503(tmp_path: Path) -> None:
    with running_service(tmp_path / "r.sqlite3", args=["--limit-concurrency", "3"]) as server:
        idle = [connect(server) for _ in range(3)]
        try:
            with httpx2.Client(timeout=5) as client:
                assert client.get(server.url + "/healthz").status_code == 503
        finally:
            for sock in idle:
                sock.close()
        for _ in range(50):  # the server notices the closed sockets shortly
            if healthy(server):
                break
            time.sleep(0.1)
        else:
            pytest.fail("still refusing once the idle connections are gone")
