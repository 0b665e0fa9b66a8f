"""Upstream symbol servers: a real HTTP server on 127.0.0.1 answers (or does not), and the
fetcher caches hits, remembers misses, bounds sizes, times and disk, and shares downloads."""

from __future__ import annotations

import asyncio
import gzip
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from reporting_endpoint.native.upstream import UpstreamSymbols, upstream_from_settings
from reporting_endpoint.settings import Settings, SettingsError
from tests.servers import free_port

FIXTURES = Path(__file__).parent / "fixtures" / "minidumps" / "symbols"
APP = ("test_app.pdb", "5A9832E5287241C1838ED98914E9B7FF1", "test_app.sym")
KERNEL = ("kernel32.pdb", "BCE8785C57B44245A669896B6A19B9542", "kernel32.sym")
NULL_READ = ("null_read_av", "7B7D1968FF0D47AE4366E9C3A7E1B6750", "null_read_av.sym")


def fixture_sym(key: tuple[str, str, str]) -> bytes:
    return (FIXTURES / key[0] / key[1] / key[2]).read_bytes()


def path_of(key: tuple[str, str, str]) -> str:
    return "/" + "/".join(key)


@dataclass
class Answer:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before the answer
    hang: bool = False  # never answer


@dataclass
class SymbolServer:
    """Answers GETs from ``answers`` (404 for anything else) and counts them per path."""

    answers: dict[str, Answer] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    release: threading.Event = field(default_factory=threading.Event)
    _server: ThreadingHTTPServer | None = None

    def start(self) -> SymbolServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.hits[self.path] = server.hits.get(self.path, 0) + 1
                answer = server.answers.get(self.path, Answer(404, b"not here"))
                if answer.hang:
                    server.release.wait(30)
                    return
                if answer.delay:
                    time.sleep(answer.delay)
                self.send_response(answer.status)
                headers = {"Content-Length": str(len(answer.body)), **answer.headers}
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(answer.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        ThreadingHTTPServer.daemon_threads = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def serve(self, key: tuple[str, str, str], answer: Answer) -> None:
        self.answers[path_of(key)] = answer


@pytest.fixture
def server() -> Iterator[SymbolServer]:
    running = SymbolServer().start()
    try:
        yield running
    finally:
        running.stop()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fetcher(
    servers: list[str], cache: Path, max_bytes: int = 10 * 1024 * 1024, **options: Any
) -> UpstreamSymbols:
    options.setdefault("timeout", 5.0)
    options.setdefault("negative_ttl", 3600.0)
    return UpstreamSymbols(servers, cache, max_bytes, **options)


def run_fetches(upstream: UpstreamSymbols, *keys: tuple[str, str, str]) -> list[Path | None]:
    async def go() -> list[Path | None]:
        try:
            return [await upstream.fetch(*key) for key in keys]
        finally:
            await upstream.aclose()

    return asyncio.run(go())


def test_a_hit_is_cached_and_served_from_disk_afterwards(
    server: SymbolServer, tmp_path: Path
) -> None:
    server.serve(APP, Answer(body=fixture_sym(APP)))
    upstream = fetcher([server.url], tmp_path / "cache")
    first, second = run_fetches(upstream, APP, APP)
    assert first is not None and first == second
    assert first.read_bytes() == fixture_sym(APP)
    assert first.parent == tmp_path / "cache"
    assert server.hits == {path_of(APP): 1}
    # A new process on the same folder finds it without asking.
    (again,) = run_fetches(fetcher([server.url], tmp_path / "cache"), APP)
    assert again == first
    assert server.hits == {path_of(APP): 1}


def test_servers_are_asked_in_order_until_one_has_it(tmp_path: Path) -> None:
    empty, full = SymbolServer().start(), SymbolServer().start()
    try:
        full.serve(KERNEL, Answer(body=fixture_sym(KERNEL)))
        (found,) = run_fetches(fetcher([empty.url + "/", full.url], tmp_path / "c"), KERNEL)
        assert found is not None and found.read_bytes() == fixture_sym(KERNEL)
        assert empty.hits == {path_of(KERNEL): 1}
        assert full.hits == {path_of(KERNEL): 1}
    finally:
        empty.stop()
        full.stop()


def test_a_miss_is_remembered_until_its_ttl_runs_out(server: SymbolServer, tmp_path: Path) -> None:
    clock = Clock()
    upstream = fetcher([server.url], tmp_path / "cache", negative_ttl=60, clock=clock)

    async def go() -> None:
        try:
            assert await upstream.fetch(*APP) is None
            assert await upstream.fetch(*APP) is None
            assert server.hits == {path_of(APP): 1}  # the second never reached the server
            clock.now += 59
            assert await upstream.fetch(*APP) is None
            assert server.hits == {path_of(APP): 1}
            clock.now += 2  # past the TTL: asked again, and now the server has it
            server.serve(APP, Answer(body=fixture_sym(APP)))
            found = await upstream.fetch(*APP)
            assert found is not None and found.read_bytes() == fixture_sym(APP)
            assert server.hits == {path_of(APP): 2}
        finally:
            await upstream.aclose()

    asyncio.run(go())


def test_server_errors_are_misses_too(server: SymbolServer, tmp_path: Path) -> None:
    server.serve(APP, Answer(500, b"oops"))
    upstream = fetcher([server.url], tmp_path / "cache")
    assert run_fetches(upstream, APP, APP) == [None, None]
    assert server.hits == {path_of(APP): 1}
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_body_over_the_size_cap_is_dropped_while_it_streams(
    server: SymbolServer, tmp_path: Path
) -> None:
    body = fixture_sym(APP)  # 818,134 bytes
    # Declared length over the cap: refused from the header.
    server.serve(APP, Answer(body=body))
    # Chunked, no length: counted while it streams (and gzip counts what it inflates to).
    packed = gzip.compress(body)
    server.serve(KERNEL, Answer(body=packed, headers={"Content-Encoding": "gzip"}))
    upstream = fetcher([server.url], tmp_path / "cache", max_file_bytes=100_000)
    assert run_fetches(upstream, APP, KERNEL) == [None, None]
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_gzip_body_is_stored_inflated(server: SymbolServer, tmp_path: Path) -> None:
    # Mozilla's symbol server stores .sym files gzipped and sends Content-Encoding: gzip.
    server.serve(KERNEL, Answer(body=gzip.compress(fixture_sym(KERNEL)), headers={
        "Content-Encoding": "gzip"
    }))  # fmt: skip
    (found,) = run_fetches(fetcher([server.url], tmp_path / "cache"), KERNEL)
    assert found is not None and found.read_bytes() == fixture_sym(KERNEL)


def test_a_server_that_never_answers_costs_at_most_the_timeout(
    server: SymbolServer, tmp_path: Path
) -> None:
    server.serve(APP, Answer(hang=True))
    upstream = fetcher([server.url], tmp_path / "cache", timeout=0.5)
    started = time.monotonic()
    assert run_fetches(upstream, APP) == [None]
    assert time.monotonic() - started < 5


def test_a_slow_dribble_is_cut_at_the_deadline(server: SymbolServer, tmp_path: Path) -> None:
    server.serve(APP, Answer(body=fixture_sym(APP), delay=3))
    upstream = fetcher([server.url], tmp_path / "cache", timeout=10, deadline=0.5)
    started = time.monotonic()
    assert run_fetches(upstream, APP) == [None]
    assert time.monotonic() - started < 2.5


def test_least_recently_used_files_are_evicted_past_the_budget(
    server: SymbolServer, tmp_path: Path
) -> None:
    for key in (APP, KERNEL, NULL_READ):
        server.serve(key, Answer(body=fixture_sym(key)))
    sizes = {key: len(fixture_sym(key)) for key in (APP, KERNEL, NULL_READ)}
    # Room for the app and kernel32 together, not for all three.
    budget = sizes[APP] + sizes[KERNEL] + sizes[NULL_READ] // 2
    upstream = fetcher([server.url], tmp_path / "cache", max_bytes=budget)

    async def go() -> None:
        try:
            app = await upstream.fetch(*APP)
            kernel = await upstream.fetch(*KERNEL)
            assert app is not None and kernel is not None
            assert await upstream.fetch(*APP) == app  # the app is now the most recent
            null_read = await upstream.fetch(*NULL_READ)
            assert null_read is not None
            assert app.exists() and null_read.exists()
            assert not kernel.exists()  # the least recently used went
            assert upstream.cached_bytes == sizes[APP] + sizes[NULL_READ] <= budget
            on_disk = sum(p.stat().st_size for p in (tmp_path / "cache").iterdir())
            assert on_disk == upstream.cached_bytes
            # Evicted means fetched again when asked.
            assert await upstream.fetch(*KERNEL) is not None
            assert server.hits[path_of(KERNEL)] == 2
        finally:
            await upstream.aclose()

    asyncio.run(go())


@pytest.mark.parametrize(
    "body",
    [
        b"MODULE windows x86 00000000000000000000000000000000F test_app.pdb\nFILE 1 a.c\n",
        b"<html><body>Sign in</body></html>\n",
        b"",
    ],
    ids=["another-debug-id", "html", "empty"],
)
def test_a_body_that_is_not_the_module_is_refused(
    server: SymbolServer, tmp_path: Path, body: bytes
) -> None:
    server.serve(APP, Answer(body=body))
    assert run_fetches(fetcher([server.url], tmp_path / "cache"), APP) == [None]
    assert list((tmp_path / "cache").iterdir()) == []


def test_concurrent_fetches_of_one_module_share_one_download(
    server: SymbolServer, tmp_path: Path
) -> None:
    server.serve(APP, Answer(body=fixture_sym(APP), delay=0.5))
    server.serve(KERNEL, Answer(status=404, delay=0.5))
    upstream = fetcher([server.url], tmp_path / "cache")

    async def go() -> list[Path | None]:
        try:
            return await asyncio.gather(
                *(upstream.fetch(*APP) for _ in range(10)),
                *(upstream.fetch(*KERNEL) for _ in range(10)),
            )
        finally:
            await upstream.aclose()

    found = asyncio.run(go())
    assert len(set(found[:10])) == 1 and found[0] is not None
    assert found[10:] == [None] * 10
    assert server.hits == {path_of(APP): 1, path_of(KERNEL): 1}


def test_names_from_a_dump_never_become_paths(server: SymbolServer, tmp_path: Path) -> None:
    sneaky = ("../../etc", "5A9832E5287241C1838ED98914E9B7FF1", "passwd")
    server.answers["/..%2F..%2Fetc/5A9832E5287241C1838ED98914E9B7FF1/passwd"] = Answer(
        body=b"MODULE Linux x86_64 5A9832E5287241C1838ED98914E9B7FF1 passwd\n"
    )
    (found,) = run_fetches(fetcher([server.url], tmp_path / "cache"), sneaky)
    assert found is not None and found.parent == tmp_path / "cache"
    assert ".." not in found.name
    # Control characters never reach a server at all.
    assert run_fetches(fetcher([server.url], tmp_path / "c2"), ("a\nb", "1", "x.sym")) == [None]


def test_settings_build_it_and_check_the_urls(tmp_path: Path) -> None:
    assert upstream_from_settings(Settings(db=tmp_path / "r.sqlite3")) is None
    env = {
        "REPORTING_ENDPOINT_SYMBOL_SERVERS": "https://symbols.example/a, http://127.0.0.1:9/",
        "REPORTING_ENDPOINT_SYMBOL_CACHE_BYTES": "5000",
        "REPORTING_ENDPOINT_SYMBOL_FETCH_TIMEOUT": "2.5",
        "REPORTING_ENDPOINT_SYMBOL_NEGATIVE_CACHE_SECONDS": "0",
    }
    settings = Settings.from_env(env, db=tmp_path / "r.sqlite3")
    upstream = upstream_from_settings(settings)
    assert upstream is not None
    assert upstream.servers == ("https://symbols.example/a", "http://127.0.0.1:9")
    assert (upstream.max_bytes, upstream.timeout, upstream.negative_ttl) == (5000, 2.5, 0)
    assert upstream.cache_dir == tmp_path / "r.sqlite3.data" / "symbol-cache"
    for bad in ("ftp://symbols.example", "symbols.example", "https://"):
        with pytest.raises(SettingsError, match="symbol_servers"):
            Settings(symbol_servers=(bad,))
    with pytest.raises(SettingsError):
        Settings(symbol_fetch_timeout=0)
