-- Symbolicated native stacks (issue 15). Symbol files are filed Breakpad's way, by the debug
-- file and id of the module they describe; their text (.sym) and the native debug file it came
-- from are blobs, referenced here by hash (so the orphan sweep keeps them). An upload of the
-- same key replaces the row.
--
-- Keys are text COLLATE "C": the listing's keyset order and the missing-symbols ties are byte
-- order, as in SQLite, whatever the database's collation.
CREATE TABLE symbol_files (
    debug_file    text COLLATE "C" NOT NULL,
    debug_id      text COLLATE "C" NOT NULL,
    name          text   NOT NULL,  -- the file name in <debug_file>/<debug_id>/<name>
    code_file     text COLLATE "C",
    code_id       text,
    os            text,
    arch          text,
    sym_sha256    text   NOT NULL,
    sym_size      bigint NOT NULL,
    object_sha256 text,
    object_size   bigint,
    source        text   NOT NULL,  -- upload | upstream
    uploaded_at   bigint NOT NULL,  -- ms since the Unix epoch
    PRIMARY KEY (debug_file, debug_id)
);

CREATE INDEX symbol_files_code ON symbol_files (code_file, code_id);
-- "Does a symbol file still use this blob?" before a blob is deleted.
CREATE INDEX symbol_files_sym ON symbol_files (sym_sha256);
CREATE INDEX symbol_files_object ON symbol_files (object_sha256) WHERE object_sha256 IS NOT NULL;

-- The modules a crash needed symbols for and did not have when it was processed: the missing
-- symbols list reads them, and a symbol file stored later sends those crashes back to
-- processing. Replaced with every result; they go with their crash (crashes is a plain
-- table, see 0003, so the foreign key can cascade).
CREATE TABLE crash_modules (
    crash_id   text NOT NULL REFERENCES crashes (id) ON DELETE CASCADE,
    debug_file text COLLATE "C" NOT NULL,
    debug_id   text COLLATE "C" NOT NULL,
    code_file  text COLLATE "C",
    seen_sha256 text,  -- the .sym the store had when the processor looked (NULL: none)
    PRIMARY KEY (crash_id, debug_file, debug_id)
);

CREATE INDEX crash_modules_key ON crash_modules (debug_file, debug_id);
-- The periodic late-symbols check starts from recent uploads.
CREATE INDEX symbol_files_uploaded ON symbol_files (uploaded_at);

-- JSON lists (text, as every JSON column here: see 0003) of the processed crash: its modules
-- and the crashing thread's frames (NULL until processed).
ALTER TABLE crashes ADD COLUMN modules text;
ALTER TABLE crashes ADD COLUMN frames text;
