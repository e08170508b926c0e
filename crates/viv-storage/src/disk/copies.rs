//! Disks made from images the server holds: a sandbox's root file system layer flattened into
//! the pool, a copy of one internal snapshot of a disk (forks of running VMs), and a VM backup
//! (a qcow2 chain the server wrote) restored into a new disk or over an existing one.
//!
//! Invariants: as every disk of the pool, each is written under a temporary name and linked
//! into place without replacing anything; neither follows a backing file a user supplied (the
//! first reads only server-made chains, the second a pool disk whose backing `disk_info` checked).

use std::path::Path;

use super::{info_as_io, CloneError, DiskFormat, DiskInfo, DiskInfoError, ImportError, WipeError};
use crate::name;
use crate::pool::DISKS;
use crate::qemu_img;
use crate::DirPool;

impl DirPool {
    /// Stores an image the server made itself (a sandbox's root file system layer, whose
    /// backing chain names server files) as standalone qcow2 disk `name`: the chain is
    /// flattened, so the disk depends on nothing outside the pool. Never for images from
    /// outside (their backing files would be followed): those go through [`DirPool::import_disk`].
    pub async fn import_own_image(
        &self,
        name: &str,
        source: &Path,
        progress: &mut (dyn FnMut(f64) + Send),
    ) -> Result<DiskInfo, ImportError> {
        name::check(name)?;
        if self.disk_exists(name) {
            return Err(ImportError::Exists(name.into()));
        }
        let temp = self.temp(DISKS, name, DiskFormat::Qcow2.as_str());
        qemu_img::convert(source, "qcow2", &temp.path, "qcow2", progress).await?;
        if !self.publish_disk(temp, name, DiskFormat::Qcow2).await? {
            return Err(ImportError::Exists(name.into()));
        }
        self.disk_info(name).await.map_err(|e| info_as_io(name, e))
    }

    /// Copies internal snapshot `tag` of qcow2 disk `source` into a new standalone qcow2 disk
    /// `name` (its other snapshots stay behind). `source` may be in use by a running VM: an
    /// internal snapshot's clusters are shared copy-on-write, so the VM never changes them,
    /// and the image is read without taking its lock (`-U`).
    pub async fn copy_disk_snapshot(
        &self,
        source: &str,
        tag: &str,
        name: &str,
        progress: &mut (dyn FnMut(f64) + Send),
    ) -> Result<DiskInfo, CloneError> {
        name::check(tag)?;
        let source_info = self.clone_source(source, name).await?;
        let temp = self.temp(DISKS, name, DiskFormat::Qcow2.as_str());
        let snapshot = format!("snapshot.name={tag}");
        qemu_img::convert_with(
            &source_info.path,
            source_info.format.as_str(),
            &["-U", "-l", &snapshot],
            &temp.path,
            DiskFormat::Qcow2.as_str(),
            progress,
        )
        .await?;
        if !self.publish_disk(temp, name, DiskFormat::Qcow2).await? {
            return Err(CloneError::Exists(name.into()));
        }
        Ok(self.disk_info(name).await?)
    }

    /// Restores a backup file the server made (qcow2, whose backing chain is other backup files
    /// beside it) into the new standalone disk `name` of `format`.
    pub async fn import_backup(
        &self,
        name: &str,
        source: &Path,
        format: DiskFormat,
        progress: &mut (dyn FnMut(f64) + Send),
    ) -> Result<DiskInfo, ImportError> {
        name::check(name)?;
        if self.disk_exists(name) {
            return Err(ImportError::Exists(name.into()));
        }
        let temp = self.temp(DISKS, name, format.as_str());
        qemu_img::convert(source, "qcow2", &temp.path, format.as_str(), progress).await?;
        if !self.publish_disk(temp, name, format).await? {
            return Err(ImportError::Exists(name.into()));
        }
        self.disk_info(name).await.map_err(|e| info_as_io(name, e))
    }

    /// Replaces the contents of disk `name` with a backup file the server made (see
    /// [`DirPool::import_backup`]), keeping its name and format; refused while `in_use` names a
    /// user or another disk is backed by it. The old file is replaced only once the new one is
    /// complete.
    pub async fn restore_disk(
        &self,
        name: &str,
        source: &Path,
        in_use: impl Fn(&str) -> Option<String>,
        progress: &mut (dyn FnMut(f64) + Send),
    ) -> Result<DiskInfo, WipeError> {
        name::check(name)?;
        let info = self.disk_info(name).await.map_err(|e| match e {
            DiskInfoError::NotFound(n) => WipeError::NotFound(n),
            other => WipeError::Info(other),
        })?;
        let temp = self.temp(DISKS, name, info.format.as_str());
        qemu_img::convert(source, "qcow2", &temp.path, info.format.as_str(), progress).await?;
        self.replace_disk_file(name, &info, temp, in_use).await
    }
}
