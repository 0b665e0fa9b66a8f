"""Fingerprint rules files: validation errors that name the rule, precedence, matching."""

from __future__ import annotations

import json
import textwrap
import tomllib
from pathlib import Path
from typing import Any

import pytest

from reporting_endpoint.issues.fingerprint import crash_fingerprint, report_fingerprint
from reporting_endpoint.issues.rules import RulesError, RuleSet
from reporting_endpoint.minidump import parse_dump
from reporting_endpoint.records import NewCrash, NewReport
from reporting_endpoint.reports import normalise
from tests.conftest import captured_reports

DUMPS = Path(__file__).parent / "fixtures" / "minidumps"
NOW = 1_764_370_000_000


def stored(report: dict[str, Any]) -> NewReport:
    return normalise(report, NOW, keep_query=False)


def of_type(name: str, kind: str) -> list[dict[str, Any]]:
    return [r for r in captured_reports(name) if r["type"] == kind]


def electron_crash(**overrides: Any) -> NewCrash:
    # The fields Electron's crashReporter sent in fixtures/crashpad/b_.../headers.json.
    values: dict[str, Any] = {
        "id": "c1",
        "received_at": NOW,
        "product": "ExampleApp",
        "version": "1.2.3",
        "guid": None,
        "platform": "win32",
        "process_type": "browser",
        "electron_version": "33.2.1",
        "annotations": {
            "prod": "Electron",
            "ver": "33.2.1",
            "_productName": "ExampleApp",
            "_version": "1.2.3",
            "platform": "win32",
            "process_type": "browser",
        },
        "query": {},
        "dump_sha256": "0" * 64,
        "dump_size": 1,
        "dump_path": "x",
        "attachments": (),
        "upload_bytes": 1,
    }
    values.update(overrides)
    return NewCrash(**values)


RULES_TOML = """
# 1: every OOM in the checkout is one issue
[[rule]]
name = "checkout-oom"
fixed = "checkout-oom"
title = "OOM in the checkout ({site})"
[rule.match]
type = "crash"
reason = "oom"
url = { glob = "https://127.0.0.1*/page" }

# 2: all crashes of the page, by site only (shadowed by rule 1 for OOMs)
[[rule]]
match = { type = "crash" }
group_by = ["site"]

# 3: deprecations and interventions by feature only, across sites
[[rule]]
match = { type = ["deprecation", "intervention"], body.id = { regex = "^(Unload|Navigator)" } }
group_by = ["type", "body.id"]
title = "{type}: {body.id}"

# 4: native browser-process crashes by signature only
[[rule]]
name = "browser-process"
match = { process_type = "browser", "annotations.prod" = "Electron" }
group_by = ["signature"]
"""


@pytest.fixture
def rules(tmp_path: Path) -> RuleSet:
    path = tmp_path / "rules.toml"
    path.write_text(RULES_TOML)
    return RuleSet.load(path)


def test_first_matching_rule_wins(rules: RuleSet) -> None:
    oom = of_type("oom", "crash")[0]
    fp = rules.report_fingerprint(stored(oom), oom["body"])
    assert (fp.rule, fp.kind, fp.title) == (
        "checkout-oom",
        "crash",
        "OOM in the checkout (https://127.0.0.1)",
    )
    page = of_type("crash-pagecrash", "crash")[0]
    by_site = rules.report_fingerprint(stored(page), page["body"])
    assert by_site.rule == "rule 2"
    # Rule 2 keeps the default title when it has none of its own.
    assert by_site.title == report_fingerprint(stored(page), page["body"]).title
    assert by_site.hash != report_fingerprint(stored(page), page["body"]).hash
    assert by_site != fp


def test_rules_apply_before_defaults_and_unmatched_events_keep_the_default(rules: RuleSet) -> None:
    (csp,) = of_type("csp", "csp-violation")
    assert rules.report_fingerprint(stored(csp), csp["body"]) == report_fingerprint(
        stored(csp), csp["body"]
    )
    deprecations = of_type("deprecation", "deprecation")
    unload = next(r for r in deprecations if r["body"]["id"] == "UnloadHandler")
    xhr = next(r for r in deprecations if r["body"]["id"] != "UnloadHandler")
    fp = rules.report_fingerprint(stored(unload), unload["body"])
    assert (fp.rule, fp.title) == ("rule 3", "deprecation: UnloadHandler")
    # Across sites, unlike the default.
    elsewhere = {**unload, "url": "https://other.example/p"}
    assert rules.report_fingerprint(stored(elsewhere), unload["body"]) == fp
    assert rules.report_fingerprint(stored(xhr), xhr["body"]) == report_fingerprint(
        stored(xhr), xhr["body"]
    )
    (vibrate,) = of_type("deprecation", "intervention")
    assert rules.report_fingerprint(stored(vibrate)).title == "intervention: NavigatorVibrate"


