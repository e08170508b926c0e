//! Wire types of the VM manager (`/vms`): long-lived, general-purpose VMs that boot from disks
//! or ISOs, beside sandboxes. Field names are camelCase like the rest of the API.
//!
//! A VM is a [`VmDefinition`] (what it is made of) and a [`VmState`] (what it is doing). Every
//! field of a definition has a default, so `{"name": "web"}` is a whole request; the server
//! checks a definition as a whole (shape against the host, device conflicts) before storing it.

use serde::{Deserialize, Serialize};

/// The most disks, CD-ROM drives or NICs one VM has.
pub const MAX_VM_DEVICES: usize = 16;
/// The serial ports one VM has: its console (more are not wired yet).
pub const MAX_VM_SERIAL_PORTS: u8 = 1;
/// The most tags one VM has, and the longest tag.
pub const MAX_VM_TAGS: usize = 32;
/// Longest tag.
pub const MAX_VM_TAG_LEN: usize = 64;
/// Longest description.
pub const MAX_VM_DESCRIPTION: usize = 4096;
/// Longest ACPI power-off grace before a stop forces the VM off, in seconds.
pub const MAX_VM_STOP_TIMEOUT_SECS: u32 = 3600;

/// What a VM is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// Defined, never started.
    Defined,
    /// Its QEMU is starting.
    Starting,
    /// Running.
    Running,
    /// Paused (vCPUs stopped, memory kept).
    Paused,
    /// An ACPI power-off was sent; it is forced off after the stop timeout.
    Stopping,
    /// Off after a stop, a kill or a guest power-off.
    Stopped,
    /// Its QEMU died, or the guest crashed, without being asked to stop.
    Crashed,
}

impl VmState {
    /// The name the API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Defined => "defined",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Crashed => "crashed",
        }
    }

    /// Whether a QEMU process exists for the VM in this state.
    pub fn is_active(self) -> bool {
        matches!(self, Self::Starting | Self::Running | Self::Paused | Self::Stopping)
    }
}

impl std::str::FromStr for VmState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "defined" => Self::Defined,
            "starting" => Self::Starting,
            "running" => Self::Running,
            "paused" => Self::Paused,
            "stopping" => Self::Stopping,
            "stopped" => Self::Stopped,
            "crashed" => Self::Crashed,
            other => return Err(format!("unknown VM state '{other}'")),
        })
    }
}

/// The machine type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MachineType {
    /// A PC with PCIe (QEMU's `q35`): every device kind, SeaBIOS or UEFI.
    #[default]
    Q35,
    /// QEMU's minimal `microvm`: virtio devices only, SeaBIOS only, no CD-ROM, SATA or NVMe.
    Microvm,
}

/// The firmware.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// SeaBIOS (legacy BIOS).
    #[default]
    Bios,
    /// UEFI (OVMF from Debian's `ovmf` package) with a per-VM NVRAM.
    Uefi,
}

/// vCPU topology; the VM has `sockets × cores × threads` vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CpuTopology {
    /// Sockets.
    #[serde(default = "one")]
    pub sockets: u32,
    /// Cores per socket.
    #[serde(default = "one")]
    pub cores: u32,
    /// Threads per core.
    #[serde(default = "one")]
    pub threads: u32,
}

fn one() -> u32 {
    1
}

impl Default for CpuTopology {
    fn default() -> Self {
        Self {
            sockets: 1,
            cores: 1,
            threads: 1,
        }
    }
}

impl CpuTopology {
    /// vCPUs in all (saturating: an absurd topology is refused by its count).
    pub fn vcpus(&self) -> u32 {
        self.sockets.saturating_mul(self.cores).saturating_mul(self.threads)
    }
}

/// The bus a disk is attached to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskBus {
    /// virtio-blk.
    #[default]
    VirtioBlk,
    /// A virtio-scsi controller's disk.
    VirtioScsi,
    /// An NVMe controller.
    Nvme,
    /// A SATA (AHCI) port.
    Sata,
}

