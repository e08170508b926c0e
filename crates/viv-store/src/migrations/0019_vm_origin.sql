-- Where a VM's root disk came from, for VMs made from sandboxes: `snapshot:<node id>` or
-- `template:<name>`. The disk is a copy, so this is history (the snapshot tree shows the VM's
-- snapshots under that node), never a dependency.
ALTER TABLE vms ADD COLUMN origin TEXT;
