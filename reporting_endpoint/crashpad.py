"""Crashpad/Breakpad minidump uploads: de-gzip, stream the multipart form to blobs, commit, id.

The crash gets its issue later, when the analyzer has parsed the dump (its signature is part
of the fingerprint); its release is known at once and stored with the row.
"""

from __future__ import annotations

import logging
import time
import uuid
import zlib
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import parse_qsl

from isal import isal_zlib
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.responses import PlainTextResponse, Response
from starlette.types import Receive, Scope, Send

from reporting_endpoint import metrics
from reporting_endpoint.blobstores import BlobStore, BlobStoreError, BlobWriter, StoredBlob
from reporting_endpoint.blobstores.base import key_for
from reporting_endpoint.errors import RequestRejected
from reporting_endpoint.issues.releases import crash_release
from reporting_endpoint.records import NewCrash
from reporting_endpoint.settings import Settings
from reporting_endpoint.storage.base import Storage, StorageError

DUMP_FIELD = "upload_file_minidump"
MINIDUMP_MAGIC = b"MDMP"
GZIP_MAGIC = b"\x1f\x8b"
CHUNK = 64 * 1024  # most bytes one decompress step may produce: bounds memory per upload
MAX_QUERY_BYTES = 4096

log = logging.getLogger("reporting_endpoint.crashpad")
# isal's stub types its error as an instance; it is the class ISA-L raises on a bad stream.
_INFLATE_ERRORS: tuple[type[Exception], ...] = (cast(type[Exception], isal_zlib.error), zlib.error)


class UploadRejected(Exception):
    """Why an upload was refused; answered as ``Discarded=<code>`` in text/plain."""

    def __init__(self, status: int, code: str) -> None:
        super().__init__(code)
        self.status = status
        self.code = code


async def send_text(
    send: Send, status: int, text: str, headers: dict[str, str] | None = None
) -> None:
    body = text.encode()
    raw_headers = [
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode()),
    ]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


def discarded(exc: RequestRejected) -> Response:
    """BodyLimitMiddleware's answer in this endpoint's format."""
    code = "too_large" if exc.status == 413 else exc.code
    return PlainTextResponse(f"Discarded={code}", status_code=exc.status)


class _Form:
    """python-multipart callbacks: text parts into a dict, file parts into temp files."""

    def __init__(self, settings: Settings, blobs: BlobStore) -> None:
        self.settings = settings
        self.blobs = blobs
        self.fields: dict[str, str] = {}
        self.files: list[tuple[str, str, BlobWriter]] = []
        self.parts = 0
        self.text_bytes = 0
        self.ended = False
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._name = ""
        self._filename: str | None = None
        self._text = bytearray()
        self._file: BlobWriter | None = None

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._header_name.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._header_value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self.parts += 1
        if self.parts > self.settings.crashpad_max_parts:
            raise UploadRejected(413, "too_many_parts")
        self._headers = {}
        self._name, self._filename, self._file = "", None, None
        self._text = bytearray()

    def _header_end(self) -> None:
        self._headers[bytes(self._header_name).lower()] = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = options.get(b"name", b"").decode("utf-8", "replace")[:256]
        filename = options.get(b"filename")
        if filename is not None:
            self._filename = filename.decode("utf-8", "replace")[:256]
            self._file = self.blobs.writer()
            self.files.append((self._name, self._filename, self._file))

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._file is not None:
            self._file.write(data[start:end])
            return
        self._text.extend(data[start:end])
        if len(self._text) > self.settings.crashpad_max_field_bytes:
            raise UploadRejected(413, "part_too_large")
        # Each part within its own limit still added up: 255 parts of 64 KiB, from a 35 KB gzip
        # body, stored 16 MiB in one row that every crash page then loaded.
        self.text_bytes += end - start
        if self.text_bytes > self.settings.crashpad_max_annotation_bytes:
            raise UploadRejected(413, "annotations_too_large")

    def _part_end(self) -> None:
        if self._file is None and self._name:
            self.fields[self._name] = self._text.decode("utf-8", "replace")

    def _end(self) -> None:
        self.ended = True

    def discard(self) -> None:
        for _, _, writer in self.files:
            writer.discard()


