"""The reports explorer (every stored type, native crashes included), one report, one crash
with its minidump, and the quarantine of refused reports."""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import Response

from reporting_endpoint.api.read import ReadApi
from reporting_endpoint.blobstores import BlobStore
from reporting_endpoint.dashboard.render import (
    Refusal,
    base_path,
    crash_id,
    link,
    parse_window,
    path_id,
    query,
    refused,
    render,
)
from reporting_endpoint.errors import RequestRejected
from reporting_endpoint.params import (
    QueryError,
    decode_crash_cursor,
    decode_row_cursor,
    encode_cursor,
    now_ms,
)
from reporting_endpoint.storage.base import Page, Storage
from reporting_endpoint.storage.filters import (
    CRASH_DIMENSIONS,
    QUARANTINE_DIMENSIONS,
    REPORT_DIMENSIONS,
    Filters,
)

# Rows on one page of the explorer and of the quarantine.
PER_PAGE = 50
# The explorer's type for Crashpad uploads (they are not W3C reports).
NATIVE = "native"
WINDOW = frozenset({"window", "since", "until", "after"})
REPORT_PARAMETERS = WINDOW | set(REPORT_DIMENSIONS)
CRASH_PARAMETERS = WINDOW | {"type"} | set(CRASH_DIMENSIONS)
QUARANTINE_PARAMETERS = WINDOW | set(QUARANTINE_DIMENSIONS)
# Crash facts shown on a crash's page, in order.
CRASH_FACTS = (
    "product", "version", "platform", "process_type", "electron_version", "os", "os_version",
    "cpu", "exception_name", "exception_code_hex", "crash_address_hex", "crashing_thread",
    "crash_module", "crash_offset_hex", "main_module", "main_module_version", "signature",
    "parse_status", "parse_error", "dump_size", "dump_sha256", "guid",
)  # fmt: skip


def _next_link(request: Request, params: dict[str, str], page: Page) -> str | None:
    cursor = encode_cursor(page.next)
    if cursor is None:
        return None
    return link(request.url.path, {**params, "after": cursor})


class Explorer:
    """Reports, crashes and the quarantine, newest first, a keyset page at a time."""

    def __init__(self, storage: Storage, blobs: BlobStore) -> None:
        self.storage = storage
        self.downloads = ReadApi(storage, blobs)

    async def reports(self, request: Request) -> Response:
        kind = request.query_params.get("type", "")
        if kind == NATIVE:
            return await self._crashes(request)
        params = query(request, frozenset(REPORT_PARAMETERS))
        window = parse_window(params, now_ms())
        try:
            equal = tuple((n, params[n]) for n in REPORT_DIMENSIONS if params.get(n))
            after = decode_row_cursor(params.get("after"))
        except QueryError as exc:
            raise refused(exc) from None
        filters = Filters(equal, window.since, window.until)
        counts = Filters(tuple(p for p in equal if p[0] != "type"), window.since, window.until)
        # The native tab leads to the crash list, which refuses the report-only filters: its
        # link keeps the window and the filters both lists take (os), and its count is of the
        # crashes that link shows.
        both = tuple(p for p in equal if p[0] in CRASH_DIMENSIONS)
        shared = Filters(both, window.since, window.until)
        page, types, natives = await asyncio.gather(
            self.storage.reports_page(filters, PER_PAGE, after),
            self.storage.groups("reports", ("type",), counts, 50),
            self.storage.groups("crashes", ("parse_status",), shared, 10),
        )
        kept = {k: v for k, v in params.items() if k != "after" and v}
        native_params = {k: v for k, v in kept.items() if k in CRASH_PARAMETERS and k != "type"}
        tabs = [(str(g["type"]), int(g["count"])) for g in types.groups if g.get("type")]
        tabs.append((NATIVE, sum(int(g["count"]) for g in natives.groups)))
        return render(
            request,
            "reports.html",
            "reports",
            "Reports",
            window=window,
            params=kept,
            dimensions=REPORT_DIMENSIONS,
            tabs=tabs,
            native_params=native_params,
            reports=list(page.items),
            following=_next_link(request, kept, page),
        )

    async def _crashes(self, request: Request) -> Response:
        params = query(request, frozenset(CRASH_PARAMETERS))
        window = parse_window(params, now_ms())
        try:
            equal = tuple((n, params[n]) for n in CRASH_DIMENSIONS if params.get(n))
            after = decode_crash_cursor(params.get("after"))
        except QueryError as exc:
            raise refused(exc) from None
        page = await self.storage.crash_page(
            Filters(equal, window.since, window.until), PER_PAGE, after
        )
        kept = {k: v for k, v in params.items() if k != "after" and v}
        return render(
            request,
            "crashes.html",
            "reports",
            "Native crashes",
            window=window,
            params=kept,
            dimensions=("product", "version", "platform", "process_type", "signature", "os"),
            crashes=list(page.items),
            following=_next_link(request, kept, page),
        )

    async def report(self, request: Request) -> Response:
        report_id = path_id(request, "report_id", "report")
        query(request, frozenset())
        found = await self.storage.get_report(report_id)
        if found is None:
            raise Refusal(404, "report_not_found", f"no report with id {report_id}")
        return render(request, "report.html", "report", f"Report {report_id}", report=found)

    async def crash(self, request: Request) -> Response:
        found_id = crash_id(request)
        query(request, frozenset())
        found = await self.storage.get_crash(found_id)
        if found is None:
            raise Refusal(404, "crash_not_found", f"no crash with id {found_id}")
        annotations = found.get("annotations")
        return render(
            request,
            "crash.html",
            "crash",
            f"Crash {found_id}",
            crash=found,
            facts=[(name, found[name]) for name in CRASH_FACTS if found.get(name) is not None],
            annotations=sorted(annotations.items()) if isinstance(annotations, dict) else [],
            modules=found.get("modules") if isinstance(found.get("modules"), list) else None,
            frames=found.get("frames") if isinstance(found.get("frames"), list) else None,
            minidump=f"{base_path(request)}/crashes/{found_id}/minidump",
        )

    async def minidump(self, request: Request) -> Response:
        crash_id(request)
        try:
            return await self.downloads.minidump(request)
        except RequestRejected as exc:
            # The API's refusal (crash_not_found, minidump_missing, ...) as a dashboard page.
            raise Refusal(exc.status, exc.code, exc.message) from None

    async def quarantine(self, request: Request) -> Response:
        params = query(request, frozenset(QUARANTINE_PARAMETERS))
        window = parse_window(params, now_ms())
        try:
            equal = tuple((n, params[n]) for n in QUARANTINE_DIMENSIONS if params.get(n))
            after = decode_row_cursor(params.get("after"))
        except QueryError as exc:
            raise refused(exc) from None
        filters = Filters(equal, window.since, window.until)
        page, codes = await asyncio.gather(
            self.storage.quarantine_page(filters, PER_PAGE, after),
            self.storage.quarantine_counts(),
        )
        kept = {k: v for k, v in params.items() if k != "after" and v}
        return render(
            request,
            "quarantine.html",
            "quarantine",
            "Quarantine",
            window=window,
            params=kept,
            codes=list(codes),
            rows=list(page.items),
            following=_next_link(request, kept, page),
        )
