"""The webhook signature: HMAC-SHA256 over a timestamp and the body, and its check.

A receiver recomputes ``hmac_sha256(secret, f"{t}.".encode() + body)`` with the raw body as
received, compares it in constant time with ``v1``, and refuses a ``t`` outside its replay
window. ``verify`` below is the whole check; it uses only the standard library, so a receiver
can copy it (README "Alerts").
"""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "X-Reporting-Endpoint-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"
# How far a signature's time may be from the receiver's clock (seconds, either way).
REPLAY_WINDOW_SECONDS = 300


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The signature header's value: ``t=<unix seconds>,v1=<hex HMAC-SHA256>``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(
    secret: str,
    body: bytes,
    header: str,
    now: float | None = None,
    window: int = REPLAY_WINDOW_SECONDS,
) -> bool:
    """Whether ``header`` signs ``body`` with ``secret`` within ``window`` seconds of now."""
    fields = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    try:
        timestamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > window:
        return False
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return hmac.compare_digest(expected.hexdigest(), fields.get("v1", ""))
