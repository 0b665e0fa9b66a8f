"""Symbols over HTTP: uploads (write token), the Breakpad symbol-server layout under /symbols,
and the list of stored and missing symbols under /api (read token)."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

import orjson
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from reporting_endpoint.api.read import answered
from reporting_endpoint.blobstores import BlobNotFound, BlobStore, BlobStoreError, BlobStream
from reporting_endpoint.blobstores.base import key_for
from reporting_endpoint.errors import RETRY_LATER, RequestRejected
from reporting_endpoint.middleware import BodyLimitMiddleware
from reporting_endpoint.native.records import SymbolFile
from reporting_endpoint.native.symbol_import import (
    MAX_UNPACKING,
    SymbolImportError,
    display_name,
    import_files,
    workspace,
)
from reporting_endpoint.params import QueryError, parse_limit
from reporting_endpoint.settings import Settings
from reporting_endpoint.storage.base import Storage

log = logging.getLogger("reporting_endpoint.api.symbols")

# Form parts in one upload (files and text fields), and the text fields' bytes together: the
# fields are not used, so they only need a bound.
MAX_PARTS = 256
MAX_FIELD_BYTES = 64 * 1024
# A debug file, debug id or symbol file name in a request path: Breakpad's are short.
MAX_PATH_PART = 512
MAX_CURSOR = 2048
UPLOAD_FIELDS = ("debug_file", "debug_id", "name", "code_file", "code_id", "os", "arch")


def json_response(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def symbol_json(found: SymbolFile) -> dict[str, Any]:
    """A stored symbol file as the API lists it."""
    return {**asdict(found), "path": found.path}


def encode_symbol_cursor(last: SymbolFile) -> str:
    text = orjson.dumps([last.debug_file, last.debug_id])
    return base64.urlsafe_b64encode(text).decode().rstrip("=")


def decode_symbol_cursor(cursor: str | None) -> tuple[str, str] | None:
    if not cursor:
        return None
    bad = QueryError("invalid_cursor", "cursor is not one this service gave out")
    if len(cursor) > MAX_CURSOR:
        raise bad
    try:
        value = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, orjson.JSONDecodeError):
        raise bad from None
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)):
        raise bad
    return value[0], value[1]


def _params(request: Request, allowed: set[str]) -> dict[str, str]:
    params: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name not in allowed:
            raise QueryError("unknown_parameter", f"this endpoint does not take {name!r}")
        if name in params:
            raise QueryError("repeated_parameter", f"{name!r} given more than once")
        params[name] = value
    return params


async def _chunks(stream: BlobStream) -> AsyncIterator[bytes]:
    try:
        async for chunk in stream:
            yield chunk
    finally:
        await stream.aclose()


class _Form:
    """python-multipart callbacks: each file part into its own file in ``workdir`` (named by
    its position, never by the client), text parts counted and dropped."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.files: list[tuple[Path, str]] = []
        self.parts = 0
        self.field_bytes = 0
        self.ended = False
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._file: IO[bytes] | None = None

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._header_name.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._header_value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._close,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise RequestRejected(413, "too_many_parts", f"more than {MAX_PARTS} form parts")
        self._headers = {}

    def _header_end(self) -> None:
        self._headers[bytes(self._header_name).lower()] = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        filename = options.get(b"filename")
        if filename is None:
            return
        path = self.workdir / f"part-{len(self.files)}"
        self._file = path.open("xb")
        self.files.append((path, display_name(filename.decode("utf-8", "replace"))))

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._file is not None:
            self._file.write(data[start:end])
            return
        self.field_bytes += end - start
        if self.field_bytes > MAX_FIELD_BYTES:
            raise RequestRejected(413, "fields_too_large", "the text fields are over 64 KiB")

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _end(self) -> None:
        self.ended = True


