"""Alert rules as data: the file format, the errors that stop a start, the default rules of
``webhook_url``, and the webhook signature receivers check."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reporting_endpoint.alerts.rules import (
    AlertConfig,
    AlertRulesError,
    EmailChannel,
    Filter,
    SlackChannel,
    WebhookChannel,
)
from reporting_endpoint.alerts.signing import sign, verify
from reporting_endpoint.app import create_app
from reporting_endpoint.settings import Settings, SettingsError

FULL = """
[delivery]
retry_initial = "10s"
max_attempts = 5

[channels.ops]
type = "webhook"
url = "https://hooks.example.com/crashes"
secret_env = "OPS_SECRET"

[channels.chat]
type = "slack"
url = "https://hooks.slack.com/services/T/B/X"

[channels.mail]
type = "email"
host = "smtp.example.com"
username = "alerts"
password_env = "SMTP_PASSWORD"
from = "alerts@example.com"
to = "oncall@example.com"

[[rule]]
name = "new-oom"
trigger = "new_issue"
channels = ["ops", "chat", "mail"]
filter = { kind = "crash", reason = ["oom", "unresponsive"] }

[[rule]]
name = "storm"
trigger = "threshold"
events = 1000
window = "1h"
throttle = "6h"
channels = ["chat"]

[[rule]]
name = "csp-surge"
trigger = "rate"
filter = { kind = "csp-violation" }
factor = 5
baseline = "7d"
channels = ["chat"]

