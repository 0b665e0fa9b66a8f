"""Service settings: one frozen dataclass, read from the environment in one place."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reporting_endpoint.alerts.rules import AlertConfig
    from reporting_endpoint.analysis import ProcessingOptions
    from reporting_endpoint.issues.releases import ReleaseSource
    from reporting_endpoint.issues.rules import RuleSet

ENV_PREFIX = "REPORTING_ENDPOINT_"

MiB = 1024 * 1024
GiB = 1024 * MiB
# A signing key shorter than this is guessable offline from one signed cookie.
MIN_SECRET_KEY = 32
# A dashboard session lasts a year at most.
MAX_SESSION_AGE = 366 * 86400
# The data folder when the database is a server and no blob_store folder is named (README).
SERVER_DATA_DIR = Path("reporting-endpoint.data")


class SettingsError(ValueError):
    """A setting has a value the service cannot use."""


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the service can be told; every field is documented in README.md."""

    host: str = "127.0.0.1"
    port: int = 8000
    db: Path = Path("reports.sqlite3")
    # A database URL; beats db when set: a path or sqlite:///path is SQLite.
    database: str | None = None
    # Where dumps and attachments go: unset -> the data folder (beside the SQLite file), a
    # folder path, or s3://bucket/prefix (credentials from the standard AWS_* variables).
    blob_store: str | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    # W3C uploads: Chromium batches at most 100 queued reports, so 1 MiB is generous.
    max_body_bytes: int = 1 * MiB
    max_reports_per_batch: int = 1000
    # Crashpad uploads: the body as sent, the body once gunzipped (a gzip bomb stops here),
    # the number of form parts, and the size of one text part (an annotation).
    crashpad_max_body_bytes: int = 20 * MiB
    crashpad_max_decompressed_bytes: int = 100 * MiB
    crashpad_max_parts: int = 256
    crashpad_max_field_bytes: int = 64 * 1024
    # All text parts of one upload together: a small gzip body must not store megabytes of
    # annotations (255 parts of 64 KiB each fit the other limits).
    crashpad_max_annotation_bytes: int = 256 * 1024
    # Reports waiting for the writer; past this the endpoint answers 503 + Retry-After.
    queue_size: int = 20000
    # How long the writer waits for another process's write lock (e.g. `prune`) before the
    # waiting uploads get 503 + Retry-After; the event loop keeps serving meanwhile.
    write_lock_timeout: float = 30.0
    # Rejected reports kept for inspection (the oldest go first past this many rows).
    quarantine_max_rows: int = 100_000
    # Empty means "*": any page may report here. Otherwise only these origins.
    cors_allow_origins: tuple[str, ...] = ()
    cors_max_age: int = 86400
    # Query strings and fragments often hold personal data, so they are dropped by default.
    keep_url_query: bool = False
    # FULL: a 2xx survives power loss too; NORMAL: survives a process crash only.
    sqlite_synchronous: str = "FULL"
    read_token: str | None = field(default=None, repr=False)
    # Destructive operations (deleting a report or a crash through the API) need this token.
    write_token: str | None = field(default=None, repr=False)
    # Reports older than this many days are deleted by the running service (hourly).
    retention_days: int | None = None
    log_level: str = "info"
    # One log line per request costs about a fifth of the ingest throughput.
    access_log: bool = False
    # `serve` only: connections served at once (past it: 503), seconds to receive a request's
    # headers, seconds to wait for the next chunk of a body, seconds an idle keep-alive lasts.
    limit_concurrency: int = 1000
    # `serve` only: processes on one port, each with its own writer (SQLite serialises their
    # commits on its write lock; PostgreSQL commits them in parallel).
    workers: int = 1
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    timeout_keep_alive: float = 5.0
    # Issues (README "Issues"): a TOML or JSON file of fingerprint rules, tried before the
    # default fingerprints; checked when the service starts (a bad file stops it).
    fingerprint_rules: Path | None = None
    # Where a W3C report's release is read: query:<param>, body:<field> or header:<name>.
    release_source: str | None = None
    # Retries: a report equal to one received before, generated within this many ms of it,
    # is counted once (0 turns retry detection off). Small on purpose: two real crashes of
    # one page a second apart must both count.
    duplicate_tolerance_ms: int = 500
    # How far back (in generation time) received reports are remembered for that test; a
    # browser gives up on a report 15 minutes after it was made.
    duplicate_window_minutes: int = 20
    # Metrics and intake (README "Metrics", "Intake rules: allow-list, sampling, rate limits").
    # Unset: /metrics is open, as Prometheus scrapes it on an internal network; it holds counts
    # only (no site, URL or user agent), but a public service should set it.
    metrics_token: str | None = field(default=None, repr=False)
    # Registrable domains (or URLs, or hosts) whose reports are stored; others are answered
    # 2xx, so browsers do not retry them, and counted, not stored. Empty: every site.
    allowed_sites: tuple[str, ...] = ()
    # type=rate entries, e.g. csp-violation=0.1: the share of that type's reports stored.
    sample_rates: tuple[str, ...] = ()
    # Uploads a minute per client address and endpoint (0: no limit), and how many may come
    # at once after a quiet spell (0: as many as a minute's worth).
    rate_limit_per_minute: int = 0
    rate_limit_burst: int = 0
    # Dashboard (README "Dashboard"): the key that signs session cookies. Unset: one is
    # generated once and kept in the data folder (mode 0600), so every worker on this data
    # folder agrees; several hosts need the same value set here.
    secret_key: str | None = field(default=None, repr=False)
    # Seconds a dashboard session lasts from its login.
    session_max_age: int = 43200
    # Alerts (README "Alerts")
    # A TOML or JSON file of alert rules and channels; checked at start (a bad file stops it).
    alert_rules: Path | None = None
    # Without a rules file: new issues and regressions go to this one webhook, signed with
    # the secret (a rules file can name it as the channel "webhook").
    webhook_url: str | None = None
    webhook_secret: str | None = field(default=None, repr=False)
    # The service's external base URL: alerts link to <public_url>/dashboard/issues/<id>.
    public_url: str | None = None
    # Crash processing (README "Crash processing"): dumps are parsed in this many child
    # processes per serving process (unset: what the machine can spare; 0: this service only
    # stores, and `reporting-endpoint process` parses), fed from the database.
    processors: int | None = None
    # Crashes one claim takes; how long a claim lasts before another processor may take the
    # crash; claims a crash gets before it is marked failed; how often the database is asked
    # for crashes stored by other processes.
    process_batch: int = 8
    process_lease_seconds: float = 300.0
    process_max_attempts: int = 3
    process_poll_seconds: float = 2.0
    # Longest a processor may spend on one step of one crash (parse; walk with symbols, their
    # loading included): past it the parse is failed, the walk kept without symbols.
    process_timeout_seconds: float = 120.0
    # Symbols (README "Symbols"): the largest POST /symbols/upload body (a zip of an Electron
    # release's symbols is hundreds of MiB; a Chromium-sized one a few GiB).
    symbol_upload_max_bytes: int = 2 * GiB
    # Symbol servers asked for a module the store lacks, in order: <base>/<file>/<id>/<name>.
    symbol_servers: tuple[str, ...] = ()
    # What their answers may take on disk (least recently used go first), how long one may
    # stay silent before it counts as a miss, and how long a miss is remembered.
    symbol_cache_bytes: int = 1 * GiB
    symbol_fetch_timeout: float = 20.0
    symbol_negative_cache_seconds: float = 3600.0

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise SettingsError(f"port must be 1..65535, got {self.port}")
        for name in (
            "max_body_bytes",
            "max_reports_per_batch",
            "queue_size",
            "crashpad_max_body_bytes",
            "crashpad_max_decompressed_bytes",
            "crashpad_max_parts",
            "crashpad_max_field_bytes",
            "crashpad_max_annotation_bytes",
            "quarantine_max_rows",
            "limit_concurrency",
            "workers",
            "write_lock_timeout",
            "header_timeout",
            "body_timeout",
            "timeout_keep_alive",
            "process_batch",
            "process_lease_seconds",
            "process_max_attempts",
            "process_poll_seconds",
            "process_timeout_seconds",
            "symbol_upload_max_bytes",
            "symbol_cache_bytes",
            "symbol_fetch_timeout",
        ):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name} must be positive")
        if self.retention_days is not None and self.retention_days < 1:
            raise SettingsError("retention_days must be 1 or more (or unset to keep everything)")
        if self.duplicate_tolerance_ms < 0:
            raise SettingsError("duplicate_tolerance_ms must not be negative (0 turns it off)")
        if self.processors is not None and not 0 <= self.processors <= 256:
            raise SettingsError("processors must be 0..256 (unset: the spare cores)")
        if self.duplicate_window_minutes <= 0:
            raise SettingsError("duplicate_window_minutes must be positive")
        if self.secret_key is not None and len(self.secret_key) < MIN_SECRET_KEY:
            # Never the value itself in the message: it may end up in a log.
            raise SettingsError(
                f"secret_key must be at least {MIN_SECRET_KEY} characters (unset: one is made)"
            )
        if not 60 <= self.session_max_age <= MAX_SESSION_AGE:
            raise SettingsError(f"session_max_age must be 60..{MAX_SESSION_AGE} seconds")
        if self.release_source is not None:
            # Parsed here (pure, cheap) so that a bad value stops the service at start, with
            # the setting's name, wherever the settings come from.
            from reporting_endpoint.issues.releases import ReleaseSource, ReleaseSourceError

            try:
                ReleaseSource.parse(self.release_source)
            except ReleaseSourceError as exc:
                raise SettingsError(f"release_source: {exc}") from None
        if self.cors_max_age < 0:
            raise SettingsError("cors_max_age must not be negative")
        if self.sqlite_synchronous.upper() not in {"FULL", "NORMAL", "EXTRA"}:
            raise SettingsError("sqlite_synchronous must be FULL, NORMAL or EXTRA")
        if self.database is not None and not self.database.strip():
            raise SettingsError("database must not be empty (or unset to use db)")
        if self.blob_store and "://" in self.blob_store:
            scheme, _, rest = self.blob_store.partition("://")
            if scheme != "s3" or not rest.split("/", 1)[0]:
                raise SettingsError("blob_store is a folder path or s3://bucket/prefix")
        self._check_intake()
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise SettingsError("ssl_certfile and ssl_keyfile go together")
        for name in ("webhook_url", "public_url"):
            value = getattr(self, name)
            if value is not None and not _http_url(value):
                raise SettingsError(f"{name} must be an http:// or https:// URL with a host")
        if self.webhook_secret is not None and self.webhook_url is None:
            raise SettingsError("webhook_secret goes with webhook_url")
        for server in self.symbol_servers:
            if not _http_url(server):
                raise SettingsError(
                    f"symbol_servers: {server!r} is not an http:// or https:// URL with a host"
                )
        if self.symbol_negative_cache_seconds < 0:
            raise SettingsError("symbol_negative_cache_seconds must not be negative")

    def _check_intake(self) -> None:
        from reporting_endpoint.intake import IntakeError, allowed_site_hosts, parse_sample_rates

        try:
            allowed_site_hosts(self.allowed_sites)
        except IntakeError as exc:
            raise SettingsError(f"allowed_sites: {exc}") from None
        try:
            parse_sample_rates(self.sample_rates)
        except IntakeError as exc:
            raise SettingsError(f"sample_rates: {exc}") from None
        if self.rate_limit_per_minute < 0 or self.rate_limit_burst < 0:
            raise SettingsError("rate_limit_per_minute and rate_limit_burst must not be negative")
        if self.metrics_token is not None and not self.metrics_token.strip():
            raise SettingsError("metrics_token must not be empty (or unset to leave /metrics open)")

    @property
    def database_url(self) -> str:
        """The database to use: ``database`` when set, else the ``db`` file."""
        return self.database if self.database is not None else str(self.db)

    @property
    def data_dir(self) -> Path:
        """Folder for what is not rows: the blobs (unless ``blob_store`` names another folder
        or a bucket) and uploads in progress. ``<file>.data`` beside a SQLite file; for a
        database server, whose URL names no folder, ``SERVER_DATA_DIR`` in the working
        directory."""
        path = sqlite_file(self.database_url)
        if path is None:
            return SERVER_DATA_DIR
        return path.with_name(path.name + ".data")

    @property
    def release(self) -> ReleaseSource | None:
        """``release_source`` parsed (checked in ``__post_init__``), None when unset."""
        from reporting_endpoint.issues.releases import ReleaseSource

        return None if self.release_source is None else ReleaseSource.parse(self.release_source)

    def fingerprint_rule_set(self) -> RuleSet:
        """The fingerprint rules file read and checked: empty rules when none is set.

        Raises ``SettingsError`` naming the file, the rule and the problem; called once when
        the service starts (it reads a file, so not in ``__post_init__``).
        """
        from reporting_endpoint.issues.rules import RulesError, RuleSet

        if self.fingerprint_rules is None:
            return RuleSet()
        try:
            return RuleSet.load(self.fingerprint_rules)
        except RulesError as exc:
            raise SettingsError(f"fingerprint_rules: {exc}") from None

    def alert_config(self) -> AlertConfig:
        """The alert rules: the ``alert_rules`` file read and checked (its rules may name the
        ``webhook_url`` channel, "webhook"), else the default rules to ``webhook_url``, else
        none. Raises ``SettingsError`` naming the file, the rule and the problem."""
        from reporting_endpoint.alerts.rules import AlertConfig, AlertRulesError

        try:
            default = (
                AlertConfig.default(self.webhook_url, self.webhook_secret)
                if self.webhook_url is not None
                else AlertConfig()
            )
            if self.alert_rules is None:
                return default
            return AlertConfig.load(self.alert_rules, extra=default.channels)
        except AlertRulesError as exc:
            raise SettingsError(f"alert_rules: {exc}") from None

    def processing_options(self) -> ProcessingOptions:
        """How this process processes crashes; ``processors`` unset: the machine's cores less
        the serving processes, shared among them, at least one."""
        from reporting_endpoint.analysis import ProcessingOptions
        from reporting_endpoint.processing import default_processors

        processors = self.processors
        if processors is None:
            processors = default_processors(self.workers)
        return ProcessingOptions(
            processors=processors,
            batch=self.process_batch,
            lease_seconds=self.process_lease_seconds,
            max_attempts=self.process_max_attempts,
            poll_seconds=self.process_poll_seconds,
            timeout_seconds=self.process_timeout_seconds,
        )

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from REPORTING_ENDPOINT_<NAME> variables, then explicit overrides."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _convert(f.name, str(f.type), raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _convert(name: str, type_name: str, raw: str) -> Any:
    try:
        if type_name == "int":
            return int(raw)
        if type_name == "float":
            value = float(raw)
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError(raw)
            return value
        if type_name == "int | None":
            return int(raw) if raw.strip() else None
        if type_name == "bool":
            lowered = raw.strip().lower()
            if lowered in {"1", "true", "yes", "on"}:
                return True
            if lowered in {"0", "false", "no", "off", ""}:
                return False
            raise ValueError(raw)
        if type_name.startswith("Path"):
            return Path(raw) if raw else None
        if type_name.startswith("tuple"):
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        if type_name.startswith("str | None"):
            return raw or None
        return raw
    except ValueError as exc:
        raise SettingsError(f"{ENV_PREFIX}{name.upper()}: cannot use {raw!r}") from exc


def _http_url(value: str) -> bool:
    from urllib.parse import urlsplit

    parts = urlsplit(value)
    return parts.scheme in {"http", "https"} and bool(parts.hostname)


SQLITE_SCHEME = "sqlite://"


def sqlite_file(database: str) -> Path | None:
    """The SQLite file a database setting names (a plain path, or ``sqlite://`` followed by
    the path, so ``sqlite:///var/r.sqlite3`` is ``/var/r.sqlite3``); None for a URL of
    another scheme (a database server)."""
    if database.startswith(SQLITE_SCHEME):
        rest = database[len(SQLITE_SCHEME) :]
        if not rest:
            raise SettingsError("database: sqlite:// needs a path, e.g. sqlite:///var/r.sqlite3")
        return Path(rest)
    if "://" in database:
        return None
    return Path(database)
