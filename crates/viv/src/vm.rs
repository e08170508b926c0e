//! `viv vm`: define, list, show, edit, rename and delete the VM manager's long-lived VMs, and
//! start, stop, restart, pause, resume and kill them.
//!
//! Options map onto the fields of `viv_api::vms::VmDefinition`; `edit` sends only the fields
//! given, as a JSON merge patch, and prints which changes apply at once and which at the VM's
//! next start.

use anyhow::{bail, Context as _, Result};
use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{json, Map, Value};
use viv_api::vms::{VmEdit, VmInfo, VmSnapshot};

use crate::client::Client;
use crate::output;

/// `viv vm ...`
#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Define a VM (it starts in state `defined`); with --from-snapshot or --from-template, its
    /// first disk is a copy of that sandbox root file system, booted with the sandbox kernel
    /// and agent (`viv vm exec` runs commands in it).
    Create {
        /// Name, unique on the server.
        name: String,
        /// A sandbox snapshot (id or name) to make the VM from.
        #[arg(long, conflicts_with = "from_template")]
        from_snapshot: Option<String>,
        /// A sandbox template (name) to make the VM from.
        #[arg(long)]
        from_template: Option<String>,
        #[command(flatten)]
        fields: Box<DefinitionArgs>,
    },
    /// List VMs.
    #[command(alias = "ls")]
    List,
    /// Show a VM with its whole definition.
    Get {
        /// VM id or name.
        vm: String,
    },
    /// Change a VM's definition; a running VM takes some changes at once, the rest at its next
    /// start.
    Edit {
        /// VM id or name.
        vm: String,
        #[command(flatten)]
        fields: Box<DefinitionArgs>,
    },
    /// Rename a VM.
    Rename {
        /// VM id or name.
        vm: String,
        /// The new name.
        name: String,
    },
    /// Delete VMs that are not running (their disks stay in the storage pool unless
    /// `--delete-disks`).
    #[command(alias = "rm")]
    Delete {
        /// VM ids or names.
        #[arg(required = true)]
        vms: Vec<String>,
        /// Also delete the disks each VM alone attached read-write.
        #[arg(long)]
        delete_disks: bool,
    },
    /// Start VMs (a pending definition takes effect).
    Start {
        /// VM ids or names.
        #[arg(required = true)]
        vms: Vec<String>,
    },
    /// Stop VMs: the ACPI power button, forced off after the stop timeout.
    Stop {
        /// VM ids or names.
        #[arg(required = true)]
        vms: Vec<String>,
        #[command(flatten)]
        how: StopArgs,
    },
    /// Stop (as `stop`) and start VMs again; starts VMs that are not running.
    Restart {
        /// VM ids or names.
        #[arg(required = true)]
        vms: Vec<String>,
        #[command(flatten)]
        how: StopArgs,
    },
    /// Pause VMs (vCPUs stop, memory is kept).
    Pause {
        /// VM ids or names.
        #[arg(required = true)]
        vms: Vec<String>,
    },
    /// Resume paused VMs.
    Resume {
        /// VM ids or names.
        #[arg(required = true)]
        vms: Vec<String>,
    },
    /// Kill VMs at once (pulling the plug).
    Kill {
        /// VM ids or names.
        #[arg(required = true)]
        vms: Vec<String>,
    },
    /// Clone a stopped VM: new MACs and UUID, linked clones of its writable disks (`--full`
    /// copies them).
    Clone {
        /// VM id or name.
        vm: String,
        /// The new VM's name.
        name: String,
        /// Full copies of the disks instead of linked clones (the source's disks may then
        /// change).
        #[arg(long)]
        full: bool,
    },
    /// Fork a running or paused VM: a new VM whose disks are copies of the source's at this
    /// instant and whose memory continues from it; both run on.
    Fork {
        /// VM id or name.
        vm: String,
        /// The new VM's name.
        name: String,
    },
    /// Move a running VM, with its disks, to another Vivarium server while it runs (live
    /// migration); it is then gone from this server.
    Migrate {
        /// VM id or name.
        vm: String,
        /// The destination server, http://HOST:PORT.
        #[arg(
            long,
            required_unless_present = "to_node",
            conflicts_with = "to_node",
            requires = "to_key"
        )]
        to: Option<String>,
        /// An API key of the destination server (used for this migration only).
        #[arg(long, env = "VIV_TARGET_KEY", hide_env_values = true)]
        to_key: Option<String>,
        /// Instead of --to: another node of this cluster (name or id); the VM keeps its id.
        #[arg(long)]
        to_node: Option<String>,
    },
    /// Run a command in a VM made from a sandbox (it runs the sandbox agent).
    Exec(crate::commands::ExecArgs),
    /// Make a sandbox template of a stopped VM made from a sandbox (its root file system).
    Template {
        /// VM id or name.
        vm: String,
        /// The template's name.
        name: String,
    },
    /// Put an ISO into a CD-ROM drive (running or not), or eject its medium.
    Media {
        /// VM id or name.
        vm: String,
        /// The drive's index (0 for the first).
        drive: usize,
        /// The ISO of the library to insert.
        #[arg(required_unless_present = "eject", conflicts_with = "eject")]
        iso: Option<String>,
        /// Eject the medium.
        #[arg(long)]
        eject: bool,
    },
    /// Reset a stopped UEFI VM's variable store (NVRAM) to the firmware's defaults.
    NvramReset {
        /// VM id or name.
        vm: String,
    },
    /// Take, list, revert to and delete a VM's snapshots.
    #[command(subcommand, alias = "snap")]
    Snapshot(SnapshotCommand),
    /// Add, change and remove a VM's network cards.
    #[command(subcommand)]
    Nic(crate::vm_nic::NicCommand),
    /// Back up a VM's disks (full and incremental), list, delete and restore backups.
    #[command(subcommand)]
    Backup(crate::vm_backup::BackupCommand),
    /// Export a stopped VM as an OVA package (OVF descriptor and streamOptimized VMDKs).
    Export {
        /// VM id or name.
        vm: String,
        /// The local .ova file to write.
        file: std::path::PathBuf,
    },
    /// Create a VM and its disks from an OVA package.
    Import {
        /// The local .ova file.
        file: std::path::PathBuf,
        /// The VM's name (default: the package's).
        #[arg(long)]
        name: Option<String>,
    },
    /// Attach and detach pool disks (at once while a q35 VM runs).
    #[command(subcommand)]
    Disk(crate::vm_hotplug::DiskCommand),
    /// Set a VM's vCPUs: a running q35 VM gets more at once, up to its maxVcpus (the guest
    /// brings them online); a stopped VM any count at its next start.
    Vcpus {
        /// VM id or name.
        vm: String,
        /// How many vCPUs.
        count: u32,
    },
    /// Show a running VM's memory, or have its balloon leave the guest TARGET_MIB (the guest
    /// gets there over the next moments; back up likewise).
    Memory {
        /// VM id or name.
        vm: String,
        /// The memory the guest should have, in MiB (64 to the VM's memory).
        target_mib: Option<u32>,
    },
}

