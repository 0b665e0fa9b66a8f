-- A small hourly roll-up for time series and windowed counts by type, reason and browser:
-- the full hourly table has nearly a row per report once sites and user agents vary
-- (995,280 rows for 1,000,000 reports in the benchmark), this one a few rows per hour.
CREATE TABLE report_groups_hourly_kind (
    hour       INTEGER NOT NULL,
    type       TEXT NOT NULL,
    reason     TEXT NOT NULL,
    browser    TEXT NOT NULL,
    count      INTEGER NOT NULL,
    first_seen INTEGER NOT NULL,
    last_seen  INTEGER NOT NULL,
    PRIMARY KEY (hour, type, reason, browser)
) WITHOUT ROWID;

INSERT INTO report_groups_hourly_kind
SELECT hour, type, reason, browser, sum(count), min(first_seen), max(last_seen)
FROM report_groups_hourly GROUP BY 1, 2, 3, 4;
