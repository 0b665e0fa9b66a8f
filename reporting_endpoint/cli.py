"""Command line: serve, process, export, stats, prune, delete, copy, issues, regroup, symbols,
header: thin wrappers over the working modules."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

from reporting_endpoint import __version__
from reporting_endpoint.settings import ENV_PREFIX, Settings, SettingsError
from reporting_endpoint.store_commands import db_flag_wins

if TYPE_CHECKING:
    pass

T = TypeVar("T")

# Help for every `serve` option, one per Settings field: the parser is built from this table,
# so a new setting without a flag (or a flag without help) fails tests/test_cli.py.
SETTING_HELP: dict[str, str] = {
    "host": "address to bind (default 127.0.0.1)",
    "port": "port to bind (default 8000)",
    "db": "SQLite file, created when missing (default reports.sqlite3)",
    "database": "database, beats --db: a SQLite path, sqlite:///path or postgresql://...",
    "blob_store": "where dumps go: a folder, or s3://bucket/prefix (default: beside the database)",
    "ssl_certfile": "TLS certificate chain (PEM); serve HTTPS with --ssl-keyfile",
    "ssl_keyfile": "TLS private key (PEM)",
    "max_body_bytes": "largest /reports upload in bytes (default 1048576)",
    "max_reports_per_batch": "most reports in one /reports upload (default 1000)",
    "crashpad_max_body_bytes": "largest /crashpad upload as sent, in bytes (default 20 MiB)",
    "crashpad_max_decompressed_bytes": "largest /crashpad upload once gunzipped (default 100 MiB)",
    "crashpad_max_parts": "most form parts in one /crashpad upload (default 256)",
    "crashpad_max_field_bytes": "largest single annotation in bytes (default 65536)",
    "crashpad_max_annotation_bytes": "all annotations of one upload together (default 262144)",
    "queue_size": "reports waiting for the writer; past it uploads get 503 (default 20000)",
    "write_lock_timeout": "seconds to wait for another writer's lock before 503 (default 30)",
    "quarantine_max_rows": "refused reports kept for inspection (default 100000)",
    "cors_allow_origins": "comma-separated origins that may send reports (default: any)",
    "cors_max_age": "seconds browsers may cache a CORS preflight (default 86400)",
    "keep_url_query": "keep query strings and fragments of reported URLs (default: drop them)",
    "sqlite_synchronous": "FULL (default: a 2xx survives power loss), EXTRA or NORMAL",
    "read_token": "bearer token for the read API /api (default: the API is closed);"
    " prefer the environment variable, a flag is visible to other local users in ps",
    "write_token": "bearer token for deleting through the API (default: deletes disabled);"
    " prefer the environment variable",
    "retention_days": "delete reports and crashes older than this many days (default: keep)",
    "log_level": "uvicorn's log level: critical, error, warning, info (default), debug or trace",
    "access_log": "one log line per request (default: off)",
    "limit_concurrency": "connections served at once; past it 503 (default 1000)",
    "workers": "processes serving the one port, each with its own writer (default 1)",
    "header_timeout": "seconds a client has to send a request's headers (default 10)",
    "body_timeout": "seconds to wait for the next chunk of a body before 408 (default 30)",
    "timeout_keep_alive": "seconds an idle keep-alive connection stays open (default 5)",
    "fingerprint_rules": "TOML or JSON file of fingerprint rules, tried before the defaults;"
    " checked at start (default: the defaults only)",
    "release_source": "where a report's release is read: query:PARAM, body:FIELD or"
    " header:NAME (default: no release)",
    "duplicate_tolerance_ms": "a report equal to one received before and generated within"
    " this many ms of it is a retry, counted once; 0 turns it off (default 500)",
    "duplicate_window_minutes": "how long received reports are remembered to recognise"
    " retries, in minutes of generation time (default 20)",
    "metrics_token": "bearer token for GET /metrics (default: /metrics is open)",
    "allowed_sites": "comma-separated sites whose reports are stored; others are answered"
    " 200 and counted, not stored (default: every site)",
    "sample_rates": "comma-separated type=rate, e.g. csp-violation=0.1: the share of that"
    " type's reports stored (default: all)",
    "rate_limit_per_minute": "uploads a minute per client address and endpoint; over it 429"
    " (default 0: no limit)",
    "rate_limit_burst": "uploads one address may send at once (default: a minute's worth)",
    "secret_key": "key that signs dashboard session cookies, 32+ characters (default: one"
    " generated and kept in the data folder); prefer the environment variable",
    "session_max_age": "seconds a dashboard session lasts (default 43200)",
    "alert_rules": "TOML or JSON file of alert rules and channels; checked at start"
    " (default: the webhook_url rules, else no alerts)",
    "webhook_url": "without alert_rules: new issues and regressions are posted to this"
    " webhook (default: none)",
    "webhook_secret": "HMAC-SHA256 key signing the webhook_url posts; prefer the"
    " environment variable (a flag is visible to other local users in ps)",
    "public_url": "the service's external base URL: alerts link to"
    " <public_url>/dashboard/issues/<id> (default: no links)",
    "processors": "child processes that parse dumps, per serving process; 0: only store,"
    " leave parsing to `reporting-endpoint process` (default: the spare cores, at least 1)",
    "process_batch": "crashes one processor claim takes (default 8)",
    "process_lease_seconds": "seconds a claimed crash is held before another processor may"
    " take it (default 300)",
    "process_max_attempts": "claims a crash gets before it is marked failed (default 3)",
    "process_poll_seconds": "seconds between looks for crashes stored by other processes"
    " (default 2)",
    "process_timeout_seconds": "seconds a processor may spend parsing one dump, or walking it"
    " with symbols (default 120)",
    "symbol_upload_max_bytes": "largest POST /symbols/upload body in bytes (default 2 GiB)",
    "symbol_servers": "comma-separated base URLs of Breakpad symbol servers asked for symbols"
    " the store lacks (default: none)",
    "symbol_cache_bytes": "disk space for symbol files fetched from symbol_servers, and"
    " separately for local copies of symbol blobs from an S3 blob store; least recently used"
    " go first (default 1 GiB each)",
    "symbol_fetch_timeout": "seconds a symbol server may stay silent before the fetch counts"
    " as a miss (default 20)",
    "symbol_negative_cache_seconds": "seconds a symbol no server had is not asked for again"
    " (default 3600)",
}
_CHOICES = {
    "sqlite_synchronous": ["FULL", "EXTRA", "NORMAL"],
    "log_level": ["critical", "error", "warning", "info", "debug", "trace"],
}
# Tuple settings that are not origins.
_METAVAR_OF = {"allowed_sites": "SITES", "sample_rates": "TYPE=RATE,..."}
_METAVARS = {
    "int": "N",
    "int | None": "DAYS",
    "float": "SECONDS",
    "tuple[str, ...]": "ORIGINS",
    "Path": "FILE",
    "Path | None": "FILE",
}


def _finite_float(raw: str) -> float:
    value = float(raw)
    if not math.isfinite(value):
        raise ValueError(raw)
    return value


def _origin_list(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def _flag_type(type_name: str) -> Callable[[str], Any]:
    if type_name.startswith("int"):
        return int
    if type_name == "float":
        return _finite_float
    if type_name.startswith("Path"):
        return Path
    if type_name.startswith("tuple"):
        return _origin_list
    return str


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        help_text = SETTING_HELP.get(f.name)
        type_name = str(f.type)
        options: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
        if type_name == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **options)
            continue
        if f.name in _CHOICES:
            options["choices"] = _CHOICES[f.name]
        else:
            options["metavar"] = _METAVAR_OF.get(f.name) or _METAVARS.get(
                type_name, f.name.rsplit("_", 1)[-1].upper()
            )
            metavar = _METAVARS.get(type_name, f.name.rsplit("_", 1)[-1].upper())
            options["metavar"] = "N" if f.name == "processors" else metavar
        parser.add_argument(flag, type=_flag_type(type_name), **options)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Environment first, then every flag given on the command line."""
    overrides = {f.name: getattr(args, f.name, None) for f in fields(Settings)}
    settings = Settings.from_env(**overrides)
    return db_flag_wins(settings, overrides.get("db"), overrides.get("database"))


