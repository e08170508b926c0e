-- Web console sessions: a browser signs in with an API key and gets a random session token in a
-- cookie. Only the token's SHA-256 is stored; a session ends at its expiry, at logout, and when
-- its key is revoked or deleted.
CREATE TABLE web_sessions (
    token_sha256   TEXT PRIMARY KEY,
    key_id         TEXT NOT NULL REFERENCES api_keys(id) ON DELETE CASCADE,
    created_at     TEXT NOT NULL,
    expires_at_ms  INTEGER NOT NULL
);
CREATE INDEX web_sessions_expiry ON web_sessions(expires_at_ms);
