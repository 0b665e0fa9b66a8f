"""The standalone server: uvicorn set up so that slow or idle clients cannot hold it.

uvicorn bounds idle keep-alive connections (``timeout_keep_alive``) and the number of
connections (``limit_concurrency``), but has no deadline for receiving a request's headers and
none for receiving its body: a client that sends one header byte every few seconds (slowloris),
or headers and then nothing, holds its connection for ever. Here:

- ``HeaderTimeoutProtocol`` closes a connection whose request headers are not complete within
  ``header_timeout`` seconds of its first byte (or of the connection, for the first request);
- ``BodyTimeoutMiddleware`` answers 408 ``body_timeout`` and closes the connection when the
  next chunk of a body takes longer than ``body_timeout`` seconds.

``serve --workers N`` runs N processes on one listening socket (uvicorn's supervisor). Each
worker is a fresh interpreter (multiprocessing "spawn"), so nothing built in the parent reaches
it except what pickles: ``ServiceConfig`` carries the whole ``Settings`` (flags and environment
already merged), the app is a module-level factory bound to those settings, and the protocol is
a module-level class that reads its deadline from the config it is given. Each worker builds
its own app and therefore its own storage writer; the parent only prepares the database once
before the workers start, and on SIGINT/SIGTERM tells every worker to stop, each draining its
queue, and waits for all of them. Their metrics meet in a folder of per-process value files
that the parent makes for the run (``metrics.multiprocess_dir``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
from typing import TYPE_CHECKING, Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from reporting_endpoint.middleware import BodyTimeoutMiddleware
from reporting_endpoint.settings import Settings, SettingsError

if TYPE_CHECKING:
    from starlette.types import ASGIApp

logger = logging.getLogger("reporting_endpoint.server")
# Startup failures go where uvicorn's own go, formatted alike.
startup_logger = logging.getLogger("uvicorn.error")

# Sent before closing a connection whose headers came too slowly; it is the whole answer.
_HEADER_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: 15\r\n"
    b"connection: close\r\n\r\n"
    b"header_timeout\n"
)


# Settings' default, for a protocol given a plain uvicorn Config.
_HEADER_TIMEOUT = Settings().header_timeout


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus a deadline for receiving each request's headers.

    The deadline starts when the connection is made (a client that connects and sends nothing
    is bounded too) or when the first byte of a later request arrives, and is not reset by
    further bytes: dribbling one byte at a time does not extend it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Read from the config uvicorn hands every connection, not from a class attribute: the
        # class travels to worker processes by name, and a class made per setting would not.
        self.header_timeout = float(getattr(self.config, "header_timeout", _HEADER_TIMEOUT))
        self._header_deadline: asyncio.TimerHandle | None = None

    def _arm_header_deadline(self) -> None:
        if self._header_deadline is None:
            self._header_deadline = self.loop.call_later(
                self.header_timeout, self._header_timed_out
            )

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _header_timed_out(self) -> None:
        self._header_deadline = None
        if self.transport.is_closing():
            return
        logger.info("closing a connection from %s: headers not received in time", self.client)
        # Only when no earlier response is still being written: a 408 must not interleave.
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(_HEADER_TIMEOUT_RESPONSE)
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_header_deadline()

    def on_headers_complete(self) -> None:
        self._disarm_header_deadline()
        super().on_headers_complete()


def check_files(settings: Settings) -> None:
    """Name a missing or unreadable TLS file before uvicorn fails on it with a traceback."""
    for name in ("ssl_certfile", "ssl_keyfile"):
        path = getattr(settings, name)
        if path is None:
            continue
        if not path.is_file():
            raise SettingsError(f"{name.replace('_', '-')}: no such file {path}")
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            raise SettingsError(
                f"{name.replace('_', '-')}: cannot read {path} ({exc.strerror})"
            ) from None


def check_database(settings: Settings) -> None:
    """A database that exists must be one the service can use: said by name (a SettingsError)
    instead of a traceback from startup."""
    from reporting_endpoint.storage import check_database as check

    check(settings.database_url)


def wrap(app: ASGIApp, settings: Settings) -> ASGIApp:
    """The service app as served standalone: the body deadline around everything."""
    return BodyTimeoutMiddleware(app, timeout=settings.body_timeout)


def service_app(settings: Settings) -> ASGIApp:
    """The app factory uvicorn calls in each worker process."""
    from reporting_endpoint.app import create_app

    try:
        return wrap(create_app(settings, tune_gc=True), settings)
    except Exception:
        # uvicorn reports a factory's TypeError in one line without the traceback, and restarts
        # a worker that fails otherwise, for ever: log why, and exit as a startup failure, on
        # which the supervisor stops.
        startup_logger.exception("cannot build the service app")
        raise SystemExit(STARTUP_FAILURE) from None


class ServiceConfig(uvicorn.Config):
    """uvicorn's config built from the service's settings.

    With ``app`` (one process) it serves that app. Without, for workers, it is pickled whole
    into every worker process, so the settings travel with it exactly as the parent merged
    them (environment, then flags), secrets included, without being written to the
    environment or a command line; the app is ``service_app`` bound to them, which uvicorn
    calls in the worker, so every worker builds its own app, storage and writer.
    """

    def __init__(self, settings: Settings, app: ASGIApp | None = None) -> None:
        self.settings = settings
        self.header_timeout = settings.header_timeout
        super().__init__(
            app if app is not None else functools.partial(service_app, settings),
            factory=app is None,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            ssl_certfile=str(settings.ssl_certfile) if settings.ssl_certfile else None,
            ssl_keyfile=str(settings.ssl_keyfile) if settings.ssl_keyfile else None,
            log_level=settings.log_level,
            access_log=settings.access_log,
            http=HeaderTimeoutProtocol,
            # Past this many connections and tasks uvicorn answers 503 instead of queueing more
            # (per worker: N workers take N times as many).
            limit_concurrency=settings.limit_concurrency,
            # uvicorn types it as int but only hands it to call_later: fractions of a second work.
            timeout_keep_alive=settings.timeout_keep_alive,  # type: ignore[arg-type]
            # The storage drains its queue on shutdown; give it time to do so.
            timeout_graceful_shutdown=30,
        )

    def load(self) -> None:
        try:
            super().load()
        except Exception:
            # E.g. a certificate file that is not PEM. A worker that raises is restarted by
            # the supervisor, for ever; exiting as a startup failure makes it stop instead.
            startup_logger.exception("cannot start the server")
            raise SystemExit(STARTUP_FAILURE) from None


def prepare_database(settings: Settings) -> None:
    """Create or migrate the database once, here, before any worker starts.

    N workers starting on a fresh database would otherwise all apply the migrations at the same
    moment; doing it first in the parent leaves them an up-to-date schema, and a database that
    cannot be opened fails once, with its reason, instead of once per worker.
    """
    from reporting_endpoint.storage import open_storage

    async def start_and_stop() -> None:
        storage = open_storage(settings.database_url, settings)
        await storage.start()
        await storage.stop()

    asyncio.run(start_and_stop())


def _supervise(server_config: ServiceConfig) -> None:
    """Run ``workers`` processes on one socket, restarting any that dies, until a signal."""
    from uvicorn.supervisors import Multiprocess

    sock = server_config.bind_socket()
    try:
        # uvicorn 0.36 dropped the ``target`` argument (each worker builds its own Server).
        if "target" in inspect.signature(Multiprocess).parameters:
            target = uvicorn.Server(server_config).run
            supervisor = Multiprocess(server_config, target=target, sockets=[sock])  # type: ignore[call-arg,unused-ignore]
        else:
            supervisor = Multiprocess(server_config, sockets=[sock])
        supervisor.run()
    finally:
        sock.close()
    # A worker that could not start (storage, TLS) makes the supervisor stop them all; exit
    # as a single server does then, not with 0.
    if any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes):
        raise SystemExit(STARTUP_FAILURE)


def serve(settings: Settings) -> None:
    from reporting_endpoint.app import create_app

    check_files(settings)
    check_database(settings)
    # uvicorn.run does the same: Ctrl-C (SIGINT) is the normal way to stop, not an error.
    with contextlib.suppress(KeyboardInterrupt):
        if settings.workers > 1:
            from reporting_endpoint.metrics import multiprocess_dir

            prepare_database(settings)
            # Set before the workers start, so that each creates its collectors over files in
            # it and a scrape of any worker sums them all (README "Metrics").
            with multiprocess_dir():
                _supervise(ServiceConfig(settings))
        else:
            # Built here, so that a setting it refuses reaches the command line as an error.
            app = wrap(create_app(settings, tune_gc=True), settings)
            uvicorn.Server(ServiceConfig(settings, app)).run()
