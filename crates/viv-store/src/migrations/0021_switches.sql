-- VM switches: Linux bridges the server owns (bridge `vsKEYN`, N = idx), which VM NICs attach to.
CREATE TABLE switches (
  name        TEXT PRIMARY KEY,
  -- Names the bridge; the smallest index free when the switch was created.
  idx         INTEGER NOT NULL UNIQUE,
  -- The switch's settings (viv_api::switches::SwitchDefinition as JSON, its subnet filled in).
  definition  TEXT NOT NULL,
  created_at  TEXT NOT NULL
);
