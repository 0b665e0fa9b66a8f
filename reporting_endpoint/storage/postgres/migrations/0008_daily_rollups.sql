-- Events per issue and UTC day (hour / 24), for the completed days only: filled off the ingest
-- path by the roll-up job (storage/postgres/daily.py), so a long window reads a row per issue
-- and day instead of 24; the same tables as the SQLite backend's daily_rollups migration. Days
-- from `daily_mark.day` on are not here yet (read them hourly).
CREATE TABLE issue_daily (
    issue_id bigint NOT NULL,
    day      bigint NOT NULL,  -- hour / 24
    count    bigint NOT NULL,
    PRIMARY KEY (issue_id, day)
);

-- The window's whole days of every issue at once: a range of days, covering.
CREATE INDEX issue_daily_day ON issue_daily (day, issue_id) INCLUDE (count);

-- The first day not rolled up: every day before it has its rows, equal to the hourly sums.
CREATE TABLE daily_mark (
    name text PRIMARY KEY,
    day  bigint NOT NULL
);

INSERT INTO daily_mark (name, day) VALUES ('issue', 0);

-- The report roll-up of the window questions (top sites, browsers, systems by type and
-- reason) without the origin and user-agent keys that make the hourly table a row per report:
-- completed hours, then completed days, filled off the ingest path by the roll-up job from the
-- hourly table (storage/postgres/group_days.py). Hours from `daily_mark` 'report_hour' on, and
-- days from 'report_day' on, are not here yet.
CREATE TABLE report_groups_coarse (
    hour       bigint NOT NULL,
    type       text   NOT NULL,
    site       text   NOT NULL,
    browser    text   NOT NULL,
    os         text   NOT NULL,
    reason     text   NOT NULL,
    count      bigint NOT NULL,
    first_seen bigint NOT NULL,
    last_seen  bigint NOT NULL,
    PRIMARY KEY (hour, type, site, browser, os, reason)
);

CREATE TABLE report_groups_daily (
    day        bigint NOT NULL,  -- hour / 24
    type       text   NOT NULL,
    site       text   NOT NULL,
    browser    text   NOT NULL,
    os         text   NOT NULL,
    reason     text   NOT NULL,
    count      bigint NOT NULL,
    first_seen bigint NOT NULL,
    last_seen  bigint NOT NULL,
    PRIMARY KEY (day, type, site, browser, os, reason)
);

INSERT INTO daily_mark (name, day) VALUES ('report_hour', 0), ('report_day', 0);

-- Keeps a rolled-up day equal to its hours when an hourly count before the mark changes
-- (prune, delete, regroup, a late event). The roll-up job makes the triggers with the mark as
-- a literal in their WHEN, so an event of today costs one comparison and no call.
CREATE FUNCTION issue_daily_follow() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    mark bigint := TG_ARGV[0]::bigint;  -- the first hour not rolled up
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') AND OLD.hour >= 0 AND OLD.hour < mark THEN
        UPDATE issue_daily SET count = count - OLD.count
        WHERE issue_id = OLD.issue_id AND day = OLD.hour / 24;
        DELETE FROM issue_daily
        WHERE issue_id = OLD.issue_id AND day = OLD.hour / 24 AND count = 0;
    END IF;
    IF TG_OP IN ('UPDATE', 'INSERT') AND NEW.hour >= 0 AND NEW.hour < mark THEN
        INSERT INTO issue_daily AS d (issue_id, day, count)
        VALUES (NEW.issue_id, NEW.hour / 24, NEW.count)
        ON CONFLICT (issue_id, day) DO UPDATE SET count = d.count + excluded.count;
        DELETE FROM issue_daily
        WHERE issue_id = NEW.issue_id AND day = NEW.hour / 24 AND count = 0;
    END IF;
    RETURN NULL;
END
$$;
