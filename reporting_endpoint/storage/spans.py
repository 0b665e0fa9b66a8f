"""Which hours of a window come from the hourly counters and which whole days from the daily
ones (completed days before the roll-up mark): the engine-neutral half of the daily roll-up."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

DAY_HOURS = 24
HOUR_MS = 3_600_000
DAY_MS = DAY_HOURS * HOUR_MS
# Hours and days rolled up only once they ended this long ago: most late batches (a commit
# that waited on the write lock) land before the roll-up instead of through its triggers.
ROLL_UP_GRACE_MS = 60_000

# Inclusive ranges (first, last); a range with first > last is empty.
Ranges = tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class Span:
    """The hours [first_hour, last_hour] as read: ``days`` from the daily counters, ``hours``
    (the partial days at the edges, and days not rolled up yet) from the hourly ones."""

    hours: Ranges
    days: Ranges


def span(first_hour: int, last_hour: int, mark_day: int) -> Span:
    """Read days before ``mark_day`` that lie whole inside the hours daily, the rest hourly.
    Only days from 0 on are rolled up (the triggers follow hours from 0 on)."""
    first_day = max(-(-first_hour // DAY_HOURS), 0)
    last_day = min((last_hour + 1) // DAY_HOURS - 1, mark_day - 1)
    if first_day > last_day:
        return Span(((first_hour, last_hour),), ())
    hours = (
        (first_hour, first_day * DAY_HOURS - 1),
        ((last_day + 1) * DAY_HOURS, last_hour),
    )
    return Span(tuple(r for r in hours if r[0] <= r[1]), ((first_day, last_day),))


def merged(ranges: Sequence[tuple[int, int]]) -> Ranges:
    """Ranges sorted, with the adjacent and overlapping ones joined (one index range each)."""
    out: list[tuple[int, int]] = []
    for first, last in sorted(r for r in ranges if r[0] <= r[1]):
        if out and first <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], last))
        else:
            out.append((first, last))
    return tuple(out)


def completed_hour(now_ms: int) -> int:
    """The first hour not complete (with the grace) at ``now_ms``: the roll-up's next mark."""
    return max((now_ms - ROLL_UP_GRACE_MS) // HOUR_MS, 0)


def completed_day(now_ms: int) -> int:
    """The first day not complete (with the grace) at ``now_ms``: the roll-up's next mark."""
    return completed_hour(now_ms) // DAY_HOURS


@dataclass(frozen=True, slots=True)
class Levels:
    """The hours [first_hour, last_hour] of a report window as read: ``days`` from the daily
    roll-up, ``coarse`` hours from the coarse hourly one, ``fine`` hours from the finest."""

    days: Ranges
    coarse: Ranges
    fine: Ranges


def levels(first_hour: int, last_hour: int, mark_day: int, mark_hour: int) -> Levels:
    """Whole days before ``mark_day`` daily, other hours before ``mark_hour`` coarse, the
    rest (the hours not rolled up yet) from the finest table."""
    read = span(first_hour, last_hour, mark_day)
    coarse: list[tuple[int, int]] = []
    fine: list[tuple[int, int]] = []
    floor = max(mark_hour, 0)
    for first, last in read.hours:
        # Only hours from 0 on are rolled up, as for the days.
        coarse.append((max(first, 0), min(last, floor - 1)))
        fine.append((first, min(last, -1)))
        fine.append((max(first, floor), last))
    return Levels(read.days, merged(coarse), merged(fine))


# Hours (and days) a roll-up job moves a mark at most: the first roll-up of a large store (at
# the upgrade) is many short jobs, with the ingest's commits between them, not one long one.
# A day each: a job sums one day of the hourly tables, with the ingest's writes waiting.
MOST_HOURS, MOST_DAYS = DAY_HOURS, 1


def next_mark(mark: int, target: int, first: int | None, most: int) -> int:
    """Where one roll-up job moves a mark towards ``target``: at most ``most`` units past the
    mark, or past ``first``, the first unit with data (None: there is none) when later."""
    if target <= mark:
        return mark
    if first is None:
        return target
    return min(target, max(mark, first) + most)
