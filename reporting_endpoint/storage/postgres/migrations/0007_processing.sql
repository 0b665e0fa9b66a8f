-- Crash processing fed from the rows (issue 14): a processor claims pending crashes for a while
-- (a lease), counts an attempt at each claim (a dump that kills its processor is retried, then
-- marked failed), and records when it finished. Claims (FOR UPDATE SKIP LOCKED) and the backlog
-- read the partial index.
ALTER TABLE crashes ADD COLUMN attempts integer NOT NULL DEFAULT 0;
ALTER TABLE crashes ADD COLUMN claimed_by text;
ALTER TABLE crashes ADD COLUMN lease_until bigint;   -- ms since the epoch; NULL: unclaimed
ALTER TABLE crashes ADD COLUMN processed_at bigint;  -- ms since the epoch; NULL: not yet
DROP INDEX crashes_pending;
CREATE INDEX crashes_backlog ON crashes (received_at, id) WHERE parse_status = 'pending';
