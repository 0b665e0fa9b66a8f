"""A throw-away PostgreSQL server for the tests, and the pytest fixtures that hand it out.

The session fixture ``postgres`` starts one cluster for the whole run from Debian's
``postgresql`` binaries (``initdb`` + ``pg_ctl`` on a temporary directory, listening on a Unix
socket only), or, when ``REPORTING_ENDPOINT_TEST_POSTGRES`` holds a URL, uses that server
instead. ``postgres_url`` gives each test a database of its own, cloned from an empty template
(a few tens of milliseconds), and drops it afterwards. Tests that kill the server under load
call ``postgres.stop("immediate")`` and ``postgres.start()`` (a local cluster only; they are
skipped on an external server).

Register the fixtures in ``tests/conftest.py`` with::

    from tests.postgres import postgres, postgres_url  # noqa: F401

No mocks: the server is the real one the backend runs against in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import quote, urlsplit, urlunsplit

import pytest

ENV_URL = "REPORTING_ENDPOINT_TEST_POSTGRES"
ROLE = "reporting"  # the non-superuser role the service connects as, owner of test databases
TEMPLATE = "reporting_template"  # empty; every test database is a copy of it
SUPERUSER = "postgres"
# Bounded waits: a wedged server fails the session instead of hanging CI.
START_TIMEOUT = 60
STOP_TIMEOUT = 30

# Durability stays as in production (fsync, synchronous_commit and full_page_writes on: tests
# kill the server and count what survived). The rest trades nothing the tests look at for
# speed and a small footprint on a shared 2-core machine.
SETTINGS = {
    "listen_addresses": "''",  # Unix socket only: nothing else on the host can reach it
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    # Minimal WAL: no replication to feed, and a table created and filled in one transaction
    # skips WAL altogether.
    "wal_level": "minimal",
    "max_wal_senders": "0",
    # Few checkpoints in a short run; crash recovery after an immediate stop replays the rest.
    "max_wal_size": "'1GB'",
    "checkpoint_timeout": "'30min'",
    # Two serve workers, their pools, the migration racers and the admin connection.
    "max_connections": "200",
    "shared_buffers": "'128MB'",
    # Parallel workers would take both cores from the server processes under test (and use
    # /dev/shm, small in many containers).
    "max_parallel_workers_per_gather": "0",
    "max_parallel_maintenance_workers": "0",
    "jit": "off",  # compiling queries costs more than it saves on test-sized tables
    "log_min_messages": "warning",
    "log_min_error_statement": "panic",  # tests provoke errors on purpose; keep the log short
    "timezone": "'UTC'",
}


def find_bin_dir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<major>/bin`` holding initdb and pg_ctl, else the one
    on PATH (Debian keeps them off PATH; other distributions do not)."""
    found = []
    for initdb in Path("/usr/lib/postgresql").glob("*/bin/initdb"):
        major = initdb.parent.parent.name
        if major.isdigit() and (initdb.parent / "pg_ctl").is_file():
            found.append((int(major), initdb.parent))
    if found:
        return max(found)[1]
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).parent
    return None


