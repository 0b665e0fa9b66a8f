"""Server-rendered pages under /dashboard: overview, issues, reports, crashes, quarantine and
set-up, behind a signed session, with a strict Content-Security-Policy."""

from __future__ import annotations

from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route, Router
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from reporting_endpoint.blobstores import BlobStore
from reporting_endpoint.dashboard.auth import SessionGate, Sessions
from reporting_endpoint.dashboard.explorer import Explorer
from reporting_endpoint.dashboard.forms import MAX_FORM_BYTES
from reporting_endpoint.dashboard.login import Login
from reporting_endpoint.dashboard.policy import MOUNT, DashboardHeaders, ErrorPages
from reporting_endpoint.dashboard.render import error_page
from reporting_endpoint.dashboard.setup_page import SetupPage
from reporting_endpoint.dashboard.views import Pages
from reporting_endpoint.errors import RequestRejected
from reporting_endpoint.middleware import BodyLimitMiddleware
from reporting_endpoint.settings import Settings
from reporting_endpoint.storage import Storage

__all__ = ["dashboard_routes"]


class _TooLarge(Response):
    """A body over the limit, refused as an HTML page like every other refusal (rendered
    when sent: the page needs the request)."""

    def __init__(self, exc: RequestRejected) -> None:
        super().__init__(status_code=exc.status)
        self.exc = exc

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        page = error_page(Request(scope), self.exc.status, self.exc.code, self.exc.message)
        await page(scope, receive, send)


def dashboard_routes(settings: Settings, storage: Storage, blobs: BlobStore) -> list[BaseRoute]:
    """The dashboard as one Mount at ``/dashboard``; a host app that mounts the service gets
    it too."""
    sessions = Sessions(settings)
    login = Login(sessions)
    pages = Pages(storage)
    explorer = Explorer(storage, blobs)
    setup = SetupPage(settings, storage)
    static = StaticFiles(packages=[("reporting_endpoint.dashboard", "static")])
    router = Router(
        routes=[
            Route("/", pages.overview, methods=["GET"]),
            Route("/login", login.form, methods=["GET"]),
            Route("/login", login.submit, methods=["POST"]),
            Route("/logout", login.logout, methods=["POST"]),
            Route("/issues", pages.issues, methods=["GET"]),
            Route("/issues/{issue_id}", pages.issue, methods=["GET"]),
            Route("/issues/{issue_id}/status", pages.triage, methods=["POST"]),
            Route("/reports", explorer.reports, methods=["GET"]),
            Route("/reports/{report_id}", explorer.report, methods=["GET"]),
            Route("/crashes/{crash_id}", explorer.crash, methods=["GET"]),
            Route("/crashes/{crash_id}/minidump", explorer.minidump, methods=["GET"]),
            Route("/quarantine", explorer.quarantine, methods=["GET"]),
            Route("/setup", setup.show, methods=["GET"]),
            Mount("/static", app=static),
        ]
    )
    return [
        Mount(
            MOUNT,
            app=router,
            middleware=[
                # Outermost first: every answer gets the policy headers, refusals included.
                Middleware(DashboardHeaders),
                Middleware(ErrorPages),
                # Not counted: requests_rejected_total is about ingest, and a login form
                # needs no session, so anyone could inflate the count of /reports refusals.
                Middleware(
                    BodyLimitMiddleware,
                    max_bytes=MAX_FORM_BYTES,
                    respond=_TooLarge,
                    endpoint=None,
                ),
                Middleware(SessionGate, sessions=sessions),
            ],
        )
    ]
