"""The schema files: valid JSON Schema, accepted by real browser reports, strict where they say."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest

from reporting_endpoint.validation import ENVELOPE_SCHEMA, ReportValidator, load_schemas
from tests.conftest import captured_reports, crash_report

SCHEMAS = load_schemas()
VALIDATOR = ReportValidator(SCHEMAS)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema_files_are_valid_draft_2020_12(name: str) -> None:
    schema = SCHEMAS[name]
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("fixture", ["crash-pagecrash", "oom", "preflight", "deprecation", "csp"])
def test_reports_real_chromium_sent_are_valid(fixture: str) -> None:
    reports = captured_reports(fixture)
    assert reports
    for report in reports:
        assert VALIDATOR.check(report) is None, report


def _body(**body: Any) -> dict[str, Any]:
    return crash_report(body=body)


ACCEPTED = [
    _body(),
    _body(reason="oom"),
    _body(reason="unresponsive", stack="at busy (page.js:3:1)"),
    _body(reason=None),
    _body(is_top_level="true"),
    _body(is_top_level="false"),
    _body(page_visibility="hidden"),
    _body(crash_report_api={"build": "1.2.3"}),
    _body(future_key={"anything": [1, 2]}),
    crash_report(age=30 * 24 * 3600 * 1000),
    crash_report(type="network-error", body={"phase": "dns", "type": "dns.name_not_resolved"}),
    crash_report(type="some-future-type", body={}),
]


@pytest.mark.parametrize("report", ACCEPTED)
def test_accepted(report: dict[str, Any]) -> None:
    assert VALIDATOR.check(report) is None


REJECTED = [
    ([1], "not_an_object", ""),
    ({k: v for k, v in crash_report().items() if k != "age"}, "missing_field", "age"),
    ({k: v for k, v in crash_report().items() if k != "body"}, "missing_field", "body"),
    (crash_report(age=-1), "invalid_field", "age"),
    (crash_report(age=1.5), "invalid_field", "age"),
    (crash_report(age="13"), "invalid_field", "age"),
    (crash_report(type=""), "invalid_field", "type"),
    (crash_report(url=None), "invalid_field", "url"),
    (crash_report(user_agent=5), "invalid_field", "user_agent"),
    (crash_report(body=[]), "invalid_field", "body"),
    (crash_report(age=30 * 24 * 3600 * 1000 + 1), "invalid_field", "age"),
    (crash_report(age=2**53 - 1), "invalid_field", "age"),
    (_body(reason="segfault"), "invalid_field", "body.reason"),
    (_body(reason=5), "invalid_field", "body.reason"),
    (_body(stack=["frame"]), "invalid_field", "body.stack"),
    (_body(is_top_level="yes"), "invalid_field", "body.is_top_level"),
    (_body(visibility_state="prerender"), "invalid_field", "body.visibility_state"),
    (_body(page_visibility=True), "invalid_field", "body.page_visibility"),
    (_body(crash_report_api={"n": 1}), "invalid_field", "body.crash_report_api.n"),
]


@pytest.mark.parametrize(("report", "code", "field"), REJECTED)
def test_rejected_with_code_and_field(report: Any, code: str, field: str) -> None:
    problem = VALIDATOR.check(report)
    assert problem is not None
    assert (problem.code, problem.field) == (code, field)
    assert problem.message


@pytest.mark.parametrize("report", [r for r, _, _ in REJECTED if isinstance(r, dict)] + ACCEPTED)
def test_compiled_validator_agrees_with_jsonschema(report: dict[str, Any]) -> None:
    """jsonschema-rs is only a faster reading of the same files: same verdict as jsonschema."""
    envelope = jsonschema.Draft202012Validator(SCHEMAS[ENVELOPE_SCHEMA])
    valid = envelope.is_valid(report)
    if valid and report["type"] == "crash":
        valid = jsonschema.Draft202012Validator(SCHEMAS["crash.schema.json"]).is_valid(
            report["body"]
        )
    assert valid == (VALIDATOR.check(report) is None)


def test_messages_are_bounded_whatever_the_value_quoted() -> None:
    """jsonschema-rs quotes the bad value; the message goes into the answer and quarantine."""
    problem = VALIDATOR.check(crash_report(body=["x" * 100_000]))
    assert problem is not None
    assert (problem.code, problem.field) == ("invalid_field", "body")
    assert 0 < len(problem.message) <= 300
