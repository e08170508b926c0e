-- The SSH gateway (crates/viv-ssh): public keys that sign in, each registered to one API key,
-- and which API key created each sandbox (only that key's SSH keys reach it).
CREATE TABLE ssh_keys (
  id          TEXT PRIMARY KEY,
  api_key_id  TEXT NOT NULL REFERENCES api_keys(id),
  algorithm   TEXT NOT NULL,
  -- `SHA256:` and the unpadded base64 of the key blob's SHA-256, as `ssh-keygen -l` prints it.
  fingerprint TEXT NOT NULL UNIQUE,
  -- The OpenSSH one-line form without its comment.
  public_key  TEXT NOT NULL,
  comment     TEXT NOT NULL,
  created_at  TEXT NOT NULL
);
CREATE INDEX ssh_keys_api_key ON ssh_keys (api_key_id);

-- Sandboxes created before this table existed have no owner: no SSH key reaches them.
CREATE TABLE sandbox_owners (
  sandbox_id  TEXT PRIMARY KEY,
  api_key_id  TEXT NOT NULL
);
CREATE TRIGGER sandbox_owners_gone AFTER DELETE ON sandboxes
BEGIN
  DELETE FROM sandbox_owners WHERE sandbox_id = OLD.id;
END;
