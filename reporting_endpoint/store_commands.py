"""The commands that read or change the store: ``export``, ``stats``, ``prune``, ``delete``
(and, sharing the helpers here, ``issues`` and ``regroup`` in ``issue_commands``).

Each opens the store the way the service does (``storage.open_storage``), through the same
protocol: ``export`` and ``stats`` read-only, ``prune`` and ``delete`` only on an existing
database of this service, so a wrong ``--db`` is refused before anything is written.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator, Coroutine, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

from reporting_endpoint.settings import Settings

if TYPE_CHECKING:
    from reporting_endpoint.blobstores import BlobStore
    from reporting_endpoint.storage.base import Deletion, Storage
    from reporting_endpoint.storage.filters import Filters

T = TypeVar("T")


def db_flag_wins(settings: Settings, db: object, database: object) -> Settings:
    # A --db flag beats a REPORTING_ENDPOINT_DATABASE variable (a flag beats the environment).
    if db is not None and database is None and settings.database is not None:
        return settings.replace(database=None)
    return settings


def command_settings(args: argparse.Namespace) -> Settings:
    """Settings of a command that reads or changes the store: --db / --database, then the
    environment."""
    db, database = getattr(args, "db", None), getattr(args, "database", None)
    blob_store = getattr(args, "blob_store", None)
    settings = Settings.from_env(db=db, database=database, blob_store=blob_store)
    return db_flag_wins(settings, db, database)


def run_command(work: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(work)


async def opened(
    settings: Settings, *, read_only: bool = False, must_exist: bool = False
) -> Storage:
    """The store the command names, started; a wrong one is refused before anything writes."""
    from reporting_endpoint.storage import open_storage

    storage = open_storage(
        settings.database_url, settings, read_only=read_only, must_exist=must_exist
    )
    await storage.start()
    return storage


@asynccontextmanager
async def _blob_store(settings: Settings, storage: Storage) -> AsyncIterator[BlobStore]:
    """The blob store the service uses (``--blob-store`` or the setting), started, with the
    same locks as the service (so a deletion here never races one of its uploads)."""
    from reporting_endpoint.blobstores import blob_locks_of, open_blob_store

    locks = blob_locks_of(storage)
    blobs = open_blob_store(settings.blob_store or "", settings.data_dir, locks=locks)
    await blobs.start()
    try:
        yield blobs
    finally:
        await blobs.close()


# OWASP CSV injection: a cell starting with one of these is a formula to a spreadsheet.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: object) -> object:
    """A value safe to open in a spreadsheet: text that could start a formula gets a ``'``."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


async def _write_csv(
    out: TextIO, columns: Sequence[str], rows: AsyncIterator[dict[str, Any]]
) -> None:
    import csv

    import orjson

    writer = csv.writer(out)
    writer.writerow(columns)
    async for row in rows:
        cells = []
        for name in columns:
            value = row.get(name)
            if isinstance(value, dict | list):
                value = orjson.dumps(value).decode()
            cells.append(csv_cell(value))
        writer.writerow(cells)