/// `viv vm snapshot ...`
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot (with memory when the VM runs, unless --disk-only).
    Create {
        /// VM id or name.
        vm: String,
        /// Snapshot name.
        name: String,
        /// Disks only, even of a running VM.
        #[arg(long)]
        disk_only: bool,
        /// Description.
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List a VM's snapshots as a tree.
    #[command(alias = "ls")]
    List {
        /// VM id or name.
        vm: String,
    },
    /// Bring the VM back to a snapshot.
    Revert {
        /// VM id or name.
        vm: String,
        /// Snapshot id or name.
        snapshot: String,
    },
    /// Delete snapshots.
    #[command(alias = "rm")]
    Delete {
        /// VM id or name.
        vm: String,
        /// Snapshot ids or names.
        #[arg(required = true)]
        snapshots: Vec<String>,
    },
}

/// How a stop goes.
#[derive(Debug, Args)]
pub struct StopArgs {
    /// Power off at once instead of pressing the power button.
    #[arg(long)]
    force: bool,
    /// Seconds the guest gets to power off before it is forced (the VM's stop timeout by
    /// default).
    #[arg(long)]
    timeout: Option<u32>,
}

impl StopArgs {
    fn query(&self) -> String {
        let mut q = format!("?force={}", self.force);
        if let Some(t) = self.timeout {
            q.push_str(&format!("&timeoutSecs={t}"));
        }
        q
    }
}

