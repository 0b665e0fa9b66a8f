"""Content-addressed files for minidumps and attachments: sha256 paths, temp file then rename."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class StoredBlob:
    sha256: str
    size: int
    path: Path  # relative to the store's root; never built from anything a client sent


class BlobWriter:
    """A temp file being written: hashes and counts as it goes; ``head`` keeps the first bytes."""

    def __init__(self, folder: Path) -> None:
        descriptor, name = tempfile.mkstemp(dir=folder, prefix="upload-", suffix=".part")
        self.path = Path(name)
        self.file = os.fdopen(descriptor, "wb")
        self.hash = hashlib.sha256()
        self.size = 0
        self.head = b""

    def write(self, data: bytes) -> None:
        if len(self.head) < 8:
            self.head += data[: 8 - len(self.head)]
        self.hash.update(data)
        self.file.write(data)
        self.size += len(data)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(OSError):
            self.path.unlink()


class BlobStore:
    """Files under ``root/blobs/ab/abcdef...``; the same content is stored once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = root / "blobs"
        self.tmp = root / "tmp"
        # Folders known to be on disk with their entries. Only added to after their fsync
        # returned, so a concurrent upload never skips a sync another is still doing, and empty
        # at start: a process that died between mkdir and fsync left them unknown. At most the
        # tree plus 256 ``blobs/ab`` names.
        self._synced: set[Path] = set()

    def ensure(self) -> None:
        # Dumps hold process memory: keep them readable by the service's user only.
        for folder in (self.root, self.blobs, self.tmp):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)

    def sweep(self, older_than_seconds: float = 3600) -> int:
        """Delete temp files a killed process left behind (never answered, so nothing is lost);
        only old ones, in case another worker is writing into the same folder."""
        if not self.tmp.is_dir():
            return 0
        cutoff = time.time() - older_than_seconds
        removed = 0
        for leftover in self.tmp.glob("upload-*.part"):
            with contextlib.suppress(OSError):
                if leftover.stat().st_mtime < cutoff:
                    leftover.unlink()
                    removed += 1
        return removed

    def writer(self) -> BlobWriter:
        self.ensure()
        return BlobWriter(self.tmp)

    def commit(self, writer: BlobWriter) -> StoredBlob:
        """Make the file durable at its content address (blocking: call it off the event loop).

        A file survives a power loss only once every folder on its path that gained or lost an
        entry is synced too, so this syncs the file, its ``blobs/ab`` folder, ``tmp/`` (the
        temp name left it), and, until this process has synced them once, ``blobs/`` (for the
        entry ``ab``) and the folders up to the one that holds the data folder. The caller
        commits the row only after.
        """
        writer.file.flush()
        # Stamp the commit time, not the last write's: a blob deletion running meanwhile skips
        # files newer than its start (storage/deletion.py), and a slow upload's last write can
        # be older than that while its row is still on the way.
        os.utime(writer.file.fileno())
        os.fsync(writer.file.fileno())
        writer.file.close()
        digest = writer.hash.hexdigest()
        relative = Path("blobs") / digest[:2] / digest
        final = self.root / relative
        final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.replace(writer.path, final)
        _fsync_dir(final.parent)
        _fsync_dir(self.tmp)
        # blobs/ holds the entry of ab/, the data folder those of blobs/ and tmp/, and so on up.
        for folder, entry in (
            (self.blobs, final.parent),
            (self.root, self.blobs),
            (self.root.parent, self.root),
        ):
            if entry not in self._synced:
                _fsync_dir(folder)
                self._synced.add(entry)
        return StoredBlob(digest, writer.size, relative)

    def open_path(self, relative: str | Path) -> Path:
        path = (self.root / relative).resolve()
        if self.blobs.resolve() not in path.parents:
            raise ValueError("not a blob path")
        return path


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