impl DiskBus {
    /// The name the API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::VirtioBlk => "virtio-blk",
            Self::VirtioScsi => "virtio-scsi",
            Self::Nvme => "nvme",
            Self::Sata => "sata",
        }
    }
}

/// A disk of the storage pool attached to a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmDisk {
    /// The disk's name in the storage pool.
    pub disk: String,
    /// Bus.
    #[serde(default)]
    pub bus: DiskBus,
    /// Attached read-only.
    #[serde(default)]
    pub read_only: bool,
    /// May be attached to other VMs at the same time (the guests must coordinate).
    #[serde(default)]
    pub shareable: bool,
}

/// The bus of a CD-ROM drive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CdromBus {
    /// A SATA port (what installers of every OS expect).
    #[default]
    Sata,
    /// The virtio-scsi controller (guests whose kernel lacks AHCI, as many cloud kernels do).
    VirtioScsi,
}

impl CdromBus {
    fn is_sata(&self) -> bool {
        *self == Self::Sata
    }
}

/// A CD-ROM drive, with or without a medium from the ISO library.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmCdrom {
    /// The ISO's name in the library; none for an empty drive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iso: Option<String>,
    /// Eject the medium once the VM has booted the first time (installers).
    #[serde(default)]
    pub eject_after_first_boot: bool,
    /// Bus.
    #[serde(default, skip_serializing_if = "CdromBus::is_sata")]
    pub bus: CdromBus,
}

/// A boot device kind, in the order given by [`VmDefinition::boot_order`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootDevice {
    /// The disks, in their order.
    Disk,
    /// The CD-ROM drives, in their order.
    Cdrom,
    /// PXE from the NICs.
    Network,
}

/// A network card's model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NicModel {
    /// virtio-net.
    #[default]
    VirtioNet,
    /// An Intel e1000 (`q35` only), for guests without virtio drivers.
    E1000,
}

/// A network card: on a switch (a tap device on the switch's bridge), or without one on QEMU's
/// user-mode network inside the VM's own network namespace (the guest gets an address by DHCP
/// and reaches nothing outside).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmNic {
    /// MAC address (`52:54:00:…`); generated at create when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Model.
    #[serde(default)]
    pub model: NicModel,
    /// The switch it is on (a name); none: QEMU's user-mode network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch: Option<String>,
    /// Most kbit/s the guest receives through it (shaped on its tap; a NIC on a switch only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_in_kbps: Option<u32>,
    /// Most kbit/s the guest sends through it (policed on its tap: what passes the rate is
    /// dropped; a NIC on a switch only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_out_kbps: Option<u32>,
    /// What the guest may send to, filtered on its tap (a NIC on a switch only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firewall: Option<NicFirewall>,
}

/// A NIC's firewall on what its guest sends: the sandboxes' `allowOut`/`denyOut` lists with
/// IPv4 addresses and CIDR blocks (no domains: a switch has no proxy to read names). An allowed
/// destination wins over a denied one; `0.0.0.0/0` denied and a few blocks allowed is an allow
/// list. DHCP and ARP always pass.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NicFirewall {
    /// Destinations allowed whatever `denyOut` says.
    #[serde(default)]
    pub allow_out: Vec<String>,
    /// Destinations denied.
    #[serde(default)]
    pub deny_out: Vec<String>,
}

/// Lowest and highest NIC rate limits, kbit/s.
pub const NIC_RATE_KBPS: std::ops::RangeInclusive<u32> = 64..=100_000_000;

/// The graphical display.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Display {
    /// None: serial consoles only.
    #[default]
    None,
    /// A VGA card shown over VNC (a WebSocket for noVNC, screenshots).
    Vnc,
}

/// What happens when a VM crashes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// It stays crashed.
    #[default]
    Never,
    /// It is started again, with a back-off that doubles from 1 s to 5 min.
    OnFailure,
}

/// Starting with the server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Autostart {
    /// Started when the server starts.
    #[serde(default)]
    pub enabled: bool,
    /// Lower orders start first; equal orders by name.
    #[serde(default)]
    pub order: u32,
    /// Seconds to wait after starting this VM before the next one.
    #[serde(default)]
    pub delay_secs: u32,
}

