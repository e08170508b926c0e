//! `viv vm disk attach|detach` and `viv vm vcpus`: a pool disk attached to or detached from a
//! VM, and its vCPUs set, at once when the VM runs and can take the change (q35 with hotplug
//! ports, `maxVcpus`), else at its next start.

use anyhow::Result;
use clap::Subcommand;
use reqwest::Method;
use viv_api::vms::{DiskBus, VmDisk, VmEdit};

use crate::client::Client;
use crate::output;

/// `viv vm disk ...`
#[derive(Debug, Subcommand)]
pub enum DiskCommand {
    /// Attach a pool disk (a running q35 VM sees it appear at once).
    Attach {
        /// VM id or name.
        vm: String,
        /// The pool disk's name.
        disk: String,
        /// Attach it read-only.
        #[arg(long)]
        read_only: bool,
        /// May be attached to other VMs at the same time.
        #[arg(long)]
        shareable: bool,
    },
    /// Detach a disk (it stays in the pool); from a running VM only the last, hot-added one.
    Detach {
        /// VM id or name.
        vm: String,
        /// The pool disk's name.
        disk: String,
    },
}

/// `viv vm vcpus VM COUNT`.
pub async fn set_vcpus(client: &Client, vm: &str, count: u32, json: bool) -> Result<()> {
    let edit: VmEdit = client
        .json(
            client
                .request(Method::PUT, &format!("/vms/{vm}/vcpus"))
                .json(&viv_api::vms::VmVcpus { count }),
        )
        .await?;
    print_edit(&edit, &format!("{count} vCPUs"), json);
    Ok(())
}

/// `viv vm memory VM [TARGET_MIB]`: the running VM's memory as its balloon has it, after
/// setting the balloon's target when one is given.
pub async fn memory(client: &Client, vm: &str, target_mib: Option<u32>, json: bool) -> Result<()> {
    let info: viv_api::vms::VmMemory = match target_mib {
        Some(target_mib) => {
            client
                .json(
                    client
                        .request(Method::PUT, &format!("/vms/{vm}/memory"))
                        .json(&viv_api::vms::VmMemoryTarget { target_mib }),
                )
                .await?
        }
        None => {
            client
                .json(client.request(Method::GET, &format!("/vms/{vm}/memory")))
                .await?
        }
    };
    if json {
        output::json(&info);
    } else {
        println!("{vm}: {} MiB of {} MiB", info.actual_mib, info.memory_mib);
    }
    Ok(())
}

fn print_edit(edit: &VmEdit, what: &str, json: bool) {
    if json {
        output::json(edit);
    } else if edit.applied_now.is_empty() {
        println!("{}: {what} (takes effect at its next start)", edit.vm.name);
    } else {
        println!("{}: {what} (now, while it runs)", edit.vm.name);
    }
}

pub async fn run(client: &Client, cmd: DiskCommand, json: bool) -> Result<()> {
    let (edit, what): (VmEdit, _) = match cmd {
        DiskCommand::Attach {
            vm,
            disk,
            read_only,
            shareable,
        } => {
            let body = VmDisk {
                disk: disk.clone(),
                bus: DiskBus::VirtioBlk,
                read_only,
                shareable,
            };
            let edit = client
                .json(client.request(Method::POST, &format!("/vms/{vm}/disks")).json(&body))
                .await?;
            (edit, format!("attached {disk}"))
        }
        DiskCommand::Detach { vm, disk } => {
            let edit = client
                .json(client.request(Method::DELETE, &format!("/vms/{vm}/disks/{disk}")))
                .await?;
            (edit, format!("detached {disk}"))
        }
    };
    print_edit(&edit, &what, json);
    Ok(())
}