def _serve(args: argparse.Namespace) -> int:
    from reporting_endpoint.server import serve

    settings = settings_from_args(args)
    # Read and checked here, before any worker starts: a bad rules file is one message naming
    # the rule (a SettingsError, exit 2), not a failed start in every worker.
    settings.fingerprint_rule_set()
    settings.alert_config()
    serve(settings)
    return 0


def _process(args: argparse.Namespace) -> int:
    from reporting_endpoint.process_command import process

    settings = settings_from_args(args)
    settings.fingerprint_rule_set()
    return process(settings)


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--source",
        choices=["reports", "crashes"],
        default="reports",
        help="browser reports (default) or Crashpad minidump uploads",
    )
    filters = parser.add_argument_group("filters (exact match; times: 7d, 24h, 30m or ISO 8601)")
    for name in ("type", "site", "origin", "browser", "browser_major", "reason"):
        filters.add_argument(f"--{name.replace('_', '-')}", dest=name, help="reports only")
    filters.add_argument("--os", dest="os", help="reports and crashes")
    for name in (
        "product", "version", "platform", "process_type", "signature", "cpu",
        "exception_name", "electron_version", "main_module", "crash_module", "parse_status",
    ):  # fmt: skip
        filters.add_argument(f"--{name.replace('_', '-')}", dest=name, help="crashes only")
    filters.add_argument("--user-agent", dest="user_agent", help="reports only")
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
        text = render(build_headers(options), args.format)
    except HeaderError as exc:
        print(f"reporting-endpoint header: {exc}", file=sys.stderr)
        return 2
    out.write(text)
    return 0