/// Host resources a VM may use.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmResources {
    /// Host CPUs the vCPUs run on (all when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpu_pinning: Vec<u32>,
    /// cgroup CPU weight, 1–10000 (100 by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_weight: Option<u32>,
    /// CPU quota in percent of one host CPU (200 = two CPUs' worth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_quota_percent: Option<u32>,
    /// Disk reads and writes per second, each disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_iops: Option<u64>,
    /// Disk bytes per second, each disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_bytes_per_sec: Option<u64>,
    /// Scheduling priority of the VM's QEMU: a nice value from -20 (most favoured) to 19.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nice: Option<i32>,
}

/// What a VM is made of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmDefinition {
    /// vCPU topology.
    #[serde(default)]
    pub cpu: CpuTopology,
    /// Memory in MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u32,
    /// Machine type.
    #[serde(default)]
    pub machine: MachineType,
    /// Firmware.
    #[serde(default)]
    pub firmware: Firmware,
    /// Boot device kinds, first tried first.
    #[serde(default = "default_boot_order")]
    pub boot_order: Vec<BootDevice>,
    /// Disks.
    #[serde(default)]
    pub disks: Vec<VmDisk>,
    /// The most vCPUs the VM may have while it runs (`q35`, one core of one thread per socket):
    /// `PUT /vms/{id}/vcpus` adds vCPUs up to it without a restart. Unset: no vCPU hotplug.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_vcpus: Option<u32>,
    /// A virtio-balloon device (`q35`): `PUT /vms/{id}/memory` takes memory back from the
    /// running guest and gives it again. VMs defined without it get one; those defined before
    /// it existed have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<bool>,
    /// PCIe root ports reserved at start for disks attached while the VM runs (`q35` only;
    /// at most 16). VMs defined without it get 4; those defined before it existed have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hotplug_ports: Option<u8>,
    /// CD-ROM drives.
    #[serde(default)]
    pub cdroms: Vec<VmCdrom>,
    /// Network cards.
    #[serde(default)]
    pub nics: Vec<VmNic>,
    /// Serial ports: 1, the console `viv console` attaches to (more are not supported yet).
    #[serde(default = "default_serial_ports")]
    pub serial_ports: u8,
    /// Graphical display.
    #[serde(default)]
    pub display: Display,
    /// Seconds an ACPI power-off may take before a stop forces the VM off.
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout_secs: u32,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Labels for listing and grouping.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Starting with the server.
    #[serde(default)]
    pub autostart: Autostart,
    /// What happens when it crashes.
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// Host resources.
    #[serde(default)]
    pub resources: VmResources,
    /// cloud-init NoCloud data, given to the guest as a CD-ROM labelled `cidata` (q35 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloud_init: Option<CloudInit>,
    /// Boot Vivarium's sandbox kernel and initramfs directly, the first disk (virtio-blk,
    /// writable, ext4) as the root file system, with the sandbox agent's channel: `POST
    /// /vms/{id}/exec` runs commands in the guest. Set for VMs made from sandbox snapshots and
    /// templates; needs machine `microvm`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sandbox_kernel: bool,
}

/// The largest cloud-init document (`userData`, `metaData` or `networkConfig`), in bytes.
pub const MAX_CLOUD_INIT_DOCUMENT: usize = 64 * 1024;

/// cloud-init NoCloud data: built into a seed image at each start where it changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CloudInit {
    /// The `user-data` document (`#cloud-config ...`, a `#!` script, ...).
    pub user_data: String,
    /// The `meta-data` YAML; `instance-id: <VM id>` is added when it names none, and
    /// `local-hostname: <VM name>` when it is absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta_data: Option<String>,
    /// A `network-config` (version 1 or 2), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_config: Option<String>,
}

fn default_memory_mib() -> u32 {
    512
}

fn default_boot_order() -> Vec<BootDevice> {
    vec![BootDevice::Disk, BootDevice::Cdrom]
}

fn default_serial_ports() -> u8 {
    1
}

fn default_stop_timeout() -> u32 {
    60
}

