//! OVA export and import of VMs: a tar (ustar) holding an OVF descriptor first and one
//! streamOptimized VMDK per disk (`viv_storage::ovf` reads and writes the descriptor).
//!
//! Invariants:
//! - export reads a stopped VM's disks under its gate, and builds the package in a file that is
//!   unlinked as soon as it is created, so nothing is left behind whatever happens to the
//!   download;
//! - an uploaded package is hostile: it is spooled to an unlinked file (at most
//!   [`MAX_OVA_SIZE`] bytes); only regular entries with a plain name are looked at, at most
//!   [`MAX_OVA_ENTRIES`]; the descriptor is size-limited and parsed without entity expansion;
//!   each disk image is copied out of its entry and enters the pool through the pool's import
//!   (probed, refused with a backing file, data file or extent outside itself, converted to
//!   qcow2);
//! - an import either creates the VM and all its disks, or nothing: disks made before a failure
//!   are deleted.

use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::Arc;

use serde_json::json;
use viv_api::vms::{Firmware, NewVm, NicModel, VmDefinition, VmInfo};
use viv_storage::ovf::{self, Ovf, OvfDisk, OvfNic};

use super::storage::api;
use super::vms::{definition_of, state_of};
use super::Manager;
use crate::error::ApiError;

/// The largest OVA accepted, bytes.
pub const MAX_OVA_SIZE: u64 = viv_storage::size::MAX_DISK_SIZE;
/// The most tar entries looked at.
pub const MAX_OVA_ENTRIES: usize = 64;