/// Definition fields settable from the command line (absent ones are left out of the request).
#[derive(Debug, Args)]
pub struct DefinitionArgs {
    /// vCPUs (one socket of this many cores).
    #[arg(long, conflicts_with_all = ["sockets", "cores", "threads"])]
    vcpus: Option<u32>,
    /// The most vCPUs the VM may have while it runs (q35; `viv vm vcpus` adds them without a
    /// restart). With it, `--vcpus N` makes N sockets of one core.
    #[arg(long)]
    max_vcpus: Option<u32>,
    /// CPU sockets.
    #[arg(long)]
    sockets: Option<u32>,
    /// Cores per socket.
    #[arg(long)]
    cores: Option<u32>,
    /// Threads per core.
    #[arg(long)]
    threads: Option<u32>,
    /// Memory in MiB.
    #[arg(long)]
    memory: Option<u32>,
    /// Machine type: q35 or microvm.
    #[arg(long)]
    machine: Option<String>,
    /// Firmware: bios or uefi.
    #[arg(long)]
    firmware: Option<String>,
    /// Boot order, comma-separated: disk, cdrom, network.
    #[arg(long, value_delimiter = ',')]
    boot: Option<Vec<String>>,
    /// A disk of the storage pool: NAME[,bus=virtio-blk|virtio-scsi|nvme|sata][,ro][,shareable]
    /// (repeat for more; replaces the list on edit).
    #[arg(long = "disk")]
    disks: Vec<String>,
    /// A CD-ROM drive with an ISO of the library (NAME[,eject-after-boot]), or `empty`.
    #[arg(long = "cdrom")]
    cdroms: Vec<String>,
    /// Network cards on QEMU's user-mode network (MAC addresses are generated).
    #[arg(long, conflicts_with = "nic_specs")]
    nics: Option<usize>,
    /// A network card: `user` (QEMU's user-mode network) or
    /// `switch=NAME[,model=virtio-net|e1000][,mac=MAC][,rate-in=KBPS][,rate-out=KBPS]` (repeat
    /// for more; replaces the list on edit).
    #[arg(long = "nic", value_name = "SPEC")]
    nic_specs: Vec<String>,
    /// Serial ports.
    #[arg(long)]
    serial_ports: Option<u8>,
    /// Display: none or vnc.
    #[arg(long)]
    display: Option<String>,
    /// Seconds an ACPI power-off may take before a stop forces the VM off.
    #[arg(long)]
    stop_timeout: Option<u32>,
    /// Description.
    #[arg(long)]
    description: Option<String>,
    /// A tag (repeat for more; replaces the list on edit).
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Start with the server.
    #[arg(long)]
    autostart: Option<bool>,
    /// Restart policy: never or on-failure.
    #[arg(long)]
    restart: Option<String>,
    /// cloud-init user-data from FILE (`#cloud-config ...`); the VM gets a NoCloud seed CD-ROM.
    #[arg(long, value_name = "FILE")]
    user_data: Option<std::path::PathBuf>,
    /// cloud-init meta-data (YAML) from FILE; `instance-id` defaults to the VM's id.
    #[arg(long, value_name = "FILE")]
    meta_data: Option<std::path::PathBuf>,
    /// cloud-init network-config from FILE.
    #[arg(long, value_name = "FILE")]
    network_config: Option<std::path::PathBuf>,
    /// Remove the VM's cloud-init data (edit).
    #[arg(long, conflicts_with_all = ["user_data", "meta_data", "network_config"])]
    no_cloud_init: bool,
}

