"""Command line: serve, export, header: thin wrappers over the modules that do the work."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

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


def _export(args: argparse.Namespace, out: TextIO) -> int:
    import orjson

    from reporting_endpoint.queries import iter_reports, open_readonly

    settings = Settings.from_env(db=args.db)
    connection = open_readonly(settings.db)
    try:
        for report in iter_reports(connection):
            out.write(orjson.dumps(report).decode())
            out.write("\n")
    finally:
        connection.close()
    return 0


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

    export = commands.add_parser("export", help="write every stored report as JSON lines")
    export.add_argument("--db", type=Path, help="SQLite file to read")

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
    except (SettingsError, FileNotFoundError) as exc:
        print(f"reporting-endpoint: {exc}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
