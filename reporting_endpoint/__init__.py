"""reporting_endpoint: a collector for browser crash reports (W3C Reporting API)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Settings", "__version__", "create_app", "lifespan"]

if TYPE_CHECKING:
    from reporting_endpoint.app import create_app, lifespan
    from reporting_endpoint.settings import Settings


def __getattr__(name: str) -> Any:
    # Lazy, so `reporting-endpoint header` need not import Starlette and friends.
    if name in {"create_app", "lifespan"}:
        from reporting_endpoint import app

        return getattr(app, name)
    if name == "Settings":
        from reporting_endpoint.settings import Settings

        return Settings
    raise AttributeError(name)
