"""Command line: serve, export, stats, prune, header: thin wrappers over the working modules."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from reporting_endpoint.settings import ENV_PREFIX, Settings, SettingsError


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from reporting_endpoint.app import create_app

    settings = Settings.from_env(
        host=args.host,
        port=args.port,
        db=args.db,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
    )
    app = create_app(settings, tune_gc=True)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        ssl_certfile=str(settings.ssl_certfile) if settings.ssl_certfile else None,
        ssl_keyfile=str(settings.ssl_keyfile) if settings.ssl_keyfile else None,
        log_level=settings.log_level,
        access_log=settings.access_log,
        # The storage drains its queue on shutdown; give it time to do so.
        timeout_graceful_shutdown=30,
    )
    return 0


def _filters(args: argparse.Namespace) -> Any:
    from reporting_endpoint.queries import CRASH_DIMENSIONS, DIMENSIONS, Filters

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
    return Filters.parse(params, dimensions=dimensions)


CSV_COLUMNS = (
    "id", "received_at", "generated_at", "type", "url", "user_agent", "age", "origin", "site",
    "browser", "browser_major", "os", "reason", "body",
)  # fmt: skip


def _export(args: argparse.Namespace, out: TextIO) -> int:
    import csv

    import orjson

    from reporting_endpoint.queries import iter_crashes, iter_reports, open_readonly

    settings = Settings.from_env(db=args.db)
    filters = _filters(args)
    connection = open_readonly(settings.db)
    try:
        if args.source == "crashes":
            if args.format == "csv":
                raise ValueError("crashes export as jsonl only (they carry nested annotations)")
            for crash in iter_crashes(connection, filters):
                out.write(orjson.dumps(crash).decode())
                out.write("\n")
        elif args.format == "csv":
            writer = csv.writer(out)
            writer.writerow(CSV_COLUMNS)
            for report in iter_reports(connection, filters):
                report["body"] = orjson.dumps(report["body"]).decode()
                writer.writerow([report[name] for name in CSV_COLUMNS])
        else:
            for report in iter_reports(connection, filters):
                out.write(orjson.dumps(report).decode())
                out.write("\n")
    finally:
        connection.close()
    return 0


def _stats(args: argparse.Namespace, out: TextIO) -> int:
    import orjson

    from reporting_endpoint.queries import (
        CRASH_DEFAULT_BY,
        CRASH_DIMENSIONS,
        crash_groups_query,
        group_rows,
        groups_query,
        open_readonly,
        parse_by,
        parse_limit,
        run,
    )

    settings = Settings.from_env(db=args.db)
    limit = parse_limit(str(args.limit))
    if args.source == "crashes":
        by = parse_by(args.by, CRASH_DEFAULT_BY, CRASH_DIMENSIONS)
        query = crash_groups_query(by, _filters(args), limit)
    else:
        by = parse_by(args.by)
        query = groups_query(by, _filters(args), limit)
    connection = open_readonly(settings.db)
    try:
        groups = group_rows(by, run(connection, query))
    finally:
        connection.close()
    if args.json:
        data = {"source": args.source, "by": list(by), "groups": groups}
        out.write(orjson.dumps(data).decode() + "\n")
        return 0
    header = [*by, "count", "first_seen", "last_seen"]
    table = [[str(g[name]) if g[name] is not None else "-" for name in header] for g in groups]
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]
    for row in [header, *table]:
        out.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
        out.write("\n")
    if not groups:
        out.write("(no reports match)\n")
    return 0


def _prune(args: argparse.Namespace, out: TextIO) -> int:
    from reporting_endpoint.queries import parse_time
    from reporting_endpoint.storage.rollups import prune
    from reporting_endpoint.storage.sqlite import open_connection

    settings = Settings.from_env(db=args.db)
    if not settings.db.is_file():
        raise FileNotFoundError(f"no database at {settings.db}")
    cutoff = parse_time(args.older_than, "--older-than")
    # A second writer beside a running service is safe: SQLite serialises the two transactions.
    connection = open_connection(settings.db, settings.sqlite_synchronous)
    try:
        connection.execute("BEGIN IMMEDIATE")
        try:
            deleted = prune(connection, cutoff)
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
    finally:
        connection.close()
    out.write(f"deleted {deleted} report(s) received before {args.older_than}\n")
    return 0


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--source",
        choices=["reports", "crashes"],
        default="reports",
        help="browser reports (default) or Crashpad minidump uploads",
    )
    filters = parser.add_argument_group("filters (exact match; times: 7d, 24h, 30m or ISO 8601)")
    for name in ("type", "site", "origin", "browser", "browser_major", "os", "reason"):
        filters.add_argument(f"--{name.replace('_', '-')}", dest=name)
    for name in (
        "product", "version", "platform", "process_type", "signature", "cpu",
        "exception_name", "electron_version", "main_module", "crash_module", "parse_status",
    ):  # fmt: skip
        filters.add_argument(f"--{name.replace('_', '-')}", dest=name, help="crashes only")
    filters.add_argument("--user-agent", dest="user_agent")
    filters.add_argument("--since", help="received at or after, e.g. 7d")
    filters.add_argument("--until", help="received before")


def _header(args: argparse.Namespace, out: TextIO) -> int:
    from reporting_endpoint.headers import HeaderError, HeaderOptions, build_headers, render

    try:
        options = HeaderOptions(
            url=args.url,
            max_age=args.max_age,
            include_subdomains=args.include_subdomains,
            crash_reporting=not args.no_crash_reporting,
            nel=args.nel,
            success_fraction=args.success_fraction,
            failure_fraction=args.failure_fraction,
            js_stacks=args.js_stacks,
            allow_insecure=args.allow_insecure,
        )
    except HeaderError as exc:
        print(f"reporting-endpoint header: {exc}", file=sys.stderr)
        return 2
    out.write(render(build_headers(options), args.format))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reporting-endpoint",
        description="Collect browser crash reports (W3C Reporting API) into SQLite.",
        epilog=f"Every option can also be set as an environment variable {ENV_PREFIX}<NAME>.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default 8000)")
    serve.add_argument("--db", type=Path, help="SQLite file, created when missing")
    serve.add_argument("--ssl-certfile", type=Path, help="TLS certificate (PEM)")
    serve.add_argument("--ssl-keyfile", type=Path, help="TLS private key (PEM)")

    export = commands.add_parser("export", help="write stored reports as JSON lines or CSV")
    export.add_argument("--db", type=Path, help="SQLite file to read")
    export.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    _add_filters(export)

    stats = commands.add_parser("stats", help="count reports per group")
    stats.add_argument("--db", type=Path, help="SQLite file to read")
    stats.add_argument(
        "--by",
        help="comma-separated; reports: type, site, origin, browser, browser_major, os, reason,"
        " user_agent (default type); crashes: product, version, platform, process_type,"
        " signature, os, cpu, ... (default product,version,platform,process_type,signature)",
    )
    stats.add_argument("--limit", type=int, default=50, help="most groups shown (default 50)")
    stats.add_argument("--json", action="store_true", help="print JSON, as the API does")
    _add_filters(stats)

    prune = commands.add_parser("prune", help="delete reports older than a given age")
    prune.add_argument("--db", type=Path, help="SQLite file")
    prune.add_argument("--older-than", required=True, help="e.g. 30d, 12h, or an ISO 8601 time")

    header = commands.add_parser(
        "header", help="print the headers that make browsers report to the service"
    )
    header.add_argument("--url", required=True, help="the endpoint, e.g. https://r.example/reports")
    header.add_argument("--max-age", type=int, default=86400, help="seconds (Report-To, NEL)")
    header.add_argument("--include-subdomains", action="store_true")
    header.add_argument(
        "--no-crash-reporting", action="store_true", help="omit the crash-reporting endpoint name"
    )
    header.add_argument("--nel", action="store_true", help="add a Network Error Logging policy")
    header.add_argument("--success-fraction", type=float, default=0.0, help="NEL, 0..1")
    header.add_argument("--failure-fraction", type=float, default=1.0, help="NEL, 0..1")
    header.add_argument(
        "--js-stacks",
        action="store_true",
        help="Document-Policy asking for JS stacks in unresponsive-page crash reports",
    )
    header.add_argument(
        "--format", choices=["http", "json", "nginx", "caddy", "apache"], default="http"
    )
    header.add_argument(
        "--allow-insecure", action="store_true", help="accept an http:// URL (local testing only)"
    )
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    stream = out or sys.stdout
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "export":
            return _export(args, stream)
        if args.command == "header":
            return _header(args, stream)
        if args.command == "stats":
            return _stats(args, stream)
        if args.command == "prune":
            return _prune(args, stream)
    except (SettingsError, FileNotFoundError) as exc:
        print(f"reporting-endpoint: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`export | head`): not an error, and no traceback.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except ValueError as exc:  # QueryError: a bad --by, --since, --limit ...
        print(f"reporting-endpoint {args.command}: {exc}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