class SymbolsApi:
    """``POST /symbols/upload``, ``GET /symbols/<debug_file>/<debug_id>/<name>``,
    ``GET /api/symbols`` and ``GET /api/symbols/missing``."""

    def __init__(self, settings: Settings, storage: Storage, blobs: BlobStore) -> None:
        self.settings = settings
        self.storage = storage
        self.blobs = blobs
        # Uploads in progress live under the data folder (not /tmp, often a small tmpfs).
        self.temp_folder = settings.data_dir / "tmp"
        self._gate: asyncio.Semaphore | None = None

    # --- uploads ------------------------------------------------------------------------

    async def upload(self, request: Request) -> Response:
        media_type, options = parse_options_header(request.headers.get("content-type", ""))
        if media_type != b"multipart/form-data":
            raise RequestRejected(
                415, "unsupported_media_type", "send multipart/form-data with one file part each"
            )
        boundary = options.get(b"boundary")
        if not boundary:
            raise RequestRejected(400, "no_boundary", "the multipart body has no boundary")
        encoding = request.headers.get("content-encoding", "").strip().lower()
        if encoding not in ("", "identity"):
            raise RequestRejected(
                415, "unsupported_content_encoding", "send the body without Content-Encoding"
            )
        if self._gate is None:
            self._gate = asyncio.Semaphore(MAX_UNPACKING)
        try:
            async with workspace(self.temp_folder) as workdir:
                files = await self._receive(request, boundary, workdir)
                if not files:
                    raise RequestRejected(
                        400, "no_symbol_files", "the form has no file part (curl -F file=@x.sym)"
                    )
                imported = await answered(
                    import_files(self.storage, self.blobs, files, workdir, gate=self._gate),
                    "symbol store",
                )
        except SymbolImportError as exc:
            raise RequestRejected(400, exc.code, f"{exc.filename}: {exc.message}") from None
        except (BlobStoreError, OSError) as exc:
            log.warning("symbol upload refused: the blob store or the disk failed: %s", exc)
            code = exc.code if isinstance(exc, BlobStoreError) else BlobStoreError.code
            raise RequestRejected(
                503, code, "the symbol files could not be stored now", RETRY_LATER
            ) from None
        stored = [
            {**{name: getattr(f, name) for name in UPLOAD_FIELDS}, "path": f.path}
            for f in imported.stored
        ]
        return json_response({"stored": stored, "requeued": imported.requeued})

    async def _receive(
        self, request: Request, boundary: bytes, workdir: Path
    ) -> list[tuple[Path, str]]:
        form = _Form(workdir)
        try:
            parser = MultipartParser(boundary, callbacks=form.callbacks())  # type: ignore[arg-type]
        except (ValueError, MultipartParseError):
            raise RequestRejected(400, "no_boundary", "the boundary is not usable") from None
        try:
            async for chunk in request.stream():
                if chunk:
                    parser.write(chunk)
            parser.finalize()
        except MultipartParseError:
            raise RequestRejected(400, "bad_multipart", "the body is not valid multipart") from None
        except ClientDisconnect:
            raise RequestRejected(
                400, "client_disconnected", "the body ended early; nothing was stored"
            ) from None
        finally:
            form._close()
        if not form.ended:
            raise RequestRejected(400, "truncated", "the multipart body ends early")
        return form.files

    # --- the symbol server --------------------------------------------------------------

    async def symbol_file(self, request: Request) -> Response:
        debug_file: str = request.path_params["debug_file"]
        debug_id: str = request.path_params["debug_id"]
        name: str = request.path_params["name"]
        missing = RequestRejected(404, "symbol_not_found", "no symbol file at that path")
        if max(len(debug_file), len(debug_id), len(name)) > MAX_PATH_PART:
            raise missing
        found = await answered(self.storage.get_symbol_file(debug_file, debug_id), "symbol store")
        if found is None and debug_id != debug_id.upper():
            # Breakpad ids are upper-case hex; some clients ask in lower case.
            upper = debug_id.upper()
            found = await answered(self.storage.get_symbol_file(debug_file, upper), "symbol store")
        if found is None or found.name != name:
            raise missing
        try:
            stream = await self.blobs.open(key_for(found.sym_sha256))
        except (BlobNotFound, ValueError):
            raise RequestRejected(404, "symbol_file_missing", "the symbol file is gone") from None
        except (BlobStoreError, OSError):
            raise RequestRejected(
                503, "blob_store_error", "the symbol store is not available", RETRY_LATER
            ) from None
        return StreamingResponse(
            _chunks(stream),
            media_type="text/plain",
            headers={"Content-Length": str(stream.size)},
        )

    # --- /api ---------------------------------------------------------------------------

    async def list_symbols(self, request: Request) -> Response:
        try:
            params = _params(request, {"limit", "cursor"})
            limit = parse_limit(params.get("limit"))
            after = decode_symbol_cursor(params.get("cursor"))
        except QueryError as exc:
            raise RequestRejected(400, exc.code, exc.message) from None
        found = await answered(self.storage.list_symbol_files(limit, after), "symbol store")
        # A full page may have a next one; an empty page then ends the listing.
        cursor = encode_symbol_cursor(found[-1]) if len(found) >= limit else None
        return json_response({"symbols": [symbol_json(f) for f in found], "next_cursor": cursor})

    async def missing(self, request: Request) -> Response:
        try:
            params = _params(request, {"limit"})
            limit = parse_limit(params.get("limit"))
        except QueryError as exc:
            raise RequestRejected(400, exc.code, exc.message) from None
        found = await answered(self.storage.missing_symbols(limit), "symbol store")
        return json_response({"missing": [asdict(m) for m in found]})

    def server_routes(self) -> list[Route]:
        """Under /symbols."""
        return [
            Route(
                "/upload",
                self.upload,
                methods=["POST"],
                # From Content-Length at once, else counted as the body streams.
                middleware=[
                    Middleware(
                        BodyLimitMiddleware,
                        max_bytes=self.settings.symbol_upload_max_bytes,
                        endpoint=None,
                    )
                ],
            ),
            Route("/{debug_file}/{debug_id}/{name}", self.symbol_file, methods=["GET"]),
        ]

    def api_routes(self) -> list[Route]:
        """Under /api."""
        return [
            Route("/symbols", self.list_symbols, methods=["GET"]),
            Route("/symbols/missing", self.missing, methods=["GET"]),
        ]