class _Gunzip:
    """Streaming gunzip that never produces more than ``limit`` bytes in all."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0
        # ISA-L's inflate: the same stream API as zlib's, about twice as fast on dumps.
        self.inflater = isal_zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)

    def feed(self, data: bytes, sink: Callable[[bytes], None]) -> None:
        while data and not self.inflater.eof:
            try:
                out = self.inflater.decompress(data, CHUNK)
            except _INFLATE_ERRORS:
                raise UploadRejected(400, "bad_gzip") from None
            self.total += len(out)
            if self.total > self.limit:
                raise UploadRejected(413, "too_large")
            sink(out)
            data = self.inflater.unconsumed_tail

    @property
    def complete(self) -> bool:
        return self.inflater.eof


def _pick(*values: str | None) -> str | None:
    for value in values:
        if value:
            return value
    return None


class CrashpadEndpoint:
    """``POST /crashpad``: answers 200 with the bare report id only once the row is committed.

    Crashpad stores the answer's body as the report id the app sees, never retries a failed
    upload, and on Linux counts only 200 as success: so every upload is treated as the only
    copy, and every refusal is a 4xx with a reason.
    """

    def __init__(
        self,
        settings: Settings,
        storage: Storage,
        blobs: BlobStore,
        on_stored: Callable[[NewCrash], None] | None = None,
    ) -> None:
        self.settings = settings
        self.storage = storage
        self.blobs = blobs
        self.on_stored = on_stored

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            crash = await self.ingest(scope, receive)
        except UploadRejected as exc:
            metrics.request_rejected("crashpad", exc.code)
            await send_text(send, exc.status, f"Discarded={exc.code}")
            return
        except StorageError as exc:
            metrics.request_rejected("crashpad", exc.code)
            await send_text(send, 503, f"Discarded={exc.code}", {"Retry-After": "60"})
            return
        except (BlobStoreError, OSError) as exc:
            # The bucket or the disk failed (full, unreachable): nothing was committed.
            log.warning("upload refused: the blob store failed: %s", exc)
            code = exc.code if isinstance(exc, BlobStoreError) else BlobStoreError.code
            metrics.request_rejected("crashpad", code)
            await send_text(send, 503, f"Discarded={code}", {"Retry-After": "60"})
            return
        try:
            metrics.crash_stored(crash.upload_bytes)
        except Exception:
            # The crash is committed: a metrics failure (multiprocess mode writes files) must
            # not answer 500, which Crashpad would take as a lost upload.
            log.exception("counting a stored crash failed")
        await send_text(send, 200, crash.id)  # no trailing newline: it becomes the id verbatim
        if self.on_stored is not None:
            self.on_stored(crash)

    async def ingest(self, scope: Scope, receive: Receive) -> NewCrash:
        headers = {k.lower(): v for k, v in scope["headers"]}
        media_type, options = parse_options_header(headers.get(b"content-type", b""))
        if media_type != b"multipart/form-data":
            raise UploadRejected(415, "unsupported_media_type")
        boundary = options.get(b"boundary")
        if not boundary:
            raise UploadRejected(400, "no_boundary")
        encoding = headers.get(b"content-encoding", b"").strip().lower()
        if encoding not in {b"", b"identity", b"gzip", b"x-gzip"}:
            raise UploadRejected(415, "unsupported_content_encoding")

        form = _Form(self.settings, self.blobs)
        try:
            upload_bytes = await self._read(receive, boundary, encoding, form)
            crash = await self._store(scope, form, upload_bytes)
        except BaseException:
            form.discard()
            raise
        return crash

    async def _read(self, receive: Receive, boundary: bytes, encoding: bytes, form: _Form) -> int:
        try:
            parser = MultipartParser(boundary, callbacks=form.callbacks())  # type: ignore[arg-type]
        except (ValueError, MultipartParseError):
            raise UploadRejected(400, "no_boundary") from None
        limit = self.settings.crashpad_max_decompressed_bytes
        gunzip: _Gunzip | None = _Gunzip(limit) if encoding in {b"gzip", b"x-gzip"} else None
        sniffed = gunzip is not None
        head = b""
        received = 0
        plain_total = 0

        def to_parser(data: bytes) -> None:
            try:
                parser.write(data)
            except MultipartParseError:
                raise UploadRejected(400, "bad_multipart") from None

        while True:
            try:
                message = await receive()
            except RequestRejected:
                raise UploadRejected(413, "too_large") from None
            if message["type"] == "http.disconnect":
                raise UploadRejected(400, "truncated")
            chunk: bytes = message.get("body", b"")
            received += len(chunk)
            more = message.get("more_body", False)
            if not sniffed:
                # Gzip is also recognised by its magic bytes (some clients omit the header).
                head += chunk
                if len(head) < 2 and more:
                    continue
                sniffed = True
                if head[:2] == GZIP_MAGIC:
                    gunzip = _Gunzip(limit)
                chunk = head
            if gunzip is not None:
                gunzip.feed(chunk, to_parser)
            elif chunk:
                plain_total += len(chunk)
                if plain_total > limit:
                    raise UploadRejected(413, "too_large")
                to_parser(chunk)
            if not more:
                break
        if gunzip is not None and not gunzip.complete:
            raise UploadRejected(400, "truncated")
        try:
            parser.finalize()
        except MultipartParseError:
            raise UploadRejected(400, "truncated") from None
        if not form.ended:
            raise UploadRejected(400, "truncated")
        return received

    async def _store(self, scope: Scope, form: _Form, upload_bytes: int) -> NewCrash:
        dumps = [writer for name, _, writer in form.files if name == DUMP_FIELD]
        if not dumps:
            raise UploadRejected(400, "no_minidump")
        dump_writer = dumps[0]
        if dump_writer.head[:4] != MINIDUMP_MAGIC:
            raise UploadRejected(400, "not_a_minidump")

        writers = [writer for _, _, writer in form.files]
        # Held until the row has committed: a deletion freeing the same content waits for
        # it, so it cannot remove a blob this row is about to reference (blobstores/locks.py).
        async with self.blobs.uploading([key_for(w.sha256) for w in writers]):
            blobs = await self.blobs.commit_all(writers)
            crash = self._crash(scope, form, upload_bytes, blobs, writers.index(dump_writer))
            await self.storage.insert_crash(crash)
        return crash

    def _crash(
        self,
        scope: Scope,
        form: _Form,
        upload_bytes: int,
        blobs: list[StoredBlob],
        dump_index: int,
    ) -> NewCrash:
        dump_blob = blobs[dump_index]
        attachments = tuple(
            {
                "name": name,
                "filename": filename,
                "sha256": blob.sha256,
                "size": blob.size,
                "path": blob.key,
            }
            for index, ((name, filename, _), blob) in enumerate(zip(form.files, blobs, strict=True))
            if index != dump_index
        )
        raw_query = bytes(scope.get("query_string", b""))[:MAX_QUERY_BYTES]
        query = dict(parse_qsl(raw_query.decode("utf-8", "replace")))
        fields = form.fields
        is_electron = fields.get("prod") == "Electron"
        return NewCrash(
            id=uuid.uuid4().hex,
            received_at=time.time_ns() // 1_000_000,
            # Electron: the app's own name and version, not Electron's ("prod"/"ver", which
            # Crashpad also copies into the query string).
            product=_pick(fields.get("_productName"), query.get("product"), fields.get("prod")),
            version=_pick(fields.get("_version"), query.get("version"), fields.get("ver")),
            guid=_pick(query.get("guid"), fields.get("guid")),
            # Electron names them platform/process_type; Chrome's own crash keys (and what a
            # Crashpad handler reads from dumps it did not write) are plat/ptype.
            platform=_pick(fields.get("platform"), fields.get("plat")),
            process_type=_pick(fields.get("process_type"), fields.get("ptype")),
            electron_version=fields.get("ver") if is_electron else None,
            annotations=dict(fields),
            query=query,
            dump_sha256=dump_blob.sha256,
            dump_size=dump_blob.size,
            dump_path=dump_blob.key,
            attachments=attachments,
            upload_bytes=upload_bytes,
            # The app's release (Electron's _version, else ver, else the upload's version),
            # kept on the row for the issue's first and last release.
            release=crash_release(fields, query),
        )
