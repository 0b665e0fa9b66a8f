-- Alerts (README "Alerts"). alert_events: what became true in an ingest transaction (a new
-- issue, a regression), one small row each, written in that transaction and consumed (deleted)
-- by the evaluator outside the ingest path, in the transaction that queues its alerts.
CREATE TABLE alert_events (
    id       INTEGER PRIMARY KEY,
    issue_id INTEGER NOT NULL,
    trigger  TEXT    NOT NULL,                -- new_issue | regressed
    at       INTEGER NOT NULL                 -- ms since the Unix epoch, UTC
);

-- The outbox: one row per alert and channel, delivered at least once by a sender.
CREATE TABLE alert_outbox (
    id              INTEGER PRIMARY KEY,
    idempotency_key TEXT    NOT NULL UNIQUE,
    rule            TEXT    NOT NULL,
    channel         TEXT    NOT NULL,
    trigger         TEXT    NOT NULL,
    issue_id        INTEGER,
    payload         TEXT    NOT NULL,         -- the alert as JSON (channel-neutral)
    created_at      INTEGER NOT NULL,
    status          TEXT    NOT NULL DEFAULT 'pending',   -- pending | delivered | failed
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    lease_owner     TEXT,
    lease_until     INTEGER,
    finished_at     INTEGER,
    last_error      TEXT
);

CREATE INDEX alert_outbox_due ON alert_outbox (status, next_attempt_at);

-- One row per delivery attempt (the delivery log).
CREATE TABLE alert_deliveries (
    id          INTEGER PRIMARY KEY,
    outbox_id   INTEGER NOT NULL,
    attempt     INTEGER NOT NULL,
    at          INTEGER NOT NULL,
    outcome     TEXT    NOT NULL,             -- delivered | retry | failed
    status_code INTEGER,
    error       TEXT,
    duration_ms INTEGER NOT NULL
);

CREATE INDEX alert_deliveries_outbox ON alert_deliveries (outbox_id, id);

-- Per rule and scope (an issue, a type, a day): no alert of the rule before until_ms.
CREATE TABLE alert_throttle (
    rule     TEXT    NOT NULL,
    scope    TEXT    NOT NULL,
    until_ms INTEGER NOT NULL,
    PRIMARY KEY (rule, scope)
) WITHOUT ROWID;
