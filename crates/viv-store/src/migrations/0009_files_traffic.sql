-- Sandboxes created with `allowPublicTraffic: false`: the token their ports require
-- (`E2B-Traffic-Access-Token`). A sandbox's token goes with its row.
CREATE TABLE sandbox_traffic (
  sandbox_id TEXT PRIMARY KEY,
  token TEXT NOT NULL
);
CREATE TRIGGER sandbox_traffic_gone AFTER DELETE ON sandboxes
BEGIN
  DELETE FROM sandbox_traffic WHERE sandbox_id = OLD.id;
END;