def test_rules_on_native_crashes(rules: RuleSet) -> None:
    signature = parse_dump(DUMPS / "win-x64_electron_node-minidump_windows.dmp").signature
    fp = rules.crash_fingerprint(electron_crash(), signature)
    assert (fp.rule, fp.kind, fp.title) == ("browser-process", "native", signature)
    other_product = rules.crash_fingerprint(electron_crash(product="Other"), signature)
    assert other_product == fp  # group_by signature only
    renderer = electron_crash(process_type="renderer")
    assert rules.crash_fingerprint(renderer, signature) == crash_fingerprint(
        "ExampleApp", signature
    )


def test_no_rules_means_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.toml"
    path.write_text("# nothing yet\n")
    rules = RuleSet.load(path)
    oom = of_type("oom", "crash")[0]
    assert rules.report_fingerprint(stored(oom)) == report_fingerprint(stored(oom), oom["body"])


def test_json_rules_file_and_bare_list(tmp_path: Path) -> None:
    rule = {"match": {"site": "https://127.0.0.1", "body.is_top_level": True}, "fixed": "top"}
    for document in ({"rule": [rule]}, [rule]):
        path = tmp_path / "rules.json"
        path.write_text(json.dumps(document))
        rules = RuleSet.load(path)
        oom = of_type("oom", "crash")[0]
        assert rules.report_fingerprint(stored(oom), oom["body"]).rule == "rule 1"
        not_top = {**oom["body"], "is_top_level": False}
        assert rules.report_fingerprint(stored(oom), not_top).rule is None


def test_conditions_exists_lists_numbers_and_absent_fields() -> None:
    rules = RuleSet.from_data(
        {
            "rule": [
                {"match": {"reason": {"exists": False}, "type": "crash"}, "fixed": "no-reason"},
                {"match": {"body.lineNumber": [5, 6]}, "fixed": "line"},
                {"match": {"path": "/page", "body.nope": "x"}, "fixed": "never"},
            ]
        }
    )
    page = of_type("crash-pagecrash", "crash")[0]
    assert rules.report_fingerprint(stored(page), page["body"]).rule == "rule 1"
    oom = of_type("oom", "crash")[0]
    assert rules.report_fingerprint(stored(oom), oom["body"]).rule is None
    (csp,) = of_type("csp", "csp-violation")
    assert rules.report_fingerprint(stored(csp), csp["body"]).rule == "rule 2"


def test_fixed_fingerprints_do_not_merge_kinds() -> None:
    rules = RuleSet.from_data(
        {"rule": [{"match": {"kind": ["deprecation", "intervention"]}, "fixed": "x"}]}
    )
    reports = captured_reports("deprecation")
    hashes = {(r["type"], rules.report_fingerprint(stored(r)).hash) for r in reports}
    assert len({h for _, h in hashes}) == 2  # one per type
    assert len({t for t, _ in hashes}) == 2


def test_absent_and_empty_group_by_values_differ() -> None:
    rules = RuleSet.from_data({"rule": [{"match": {"type": "crash"}, "group_by": ["body.x"]}]})
    oom = of_type("oom", "crash")[0]
    absent = rules.report_fingerprint(stored(oom), oom["body"])
    empty = rules.report_fingerprint(stored(oom), {**oom["body"], "x": ""})
    assert absent.hash != empty.hash


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"rule": [{}]}, r"rule 1: empty rule"),
        ({"rule": [{"name": "n"}]}, r'rule 1 \("n"\): empty rule'),
        ({"rule": [{"fixed": "x"}]}, r"rule 1: match: missing"),
        ({"rule": [{"match": {}, "fixed": "x"}]}, r"rule 1: match: empty"),
        ({"rule": [{"match": {"type": "crash"}}]}, r"rule 1: needs exactly one of group_by"),
        (
            {"rule": [{"match": {"type": "crash"}, "fixed": "x", "group_by": ["site"]}]},
            r"rule 1: needs exactly one",
        ),
        (
            {
                "rule": [
                    {"match": {"type": "a"}, "fixed": "x"},
                    {"match": {"bdy.id": "x"}, "fixed": "y"},
                ]
            },
            r"rule 2: match: unknown field 'bdy.id'",
        ),
        ({"rule": [{"match": {"body.": "x"}, "fixed": "y"}]}, r"unknown field 'body.'"),
        (
            {"rule": [{"match": {"type": "a"}, "group_by": ["site", "browsr"]}]},
            r"rule 1: group_by: unknown field 'browsr'",
        ),
        (
            {"rule": [{"match": {"type": "a"}, "fixed": "x", "title": "{nope}"}]},
            r"rule 1: title: unknown field 'nope'",
        ),
        (
            {"rule": [{"match": {"url": {"regex": "(unclosed"}}, "fixed": "x"}]},
            r"rule 1: match.url.regex: bad regular expression '\(unclosed'",
        ),
        (
            {"rule": [{"match": {"url": {"like": "x"}}, "fixed": "x"}]},
            r"match.url: unknown operator 'like'",
        ),
        (
            {"rule": [{"match": {"url": {"glob": "a", "regex": "b"}}, "fixed": "x"}]},
            r"match.url: a table needs exactly one",
        ),
        ({"rule": [{"match": {"url": 1.5}, "fixed": "x"}]}, r"match.url: wrong type float"),
        ({"rule": [{"match": {"url": []}, "fixed": "x"}]}, r"match.url: an empty list"),
        ({"rule": [{"match": {"url": [{"a": 1}]}, "fixed": "x"}]}, r"list items must be"),
        (
            {"rule": [{"match": {"url": {"exists": "yes"}}, "fixed": "x"}]},
            r"match.url.exists: must be true or false",
        ),
        ({"rule": [{"match": {"type": "a"}, "fixed": 3}]}, r"rule 1: fixed: must be a non-empty"),
        (
            {"rule": [{"match": {"type": "a"}, "group_by": "site"}]},
            r"group_by: must be a non-empty list",
        ),
        ({"rule": [{"match": {"type": "a"}, "group_by": [3]}]}, r"group_by: a field name must be"),
        ({"rule": [{"match": {"type": "a"}, "fixed": "x", "title": ""}]}, r"title: must be"),
        ({"rule": [{"match": {"type": "a"}, "fixed": "x", "extra": 1}]}, r"unknown key 'extra'"),
        ({"rule": [{"match": ["type"], "fixed": "x"}]}, r"match: must be a table"),
        ({"rule": [{"name": 5, "match": {"type": "a"}, "fixed": "x"}]}, r"name: must be"),
        ({"rule": ["crash"]}, r"rule 1: a rule must be a table"),
        ({"rules": []}, r"unknown top-level key 'rules'"),
        ({"rule": {"match": {}}}, r"'rule' must be a list"),
        (
            {"rule": [{"match": {"type": "crash", "product": "App"}, "fixed": "x"}]},
            r"rule 1: mixes fields of W3C reports and of native crashes",
        ),
        (
            {"rule": [{"match": {"product": "App"}, "group_by": ["site"]}]},
            r"rule 1: mixes fields",
        ),
    ],
)
def test_rules_errors_name_the_rule_and_the_problem(document: Any, message: str) -> None:
    with pytest.raises(RulesError, match=message):
        RuleSet.from_data(document, "rules.toml")


