-- Native crashes uploaded by Crashpad/Breakpad clients (Electron's crashReporter). The dump and
-- the attachments are files (see blobs.py); a row holds their hashes, sizes and paths.
CREATE TABLE crashes (
    id                  TEXT PRIMARY KEY,
    received_at         INTEGER NOT NULL,  -- ms since the Unix epoch, UTC
    product             TEXT,
    version             TEXT,
    guid                TEXT,
    platform            TEXT,
    process_type        TEXT,
    electron_version    TEXT,
    annotations         TEXT NOT NULL,     -- JSON object of every text part
    query               TEXT NOT NULL,     -- JSON object of the URL's query parameters
    dump_sha256         TEXT NOT NULL,
    dump_size           INTEGER NOT NULL,
    dump_path           TEXT NOT NULL,
    attachments         TEXT NOT NULL,     -- JSON list of {name, filename, sha256, size, path}
    upload_bytes        INTEGER NOT NULL,  -- body as sent (compressed when gzip)
    parse_status        TEXT NOT NULL DEFAULT 'pending',  -- pending | parsed | failed
    parse_error         TEXT,
    os                  TEXT,
    os_version          TEXT,
    cpu                 TEXT,
    exception_code      INTEGER,
    exception_name      TEXT,
    crash_address       INTEGER,
    crashing_thread     INTEGER,
    main_module         TEXT,
    main_module_version TEXT,
    crash_module        TEXT,
    crash_offset        INTEGER,
    signature           TEXT
);

CREATE INDEX crashes_received ON crashes (received_at, id);
CREATE INDEX crashes_group ON crashes (product, version, platform, process_type, signature);
CREATE INDEX crashes_pending ON crashes (parse_status) WHERE parse_status = 'pending';