impl DefinitionArgs {
    /// The given fields as a JSON object of definition fields.
    fn to_fields(&self) -> Result<Map<String, Value>> {
        let mut f = Map::new();
        if let Some(n) = self.vcpus {
            let cpu = match self.max_vcpus {
                Some(_) => json!({"sockets": n, "cores": 1, "threads": 1}),
                None => json!({"sockets": 1, "cores": n, "threads": 1}),
            };
            f.insert("cpu".into(), cpu);
        } else if self.sockets.is_some() || self.cores.is_some() || self.threads.is_some() {
            let mut cpu = Map::new();
            for (k, v) in [
                ("sockets", self.sockets),
                ("cores", self.cores),
                ("threads", self.threads),
            ] {
                if let Some(v) = v {
                    cpu.insert(k.into(), json!(v));
                }
            }
            f.insert("cpu".into(), Value::Object(cpu));
        }
        let mut put = |key: &str, value: Option<Value>| {
            if let Some(v) = value {
                f.insert(key.into(), v);
            }
        };
        put("memoryMib", self.memory.map(|v| json!(v)));
        put("maxVcpus", self.max_vcpus.map(|v| json!(v)));
        put("machine", self.machine.as_ref().map(|v| json!(v)));
        put("firmware", self.firmware.as_ref().map(|v| json!(v)));
        put("bootOrder", self.boot.as_ref().map(|v| json!(v)));
        put("nics", self.nics.map(|n| json!(vec![json!({}); n])));
        if !self.nic_specs.is_empty() {
            let nics = self.nic_specs.iter().map(|s| nic_spec(s)).collect::<Result<Vec<_>>>()?;
            put("nics", Some(Value::Array(nics)));
        }
        put("serialPorts", self.serial_ports.map(|v| json!(v)));
        put("display", self.display.as_ref().map(|v| json!(v)));
        put("stopTimeoutSecs", self.stop_timeout.map(|v| json!(v)));
        put("description", self.description.as_ref().map(|v| json!(v)));
        put("autostart", self.autostart.map(|v| json!({"enabled": v})));
        put("restartPolicy", self.restart.as_ref().map(|v| json!(v)));
        if !self.disks.is_empty() {
            let disks = self.disks.iter().map(|d| disk_spec(d)).collect::<Result<Vec<_>>>()?;
            f.insert("disks".into(), Value::Array(disks));
        }
        if !self.cdroms.is_empty() {
            let cdroms = self.cdroms.iter().map(|c| cdrom_spec(c)).collect::<Result<Vec<_>>>()?;
            f.insert("cdroms".into(), Value::Array(cdroms));
        }
        if !self.tags.is_empty() {
            f.insert("tags".into(), json!(self.tags));
        }
        if self.no_cloud_init {
            f.insert("cloudInit".into(), Value::Null);
        }
        let mut cloud_init = Map::new();
        for (key, file) in [
            ("userData", &self.user_data),
            ("metaData", &self.meta_data),
            ("networkConfig", &self.network_config),
        ] {
            if let Some(file) = file {
                let text = std::fs::read_to_string(file)
                    .with_context(|| format!("reading {} (cloud-init {key})", file.display()))?;
                cloud_init.insert(key.into(), json!(text));
            }
        }
        if !cloud_init.is_empty() {
            f.insert("cloudInit".into(), Value::Object(cloud_init));
        }
        Ok(f)
    }
}

/// `NAME[,bus=B][,ro][,shareable]` → a disk attachment.
fn disk_spec(text: &str) -> Result<Value> {
    let mut parts = text.split(',');
    let mut disk = Map::new();
    disk.insert("disk".into(), json!(parts.next().unwrap_or_default()));
    for option in parts {
        match option.split_once('=') {
            Some(("bus", bus)) => disk.insert("bus".into(), json!(bus)),
            None if option == "ro" => disk.insert("readOnly".into(), json!(true)),
            None if option == "shareable" => disk.insert("shareable".into(), json!(true)),
            _ => bail!("unknown disk option '{option}' in '{text}': use bus=BUS, ro or shareable"),
        };
    }
    Ok(Value::Object(disk))
}

/// `NAME[,eject-after-boot]` or `empty` → a CD-ROM drive.
fn cdrom_spec(text: &str) -> Result<Value> {
    if text == "empty" {
        return Ok(json!({}));
    }
    let mut parts = text.split(',');
    let mut cdrom = Map::new();
    cdrom.insert("iso".into(), json!(parts.next().unwrap_or_default()));
    for option in parts {
        match option {
            "eject-after-boot" => cdrom.insert("ejectAfterFirstBoot".into(), json!(true)),
            _ => bail!("unknown CD-ROM option '{option}' in '{text}': use eject-after-boot"),
        };
    }
    Ok(Value::Object(cdrom))
}

