-- Whether a snapshot node's VM had a network card (part of the device set a restore needs);
-- NULL for nodes saved before this was recorded.
ALTER TABLE snapshots ADD COLUMN network_card INTEGER;
