-- VMs of the VM manager: a definition (JSON of viv_api::vms::VmDefinition) and a state. A change
-- made while a VM runs is kept in `pending_definition` until its next start.
CREATE TABLE vms (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    definition TEXT NOT NULL,
    pending_definition TEXT,
    state TEXT NOT NULL,
    created_at TEXT NOT NULL,
    state_changed_at TEXT NOT NULL
);