impl Default for VmDefinition {
    fn default() -> Self {
        // Every field's serde default, so that `{}` and `VmDefinition::default()` agree.
        serde_json::from_str("{}").expect("every field has a default")
    }
}

/// `POST /vms` body: a name beside the fields of a definition (every one optional), and
/// optionally a sandbox snapshot or template to make the VM's root disk from.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct NewVm {
    /// Name, unique on the server.
    pub name: String,
    /// A sandbox snapshot (id or name) whose disk becomes the VM's first disk (a copy), booted
    /// with the sandbox kernel and agent (`sandboxKernel`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_snapshot: Option<String>,
    /// A sandbox template (name or alias) whose root file system becomes the VM's first disk,
    /// likewise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_template: Option<String>,
    /// The definition.
    #[serde(flatten)]
    pub definition: VmDefinition,
}

impl NewVm {
    /// A VM named `name` defined by `definition`.
    pub fn new(name: impl Into<String>, definition: VmDefinition) -> Self {
        Self {
            name: name.into(),
            from_snapshot: None,
            from_template: None,
            definition,
        }
    }
}

impl<'de> Deserialize<'de> for NewVm {
    // By hand: serde's `flatten` would accept unknown fields, and a misspelt field must be a
    // 400 rather than a default silently taken.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let mut fields = serde_json::Map::<String, serde_json::Value>::deserialize(deserializer)?;
        let name = match fields.remove("name") {
            Some(serde_json::Value::String(name)) => name,
            Some(_) => return Err(D::Error::custom("name must be a string")),
            None => return Err(D::Error::missing_field("name")),
        };
        let mut source = |field: &'static str| match fields.remove(field) {
            Some(serde_json::Value::String(s)) => Ok(Some(s)),
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(_) => Err(D::Error::custom(format!("{field} must be a string"))),
        };
        let from_snapshot = source("fromSnapshot")?;
        let from_template = source("fromTemplate")?;
        let definition = serde_json::from_value(serde_json::Value::Object(fields)).map_err(D::Error::custom)?;
        Ok(Self {
            name,
            from_snapshot,
            from_template,
            definition,
        })
    }
}

/// A VM as the API reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmInfo {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// What it is doing.
    pub state: VmState,
    /// The definition it runs with (while running) or will start with.
    pub definition: VmDefinition,
    /// Changes made while it ran that apply at its next start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_definition: Option<VmDefinition>,
    /// When it was created, RFC 3339.
    pub created_at: String,
    /// When its state last changed, RFC 3339.
    pub state_changed_at: String,
    /// The SMBIOS system UUID its guest sees (`/sys/class/dmi/id/product_uuid`).
    #[serde(default)]
    pub uuid: String,
    /// Its QEMU's process id while it is active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// When it last started, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// How many times it has started.
    #[serde(default)]
    pub starts: u32,
    /// Why it last stopped, crashed or failed to start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<String>,
}

/// `PATCH /vms/{id}` answer: the VM and how the change applies.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmEdit {
    /// The VM after the edit.
    pub vm: VmInfo,
    /// Fields that took effect at once.
    pub applied_now: Vec<String>,
    /// Fields that take effect at the VM's next start.
    pub at_next_start: Vec<String>,
}

/// `PUT /vms/{id}/vcpus`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmVcpus {
    /// How many vCPUs (one core of one thread per socket).
    pub count: u32,
}

/// `PUT /vms/{id}/memory`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmMemoryTarget {
    /// The memory the guest should have, in MiB (at most the VM's `memoryMib`).
    pub target_mib: u32,
}

/// A running VM's memory as its balloon sets it (`GET`/`PUT /vms/{id}/memory`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmMemory {
    /// The VM's memory (its definition's `memoryMib`).
    pub memory_mib: u32,
    /// What the guest has now: `memoryMib` less what its balloon holds.
    pub actual_mib: u32,
}

/// `POST /vms/{id}/stop` query.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmStopQuery {
    /// Kill at once instead of pressing the power button.
    #[serde(default)]
    pub force: bool,
    /// Seconds the guest gets to power off before it is forced (the definition's
    /// `stopTimeoutSecs` by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u32>,
}