[[rule]]
name = "daily"
trigger = "digest"
at = "08:30"
channels = ["mail"]
"""
ENV = {"OPS_SECRET": "s3cret", "SMTP_PASSWORD": "hunter2"}


def load(tmp_path: Path, text: str, name: str = "alerts.toml") -> AlertConfig:
    path = tmp_path / name
    path.write_text(text)
    return AlertConfig.load(path, ENV)


def test_a_full_rules_file(tmp_path: Path) -> None:
    config = load(tmp_path, FULL)
    assert [(r.name, r.trigger) for r in config.rules] == [
        ("new-oom", "new_issue"),
        ("storm", "threshold"),
        ("csp-surge", "rate"),
        ("daily", "digest"),
    ]
    new, storm, surge, daily = config.rules
    assert new.filter == Filter(kind=("crash",), reason=("oom", "unresponsive"))
    assert (storm.events, storm.window_hours, storm.throttle_ms) == (1000, 1, 6 * 3_600_000)
    assert (surge.factor, surge.baseline_hours) == (5.0, 168)
    assert daily.digest_minute == 8 * 60 + 30
    assert config.channel("ops") == WebhookChannel(
        "ops", "https://hooks.example.com/crashes", "s3cret"
    )
    assert isinstance(config.channel("chat"), SlackChannel)
    mail = config.channel("mail")
    assert isinstance(mail, EmailChannel)
    assert (mail.port, mail.security, mail.password, mail.recipients) == (
        587, "starttls", "hunter2", ("oncall@example.com",),
    )  # fmt: skip
    assert (config.delivery.retry_initial_ms, config.delivery.max_attempts) == (10_000, 5)
    # Secrets stay out of reprs (logs, tracebacks).
    assert "s3cret" not in repr(config) and "hunter2" not in repr(config)
    assert "T/B/X" not in repr(config)


def test_json_is_the_same_document(tmp_path: Path) -> None:
    data = {
        "channels": {"hook": {"type": "webhook", "url": "http://127.0.0.1:9/h"}},
        "rule": [{"name": "n", "trigger": "new_issue", "channels": ["hook"]}],
    }
    config = load(tmp_path, json.dumps(data), "alerts.json")
    assert [r.name for r in config.rules] == ["n"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[rule]]\nname = 'x'\ntrigger = 'new_isue'\nchannels = ['c']",
         'rule 1 ("x"): trigger: must be one of new_issue, regressed, threshold, rate, digest'),
        ("[[rule]]\ntrigger = 'new_issue'\nchannels = ['nowhere']",
         "rule 1: channels: no channel named 'nowhere'"),
        ("[[rule]]\nname = 's'\ntrigger = 'threshold'\nchannels = ['c']",
         'rule 1 ("s"): events: a threshold rule needs events (more than N)'),
        ("[[rule]]\nname = 's'\ntrigger = 'threshold'\nevents = -3\nchannels = ['c']",
         'rule 1 ("s"): events: must be a positive integer'),
        ("[[rule]]\ntrigger = 'threshold'\nevents = 5\nwindow = '90m'\nchannels = ['c']",
         "rule 1: window: must be whole hours, 1h to 168h (counts are hourly)"),
        ("[[rule]]\ntrigger = 'rate'\nfactor = 3\nchannels = ['c']",
         "rule 1: filter: kind: a rate rule names the report types it watches"),
        ("[[rule]]\ntrigger = 'new_issue'\nevents = 5\nchannels = ['c']",
         "rule 1: events: not a key of a new_issue rule"),
        ("[[rule]]\ntrigger = 'new_issue'\nchannels = ['c']\nfilter = { browser = 'x' }",
         "rule 1: filter: unknown key 'browser'"),
        ("[[rule]]\ntrigger = 'digest'\nat = '25:00'\nchannels = ['c']",
         "rule 1: at: must be a UTC time of day like 09:00"),
        ("[[rule]]\ntrigger = 'new_issue'\nthrottle = 'soon'\nchannels = ['c']",
         "rule 1: throttle: must be a duration like 30s, 5m, 1h or a number of seconds"),
        ("[channels.c]\ntype = 'pager'\n[[rule]]\ntrigger = 'new_issue'\nchannels = ['c']",
         "channel 'c': type: must be webhook, slack or email"),
        ("[channels.c]\ntype = 'webhook'\nurl = 'ftp://x'\n"
         "[[rule]]\ntrigger = 'new_issue'\nchannels = ['c']",
         "channel 'c': url: must be an http:// or https:// URL"),
        ("[channels.c]\ntype = 'webhook'\nurl = 'http://x'\nsecret_env = 'NOT_SET_ANYWHERE'\n"
         "[[rule]]\ntrigger = 'new_issue'\nchannels = ['c']",
         "channel 'c': secret_env: the environment variable NOT_SET_ANYWHERE is not set"),
        ("[channels.c]\ntype = 'email'\nhost = 'h'\nfrom = 'a@b'\nto = []\n"
         "[[rule]]\ntrigger = 'new_issue'\nchannels = ['c']",
         "channel 'c': to: must be 1..50 email addresses"),
        ("[delivery]\nretry_initial = 0\n[[rule]]\ntrigger = 'new_issue'\nchannels = ['c']",
         "delivery: retry_initial: must be positive"),
        ("[[rule]]\nname = 'a'\ntrigger = 'new_issue'\nchannels = ['c']\n"
         "[[rule]]\nname = 'a'\ntrigger = 'regressed'\nchannels = ['c']",
         "rule 2 (\"a\"): name: another rule has the name 'a'"),
        ("rules = 1", "unknown key 'rules'"),
        ("[[rule]\n", "not valid TOML"),
    ],
)  # fmt: skip
def test_errors_name_the_file_the_rule_and_the_problem(
    tmp_path: Path, text: str, message: str
) -> None:
    channel = "" if "[channels.c]" in text else "[channels.c]\ntype = 'slack'\nurl = 'http://x'\n"
    path = tmp_path / "alerts.toml"
    # Channels go before the rules (a TOML table after [[rule]] would belong to the rule).
    path.write_text(channel + text if "[[rule]" in text and channel else text)
    with pytest.raises(AlertRulesError) as caught:
        AlertConfig.load(path, ENV)
    assert str(caught.value).startswith(f"{path}: ")
    assert message in str(caught.value)


def test_a_bad_rules_file_stops_the_service_at_start(tmp_path: Path) -> None:
    bad = tmp_path / "alerts.toml"
    bad.write_text("[[rule]]\nname = 'x'\ntrigger = 'sometimes'\nchannels = []\n")
    settings = Settings(db=tmp_path / "r.sqlite3", alert_rules=bad)
    with pytest.raises(SettingsError, match=r'alert_rules: .*alerts.toml: rule 1 \("x"\): trigger'):
        create_app(settings)
    # `serve` says the same and exits with status 2, before it opens anything.
    result = subprocess.run(
        [sys.executable, "-m", "reporting_endpoint", "serve", "--db", str(tmp_path / "s.db"),
         "--alert-rules", str(bad)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert 'rule 1 ("x"): trigger: must be one of' in result.stderr
    assert not (tmp_path / "s.db").exists()


def test_webhook_url_alone_switches_on_the_default_rules(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {
            "REPORTING_ENDPOINT_WEBHOOK_URL": "https://hooks.example.com/x",
            "REPORTING_ENDPOINT_WEBHOOK_SECRET": "k",
        }
    )
    config = settings.alert_config()
    assert [(r.name, r.trigger, r.channels) for r in config.rules] == [
        ("new-issue", "new_issue", ("webhook",)),
        ("regression", "regressed", ("webhook",)),
    ]
    assert config.channels == (WebhookChannel("webhook", "https://hooks.example.com/x", "k"),)
    assert "'k'" not in repr(settings)
    assert Settings().alert_config().rules == ()
    # A rules file can name that channel.
    path = tmp_path / "alerts.toml"
    path.write_text("[[rule]]\ntrigger = 'regressed'\nchannels = ['webhook']\n")
    both = settings.replace(alert_rules=path).alert_config()
    assert [r.trigger for r in both.rules] == ["regressed"]
    with pytest.raises(SettingsError, match="webhook_url must be an http"):
        Settings(webhook_url="hooks.example.com")
    with pytest.raises(SettingsError, match="webhook_secret goes with webhook_url"):
        Settings(webhook_secret="k")
    with pytest.raises(SettingsError, match="public_url must be an http"):
        Settings(public_url="crashes.example.com")


def test_the_signature_receivers_check() -> None:
    body = b'{"idempotency_key": "k", "title": "New issue"}'
    now = int(time.time())
    header = sign("secret", body, now)
    assert header.startswith(f"t={now},v1=")
    assert verify("secret", body, header)
    assert not verify("secret", body + b" ", header)  # the body changed
    assert not verify("other", body, header)  # another key
    assert not verify("secret", body, header, now=now + 301)  # replayed too late
    assert verify("secret", body, header, now=now + 299)
    assert not verify("secret", body, header, now=now - 301)  # from the future
    assert not verify("secret", body, "v1=abc")  # no time
    assert not verify("secret", body, "t=x,v1=abc")
    forged = header.replace(f"t={now}", f"t={now + 1}")  # the time is signed too
    assert not verify("secret", body, forged)


def test_messages_escape_what_reports_control() -> None:
    """Titles come from reports: they cannot make a Slack link or mention, nor a mail header."""
    from reporting_endpoint.alerts.channels import email_message, slack_message

    alert = {
        "title": "New issue: <https://evil.example|click> & <!channel>\r\nBcc: victim@example.com",
        "text": "crash",
        "link": "https://crashes.example.com/dashboard/issues/7",
    }
    text = slack_message(alert)["text"]
    assert "<https://evil" not in text and "<!channel>" not in text
    assert "&lt;https://evil.example|click&gt; &amp; &lt;!channel&gt;" in text
    assert text.endswith(
        "<https://crashes.example.com/dashboard/issues/7|Open the issue in the dashboard>"
    )
    channel = EmailChannel("m", "smtp.example.com", 25, "a@example.com", ("b@example.com",))
    mail = email_message(channel, alert, "key-1")
    assert "\n" not in mail["Subject"] and mail["Bcc"] is None
    assert mail["Message-ID"] == "<key-1@reporting-endpoint>"
    assert "https://crashes.example.com/dashboard/issues/7" in mail.get_content()
    without_link = {**alert, "link": None, "path": "/dashboard/issues/7"}
    assert "Dashboard: /dashboard/issues/7" in slack_message(without_link)["text"]
    assert (
        "/dashboard/issues/7 (set public_url for a link)"
        in email_message(channel, without_link, "k").get_content()
    )
