//! The sandbox manager: creates sandboxes (VM + agent), watches them, enforces timeouts, kills
//! them and cleans up after them.
//!
//! Invariants:
//! - every live sandbox has a row in the store; rows of sandboxes whose VM died say `failed`;
//! - a running sandbox's row names its VM process (pid and start time) and network slot, so
//!   its VM can outlive this server and be taken over by the next one ([`recovery`]);
//! - a sandbox's files (run directory with overlay, sockets and logs, and its memory file) exist
//!   only while its VM may run: they are removed on kill, on VM failure, on failed creation, and
//!   at server start for anything no VM that is still running needs.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng as _;
use sha2::{Digest, Sha256};
use viv_api::{CreatedSandbox, NewSandbox, SandboxInfo, SandboxState};
use viv_image::{BootImages, ImageError, ImageStore, Progress};
use viv_vmm::{Accel, GuestMemory, Restore, SnapshotMemory, Vm, VmSpec, Vmm};

use crate::agent_client::AgentClient;
use crate::error::ApiError;
use crate::store::{now_rfc3339_ms, SandboxRow, SnapshotRow, Store};
use crate::Metrics;

mod builds;
mod builtin;
pub use builtin::{builtin_named, canonical_template_name, BUILTINS};
mod console_cap;
mod copy_archive;
pub mod events;
mod info;
mod layer_cache;
mod layer_fetch;
pub use layer_fetch::{ClusterLink, CLUSTER_SECRET_HEADER};
mod lifecycle;
mod memory_chain;
mod network;
mod node_report;
pub mod operations;
mod parked;
mod pause_fold;
mod pool;
mod pool_cpu;
mod sandbox_vm;
pub use pool::PoolPolicy;
pub use snapshot_move::{ExportedFile, SNAPSHOT_CHANNEL_KEY_HEADER, SNAPSHOT_MEMORY_HEADER};
mod migrate_remote;
pub use migrate_remote::MIGRATION_PROTOCOL;
mod recovery;
mod sdk_builds;
mod sdk_files;
mod sdk_spec;
mod sdk_tags;
mod setup;
mod shm_sweep;
mod snapshot_move;
mod snapshot_replicas;
mod snapshot_tree;
mod snapshots;
pub mod stopping;
mod storage;
mod switches;
mod template_catalog;
mod template_commit;
mod template_versions;
mod templates;
mod timeouts;
mod vm_backups;
mod vm_bridge;
mod vm_clone;
mod vm_cloudinit;
mod vm_console;
mod vm_fork;
mod vm_hotplug;
mod vm_incoming;
mod vm_libvirt;
mod vm_media;
mod vm_metrics;
mod vm_migrate;
mod vm_move;
pub use vm_move::{AdoptVm, DISK_SHA256_HEADER};
mod vm_nics;
mod vm_ova;
mod vm_recovery;
mod vm_runtime;
mod vm_snapshots;
mod vm_spec;
mod vms;
pub mod volume_fs;
pub mod volume_fuse;
mod volumes;

pub use builds::{BuildJob, BuildLog};
pub use recovery::{Recovery, ShutdownMode};
pub use sdk_builds::BuildStatusQuery;
pub use sdk_spec::StartBuild;
pub use vm_bridge::VmAgent;
pub use vm_console::{ConsoleClient, ConsoleHub, HubLimits, CONSOLE_LOG_CAP};
pub use vm_incoming::Channel as IncomingChannel;
pub use vm_runtime::LiveVm;
pub use vms::valid_mac_prefix;