impl Manager {
    /// A scratch file under `DATA_DIR/exports`, already unlinked.
    fn scratch_file(&self) -> Result<std::fs::File, ApiError> {
        let dir = self.config.data_dir.join("exports");
        std::fs::create_dir_all(&dir).map_err(|e| ApiError::Internal(format!("creating {}: {e}", dir.display())))?;
        let path = dir.join(format!(".tmp-{}", super::random_id(16)));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| ApiError::Internal(format!("creating {}: {e}", path.display())))?;
        let _ = std::fs::remove_file(&path);
        Ok(file)
    }

    /// VM `vm` (stopped) as an OVA package: the file, positioned at its start, and its length.
    pub async fn export_vm_ova(self: &Arc<Self>, vm: &str) -> Result<(tokio::fs::File, u64, String), ApiError> {
        let (row, _held) = self.lock_vm(vm).await?;
        let state = state_of(&row)?;
        if state.is_active() || self.vm_runtime.get(&row.id).is_some() {
            return Err(ApiError::Conflict(format!(
                "VM '{}' is {}: stop it before exporting it",
                row.name,
                state.as_str()
            )));
        }
        let def = definition_of(&row.definition)?;
        let mut disks = Vec::new();
        let mut images = Vec::new();
        for (i, disk) in def.disks.iter().enumerate() {
            let info = self.storage.disk_info(&disk.disk).await.map_err(|e| api(e.kind(), e))?;
            let export = self
                .storage
                .export_disk(&disk.disk, viv_storage::ExportFormat::Vmdk)
                .await
                .map_err(|e| api(e.kind(), e))?;
            disks.push(OvfDisk {
                file: format!("disk{i}.vmdk"),
                capacity: info.virtual_size,
            });
            images.push((export.file.into_std().await, export.len));
        }
        let descriptor = Ovf {
            name: row.name.clone(),
            cpus: def.cpu.vcpus(),
            memory_mib: u64::from(def.memory_mib),
            disks: disks.clone(),
            nics: def
                .nics
                .iter()
                .map(|n| OvfNic {
                    model: Some(
                        match n.model {
                            NicModel::E1000 => "E1000",
                            NicModel::VirtioNet => "virtio",
                        }
                        .to_owned(),
                    ),
                })
                .collect(),
            uefi: def.firmware == Firmware::Uefi,
        };
        let sizes: Vec<u64> = images.iter().map(|(_, len)| *len).collect();
        let text = ovf::write(&descriptor, &sizes);
        let out = self.scratch_file()?;
        let name = row.name.clone();
        let packed = tokio::task::spawn_blocking(move || -> std::io::Result<(std::fs::File, u64)> {
            let mut builder = tar::Builder::new(out);
            let mut header = tar::Header::new_ustar();
            header.set_size(text.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append_data(&mut header, format!("{name}.ovf"), text.as_bytes())?;
            for (disk, (file, len)) in disks.iter().zip(images) {
                let mut header = tar::Header::new_ustar();
                header.set_size(len);
                header.set_mode(0o644);
                header.set_cksum();
                builder.append_data(&mut header, &disk.file, file)?;
            }
            let mut out = builder.into_inner()?;
            out.flush()?;
            let len = out.seek(SeekFrom::End(0))?;
            out.seek(SeekFrom::Start(0))?;
            Ok((out, len))
        })
        .await
        .map_err(|e| ApiError::Internal(format!("packing the OVA: {e}")))?
        .map_err(|e| ApiError::Internal(format!("packing the OVA: {e}")))?;
        tracing::info!(vm = %row.id, bytes = packed.1, "VM exported as an OVA");
        Ok((tokio::fs::File::from_std(packed.0), packed.1, row.name))
    }

    /// Creates a VM (named `name`, else as the package says) and its disks from an uploaded OVA.
    pub async fn import_vm_ova(
        self: &Arc<Self>,
        name: Option<String>,
        body: &mut (impl tokio::io::AsyncRead + Unpin),
    ) -> Result<VmInfo, ApiError> {
        use tokio::io::AsyncWriteExt;
        let mut spool = tokio::fs::File::from_std(self.scratch_file()?);
        let copied = tokio::io::copy(&mut tokio::io::AsyncReadExt::take(body, MAX_OVA_SIZE + 1), &mut spool)
            .await
            .map_err(|e| ApiError::BadRequest(format!("reading the OVA upload: {e}")))?;
        if copied > MAX_OVA_SIZE {
            return Err(ApiError::TooLarge(format!(
                "the OVA is larger than {MAX_OVA_SIZE} bytes"
            )));
        }
        spool
            .flush()
            .await
            .map_err(|e| ApiError::Internal(format!("spooling the OVA: {e}")))?;
        let spool = spool.into_std().await;
        // Read the tar's index and the descriptor.
        let (spool, descriptor, entries) = tokio::task::spawn_blocking(move || read_package(spool))
            .await
            .map_err(|e| ApiError::Internal(format!("reading the OVA: {e}")))??;
        let spool = Arc::new(spool);
        let package = ovf::parse(&descriptor.1).map_err(|e| ApiError::BadRequest(format!("{}: {e}", descriptor.0)))?;
        let name = name.unwrap_or_else(|| package.name.clone());
        super::check_name("VM", &name).map_err(|e| {
            ApiError::BadRequest(format!(
                "{e} (the package names the VM '{}'; give another with ?name=)",
                package.name
            ))
        })?;
        if self.store.vm(&name)?.is_some() {
            return Err(ApiError::Conflict(format!("a VM named '{name}' exists already")));
        }
        if package.disks.is_empty() {
            return Err(ApiError::BadRequest("the OVF descriptor attaches no disk".into()));
        }
        let disk_names: Vec<String> = (0..package.disks.len()).map(|i| format!("{name}-disk{i}")).collect();
        for disk in &disk_names {
            viv_storage::name::check(disk).map_err(|e| ApiError::BadRequest(format!("disk name '{disk}': {e}")))?;
        }
        let mut made: Vec<String> = Vec::new();
        let outcome = async {
            for (disk, target) in package.disks.iter().zip(&disk_names) {
                let (_, offset, len) = entries
                    .iter()
                    .find(|(entry, _, _)| *entry == disk.file)
                    .ok_or_else(|| {
                        ApiError::BadRequest(format!("the OVA has no file '{}' the descriptor names", disk.file))
                    })?;
                let image = self.extract(&spool, *offset, *len).await?;
                let info = self
                    .storage
                    .import_disk(target, &image.0, viv_storage::DiskFormat::Qcow2, &mut |_| {})
                    .await;
                drop(image);
                let info = info.map_err(|e| api(e.kind(), format!("disk '{}' of the OVA: {e}", disk.file)))?;
                made.push(info.name);
            }
            let nics: Vec<serde_json::Value> = package
                .nics
                .iter()
                .map(|n| {
                    let e1000 = n
                        .model
                        .as_deref()
                        .is_some_and(|m| m.to_ascii_lowercase().contains("e1000"));
                    json!({"model": if e1000 { "e1000" } else { "virtio-net" }})
                })
                .collect();
            let mut def = json!({
                "cpu": {"sockets": 1, "cores": package.cpus, "threads": 1},
                "firmware": if package.uefi { "uefi" } else { "bios" },
                "disks": disk_names.iter().map(|d| json!({"disk": d})).collect::<Vec<_>>(),
                "nics": nics,
                "description": format!("imported from the OVA of '{}'", package.name),
            });
            if package.memory_mib > 0 {
                def["memoryMib"] = json!(package.memory_mib.min(u64::from(u32::MAX)));
            }
            let def: VmDefinition =
                serde_json::from_value(def).map_err(|e| ApiError::BadRequest(format!("the OVA's VM: {e}")))?;
            self.create_vm(NewVm::new(name.clone(), def))
        }
        .await;
        if outcome.is_err() {
            for disk in &made {
                let _ = self.storage.delete_disk(disk, viv_storage::unused).await;
            }
        }
        let info = outcome?;
        tracing::info!(vm = %info.id, name = %info.name, disks = made.len(), "VM imported from an OVA");
        Ok(info)
    }
}