/// A NIC of `--nic`: `user`, or `key=value` pairs of `switch`, `model`, `mac`, `rate-in` and
/// `rate-out` (kbit/s).
fn nic_spec(spec: &str) -> Result<Value> {
    let mut nic = Map::new();
    if spec == "user" {
        return Ok(Value::Object(nic));
    }
    for part in spec.split(',') {
        let Some((key, value)) = part.split_once('=') else {
            bail!("--nic {spec}: expected `user` or switch=NAME[,model=MODEL][,mac=MAC], got {part:?}");
        };
        match key {
            "switch" | "model" | "mac" => {
                nic.insert(key.into(), json!(value));
            }
            "rate-in" | "rate-out" => {
                let kbps: u32 = value
                    .parse()
                    .map_err(|_| anyhow::anyhow!("--nic {spec}: {key} is kbit/s, a whole number, not {value:?}"))?;
                let field = if key == "rate-in" { "rateInKbps" } else { "rateOutKbps" };
                nic.insert(field.into(), json!(kbps));
            }
            _ => bail!("--nic {spec}: unknown key {key:?} (switch, model, mac, rate-in, rate-out)"),
        }
    }
    Ok(Value::Object(nic))
}

/// Runs `viv vm ...`.
pub async fn run(client: &Client, cmd: VmCommand, json: bool) -> Result<i32> {
    match cmd {
        VmCommand::Create {
            name,
            from_snapshot,
            from_template,
            fields,
        } => {
            let mut body = fields.to_fields()?;
            body.insert("name".into(), json!(name));
            if let Some(snapshot) = from_snapshot {
                body.insert("fromSnapshot".into(), json!(snapshot));
            }
            if let Some(template) = from_template {
                body.insert("fromTemplate".into(), json!(template));
            }
            let vm: VmInfo = client.json(client.request(Method::POST, "/vms").json(&body)).await?;
            if json {
                output::json(&vm);
            } else {
                println!("{}", vm.id);
            }
        }
        VmCommand::List => {
            let vms: Vec<VmInfo> = client.json(client.request(Method::GET, "/vms")).await?;
            if json {
                output::json(&vms);
            } else {
                output::table(&HEADERS, &vms.iter().map(vm_row).collect::<Vec<_>>());
            }
        }
        VmCommand::Get { vm } => {
            let vm: VmInfo = client.json(client.request(Method::GET, &format!("/vms/{vm}"))).await?;
            if json {
                output::json(&vm);
            } else {
                output::table(&HEADERS, &[vm_row(&vm)]);
                println!("{}", serde_json::to_string_pretty(&vm.definition)?);
                if let Some(pending) = &vm.pending_definition {
                    println!("at next start:\n{}", serde_json::to_string_pretty(pending)?);
                }
            }
        }
        VmCommand::Edit { vm, fields } => {
            let patch = fields.to_fields()?;
            if patch.is_empty() {
                bail!("nothing to change: give at least one option (see `viv vm edit --help`)");
            }
            let edit: VmEdit = client
                .json(client.request(Method::PATCH, &format!("/vms/{vm}")).json(&patch))
                .await?;
            if json {
                output::json(&edit);
            } else {
                let list = |fields: &[String]| {
                    if fields.is_empty() {
                        "-".to_owned()
                    } else {
                        fields.join(", ")
                    }
                };
                println!("applied now: {}", list(&edit.applied_now));
                println!("at next start: {}", list(&edit.at_next_start));
            }
        }
        VmCommand::Rename { vm, name } => {
            let info: VmInfo = client
                .json(
                    client
                        .request(Method::POST, &format!("/vms/{vm}/rename"))
                        .json(&json!({"name": name})),
                )
                .await?;
            if json {
                output::json(&info);
            } else {
                println!("renamed {} to {}", info.id, info.name);
            }
        }
        VmCommand::Delete { vms, delete_disks } => {
            let disks = if delete_disks { "delete" } else { "keep" };
            for vm in vms {
                client
                    .send(client.request(Method::DELETE, &format!("/vms/{vm}?disks={disks}")))
                    .await?;
                if !json {
                    println!("deleted {vm}");
                }
            }
        }
        VmCommand::Start { vms } => act(client, &vms, "start", "", "starting", json).await?,
        VmCommand::Stop { vms, how } => act(client, &vms, "stop", &how.query(), "stopping", json).await?,
        VmCommand::Restart { vms, how } => act(client, &vms, "restart", &how.query(), "restarting", json).await?,
        VmCommand::Pause { vms } => act(client, &vms, "pause", "", "pausing", json).await?,
        VmCommand::Resume { vms } => act(client, &vms, "resume", "", "resuming", json).await?,
        VmCommand::Kill { vms } => act(client, &vms, "kill", "", "killing", json).await?,
        VmCommand::Snapshot(cmd) => snapshot(client, cmd, json).await?,
        VmCommand::Nic(cmd) => crate::vm_nic::run(client, cmd, json).await?,
        VmCommand::Backup(cmd) => crate::vm_backup::run(client, cmd, json).await?,
        VmCommand::Export { vm, file } => {
            let bytes = crate::transfer::download(client, &format!("/vms/{vm}/export.ova"), &file).await?;
            if json {
                output::json(&json!({"vm": vm, "file": file, "bytes": bytes}));
            } else {
                println!("exported {vm} to {} ({bytes} bytes)", file.display());
            }
        }
        VmCommand::Import { file, name } => {
            let route = match &name {
                Some(name) => format!("/vms/import?name={name}"),
                None => "/vms/import".to_owned(),
            };
            let response = crate::transfer::send_file(client, Method::POST, &route, &file, None).await?;
            let vm: VmInfo = response.json().await?;
            if json {
                output::json(&vm);
            } else {
                output::table(&HEADERS, &[vm_row(&vm)]);
            }
        }
        VmCommand::Disk(cmd) => crate::vm_hotplug::run(client, cmd, json).await?,
        VmCommand::Vcpus { vm, count } => crate::vm_hotplug::set_vcpus(client, &vm, count, json).await?,
        VmCommand::Memory { vm, target_mib } => crate::vm_hotplug::memory(client, &vm, target_mib, json).await?,
        VmCommand::Media {
            vm,
            drive,
            iso,
            eject: _,
        } => {
            let info: VmInfo = client
                .json(
                    client
                        .request(Method::PUT, &format!("/vms/{vm}/cdroms/{drive}"))
                        .json(&json!({ "iso": iso })),
                )
                .await?;
            if json {
                output::json(&info);
            } else {
                match info.definition.cdroms.get(drive).and_then(|c| c.iso.as_deref()) {
                    Some(iso) => println!("{} drive {drive}: {iso}", info.name),
                    None => println!("{} drive {drive}: empty", info.name),
                }
            }
        }
        VmCommand::NvramReset { vm } => {
            let info: VmInfo = client
                .json(client.request(Method::POST, &format!("/vms/{vm}/nvram/reset")))
                .await?;
            if json {
                output::json(&info);
            } else {
                println!("{}: NVRAM reset", info.name);
            }
        }
        VmCommand::Migrate {
            vm,
            to,
            to_key,
            to_node,
        } => {
            let (body, to) = match to_node {
                Some(node) => (json!({ "node": node }), format!("node {node}")),
                None => {
                    let to = to.unwrap_or_default();
                    (json!({ "target": to, "targetKey": to_key }), to)
                }
            };
            let op: viv_api::storage::Operation = client
                .json(client.request(Method::POST, &format!("/vms/{vm}/migrate")).json(&body))
                .await?;
            let op = crate::transfer::follow(client, op).await?;
            if json {
                output::json(&op);
            } else {
                match op.migration {
                    Some(m) => println!(
                        "{vm}: migrated to {to} in {:.1} s (disks {:.1} s, memory {:.1} s, downtime {} ms)",
                        m.total_ms as f64 / 1000.0,
                        m.disk_copy_ms as f64 / 1000.0,
                        m.ram_ms as f64 / 1000.0,
                        m.downtime_ms
                    ),
                    None => println!("{vm}: migrated to {to}"),
                }
            }
        }
        VmCommand::Fork { vm, name } => {
            let info: VmInfo = client
                .json(
                    client
                        .request(Method::POST, &format!("/vms/{vm}/fork"))
                        .json(&json!({ "name": name })),
                )
                .await?;
            if json {
                output::json(&info);
            } else {
                println!("{}", info.id);
            }
        }
        VmCommand::Template { vm, name } => {
            let made: viv_api::vms::VmTemplateInfo = client
                .json(
                    client
                        .request(Method::POST, &format!("/vms/{vm}/template"))
                        .json(&json!({ "name": name })),
                )
                .await?;
            if json {
                output::json(&made);
            } else {
                println!("{}", made.name);
            }
        }
        VmCommand::Exec(args) => {
            let path = format!("/vms/{}/exec", args.id);
            return crate::commands::exec_at(client, args, &path).await;
        }
        VmCommand::Clone { vm, name, full } => {
            let body = json!({"name": name, "linked": !full});
            let info: VmInfo = client
                .json(client.request(Method::POST, &format!("/vms/{vm}/clone")).json(&body))
                .await?;
            if json {
                output::json(&info);
            } else {
                println!("{}", info.id);
            }
        }
    }
    Ok(0)
}

