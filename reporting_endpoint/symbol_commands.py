"""The ``symbols`` commands (``upload``, ``list``, ``missing``): symbol uploads and the symbol
lists of the API for a terminal, through the same import step and storage protocol.

``upload`` stores into the database and blob store the service uses, only when the database
already is this service's (like ``prune``); ``list`` and ``missing`` open it read-only.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

# The parser is built for every command: what reads or writes the store is imported inside.
from reporting_endpoint.store_commands import (
    command_settings,
    opened,
    run_command,
    terminal_safe,
    write_table,
)

if TYPE_CHECKING:
    from reporting_endpoint.blobstores import BlobStore
    from reporting_endpoint.native.symbol_import import Imported
    from reporting_endpoint.settings import Settings
    from reporting_endpoint.storage.base import Storage

SYMBOLS_ACTIONS = ("upload", "list", "missing")
# Files one ``upload`` takes (a directory is walked for them); past it: split the upload.
MAX_INPUTS = 100_000
_DATABASE_HELP = "database, beats --db: a SQLite path, sqlite:///path or postgresql://..."
_BLOB_STORE_HELP = "where the service keeps its blobs: a folder, or s3://bucket/prefix"


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``symbols ...`` on the top-level parser's commands."""
    symbols = commands.add_parser("symbols", help="upload symbol files, list stored and missing")
    actions = symbols.add_subparsers(dest="symbols_action", required=True, metavar="ACTION")

    upload = actions.add_parser(
        "upload",
        help="store symbol files: .sym files, zips of them (Electron's symbols zip), native"
        " debug files (ELF, PDB, Mach-O), or folders walked for .sym files (dump_syms --store)",
    )
    upload.add_argument("paths", nargs="+", metavar="PATH", help="a file or a folder")
    _store_flags(upload)
    upload.add_argument("--blob-store", metavar="STORE", help=_BLOB_STORE_HELP)
    upload.add_argument("--json", action="store_true", help="print JSON, as the API answers")

    listing = actions.add_parser("list", help="stored symbol files, by debug file and id")
    _store_flags(listing)
    listing.add_argument(
        "--limit", type=int, default=100, help="most files shown, 1..1000 (default 100)"
    )
    listing.add_argument("--json", action="store_true", help="print JSON, as the API does")

    missing = actions.add_parser(
        "missing", help="modules crashes needed symbols for that the store does not have"
    )
    _store_flags(missing)
    missing.add_argument(
        "--limit", type=int, default=100, help="most modules shown, 1..1000 (default 100)"
    )
    missing.add_argument("--json", action="store_true", help="print JSON, as the API does")


def _store_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", type=Path, help="SQLite file")
    parser.add_argument("--database", metavar="URL", help=_DATABASE_HELP)


def symbols(args: argparse.Namespace, out: TextIO) -> int:
    """``symbols ACTION``: dispatch."""
    if args.symbols_action == "upload":
        return _upload(args, out)
    if args.symbols_action == "list":
        return _list(args, out)
    return _missing(args, out)


def collect_inputs(paths: Sequence[Path]) -> list[tuple[Path, str]]:
    """Each file as given, and each folder's ``.sym`` files (sorted, symlinks not followed);
    FileNotFoundError names a path that is neither."""
    inputs: list[tuple[Path, str]] = []
    for path in paths:
        if path.is_dir():
            inputs.extend((found, found.name) for found in _sym_files(path))
        elif path.is_file():
            inputs.append((path, path.name))
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
        if len(inputs) > MAX_INPUTS:
            raise ValueError(f"more than {MAX_INPUTS} files: upload them in parts")
    return inputs


def _sym_files(folder: Path) -> Iterator[Path]:
    for root, folders, names in os.walk(folder, followlinks=False):
        folders.sort()
        for name in sorted(names):
            if name.lower().endswith(".sym"):
                yield Path(root) / name


@asynccontextmanager
async def _blob_store(settings: Settings, storage: Storage) -> AsyncIterator[BlobStore]:
    # The service's blob store with the service's locks, so an upload here never races one of
    # its deletions.
    from reporting_endpoint.blobstores import blob_locks_of, open_blob_store

    blobs = open_blob_store(
        settings.blob_store or "", settings.data_dir, locks=blob_locks_of(storage)
    )
    await blobs.start()
    try:
        yield blobs
    finally:
        await blobs.close()


