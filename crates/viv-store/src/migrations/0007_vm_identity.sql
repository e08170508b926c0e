-- What a later server needs to take over a running sandbox's VM: its process as `pid@start`
-- (start time in clock ticks since boot, so a recycled pid is never mistaken for it) and the
-- network slot its namespace is (isolated mode).
ALTER TABLE sandboxes ADD COLUMN vmm_identity TEXT;
ALTER TABLE sandboxes ADD COLUMN net_slot INTEGER;
