"""The pure triage workflow: release order, what new events do to a status, manual changes."""

from __future__ import annotations

import pytest

from reporting_endpoint.issues.triage import (
    IssueState,
    StatusChange,
    after_events,
    change_status,
    release_newer,
)

NOW = 1_700_000_000_000


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("1.10", "1.9"),
        ("1.3", "1.2"),
        ("2.0", "2.0rc1"),
        ("1.2.1", "1.2"),
        ("build-1043", "build-998"),  # not PEP 440: natural order of digit runs
        ("2024.11.3-hotfix", "2024.11.2-hotfix"),
        ("v2", "v1.9"),
    ],
)
def test_release_newer(a: str, b: str) -> None:
    assert release_newer(a, b)
    assert not release_newer(b, a)


@pytest.mark.parametrize(("a", "b"), [("1.2", "1.2"), ("1.2", "1.2.0"), ("abc", "abc")])
def test_equal_releases_are_not_newer(a: str, b: str) -> None:
    assert not release_newer(a, b)
    assert not release_newer(b, a)


def test_mixed_words_and_numbers_never_raise() -> None:
    # A release is attacker-controlled text: any two must compare.
    for a, b in [("x", "1"), ("1.x", "1.2"), ("", "1"), ("ünï", "1.0")]:
        assert isinstance(release_newer(a, b), bool)


def test_events_count_and_keep_unresolved() -> None:
    state, reason = after_events(IssueState("unresolved", event_count=3), 4, [None], NOW)
    assert state == IssueState("unresolved", event_count=7)
    assert reason is None


def test_resolved_then_any_event_regresses() -> None:
    state, reason = after_events(IssueState("resolved", event_count=1), 1, [None], NOW)
    assert state.status == "regressed"
    assert state.event_count == 2
    assert reason


def test_resolved_in_release_only_newer_releases_regress() -> None:
    resolved = IssueState("resolved", resolved_in_release="1.2", event_count=10)
    older, reason = after_events(resolved, 1, ["1.1"], NOW)
    assert (older.status, older.event_count, reason) == ("resolved", 11, None)
    same, _ = after_events(resolved, 1, ["1.2"], NOW)
    assert same.status == "resolved"
    unknown, _ = after_events(resolved, 1, [None], NOW)
    assert unknown.status == "resolved"  # an event without a release says nothing
    newer, reason = after_events(resolved, 2, ["1.1", "1.3"], NOW)
    assert newer.status == "regressed"
    assert reason is not None and "1.3" in reason


def test_ignored_until_count() -> None:
    ignored = change_status(
        IssueState("unresolved", event_count=10),
        StatusChange("ignored", "ann", ignore_more_events=5),
        NOW,
    )
    assert ignored == IssueState("ignored", None, None, 15, 10)
    state, reason = after_events(ignored, 4, [None], NOW)
    assert (state.status, reason) == ("ignored", None)
    state, reason = after_events(state, 1, [None], NOW)
    assert state.status == "unresolved"
    assert state.ignore_until_count is None
    assert reason


def test_ignored_until_time_and_forever() -> None:
    until = IssueState("ignored", ignore_until_ms=NOW + 1000, event_count=1)
    assert after_events(until, 1, [None], NOW)[0].status == "ignored"
    assert after_events(until, 1, [None], NOW + 1000)[0].status == "unresolved"
    forever = IssueState("ignored", event_count=1)
    assert after_events(forever, 10**6, [None], NOW + 10**12)[0].status == "ignored"


def test_no_events_change_nothing() -> None:
    state = IssueState("resolved", event_count=1)
    assert after_events(state, 0, [], NOW) == (state, None)


def test_manual_changes() -> None:
    state = IssueState("regressed", event_count=4)
    resolved = change_status(state, StatusChange("resolved", "a", resolved_in_release="2.0"), NOW)
    assert resolved == IssueState("resolved", "2.0", None, None, 4)
    reopened = change_status(resolved, StatusChange("unresolved", "a", "not fixed"), NOW)
    assert reopened == IssueState("unresolved", None, None, None, 4)
    ignored = change_status(reopened, StatusChange("ignored", "a", ignore_until_ms=NOW + 5), NOW)
    assert ignored == IssueState("ignored", None, NOW + 5, None, 4)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"status": "unresolved", "resolved_in_release": "1.0"},
        {"status": "resolved", "ignore_more_events": 3},
        {"status": "ignored", "ignore_more_events": 0},
        {"status": "regressed"},
    ],
)
def test_inconsistent_changes_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        StatusChange(actor="a", **kwargs)  # type: ignore[arg-type]
