//! Disks added to and removed from a running `q35` machine, on the PCIe root ports it reserved
//! at start ([`super::MachineSpec::hotplug_ports`], ids `hp0`…), and vCPUs added up to its
//! [`super::MachineSpec::max_vcpus`] (one socket each, in the order QEMU lists the free slots;
//! the guest brings each online, as a Linux guest does when ACPI tells it or when told to), and
//! the memory a guest keeps through its virtio-balloon device (`balloon0`), and NICs: a
//! `virtio-net-pci` device `ID` on netdev `net-ID`, a tap the server opened and passed by
//! `getfd`, or QEMU's user-mode network.
//!
//! A hot-added disk is opened by the server like every other file: the image and each file of
//! its backing chain are passed as descriptors (`add-fd`) and named `/dev/fdset/N` in one
//! `blockdev-add` whose format node is `disk-ID`, then a `virtio-blk-pci` device `ID` goes on
//! the first free root port. Removal asks the guest to let go (`device_del`), waits for QEMU's
//! `DEVICE_DELETED`, then deletes the block node.
//!
//! Invariants: a failed add leaves neither a block node nor a device behind; a port is free
//! when QEMU reports no device on its bus (asked each time, so a server that took the machine
//! over finds the ports in use without keeping state); a removal that the guest does not
//! acknowledge in time keeps the disk attached and says so.

use std::os::fd::{AsFd as _, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};

use super::command_line::{disk_backings, hotplug_port};
use super::ops::Machine;
use super::{Disk, DiskBus, DiskFormat};
use crate::qmp::QmpError;

/// How long a guest has to release a device asked to go.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(30);

/// A disk to add to a running machine.
#[derive(Debug, Clone)]
pub struct HotDisk {
    /// Its id (as [`Disk::id`]).
    pub id: String,
    /// The image.
    pub path: PathBuf,
    /// The image's format.
    pub format: DiskFormat,
    /// Whether the guest may only read it.
    pub read_only: bool,
}

/// Why a disk could not be added or removed.
#[derive(Debug, thiserror::Error)]
pub enum HotplugError {
    /// The machine has no free hotplug port (or none at all: not `q35`, or started without).
    #[error("the machine has no free hotplug port ({0} reserved at its start)")]
    NoFreePort(usize),
    /// The image or its backing chain could not be read or opened.
    #[error("{0}")]
    Image(String),
    /// No such disk on a hotplug port (absent, or attached at start on the root bus).
    #[error("no disk '{0}' is on a hotplug port of the running machine")]
    UnknownDisk(String),
    /// No such device on a hotplug port (a NIC of the machine's start is on the root bus).
    #[error("no device '{0}' is on a hotplug port of the running machine")]
    UnknownDevice(String),
    /// vCPUs cannot be removed while the machine runs, nor added past its maximum.
    #[error("{0}")]
    Vcpus(String),
    /// The guest did not release the device in time.
    #[error("the guest did not release device '{0}' within {1:?}; it stays attached")]
    NotReleased(String, Duration),
    /// QEMU refused a command, or is gone.
    #[error("QEMU: {0}")]
    Qmp(#[from] QmpError),
}

impl Machine {
    /// The hotplug root ports and the ids of the devices on each, from QEMU.
    async fn hotplug_ports(&self) -> Result<Vec<(String, Vec<String>)>, QmpError> {
        let buses = self.qmp.execute("query-pci", None).await?;
        let mut ports = Vec::new();
        for bus in buses.as_array().into_iter().flatten() {
            for device in bus["devices"].as_array().into_iter().flatten() {
                let id = device["qdev_id"].as_str().unwrap_or_default();
                if (0..=u8::MAX).any(|n| hotplug_port(n) == id) {
                    let on_port = device["pci_bridge"]["devices"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|d| d["qdev_id"].as_str().map(str::to_owned))
                        .collect();
                    ports.push((id.to_owned(), on_port));
                }
            }
        }
        Ok(ports)
    }

