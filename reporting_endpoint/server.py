"""The standalone server: uvicorn set up so that slow or idle clients cannot hold it.

uvicorn bounds idle keep-alive connections (``timeout_keep_alive``) and the number of
connections (``limit_concurrency``), but has no deadline for receiving a request's headers and
none for receiving its body: a client that sends one header byte every few seconds (slowloris),
or headers and then nothing, holds its connection for ever. Here:

- ``HeaderTimeoutProtocol`` closes a connection whose request headers are not complete within
  ``header_timeout`` seconds of its first byte (or of the connection, for the first request);
- ``BodyTimeoutMiddleware`` answers 408 ``body_timeout`` and closes the connection when the
  next chunk of a body takes longer than ``body_timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from reporting_endpoint.middleware import BodyTimeoutMiddleware
from reporting_endpoint.settings import Settings, SettingsError

if TYPE_CHECKING:
    import uvicorn
    from starlette.types import ASGIApp

logger = logging.getLogger("reporting_endpoint.server")

# Sent before closing a connection whose headers came too slowly; it is the whole answer.
_HEADER_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: 15\r\n"
    b"connection: close\r\n\r\n"
    b"header_timeout\n"
)


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus a deadline for receiving each request's headers.

    The deadline starts when the connection is made (a client that connects and sends nothing
    is bounded too) or when the first byte of a later request arrives, and is not reset by
    further bytes: dribbling one byte at a time does not extend it.
    """

    header_timeout: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
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


def header_timeout_protocol(timeout: float) -> type[HeaderTimeoutProtocol]:
    """A protocol class with this deadline: uvicorn instantiates ``http=`` classes itself."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout": timeout})


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


def config(settings: Settings, app: ASGIApp) -> uvicorn.Config:
    import uvicorn

    return uvicorn.Config(
        wrap(app, settings),
        host=settings.host,
        port=settings.port,
        ssl_certfile=str(settings.ssl_certfile) if settings.ssl_certfile else None,
        ssl_keyfile=str(settings.ssl_keyfile) if settings.ssl_keyfile else None,
        log_level=settings.log_level,
        access_log=settings.access_log,
        http=header_timeout_protocol(settings.header_timeout),
        # Past this many connections and tasks uvicorn answers 503 instead of queueing more.
        limit_concurrency=settings.limit_concurrency,
        # uvicorn types it as int but only hands it to call_later: fractions of a second work.
        timeout_keep_alive=settings.timeout_keep_alive,  # type: ignore[arg-type]
        # The storage drains its queue on shutdown; give it time to do so.
        timeout_graceful_shutdown=30,
    )


def serve(settings: Settings) -> None:
    import uvicorn

    from reporting_endpoint.app import create_app

    check_files(settings)
    check_database(settings)
    app = create_app(settings, tune_gc=True)
    # uvicorn.run does the same: Ctrl-C (SIGINT) is the normal way to stop, not an error.
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.Server(config(settings, app)).run()
