-- How many other nodes get a copy of the sandbox each time it is paused (`pauseReplicas` at
-- create); NULL: the pausing server's `--pause-replicas`.
ALTER TABLE sandbox_lifecycle ADD COLUMN pause_replicas INTEGER;
