"""The dashboard's overview, the ranked list of issues, one issue, and triage through its
forms; every read goes through the storage protocol's roll-ups and issue counters."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from reporting_endpoint.dashboard import charts
from reporting_endpoint.dashboard.auth import session_of
from reporting_endpoint.dashboard.forms import checked_form
from reporting_endpoint.dashboard.recent import Recent
from reporting_endpoint.dashboard.render import (
    Refusal,
    Window,
    base_path,
    link,
    parse_window,
    path_id,
    query,
    render,
)
from reporting_endpoint.issues.triage import STATUSES, StatusChange
from reporting_endpoint.params import now_ms
from reporting_endpoint.storage.base import (
    ISSUE_SORTS,
    GroupPage,
    IssueFilters,
    IssuePage,
    IssueSort,
    SeriesCount,
    Storage,
)
from reporting_endpoint.storage.filters import Filters
from reporting_endpoint.storage.issue_rows import (
    BREAKDOWN_DIMENSIONS,
    series_shape,
    window_hours,
)
from reporting_endpoint.storage.rows import iso_time

# Rows of each overview table; issues on one page of the list.
TOP = 10
ISSUES_PER_PAGE = 50
# Seconds an overview is answered as read, before a task reads it again; how many windows
# are kept at once (custom ones included).
OVERVIEW_TTL = 60.0
MAX_CACHED = 32
# Issue kinds offered by the filter (others can still be typed into the URL).
KINDS = ("crash", "native", "csp-violation", "deprecation", "intervention", "network-error")
# Who a change made through the dashboard is recorded as.
ACTOR = "dashboard"
MAX_RELEASE = 128
ISSUE_LIST_PARAMETERS = frozenset(
    {"status", "kind", "site", "release", "browser", "os", "sort", "window", "since", "until",
     "after", "rank"}
)  # fmt: skip
WINDOW_PARAMETERS = frozenset({"window", "since", "until"})
ACTIONS = ("resolve", "resolve_in_release", "ignore", "reopen")


def stacked(
    window: Window, counts: Sequence[SeriesCount]
) -> tuple[list[int], dict[str, list[int]]]:
    """Sparse counts by one key as the chart's buckets and one full list per key (the chart
    folds the small ones into "other")."""
    buckets = window.buckets()
    index = {bucket: i for i, bucket in enumerate(buckets)}
    series: dict[str, list[int]] = {}
    for count in counts:
        at = index.get(count.bucket)
        if at is None:
            continue
        name = count.key[0] if count.key and count.key[0] else "(none)"
        series.setdefault(name, [0] * len(buckets))[at] += count.count
    return buckets, series


def rows_of(page: GroupPage, *names: str) -> list[tuple[str, int]]:
    """Group rows as (label, count) pairs for ``charts.bars``; a missing value as (none)."""
    pairs = []
    for group in page.groups:
        label = " ".join(str(group[name]) for name in names if group.get(name) is not None)
        pairs.append((label or "(none)", int(group["count"])))
    return pairs


def issue_buckets(window: Window) -> list[int]:
    """The hours (since the epoch) each point of an issue's series starts at."""
    first, last = window_hours(window.since, window.until)
    step, points = series_shape(first, last)
    return [first + i * step for i in range(points)]


def badge(item: Mapping[str, Any], window: Window) -> str:
    """The status badge: ``new`` for an unresolved issue first seen in the window."""
    status = str(item.get("status"))
    first_seen = item.get("first_seen")
    fresh = isinstance(first_seen, str) and first_seen >= iso_time(window.since)
    if status == "unresolved" and fresh:
        return "new"
    return status


@dataclass(frozen=True, slots=True)
class Overview:
    """What the overview shows of one window, as read together."""

    window: Window
    by_type: tuple[SeriesCount, ...]
    by_reason: tuple[SeriesCount, ...]
    top: IssuePage
    new: IssuePage
    regressed: IssuePage
    sites: GroupPage
    browsers: GroupPage
    systems: GroupPage
    native: GroupPage


