"""BlobStore.commit: a stored dump carries its commit time, whatever its upload's pace."""

from __future__ import annotations

import os
import time
from pathlib import Path

from reporting_endpoint.blobstores.filesystem import FilesystemBlobStore


def test_a_committed_blob_is_stamped_with_its_commit_time(tmp_path: Path) -> None:
    # A blob deletion skips files newer than its start; a slow upload whose last write is old
    # must still look new once committed, or a deletion running meanwhile could unlink it.
    store = FilesystemBlobStore(tmp_path / "data")
    writer = store.writer()
    writer.write(b"MDMP" + os.urandom(64))
    writer.file.flush()
    os.utime(writer.path, (1_000_000, 1_000_000))  # last written long ago
    before = time.time_ns()
    stored = store.commit_blocking(writer)
    final = store.path(stored.key)
    assert final.stat().st_mtime_ns >= before - 10_000_000  # file-system timestamp granularity
    assert oct(final.stat().st_mode & 0o777) == oct(0o600)
