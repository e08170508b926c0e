-- Whether a sandbox may reach networks outside its VM (its network card's backend).
ALTER TABLE sandboxes ADD COLUMN internet INTEGER NOT NULL DEFAULT 1;
