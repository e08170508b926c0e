//! VMs from libvirt domain XML (`POST /vms/import` with an XML body): the common devices of a
//! domain become a VM definition whose disks and CD-ROMs are the pool's.
//!
//! Invariant: a source path is accepted only when it names a file of this server's pool
//! literally (`POOL/disks/NAME.qcow2|raw`, `POOL/isos/NAME.iso`: absolute, no `.` or `..`
//! component, a valid pool name); no other path is opened, followed or copied, so a domain can
//! never make the server read a file outside the pool.

use std::path::{Component, Path};
use std::sync::Arc;

use serde_json::json;
use viv_api::vms::{NewVm, VmDefinition, VmInfo};
use viv_storage::libvirt;

use super::Manager;
use crate::error::ApiError;

impl Manager {
    /// Defines a VM (named `name`, else as the domain says) from libvirt domain XML.
    pub fn import_vm_libvirt(self: &Arc<Self>, name: Option<String>, xml: &[u8]) -> Result<VmInfo, ApiError> {
        let domain = libvirt::parse(xml).map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let name = name.unwrap_or_else(|| domain.name.clone());
        let pool = self.storage.path().to_path_buf();
        let mut disks = Vec::new();
        let mut cdroms = Vec::new();
        for disk in &domain.disks {
            if disk.cdrom {
                let iso = match &disk.source {
                    Some(source) => Some(pool_name(&pool, "isos", &["iso"], source)?),
                    None => None,
                };
                cdroms.push(json!({"iso": iso}));
                continue;
            }
            let source = disk
                .source
                .as_deref()
                .ok_or_else(|| ApiError::BadRequest("a disk of the domain has no source file".into()))?;
            let bus = match disk.bus.as_deref() {
                Some("sata" | "ide") => "sata",
                Some("scsi") => "virtio-scsi",
                Some("nvme") => "nvme",
                _ => "virtio-blk",
            };
            disks.push(json!({
                "disk": pool_name(&pool, "disks", &["qcow2", "raw"], source)?,
                "bus": bus,
                "readOnly": disk.read_only,
                "shareable": disk.shareable,
            }));
        }
        let nics: Vec<serde_json::Value> = domain
            .nics
            .iter()
            .map(|n| {
                let model = if n.model.as_deref() == Some("e1000") || n.model.as_deref() == Some("e1000e") {
                    "e1000"
                } else {
                    "virtio-net"
                };
                let mut nic = json!({"model": model});
                if let Some(mac) = &n.mac {
                    nic["mac"] = json!(mac);
                }
                nic
            })
            .collect();
        let mut def = json!({
            "cpu": {"sockets": 1, "cores": domain.vcpus, "threads": 1},
            "firmware": if domain.uefi { "uefi" } else { "bios" },
            "disks": disks,
            "cdroms": cdroms,
            "nics": nics,
            "description": format!("imported from the libvirt domain '{}'", domain.name),
        });
        if domain.memory_mib > 0 {
            def["memoryMib"] = json!(domain.memory_mib.min(u64::from(u32::MAX)));
        }
        let def: VmDefinition =
            serde_json::from_value(def).map_err(|e| ApiError::BadRequest(format!("the domain's VM: {e}")))?;
        let info = self.create_vm(NewVm::new(name, def))?;
        tracing::info!(vm = %info.id, name = %info.name, "VM imported from libvirt domain XML");
        Ok(info)
    }
}

/// The pool name of `source` when it is literally a file of `POOL/sub` with one of `extensions`.
fn pool_name(pool: &Path, sub: &str, extensions: &[&str], source: &str) -> Result<String, ApiError> {
    let refuse = || {
        ApiError::BadRequest(format!(
            "the domain's file '{source}' is not in this server's storage pool ({}/{sub}); import or upload it first (viv disk import, viv iso add) and name it by its pool path",
            pool.display()
        ))
    };
    let path = Path::new(source);
    let literal = path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if !literal || path.parent() != Some(&pool.join(sub)) {
        return Err(refuse());
    }
    let file = path.file_name().and_then(|f| f.to_str()).ok_or_else(refuse)?;
    let (stem, extension) = file.rsplit_once('.').ok_or_else(refuse)?;
    // Written exactly so: `Path` would read past `.` components and doubled separators.
    let exact = pool.join(sub).join(file).as_os_str() == std::ffi::OsStr::new(source);
    if !exact || !extensions.contains(&extension) || viv_storage::name::check(stem).is_err() {
        return Err(refuse());
    }
    Ok(stem.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_literal_pool_paths_are_names() {
        let pool = Path::new("/data/storage");
        assert_eq!(
            pool_name(pool, "disks", &["qcow2"], "/data/storage/disks/web.qcow2").unwrap(),
            "web"
        );
        for bad in [
            "/data/storage/disks/../../../etc/shadow.qcow2",
            "/data/storage/disks/./web.qcow2",
            "data/storage/disks/web.qcow2",
            "/data/storage/isos/web.qcow2",
            "/data/storage/disks/web.vmdk",
            "/data/storage/disks/.tmp-x.qcow2",
            "/etc/shadow",
        ] {
            assert!(pool_name(pool, "disks", &["qcow2"], bad).is_err(), "{bad}");
        }
    }
}
