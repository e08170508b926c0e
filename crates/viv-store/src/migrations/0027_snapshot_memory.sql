-- How a snapshot node keeps the guest's memory, as its node last recorded it: `whole`, `diff`
-- (a chain on a base of its node) or `none` (disk only); NULL for nodes saved before this was
-- recorded. Any server lists it, also one without the node's files.
ALTER TABLE snapshots ADD COLUMN memory TEXT;
