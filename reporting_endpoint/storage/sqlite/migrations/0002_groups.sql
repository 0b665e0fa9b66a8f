-- Roll-up counters, kept in the same transaction as the inserts, so a group query costs
-- O(groups) instead of O(reports). '' stands for "none" in key columns: SQLite's UNIQUE treats
-- NULLs as all different, which would defeat the upsert.
CREATE TABLE report_groups_hourly (
    hour          INTEGER NOT NULL,  -- received_at / 3600000
    type          TEXT NOT NULL,
    site          TEXT NOT NULL,
    origin        TEXT NOT NULL,
    browser       TEXT NOT NULL,
    browser_major TEXT NOT NULL,
    os            TEXT NOT NULL,
    reason        TEXT NOT NULL,
    user_agent    TEXT NOT NULL,
    count         INTEGER NOT NULL,
    first_seen    INTEGER NOT NULL,
    last_seen     INTEGER NOT NULL,
    PRIMARY KEY (hour, type, site, origin, browser, browser_major, os, reason, user_agent)
) WITHOUT ROWID;

CREATE TABLE report_groups (
    type          TEXT NOT NULL,
    site          TEXT NOT NULL,
    origin        TEXT NOT NULL,
    browser       TEXT NOT NULL,
    browser_major TEXT NOT NULL,
    os            TEXT NOT NULL,
    reason        TEXT NOT NULL,
    user_agent    TEXT NOT NULL,
    count         INTEGER NOT NULL,
    first_seen    INTEGER NOT NULL,
    last_seen     INTEGER NOT NULL,
    PRIMARY KEY (type, site, origin, browser, browser_major, os, reason, user_agent)
) WITHOUT ROWID;

INSERT INTO report_groups_hourly
SELECT received_at / 3600000, type, coalesce(site, ''), coalesce(origin, ''),
       coalesce(browser, ''), coalesce(browser_major, ''), coalesce(os, ''),
       coalesce(reason, ''), user_agent, count(*), min(received_at), max(received_at)
FROM reports GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9;

INSERT INTO report_groups
SELECT type, site, origin, browser, browser_major, os, reason, user_agent,
       sum(count), min(first_seen), max(last_seen)
FROM report_groups_hourly GROUP BY 1, 2, 3, 4, 5, 6, 7, 8;

-- A coarse roll-up for the common questions (which sites crash, in which browsers, why): far
-- fewer rows than the full one, whose keys include every origin and user-agent string.
CREATE TABLE report_groups_site (
    type       TEXT NOT NULL,
    site       TEXT NOT NULL,
    browser    TEXT NOT NULL,
    reason     TEXT NOT NULL,
    count      INTEGER NOT NULL,
    first_seen INTEGER NOT NULL,
    last_seen  INTEGER NOT NULL,
    PRIMARY KEY (type, site, browser, reason)
) WITHOUT ROWID;

INSERT INTO report_groups_site
SELECT type, site, browser, reason, sum(count), min(first_seen), max(last_seen)
FROM report_groups GROUP BY 1, 2, 3, 4;

-- Newest-first listing filtered by the most common filters.
CREATE INDEX reports_site ON reports (site, received_at, id);
CREATE INDEX reports_type ON reports (type, received_at, id);