    /// Adds `disk` to the running machine as a virtio-blk device on a free hotplug port; the
    /// guest sees a new disk.
    pub async fn hot_add_disk(&self, disk: &HotDisk) -> Result<(), HotplugError> {
        let port = self.free_port().await?;
        let chain = disk_backings(&Disk {
            id: disk.id.clone(),
            path: disk.path.clone(),
            format: disk.format,
            bus: DiskBus::VirtioBlk,
            read_only: disk.read_only,
            boot_index: None,
        })
        .map_err(|e| HotplugError::Image(e.to_string()))?;
        // Every file opened here with the access the guest gets; QEMU opens none by name.
        let image = std::fs::OpenOptions::new()
            .read(true)
            .write(!disk.read_only)
            .open(&disk.path)
            .map_err(|e| HotplugError::Image(format!("opening {}: {e}", disk.path.display())))?;
        let mut files = vec![(image, disk.format)];
        for (path, format) in &chain {
            let file = std::fs::File::open(path)
                .map_err(|e| HotplugError::Image(format!("opening {}: {e}", path.display())))?;
            files.push((file, *format));
        }
        let mut fdsets = Vec::new();
        for (file, _) in &files {
            match self.pass(file).await {
                Ok(id) => fdsets.push(id),
                Err(err) => {
                    self.forget_fdsets(&fdsets).await;
                    return Err(err.into());
                }
            }
        }
        // The node tree: the image, its backing below it, and so on; read-only below the top.
        let mut tree = Value::Null;
        for (level, ((_, format), fdset)) in files.iter().zip(&fdsets).enumerate().rev() {
            let mut node = json!({
                "driver": driver(*format),
                "read-only": level > 0 || disk.read_only,
                "file": { "driver": "file", "filename": format!("/dev/fdset/{fdset}") },
            });
            if *format == DiskFormat::Qcow2 {
                node["backing"] = std::mem::take(&mut tree);
            }
            tree = node;
        }
        let node_name = format!("disk-{}", disk.id);
        tree["node-name"] = json!(node_name);
        tree["discard"] = json!("unmap");
        let added = self.qmp.execute("blockdev-add", Some(tree)).await;
        self.forget_fdsets(&fdsets).await;
        added?;
        let device = self
            .qmp
            .execute(
                "device_add",
                Some(json!({ "driver": "virtio-blk-pci", "id": disk.id, "drive": node_name, "bus": port })),
            )
            .await;
        if let Err(err) = device {
            let _ = self
                .qmp
                .execute("blockdev-del", Some(json!({ "node-name": node_name })))
                .await;
            return Err(err.into());
        }
        Ok(())
    }

    /// Removes hot-added disk `id`: the guest is asked to release it, and once QEMU reports the
    /// device gone its block node is deleted.
    pub async fn hot_remove_disk(&self, id: &str) -> Result<(), HotplugError> {
        if !self.is_hot_added(id).await? {
            return Err(HotplugError::UnknownDisk(id.to_owned()));
        }
        self.unplug(id).await?;
        self.qmp
            .execute("blockdev-del", Some(json!({ "node-name": format!("disk-{id}") })))
            .await?;
        Ok(())
    }

    /// Adds a virtio-net NIC `id` with MAC `mac` on a free hotplug port: on tap `tap` (a copy
    /// of its descriptor goes to QEMU), or on QEMU's user-mode network without one.
    pub async fn hot_add_nic(&self, id: &str, mac: &str, tap: Option<&OwnedFd>) -> Result<(), HotplugError> {
        let port = self.free_port().await?;
        let netdev = format!("net-{id}");
        let backend = match tap {
            Some(tap) => {
                let name = format!("tap-{id}");
                self.qmp.pass_named_fd(&name, tap.as_fd()).await?;
                let added = self
                    .qmp
                    .execute("netdev_add", Some(json!({ "type": "tap", "id": netdev, "fd": name })))
                    .await;
                if added.is_err() {
                    let _ = self.qmp.execute("closefd", Some(json!({ "fdname": name }))).await;
                }
                added
            }
            None => {
                self.qmp
                    .execute("netdev_add", Some(json!({ "type": "user", "id": netdev })))
                    .await
            }
        };
        backend?;
        let device = self
            .qmp
            .execute(
                "device_add",
                Some(json!({ "driver": "virtio-net-pci", "id": id, "netdev": netdev, "mac": mac, "bus": port })),
            )
            .await;
        if let Err(err) = device {
            let _ = self.qmp.execute("netdev_del", Some(json!({ "id": netdev }))).await;
            return Err(err.into());
        }
        Ok(())
    }

    /// Removes hot-added NIC `id` (the guest is asked to release it), then its netdev, which
    /// closes QEMU's copy of its tap.
    pub async fn hot_remove_nic(&self, id: &str) -> Result<(), HotplugError> {
        if !self.is_hot_added(id).await? {
            return Err(HotplugError::UnknownDevice(id.to_owned()));
        }
        self.unplug(id).await?;
        self.qmp
            .execute("netdev_del", Some(json!({ "id": format!("net-{id}") })))
            .await?;
        Ok(())
    }

    /// The first hotplug port without a device.
    async fn free_port(&self) -> Result<String, HotplugError> {
        let ports = self.hotplug_ports().await?;
        ports
            .iter()
            .find(|(_, devices)| devices.is_empty())
            .map(|(id, _)| id.clone())
            .ok_or(HotplugError::NoFreePort(ports.len()))
    }

