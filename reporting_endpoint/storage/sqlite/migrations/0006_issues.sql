-- Issues (issue 11): every report and parsed crash with a fingerprint belongs to one issue.
-- The counters below are kept in the transaction that inserts (or deletes) the events, so the
-- issues page reads O(issues in the window), never the reports.
CREATE TABLE issues (
    id                  INTEGER PRIMARY KEY,
    fingerprint         TEXT    NOT NULL UNIQUE,
    kind                TEXT    NOT NULL,              -- the report type, or 'native'
    title               TEXT    NOT NULL,
    site                TEXT,
    status              TEXT    NOT NULL DEFAULT 'unresolved',
    resolved_in_release TEXT,
    ignore_until_ms     INTEGER,
    ignore_until_count  INTEGER,
    event_count         INTEGER NOT NULL DEFAULT 0,    -- all time
    first_seen          INTEGER NOT NULL,              -- ms since the Unix epoch, UTC
    last_seen           INTEGER NOT NULL,
    first_release       TEXT,                          -- the oldest release seen (version order)
    last_release        TEXT,                          -- the newest release seen
    created_at          INTEGER NOT NULL,
    status_changed_at   INTEGER
);

-- No index on the sort columns: every group of inserts updates them (an index each would be
-- rewritten each time), and the issues page sorts the issues of its window in memory anyway.

CREATE TABLE issue_hourly (
    issue_id INTEGER NOT NULL,
    hour     INTEGER NOT NULL,                         -- received_at / 3600000
    count    INTEGER NOT NULL,
    PRIMARY KEY (issue_id, hour)
) WITHOUT ROWID;

-- No index by hour: every insert group changes a count per issue, and a covering index would
-- be rewritten each time. The issues page reads a primary-key range per issue seen lately.

CREATE TABLE issue_breakdown (
    issue_id  INTEGER NOT NULL,
    dimension TEXT    NOT NULL,   -- browser, browser_major, os, release, path, visibility_state, is_top_level
    value     TEXT    NOT NULL,   -- at most 200 characters
    count     INTEGER NOT NULL,
    PRIMARY KEY (issue_id, dimension, value)
) WITHOUT ROWID;

-- The release / browser / os filters of the issues page probe the primary key per issue;
-- no second index, so that the thousands of counter upserts per group touch one b-tree.

CREATE TABLE issue_history (
    id                  INTEGER PRIMARY KEY,
    issue_id            INTEGER NOT NULL,
    at                  INTEGER NOT NULL,
    actor               TEXT    NOT NULL,
    from_status         TEXT,
    to_status           TEXT    NOT NULL,
    reason              TEXT    NOT NULL DEFAULT '',
    resolved_in_release TEXT
);

CREATE INDEX issue_history_issue ON issue_history (issue_id, id);

-- Events written before this migration have no issue until `regroup` assigns them one.
ALTER TABLE reports ADD COLUMN fingerprint TEXT;
ALTER TABLE reports ADD COLUMN issue_id INTEGER;
ALTER TABLE reports ADD COLUMN release TEXT;
CREATE INDEX reports_issue ON reports (issue_id, received_at, id);

ALTER TABLE crashes ADD COLUMN fingerprint TEXT;
ALTER TABLE crashes ADD COLUMN issue_id INTEGER;
ALTER TABLE crashes ADD COLUMN release TEXT;
CREATE INDEX crashes_issue ON crashes (issue_id, received_at, id);
