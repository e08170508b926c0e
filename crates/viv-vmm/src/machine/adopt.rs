//! Taking over a machine whose QEMU a previous server started (it outlives its server).
//!
//! Invariants: what the machine's handle must know but its [`MachineSpec`] cannot say is read
//! back from QEMU: the media in its CD-ROM drives (changed at run time, `query-block`), the
//! names of those media (the next one must not collide) and the fd sets in use (the next one
//! passed at run time must not collide, `query-fdsets`). A machine that cannot be taken over
//! is killed and its jail freed, as for sandbox VMs ([`crate::qemu`]).

use std::collections::HashMap;

use super::{fdset_number, machine_arguments, medium_node, ops::names_device, Machine, MachineSpec};
use crate::qemu::{unresponsive, Qemu, QemuVm, Reconnected};
use crate::{AdoptError, Adoption, ProcessIdentity};

impl Qemu {
    /// Takes over machine `spec` (its id and run directory; its devices as it was started or
    /// last edited), whose QEMU is the process `identity` recorded at launch. Whether it was
    /// paused shows in [`Machine::status`]. On failure the process, if it still runs, is
    /// killed and its jail freed.
    pub async fn adopt_machine(&self, spec: &MachineSpec, identity: ProcessIdentity) -> Result<Machine, AdoptError> {
        let adoption = Adoption {
            vm_id: spec.vm_id.clone(),
            run_dir: spec.run_dir.clone(),
            identity,
        };
        let result = self.try_adopt_machine(spec, &adoption).await;
        if result.is_err() {
            self.release_failed_adoption(&adoption).await;
        }
        result
    }

    async fn try_adopt_machine(&self, spec: &MachineSpec, adoption: &Adoption) -> Result<Machine, AdoptError> {
        let Reconnected {
            process,
            qmp,
            events,
            jail,
            uid,
        } = self.reconnect(adoption).await?;
        let fail = |err: crate::qmp::QmpError| unresponsive(&process, err.to_string());
        let blocks = qmp.execute("query-block", None).await.map_err(fail)?;
        let fdsets = qmp.execute("query-fdsets", None).await.map_err(fail)?;
        let mut media = HashMap::new();
        let mut generation = 1;
        for cdrom in &spec.cdroms {
            let node = blocks
                .as_array()
                .into_iter()
                .flatten()
                .find(|b| b["qdev"].as_str().is_some_and(|q| names_device(q, &cdrom.id)))
                .and_then(|b| b["inserted"]["node-name"].as_str())
                .map(str::to_owned);
            if let Some(n) = node.as_deref().and_then(|n| media_generation(n, &cdrom.id)) {
                generation = generation.max(n + 1);
            }
            media.insert(cdrom.id.clone(), node);
        }
        let in_use = fdsets
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|set| set["fdset-id"].as_u64())
            .max()
            .unwrap_or(0);
        let backings = super::read_backings(spec).unwrap_or_default();
        let command_line = machine_arguments(spec, false, &backings).1.len();
        let next_fdset = (in_use + 1).max(fdset_number(command_line));
        let vm = QemuVm::supervised(
            process,
            qmp.clone(),
            events,
            jail,
            uid,
            0,
            true,
            spec.console_log(),
            spec.qemu_log(),
        );
        tracing::info!(vm = %spec.vm_id, identity = %adoption.identity, "took over a running machine");
        Ok(Machine::new(vm, qmp, spec, next_fdset).with_media(media, generation))
    }
}

/// The generation in a medium's node name (`cd-ID-N`, see [`medium_node`]).
fn media_generation(node: &str, drive: &str) -> Option<u64> {
    let prefix = medium_node(drive, 0);
    node.strip_prefix(prefix.strip_suffix('0')?)?.parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn media_names_give_their_generation() {
        assert_eq!(super::media_generation("cd-cd0-7", "cd0"), Some(7));
        assert_eq!(super::media_generation("cd-cd0-0", "cd0"), Some(0));
        assert_eq!(super::media_generation("cd-cd1-7", "cd0"), None);
        assert_eq!(super::media_generation("other", "cd0"), None);
    }
}
