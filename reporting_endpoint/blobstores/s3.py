"""Blobs as objects in S3-compatible storage: ``s3://bucket/prefix``, keys ``blobs/ab/<sha256>``.

Through obstore (the Rust ``object_store`` crate, fully typed, one wheel with no Python
dependencies). Endpoint, region and credentials come from the standard variables
``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID`` and ``AWS_SECRET_ACCESS_KEY`` (and
the rest of obstore's ``AWS_*`` set); an explicit ``http://`` endpoint (MinIO, SeaweedFS or a
test server) is allowed, the default AWS endpoints stay HTTPS.

An upload streams into a local temp file under ``<data dir>/tmp`` first, as on the filesystem
store, and ``commit`` uploads the finished file with one conditional PUT: S3 answers 200 only
once the object is durably stored, so the row can be committed after it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, cast
from urllib.parse import urlsplit

import obstore
from obstore.exceptions import AlreadyExistsError, BaseError, PreconditionError
from obstore.store import S3Store

from reporting_endpoint.blobstores._local import make_private_dirs, sweep_temp
from reporting_endpoint.blobstores.base import (
    BlobInfo,
    BlobLocks,
    BlobNotFound,
    BlobStoreError,
    BlobWriter,
    StoredBlob,
    key_for,
    validate_key,
)
from reporting_endpoint.blobstores.locks import ShardLocks

if TYPE_CHECKING:
    from obstore import BytesStream, ObjectMeta
    from obstore.store import S3Config

CHUNK = 1024 * 1024
DOWNLOAD_PREFIX = "download-"


def parse_url(spec: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, prefix without slashes at either end)."""
    parts = urlsplit(spec)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"not an s3://bucket/prefix URL: {spec!r}")
    return parts.netloc, parts.path.strip("/")


# The standard variables, read here rather than left to the library's own environment
# parsing, so what the service honours is written down in one place and visible in the
# store's config (obstore still reads the rest of its AWS_* set: session tokens, web
# identity, instance metadata).
_VARIABLES: dict[str, tuple[str, ...]] = {
    "endpoint": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
    "region": ("AWS_REGION", "AWS_DEFAULT_REGION"),
    "access_key_id": ("AWS_ACCESS_KEY_ID",),
    "secret_access_key": ("AWS_SECRET_ACCESS_KEY",),
    "session_token": ("AWS_SESSION_TOKEN",),
}


def config_from_env(environ: Mapping[str, str]) -> S3Config:
    config: dict[str, str] = {}
    for name, variables in _VARIABLES.items():
        value = next((environ[v] for v in variables if environ.get(v)), None)
        if value is not None:
            config[name] = value
    return cast("S3Config", config)


def _allow_http(config: S3Config) -> bool:
    # Only an endpoint the operator named with http:// (a local MinIO/SeaweedFS or the test
    # server); AWS's own endpoints are built by the library and always HTTPS.
    return str(config.get("endpoint", "")).lower().startswith("http://")


