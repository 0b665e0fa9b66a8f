-- Every W3C report as received (raw JSON), plus the columns that queries filter and group on.
CREATE TABLE reports (
    id            INTEGER PRIMARY KEY,
    received_at   INTEGER NOT NULL,  -- ms since the Unix epoch, UTC
    generated_at  INTEGER NOT NULL,  -- received_at - age
    age           INTEGER NOT NULL,
    type          TEXT    NOT NULL,
    url           TEXT    NOT NULL,
    origin        TEXT,
    site          TEXT,
    user_agent    TEXT    NOT NULL,
    browser       TEXT,
    browser_major TEXT,
    os            TEXT,
    reason        TEXT,
    raw           TEXT    NOT NULL
);

CREATE INDEX reports_received ON reports (received_at, id);
