//! Setting the manager up: the guest images, the directories, how VMMs are confined and the
//! QEMU in use.
//!
//! Invariants: nothing here starts a VM; a server that is not root never gets the full jail.

use super::*;

impl Manager {
    /// Prepares the guest images (building what is missing) and the directories.
    pub fn prepare(
        config: Config,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        progress: &dyn Progress,
    ) -> Result<Self, ImageError> {
        let images = ImageStore::open(&config.cache_dir)?;
        let boot = if config.role.runs_vms() {
            let kernel = images.kernel(config.kernel_package.as_deref(), progress)?;
            let initramfs = images.initramfs(&kernel, &config.agent_binary)?;
            let rootfs = images.debian_rootfs(&viv_image::rootfs::DebianRecipe::default(), progress)?;
            BootImages {
                kernel: kernel.image,
                initramfs,
                rootfs,
            }
        } else {
            // An API server boots nothing; requests that would are forwarded to nodes
            // (`routes/node_forward.rs`), so these paths are never opened.
            BootImages::default()
        };
        let data_key = hex::encode(&Sha256::digest(config.data_dir.to_string_lossy().as_bytes())[..4]);
        let shm_dir = PathBuf::from(format!("/dev/shm/vivarium-{}", data_key));
        // Snapshots hold guest memory and disks: nobody else's to read. An API server keeps
        // no guest memory.
        let mut dirs = vec![config.data_dir.clone(), config.data_dir.join("sandboxes")];
        if config.role.runs_vms() {
            dirs.push(shm_dir.clone());
        }
        for dir in dirs {
            std::fs::create_dir_all(&dir)
                .and_then(|()| {
                    use std::os::unix::fs::PermissionsExt as _;
                    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                })
                .map_err(|source| ImageError::Io {
                    context: format!("creating {}", dir.display()),
                    source,
                })?;
        }
        if config.role.runs_vms() {
            if let Err(err) = super::shm_sweep::record_owner(&shm_dir, &config.data_dir) {
                tracing::warn!(dir = %shm_dir.display(), %err, "recording the memory directory's data directory");
            }
        }
        for removed in super::shm_sweep::remove_orphaned(Path::new("/dev/shm")) {
            tracing::info!(dir = %removed.display(), "removed guest memory whose data directory is gone");
        }
        let accel = config.accel.resolve();
        let key_file = config.data_dir.join("channel.key");
        let channel_key = match std::fs::read_to_string(&key_file) {
            Ok(key) if key.trim().len() == 32 => key.trim().to_owned(),
            _ => {
                let key = random_id(32);
                std::fs::write(&key_file, &key).map_err(|source| ImageError::Io {
                    context: format!("writing {}", key_file.display()),
                    source,
                })?;
                key
            }
        };
        let vmm = viv_vmm::qemu::Qemu::default().confined(confinement(&config, &data_key)?);
        let storage_dir = config.data_dir.join("storage");
        let storage = viv_storage::DirPool::open(&storage_dir).map_err(|e| ImageError::Io {
            context: format!("opening the storage pool {}", storage_dir.display()),
            source: std::io::Error::other(e.to_string()),
        })?;
        Ok(Self {
            config,
            store,
            images,
            boot,
            qemu: vmm.clone(),
            vmm: Arc::new(vmm),
            accel,
            shm_dir,
            live: Mutex::new(HashMap::new()),
            metrics,
            templates: templates::TemplateCache::new(qemu_version()),
            builds: builds::Builds::default(),
            sdk_builds: sdk_builds::SdkBuilds::default(),
            builtin_builds: builtin::BuiltinBuilds::default(),
            pool: pool::Pool::default(),
            net: std::sync::OnceLock::new(),
            data_key,
            channel_key,
            resume_gates: lifecycle::ResumeGates::default(),
            parked: Default::default(),
            stopping: tokio_util::sync::CancellationToken::new(),
            base_indexes: Default::default(),
            cluster_link: std::sync::OnceLock::new(),
            layer_fetches: tokio::sync::Mutex::new(()),
            storage: Arc::new(storage),
            vm_runtime: vm_runtime::VmRuntime::default(),
            incoming: super::vm_incoming::IncomingRegistry::default(),
            events: events::EventBus::default(),
            operations: Default::default(),
            switches: Default::default(),
        })
    }
}

/// How VMMs are confined: the full jail as root, QEMU's seccomp filter alone otherwise, and
/// nothing only when asked (to measure what the jail costs).
fn confinement(config: &Config, data_key: &str) -> Result<viv_vmm::confine::Confinement, ImageError> {
    use viv_vmm::confine::{Confinement, JailConfig};
    if !config.role.runs_vms() {
        return Ok(Confinement::None);
    }
    if !config.jail {
        tracing::warn!("VMs run without a jail (--jail=false): for measurements only, never with untrusted guests");
        return Ok(Confinement::None);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        tracing::warn!(
            "VMs run with QEMU's seccomp filter only: the jail (a uid per VM, a mount namespace, a cgroup) needs root"
        );
        return Ok(Confinement::Seccomp);
    }
    let error = |e: viv_jail::JailError| ImageError::Io {
        context: "setting up the VM jail".into(),
        source: std::io::Error::other(e.to_string()),
    };
    let uids = viv_jail::uids::UidPool::new(config.jail_uids.0, config.jail_uids.1).map_err(error)?;
    let cgroups = viv_jail::cgroup::CgroupTree::open(&format!("vivarium/{data_key}")).map_err(error)?;
    if cgroups.is_none() {
        tracing::warn!("this host offers no cgroup memory controller: VMs run without cgroup limits");
    }
    std::fs::create_dir_all(viv_jail::JAIL_ROOT_MOUNT).map_err(|source| ImageError::Io {
        context: format!("creating {}", viv_jail::JAIL_ROOT_MOUNT),
        source,
    })?;
    Ok(Confinement::Jail(Arc::new(JailConfig {
        jailer: PathBuf::from("/proc/self/exe"),
        uids,
        cgroups,
        key: data_key.to_owned(),
    })))
}

/// The QEMU version, part of every template key: device state is only loadable by the same
/// QEMU.
fn qemu_version() -> String {
    std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .unwrap_or_default()
}
