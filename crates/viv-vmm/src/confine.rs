//! How a VMM process is confined, and the host side of its jail: the uid it is given, its
//! cgroup, the files it is shown and the ownership of those files.
//!
//! Invariants:
//! - a jailed VM's run directory and the files in it belong to its uid (mode 0700), everything
//!   else it is shown is read-only to it; frozen files (disk layers, snapshot memory) belong to
//!   root ([`seal`]), so a uid that is handed out again can never write what an earlier VM left;
//! - a VM's uid record and cgroup are released only once its process is gone
//!   ([`JailResources::release`]); a VM left running by a stopped server keeps both, and the
//!   next server finds them by the VM's id;
//! - every file a jailed QEMU needs at start is in its [`viv_jail::JailSpec`]: its run
//!   directory, kernel, initramfs, every image of its disk's backing chain and its memory file.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use viv_jail::cgroup::{Cgroup, CgroupTree, Limits};
use viv_jail::uids::UidPool;
use viv_jail::{Bind, JailError, JailSpec};

use crate::{Accel, GuestMemory, LaunchError, VmSpec};

/// How VMM processes are confined.
#[derive(Debug, Clone)]
pub enum Confinement {
    /// Not at all (for measuring what the jail costs; never for untrusted guests).
    None,
    /// QEMU's seccomp filter and `no_new_privs` only: what a server that is not root can do.
    Seccomp,
    /// The full jail (needs root).
    Jail(std::sync::Arc<JailConfig>),
}

impl Confinement {
    /// A short description for logs and `/health`.
    pub fn describe(&self) -> String {
        match self {
            Self::None => "none".into(),
            Self::Seccomp => "seccomp".into(),
            Self::Jail(jail) => match &jail.cgroups {
                Some(tree) => format!("jail (uid per VM, mount namespace, seccomp, cgroup {})", tree.version()),
                None => "jail (uid per VM, mount namespace, seccomp; no cgroups on this host)".into(),
            },
        }
    }
}

/// Settings of the full jail.
#[derive(Debug)]
pub struct JailConfig {
    /// The program that builds jails: the `viv` binary (`/proc/self/exe`).
    pub jailer: PathBuf,
    /// Where VM uids come from.
    pub uids: UidPool,
    /// This server's cgroups (`None` where the host offers none).
    pub cgroups: Option<CgroupTree>,
    /// This server's key, recorded with every uid it takes.
    pub key: String,
}

/// Memory a QEMU process needs besides guest memory: its own heap, device emulation and, under
/// TCG, the translation cache (`tb-size`, 128 MiB) and the soft MMU's tables.
pub fn memory_overhead_mib(accel: Accel) -> u64 {
    match accel {
        Accel::Kvm => 192,
        _ => 448,
    }
}

/// The cgroup limits of a VM of `spec`'s shape.
pub fn limits(spec: &VmSpec) -> Limits {
    Limits {
        memory_bytes: (u64::from(spec.memory_mib) + memory_overhead_mib(spec.accel)) << 20,
        cpu_percent: spec.vcpus.max(1) * 100,
        cpu_weight: 100,
        // QEMU's threads: vCPUs, the main loop, RCU, and a worker pool of up to 64.
        pids: 256,
        io_weight: 100,
    }
}

/// The uid and cgroup a jailed VM holds.
#[derive(Debug)]
pub struct JailResources {
    /// Its uid (also its gid).
    pub uid: u32,
    /// Its cgroup.
    pub cgroup: Option<Cgroup>,
    config: std::sync::Arc<JailConfig>,
}

impl JailResources {
    /// Takes a uid and makes a cgroup for VM `vm_id`.
    pub fn allocate(config: &std::sync::Arc<JailConfig>, spec: &VmSpec) -> Result<Self, LaunchError> {
        Self::allocate_for(config, &spec.vm_id, &limits(spec))
    }

    /// Takes a uid and makes a cgroup with `limits` for VM `vm_id` (any kind of VM).
    pub fn allocate_for(
        config: &std::sync::Arc<JailConfig>,
        vm_id: &str,
        limits: &Limits,
    ) -> Result<Self, LaunchError> {
        let uid = config
            .uids
            .allocate(&format!("{} {vm_id}", config.key))
            .map_err(jail_error)?;
        let cgroup = match &config.cgroups {
            Some(tree) => match tree.create(vm_id, limits) {
                Ok(cgroup) => Some(cgroup),
                Err(err) => {
                    config.uids.release(uid);
                    return Err(jail_error(err));
                }
            },
            None => None,
        };
        Ok(Self {
            uid,
            cgroup,
            config: config.clone(),
        })
    }

    /// The resources of a running VM found after a restart (its uid from its process).
    pub fn found(config: &std::sync::Arc<JailConfig>, vm_id: &str, uid: u32) -> Self {
        Self {
            uid,
            cgroup: config.cgroups.as_ref().and_then(|tree| tree.get(vm_id)),
            config: config.clone(),
        }
    }

