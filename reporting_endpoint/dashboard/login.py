"""The login form (the read token, and the write token for triage) and logout."""

from __future__ import annotations

import asyncio
import math

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from reporting_endpoint.dashboard.auth import (
    LOGIN_COOKIE,
    LOGIN_MAX_AGE,
    SESSION_COOKIE,
    Sessions,
    delete_cookie,
    safe_next,
    set_cookie,
)
from reporting_endpoint.dashboard.forms import checked_form, only, read_form
from reporting_endpoint.dashboard.render import Refusal, base_path, error_page, render
from reporting_endpoint.intake import TokenBuckets, client_of

# A wrong token costs the guesser this long (and the answer is the same for either token).
FAILED_LOGIN_DELAY = 0.5
# Failed logins per client address (an IPv6 client's /64), per process: a burst of typos is
# free, then one guess every 10 s; while over, every attempt is refused unchecked, the right
# token too, or a guesser would learn from which answers were refusals.
FAILED_LOGINS_BURST = 10
FAILED_LOGINS_PER_MINUTE = 6


class Login:
    """``GET``/``POST /login`` and ``POST /logout``."""

    def __init__(self, sessions: Sessions, failures: TokenBuckets | None = None) -> None:
        self.sessions = sessions
        self.failures = failures or TokenBuckets(FAILED_LOGINS_PER_MINUTE, FAILED_LOGINS_BURST)

    def _form(
        self, request: Request, next_path: str, status: int = 200, error: str = "", code: str = ""
    ) -> Response:
        token = self.sessions.login_token()
        response = render(
            request,
            "login.html",
            "login",
            "Sign in",
            status=status,
            login_csrf=token,
            next_path=next_path,
            error=error,
            code=code,
            closed=not self.sessions.settings.read_token,
            write_configured=bool(self.sessions.settings.write_token),
        )
        set_cookie(response, request, LOGIN_COOKIE, token, LOGIN_MAX_AGE)
        return response

    async def form(self, request: Request) -> Response:
        next_path = safe_next(request.query_params.get("next"), base_path(request))
        return self._form(request, next_path)

    async def submit(self, request: Request) -> Response:
        fields = await read_form(request)
        given = fields.get("csrf", "")
        if not given:
            raise Refusal(403, "csrf_missing", "the form lacks its CSRF token: reload the page")
        cookie = request.cookies.get(LOGIN_COOKIE)
        if not (cookie == given and self.sessions.login_token_valid(given)):
            raise Refusal(403, "csrf_invalid", "the login form expired: reload the page")
        fields = only(fields, ("token", "write_token", "next"))
        next_path = safe_next(fields.get("next"), base_path(request))
        if not self.sessions.settings.read_token:
            raise Refusal(403, "dashboard_disabled", "set REPORTING_ENDPOINT_READ_TOKEN first")
        # No await from this check to the charge below: concurrent guesses cannot all pass
        # it before any of them is counted.
        client = client_of(request.scope)
        wait = self.failures.waiting(client)
        if wait:
            retry_after = str(max(1, math.ceil(wait)))
            refusal = error_page(
                request,
                429,
                "too_many_attempts",
                f"too many failed sign-ins from this address; try again in {retry_after} s",
            )
            refusal.headers["Retry-After"] = retry_after
            return refusal
        read_ok, write_ok = self.sessions.check_tokens(
            fields.get("token", ""), fields.get("write_token", "")
        )
        wants_write = bool(fields.get("write_token"))
        if not read_ok or (wants_write and not write_ok):
            self.failures.take(client)
            await asyncio.sleep(FAILED_LOGIN_DELAY)
            return self._form(
                request,
                next_path,
                status=403,
                error="That token is not right.",
                code="invalid_token",
            )
        response = RedirectResponse(next_path, status_code=303)
        max_age = self.sessions.settings.session_max_age
        set_cookie(response, request, SESSION_COOKIE, self.sessions.issue(write_ok), max_age)
        delete_cookie(response, request, LOGIN_COOKIE)
        return response

    async def logout(self, request: Request) -> Response:
        await checked_form(request, ())
        response = RedirectResponse(base_path(request) + "/login", status_code=303)
        delete_cookie(response, request, SESSION_COOKIE)
        return response
