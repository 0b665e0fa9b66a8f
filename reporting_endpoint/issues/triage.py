"""The triage workflow of an issue, as pure functions over its state.

An issue is ``unresolved`` when it is created. A person marks it ``resolved`` (optionally "in
release X"), ``ignored`` (until a time, until N more events, or for ever) or reopens it
(``unresolved``). New events move it on by themselves:

- ``resolved`` + a new event -> ``regressed``; when resolved in a release, only an event from a
  newer release regresses it (an older release is a straggler, and an event without a release
  says nothing about which build it came from).
- ``ignored`` -> ``unresolved`` once the time has come or the count of events has reached the
  bound set when it was ignored.

The storage backends call ``after_events`` once per issue per committed group, inside the
insert transaction, so this must stay cheap and must never fail on odd input (a release string
is attacker-controlled data).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from packaging.version import InvalidVersion, Version

Status = Literal["unresolved", "resolved", "ignored", "regressed"]
STATUSES: tuple[Status, ...] = ("unresolved", "resolved", "ignored", "regressed")
# Who changes a status when events do (rather than a person).
SYSTEM_ACTOR = "system"

# A release is compared by its digit runs (numerically) and the text between them.
_RUNS = re.compile(r"\d+|[^\d.\-_+]+")


@dataclass(frozen=True, slots=True)
class IssueState:
    """What triage needs to know about one issue (the storage keeps more)."""

    status: Status
    resolved_in_release: str | None = None
    ignore_until_ms: int | None = None
    ignore_until_count: int | None = None
    event_count: int = 0


@dataclass(frozen=True, slots=True)
class StatusChange:
    """A person's triage decision. ``reopen`` is ``unresolved``.

    ``resolved_in_release`` only goes with ``resolved``; ``ignore_until_ms`` and
    ``ignore_more_events`` only with ``ignored`` (neither: ignored for ever). A change that
    mixes them, or asks for fewer than one more event, is refused with ``ValueError`` when it
    is built, so an API answers 400 before anything is written.
    """

    status: Literal["resolved", "ignored", "unresolved"]
    actor: str
    reason: str = ""
    resolved_in_release: str | None = None
    ignore_until_ms: int | None = None
    ignore_more_events: int | None = None

    def __post_init__(self) -> None:
        if self.status not in ("resolved", "ignored", "unresolved"):
            raise ValueError(f"unknown status: {self.status!r}")
        if self.resolved_in_release is not None and self.status != "resolved":
            raise ValueError("resolved_in_release goes only with status 'resolved'")
        if self.status != "ignored" and (
            self.ignore_until_ms is not None or self.ignore_more_events is not None
        ):
            raise ValueError("ignore_until and ignore_more_events go only with status 'ignored'")
        if self.ignore_more_events is not None and self.ignore_more_events < 1:
            raise ValueError("ignore_more_events must be at least 1")


@functools.lru_cache(maxsize=4096)
def _parsed(release: str) -> Version | None:
    # Cached: a group of events shares few releases, and so do consecutive groups.
    try:
        return Version(release)
    except InvalidVersion:
        return None


def _natural_key(release: str) -> tuple[tuple[int, int, str], ...]:
    # Digit runs compare as numbers ("1.10" after "1.9"), words as lower-case text; a number
    # sorts before a word at the same position, so any two keys compare without a TypeError.
    return tuple(
        (0, int(run), "") if run.isdigit() else (1, 0, run.lower())
        for run in _RUNS.findall(release)
    )


def release_newer(a: str, b: str) -> bool:
    """Whether release ``a`` is newer than release ``b``.

    PEP 440 when both parse (``1.10`` > ``1.9``, ``1.2`` == ``1.2.0``, ``2.0rc1`` < ``2.0``),
    else a natural order of their digit runs and words (``build-1043`` > ``build-998``).
    """
    if a == b:
        return False
    va, vb = _parsed(a), _parsed(b)
    if va is not None and vb is not None:
        return va > vb
    return _natural_key(a) > _natural_key(b)


def after_events(
    state: IssueState, new_events: int, releases: Sequence[str | None], now_ms: int
) -> tuple[IssueState, str | None]:
    """The state after ``new_events`` new events carrying ``releases`` (one per event, or the
    distinct ones: only membership matters), and why the status changed (None: it did not)."""
    if new_events <= 0:
        return state, None
    count = state.event_count + new_events
    if state.status == "resolved":
        fixed_in = state.resolved_in_release
        if fixed_in is None:
            return replace(state, status="regressed", event_count=count), (
                "a new event after it was resolved"
            )
        newer = [r for r in releases if r is not None and release_newer(r, fixed_in)]
        if newer:
            latest = max(newer, key=functools.cmp_to_key(_compare))
            return replace(state, status="regressed", event_count=count), (
                f"an event from release {latest}, newer than {fixed_in} it was resolved in"
            )
        return replace(state, event_count=count), None
    if state.status == "ignored":
        if state.ignore_until_ms is not None and now_ms >= state.ignore_until_ms:
            return _unignored(state, count), "the time it was ignored for is over"
        if state.ignore_until_count is not None and count >= state.ignore_until_count:
            return _unignored(state, count), "the number of events it was ignored for arrived"
    return replace(state, event_count=count), None


def _compare(a: str, b: str) -> int:
    return 1 if release_newer(a, b) else -1 if release_newer(b, a) else 0


def _unignored(state: IssueState, count: int) -> IssueState:
    return IssueState("unresolved", None, None, None, count)


def change_status(state: IssueState, change: StatusChange, now_ms: int) -> IssueState:
    """The state after a person's decision. ``now_ms`` is when it is taken: an ignore whose
    time is already over is still recorded (the next event ends it), so the history shows
    what was asked for."""
    del now_ms  # the decision itself does not depend on the time (see the docstring)
    count = state.event_count
    if change.status == "resolved":
        return IssueState("resolved", change.resolved_in_release, None, None, count)
    if change.status == "ignored":
        until_count = (
            None if change.ignore_more_events is None else count + change.ignore_more_events
        )
        return IssueState("ignored", None, change.ignore_until_ms, until_count, count)
    return IssueState("unresolved", None, None, None, count)