    /// Frees what VM `vm_id` of this server held when its process is gone and nothing holds
    /// its resources any more (a VM that died while no server ran, or one a server failed to
    /// take over): its cgroup (killing what is left in it) and the uid records in its name that
    /// no process runs as.
    pub fn release_gone(config: &JailConfig, vm_id: &str) {
        if let Some(cgroup) = config.cgroups.as_ref().and_then(|tree| tree.get(vm_id)) {
            cgroup.kill_all();
            if let Err(err) = cgroup.remove() {
                tracing::warn!(error = %err, "removing the cgroup of a VM that is gone");
            }
        }
        let owner = format!("{} {vm_id}", config.key);
        let _ = config.uids.remove_stale(|_, recorded, _| recorded != owner);
    }

    /// Frees the uid and removes the cgroup (killing what is left in it). Only once the VM's
    /// process is gone.
    pub fn release(&self) {
        if let Some(cgroup) = &self.cgroup {
            cgroup.kill_all();
            if let Err(err) = cgroup.remove() {
                tracing::warn!(error = %err, "removing a VM's cgroup");
            }
        }
        self.config.uids.release(self.uid);
    }

    /// The jail of a VM of `spec` running `program` with `args`.
    pub fn spec(
        &self,
        spec: &VmSpec,
        program: &Path,
        args: Vec<String>,
        keep_fds: Vec<i32>,
    ) -> Result<JailSpec, LaunchError> {
        let mut binds = vec![
            Bind::writable(&spec.run_dir),
            Bind::read_only(&spec.kernel),
            Bind::read_only(&spec.initramfs),
        ];
        let chain = crate::qcow2::backing_chain(&spec.root_disk).map_err(|e| {
            LaunchError::Startup(format!(
                "reading the backing chain of {}: {e}",
                spec.root_disk.display()
            ))
        })?;
        binds.extend(chain.into_iter().map(Bind::read_only));
        match &spec.memory {
            GuestMemory::SharedFile(file) => binds.push(Bind::writable(file)),
            GuestMemory::PrivateFile(file) => binds.push(Bind::read_only(file)),
            GuestMemory::Anonymous => {}
        }
        let user_mode = matches!(spec.network, Some(crate::Network::User { .. }));
        if user_mode {
            // The user-mode stack forwards DNS to the host's resolvers.
            binds.push(Bind::read_only("/etc/resolv.conf"));
        }
        let (devices, groups) = accel_access(spec.accel);
        Ok(JailSpec {
            uid: self.uid,
            gid: self.uid,
            groups,
            binds,
            devices,
            new_network: !user_mode,
            cgroup_procs: self.cgroup.as_ref().map(Cgroup::procs_files).unwrap_or_default(),
            keep_fds,
            program: program.to_path_buf(),
            args,
        })
    }

    /// Gives the VM's uid its run directory (and what is in it) and its memory file.
    pub fn hand_over(&self, spec: &VmSpec) -> Result<(), LaunchError> {
        let owned = |path: &Path, mode: u32| -> std::io::Result<()> {
            std::os::unix::fs::chown(path, Some(self.uid), Some(self.uid))?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        };
        let give = || -> std::io::Result<()> {
            self.give_run_dir(&spec.run_dir)?;
            if let GuestMemory::SharedFile(file) = &spec.memory {
                let created = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(file);
                created?;
                owned(file, 0o600)?;
            }
            Ok(())
        };
        give().map_err(|e| LaunchError::Startup(format!("giving VM {} its files: {e}", spec.vm_id)))
    }

    /// Gives the VM's uid its run directory (0700) and the files in it (0600); shared by
    /// sandbox VMs and machines.
    pub fn give_run_dir(&self, run_dir: &Path) -> std::io::Result<()> {
        std::os::unix::fs::chown(run_dir, Some(self.uid), Some(self.uid))?;
        std::fs::set_permissions(run_dir, std::fs::Permissions::from_mode(0o700))?;
        for entry in std::fs::read_dir(run_dir)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                self.give(&entry.path())?;
            }
        }
        Ok(())
    }

    /// Makes `path` (a file the VM's QEMU is about to open) the VM's.
    pub fn give(&self, path: &Path) -> std::io::Result<()> {
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.uid))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
    }
}

/// The devices and groups a jailed QEMU needs for accelerator `accel` (`/dev/kvm` and its
/// group under KVM, nothing under TCG); shared by sandbox VMs and machines.
pub fn accel_access(accel: Accel) -> (Vec<PathBuf>, Vec<u32>) {
    let (mut devices, mut groups) = (Vec::new(), Vec::new());
    if accel == Accel::Kvm {
        devices.push(PathBuf::from("/dev/kvm"));
        if let Ok(meta) = std::fs::metadata("/dev/kvm") {
            use std::os::unix::fs::MetadataExt as _;
            groups.push(meta.gid());
        }
    }
    (devices, groups)
}

