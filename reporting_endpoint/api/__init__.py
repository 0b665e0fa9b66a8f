"""The JSON API under /api: reads (``read``), issues and their triage (``issues``), alerts and
their delivery log (``alerts``), and the bearer-token middleware in front of them (read token
for GET, write token for changes).

``api_routes`` is what ``app.py`` mounts; the names below are the package's public API (they
were ``reporting_endpoint.api``'s when it was one module).
"""

from __future__ import annotations

from starlette.routing import Route

from reporting_endpoint.api.alerts import AlertsApi
from reporting_endpoint.api.issues import IssuesApi
from reporting_endpoint.api.read import ALLOWED_PARAMETERS, BearerTokenMiddleware, ReadApi
from reporting_endpoint.blobstores import BlobStore
from reporting_endpoint.storage.base import Storage

__all__ = ["ALLOWED_PARAMETERS", "BearerTokenMiddleware", "IssuesApi", "ReadApi", "api_routes"]


def api_routes(storage: Storage, blobs: BlobStore) -> list[Route]:
    """Every route under /api (paths relative to the mount)."""
    return [
        *ReadApi(storage, blobs).routes(),
        *IssuesApi(storage).routes(),
        *AlertsApi(storage).routes(),
    ]
