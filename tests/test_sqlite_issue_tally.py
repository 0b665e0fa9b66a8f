"""The SQLite backend's two ways of counting reports into issues agree.

Ingest counts ``NewReport.row()`` tuples with a fast path (``tally_reports``); deletion,
prune and regroup count rows read back from the table (``tally_report_event``). Counters
stay exact only if both count the same values.
"""

from __future__ import annotations

from typing import Any

from reporting_endpoint.storage.sqlite.issue_tally import Tally, tally_report_event, tally_reports
from tests.test_storage_parity import BASE, HOUR, report

CRASH_BODY = '{"type": "crash", "body": {"is_top_level": true, "visibility_state": "visible"}}'


def test_fast_path_counts_what_the_row_path_counts() -> None:
    variants: list[tuple[str | None, dict[str, Any]]] = [
        ("1.0", {}),
        (None, {"browser": None, "os": ""}),
        ("2.0", {"raw": CRASH_BODY}),
        ("x" * 300, {"url": "https://a.example/app/123/u/5f0c9d3e8a7b6c5d"}),
        ("1.0", {"browser_major": "141", "raw": CRASH_BODY}),
        (None, {"kind": "deprecation", "raw": CRASH_BODY}),  # not a crash: no body dims
    ]
    rows = [
        report(BASE + n * 977, fingerprint=f"f{n % 3}", issue_title="t", release=r, **extra).row()
        for n, (r, extra) in enumerate(variants * 7)
    ] + [report(BASE + HOUR).row()]  # no fingerprint: no issue
    fast = tally_reports(rows)
    slow: dict[str, Tally] = {}
    for row in rows:
        if not row[13]:
            continue
        # The table's columns in REPORT_EVENT_COLUMNS order.
        event = (row[0], row[3], row[4], row[8], row[9], row[10], row[12], row[15])
        tally_report_event(slow.setdefault(str(row[13]), Tally(None)), event)
    assert sorted(fast) == sorted(slow) == ["f0", "f1", "f2"]
    for fingerprint, tally in fast.items():
        other = slow[fingerprint]
        assert (tally.count, tally.first, tally.last) == (other.count, other.first, other.last)
        assert tally.hours == other.hours
        assert tally.dims == other.dims
        assert tally.releases == other.releases
    assert ("is_top_level", "true") in fast["f2"].dims
    assert all(len(value) <= 200 for _, value in fast["f0"].dims)
