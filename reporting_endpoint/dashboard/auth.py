"""Dashboard sessions: the signing key, the signed session cookie with its CSRF token, and the
gate that sends every request without a valid session to the login page."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from reporting_endpoint.settings import Settings

SESSION_COOKIE = "re_session"
# Login CSRF: the login form's token, signed, also set as this short-lived cookie.
LOGIN_COOKIE = "re_login"
LOGIN_MAX_AGE = 3600
# The generated key, in the data folder.
KEY_FILE = "dashboard-secret-key"
# Paths (below the mount) open without a session: the login form and the one stylesheet.
PUBLIC = frozenset({"/login", "/static/dashboard.css"})
_SESSION_SALT = "reporting-endpoint.dashboard.session"
_LOGIN_SALT = "reporting-endpoint.dashboard.login"
# A cookie past this length was not made here; refused before any signature check.
MAX_COOKIE = 1024


def secret_key(settings: Settings) -> bytes:
    """The key that signs sessions: ``secret_key`` when set, else the one in the data folder,
    generated on first use. Two workers starting together agree: each writes a candidate to
    a file of its own and links it into place; ``link`` fails for all but the first, and
    the losers read the winner's. The file is complete before it has its name."""
    if settings.secret_key is not None:
        return settings.secret_key.encode()
    folder = settings.data_dir
    path = folder / KEY_FILE
    with contextlib.suppress(FileNotFoundError):
        return _read_key(path)
    folder.mkdir(parents=True, exist_ok=True)
    candidate = folder / f".{KEY_FILE}.{os.getpid()}.{secrets.token_hex(8)}"
    fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(secrets.token_urlsafe(48) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(candidate, path)
    finally:
        candidate.unlink(missing_ok=True)
    return _read_key(path)


def _read_key(path: Path) -> bytes:
    key = path.read_text(encoding="ascii").strip()
    if len(key) < 32:
        # Never the key itself in the message.
        raise RuntimeError(f"{path} holds no usable key: delete it to have a new one made")
    return key.encode()


@dataclass(frozen=True, slots=True)
class Session:
    """A signed-in person: ``can_write`` when they gave the write token; ``csrf`` goes in
    every form they submit."""

    csrf: str
    can_write: bool


def session_of(request: Request) -> Session | None:
    found = request.scope.get("dashboard_session")
    return found if isinstance(found, Session) else None


class Sessions:
    """Signs and checks session cookies. A session names digests of the tokens it was opened
    with, so changing a token ends the sessions opened with the old one."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._serializers: tuple[URLSafeTimedSerializer, URLSafeTimedSerializer] | None = None
        self._key = b""

    def _ready(self) -> tuple[URLSafeTimedSerializer, URLSafeTimedSerializer]:
        # The key is read (or made) on first use, not when the app is built: building the app
        # writes nothing, and a CLI command that builds it never touches the data folder.
        if self._serializers is None:
            self._key = secret_key(self.settings)
            options = {"digest_method": hashlib.sha256}
            self._serializers = (
                URLSafeTimedSerializer(self._key, _SESSION_SALT, signer_kwargs=options),
                URLSafeTimedSerializer(self._key, _LOGIN_SALT, signer_kwargs=options),
            )
        return self._serializers

    def _digest(self, kind: str, token: str | None) -> str | None:
        if not token:
            return None
        self._ready()
        mac = hmac.new(self._key, f"{kind}:{token}".encode(), hashlib.sha256)
        return mac.hexdigest()[:32]

    def check_tokens(self, token: str, write_token: str) -> tuple[bool, bool]:
        """(the read token is right, the write token is right); an empty or unset token is
        never right."""
        read_ok = _same(token, self.settings.read_token)
        write_ok = _same(write_token, self.settings.write_token)
        return read_ok, write_ok

    def issue(self, can_write: bool) -> str:
        """A new session's cookie value."""
        session, _ = self._ready()
        payload: dict[str, Any] = {
            "r": self._digest("read", self.settings.read_token),
            "c": secrets.token_urlsafe(24),
        }
        if can_write:
            payload["w"] = self._digest("write", self.settings.write_token)
        return str(session.dumps(payload))

    def load(self, cookie: str | None) -> Session | None:
        """The session a cookie holds; None when it is missing, forged, tampered with,
        expired, or opened with a token that is no longer the one configured."""
        if not cookie or len(cookie) > MAX_COOKIE:
            return None
        session, _ = self._ready()
        try:
            payload = session.loads(cookie, max_age=self.settings.session_max_age)
        except BadSignature:  # SignatureExpired is one too
            return None
        if not isinstance(payload, dict):
            return None
        read = self._digest("read", self.settings.read_token)
        csrf = payload.get("c")
        if read is None or payload.get("r") != read or not isinstance(csrf, str):
            return None
        write = self._digest("write", self.settings.write_token)
        return Session(csrf=csrf, can_write=write is not None and payload.get("w") == write)

    def login_token(self) -> str:
        """The login form's CSRF token (also its cookie's value)."""
        _, login = self._ready()
        return str(login.dumps(secrets.token_urlsafe(16)))

    def login_token_valid(self, value: str | None) -> bool:
        if not value or len(value) > MAX_COOKIE:
            return False
        _, login = self._ready()
        try:
            login.loads(value, max_age=LOGIN_MAX_AGE)
        except BadSignature:
            return False
        return True


def _same(given: str, expected: str | None) -> bool:
    if not expected or not given:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def cookie_header(
    name: str, value: str, path: str, max_age: int, secure: bool, delete: bool = False
) -> str:
    """A ``Set-Cookie`` value: HttpOnly, SameSite=Lax, scoped to the dashboard's path."""
    parts = [f"{name}={'' if delete else value}", f"Path={path or '/'}", "HttpOnly"]
    parts.append("SameSite=Lax")
    parts.append("Max-Age=0" if delete else f"Max-Age={max_age}")
    if secure:
        parts.append("Secure")
    return "; ".join(parts)


def set_cookie(response: Response, request: Request, name: str, value: str, max_age: int) -> None:
    secure = request.url.scheme == "https"
    path = request.scope.get("root_path", "") or "/"
    response.headers.append("set-cookie", cookie_header(name, value, path, max_age, secure))


def delete_cookie(response: Response, request: Request, name: str) -> None:
    secure = request.url.scheme == "https"
    path = request.scope.get("root_path", "") or "/"
    response.headers.append("set-cookie", cookie_header(name, "", path, 0, secure, delete=True))


def safe_next(value: str | None, base: str) -> str:
    """Where to go after login: a path inside the dashboard, else the overview (never another
    site: ``//evil.example`` and ``/\\evil.example`` are refused)."""
    if (
        value
        and value.startswith(base + "/")
        and "\\" not in value
        and value.isprintable()
        and len(value) <= 2000
    ):
        return value
    return base + "/"


def _cookie(scope: Scope, name: str) -> str | None:
    for key, value in scope.get("headers", []):
        if key == b"cookie":
            for part in bytes(value).decode("latin-1").split(";"):
                cookie_name, _, cookie_value = part.strip().partition("=")
                if cookie_name == name:
                    return cookie_value
    return None


class SessionGate:
    """Pure ASGI: a request below the mount without a valid session goes to the login page
    (303, with where it was going); with one, the session rides along in the scope."""

    def __init__(self, app: ASGIApp, sessions: Sessions) -> None:
        self.app = app
        self.sessions = sessions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        root: str = scope.get("root_path", "")
        path: str = scope["path"]
        below = path[len(root) :] if path.startswith(root) else path
        session = self.sessions.load(_cookie(scope, SESSION_COOKIE))
        if session is not None:
            scope["dashboard_session"] = session
        elif below not in PUBLIC:
            target = root + "/login"
            query_string = scope.get("query_string", b"").decode("latin-1")
            if scope["method"] in ("GET", "HEAD") and (below not in ("", "/") or query_string):
                wanted = path + ("?" + query_string if query_string else "")
                target += "?next=" + quote(wanted, safe="/")
            response = RedirectResponse(target, status_code=303)
            if _cookie(scope, SESSION_COOKIE) is not None:
                # A cookie that did not check out (expired, forged, an old token): drop it.
                headers = MutableHeaders(raw=response.raw_headers)
                secure = scope.get("scheme") == "https"
                headers.append(
                    "set-cookie", cookie_header(SESSION_COOKIE, "", root or "/", 0, secure, True)
                )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
