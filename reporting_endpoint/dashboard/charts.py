"""Server-drawn SVG charts: pure functions from counts to escaped, size-bounded markup."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from markupsafe import Markup, escape

# Colour-blind-friendly (Tableau 10). Presentation attributes, not style attributes: the
# dashboard's CSP (style-src 'self') blocks style="..." but not fill="...". The classes let the
# stylesheet restyle them.
PALETTE = (
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#76b7b2",
    "#59a14f",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
)
OTHER_COLOUR = "#9c9c9c"
TRACK_COLOUR = "#e8e8e8"
OTHER = "other"

# Bounds on what a chart draws, whatever it is handed: a 30-day window is 720 hourly buckets,
# and a site can send any number of distinct labels. Past these caps neighbouring hours merge
# into wider bars and the smallest series or rows fold into "other", so a chart stays a few KB.
MAX_BARS = 120
MAX_SERIES = 6
MAX_POINTS = 100
MAX_ROWS = 10
MAX_LABEL = 40

_FONT = 'font-family="sans-serif" font-size="11"'
_HOUR = 3600


def stacked_bars(
    buckets: Sequence[int],
    series: Mapping[str, Sequence[int]],
    *,
    width: int = 800,
    height: int = 200,
    title: str = "",
) -> Markup:
    """Counts per bucket, one bar per bucket stacked by series, with a legend below.

    ``buckets`` are hours since the epoch, evenly spaced: every hour, or every 24th for daily
    counts (the spacing is the largest step all gaps are a multiple of). The time axis runs
    from the first to the last bucket: pass zero counts for the quiet ones of a window. A
    series whose length differs from the buckets' is a caller's bug and raises ValueError."""
    for name, counts in series.items():
        if len(counts) != len(buckets):
            raise ValueError(f"series {name!r} has {len(counts)} counts for {len(buckets)} buckets")
    width, height = max(width, 120), max(height, 60)
    kept = _fold_series(series)
    top = 16 if title else 4
    left, bottom = 44, 16
    plot_w, plot_h = width - left - 4, height - top - bottom
    legend, legend_h = _legend([name for name, _ in kept], width, height)
    total_h = height + legend_h
    head = _open(width, total_h, "chart chart-bars", title or "Reports per hour")
    parts = [head]
    if title:
        parts.append(f'<text class="chart-title" x="0" y="11" {_FONT} fill="currentColor">')
        parts.append(f"{_text(title, 80)}</text>")

    first, base = _spacing(buckets)
    slots = (max(buckets) - first) // base + 1 if buckets else 0
    per_bar = max(1, math.ceil(slots / MAX_BARS))
    step = base * per_bar  # hours per bar
    bars = math.ceil(slots / per_bar)
    columns = [[0] * bars for _ in kept]
    for index, bucket in enumerate(buckets):
        column = (bucket - first) // step
        for row, (_, counts) in enumerate(kept):
            columns[row][column] += max(0, int(counts[index]))
    totals = [sum(row[column] for row in columns) for column in range(bars)]
    peak = max(totals, default=0)

    if peak == 0:
        parts.append(
            f'<text class="chart-empty" x="{width / 2:g}" y="{top + plot_h / 2:g}" '
            f'text-anchor="middle" {_FONT} fill="currentColor">No data</text>'
        )
    else:
        parts.append(_axis(left, top, plot_w, plot_h, peak))
        scale = plot_h / peak
        # Whole pixels when there is room: shorter numbers in the markup, crisper edges.
        bar_w = plot_w / bars if plot_w < 2 * bars else float(plot_w // bars)
        gap = 1 if bar_w >= 4 else 0
        base = top + plot_h
        # One path per series and one "M x y v h" stroke per bar (a stroke as wide as the bar):
        # a fifth of the bytes of a rect per bar, which matters at 120 bars times 6 series.
        heights = [0.0] * bars
        for row, (_, _counts) in enumerate(kept):
            segments = []
            for column in range(bars):
                count = columns[row][column]
                if not count:
                    continue
                h = count * scale
                y = base - heights[column] - h
                heights[column] += h
                centre = left + column * bar_w + (bar_w - gap) / 2
                segments.append(f"M{_n(centre)} {_n(y)}v{_n(h)}")
            if segments:
                parts.append(
                    f'<path class="chart-series chart-s{row}" stroke="{_colour(kept, row)}" '
                    f'stroke-width="{_n(bar_w - gap)}" d="{"".join(segments)}"/>'
                )
        # An invisible column per busy bar carries its tooltip: time and count per series
        # (names escaped once here; the times and counts are our own digits).
        names = [_text(name, MAX_LABEL) for name, _ in kept]
        for column in range(bars):
            if not totals[column]:
                continue
            lines = [_hour_label(first + column * step, step)]
            lines += [
                f"{names[row]}: {columns[row][column]:,}"
                for row in range(len(kept))
                if columns[row][column]
            ]
            parts.append(
                f'<rect class="chart-hit" x="{_n(left + column * bar_w)}" y="{top}" '
                f'width="{_n(bar_w)}" height="{plot_h}" fill="transparent">'
                f"<title>{chr(10).join(lines)}</title></rect>"
            )
        parts.append(_time_ticks(first, step, bars, left, bar_w, base + 12))
    parts.append(legend)
    parts.append("</svg>")
    return Markup("".join(parts))


def sparkline(values: Sequence[int], *, width: int = 100, height: int = 20) -> Markup:
    """A line through ``values`` (oldest first); more than MAX_POINTS values are summed in
    neighbouring groups, so the line keeps its shape and the markup its size."""
    width, height = max(width, 10), max(height, 4)
    points = _downsample([max(0, int(v)) for v in values], MAX_POINTS)
    head = _open(width, height, "chart chart-spark", f"Trend: {sum(points):,} in total")
    if not points:
        line = (
            f'<path class="chart-baseline" d="M0 {height - 0.5}H{width}" stroke="{OTHER_COLOUR}"/>'
        )
        return Markup(f"{head}{line}</svg>")
    peak = max(points) or 1
    # A stroke half a pixel in from each edge, so a flat zero line is not clipped away.
    usable = height - 2
    if len(points) == 1:
        points = points * 2
    dx = (width - 1) / (len(points) - 1)
    coords = " ".join(
        f"{0.5 + i * dx:.1f},{1 + usable - value * usable / peak:.1f}"
        for i, value in enumerate(points)
    )
    line = (
        f'<polyline class="chart-line" fill="none" stroke="{PALETTE[0]}" '
        f'stroke-width="1.5" points="{coords}"/>'
    )
    return Markup(f"{head}{line}</svg>")


def bars(items: Sequence[tuple[str, int]], *, width: int = 300) -> Markup:
    """Horizontal share bars for a breakdown (browser, OS, release, ...): one row per label,
    largest first, with its count and share of the total; past MAX_ROWS the rest is "other"."""
    width = max(width, 120)
    rows = _fold_rows(items)
    total = sum(count for _, count in rows)
    row_h = 22
    height = max(row_h, row_h * len(rows))
    parts = [_open(width, height, "chart chart-share", "Breakdown")]
    if not total:
        parts.append(
            f'<text class="chart-empty" x="0" y="14" {_FONT} fill="currentColor">No data</text>'
        )
    for index, (label, count) in enumerate(rows if total else []):
        y = index * row_h
        share = count / total
        colour = OTHER_COLOUR if label == OTHER and index == len(rows) - 1 else PALETTE[0]
        parts.append(
            f'<g class="chart-row"><title>{_text(label, 500)}: {count:,} ({share:.1%})</title>'
            f'<text class="chart-label" x="0" y="{y + 11}" {_FONT} fill="currentColor">'
            f"{_text(label, MAX_LABEL)}</text>"
            f'<text class="chart-count" x="{width}" y="{y + 11}" text-anchor="end" {_FONT} '
            f'fill="currentColor">{count:,} · {_percent(share)}</text>'
            f'<rect class="chart-track" x="0" y="{y + 14}" width="{width}" height="5" '
            f'fill="{TRACK_COLOUR}"/>'
            f'<rect class="chart-bar" x="0" y="{y + 14}" width="{max(1.0, share * width):.1f}" '
            f'height="5" fill="{colour}"/></g>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))


def _n(value: float) -> str:
    """A coordinate to a tenth of a pixel, without a trailing ".0"."""
    return f"{round(value, 1):g}"


def _open(width: int, height: int, css_class: str, label: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="{css_class}" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{_text(label, 200)}">'
    )


def _text(value: str, limit: int) -> Markup:
    """Escaped, and cut to ``limit`` characters before escaping (cutting after could split an
    entity). Lone surrogates, which the encoder would refuse, become U+FFFD."""
    clean = str(value)
    if not clean.isprintable():  # the common case skips the walk over every character
        clean = "".join(
            "\ufffd" if (c < " " and c not in "\n\t") or "\ud800" <= c <= "\udfff" else c
            for c in clean
        )
    if len(clean) > limit:
        clean = clean[: limit - 1] + "…"
    return escape(clean)


def _percent(share: float) -> str:
    return "<1%" if 0 < share < 0.01 else f"{share:.0%}"


def _colour(kept: Sequence[tuple[str, Sequence[int]]], row: int) -> str:
    if row == len(kept) - 1 and kept[row][0] == OTHER and row >= MAX_SERIES - 1:
        return OTHER_COLOUR
    return PALETTE[row % len(PALETTE)]


def _fold_series(series: Mapping[str, Sequence[int]]) -> list[tuple[str, Sequence[int]]]:
    """At most MAX_SERIES series, in the caller's order; the smallest fold into "other"."""
    named = [(str(name), list(counts)) for name, counts in series.items()]
    if len(named) <= MAX_SERIES:
        return [(name, counts) for name, counts in named]
    by_total = sorted(range(len(named)), key=lambda i: -sum(named[i][1]))
    keep = set(by_total[: MAX_SERIES - 1])
    kept: list[tuple[str, Sequence[int]]] = [named[i] for i in range(len(named)) if i in keep]
    rest = [named[i][1] for i in range(len(named)) if i not in keep]
    kept.append((OTHER, [sum(column) for column in zip(*rest, strict=True)]))
    return kept


