-- Reports refused at ingest (schema, nesting, ...), kept for an operator to inspect: a browser
-- deletes a report once it gets a 200, so without this a refusal leaves no trace. Bounded: the
-- writer trims the oldest rows past `quarantine_max_rows`.
CREATE TABLE quarantine (
    id          INTEGER PRIMARY KEY,
    received_at INTEGER NOT NULL,  -- ms since the Unix epoch, UTC
    code        TEXT NOT NULL,     -- the rejection code sent in the 200 summary
    field       TEXT NOT NULL,     -- the offending field ('' for the whole report)
    message     TEXT NOT NULL,
    type        TEXT,              -- the report's own type, when it had a string one
    raw         TEXT NOT NULL,     -- the report's JSON as sent (url stripped), maybe cut short
    truncated   INTEGER NOT NULL DEFAULT 0
);

CREATE INDEX quarantine_received ON quarantine (received_at, id);
CREATE INDEX quarantine_code ON quarantine (code);
