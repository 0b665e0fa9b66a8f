-- Symbolicated native stacks (issue 15). Symbol files are filed Breakpad's way, by the debug
-- file and id of the module they describe; their text (.sym) and the native debug file it came
-- from are blobs, referenced here by hash (so the orphan sweep keeps them). An upload of the
-- same key replaces the row.
CREATE TABLE symbol_files (
    debug_file    TEXT NOT NULL,
    debug_id      TEXT NOT NULL,
    name          TEXT NOT NULL,     -- the file name in <debug_file>/<debug_id>/<name>
    code_file     TEXT,
    code_id       TEXT,
    os            TEXT,
    arch          TEXT,
    sym_sha256    TEXT NOT NULL,
    sym_size      INTEGER NOT NULL,
    object_sha256 TEXT,
    object_size   INTEGER,
    source        TEXT NOT NULL,     -- upload | upstream
    uploaded_at   INTEGER NOT NULL,  -- ms since the Unix epoch
    PRIMARY KEY (debug_file, debug_id)
) WITHOUT ROWID;

CREATE INDEX symbol_files_code ON symbol_files (code_file, code_id);
-- "Does a symbol file still use this blob?" before a blob is deleted.
CREATE INDEX symbol_files_sym ON symbol_files (sym_sha256);
CREATE INDEX symbol_files_object ON symbol_files (object_sha256) WHERE object_sha256 IS NOT NULL;

-- The modules a crash needed symbols for and did not have when it was processed: the missing
-- symbols list reads them, and a symbol file stored later sends those crashes back to
-- processing. Replaced with every result; deleted with the crash (explicitly: this database
-- does not enforce foreign keys).
CREATE TABLE crash_modules (
    crash_id   TEXT NOT NULL,
    debug_file TEXT NOT NULL,
    debug_id   TEXT NOT NULL,
    code_file  TEXT,
    seen_sha256 TEXT,  -- the .sym the store had when the processor looked (NULL: none)
    PRIMARY KEY (crash_id, debug_file, debug_id)
) WITHOUT ROWID;

CREATE INDEX crash_modules_key ON crash_modules (debug_file, debug_id);

-- JSON lists of the processed crash: its modules and the crashing thread's frames (NULL until
-- processed).
ALTER TABLE crashes ADD COLUMN modules TEXT;
ALTER TABLE crashes ADD COLUMN frames TEXT;
