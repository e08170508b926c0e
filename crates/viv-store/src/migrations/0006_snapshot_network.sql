-- The network mode of the server that saved a snapshot node (`none`, `user` or `isolated`):
-- the card and its backend are part of the state a restore needs (QEMU's user-mode stack saves
-- its own section). NULL for nodes saved before this was recorded.
ALTER TABLE snapshots ADD COLUMN network TEXT;
