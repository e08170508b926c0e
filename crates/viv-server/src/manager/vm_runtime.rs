//! Running VMs of the VM manager: start, stop, kill, pause, resume, restart; the state machine
//! and its events; crash handling and restart policy; autostart; adoption after a restart.
//!
//! (Skeleton: being built.)

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use viv_vmm::machine::Machine;

use super::vm_console::ConsoleHub;
use super::Manager;
use crate::error::ApiError;

/// A VM whose QEMU runs.
pub struct LiveVm {
    /// Its id.
    pub id: String,
    /// The machine.
    pub machine: Arc<Machine>,
    /// Its serial console.
    pub console: Arc<ConsoleHub>,
    /// Its run directory (sockets, logs).
    pub run_dir: PathBuf,
}

/// The running VMs.
#[derive(Default)]
pub struct VmRuntime {
    live: Mutex<HashMap<String, Arc<LiveVm>>>,
}

impl Manager {
    /// The directory storage pool (disks, ISOs, cloud-init seeds).
    pub fn storage(&self) -> &Arc<viv_storage::DirPool> {
        &self.storage
    }

    /// A running VM by id or name; 404 when there is no such VM, 409 when it is not running.
    pub fn live_vm(&self, id_or_name: &str) -> Result<Arc<LiveVm>, ApiError> {
        let info = self.vm_info(id_or_name)?;
        self.vm_runtime
            .live
            .lock()
            .expect("VM runtime lock")
            .get(&info.id)
            .cloned()
            .ok_or_else(|| {
                ApiError::Conflict(format!(
                    "VM '{}' is {}: start it first",
                    info.name,
                    info.state.as_str()
                ))
            })
    }
}
