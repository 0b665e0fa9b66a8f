-- Every W3C report as received (raw JSON), plus the columns that queries filter and group on;
-- the same columns as the SQLite backend's table, with PostgreSQL types.
--
-- Partitioned by UTC day of received_at (ms since the Unix epoch), so retention drops whole
-- days (DROP TABLE: no dead rows, no vacuum, no index churn) instead of deleting rows. Days,
-- not months: retention is set in days, so with daily partitions at most one partition (the
-- day the cut falls in) needs a row DELETE, where monthly ones would leave up to a month of
-- rows to delete one by one; 90 days of retention is 90 partitions, well within what the
-- planner prunes cheaply. There is no DEFAULT partition: it would make every later ATTACH
-- scan it (and fail once it held a row of that day); a row for a day without a partition fails
-- loudly instead (SQLSTATE 23514) and the writer ensures the partition and retries.
--
-- ids come from a sequence rather than an identity column: PostgreSQL before 17 has no
-- identity columns on partitioned tables. A key of a partitioned table must include the
-- partition column, so the primary key is (received_at, id), which is also the order keyset
-- paging walks; lookups by id alone use reports_id (one probe per partition).
CREATE SEQUENCE reports_id_seq AS bigint;

CREATE TABLE reports (
    id            bigint NOT NULL DEFAULT nextval('reports_id_seq'),
    received_at   bigint NOT NULL,  -- ms since the Unix epoch, UTC
    generated_at  bigint NOT NULL,  -- received_at - age
    age           bigint NOT NULL,
    type          text   NOT NULL,
    url           text   NOT NULL,
    origin        text,
    site          text,
    user_agent    text   NOT NULL,
    browser       text,
    browser_major text,
    os            text,
    reason        text,
    raw           text   NOT NULL,  -- text, not jsonb: exported exactly as stored
    PRIMARY KEY (received_at, id)
) PARTITION BY RANGE (received_at);

ALTER SEQUENCE reports_id_seq OWNED BY reports.id;

CREATE INDEX reports_id ON reports (id);
-- Newest-first listing filtered by the most common filters.
CREATE INDEX reports_site ON reports (site, received_at, id);
CREATE INDEX reports_type ON reports (type, received_at, id);

-- The partitions of reports with their bounds [from_ms, to_ms), oldest first, read from the
-- catalog (the truth) rather than from partition names.
CREATE FUNCTION report_partitions()
RETURNS TABLE (name text, from_ms bigint, to_ms bigint)
LANGUAGE sql STABLE AS $$
    SELECT c.relname::text,
           (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'FROM \(''?(-?\d+)''?\)'))[1]::bigint,
           (regexp_match(pg_get_expr(c.relpartbound, c.oid), 'TO \(''?(-?\d+)''?\)'))[1]::bigint
    FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
    WHERE i.inhparent = 'reports'::regclass
    ORDER BY 2
$$;

-- Make sure a partition exists for every UTC day from from_ms to to_ms (both included);
-- returns how many it created. The writer calls it in a transaction of its own, not in the
-- ingest transaction (the advisory lock and the attach would be held until that commits):
-- at start for today and the next day or two, again as days pass, and for a batch whose rows
-- fall on a day it has not seen (or after an insert failed with SQLSTATE 23514).
--
-- A partition is made as a plain table and then ATTACHed: CREATE TABLE ... PARTITION OF takes
-- an ACCESS EXCLUSIVE lock on reports and would wait for (and block) every reader, ATTACH
-- takes SHARE UPDATE EXCLUSIVE, which readers and inserts do not conflict with. Concurrent
-- callers (several ingest processes at midnight) serialise on an advisory lock, taken only
-- when a day is missing, so the common call takes no lock at all.
CREATE FUNCTION ensure_report_partitions(from_ms bigint, to_ms bigint)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    day_ms constant bigint := 86400000;
    first_day bigint := floor(from_ms::numeric / day_ms);
    last_day bigint := floor(to_ms::numeric / day_ms);
    parent_schema text;
    partition_name text;
    created integer := 0;
BEGIN
    IF from_ms IS NULL OR to_ms IS NULL OR to_ms < from_ms THEN
        RAISE EXCEPTION 'ensure_report_partitions: invalid range [%, %]', from_ms, to_ms;
    END IF;
    -- A bogus timestamp must not create thousands of tables: a sparse set of days (copying an
    -- old database) is ensured one day at a time.
    IF last_day - first_day >= 400 THEN
        RAISE EXCEPTION 'ensure_report_partitions: % days at once; call it per day', last_day - first_day + 1;
    END IF;
    SELECT n.nspname INTO parent_schema
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = 'reports'::regclass;
    FOR day IN first_day .. last_day LOOP
        partition_name := 'reports_' || to_char(to_timestamp(day::bigint * 86400) AT TIME ZONE 'UTC', 'YYYYMMDD');
        CONTINUE WHEN EXISTS (SELECT FROM report_partitions() p WHERE p.from_ms = day * day_ms);
        PERFORM pg_advisory_xact_lock(hashtextextended('reporting_endpoint.report_partitions', 0));
        -- Again under the lock (a query, with this statement's fresh snapshot): another
        -- process may have created it while this one waited.
        CONTINUE WHEN EXISTS (SELECT FROM report_partitions() p WHERE p.from_ms = day * day_ms);
        EXECUTE format('CREATE TABLE %I.%I (LIKE %I.reports INCLUDING DEFAULTS)',
                       parent_schema, partition_name, parent_schema);
        EXECUTE format('ALTER TABLE %I.reports ATTACH PARTITION %I.%I FOR VALUES FROM (%s) TO (%s)',
                       parent_schema, parent_schema, partition_name, day * day_ms, (day + 1) * day_ms);
        created := created + 1;
    END LOOP;
    RETURN created;
END
$$;

-- Retention: drop every partition that lies wholly before before_ms; returns how many rows
-- they held. The caller deletes the rest (received_at < before_ms, all in the one partition the
-- cut falls in) and recounts the roll-ups in the same transaction. Dropping a partition takes
-- an ACCESS EXCLUSIVE lock on reports until commit, so keep that transaction short and give it
-- a lock_timeout (a wait queued behind a long read would block every reader behind it).
CREATE FUNCTION drop_report_partitions(before_ms bigint)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    parent_schema text;
    part record;
    held bigint;
    total bigint := 0;
BEGIN
    SELECT n.nspname INTO parent_schema
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = 'reports'::regclass;
    FOR part IN SELECT * FROM report_partitions() p WHERE p.to_ms <= before_ms LOOP
        EXECUTE format('SELECT count(*) FROM %I.%I', parent_schema, part.name) INTO held;
        EXECUTE format('DROP TABLE %I.%I', parent_schema, part.name);
        total := total + held;
    END LOOP;
    RETURN total;
END
$$;
