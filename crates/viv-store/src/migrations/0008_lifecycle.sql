-- What a sandbox's timeout and traffic do (E2B's lifecycle options), beside its row: `sandboxes`
-- rows are replaced whole, so these live in their own table, keyed by the sandbox id.
CREATE TABLE sandbox_lifecycle (
    sandbox_id    TEXT PRIMARY KEY,
    auto_resume   INTEGER NOT NULL DEFAULT 0, -- traffic for the paused sandbox resumes it
    pause_memory  INTEGER NOT NULL DEFAULT 1, -- a pause at the timeout keeps the memory
    timeout_secs  INTEGER NOT NULL,           -- the lifetime a resume by traffic gives
    env_vars      TEXT                        -- JSON: the environment a boot of its disk gets again
);
