"""The ``issues`` commands (``list``, ``show``, ``resolve``, ``ignore``, ``reopen``) and
``regroup``: the API's issue endpoints for a terminal, through the same storage protocol.

Reads open the store read-only; a triage change or a regroup opens it only when it already is
this service's database (like ``prune``), so a wrong ``--db`` is refused before anything is
written. Changes are recorded with the actor ``cli``.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any, TextIO

# The parser is built for every command (``header`` included, which must start fast): what
# reads or writes the store is imported inside the commands.
from reporting_endpoint.store_commands import (
    command_settings,
    opened,
    run_command,
    terminal_safe,
    write_table,
)

if TYPE_CHECKING:
    from reporting_endpoint.issues.triage import StatusChange
    from reporting_endpoint.storage.base import IssueFilters, IssueSort

CLI_ACTOR = "cli"
TITLE_WIDTH = 80
ISSUE_ACTIONS = ("list", "show", "resolve", "ignore", "reopen")
_DATABASE_HELP = "database, beats --db: a SQLite path, sqlite:///path or postgresql://..."


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``issues ...`` and ``regroup`` on the top-level parser's commands."""
    issues = commands.add_parser("issues", help="list issues, show one, change its status")
    actions = issues.add_subparsers(dest="issues_action", required=True, metavar="ACTION")

    listing = actions.add_parser("list", help="issues with events in a window, busiest first")
    _store_flags(listing)
    filters = listing.add_argument_group("filters (exact match; times: 7d, 24h, 30m or ISO 8601)")
    filters.add_argument(
        "--status", help="unresolved, resolved, ignored or regressed (then quiet issues too)"
    )
    filters.add_argument("--kind", help="a report type (crash, deprecation, ...) or native")
    filters.add_argument("--site", help="e.g. https://example.com")
    filters.add_argument("--release", help="issues seen in this release")
    filters.add_argument("--browser", help="issues seen in this browser")
    filters.add_argument("--os", help="issues seen on this OS")
    filters.add_argument("--since", help="start of the window (default: 24h before --until)")
    filters.add_argument("--until", help="end of the window (default: now)")
    listing.add_argument(
        "--sort",
        choices=["count", "last_seen", "first_seen", "trend"],
        default="count",
        help="events in the window (default), last or first seen, or growth over the window before",
    )
    listing.add_argument("--limit", type=int, default=50, help="most issues shown (default 50)")
    listing.add_argument("--json", action="store_true", help="print JSON, as the API does")

    show = actions.add_parser("show", help="one issue: counts, breakdowns, history, events")
    show.add_argument("id", metavar="ID", help="the issue id, as list shows it")
    _store_flags(show)
    show.add_argument("--since", help="start of the counting window (default: 24h ago)")
    show.add_argument("--until", help="end of the counting window (default: now)")
    show.add_argument(
        "--events", type=int, default=10, metavar="N", help="latest events shown (default 10)"
    )
    show.add_argument("--json", action="store_true", help="print JSON, as the API does")

    resolve = actions.add_parser("resolve", help="mark resolved; a new event makes it regressed")
    resolve.add_argument("id", metavar="ID", help="the issue id")
    _store_flags(resolve)
    resolve.add_argument(
        "--release",
        help="resolved in this release: only events from a newer release make it regressed",
    )
    _reason(resolve)

    ignore = actions.add_parser(
        "ignore", help="mark ignored: for ever, for a time, or until N more events"
    )
    ignore.add_argument("id", metavar="ID", help="the issue id")
    _store_flags(ignore)
    until = ignore.add_mutually_exclusive_group()
    until.add_argument(
        "--minutes", type=int, metavar="N", help="unresolved again after this many minutes"
    )
    until.add_argument(
        "--events", type=int, metavar="N", help="unresolved again after this many more events"
    )
    _reason(ignore)

    reopen = actions.add_parser("reopen", help="mark unresolved again")
    reopen.add_argument("id", metavar="ID", help="the issue id")
    _store_flags(reopen)
    _reason(reopen)

    regroup = commands.add_parser(
        "regroup",
        help="recompute every stored report's and crash's issue with the current rules",
    )
    _store_flags(regroup)
    regroup.add_argument(
        "--fingerprint-rules",
        metavar="FILE",
        help="rules file to group by (default: REPORTING_ENDPOINT_FINGERPRINT_RULES, else"
        " the default fingerprints only)",
    )