/// `viv snapshot tree`: sandbox snapshot nodes and VM snapshots, children indented under
/// their parents.
pub async fn print_snapshot_tree(client: &Client, json: bool) -> Result<()> {
    let nodes: Vec<viv_api::vms::SnapshotTreeNode> = client.json(client.request(Method::GET, "/snapshot-tree")).await?;
    if json {
        output::json(&nodes);
        return Ok(());
    }
    let known: std::collections::HashSet<&str> = nodes.iter().map(|n| n.id.as_str()).collect();
    let mut rows = Vec::new();
    let mut stack: Vec<(&viv_api::vms::SnapshotTreeNode, usize)> = nodes
        .iter()
        .rev()
        .filter(|n| n.parent_id.as_deref().is_none_or(|p| !known.contains(p)))
        .map(|n| (n, 0))
        .collect();
    while let Some((node, depth)) = stack.pop() {
        rows.push(vec![
            format!("{}{}", "  ".repeat(depth), node.id),
            node.kind.clone(),
            node.reason.clone(),
            node.name.clone().unwrap_or_default(),
            node.owner_id.clone(),
            if node.memory { "yes" } else { "no" }.into(),
            format!("{:.1} MiB", node.size_bytes as f64 / (1 << 20) as f64),
            node.created_at.clone(),
        ]);
        stack.extend(
            nodes
                .iter()
                .rev()
                .filter(|c| c.parent_id.as_deref() == Some(node.id.as_str()))
                .map(|c| (c, depth + 1)),
        );
    }
    output::table(
        &["ID", "KIND", "REASON", "NAME", "OWNER", "MEMORY", "SIZE", "CREATED"],
        &rows,
    );
    Ok(())
}

