"""Local-disk helpers both stores share: the temp folder sweep and folder fsync."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from reporting_endpoint.blobstores.base import TEMP_SUFFIX


def sweep_temp(folder: Path, older_than_seconds: float) -> int:
    """Delete ``*.part`` files in ``folder`` older than the cutoff; only old ones, because
    another worker process may be writing into the same folder right now."""
    if not folder.is_dir():
        return 0
    cutoff = time.time() - older_than_seconds
    removed = 0
    for leftover in folder.glob(f"*{TEMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            if leftover.stat().st_mtime < cutoff:
                leftover.unlink()
                removed += 1
    return removed


def fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def make_private_dirs(*folders: Path) -> None:
    # Dumps hold process memory: folders readable by the service's user only.
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