/// Server settings that shape sandboxes.
#[derive(Debug, Clone)]
pub struct Config {
    /// State: database, sandbox run directories.
    pub data_dir: PathBuf,
    /// Image cache (kernel, initramfs, root file systems); survives reinstalls.
    pub cache_dir: PathBuf,
    /// Accelerator setting (`auto` is resolved at start).
    pub accel: Accel,
    /// Default vCPUs per sandbox.
    pub vcpus: u32,
    /// Default memory per sandbox in MiB.
    pub memory_mib: u32,
    /// The statically linked agent binary put into the initramfs.
    pub agent_binary: PathBuf,
    /// Kernel package override.
    pub kernel_package: Option<String>,
    /// How long a cold boot may take until the agent answers.
    pub boot_timeout: Duration,
    /// Name of this node, reported as `clientID`.
    pub node_name: String,
    /// Start sandboxes by restoring template snapshots (experimental; otherwise every sandbox
    /// boots).
    pub snapshots: bool,
    /// How many warm VMs are kept ready per template snapshot (see [`PoolPolicy`]).
    pub pool: PoolPolicy,
    /// Versions kept per template (the oldest untagged, unused ones beyond it are deleted after
    /// each build or commit); `None` keeps all.
    pub keep_versions: Option<u32>,
    /// Longest chain of memory diffs a node save extends; 0 saves nodes' memory whole.
    pub memory_diff_chain: usize,
    /// How long a paused sandbox's stopped VM is kept, so a resume within it continues that VM
    /// instead of restoring the node (zero: a pause always stops the VM).
    pub pause_keep_warm: Duration,
    /// How many other nodes of the cluster get a copy of each paused sandbox's snapshot, so it
    /// resumes elsewhere when this node dies (0: none).
    pub pause_replicas: usize,
    /// Domain of sandbox host names (`PORT-SANDBOXID.DOMAIN`), reported to SDKs for `get_host`.
    pub domain: String,
    /// How sandboxes are networked.
    pub network: NetworkMode,
    /// Host-side addresses of the `isolated` mode (a `/30` per running sandbox).
    pub net_pool: viv_net::Cidr,
    /// Network slots of the `isolated` mode made ahead, ready for the next sandbox.
    pub net_spares: usize,
    /// Where VM switches created without a subnet get theirs (a /24 each).
    pub switch_range: viv_net::Cidr,
    /// The first three pairs of generated VM MAC addresses (`52:54:00`).
    pub mac_prefix: String,
    /// PEM certificates sandboxes trust besides their image's (for TLS-intercepting egress).
    pub guest_ca_certificates: Option<String>,
    /// Jail every VMM (off only to measure what the jail costs).
    pub jail: bool,
    /// The host-wide uid range jailed VMMs run as: first uid and count.
    pub jail_uids: (u32, u32),
    /// Registry mirrors tried first for Docker Hub images (Docker's `registry-mirrors`).
    pub registry_mirrors: Vec<String>,
    /// PEM CA certificates trusted for HTTPS registries and mirrors besides the host's store.
    pub registry_ca_certificates: Option<String>,
    /// Template build layers shared with other servers of this host (`--layer-cache-dir`).
    pub layer_cache_dir: Option<PathBuf>,
    /// What this server does in its cluster: an API server (`api`) prepares no boot image and
    /// runs no VM; its manager only reads and writes the store.
    pub role: viv_api::nodes::NodeRole,
}

/// How sandboxes reach networks outside their VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkMode {
    /// No network card: sandboxes reach nothing (they are controlled over virtio-serial anyway).
    None,
    /// QEMU's user-mode network stack: outbound connections through NAT in the QEMU process, no
    /// root needed; a sandbox created with `allow_internet_access: false` gets a restricted one.
    User,
    /// A network namespace per sandbox with a tap device and a veth pair to the host, nftables
    /// NAT and per-sandbox egress rules (needs root).
    Isolated,
}

impl std::str::FromStr for NetworkMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "user" => Ok(Self::User),
            "isolated" => Ok(Self::Isolated),
            other => Err(format!("unknown network mode '{other}': use isolated, user or none")),
        }
    }
}

impl std::fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::User => "user",
            Self::Isolated => "isolated",
        })
    }
}

/// A sandbox whose VM runs.
pub struct LiveSandbox {
    /// Its id.
    pub id: String,
    /// The VM.
    pub vm: Box<dyn Vm>,
    /// The agent client.
    pub agent: AgentClient,
    run_dir: PathBuf,
    memory_file: PathBuf,
    /// The overlay the guest writes to (replaced when a running sandbox is snapshotted).
    root_disk: Mutex<PathBuf>,
    /// Serializes pause, fork, snapshot and kill of this sandbox.
    op: tokio::sync::Mutex<()>,
    /// Its network namespace in the `isolated` mode (removed when dropped: by
    /// [`LiveSandbox::release_network`] once the VM is gone, or with this value).
    slot: Mutex<Option<Arc<viv_net::Slot>>>,
}

impl LiveSandbox {
    /// Where QEMU writes the guest's serial console (a file the guest fills: read it bounded).
    pub fn console_log(&self) -> PathBuf {
        self.run_dir.join("console.log")
    }

    /// Waits for a pause, fork, snapshot or kill of this sandbox in progress to end.
    pub async fn settled(&self) {
        drop(self.op.lock().await);
    }

    /// The network slot, while the VM has one.
    fn slot(&self) -> Option<Arc<viv_net::Slot>> {
        self.slot.lock().expect("slot lock").clone()
    }