    /// Whether device `id` sits on a hotplug port.
    async fn is_hot_added(&self, id: &str) -> Result<bool, HotplugError> {
        Ok(self
            .hotplug_ports()
            .await?
            .iter()
            .any(|(_, devices)| devices.iter().any(|d| d == id)))
    }

    /// Asks the guest to release device `id` and waits for QEMU's `DEVICE_DELETED`.
    async fn unplug(&self, id: &str) -> Result<(), HotplugError> {
        let mut events = self.events();
        match self.qmp.execute("device_del", Some(json!({ "id": id }))).await {
            Ok(_) => {}
            // Asked before and already gone from QEMU's device tree.
            Err(QmpError::Command { class, .. }) if class == "DeviceNotFound" => {}
            Err(err) => return Err(err.into()),
        }
        let deleted = tokio::time::timeout(REMOVE_TIMEOUT, async {
            loop {
                match events.recv().await {
                    Ok(event) if event["event"] == "DEVICE_DELETED" && event["data"]["device"] == json!(id) => {
                        return true
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return false,
                }
            }
        })
        .await;
        if !matches!(deleted, Ok(true)) {
            return Err(HotplugError::NotReleased(id.to_owned(), REMOVE_TIMEOUT));
        }
        Ok(())
    }

    /// Brings the machine to `target` vCPUs by adding them (never removing); returns how many
    /// it has.
    pub async fn set_vcpus(&self, target: u32) -> Result<u32, HotplugError> {
        let slots = self.qmp.execute("query-hotpluggable-cpus", None).await?;
        let slots = slots.as_array().cloned().unwrap_or_default();
        let plugged = slots.iter().filter(|s| s.get("qom-path").is_some()).count() as u32;
        if target < plugged {
            return Err(HotplugError::Vcpus(format!(
                "the machine runs {plugged} vCPUs; removing vCPUs needs a stop"
            )));
        }
        let mut free: Vec<&Value> = slots.iter().filter(|s| s.get("qom-path").is_none()).collect();
        if target > plugged + free.len() as u32 {
            return Err(HotplugError::Vcpus(format!(
                "the machine can have at most {} vCPUs (its maxVcpus)",
                plugged + free.len() as u32
            )));
        }
        free.sort_by_key(|s| s["props"]["socket-id"].as_u64().unwrap_or(u64::MAX));
        for slot in free.into_iter().take((target - plugged) as usize) {
            let mut device = slot["props"].clone();
            let socket = device["socket-id"].as_u64().unwrap_or_default();
            device["driver"] = slot["type"].clone();
            device["id"] = json!(format!("vcpu{socket}"));
            self.qmp.execute("device_add", Some(device)).await?;
        }
        Ok(target)
    }

    /// How many devices (disks, NICs) were added while the machine runs (devices on its hotplug
    /// ports).
    pub async fn hot_added_devices(&self) -> Result<u32, HotplugError> {
        Ok(self.hotplug_ports().await?.iter().map(|(_, d)| d.len() as u32).sum())
    }

    /// How many vCPUs were added while the machine runs (devices of ours, under
    /// `/machine/peripheral`; those of the command line are not).
    pub async fn hot_added_vcpus(&self) -> Result<u32, HotplugError> {
        let slots = self.qmp.execute("query-hotpluggable-cpus", None).await?;
        Ok(slots
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| {
                s["qom-path"]
                    .as_str()
                    .is_some_and(|p| p.starts_with("/machine/peripheral/"))
            })
            .count() as u32)
    }

    /// Asks the guest's balloon driver to leave it `target_mib` of memory (it inflates or
    /// deflates over the next moments; [`Machine::balloon_mib`] reads where it is).
    pub async fn set_balloon(&self, target_mib: u32) -> Result<(), HotplugError> {
        self.qmp
            .execute("balloon", Some(json!({ "value": u64::from(target_mib) << 20 })))
            .await?;
        Ok(())
    }

    /// The memory the guest has now, as its balloon reports it, in MiB.
    pub async fn balloon_mib(&self) -> Result<u32, HotplugError> {
        let info = self.qmp.execute("query-balloon", None).await?;
        Ok(u32::try_from(info["actual"].as_u64().unwrap_or_default() >> 20).unwrap_or(u32::MAX))
    }

    async fn forget_fdsets(&self, ids: &[u64]) {
        for id in ids {
            self.forget_fdset(*id).await;
        }
    }
}

fn driver(format: DiskFormat) -> &'static str {
    match format {
        DiskFormat::Qcow2 => "qcow2",
        DiskFormat::Raw => "raw",
    }
}