class S3BlobStore:
    """Blobs in a bucket under a prefix; local temp files in ``data_dir/tmp``."""

    def __init__(self, spec: str, data_dir: Path, locks: BlobLocks | None = None) -> None:
        bucket, prefix = parse_url(spec)
        self.spec = spec
        self.tmp = data_dir / "tmp"
        # By default local: they order the uploads and deletions of the processes sharing
        # this data folder (one host); several hosts on one bucket need locks all of them see.
        self.locks: BlobLocks = locks or ShardLocks(data_dir / "locks")
        self.data_dir = data_dir
        config = config_from_env(os.environ)
        self.store = S3Store(
            bucket,
            prefix=prefix or None,
            config=config,
            client_options={"allow_http": _allow_http(config)},
        )

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(make_private_dirs, self.data_dir, self.tmp)
        await self.sweep()

    async def close(self) -> None:
        return None

    async def sweep(self, older_than_seconds: float = 3600) -> int:
        return await asyncio.to_thread(sweep_temp, self.tmp, older_than_seconds)

    # --- writing ------------------------------------------------------------------------

    def writer(self) -> BlobWriter:
        make_private_dirs(self.tmp)
        return BlobWriter(self.tmp)

    async def commit(self, writer: BlobWriter) -> StoredBlob:
        """Upload the temp file unless the object is there already; remove the temp file.

        HEAD first, so the same content (20 identical attachments, the same dump uploaded
        twice) costs one small request, not an upload; then a PUT with ``If-None-Match: *``,
        so two hosts storing the same new content at once never overwrite each other (the
        loser's 412 means the object is stored, which is all the caller needs).
        """
        try:
            await asyncio.to_thread(_close, writer)
            key = key_for(writer.sha256)
            if not await self.exists(key):
                # mode="create" is one (non-multipart) PUT of the file: dumps are capped well
                # below S3's 5 GiB single-PUT limit by the decompressed-body limit.
                # A 412 means another upload stored the same content first: stored, done.
                with suppress(AlreadyExistsError, PreconditionError):
                    await obstore.put_async(self.store, key, writer.path, mode="create")
            return StoredBlob(writer.sha256, writer.size, key)
        except BaseError as exc:
            # The bucket unreachable or refusing: the upload is answered 503, never 500.
            raise BlobStoreError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            await asyncio.to_thread(writer.discard)

    async def commit_all(self, writers: Sequence[BlobWriter]) -> list[StoredBlob]:
        # Uploads run concurrently (network round trips, not disk); every temp file is
        # removed whatever fails, since each commit discards its own.
        results = await asyncio.gather(
            *(self.commit(writer) for writer in writers), return_exceptions=True
        )
        stored: list[StoredBlob] = []
        for result in results:
            if isinstance(result, BaseException):
                raise result
            stored.append(result)
        return stored

    # --- keeping deletions off blobs whose rows are on their way (locks.py) ------------

    def uploading(self, keys: Sequence[str]) -> AbstractAsyncContextManager[None]:
        return self.locks.uploading(keys)

    def removing(self, keys: Sequence[str]) -> AbstractAsyncContextManager[bool]:
        return self.locks.removing(keys)

    # --- reading ------------------------------------------------------------------------

    async def _head(self, key: str) -> ObjectMeta | None:
        try:
            return await obstore.head_async(self.store, validate_key(key))
        except FileNotFoundError:  # obstore's NotFoundError is one
            return None

    async def open(self, key: str) -> _ObjectStream:
        try:
            result = await obstore.get_async(self.store, validate_key(key))
        except FileNotFoundError:
            raise BlobNotFound(key) from None
        except BaseError as exc:
            raise BlobStoreError(f"{type(exc).__name__}: {exc}") from exc
        return _ObjectStream(result.stream(min_chunk_size=CHUNK), result.meta["size"])

    @asynccontextmanager
    async def local_file(self, key: str) -> AsyncIterator[Path]:
        stream = await self.open(key)
        await asyncio.to_thread(make_private_dirs, self.tmp)
        # A temp name in tmp/ (0600, swept when a kill leaves it), removed when the parse is
        # done: the bucket stays the only lasting copy.
        writer = await asyncio.to_thread(BlobWriter, self.tmp)
        try:
            async for chunk in stream:
                await asyncio.to_thread(writer.write, chunk)
            await asyncio.to_thread(_close, writer)
            yield writer.path
        finally:
            await asyncio.to_thread(writer.discard)

    async def exists(self, key: str) -> bool:
        return await self._head(key) is not None

    # --- deleting -----------------------------------------------------------------------

    async def delete(self, key: str, *, unless_committed_after_ns: int | None = None) -> bool:
        """Delete one object; with a time, only when it was last written before it.

        S3 has no conditional delete on the modification time, so this is HEAD then DELETE: a
        commit that lands between the two is not seen, and the bucket's clock is not this
        host's. The storage layer must not rely on this alone to protect an upload reusing
        the object (see the report on issue 10).
        """
        try:
            meta = await self._head(key)
            if meta is None:
                return False
            if unless_committed_after_ns is not None and (
                _ns(meta["last_modified"]) > unless_committed_after_ns
            ):
                return False
            await obstore.delete_async(self.store, key)
        except BaseError as exc:
            # The rows are gone already: the caller logs this and the orphan sweep retries.
            raise BlobStoreError(f"{type(exc).__name__}: {exc}") from exc
        return True

    async def delete_many(
        self, keys: Sequence[str], *, unless_committed_after_ns: int | None = None
    ) -> int:
        done = await asyncio.gather(
            *(self.delete(k, unless_committed_after_ns=unless_committed_after_ns) for k in keys)
        )
        return sum(done)

    async def list_blobs(self) -> AsyncIterator[BlobInfo]:
        # Paged LIST requests (1000 keys each); keys that are not content addresses (someone
        # else's objects under the prefix) are left out, and so never deleted by a sweep.
        listing = self.store.list("blobs")
        while True:
            try:
                batch = await anext(listing)
            except StopAsyncIteration:
                return
            except BaseError as exc:
                raise BlobStoreError(f"{type(exc).__name__}: {exc}") from exc
            for meta in batch:
                try:
                    key = validate_key(meta["path"])
                except ValueError:
                    continue
                yield BlobInfo(key, meta["size"], _ns(meta["last_modified"]))


class _ObjectStream:
    """A GET response read in chunks as the client takes them."""

    def __init__(self, stream: BytesStream, size: int) -> None:
        self._stream = stream
        self.size = size

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield bytes(chunk)

    async def aclose(self) -> None:
        # Dropping the stream closes the connection: obstore has no explicit close.
        return None


def _close(writer: BlobWriter) -> None:
    writer.file.flush()
    writer.file.close()


def _ns(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000_000)