def test_rules_file_errors(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match="cannot read the rules file"):
        RuleSet.load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[rule]\nmatch = 1\n")
    with pytest.raises(RulesError, match=r"bad.toml: not valid TOML"):
        RuleSet.load(bad)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{")
    with pytest.raises(RulesError, match=r"bad.json: not valid JSON"):
        RuleSet.load(bad_json)
    yaml = tmp_path / "rules.yaml"
    yaml.write_text("rule: []")
    with pytest.raises(RulesError, match=r"ends in .toml or .json"):
        RuleSet.load(yaml)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text(
        '[[rule]]\nmatch = { type = "crash" }\nfixed = "x"\n'
        '[[rule]]\nmatch = { url = { regex = "[" } }\nfixed = "y"\n'
    )
    with pytest.raises(RulesError, match=r"wrong.toml: rule 2: match.url.regex: bad regular"):
        RuleSet.load(wrong)


def test_documented_example_loads() -> None:
    # The module docstring's example must stay valid.
    import reporting_endpoint.issues.rules as module

    doc = module.__doc__ or ""
    start = doc.index("TOML (``rules.toml``)::") + len("TOML (``rules.toml``)::")
    example = doc[start : doc.index("JSON (``rules.json``)")]
    rules = RuleSet.from_data(tomllib.loads(textwrap.dedent(example)))
    assert [r.name for r in rules.rules] == ["checkout-oom", "rule 2", "rule 3"]


def test_rule_fingerprints_never_equal_default_ones() -> None:
    from reporting_endpoint.issues.fingerprint import fingerprint_hash

    assert fingerprint_hash("crash", ("a",), source="rule") != fingerprint_hash("crash", ("a",))
    # Moving a rule does not regroup: the hash depends on what it builds, not its position.
    rule = {"match": {"type": "crash"}, "fixed": "x"}
    first = RuleSet.from_data([rule])
    second = RuleSet.from_data([{"match": {"type": "csp-violation"}, "fixed": "y"}, rule])
    oom = of_type("oom", "crash")[0]
    a = first.report_fingerprint(stored(oom), oom["body"])
    b = second.report_fingerprint(stored(oom), oom["body"])
    assert a.hash == b.hash and (a.rule, b.rule) == ("rule 1", "rule 2")


def test_toml_dotted_body_paths_and_nested_members() -> None:
    rules = RuleSet.from_data(
        tomllib.loads(
            """
            [[rule]]
            match = { body.crash_report_api.route = { glob = "/checkout*" } }
            group_by = ["body.crash_report_api.route"]
            title = "crash in {body.crash_report_api.route}"
            """
        )
    )
    (rule,) = rules.rules
    assert [c.field for c in rule.conditions] == ["body.crash_report_api.route"]
    oom = of_type("oom", "crash")[0]
    body = {**oom["body"], "crash_report_api": {"route": "/checkout/pay"}}
    fp = rules.report_fingerprint(stored({**oom, "body": body}), body)
    assert fp.title == "crash in /checkout/pay"
    assert rules.report_fingerprint(stored(oom), oom["body"]).rule is None
