-- Native crashes uploaded by Crashpad/Breakpad clients (Electron's crashReporter). The dump and
-- the attachments are blobs; a row holds their hashes, sizes and paths (or object keys).
--
-- Not partitioned: a crash row is small next to its blob, and deleting a crash has to look at
-- each row anyway (to find the blobs no other row references).
--
-- JSON columns are text, not jsonb: annotations and attachment names come from the client, and
-- jsonb rejects the \u0000 escape that JSON text of such values may hold (and reorders keys,
-- where the export shows them as stored).
--
-- Unsigned 64-bit facts (exception_code, crash_address, crash_offset) are bigint in two's
-- complement, exactly as in SQLite (storage/crashes.py u64_to_db/u64_from_db): both backends
-- share that conversion and the row shape, asyncpg reads bigint as int (numeric(20) would come
-- back as Decimal), and the column is 8 bytes. Nothing sorts or compares addresses in SQL;
-- u64() below shows the unsigned value in ad-hoc queries.
CREATE TABLE crashes (
    id                  text   PRIMARY KEY,
    received_at         bigint NOT NULL,  -- ms since the Unix epoch, UTC
    product             text,
    version             text,
    guid                text,
    platform            text,
    process_type        text,
    electron_version    text,
    annotations         text   NOT NULL,  -- JSON object of every text part
    query               text   NOT NULL,  -- JSON object of the URL's query parameters
    dump_sha256         text   NOT NULL,
    dump_size           bigint NOT NULL,
    dump_path           text   NOT NULL,
    attachments         text   NOT NULL,  -- JSON list of {name, filename, sha256, size, path}
    upload_bytes        bigint NOT NULL,  -- body as sent (compressed when gzip)
    parse_status        text   NOT NULL DEFAULT 'pending',  -- pending | parsed | failed
    parse_error         text,
    os                  text,
    os_version          text,
    cpu                 text,
    exception_code      bigint,           -- u64, two's complement
    exception_name      text,
    crash_address       bigint,           -- u64, two's complement
    crashing_thread     bigint,
    main_module         text,
    main_module_version text,
    crash_module        text,
    crash_offset        bigint,           -- u64, two's complement
    signature           text
);

CREATE INDEX crashes_received ON crashes (received_at, id);
CREATE INDEX crashes_group ON crashes (product, version, platform, process_type, signature);
CREATE INDEX crashes_pending ON crashes (parse_status) WHERE parse_status = 'pending';
-- "Does any crash still use this dump?" before a blob is deleted.
CREATE INDEX crashes_dump ON crashes (dump_sha256);

-- The unsigned value of a u64 fact stored in two's complement, for people reading the table.
CREATE FUNCTION u64(value bigint) RETURNS numeric
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT CASE WHEN value < 0 THEN value::numeric + 18446744073709551616 ELSE value::numeric END
$$;