/// `POST /vms/{vm}/{action}{query}` for each VM, with a spinner on a terminal, then the VM's
/// state (and why it last stopped, when a stop was forced or a start failed).
async fn act(client: &Client, vms: &[String], action: &str, query: &str, doing: &str, json: bool) -> Result<()> {
    for vm in vms {
        use std::io::IsTerminal as _;
        let progress = std::io::stderr().is_terminal().then(|| {
            let progress = crate::output::TerminalProgress::new();
            viv_image::Progress::stage(&progress, &format!("{doing} {vm}"));
            progress
        });
        let info: Result<VmInfo> = client
            .json(client.request(Method::POST, &format!("/vms/{vm}/{action}{query}")))
            .await;
        drop(progress);
        let info = info?;
        if json {
            output::json(&info);
        } else {
            match info.last_exit.as_deref().filter(|_| !info.state.is_active()) {
                Some(why) => println!("{} {}: {why}", info.name, info.state.as_str()),
                None => println!("{} {}", info.name, info.state.as_str()),
            }
        }
    }
    Ok(())
}

/// Runs `viv vm snapshot ...`.
async fn snapshot(client: &Client, cmd: SnapshotCommand, json: bool) -> Result<()> {
    match cmd {
        SnapshotCommand::Create {
            vm,
            name,
            disk_only,
            description,
        } => {
            let mut body = json!({"name": name, "description": description});
            if disk_only {
                body["memory"] = json!(false);
            }
            let snap: VmSnapshot = client
                .json(
                    client
                        .request(Method::POST, &format!("/vms/{vm}/snapshots"))
                        .json(&body),
                )
                .await?;
            if json {
                output::json(&snap);
            } else {
                println!("{}", snap.id);
            }
        }
        SnapshotCommand::List { vm } => {
            let snaps: Vec<VmSnapshot> = client
                .json(client.request(Method::GET, &format!("/vms/{vm}/snapshots")))
                .await?;
            if json {
                output::json(&snaps);
            } else {
                let rows: Vec<Vec<String>> = tree_order(&snaps)
                    .into_iter()
                    .map(|(depth, s)| {
                        vec![
                            format!("{}{}", "  ".repeat(depth), s.name),
                            s.id.clone(),
                            if s.memory { "memory+disks" } else { "disks" }.to_owned(),
                            s.vm_state.as_str().to_owned(),
                            if s.current { "*" } else { "" }.to_owned(),
                            s.created_at.clone(),
                        ]
                    })
                    .collect();
                output::table(&["NAME", "ID", "HOLDS", "VM STATE", "CURRENT", "CREATED"], &rows);
            }
        }
        SnapshotCommand::Revert { vm, snapshot } => {
            let snap: VmSnapshot = client
                .json(client.request(Method::POST, &format!("/vms/{vm}/snapshots/{snapshot}/revert")))
                .await?;
            if json {
                output::json(&snap);
            } else {
                println!("reverted {vm} to {}", snap.name);
            }
        }
        SnapshotCommand::Delete { vm, snapshots } => {
            for snapshot in snapshots {
                client
                    .send(client.request(Method::DELETE, &format!("/vms/{vm}/snapshots/{snapshot}")))
                    .await?;
                if !json {
                    println!("deleted {snapshot}");
                }
            }
        }
    }
    Ok(())
}

