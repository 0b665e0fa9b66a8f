"""The dashboard's SVG charts: escaped labels, sensible empty charts, bounded size, true shapes."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest
from markupsafe import Markup

from reporting_endpoint.dashboard.charts import (
    MAX_BARS,
    MAX_POINTS,
    MAX_ROWS,
    MAX_SERIES,
    bars,
    sparkline,
    stacked_bars,
)

SVG = "{http://www.w3.org/2000/svg}"
HOUR_2026 = 492_000  # 2026-02-16 00:00 UTC, in hours since the epoch
NASTY = [
    "<script>window.__xss=1</script>",
    '"><svg onload="window.__xss=1">',
    "' onmouseover='window.__xss=1",
    "javascript:window.__xss=1",
    "&lt;already&gt; &amp; escaped",
]


def parse(chart: Markup) -> ET.Element:
    """The chart is well-formed XML (so the HTML parser cannot be talked out of the SVG)."""
    assert isinstance(chart, Markup)
    root = ET.fromstring(str(chart))
    assert root.tag == f"{SVG}svg"
    return root


def texts(root: ET.Element) -> list[str]:
    return ["".join(el.itertext()) for el in root.iter() if el.tag in (f"{SVG}text", f"{SVG}title")]


def assert_inert(root: ET.Element) -> None:
    """No element a browser would run or fetch, and no attribute CSP would block or run."""
    for element in root.iter():
        assert element.tag.removeprefix(SVG) not in {"script", "foreignObject", "a", "image"}
        for name in element.attrib:
            assert name != "style", "style attributes need 'unsafe-inline'"
            assert not name.startswith("on"), name
            assert "href" not in name, name


def segments(root: ET.Element, row: int) -> list[tuple[float, float, float, float]]:
    """(x, y, width, height) of each bar of one series: strokes as wide as a bar."""
    path = root.find(f"{SVG}path[@class='chart-series chart-s{row}']")
    assert path is not None
    width = float(path.get("stroke-width", "nan"))
    return [
        (float(x) - width / 2, float(y), width, float(h))
        for x, y, h in re.findall(r"M([\d.]+) ([\d.]+)v([\d.]+)", path.get("d", ""))
    ]


def hour_series(length: int, **series: list[int]) -> tuple[list[int], dict[str, list[int]]]:
    return list(range(HOUR_2026, HOUR_2026 + length)), series


@pytest.mark.parametrize("label", NASTY)
def test_every_label_is_escaped(label: str) -> None:
    buckets, series = hour_series(3, **{label: [1, 2, 3], "crash": [0, 1, 0]})
    charts = [
        stacked_bars(buckets, series, title=label),
        bars([(label, 5), ("Chrome", 2)]),
    ]
    for chart in charts:
        root = parse(chart)
        assert_inert(root)
        assert "<script" not in str(chart)
        # The label is shown as the text it is, not as markup.
        assert any(label in text for text in texts(root)), texts(root)


def test_long_labels_are_cut_without_splitting_an_entity() -> None:
    label = "&" * 300
    root = parse(bars([(label, 1)]))
    shown = [t for t in texts(root) if t.startswith("&")]
    assert shown and all(len(t) < 120 and set(t.rstrip("…")) == {"&"} for t in shown[1:])


def test_lone_surrogates_and_control_characters_still_encode() -> None:
    chart = bars([("bad\ud800\x00label", 1)])
    str(chart).encode("utf-8")
    assert "bad\ufffd\ufffdlabel" in texts(parse(chart))


def test_empty_charts_say_no_data() -> None:
    for chart in (stacked_bars([], {}), stacked_bars(*hour_series(24, crash=[0] * 24)), bars([])):
        root = parse(chart)
        assert "No data" in texts(root)
    line = parse(sparkline([]))
    assert line.find(f"{SVG}polyline") is None and line.find(f"{SVG}path") is not None


def test_stacked_bars_scale_to_the_busiest_hour_and_stack_in_order() -> None:
    buckets, series = hour_series(4, oom=[1, 0, 4, 0], unresponsive=[1, 0, 4, 2])
    root = parse(stacked_bars(buckets, series, width=400, height=200))
    oom, unresponsive = segments(root, 0), segments(root, 1)
    # Hours with no count draw nothing; the busiest hour (8) fills the plot's height.
    assert len(oom) == 2 and len(unresponsive) == 3
    plot_height = oom[1][3] + unresponsive[1][3]
    assert oom[1][3] == pytest.approx(plot_height / 2, abs=0.1)
    assert unresponsive[2][3] == pytest.approx(plot_height / 4, abs=0.1)
    # The second series sits on top of the first in the same column.
    assert unresponsive[1][1] + unresponsive[1][3] == pytest.approx(oom[1][1], abs=0.15)
    # A tooltip for every busy hour, with the hour and the counts.
    tips = [t for t in texts(root) if "UTC" in t]
    assert len(tips) == 3
    assert tips[1].splitlines() == ["2026-02-16 02:00 UTC", "oom: 4", "unresponsive: 4"]
    legend = [t for t in texts(root) if t in ("oom", "unresponsive")]
    assert legend == ["oom", "unresponsive"]


def test_gaps_between_buckets_stay_gaps() -> None:
    hours = [HOUR_2026, HOUR_2026 + 1, HOUR_2026 + 9]
    root = parse(stacked_bars(hours, {"crash": [1, 1, 1]}, width=400))
    first, second, third = segments(root, 0)
    # Ten hours wide, so the last bar starts nine bar-widths after the first.
    slot = second[0] - first[0]
    assert third[0] - first[0] == pytest.approx(9 * slot, abs=0.5)


def test_daily_buckets_draw_one_bar_a_day_and_say_so() -> None:
    """A 30-day window is counted per day (every 24th hour): 30 touching bars, not 30 thin
    ones in 720 hour-wide slots, with days in the tooltips and under the axis."""
    days = [HOUR_2026 + 24 * day for day in range(30)]
    root = parse(stacked_bars(days, {"crash": list(range(1, 31))}, width=800))
    bars_drawn = segments(root, 0)
    assert len(bars_drawn) == 30
    slot = bars_drawn[1][0] - bars_drawn[0][0]
    assert bars_drawn[0][2] == pytest.approx(slot - 1, abs=0.15)
    tips = [t.splitlines() for t in texts(root) if "UTC" in t]
    assert tips[0] == ["2026-02-16 UTC", "crash: 1"]
    assert tips[-1] == ["2026-03-17 UTC", "crash: 30"]
    assert "16 Feb" in texts(root)


def test_a_month_of_hours_and_many_series_stay_bounded_and_keep_every_count() -> None:
    hours = 24 * 30
    series = {f"site-{i}.example": [i + 1] * hours for i in range(40)}
    chart = stacked_bars(list(range(HOUR_2026, HOUR_2026 + hours)), series)
    root = parse(chart)
    hits = [r for r in root.iter(f"{SVG}rect") if r.get("class") == "chart-hit"]
    assert 0 < len(hits) <= MAX_BARS
    legend = [g for g in root.iter(f"{SVG}g") if g.get("class") == "chart-legend"]
    assert len(legend) == MAX_SERIES
    assert "".join(legend[-1].itertext()) == "other"
    # Nothing lost by merging hours and folding series: the tooltips add up to every count.
    shown = sum(
        int(line.rsplit(": ", 1)[1].replace(",", ""))
        for hit in hits
        for line in "".join(hit.itertext()).splitlines()[1:]
    )
    assert shown == sum(sum(counts) for counts in series.values())
    assert len(chart) < 60_000


def test_a_day_of_hours_draws_one_bar_per_hour() -> None:
    root = parse(stacked_bars(*hour_series(24, crash=[1] * 24)))
    hits = [r for r in root.iter(f"{SVG}rect") if r.get("class") == "chart-hit"]
    assert len(hits) == 24
    ticks = [t for t in texts(root) if re.fullmatch(r"\d\d:00", t)]
    assert ticks[0] == "00:00" and 3 <= len(ticks) <= 7


def test_mismatched_series_is_a_caller_bug() -> None:
    with pytest.raises(ValueError, match="3 buckets"):
        stacked_bars([1, 2, 3], {"crash": [1, 2]})


def test_sparkline_peaks_at_the_top_and_is_capped() -> None:
    root = parse(sparkline([0, 5, 10], width=100, height=20))
    line = root.find(f"{SVG}polyline")
    assert line is not None
    points = [tuple(map(float, p.split(","))) for p in line.get("points", "").split()]
    assert [p[0] for p in points] == [0.5, 50.0, 99.5]
    assert points[2][1] == 1.0 and points[0][1] == 19.0 and points[1][1] == 10.0
    long = parse(sparkline(list(range(10_000))))
    polyline = long.find(f"{SVG}polyline")
    assert polyline is not None and len(polyline.get("points", "").split()) <= MAX_POINTS
    assert "49,995,000" in (long.get("aria-label") or "")


def test_share_bars_sort_fold_and_show_shares() -> None:
    items = [(f"browser {i}", i) for i in range(1, 21)]
    root = parse(bars(items, width=300))
    rows = [g for g in root.iter(f"{SVG}g") if g.get("class") == "chart-row"]
    assert len(rows) == MAX_ROWS
    labels = ["".join(r.find(f"{SVG}text").itertext()) for r in rows]  # type: ignore[union-attr]
    assert labels[:3] == ["browser 20", "browser 19", "browser 18"]
    assert labels[-1] == "other"
    total = sum(range(1, 21))
    counts = [
        "".join(t.itertext()) for t in root.iter(f"{SVG}text") if t.get("class") == "chart-count"
    ]
    assert counts[0] == f"20 · {20 / total:.0%}"
    assert counts[-1] == f"{sum(range(1, 12)):,} · {sum(range(1, 12)) / total:.0%}"
    widths = [
        float(r.get("width", 0)) for r in root.iter(f"{SVG}rect") if r.get("class") == "chart-bar"
    ]
    assert widths[0] == pytest.approx(300 * 20 / total, abs=0.1)
    assert widths[:-1] == sorted(widths[:-1], reverse=True)