    /// Removes the VM's namespace and links now (its VM has stopped), rather than whenever the
    /// last handle of this sandbox goes.
    async fn release_network(&self) {
        if let Some(removal) = self.release_network_soon() {
            let _ = removal.await;
        }
    }

    /// Starts removing the VM's namespace and links (tens of milliseconds of netlink and
    /// nftables work) and returns that task, which a pause does not wait for, to answer
    /// sooner. The slot's index is reused only once it is removed, and a runtime shutting down
    /// never abandons it: a blocking task that never ran drops the slot, which removes it.
    fn release_network_soon(&self) -> Option<tokio::task::JoinHandle<()>> {
        let slot = self.slot.lock().expect("slot lock").take()?;
        Some(tokio::task::spawn_blocking(move || drop(slot)))
    }
}

/// Where a VM's first state comes from.
enum Origin<'a> {
    /// Boot the kernel with this root layer, guest memory in a file of the VM's own.
    Boot { layer: &'a Path, memory_file: PathBuf },
    /// Restore a template snapshot (memory mapped privately from the template's file).
    Template(&'a templates::TemplateSnapshot),
    /// Restore a snapshot node (memory in its state file).
    Node(&'a Path),
}

/// What a new sandbox starts from.
enum Source {
    /// A template (built, `base`, or an imported image): a restore of its snapshot, or a boot.
    Template(Box<templates::Recipe>),
    /// A snapshot node.
    Node(Box<SnapshotRow>),
}

/// How to start a sandbox's VM.
struct StartRequest<'a> {
    source: &'a Source,
    /// Environment for the agent; `None` keeps what a restored agent has.
    env_vars: Option<BTreeMap<String, String>>,
    /// The access token a restored agent still expects (that of the sandbox it was saved from).
    guest_token: Option<String>,
    /// Boot even if a template snapshot could be restored.
    cold_boot: bool,
    /// Lifetime in seconds from when the sandbox runs.
    timeout: u64,
    /// A warm VM from the pool to use instead of starting one.
    pooled: Option<Arc<LiveSandbox>>,
}

impl<'a> StartRequest<'a> {
    /// A start from `source`. A restored agent keeps its environment and is reached with the
    /// token it had when saved.
    fn new(source: &'a Source, timeout: u64) -> Self {
        let guest_token = match source {
            Source::Node(node) => node.guest_token.clone(),
            Source::Template(_) => None,
        };
        Self {
            source,
            guest_token,
            env_vars: None,
            cold_boot: false,
            timeout,
            pooled: None,
        }
    }
}

/// What a failed start leaves of the sandbox's row.
enum OnFailure {
    /// Delete it (a new sandbox).
    Delete,
    /// Put it back (a paused sandbox that failed to resume stays paused).
    Restore(Box<SandboxRow>),
}

/// The sandbox manager.
pub struct Manager {
    config: Config,
    store: Arc<Store>,
    images: ImageStore,
    boot: BootImages,
    vmm: Arc<dyn Vmm>,
    accel: Accel,
    shm_dir: PathBuf,
    live: Mutex<HashMap<String, Arc<LiveSandbox>>>,
    metrics: Arc<Metrics>,
    templates: templates::TemplateCache,
    builds: builds::Builds,
    sdk_builds: sdk_builds::SdkBuilds,
    builtin_builds: builtin::BuiltinBuilds,
    pool: pool::Pool,
    /// Isolated networking, once started.
    net: std::sync::OnceLock<viv_net::Network>,
    /// A short key of the data directory, naming host resources (memory directory, network
    /// namespaces, links, nftables table) so servers of different data directories never clash.
    data_key: String,
    /// Key of the agent channel's reset markers, the same for every VM of this data directory
    /// (restored VMs keep the key their snapshot's agent was given).
    channel_key: String,
    /// Serializes resumes of each sandbox.
    resume_gates: lifecycle::ResumeGates,
    /// Stopped VMs of sandboxes paused moments ago, kept for a quick resume.
    parked: parked::ParkedVms,
    /// Zero-page indexes of the memory files whole states restore over.
    base_indexes: Arc<memory_chain::BaseIndexes>,
    /// QEMU, for the VM manager's machines.
    #[allow(dead_code)] // used by the VM runtime being built
    qemu: viv_vmm::qemu::Qemu,
    /// The directory storage pool of VM disks, ISOs and cloud-init seeds.
    storage: Arc<viv_storage::DirPool>,
    /// The VM manager's running VMs.
    vm_runtime: vm_runtime::VmRuntime,
    /// VMs migrating in from other servers.
    incoming: vm_incoming::IncomingRegistry,
    /// State changes, for `GET /events`.
    events: events::EventBus,
    /// Asynchronous operations (clone, import, wipe).
    operations: operations::Operations,
    /// VM switches: serializes their changes on the host.
    switches: switches::Switches,
    /// This node's link to the other nodes of its cluster, once it joined.
    cluster_link: std::sync::OnceLock<layer_fetch::ClusterLink>,
    /// Serializes fetches of layers from other nodes.
    layer_fetches: tokio::sync::Mutex<()>,
    /// Cancelled when the server starts shutting down: the periodic tasks end on it, so none of
    /// them is waiting on a timer while the runtime tears its timer down.
    stopping: tokio_util::sync::CancellationToken,
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

fn rfc3339_ms(ms: i64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)).to_string()
}