def terminal_safe(text: str) -> str:
    """Escape what a terminal would act on (ESC sequences, bidi overrides, newlines...)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _filters(args: argparse.Namespace) -> Filters:
    from reporting_endpoint.params import DIMENSIONS, parse_filters
    from reporting_endpoint.storage.filters import CRASH_DIMENSIONS

    dimensions = CRASH_DIMENSIONS if args.source == "crashes" else DIMENSIONS
    params = {
        name: getattr(args, name)
        for name in (*DIMENSIONS, *CRASH_DIMENSIONS)
        if getattr(args, name, None) is not None
    }
    stray = set(params) - set(dimensions)
    if stray:
        raise ValueError(f"--{sorted(stray)[0].replace('_', '-')} does not apply to {args.source}")
    if args.since:
        params["since"] = args.since
    if args.until:
        params["until"] = args.until
    return parse_filters(params, dimensions=dimensions)


CSV_COLUMNS = (
    "id", "received_at", "generated_at", "type", "url", "user_agent", "age", "origin", "site",
    "browser", "browser_major", "os", "reason", "body",
)  # fmt: skip
# Nested values (annotations, query, attachments) are JSON text in their cell.
CRASH_CSV_COLUMNS = (
    "id", "received_at", "product", "version", "platform", "process_type", "electron_version",
    "signature", "parse_status", "parse_error", "os", "os_version", "cpu", "exception_name",
    "exception_code_hex", "crash_address_hex", "crashing_thread", "main_module",
    "main_module_version", "crash_module", "crash_offset_hex", "guid", "dump_sha256",
    "dump_size", "upload_bytes", "annotations", "query", "attachments",
)  # fmt: skip


def export(args: argparse.Namespace, out: TextIO) -> int:
    settings = command_settings(args)
    filters = _filters(args)
    run_command(_export_rows(settings, args, filters, out))
    return 0


async def _export_rows(
    settings: Settings, args: argparse.Namespace, filters: Filters, out: TextIO
) -> None:
    import orjson

    storage = await opened(settings, read_only=True)
    try:
        rows = (
            storage.iter_crashes(filters)
            if args.source == "crashes"
            else storage.iter_reports(filters)
        )
        if args.format == "csv":
            columns = CRASH_CSV_COLUMNS if args.source == "crashes" else CSV_COLUMNS
            await _write_csv(out, columns, rows)
        else:
            async for row in rows:
                out.write(orjson.dumps(row).decode())
                out.write("\n")
    finally:
        await storage.stop()


def stats(args: argparse.Namespace, out: TextIO) -> int:
    import orjson

    from reporting_endpoint.params import parse_by, parse_limit
    from reporting_endpoint.storage.filters import CRASH_DEFAULT_BY, CRASH_DIMENSIONS

    settings = command_settings(args)
    limit = parse_limit(str(args.limit))
    if args.source == "crashes":
        by = parse_by(args.by, CRASH_DEFAULT_BY, CRASH_DIMENSIONS)
    else:
        by = parse_by(args.by)
    filters = _filters(args)

    async def read() -> tuple[list[dict[str, Any]], tuple[tuple[str, int], ...]]:
        storage = await opened(settings, read_only=True)
        try:
            found = await storage.groups(args.source, by, filters, limit)
            # Refused reports are not in the groups; show that they exist (reports only).
            refused = await storage.quarantine_counts() if args.source == "reports" else ()
        finally:
            await storage.stop()
        return list(found.groups), refused

    groups, refused = run_command(read())
    if args.json:
        data: dict[str, Any] = {"source": args.source, "by": list(by), "groups": groups}
        if args.source == "reports":
            data["refused"] = [{"code": code, "count": count} for code, count in refused]
        out.write(orjson.dumps(data).decode() + "\n")
        return 0
    header = [*by, "count", "first_seen", "last_seen"]
    table = [
        [terminal_safe(str(g[name])) if g[name] is not None else "-" for name in header]
        for g in groups
    ]
    write_table(out, header, table)
    if not groups:
        out.write(f"(no {args.source} match)\n")
    if refused:
        out.write(
            f"\nrefused reports (all time, kept in quarantine): {sum(n for _, n in refused)}\n"
        )
        write_table(out, ["code", "count"], [[terminal_safe(c), str(n)] for c, n in refused])
    return 0


def write_table(out: TextIO, header: list[str], table: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]
    for row in [header, *table]:
        out.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
        out.write("\n")


def prune(args: argparse.Namespace, out: TextIO) -> int:
    from reporting_endpoint import deletion
    from reporting_endpoint.params import parse_time

    settings = command_settings(args)
    cutoff = parse_time(args.older_than, "--older-than")

    async def prune() -> Deletion:
        # must_exist: a wrong --db is refused (read-only) before the writer touches it. A second
        # writer beside a running service is safe: the database serialises the transactions.
        storage = await opened(settings, must_exist=True)
        try:
            # prune also collects dump files an interrupted deletion left without a row.
            async with _blob_store(settings, storage) as blobs:
                return await deletion.prune(storage, cutoff, blobs, sweep=True)
        finally:
            await storage.stop()

    gone = run_command(prune())
    out.write(
        f"deleted {gone.reports} report(s) and {gone.crashes} crash(es) received before"
        f" {args.older_than}; {gone.files_removed} dump file(s) removed\n"
    )
    return 0


def delete_one(args: argparse.Namespace, out: TextIO) -> int:
    import re

    from reporting_endpoint import deletion

    settings = command_settings(args)
    report_id: int | None = None
    crash_id = ""
    if args.report is not None:
        if not re.fullmatch(r"[0-9]{1,18}", args.report):
            raise ValueError(f"--report takes a report id (a whole number), got {args.report!r}")
        report_id = int(args.report)
        what = f"report {report_id}"
    else:
        crash_id = args.crash.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{32}", crash_id):
            raise ValueError(f"--crash takes a crash id (32 hex digits), got {args.crash!r}")
        what = f"crash {crash_id}"

    from reporting_endpoint.storage.base import Deletion

    async def delete() -> Deletion:
        storage = await opened(settings, must_exist=True)
        try:
            if report_id is not None:
                return Deletion(reports=int(await storage.delete_report(report_id)))
            async with _blob_store(settings, storage) as blobs:
                return await deletion.delete_crash(storage, crash_id, blobs)
        finally:
            await storage.stop()

    gone = run_command(delete())
    if not (gone.reports or gone.crashes):
        print(f"reporting-endpoint delete: no {what} in {settings.database_url}", file=sys.stderr)
        return 1
    out.write(f"deleted {what}; {gone.files_removed} dump file(s) removed\n")
    return 0