class Pages:
    """Overview, issues and one issue, with triage."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        # The overview's top sites and OSes read the finest hourly roll-up, whose rows grow
        # with the window's traffic (a second or more over a million reports), and its issue
        # lists count every issue of the window: each process keeps an overview per window,
        # answered for ``OVERVIEW_TTL`` seconds and then read again behind the next view.
        self._overviews: Recent[tuple[str, ...], Overview] = Recent(MAX_CACHED)

    async def _read_overview(self, window: Window) -> Overview:
        filters = Filters((), window.since, window.until)
        crash_filters = Filters((("type", "crash"),), window.since, window.until)
        since, until = window.since, window.until
        s = self.storage
        series, issues, groups = await asyncio.gather(
            asyncio.gather(
                s.timeseries("reports", window.bucket, ("type",), filters),
                s.timeseries("reports", window.bucket, ("reason",), crash_filters),
            ),
            asyncio.gather(
                s.issues_page(IssueFilters(since=since, until=until), "count", TOP),
                s.issues_page(
                    IssueFilters(since=since, until=until, first_seen_since=since),
                    "first_seen",
                    TOP,
                ),
                s.issues_page(
                    IssueFilters(status="regressed", since=since, until=until), "last_seen", TOP
                ),
            ),
            asyncio.gather(
                s.groups("reports", ("site",), filters, TOP),
                s.groups("reports", ("browser",), filters, TOP),
                s.groups("reports", ("os",), filters, TOP),
                s.groups("crashes", ("product", "version"), filters, TOP),
            ),
        )
        return Overview(window, *series, *issues, *groups)

    async def _total(self, window: Window) -> int:
        """Every event of the window (reports from the roll-ups, crashes from their table)."""
        filters = Filters((), window.since, window.until)
        reports, crashes = await asyncio.gather(
            self.storage.groups("reports", ("type",), filters, 100),
            self.storage.groups("crashes", ("parse_status",), filters, 10),
        )
        return sum(int(g["count"]) for g in (*reports.groups, *crashes.groups))

    async def overview(self, request: Request) -> Response:
        params = query(request, WINDOW_PARAMETERS)
        asked = parse_window(params, now_ms())
        key = (asked.label, asked.since_date, asked.until_date)
        data = await self._overviews.get(key, lambda: self._read_overview(asked), OVERVIEW_TTL)
        # Drawn for the window the data was read for (up to a minute before ``asked``).
        window = data.window
        buckets, type_series = stacked(window, data.by_type)
        _, reason_series = stacked(window, data.by_reason)
        native = rows_of(data.native, "product", "version")
        return render(
            request,
            "overview.html",
            "overview",
            "Overview",
            window=window,
            volume=charts.stacked_bars(buckets, type_series, title="Reports by type"),
            volume_total=sum(sum(v) for v in type_series.values()),
            reasons=charts.stacked_bars(buckets, reason_series, title="Crash reports by reason"),
            reasons_total=sum(sum(v) for v in reason_series.values()),
            top=[(i, badge(i, window), charts.sparkline(i["series"])) for i in data.top.items],
            new_issues=[(i, badge(i, window)) for i in data.new.items],
            regressed=list(data.regressed.items),
            sites=charts.bars(rows_of(data.sites, "site")),
            browsers=charts.bars(rows_of(data.browsers, "browser")),
            systems=charts.bars(rows_of(data.systems, "os")),
            native=native,
            native_bars=charts.bars(native),
        )

    async def issues(self, request: Request) -> Response:
        params = query(request, ISSUE_LIST_PARAMETERS)
        window = parse_window(params, now_ms())
        status = params.get("status") or None
        if status is not None and status not in STATUSES:
            raise Refusal(400, "invalid_status", f"status is one of {', '.join(STATUSES)}")
        sort = _sort(params.get("sort"))
        filters = IssueFilters(
            status=status,
            kind=params.get("kind") or None,
            site=params.get("site") or None,
            release=params.get("release") or None,
            browser=params.get("browser") or None,
            os=params.get("os") or None,
            since=window.since,
            until=window.until,
        )
        after = params.get("after") or None
        rank = _rank(params.get("rank"))
        try:
            page, total = await asyncio.gather(
                self.storage.issues_page(filters, sort, ISSUES_PER_PAGE, after),
                self._total(window),
            )
        except (ValueError, OverflowError):
            raise Refusal(400, "invalid_cursor", "after is not a cursor of this list") from None
        kept = {k: v for k, v in params.items() if k not in ("after", "rank")}
        following = None
        if page.next is not None:
            following = link(
                base_path(request) + "/issues",
                {**kept, "after": page.next, "rank": rank + len(page.items)},
            )
        rows = [
            (rank + n, item, badge(item, window), charts.sparkline(item["series"]))
            for n, item in enumerate(page.items)
        ]
        return render(
            request,
            "issues.html",
            "issues",
            "Issues",
            window=window,
            params=kept,
            rows=rows,
            total=total,
            following=following,
            first_page=link(base_path(request) + "/issues", kept) if after else None,
            statuses=STATUSES,
            kinds=KINDS,
            sorts=ISSUE_SORTS,
            sort=sort,
        )

    async def issue(self, request: Request) -> Response:
        issue_id = _issue_id(request)
        params = query(request, WINDOW_PARAMETERS)
        window = parse_window(params, now_ms())
        found, events = await asyncio.gather(
            self.storage.get_issue(issue_id, window.since, window.until),
            self.storage.issue_events(issue_id, TOP),
        )
        if found is None:
            raise Refusal(404, "issue_not_found", f"no issue with id {issue_id}")
        breakdowns = [
            (name, charts.bars([(str(b["value"]), int(b["count"])) for b in values]))
            for name in BREAKDOWN_DIMENSIONS
            if (values := found.get("breakdowns", {}).get(name))
        ]
        chart = charts.stacked_bars(
            issue_buckets(window), {"events": list(found["series"])}, title="Events"
        )
        session = session_of(request)
        return render(
            request,
            "issue.html",
            "issue",
            f"Issue {issue_id}",
            window=window,
            issue=found,
            status_badge=badge(found, window),
            chart=chart,
            breakdowns=breakdowns,
            events=list(events.items),
            native=found.get("kind") == "native",
            can_write=session is not None and session.can_write,
        )

    async def triage(self, request: Request) -> Response:
        issue_id = _issue_id(request)
        session = session_of(request)
        form = await checked_form(request, ("action", "release"))
        if session is None or not session.can_write:
            raise Refusal(
                403, "write_access_required", "triage needs a session opened with the write token"
            )
        change = _change(form.get("action", ""), form.get("release", ""))
        now = now_ms()
        found = await self.storage.set_issue_status(issue_id, change, now)
        if found is None:
            raise Refusal(404, "issue_not_found", f"no issue with id {issue_id}")
        # The person who just triaged sees it on the overview too (this process's copy).
        self._overviews.clear()
        return RedirectResponse(f"{base_path(request)}/issues/{issue_id}", status_code=303)


def _change(action: str, release: str) -> StatusChange:
    release = release.strip()
    if action == "resolve":
        return StatusChange("resolved", ACTOR)
    if action == "resolve_in_release":
        if not release or len(release) > MAX_RELEASE or not release.isprintable():
            raise Refusal(
                400, "invalid_release", f"a release is 1 to {MAX_RELEASE} printable characters"
            )
        return StatusChange("resolved", ACTOR, resolved_in_release=release)
    if action == "ignore":
        return StatusChange("ignored", ACTOR)
    if action == "reopen":
        return StatusChange("unresolved", ACTOR)
    raise Refusal(400, "invalid_action", f"action is one of {', '.join(ACTIONS)}")


def _issue_id(request: Request) -> int:
    return path_id(request, "issue_id", "issue")


def _sort(value: str | None) -> IssueSort:
    for sort in ISSUE_SORTS:
        if value == sort:
            return sort
    if not value:
        return "count"
    raise Refusal(400, "invalid_sort", f"sort is one of {', '.join(ISSUE_SORTS)}")


def _rank(value: str | None) -> int:
    if not value:
        return 1
    if not value.isascii() or not value.isdigit() or not 1 <= int(value) <= 10**9:
        raise Refusal(400, "invalid_rank", "rank is a whole number")
    return int(value)