def with_database(url: str, database: str) -> str:
    """``url`` pointing at another database; host, port and query (socket dir) are kept."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + quote(database, safe="")))


def _ident(name: str) -> str:
    """A quoted SQL identifier; the names here are ours, the quoting is for safety anyway."""
    return '"' + name.replace('"', '""') + '"'


class PostgresServer:
    """A server the tests can create databases on; ``admin_url`` is a role allowed to."""

    local = False

    def __init__(self, admin_url: str, role: str | None) -> None:
        self.admin_url = admin_url
        self.role = role  # owner of new databases; None: the admin URL's own user
        self._names = itertools.count(1)

    def url(self, database: str) -> str:
        """A URL for ``database`` as the service's role."""
        return with_database(self.admin_url, database)

    async def _execute(self, *statements: str) -> None:
        import asyncpg

        connection = await asyncpg.connect(
            with_database(self.admin_url, "postgres"), timeout=START_TIMEOUT
        )
        try:
            for statement in statements:
                await connection.execute(statement)
        finally:
            await connection.close()

    def execute(self, *statements: str) -> None:
        """Run admin statements (CREATE/DROP DATABASE cannot run in a transaction)."""
        asyncio.run(self._execute(*statements))

    def prepare(self) -> None:
        """The template every test database is cloned from (a clean ``template0`` copy)."""
        owner = f" OWNER {_ident(self.role)}" if self.role else ""
        self.execute(
            f"DROP DATABASE IF EXISTS {_ident(TEMPLATE)} WITH (FORCE)",
            f"CREATE DATABASE {_ident(TEMPLATE)}{owner} TEMPLATE template0",
        )

    def create_database(self, template: str = TEMPLATE) -> str:
        """A new database (owned by the service's role), cloned from ``template``; its URL.
        About 0.1 s (the default WAL_LOG strategy measured faster here than FILE_COPY, whose
        two checkpoints cost more than logging the 7 MB template)."""
        name = f"re_test_{os.getpid()}_{next(self._names)}"
        owner = f" OWNER {_ident(self.role)}" if self.role else ""
        self.execute(f"CREATE DATABASE {_ident(name)}{owner} TEMPLATE {_ident(template)}")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop a database ``create_database`` made; FORCE ends sessions a test left open."""
        name = urlsplit(url).path.lstrip("/")
        self.execute(f"DROP DATABASE IF EXISTS {_ident(name)} WITH (FORCE)")

    def ensure_running(self) -> None:
        """Nothing to do for a server someone else runs."""

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.execute(f"DROP DATABASE IF EXISTS {_ident(TEMPLATE)} WITH (FORCE)")


@dataclass
class PostgresCluster(PostgresServer):
    """A cluster of our own in a temporary directory, run as the ``postgres`` OS user when the
    tests run as root (initdb refuses root), with ``pg_ctl`` control over its life."""

    bin_dir: Path
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="re-pg-")))
    port: int = 5432  # only names the socket file: the directory is ours alone

    local = True

    def __post_init__(self) -> None:
        self.data = self.root / "data"
        self.socket_dir = self.root / "socket"
        self.log = self.root / "postgresql.log"
        self._user = _postgres_user()
        # A trust login is safe: the socket's directory is 0700 and owned by the server's user
        # (root gets through, no one else does).
        super().__init__(
            f"postgresql://{SUPERUSER}@/postgres?host={quote(str(self.socket_dir))}"
            f"&port={self.port}",
            ROLE,
        )

    def url(self, database: str) -> str:
        parts = urlsplit(with_database(self.admin_url, database))
        return urlunsplit(parts._replace(netloc=f"{ROLE}@"))

    def _run(self, *args: str | Path, timeout: float = START_TIMEOUT) -> str:
        result = subprocess.run(
            [str(a) for a in args],
            cwd=self.root,  # the server's user may not be able to enter the test's cwd
            user=self._user,
            group=self._user,
            extra_groups=[] if self._user is not None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(map(str, args))} failed ({result.returncode}):\n"
                f"{result.stdout}{result.stderr}{self.log_tail()}"
            )
        return result.stdout

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def init(self) -> None:
        self.socket_dir.mkdir(mode=0o700)
        if self._user is not None:
            record = pwd.getpwnam(self._user)
            for path in (self.root, self.socket_dir):
                os.chown(path, record.pw_uid, record.pw_gid)
        self.root.chmod(0o700)
        # --no-sync: a crash during the run loses a throw-away cluster, not data; the server
        # itself runs with fsync on.
        self._run(
            self.bin_dir / "initdb", "-D", self.data, "-U", SUPERUSER, "--auth=trust",
            "--encoding=UTF8", "--no-locale", "--no-sync", "--no-instructions",
        )  # fmt: skip
        lines = [f"{name} = {value}" for name, value in SETTINGS.items()]
        lines.append(f"unix_socket_directories = '{self.socket_dir}'")
        lines.append(f"port = {self.port}")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\n# tests/postgres.py\n" + "\n".join(lines) + "\n")

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the server and wait (bounded) until it accepts connections; after an
        immediate stop this includes crash recovery."""
        self._run(
            self.bin_dir / "pg_ctl", "-D", self.data, "-l", self.log, "-w",
            "-t", str(int(timeout)), "start",
            timeout=timeout + 10,
        )  # fmt: skip

    def stop(
        self, mode: Literal["smart", "fast", "immediate"] = "fast", timeout: float = STOP_TIMEOUT
    ) -> None:
        """``fast`` ends sessions and shuts down cleanly; ``immediate`` is a crash: every
        server process quits at once, and the next start replays the WAL."""
        self._run(
            self.bin_dir / "pg_ctl", "-D", self.data, "-m", mode, "-w",
            "-t", str(int(timeout)), "stop",
            timeout=timeout + 10,
        )  # fmt: skip

    def restart(self, mode: Literal["fast", "immediate"] = "fast") -> None:
        self.stop(mode)
        self.start()

    def running(self) -> bool:
        status = subprocess.run(
            [str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "status"],
            user=self._user,
            group=self._user,
            extra_groups=[] if self._user is not None else None,
            cwd=self.root,
            capture_output=True,
            timeout=STOP_TIMEOUT,
            check=False,
        )
        return status.returncode == 0

    def ensure_running(self) -> None:
        """Start the server again if a test stopped it (and failed before restarting it), so
        one failure does not cascade through the rest of the session."""
        if not self.running():
            self.start()

    def close(self) -> None:
        """Stop (fast, then immediate if that times out) and remove the directory."""
        try:
            if self.running():
                try:
                    self.stop("fast")
                except (RuntimeError, subprocess.TimeoutExpired):
                    self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def _postgres_user() -> str | None:
    """The OS user to run the server as: ``postgres`` when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SUPERUSER)
    except KeyError:
        raise RuntimeError(
            "running as root needs a 'postgres' OS user (initdb refuses root);"
            " the Debian postgresql package creates it"
        ) from None
    return SUPERUSER


def start_cluster() -> PostgresCluster | None:
    """A fresh running cluster with the service's role and the template, or None when the
    binaries are missing."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        return None
    cluster = PostgresCluster(bin_dir)
    try:
        cluster.init()
        cluster.start()
        cluster.execute(f"CREATE ROLE {_ident(ROLE)} LOGIN")
        cluster.prepare()
    except BaseException:
        cluster.close()
        raise
    return cluster