impl Manager {
    /// Copies `len` bytes at `offset` of `spool` into a named scratch file (removed on drop),
    /// which the pool's import reads.
    async fn extract(&self, spool: &Arc<std::fs::File>, offset: u64, len: u64) -> Result<Scratch, ApiError> {
        let dir = self.config.data_dir.join("exports");
        let path = dir.join(format!(".tmp-{}.img", super::random_id(16)));
        let scratch = Scratch(path.clone());
        let spool = spool.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::os::unix::fs::FileExt;
            let mut out = std::fs::OpenOptions::new().write(true).create_new(true).open(&path)?;
            let mut buffer = vec![0u8; 1 << 20];
            let mut done = 0u64;
            while done < len {
                let want = ((len - done) as usize).min(buffer.len());
                spool.read_exact_at(&mut buffer[..want], offset + done)?;
                out.write_all(&buffer[..want])?;
                done += want as u64;
            }
            out.sync_all()
        })
        .await
        .map_err(|e| ApiError::Internal(format!("extracting a disk of the OVA: {e}")))?
        .map_err(|e| ApiError::Internal(format!("extracting a disk of the OVA: {e}")))?;
        Ok(scratch)
    }
}

/// A scratch file removed when dropped.
struct Scratch(std::path::PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `(entry name, data offset, length)` of the regular entries of a package.
type Entries = Vec<(String, u64, u64)>;

/// A package read: its spool file, its descriptor `(entry name, bytes)` and its entries.
type Package = (std::fs::File, (String, Vec<u8>), Entries);

/// Reads the package's index: its regular entries with plain names, and the first `.ovf`
/// entry's bytes (at most the descriptor limit).
fn read_package(mut spool: std::fs::File) -> Result<Package, ApiError> {
    let bad = |m: String| ApiError::BadRequest(format!("the OVA is not a valid package: {m}"));
    spool
        .seek(SeekFrom::Start(0))
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let mut entries = Vec::new();
    let mut descriptor = None;
    {
        let mut archive = tar::Archive::new(&spool);
        for (n, entry) in archive.entries().map_err(|e| bad(e.to_string()))?.enumerate() {
            if n >= MAX_OVA_ENTRIES {
                return Err(bad(format!("more than {MAX_OVA_ENTRIES} entries")));
            }
            let mut entry = entry.map_err(|e| bad(e.to_string()))?;
            if entry.header().entry_type() != tar::EntryType::Regular {
                continue;
            }
            let name = entry
                .path()
                .map_err(|e| bad(e.to_string()))?
                .to_string_lossy()
                .into_owned();
            let plain = !name.is_empty() && !name.contains('/') && !name.starts_with('.');
            if !plain {
                continue;
            }
            let (offset, len) = (entry.raw_file_position(), entry.size());
            if name.ends_with(".ovf") && descriptor.is_none() {
                if len > ovf::MAX_OVF_SIZE as u64 {
                    return Err(bad(format!(
                        "its descriptor '{name}' is larger than {} bytes",
                        ovf::MAX_OVF_SIZE
                    )));
                }
                let mut bytes = Vec::new();
                (&mut entry)
                    .take(ovf::MAX_OVF_SIZE as u64)
                    .read_to_end(&mut bytes)
                    .map_err(|e| bad(e.to_string()))?;
                descriptor = Some((name.clone(), bytes));
            }
            entries.push((name, offset, len));
        }
    }
    let descriptor = descriptor.ok_or_else(|| bad("it holds no .ovf descriptor".into()))?;
    Ok((spool, descriptor, entries))
}
