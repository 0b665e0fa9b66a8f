-- Events per issue and UTC day (hour / 24), for the completed days only: filled off the ingest
-- path by the roll-up job (storage/sqlite/daily.py), so a long window reads a row per issue and
-- day instead of 24. Days from `daily_mark.day` on are not here yet (read them hourly).
CREATE TABLE issue_daily (
    issue_id INTEGER NOT NULL,
    day      INTEGER NOT NULL,                         -- hour / 24
    count    INTEGER NOT NULL,
    PRIMARY KEY (issue_id, day)
) WITHOUT ROWID;

-- The first day not rolled up: every day before it has its rows, equal to the hourly sums.
-- Anything that changes an hourly count before it (prune, delete, regroup, a late event) keeps
-- the day's row equal through the triggers the roll-up job makes (they hold the mark as a
-- literal, so an event of today stops at their WHEN).
CREATE TABLE daily_mark (
    name TEXT PRIMARY KEY,
    day  INTEGER NOT NULL
) WITHOUT ROWID;

INSERT INTO daily_mark (name, day) VALUES ('issue', 0);

-- The report roll-up of the window questions (top sites, browsers, systems by type and
-- reason) without the origin and user-agent keys that make the hourly table a row per report:
-- completed hours, then completed days, filled off the ingest path by the roll-up job from the
-- hourly table (storage/sqlite/group_days.py). Hours from `daily_mark` 'report_hour' on, and
-- days from 'report_day' on, are not here yet.
CREATE TABLE report_groups_coarse (
    hour       INTEGER NOT NULL,
    type       TEXT NOT NULL,
    site       TEXT NOT NULL,
    browser    TEXT NOT NULL,
    os         TEXT NOT NULL,
    reason     TEXT NOT NULL,
    count      INTEGER NOT NULL,
    first_seen INTEGER NOT NULL,
    last_seen  INTEGER NOT NULL,
    PRIMARY KEY (hour, type, site, browser, os, reason)
) WITHOUT ROWID;

CREATE TABLE report_groups_daily (
    day        INTEGER NOT NULL,                       -- hour / 24
    type       TEXT NOT NULL,
    site       TEXT NOT NULL,
    browser    TEXT NOT NULL,
    os         TEXT NOT NULL,
    reason     TEXT NOT NULL,
    count      INTEGER NOT NULL,
    first_seen INTEGER NOT NULL,
    last_seen  INTEGER NOT NULL,
    PRIMARY KEY (day, type, site, browser, os, reason)
) WITHOUT ROWID;

INSERT INTO daily_mark (name, day) VALUES ('report_hour', 0), ('report_day', 0);
