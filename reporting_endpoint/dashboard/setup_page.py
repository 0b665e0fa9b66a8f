"""The set-up page: the headers that point a site's pages at this service, in each server's
config syntax (the builders of the ``header`` command), and whether that site has reported."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from reporting_endpoint.dashboard.render import base_path, query, render
from reporting_endpoint.grouping import origin_of, site_of
from reporting_endpoint.headers import HeaderError, HeaderOptions, build_headers
from reporting_endpoint.headers import render as config
from reporting_endpoint.intake import allowed_site_hosts, site_allowed
from reporting_endpoint.middleware import origin_allowed, origin_list
from reporting_endpoint.settings import Settings
from reporting_endpoint.storage.base import Storage
from reporting_endpoint.storage.filters import Filters

# The formats shown, in order, with their labels (``json`` is for programs, not people).
FORMATS = (("http", "HTTP"), ("nginx", "nginx"), ("caddy", "Caddy"), ("apache", "Apache"))
MAX_SITE_URL = 2048


class SetupPage:
    def __init__(self, settings: Settings, storage: Storage) -> None:
        self.settings = settings
        self.storage = storage
        # Read as the ingest reads them, so the page warns of exactly what it refuses.
        self.origins = origin_list(settings.cors_allow_origins)
        self.sites = allowed_site_hosts(settings.allowed_sites)

    async def show(self, request: Request) -> Response:
        params = query(request, frozenset({"url"}))
        site_url = params.get("url", "").strip()
        root = base_path(request).removesuffix("/dashboard")
        endpoint = f"{request.url.scheme}://{request.url.netloc}{root}/reports"
        problem = ""
        blocks: list[tuple[str, str, str]] = []
        try:
            headers = build_headers(
                HeaderOptions(endpoint, allow_insecure=request.url.scheme != "https")
            )
            for fmt, label in FORMATS:
                try:
                    blocks.append((fmt, label, config(headers, fmt)))
                except HeaderError as exc:
                    blocks.append((fmt, label, f"# {exc}"))
        except HeaderError as exc:
            problem = str(exc)
        site = origin = None
        seen = None
        cors_refused = site_refused = False
        if site_url:
            if len(site_url) > MAX_SITE_URL or "://" not in site_url:
                problem = problem or "enter the site's address, like https://www.example.com/"
            else:
                site, origin = site_of(site_url), origin_of(site_url)
                if site is None:
                    problem = problem or "that is not an http:// or https:// address"
                else:
                    found = await self.storage.groups(
                        "reports", ("site",), Filters((("site", site),)), 1
                    )
                    seen = found.groups[0] if found.groups else {}
                    cors_refused = origin is not None and not origin_allowed(origin, self.origins)
                    site_refused = bool(self.sites) and not site_allowed(site, self.sites)
        return render(
            request,
            "setup.html",
            "setup",
            "Set up",
            site_url=site_url,
            site=site,
            origin=origin,
            seen=seen,
            cors_refused=cors_refused,
            site_refused=site_refused,
            endpoint=endpoint,
            insecure=request.url.scheme != "https",
            blocks=blocks,
            problem=problem,
        )