/// Snapshots depth first from the roots, each with its depth.
fn tree_order(snaps: &[VmSnapshot]) -> Vec<(usize, &VmSnapshot)> {
    fn visit<'a>(snaps: &'a [VmSnapshot], parent: Option<&str>, depth: usize, out: &mut Vec<(usize, &'a VmSnapshot)>) {
        for s in snaps.iter().filter(|s| s.parent_id.as_deref() == parent) {
            out.push((depth, s));
            visit(snaps, Some(&s.id), depth + 1, out);
        }
    }
    let mut out = Vec::new();
    visit(snaps, None, 0, &mut out);
    // Snapshots whose parent is missing (never, unless the store was edited): at the end.
    for s in snaps {
        if !out.iter().any(|(_, o)| o.id == s.id) {
            out.push((0, s));
        }
    }
    out
}

const HEADERS: [&str; 9] = [
    "ID", "NAME", "STATE", "VCPUS", "MEMORY", "MACHINE", "DISKS", "PID", "TAGS",
];

fn vm_row(vm: &VmInfo) -> Vec<String> {
    let d = &vm.definition;
    vec![
        vm.id.clone(),
        vm.name.clone(),
        vm.state.as_str().to_owned(),
        d.cpu.vcpus().to_string(),
        format!("{} MiB", d.memory_mib),
        format!(
            "{}/{}",
            json!(d.machine).as_str().unwrap_or("?"),
            json!(d.firmware).as_str().unwrap_or("?")
        ),
        d.disks.iter().map(|x| x.disk.as_str()).collect::<Vec<_>>().join(","),
        vm.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
        d.tags.join(","),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_and_cdrom_options_parse() {
        assert_eq!(
            disk_spec("root,bus=nvme,ro").unwrap(),
            json!({"disk": "root", "bus": "nvme", "readOnly": true})
        );
        assert!(disk_spec("root,fast").is_err());
        assert_eq!(
            cdrom_spec("debian,eject-after-boot").unwrap(),
            json!({"iso": "debian", "ejectAfterFirstBoot": true})
        );
        assert_eq!(cdrom_spec("empty").unwrap(), json!({}));
    }
}