def _fold_rows(items: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    rows = sorted(((str(label), max(0, int(count))) for label, count in items), key=lambda r: -r[1])
    if len(rows) <= MAX_ROWS:
        return rows
    head = rows[: MAX_ROWS - 1]
    return [*head, (OTHER, sum(count for _, count in rows[MAX_ROWS - 1 :]))]


def _downsample(values: list[int], limit: int) -> list[int]:
    if len(values) <= limit:
        return values
    size = math.ceil(len(values) / limit)
    return [sum(values[i : i + size]) for i in range(0, len(values), size)]


def _axis(left: int, top: int, plot_w: int, plot_h: int, peak: int) -> str:
    base = top + plot_h
    return (
        f'<path class="chart-axis" d="M{left} {top}V{base}H{left + plot_w}" fill="none" '
        f'stroke="{OTHER_COLOUR}"/>'
        f'<text class="chart-tick" x="{left - 4}" y="{top + 8}" text-anchor="end" {_FONT} '
        f'fill="currentColor">{_short(peak)}</text>'
        f'<text class="chart-tick" x="{left - 4}" y="{base}" text-anchor="end" {_FONT} '
        f'fill="currentColor">0</text>'
    )


def _short(count: int) -> str:
    for size, suffix in ((1_000_000_000, "G"), (1_000_000, "M"), (10_000, "k")):
        if count >= size:
            return f"{count / size:.3g}{suffix}"
    return f"{count:,}"


def _spacing(buckets: Sequence[int]) -> tuple[int, int]:
    """(first bucket, hours between buckets): 24 for daily buckets, 1 for hourly ones."""
    ordered = sorted(set(buckets))
    base = 0
    for before, after in itertools.pairwise(ordered):
        base = math.gcd(base, after - before)
    return (ordered[0] if ordered else 0), max(base, 1)


def _hour_label(bucket: int, step: int) -> str:
    start = datetime.fromtimestamp(bucket * _HOUR, UTC)
    last = datetime.fromtimestamp((bucket + step - 1) * _HOUR, UTC)
    if step % 24 == 0 and bucket % 24 == 0:
        if step == 24:
            return f"{start:%Y-%m-%d} UTC"
        return f"{start:%Y-%m-%d} to {last:%Y-%m-%d} UTC"
    if step == 1:
        return f"{start:%Y-%m-%d %H:00} UTC"
    return f"{start:%Y-%m-%d %H:00} to {last:%Y-%m-%d %H:59} UTC"


def _time_ticks(first: int, step: int, count: int, left: int, bar_w: float, y: float) -> str:
    """About six labels under the bars: hours within a day, dates beyond."""
    span_hours = count * step
    every = max(1, math.ceil(count / 6))
    ticks = []
    for column in range(0, count, every):
        moment = datetime.fromtimestamp((first + column * step) * _HOUR, UTC)
        if span_hours <= 24:
            text = f"{moment:%H:00}"
        elif step % 24 == 0:
            text = f"{moment:%d %b}"
        else:
            text = f"{moment:%d %b %H:00}"
        ticks.append(
            f'<text class="chart-tick" x="{_n(left + column * bar_w)}" y="{y:g}" {_FONT} '
            f'fill="currentColor">{text}</text>'
        )
    return "".join(ticks)


def _legend(names: Sequence[str], width: int, top: int) -> tuple[str, int]:
    """Swatch and name per series, wrapped into rows; returns the markup and its height."""
    if not names:
        return "", 0
    parts, x, row = [], 0.0, 0
    for index, name in enumerate(names):
        label = _text(name, 24)
        # Roughly 6.5 px per character at 11 px sans-serif; only used to wrap rows.
        entry_w = 16 + 6.5 * len(str(label.unescape())) + 12
        if x and x + entry_w > width:
            x, row = 0.0, row + 1
        y = top + 4 + row * 16
        colour = OTHER_COLOUR if name == OTHER and index >= MAX_SERIES - 1 else PALETTE[index]
        parts.append(
            f'<g class="chart-legend"><rect x="{x:.1f}" y="{y}" width="10" height="10" '
            f'fill="{colour}" class="chart-s{index}"/><text x="{x + 14:.1f}" y="{y + 9}" '
            f'{_FONT} fill="currentColor">{label}</text></g>'
        )
        x += entry_w
    return "".join(parts), 8 + (row + 1) * 16