def _upload(args: argparse.Namespace, out: TextIO) -> int:
    import orjson

    from reporting_endpoint.blobstores import BlobStoreError
    from reporting_endpoint.native.symbol_import import (
        SymbolImportError,
        import_files,
        workspace,
    )

    settings = command_settings(args)
    inputs = collect_inputs([Path(p) for p in args.paths])
    if not inputs:
        raise ValueError("no symbol file found (a folder is walked for .sym files)")

    async def work() -> Imported:
        storage = await opened(settings, must_exist=True)
        try:
            async with (
                _blob_store(settings, storage) as blobs,
                workspace(settings.data_dir / "tmp") as workdir,
            ):
                return await import_files(storage, blobs, inputs, workdir)
        finally:
            await storage.stop()

    try:
        imported = run_command(work())
    except SymbolImportError as exc:
        print(
            f"reporting-endpoint symbols upload: {terminal_safe(str(exc))} ({exc.code});"
            " nothing was stored",
            file=sys.stderr,
        )
        return 2
    except FileNotFoundError:
        raise  # a missing database: a bad argument (exit 2, from main)
    except (BlobStoreError, OSError) as exc:
        print(f"reporting-endpoint symbols upload: cannot store the files: {exc}", file=sys.stderr)
        return 1
    if args.json:
        from reporting_endpoint.api.symbols import UPLOAD_FIELDS

        stored = [
            {**{name: getattr(f, name) for name in UPLOAD_FIELDS}, "path": f.path}
            for f in imported.stored
        ]
        out.write(orjson.dumps({"stored": stored, "requeued": imported.requeued}).decode() + "\n")
        return 0
    write_table(
        out,
        ["path", "os", "arch", "code_file"],
        [
            [terminal_safe(f.path), _cell(f.os), _cell(f.arch), _cell(f.code_file)]
            for f in imported.stored
        ],
    )
    out.write(
        f"stored {len(imported.stored)} symbol file(s);"
        f" {imported.requeued} crash(es) re-queued for processing\n"
    )
    return 0


def _cell(value: object) -> str:
    return "-" if value is None else terminal_safe(str(value))


def _limit(args: argparse.Namespace) -> int:
    from reporting_endpoint.params import parse_limit

    return parse_limit(str(args.limit))


def _list(args: argparse.Namespace, out: TextIO) -> int:
    import orjson

    from reporting_endpoint.api.symbols import symbol_json

    settings = command_settings(args)
    limit = _limit(args)

    async def read() -> list[dict[str, Any]]:
        storage = await opened(settings, read_only=True)
        try:
            return [symbol_json(f) for f in await storage.list_symbol_files(limit)]
        finally:
            await storage.stop()

    found = run_command(read())
    if args.json:
        out.write(orjson.dumps({"symbols": found}).decode() + "\n")
        return 0
    write_table(
        out,
        ["path", "os", "arch", "code_file", "size", "source", "uploaded_at"],
        [
            [
                terminal_safe(f["path"]),
                _cell(f["os"]),
                _cell(f["arch"]),
                _cell(f["code_file"]),
                str(f["sym_size"]),
                _cell(f["source"]),
                str(f["uploaded_at"]),
            ]
            for f in found
        ],
    )
    if not found:
        out.write("(no symbol file stored)\n")
    return 0


def _missing(args: argparse.Namespace, out: TextIO) -> int:
    import dataclasses

    import orjson

    settings = command_settings(args)
    limit = _limit(args)

    async def read() -> list[dict[str, Any]]:
        storage = await opened(settings, read_only=True)
        try:
            return [dataclasses.asdict(m) for m in await storage.missing_symbols(limit)]
        finally:
            await storage.stop()

    found = run_command(read())
    if args.json:
        out.write(orjson.dumps({"missing": found}).decode() + "\n")
        return 0
    write_table(
        out,
        ["debug_file", "debug_id", "code_file", "crashes", "last_seen"],
        [
            [
                terminal_safe(m["debug_file"]),
                terminal_safe(m["debug_id"]),
                _cell(m["code_file"]),
                str(m["crashes"]),
                str(m["last_seen"]),
            ]
            for m in found
        ],
    )
    if not found:
        out.write("(no crash is waiting for symbols)\n")
    return 0