/// A sandbox lifetime in seconds: the default when absent, else checked against the bounds.
fn lifetime(timeout: Option<u64>) -> Result<u64, ApiError> {
    let timeout = timeout.unwrap_or(viv_api::DEFAULT_TIMEOUT_SECS);
    if timeout == 0 || timeout > viv_api::MAX_TIMEOUT_SECS {
        return Err(ApiError::BadRequest(format!(
            "timeout must be between 1 and {} seconds, got {timeout}",
            viv_api::MAX_TIMEOUT_SECS
        )));
    }
    Ok(timeout)
}

/// Checks a VM shape asked for by a client: `cpuCount` and `memoryMB` within what the host can
/// run.
fn check_shape(vcpus: u32, memory_mib: u32) -> Result<(), ApiError> {
    crate::capacity::HostLimits::host().check_shape(vcpus, memory_mib)
}

/// The policy egress `rules` describe; 400 naming the list when an entry is wrong.
fn checked_policy(rules: &viv_net::PolicySpec) -> Result<viv_net::Policy, ApiError> {
    viv_net::Policy::from_spec(rules).map_err(|e| ApiError::BadRequest(format!("network.{e}")))
}

/// A random id of lowercase letters and digits.
pub fn random_id(len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::thread_rng();
    (0..len)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

/// 16 bytes written as a UUID (`8-4-4-4-12` hex digits), the shape E2B's ids have.
pub fn uuid_shaped(bytes: [u8; 16]) -> String {
    let hex = hex::encode(bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// Longest name of a volume, VM, disk or ISO.
pub const MAX_NAME: usize = 128;

/// Checks the name of a `what` (volume, VM, disk, ISO): 1–128 of letters, digits, `-`, `_` and
/// `.`, starting with a letter or digit (so never a path, `.` or `..`).
pub fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "invalid {what} name {name:?}: use 1 to {MAX_NAME} letters, digits, '-', '_' and '.', starting with a letter or digit"
        )))
    }
}

/// A random (version 4) UUID.
pub fn random_uuid() -> String {
    let mut bytes: [u8; 16] = rand::random();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    uuid_shaped(bytes)
}

impl Manager {
    /// How VMM processes are confined, for a person.
    pub fn confinement(&self) -> String {
        self.vmm.confinement()
    }

    /// Whether sandboxes start from template snapshots.
    pub fn snapshots(&self) -> bool {
        self.config.snapshots
    }