def _external(url: str) -> PostgresServer:
    """The server of ``REPORTING_ENDPOINT_TEST_POSTGRES``: its user creates (and owns) the
    test databases, so it needs CREATEDB."""
    if not re.match(r"^postgres(ql)?://", url):
        raise RuntimeError(f"{ENV_URL} must be a postgresql:// URL")
    server = PostgresServer(url, role=None)
    server.prepare()
    return server


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server (started once), or a skip saying why there is none."""
    pytest.importorskip("asyncpg", reason="asyncpg is not installed")
    external = os.environ.get(ENV_URL)
    if external:
        server: PostgresServer = _external(external)
    else:
        started = time.monotonic()
        cluster = start_cluster()
        if cluster is None:
            reason = (
                "PostgreSQL tests skipped: no initdb/pg_ctl under /usr/lib/postgresql/*/bin or on"
                f" PATH (apt-get install -y postgresql), and {ENV_URL} is not set"
            )
            print(reason)
            pytest.skip(reason)
        print(f"PostgreSQL cluster in {cluster.root} ready in {time.monotonic() - started:.1f} s")
        server = cluster
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def postgres_url(postgres: PostgresServer) -> Iterator[str]:
    """A libpq URL of an empty database of this test's own, dropped afterwards."""
    url = postgres.create_database()
    try:
        yield url
    finally:
        postgres.ensure_running()
        postgres.drop_database(url)