/// What `DELETE /vms/{id}` does with the VM's disks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskDisposal {
    /// They stay in the storage pool.
    #[default]
    Keep,
    /// Those attached read-write and not shareable are deleted with the VM.
    Delete,
}

/// `DELETE /vms/{id}` query.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmDeleteQuery {
    /// What happens to its disks.
    #[serde(default)]
    pub disks: DiskDisposal,
}

/// `PUT /vms/{id}/cdroms/{drive}` body: the medium a CD-ROM drive holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmMedium {
    /// The ISO of the library to insert; `null` ejects.
    pub iso: Option<String>,
}

/// `POST /vms/{id}/clone` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmClone {
    /// The new VM's name.
    pub name: String,
    /// Linked clones of the disks (qcow2 overlays, made at once; the source's disks must then
    /// not change) rather than full copies.
    #[serde(default = "yes")]
    pub linked: bool,
}

fn yes() -> bool {
    true
}

/// `POST /vms/{id}/fork` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmFork {
    /// The new VM's name.
    pub name: String,
}

/// `POST /vms/{id}/migrate` body: where to move the VM.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmMigrate {
    /// The destination server's base URL, `http://HOST:PORT` (a server with a store of its
    /// own; with `targetKey`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// An API key of the destination server (used for this migration only, never stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_key: Option<String>,
    /// Instead of `target`: another node of this cluster (name or id); the VM keeps its id and
    /// row, which the node takes over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

impl std::fmt::Debug for VmMigrate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmMigrate")
            .field("target", &self.target)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// A completed live migration's figures (QEMU's `query-migrate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrationFigures {
    /// From the start of the operation to the VM running on the destination, in ms.
    pub total_ms: u64,
    /// Copying the disks (until every mirror was in sync), in ms.
    pub disk_copy_ms: u64,
    /// QEMU's RAM migration, start to completion, in ms.
    pub ram_ms: u64,
    /// How long the guest was stopped (QEMU's figure), in ms.
    pub downtime_ms: u64,
    /// Bytes of RAM sent.
    pub ram_bytes: u64,
}

/// A disk of a VM migrating in: created empty on the destination, then filled over NBD.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IncomingDisk {
    /// Its name in the pool (the VM's definition names it).
    pub name: String,
    /// Its virtual size in bytes.
    pub size_bytes: u64,
    /// Its format.
    pub format: crate::storage::DiskFormat,
}

/// `POST /migrations/incoming` body (server to server): a VM to receive.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IncomingVm {
    /// The VM's name (kept on the destination).
    pub name: String,
    /// Its definition.
    pub definition: VmDefinition,
    /// Its writable disks, to create empty.
    pub disks: Vec<IncomingDisk>,
    /// Between nodes of one cluster: the id of the node whose VM row (the same, in the shared
    /// store) the destination takes over once the VM runs there, instead of defining a new VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub takeover_from: Option<String>,
}

/// A VM waiting for its migration stream on the destination.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IncomingMigration {
    /// The incoming migration's id (`in-...`).
    pub id: String,
    /// The VM as the destination holds it (state `starting`).
    pub vm: VmInfo,
}

/// `POST /vms/{id}/template` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmTemplate {
    /// The template's name (sandboxes are created from it as `templateID`).
    pub name: String,
}

/// `POST /vms/{id}/template` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmTemplateInfo {
    /// The template's name.
    pub name: String,
    /// The VM it was made from.
    pub vm_id: String,
    /// Bytes of its root file system layer.
    pub bytes: u64,
}

/// `POST /vms/{id}/snapshots` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewVmSnapshot {
    /// Name, unique among the VM's snapshots.
    pub name: String,
    /// Include memory and device state (a running VM comes back running); by default when the
    /// VM is running or paused. A stopped VM's snapshots hold its disks only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<bool>,
    /// Free text.
    #[serde(default)]
    pub description: String,
}