    /// The accelerator sandboxes run with.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    fn run_dir(&self, id: &str) -> PathBuf {
        self.config.data_dir.join("sandboxes").join(id)
    }

    fn memory_file(&self, id: &str) -> PathBuf {
        self.shm_dir.join(format!("{id}.mem"))
    }

    /// Creates a sandbox behind a fresh disk overlay: a boot of its template's root layer, or,
    /// when snapshots are enabled and `coldBoot` is not set, a restore of the template's snapshot
    /// (built on first use).
    pub async fn create(self: &Arc<Self>, req: NewSandbox) -> Result<CreatedSandbox, ApiError> {
        let template = req
            .template_id
            .as_deref()
            .map_or(viv_api::DEFAULT_TEMPLATE, builtin::canonical_template_name);
        let template = template.to_owned();
        let timeout = lifetime(req.timeout)?;
        let mounts = self.check_mounts(req.volume_mounts.as_deref())?;
        let mut node = self.store.snapshot(&template)?;
        // A pause or fork node may be folded into its sandbox's next pause (`pause_fold.rs`):
        // held off until this sandbox, started from it, is its user; one under way ends first.
        let _no_fold = match &node {
            Some(found) => self.hold_folds(found).await,
            None => None,
        };
        if let (Some(_), Some(found)) = (&_no_fold, &node) {
            let owner = found.sandbox_id.clone();
            node = Some(self.store.snapshot(&template)?.ok_or_else(|| {
                ApiError::NotFound(format!(
                    "snapshot '{template}' no longer exists: it was folded into a newer pause of sandbox {owner}"
                ))
            })?);
        }
        let recipe = match &node {
            Some(_) => None,
            None => Some(self.recipe(&template).map_err(|err| match err {
                ApiError::NotFound(_) => self.build_missing_builtin(&template).unwrap_or(err),
                other => other,
            })?),
        };
        if let Some(recipe) = &recipe {
            // A template built on another node of the cluster: its layers come from there.
            if !recipe.layer.is_file() {
                self.fetch_template_layers(&template, &recipe.layer).await?;
            }
        }
        let vcpus = req
            .cpu_count
            .unwrap_or_else(|| recipe.as_ref().map_or(self.config.vcpus, |r| r.cpu_count));
        let memory_mib = req
            .memory_mb
            .unwrap_or_else(|| recipe.as_ref().map_or(self.config.memory_mib, |r| r.memory_mb));
        check_shape(vcpus, memory_mib)?;
        let source = match node {
            Some(node) => {
                if req.cpu_count.is_some_and(|c| c != node.cpu_count)
                    || req.memory_mb.is_some_and(|m| m != node.memory_mb)
                {
                    return Err(ApiError::BadRequest(format!(
                        "snapshot '{template}' was taken with {} vCPUs and {} MiB; a sandbox restored from it has the same",
                        node.cpu_count, node.memory_mb
                    )));
                }
                Source::Node(Box::new(node))
            }
            None => Source::Template(Box::new(recipe.expect("looked up when there is no node"))),
        };
        let (vcpus, memory_mib) = match &source {
            Source::Node(node) => (node.cpu_count, node.memory_mb),
            Source::Template(_) => (vcpus, memory_mib),
        };
        // A template's variables, overridden by the request's.
        let mut env_vars = match &source {
            Source::Template(recipe) => recipe.config.env.clone(),
            Source::Node(_) => BTreeMap::new(),
        };
        env_vars.extend(req.env_vars.clone().unwrap_or_default());
        let secure = req.secure.unwrap_or(true);
        let cold_boot = req.cold_boot.unwrap_or(false);
        let network = req.network.as_ref();
        let private_traffic = network.and_then(|n| n.allow_public_traffic) == Some(false);
        let rules = self.egress_rules(
            req.allow_internet_access,
            network.and_then(|n| n.allow_out.as_ref()),
            network.and_then(|n| n.deny_out.as_ref()),
            network.and_then(|n| n.dns_servers.as_ref()),
            [
                ("egressProxy", network.and_then(|n| n.egress_proxy.as_ref())),
                ("rules", network.and_then(|n| n.rules.as_ref())),
            ],
        )?;
        let lifecycle = lifecycle::lifecycle_of(&req, timeout, &env_vars)?;
        // The recipe whose pool this create refills, and the warm VM it takes, if any.
        let (refill, pooled) = match &source {
            Source::Template(recipe) if self.config.snapshots && !cold_boot => {
                let key = self.template_key(recipe, vcpus, memory_mib);
                // A warm VM's rules change when it is taken in the isolated mode; in the user
                // mode its card is unrestricted for good.
                let fits = self.config.network != NetworkMode::User || rules.internet;
                let taken = if req.pooled.unwrap_or(true) && fits {
                    self.take_pooled(&key)
                } else {
                    None
                };
                // Warm VMs are kept for the template's own shape only: a pool per shape that
                // clients ask for would grow without bound.
                let own_shape = (vcpus, memory_mib) == (recipe.cpu_count, recipe.memory_mb);
                (own_shape.then_some(recipe), taken)
            }
            _ => (None, None),
        };
        let row = SandboxRow {
            id: pooled.as_ref().map_or_else(|| random_id(20), |live| live.id.clone()),
            template_id: template,
            state: SandboxState::Starting,
            started_at: now_rfc3339_ms(),
            end_at_ms: now_ms() + (timeout as i64) * 1000,
            cpu_count: vcpus,
            memory_mb: memory_mib,
            metadata: req.metadata.clone().unwrap_or_default(),
            access_token: secure.then(|| random_id(32)),
            vmm: None,
            net_slot: None,
            error: None,
            snapshot_id: match &source {
                Source::Node(node) => Some(node.id.clone()),
                Source::Template(_) => None,
            },
            auto_pause: req.auto_pause.unwrap_or(false),
            network: rules,
        };
        let start = StartRequest {
            env_vars: Some(env_vars),
            cold_boot,
            pooled,
            ..StartRequest::new(&source, timeout)
        };
        self.record_lifecycle(&row.id, &lifecycle)?;
        let created = self.start_sandbox(row, start, OnFailure::Delete).await;
        // The pool is refilled once this create is done: a replacement's restore (QEMU's start,
        // its network slot's commands, the guest's warm-up) would otherwise take the CPU from the
        // agent round trips the create waits for.
        if let Some(recipe) = refill {
            self.refill_pool(recipe, vcpus, memory_mib);
        }
        let created = created?;
        if let Err(err) = self.mount_volumes(&created.sandbox_id, &mounts).await {
            let _ = self.kill(&created.sandbox_id).await;
            return Err(err);
        }
        if private_traffic {
            let token = random_id(32);
            self.store.set_traffic_token(&created.sandbox_id, &token)?;
            return Ok(CreatedSandbox {
                traffic_access_token: Some(token),
                ..created
            });
        }
        Ok(created)
    }

    /// Starts the VM of `row` (a new sandbox, a fork, or a paused sandbox resuming), initializes
    /// its agent and registers it as running.
    async fn start_sandbox(
        self: &Arc<Self>,
        mut row: SandboxRow,
        start: StartRequest<'_>,
        on_failure: OnFailure,
    ) -> Result<CreatedSandbox, ApiError> {
        let id = row.id.clone();
        row.state = SandboxState::Starting;
        self.store.put_sandbox(&row)?;
        let started = std::time::Instant::now();
        let token = row.access_token.clone();
        // A node saved without memory (or a cold start asked for) boots its disk afresh.
        let disk_boot = matches!(start.source, Source::Node(node) if self.boots_from_disk(node, start.cold_boot));
        let started_vm = async {
            let run_dir = self.run_dir(&id);
            let (vcpus, memory_mib) = (row.cpu_count, row.memory_mb);
            // A warm VM's slot denies everything until it gets its sandbox's rules.
            let mut pending_rules = None;
            let live = match start.source {
                _ if start.pooled.is_some() => {
                    let live = start.pooled.clone().expect("checked");
                    if let Some(slot) = live.slot() {
                        pending_rules = Some((slot, checked_policy(&row.network)?));
                    }
                    live
                }
                Source::Node(node) if disk_boot => {
                    let layer = self.node_dir(&node.id).join("disk.qcow2");
                    let origin = Origin::Boot {
                        layer: &layer,
                        memory_file: self.memory_file(&id),
                    };
                    self.start_sandbox_vm(&id, &run_dir, origin, vcpus, memory_mib, &row.network)
                        .await?
                }
                Source::Node(node) => {
                    self.check_device_set(node)?;
                    let dir = self.node_dir(&node.id);
                    self.start_sandbox_vm(&id, &run_dir, Origin::Node(&dir), vcpus, memory_mib, &row.network)
                        .await?
                }
                Source::Template(recipe) if start.cold_boot || !self.config.snapshots => {
                    let origin = Origin::Boot {
                        layer: &recipe.layer,
                        memory_file: self.memory_file(&id),
                    };
                    self.start_sandbox_vm(&id, &run_dir, origin, vcpus, memory_mib, &row.network)
                        .await?
                }
                Source::Template(recipe) => {
                    let template = self.template(recipe, vcpus, memory_mib).await?;
                    self.start_sandbox_vm(
                        &id,
                        &run_dir,
                        Origin::Template(&template),
                        vcpus,
                        memory_mib,
                        &row.network,
                    )
                    .await?
                }
            };
            // A freshly booted agent has no token yet.
            live.agent
                .set_token(if disk_boot { None } else { start.guest_token.clone() });
            let (booted_recipe, env_vars) = self.disk_boot_plan(start.source, disk_boot, start.env_vars.clone());
            // The rules go in while the agent initializes (an `nft` run and a guest round trip,
            // ~20 ms each under TCG); both are done before the sandbox is handed out.
            let rules = async {
                match pending_rules {
                    Some((slot, policy)) => slot
                        .apply(policy)
                        .await
                        .map_err(|err| ApiError::Internal(format!("setting the sandbox's rules: {err}"))),
                    None => Ok(()),
                }
            };
            let (initialized, ruled) = tokio::join!(self.init_agent(&live, token.clone(), env_vars), rules);
            if let Err(err) = ruled {
                let _ = live.vm.kill().await;
                return Err(err);
            }
            initialized?;
            // A booted template runs its start command now (a restored one already runs it).
            let booted = match start.source {
                Source::Template(recipe) if start.cold_boot || !self.config.snapshots => Some(&**recipe),
                _ => booted_recipe.as_ref(),
            };
            if let Some(recipe) = booted {
                if let Err(err) = self.start_template(&live, recipe, &BuildLog::default()).await {
                    let _ = live.vm.kill().await;
                    return Err(err);
                }
            }
            Ok::<_, ApiError>(live)
        };
        match started_vm.await {
            Ok(live) => {
                row.state = SandboxState::Running;
                row.vmm = Some(live.vm.identity());
                row.net_slot = live.slot().map(|s| s.index());
                row.error = None;
                // The lifetime counts from when the sandbox is usable.
                row.end_at_ms = now_ms() + (start.timeout as i64) * 1000;
                self.store.put_sandbox(&row)?;
                self.live.lock().expect("live lock").insert(id.clone(), live.clone());
                self.publish_sandbox(&id, "running", None);
                self.watch(live);
                self.metrics.sandboxes_created.inc();
                self.metrics.boot_seconds.observe(started.elapsed().as_secs_f64());
                tracing::info!(sandbox = %id, template = %row.template_id, ms = started.elapsed().as_millis() as u64, "sandbox started");
                Ok(self.created(&row))
            }
            Err(err) => {
                match on_failure {
                    OnFailure::Delete => {
                        self.store.delete_sandbox(&id)?;
                        self.publish_sandbox(&id, "failed", Some(err.to_string()));
                    }
                    OnFailure::Restore(previous) => {
                        self.store.put_sandbox(&previous)?;
                        self.publish_sandbox(&id, "paused", Some(format!("resuming failed: {err}")));
                    }
                }
                remove_files(&self.run_dir(&id), &self.memory_file(&id));
                self.metrics.sandbox_failures.inc();
                Err(err)
            }
        }
    }

    /// Marks the sandbox failed and frees its resources if its VM stops without being asked to.
    fn watch(self: &Arc<Self>, live: Arc<LiveSandbox>) {
        let manager = Arc::downgrade(self);
        let mut exit = live.vm.exit();
        tokio::spawn(async move {
            let Ok(vm_exit) = exit.wait_for(Option::is_some).await.map(|e| e.clone()) else {
                return;
            };
            let Some(manager) = manager.upgrade() else { return };
            if let Some(vm_exit) = vm_exit.filter(|e| !e.requested) {
                manager.vm_stopped(&live, &vm_exit).await;
            }
        });
    }

    /// Records that the VM of `live` stopped without being asked to: the sandbox fails with the
    /// reason and its resources are freed. Idempotent: the watcher and a request that saw the
    /// agent channel break may both get here. A pause, fork or snapshot in progress finishes
    /// first: a pause whose save completed before QEMU died has the whole sandbox and makes it
    /// paused, and then (as after a kill) this VM is no longer the sandbox's.
    async fn vm_stopped(&self, live: &Arc<LiveSandbox>, vm_exit: &viv_vmm::VmExit) {
        let _op = live.op.lock().await;
        {
            let mut lives = self.live.lock().expect("live lock");
            if !lives.get(&live.id).is_some_and(|current| Arc::ptr_eq(current, live)) {
                return;
            }
            lives.remove(&live.id);
        }
        tracing::warn!(sandbox = %live.id, reason = %vm_exit.reason, "sandbox VM stopped unexpectedly");
        let _ = self.store.fail_sandbox(&live.id, &vm_exit.reason);
        self.publish_sandbox(&live.id, "failed", Some(vm_exit.reason.clone()));
        remove_files(&live.run_dir, &live.memory_file);
        live.release_network().await;
        self.metrics.sandbox_failures.inc();
    }

    /// After a request to the agent of `live` failed on its channel: waits for a pause, fork,
    /// snapshot or kill in progress, and for a VM that stopped by itself records that now (the
    /// channel breaks a moment before QEMU's exit is seen), so that the sandbox's state then
    /// says why the request failed and a client never sees a sandbox unreachable yet running.
    pub async fn settle(&self, live: &Arc<LiveSandbox>) {
        live.settled().await;
        let mut exit = live.vm.exit();
        let vm_exit = match tokio::time::timeout(Duration::from_secs(2), exit.wait_for(Option::is_some)).await {
            Ok(Ok(exit)) => exit.clone(),
            _ => None,
        };
        if let Some(vm_exit) = vm_exit.filter(|e| !e.requested) {
            self.vm_stopped(live, &vm_exit).await;
        }
    }

    /// The live sandbox with this id.
    pub fn live(&self, id: &str) -> Result<Arc<LiveSandbox>, ApiError> {
        if let Some(live) = self.live.lock().expect("live lock").get(id) {
            return Ok(live.clone());
        }
        Err(self.why_not_live(id))
    }

    /// Why sandbox `id` is not running, as its row says (failed, paused, starting, or not
    /// found): for a sandbox this server does not run, also one on another node.
    pub fn why_not_live(&self, id: &str) -> ApiError {
        match self.store.sandbox(id) {
            Err(err) => err.into(),
            Ok(Some(row)) if row.state == SandboxState::Failed => {
                ApiError::Sandbox(format!("sandbox '{id}' has failed: {}", row.error.unwrap_or_default()))
            }
            Ok(Some(row)) if row.state == SandboxState::Paused => ApiError::Conflict(format!(
                "sandbox '{id}' is paused; resume it first (POST /sandboxes/{id}/connect, `viv sandbox resume {id}`)"
            )),
            Ok(Some(row)) if row.state == SandboxState::Starting => {
                ApiError::Conflict(format!("sandbox '{id}' is still starting; try again shortly"))
            }
            _ => ApiError::sandbox_not_found(id),
        }
    }

    /// Kills a sandbox (running, paused or failed) and forgets it; snapshot nodes nothing needs
    /// any more are collected.
    pub async fn kill(&self, id: &str) -> Result<(), ApiError> {
        let mut row = self.store.sandbox(id)?;
        // A resume under way (it holds the gate, and may be continuing a parked VM) ends first,
        // and the sandbox is then killed as it finds it.
        let _resuming = match &row {
            Some(r) if r.state == SandboxState::Paused => {
                let gate = self.resume_gates.gate(id).lock_owned().await;
                row = self.store.sandbox(id)?;
                Some(gate)
            }
            _ => None,
        };
        if row.as_ref().is_some_and(|r| r.state == SandboxState::Starting) {
            return Err(ApiError::Conflict(format!(
                "sandbox '{id}' is still starting (or resuming); kill it once it runs"
            )));
        }
        let live = self.live.lock().expect("live lock").get(id).cloned();
        if live.is_none() && row.is_none() {
            return Err(ApiError::sandbox_not_found(id));
        }
        if let Some(live) = live {
            // Waits for a pause, fork or snapshot in progress.
            let _op = live.op.lock().await;
            self.live.lock().expect("live lock").remove(id);
            if let Err(err) = live.vm.kill().await {
                tracing::warn!(sandbox = %id, error = %err, "killing the VM");
            }
            live.release_network().await;
        }
        self.discard_parked_of(id).await;
        remove_files(&self.run_dir(id), &self.memory_file(id));
        self.store.delete_sandbox(id)?;
        self.publish_sandbox(id, "killed", None);
        self.collect_snapshots();
        self.metrics.sandboxes_killed.inc();
        tracing::info!(sandbox = %id, "sandbox killed");
        Ok(())
    }

    /// Number of warm VMs in the pool.
    pub fn pooled_count(&self) -> usize {
        self.pool.ready_count()
    }

    /// Number of template snapshots whose pool is being filled now.
    pub fn pool_warming(&self) -> usize {
        self.pool.warming_count()
    }

    /// The warm pool's metrics in the Prometheus text format.
    pub fn render_pool_metrics(&self) -> String {
        self.pool.render_metrics()
    }

    /// Number of live sandboxes.
    pub fn live_count(&self) -> usize {
        self.live.lock().expect("live lock").len()
    }
}

async fn create_overlay(base: &Path, overlay: &Path) -> Result<(), ApiError> {
    let size = viv_vmm::qcow2::header(base)
        .map_err(|e| ApiError::Internal(format!("reading the disk layer under a new overlay: {e}")))?
        .virtual_size;
    create_overlay_unchecked(base, overlay, size).await
}

/// Creates an overlay without opening `base` (which may not exist yet, or be locked by a
/// running VM); `size` is the virtual size in bytes.
async fn create_overlay_unchecked(base: &Path, overlay: &Path, size: u64) -> Result<(), ApiError> {
    viv_vmm::qcow2::create_overlay(overlay, base, size)
        .map_err(|e| ApiError::Internal(format!("creating the disk overlay {}: {e}", overlay.display())))
}

fn remove_files(run_dir: &Path, memory_file: &Path) {
    let _ = std::fs::remove_dir_all(run_dir);
    let _ = std::fs::remove_file(memory_file);
}
