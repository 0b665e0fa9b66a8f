"""Reading a dashboard form: bounded, URL-encoded only, and refused without the CSRF token of
the session (or, for the login form, of the login cookie)."""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from starlette.requests import Request

from reporting_endpoint.dashboard.auth import session_of
from reporting_endpoint.dashboard.render import Refusal
from reporting_endpoint.errors import RequestRejected

# A dashboard form is a handful of short fields.
MAX_FORM_BYTES = 16 * 1024
MAX_FIELDS = 10
MAX_FIELD = 2000


async def read_form(request: Request) -> dict[str, str]:
    """The form's fields, each once; refused when a browser says it came from another site."""
    media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media != "application/x-www-form-urlencoded":
        raise Refusal(415, "unsupported_media_type", "send the form as the page does")
    site = request.headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        # A browser that says the form came from another site: refused whatever it carries.
        raise Refusal(403, "cross_site_form", "this form can only be sent from the dashboard")
    # The mount's body limit stops a larger body before it is read.
    try:
        form = await request.form(max_files=0, max_fields=MAX_FIELDS, max_part_size=MAX_FIELD)
    except RequestRejected as exc:
        # A streamed body past the limit: refused in the dashboard's own shape.
        raise Refusal(exc.status, exc.code, exc.message) from None
    fields: dict[str, str] = {}
    for name, value in form.multi_items():
        if not isinstance(value, str):
            raise Refusal(400, "unknown_field", "this form takes no files")
        if name in fields:
            raise Refusal(400, "repeated_field", f"{name!r} given more than once")
        if len(value) > MAX_FIELD:
            raise Refusal(400, "invalid_value", f"{name!r} is too long")
        fields[name] = value
    return fields


def only(fields: dict[str, str], names: Sequence[str]) -> dict[str, str]:
    """``fields`` without ``csrf``, refused when one is not among ``names``."""
    unknown = sorted(set(fields) - {*names, "csrf"})
    if unknown:
        raise Refusal(400, "unknown_field", f"this form has no field {unknown[0]!r}")
    return {name: value for name, value in fields.items() if name != "csrf"}


async def checked_form(request: Request, names: Sequence[str]) -> dict[str, str]:
    """A form of a signed-in person, refused (403) without the session's CSRF token, checked
    before anything else about the form."""
    fields = await read_form(request)
    session = session_of(request)
    given = fields.get("csrf", "")
    if not given:
        raise Refusal(403, "csrf_missing", "the form lacks its CSRF token: reload the page")
    if session is None or not hmac.compare_digest(given.encode(), session.csrf.encode()):
        raise Refusal(403, "csrf_invalid", "the form's CSRF token is not this session's")
    return only(fields, names)
