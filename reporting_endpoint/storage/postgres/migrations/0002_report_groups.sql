-- Roll-up counters, kept in the same transaction as the report inserts, so a group query costs
-- O(groups) instead of O(reports); the same tables and keys as the SQLite backend.
--
-- '' stands for "none" in key columns, as in SQLite: the keys are then plain NOT NULL primary
-- keys, the explicit conflict target of the writer's upserts, e.g.
--   INSERT INTO report_groups AS g (type, ..., count, first_seen, last_seen) VALUES (...)
--   ON CONFLICT (type, site, origin, browser, browser_major, os, reason, user_agent)
--   DO UPDATE SET count = g.count + excluded.count,
--                 first_seen = least(g.first_seen, excluded.first_seen),
--                 last_seen = greatest(g.last_seen, excluded.last_seen)
-- Several writers commit in parallel here: each must upsert its keys in one sorted order, so
-- two transactions touching the same groups wait for each other instead of deadlocking.

-- Per hour (received_at / 3600000) and every key: time windows and time series.
CREATE TABLE report_groups_hourly (
    hour          bigint NOT NULL,
    type          text   NOT NULL,
    site          text   NOT NULL,
    origin        text   NOT NULL,
    browser       text   NOT NULL,
    browser_major text   NOT NULL,
    os            text   NOT NULL,
    reason        text   NOT NULL,
    user_agent    text   NOT NULL,
    count         bigint NOT NULL,
    first_seen    bigint NOT NULL,
    last_seen     bigint NOT NULL,
    PRIMARY KEY (hour, type, site, origin, browser, browser_major, os, reason, user_agent)
);

-- All time, every key.
CREATE TABLE report_groups (
    type          text   NOT NULL,
    site          text   NOT NULL,
    origin        text   NOT NULL,
    browser       text   NOT NULL,
    browser_major text   NOT NULL,
    os            text   NOT NULL,
    reason        text   NOT NULL,
    user_agent    text   NOT NULL,
    count         bigint NOT NULL,
    first_seen    bigint NOT NULL,
    last_seen     bigint NOT NULL,
    PRIMARY KEY (type, site, origin, browser, browser_major, os, reason, user_agent)
);

-- A coarse roll-up for the common questions (which sites crash, in which browsers, why): far
-- fewer rows than the full one, whose keys include every origin and user-agent string.
CREATE TABLE report_groups_site (
    type       text   NOT NULL,
    site       text   NOT NULL,
    browser    text   NOT NULL,
    reason     text   NOT NULL,
    count      bigint NOT NULL,
    first_seen bigint NOT NULL,
    last_seen  bigint NOT NULL,
    PRIMARY KEY (type, site, browser, reason)
);

-- A small hourly roll-up for time series and windowed counts by type, reason and browser:
-- the full hourly table has nearly a row per report once sites and user agents vary.
CREATE TABLE report_groups_hourly_kind (
    hour       bigint NOT NULL,
    type       text   NOT NULL,
    reason     text   NOT NULL,
    browser    text   NOT NULL,
    count      bigint NOT NULL,
    first_seen bigint NOT NULL,
    last_seen  bigint NOT NULL,
    PRIMARY KEY (hour, type, reason, browser)
);