fn jail_error(err: JailError) -> LaunchError {
    match err {
        JailError::UidsExhausted(_) => LaunchError::Exhausted(err.to_string()),
        other => LaunchError::Startup(format!("jailing the VM: {other}")),
    }
}

/// Makes a file that is now frozen (a disk layer, a snapshot's memory or state) root's and
/// read-only to everyone else, whoever wrote it.
pub fn seal(path: &Path) -> std::io::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        std::os::unix::fs::chown(path, Some(0), Some(0))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qcow2_with_backing(backing: Option<&Path>) -> Vec<u8> {
        let mut bytes = vec![0u8; 104];
        bytes[..4].copy_from_slice(b"QFI\xfb");
        bytes[4..8].copy_from_slice(&3u32.to_be_bytes());
        bytes[24..32].copy_from_slice(&(1u64 << 30).to_be_bytes());
        if let Some(path) = backing {
            let name = path.to_string_lossy();
            bytes[8..16].copy_from_slice(&512u64.to_be_bytes());
            bytes[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            bytes.resize(512, 0);
            bytes.extend_from_slice(name.as_bytes());
        }
        bytes
    }

    #[test]
    fn a_jail_shows_the_vm_its_files_and_nothing_writable_but_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let run_dir = dir.path().join("sandboxes").join("vm1");
        std::fs::create_dir_all(&run_dir).unwrap();
        let (base, layer) = (dir.path().join("base.qcow2"), dir.path().join("layer.qcow2"));
        std::fs::write(&base, qcow2_with_backing(None)).unwrap();
        std::fs::write(&layer, qcow2_with_backing(Some(&base))).unwrap();
        std::fs::write(run_dir.join("root.qcow2"), qcow2_with_backing(Some(&layer))).unwrap();
        let uids = UidPool::with_dir(dir.path().join("uids"), 3_000_000_000, 4).unwrap();
        let config = std::sync::Arc::new(JailConfig {
            jailer: "/proc/self/exe".into(),
            uids,
            cgroups: None,
            key: "k".into(),
        });
        let mut spec = VmSpec {
            vm_id: "vm1".into(),
            name: "viv-vm1".into(),
            run_dir: run_dir.clone(),
            kernel: "/images/vmlinuz".into(),
            initramfs: "/images/initrd".into(),
            root_disk: run_dir.join("root.qcow2"),
            memory: GuestMemory::PrivateFile("/dev/shm/t/template.mem".into()),
            restore_from: None,
            vcpus: 2,
            memory_mib: 512,
            accel: Accel::Tcg,
            extra_cmdline: String::new(),
            network: Some(crate::Network::Tap {
                netns: "/run/netns/x".into(),
                ifname: "tap0".into(),
            }),
        };
        let jail = JailResources::allocate(&config, &spec).unwrap();
        assert_eq!(jail.uid, 3_000_000_000);
        assert_eq!(config.uids.owner(jail.uid).as_deref(), Some("k vm1"));
        let jailed = jail
            .spec(&spec, Path::new("/usr/bin/qemu"), vec!["-x".into()], vec![3])
            .unwrap();
        assert_eq!((jailed.uid, jailed.gid), (jail.uid, jail.uid));
        assert!(jailed.groups.is_empty() && jailed.devices.is_empty());
        assert!(jailed.new_network, "a tap card needs no host network");
        assert_eq!(jailed.keep_fds, vec![3]);
        let writable: Vec<&Path> = jailed
            .binds
            .iter()
            .filter(|b| b.writable)
            .map(|b| b.path.as_path())
            .collect();
        assert_eq!(writable, vec![run_dir.as_path()], "only its run directory is writable");
        let shown: Vec<&Path> = jailed.binds.iter().map(|b| b.path.as_path()).collect();
        for path in [
            Path::new("/images/vmlinuz"),
            Path::new("/images/initrd"),
            layer.as_path(),
            base.as_path(),
            Path::new("/dev/shm/t/template.mem"),
        ] {
            assert!(shown.contains(&path), "{} is not shown: {shown:?}", path.display());
        }
        assert_eq!(
            limits(&spec),
            Limits {
                memory_bytes: (512 + 448) << 20,
                cpu_percent: 200,
                cpu_weight: 100,
                pids: 256,
                io_weight: 100,
            }
        );

        // KVM: the device and its group; the user-mode stack: the host's network and resolvers.
        spec.accel = Accel::Kvm;
        spec.network = Some(crate::Network::User { internet: true });
        let jailed = jail
            .spec(&spec, Path::new("/usr/bin/qemu"), Vec::new(), Vec::new())
            .unwrap();
        assert_eq!(jailed.devices, vec![PathBuf::from("/dev/kvm")]);
        assert!(!jailed.new_network);
        assert!(jailed.binds.contains(&Bind::read_only("/etc/resolv.conf")));
        jail.release();
        assert!(config.uids.owner(3_000_000_000).is_none());
    }
}