def _store_flags(parser: argparse.ArgumentParser) -> None:
    from pathlib import Path

    parser.add_argument("--db", type=Path, help="SQLite file")
    parser.add_argument("--database", metavar="URL", help=_DATABASE_HELP)


def _reason(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reason", default="", help="why, kept in the issue's history")


def _issue_id(text: str) -> int:
    from reporting_endpoint.params import parse_int

    issue_id = parse_int(text.strip(), 1)
    if issue_id is None:
        raise ValueError(f"an issue id is a whole number, got {text!r}")
    return issue_id


def issues(args: argparse.Namespace, out: TextIO) -> int:
    """``issues ACTION``: dispatch."""
    action = args.issues_action
    if action == "list":
        return _list(args, out)
    if action == "show":
        return _show(args, out)
    return _change(args, out)


def _filters(args: argparse.Namespace) -> tuple[IssueFilters, IssueSort]:
    from reporting_endpoint.api.issues import parse_issue_filters, parse_sort

    params = {
        name: value
        for name in ("status", "kind", "site", "release", "browser", "os", "since", "until")
        if (value := getattr(args, name, None))
    }
    return parse_issue_filters(params), parse_sort(args.sort)


def _list(args: argparse.Namespace, out: TextIO) -> int:
    import orjson

    from reporting_endpoint.api.issues import MAX_ISSUES
    from reporting_endpoint.params import parse_limit

    settings = command_settings(args)
    filters, sort = _filters(args)
    limit = parse_limit(str(args.limit), maximum=MAX_ISSUES)

    async def read() -> list[dict[str, Any]]:
        storage = await opened(settings, read_only=True)
        try:
            return list((await storage.issues_page(filters, sort, limit)).items)
        finally:
            await storage.stop()

    found = run_command(read())
    if args.json:
        out.write(orjson.dumps({"issues": found, "sort": sort}).decode() + "\n")
        return 0
    header = ["id", "status", "kind", "window", "change", "total", "last_seen", "title"]
    table = [
        [
            str(issue["id"]),
            str(issue["status"]),
            terminal_safe(str(issue["kind"])),
            str(issue["window_count"]),
            _change_text(issue.get("change")),
            str(issue["count"]),
            str(issue["last_seen"]),
            terminal_safe(_cut(str(issue["title"]))),
        ]
        for issue in found
    ]
    write_table(out, header, table)
    if not found:
        out.write("(no issue matches)\n")
    return 0


def _cut(text: str, width: int = TITLE_WIDTH) -> str:
    return text if len(text) <= width else text[: width - 1] + "\u2026"


def _change_text(change: object) -> str:
    if not isinstance(change, int | float):
        return "new" if change is None else "-"
    return f"{change * 100:+.0f}%"


def _show(args: argparse.Namespace, out: TextIO) -> int:
    import orjson

    from reporting_endpoint.api.issues import parse_window
    from reporting_endpoint.params import parse_limit

    settings = command_settings(args)
    issue_id = _issue_id(args.id)
    params = {name: value for name in ("since", "until") if (value := getattr(args, name))}
    since, until = parse_window(params)
    events = parse_limit(str(args.events))

    async def read() -> dict[str, Any] | None:
        storage = await opened(settings, read_only=True)
        try:
            found = await storage.get_issue(issue_id, since, until)
            if found is not None:
                found["events"] = list((await storage.issue_events(issue_id, events)).items)
            return found
        finally:
            await storage.stop()

    found = run_command(read())
    if found is None:
        return _missing(issue_id, settings.database_url)
    if args.json:
        out.write(orjson.dumps(found).decode() + "\n")
        return 0
    _write_issue(out, found)
    return 0


def _write_issue(out: TextIO, issue: dict[str, Any]) -> None:
    for name in (
        "id", "title", "kind", "site", "status", "resolved_in_release", "ignore_until",
        "ignore_until_count", "count", "window_count", "previous_count", "first_seen",
        "last_seen", "first_release", "last_release", "fingerprint",
    ):  # fmt: skip
        value = issue.get(name)
        if value is not None:
            out.write(f"{name}: {terminal_safe(str(value))}\n")
    for dimension, values in (issue.get("breakdowns") or {}).items():
        if values:
            shown = ", ".join(f"{terminal_safe(str(v['value']))} ({v['count']})" for v in values)
            out.write(f"{dimension}: {shown}\n")
    history = issue.get("history") or []
    if history:
        out.write("\nhistory:\n")
        write_table(
            out,
            ["at", "actor", "from", "to", "reason"],
            [
                [
                    str(h["at"]),
                    terminal_safe(str(h["actor"])),
                    str(h["from"] or "-"),
                    str(h["to"]),
                    terminal_safe(str(h["reason"] or "")),
                ]
                for h in history
            ],
        )
    events = issue.get("events") or []
    if events:
        out.write("\nlatest events:\n")
        write_table(
            out,
            ["id", "received_at", "where"],
            [
                [
                    str(e["id"]),
                    str(e["received_at"]),
                    terminal_safe(_cut(str(e.get("url") or e.get("signature") or ""))),
                ]
                for e in events
            ],
        )


def _missing(issue_id: int, database: str) -> int:
    import sys

    print(f"reporting-endpoint issues: no issue {issue_id} in {database}", file=sys.stderr)
    return 1


def status_change_of(args: argparse.Namespace, now: int) -> StatusChange:
    """The decision an ``issues resolve|ignore|reopen`` command line asks for."""
    from reporting_endpoint.issues.triage import StatusChange

    reason = args.reason or ""
    if args.issues_action == "resolve":
        release = (args.release or "").strip() or None
        return StatusChange("resolved", CLI_ACTOR, reason, resolved_in_release=release)
    if args.issues_action == "ignore":
        for flag in ("minutes", "events"):
            value = getattr(args, flag)
            if value is not None and value < 1:
                raise ValueError(f"--{flag} must be 1 or more (leave both out: for ever)")
        until = None if args.minutes is None else now + args.minutes * 60_000
        return StatusChange(
            "ignored", CLI_ACTOR, reason, ignore_until_ms=until, ignore_more_events=args.events
        )
    return StatusChange("unresolved", CLI_ACTOR, reason)


def _change(args: argparse.Namespace, out: TextIO) -> int:
    from reporting_endpoint.params import now_ms

    settings = command_settings(args)
    issue_id = _issue_id(args.id)
    now = now_ms()
    change = status_change_of(args, now)

    async def write() -> dict[str, Any] | None:
        storage = await opened(settings, must_exist=True)
        try:
            return await storage.set_issue_status(issue_id, change, now)
        finally:
            await storage.stop()

    found = run_command(write())
    if found is None:
        return _missing(issue_id, settings.database_url)
    detail = ""
    if found.get("resolved_in_release"):
        detail = f" in release {terminal_safe(str(found['resolved_in_release']))}"
    elif found.get("ignore_until"):
        detail = f" until {found['ignore_until']}"
    elif found.get("ignore_until_count") is not None:
        detail = f" until it has {found['ignore_until_count']} events"
    out.write(f"issue {issue_id} is {found['status']}{detail}\n")
    return 0


def regroup(args: argparse.Namespace, out: TextIO) -> int:
    """``regroup``: every stored event's issue recomputed with the current rules."""
    from reporting_endpoint.issue_keys import stored_crash_key, stored_report_key

    settings = command_settings(args)
    if args.fingerprint_rules is not None:
        from pathlib import Path

        settings = settings.replace(fingerprint_rules=Path(args.fingerprint_rules))
    # Checked before the store is opened: a bad file changes nothing.
    rules = settings.fingerprint_rule_set()

    async def work() -> int:
        storage = await opened(settings, must_exist=True)
        try:
            return await storage.regroup(stored_report_key(rules), stored_crash_key(rules))
        finally:
            await storage.stop()

    changed = run_command(work())
    source = settings.fingerprint_rules or "the default fingerprints"
    out.write(f"regrouped with {source}: {changed} event(s) changed issue\n")
    return 0
