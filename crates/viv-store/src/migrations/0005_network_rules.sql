-- A sandbox's egress rules (JSON of viv_net::PolicySpec) when it has allow or deny lists.
ALTER TABLE sandboxes ADD COLUMN network TEXT;