/// A VM snapshot as the API reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmSnapshot {
    /// Id.
    pub id: String,
    /// Name, unique among the VM's snapshots.
    pub name: String,
    /// The VM's id.
    pub vm_id: String,
    /// The snapshot it descends from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    /// Whether memory and device state are included.
    pub memory: bool,
    /// The VM's state when it was taken.
    pub vm_state: VmState,
    /// Whether the VM's state descends from it (the last taken or reverted to).
    pub current: bool,
    /// Free text.
    pub description: String,
    /// When it was taken, RFC 3339.
    pub created_at: String,
}

/// A node of the snapshot tree (`GET /snapshot-tree`): a sandbox snapshot node or a VM
/// snapshot, in one listing.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotTreeNode {
    /// The snapshot's id.
    pub id: String,
    /// `sandbox` (a snapshot node: pause, fork or named snapshot) or `vm` (a VM snapshot).
    pub kind: String,
    /// Why it exists: `pause`, `fork`, `snapshot` (sandboxes) or `vm-snapshot`.
    pub reason: String,
    /// Its name, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The node it descends from: its parent snapshot, or for a VM's first snapshots the sandbox
    /// snapshot the VM was made from (when that node still exists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    /// The sandbox or VM it was taken of.
    pub owner_id: String,
    /// Whether memory and device state are included.
    pub memory: bool,
    /// Bytes it holds of its own: a sandbox node's layer and state; a VM snapshot's memory and
    /// device state (its disk blocks are shared with the VM's disks).
    pub size_bytes: u64,
    /// When it was taken, RFC 3339.
    pub created_at: String,
}

/// `POST /vms/{id}/rename` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmRename {
    /// The new name.
    pub name: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_alone_is_a_whole_request() {
        let vm: NewVm = serde_json::from_str(r#"{"name": "web"}"#).unwrap();
        assert_eq!(vm.definition, VmDefinition::default());
        assert_eq!(vm.definition.cpu.vcpus(), 1);
        assert_eq!(vm.definition.boot_order, vec![BootDevice::Disk, BootDevice::Cdrom]);
    }

    #[test]
    fn a_create_round_trips_and_refuses_misspelt_fields() {
        let vm: NewVm = serde_json::from_str(r#"{"name": "db", "memoryMib": 1024, "firmware": "uefi"}"#).unwrap();
        assert_eq!((vm.name.as_str(), vm.definition.memory_mib), ("db", 1024));
        let again: NewVm = serde_json::from_value(serde_json::to_value(&vm).unwrap()).unwrap();
        assert_eq!(again.definition, vm.definition);
        assert!(serde_json::from_str::<NewVm>(r#"{"name": "db", "memoryMB": 1024}"#).is_err());
        assert!(serde_json::from_str::<NewVm>(r#"{"memoryMib": 1024}"#).is_err());
    }

    #[test]
    fn a_sandbox_source_is_taken_beside_the_definition() {
        let vm: NewVm = serde_json::from_str(r#"{"name": "dev", "fromSnapshot": "snap", "memoryMib": 512}"#).unwrap();
        assert_eq!(
            (
                vm.from_snapshot.as_deref(),
                vm.from_template.as_deref(),
                vm.definition.memory_mib
            ),
            (Some("snap"), None, 512)
        );
        assert!(!vm.definition.sandbox_kernel);
        assert!(serde_json::from_str::<NewVm>(r#"{"name": "dev", "fromTemplate": 3}"#).is_err());
        let again: NewVm = serde_json::from_value(serde_json::to_value(&vm).unwrap()).unwrap();
        assert_eq!(again.from_snapshot.as_deref(), Some("snap"));
    }

    #[test]
    fn unknown_fields_are_refused() {
        assert!(serde_json::from_str::<VmDefinition>(r#"{"memoryMb": 512}"#).is_err());
        assert!(serde_json::from_str::<VmDefinition>(r#"{"disks": [{"disk": "a", "bus": "ide"}]}"#).is_err());
    }

    #[test]
    fn an_absurd_topology_saturates() {
        let cpu = CpuTopology {
            sockets: u32::MAX,
            cores: 2,
            threads: 2,
        };
        assert_eq!(cpu.vcpus(), u32::MAX);
    }
}