STORE_COMMANDS = {"export": "export", "stats": "stats", "prune": "prune", "delete": "delete_one"}
_DATABASE_HELP = "database, beats --db: a SQLite path, sqlite:///path or postgresql://..."
_BLOB_STORE_HELP = "where the dumps are: a folder, or s3://bucket/prefix (as serve's)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reporting-endpoint",
        description="Collect browser crash reports (W3C Reporting API) into SQLite.",
        epilog=f"Every serve option can also be set as an environment variable {ENV_PREFIX}<NAME>"
        " (e.g. --read-token as REPORTING_ENDPOINT_READ_TOKEN); a flag beats the variable.",
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}", help="print the version"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the HTTP service")
    _add_setting_flags(serve)

    process = commands.add_parser(
        "process",
        help="parse stored crashes (on this or another host) until stopped; takes serve's"
        " flags (--database, --blob-store, --processors, ...)",
    )
    _add_setting_flags(process)

    export = commands.add_parser("export", help="write stored reports or crashes as JSONL or CSV")
    export.add_argument("--db", type=Path, help="SQLite file to read")
    export.add_argument("--database", metavar="URL", help=_DATABASE_HELP)
    export.add_argument(
        "--format",
        choices=["jsonl", "csv"],
        default="jsonl",
        help="JSON lines (default) or CSV (nested values as JSON text; cells that a spreadsheet"
        " would run as a formula are prefixed with ')",
    )
    _add_filters(export)

    stats = commands.add_parser("stats", help="count reports or crashes per group")
    stats.add_argument("--db", type=Path, help="SQLite file to read")
    stats.add_argument("--database", metavar="URL", help=_DATABASE_HELP)
    stats.add_argument(
        "--by",
        help="comma-separated; reports: type, site, origin, browser, browser_major, os, reason,"
        " user_agent (default type); crashes: product, version, platform, process_type,"
        " signature, os, cpu, ... (default product,version,platform,process_type,signature)",
    )
    stats.add_argument("--limit", type=int, default=50, help="most groups shown (default 50)")
    stats.add_argument("--json", action="store_true", help="print JSON, as the API does")
    _add_filters(stats)

    prune = commands.add_parser(
        "prune", help="delete reports and crashes (and their dumps) older than a given age"
    )
    prune.add_argument("--db", type=Path, help="SQLite file")
    prune.add_argument("--database", metavar="URL", help=_DATABASE_HELP)
    prune.add_argument("--blob-store", metavar="STORE", help=_BLOB_STORE_HELP)
    prune.add_argument("--older-than", required=True, help="e.g. 30d, 12h, or an ISO 8601 time")

    delete = commands.add_parser(
        "delete", help="delete one report or one crash (and its dump when nothing else uses it)"
    )
    delete.add_argument("--db", type=Path, help="SQLite file")
    delete.add_argument("--database", metavar="URL", help=_DATABASE_HELP)
    delete.add_argument("--blob-store", metavar="STORE", help=_BLOB_STORE_HELP)
    which = delete.add_mutually_exclusive_group(required=True)
    which.add_argument("--report", metavar="ID", help="a report id, as export and the API show")
    which.add_argument("--crash", metavar="ID", help="a crash id (32 hex digits)")

    from reporting_endpoint.copying import add_copy_parser
    from reporting_endpoint.issue_commands import add_parsers as add_issue_parsers
    from reporting_endpoint.symbol_commands import add_parsers as add_symbol_parsers

    add_copy_parser(commands)
    add_issue_parsers(commands)
    add_symbol_parsers(commands)

    header = commands.add_parser(
        "header", help="print the headers that make browsers report to the service"
    )
    header.add_argument("--url", required=True, help="the endpoint, e.g. https://r.example/reports")
    header.add_argument(
        "--max-age",
        type=int,
        default=86400,
        help="seconds browsers keep the policy (Report-To, NEL)",
    )
    header.add_argument(
        "--include-subdomains",
        action="store_true",
        help="apply Report-To and NEL to subdomains too",
    )
    header.add_argument(
        "--no-crash-reporting", action="store_true", help="omit the crash-reporting endpoint name"
    )
    header.add_argument("--nel", action="store_true", help="add a Network Error Logging policy")
    header.add_argument(
        "--success-fraction", type=float, default=0.0, help="NEL: share of successes reported, 0..1"
    )
    header.add_argument(
        "--failure-fraction", type=float, default=1.0, help="NEL: share of failures reported, 0..1"
    )
    header.add_argument(
        "--js-stacks",
        action="store_true",
        help="Document-Policy asking for JS stacks in unresponsive-page crash reports",
    )
    header.add_argument(
        "--format",
        choices=["http", "json", "nginx", "caddy", "apache"],
        default="http",
        help="plain header lines (default), JSON, or a snippet for nginx, Caddy or Apache",
    )
    header.add_argument(
        "--allow-insecure", action="store_true", help="accept an http:// URL (local testing only)"
    )
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    from reporting_endpoint.storage.base import StorageError, StorageFailure

    args = build_parser().parse_args(argv)
    stream = out or sys.stdout
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "process":
            return _process(args)
        if args.command in STORE_COMMANDS:
            from reporting_endpoint import store_commands

            command = getattr(store_commands, STORE_COMMANDS[args.command])
            return int(command(args, stream))
        if args.command in ("issues", "regroup"):
            from reporting_endpoint import issue_commands

            command = getattr(issue_commands, args.command)
            return int(command(args, stream))
        if args.command == "symbols":
            from reporting_endpoint import symbol_commands

            return symbol_commands.symbols(args, stream)
        if args.command == "header":
            return _header(args, stream)
        if args.command == "copy":
            from reporting_endpoint.copying import copy_command

            return copy_command(args, stream)
    except (SettingsError, FileNotFoundError) as exc:
        print(f"reporting-endpoint: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`export | head`): not an error, and no traceback.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except ValueError as exc:  # QueryError (a bad --by, --since...), NotOurDatabase
        print(f"reporting-endpoint {args.command}: {exc}", file=sys.stderr)
        return 2
    except (StorageError, StorageFailure) as exc:  # e.g. a corrupt or locked database
        from reporting_endpoint.storage import shown_database

        db = getattr(args, "database", None) or getattr(args, "db", None)
        shown = shown_database(str(db)) if db is not None else db
        print(f"reporting-endpoint {args.command}: cannot use {shown}: {exc}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
