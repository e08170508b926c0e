//! A machine's QEMU command line: its devices as arguments, and the files and taps QEMU gets
//! as inherited descriptors in fd sets (QEMU opens nothing of the server's by name).

use std::path::{Path, PathBuf};

use super::*;

/// A file or tap handed to QEMU as an inherited descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Handed {
    /// A file opened read-only or read-write, in its own fd set.
    File {
        /// The file.
        path: PathBuf,
        /// Whether QEMU may write it.
        writable: bool,
    },
    /// The tap device of NIC number `nic`.
    Tap {
        /// Index into [`MachineSpec::nics`].
        nic: usize,
    },
}

/// The descriptor number of handed-over item `index`.
pub(crate) fn fd_number(index: usize) -> i32 {
    FIRST_FD + index as i32
}

/// The fd set of handed-over item `index` (fd sets of files passed at run time are numbered
/// after all of these).
pub(crate) fn fdset_number(index: usize) -> u64 {
    index as u64 + 1
}

/// Collects a machine's command line and the descriptors it refers to.
struct CommandLine {
    args: Vec<String>,
    handed: Vec<Handed>,
}

impl CommandLine {
    fn push(&mut self, flag: &str, value: String) {
        self.args.push(flag.to_owned());
        self.args.push(value);
    }

    /// Hands `path` over and returns the name QEMU opens it by.
    fn file(&mut self, path: &Path, writable: bool) -> String {
        let index = self.handed.len();
        self.handed.push(Handed::File {
            path: path.to_path_buf(),
            writable,
        });
        let opaque: String = path
            .file_name()
            .map(|n| {
                n.to_string_lossy()
                    .chars()
                    .filter(|c| c.is_ascii_alphanumeric() || "._-".contains(*c))
                    .collect()
            })
            .unwrap_or_default();
        self.push(
            "-add-fd",
            format!("fd={},set={},opaque={opaque}", fd_number(index), fdset_number(index)),
        );
        format!("/dev/fdset/{}", fdset_number(index))
    }
}

fn boot(index: Option<u32>) -> String {
    index.map(|i| format!(",bootindex={i}")).unwrap_or_default()
}

/// The backing chains of a machine's qcow2 disks: disk id → its backing files, nearest first,
/// each with its format as the image above it records it.
pub(crate) type Backings = std::collections::HashMap<String, Vec<(PathBuf, DiskFormat)>>;

/// Reads the backing chains of `spec`'s qcow2 disks. A backing file whose format its overlay
/// does not record is refused (never probed).
pub(crate) fn read_backings(spec: &MachineSpec) -> Result<Backings, LaunchMachineError> {
    let mut backings = Backings::new();
    for disk in spec.disks.iter().filter(|d| d.format == DiskFormat::Qcow2) {
        let levels = disk_backings(disk)?;
        if !levels.is_empty() {
            backings.insert(disk.id.clone(), levels);
        }
    }
    Ok(backings)
}

/// The backing chain of one disk, nearest first (empty for a raw disk or a qcow2 without one).
pub(crate) fn disk_backings(disk: &Disk) -> Result<Vec<(PathBuf, DiskFormat)>, LaunchMachineError> {
    if disk.format != DiskFormat::Qcow2 {
        return Ok(Vec::new());
    }
    {
        let io = |source| LaunchMachineError::Io {
            what: format!("reading the backing chain of {}", disk.path.display()),
            source,
        };
        let chain = crate::qcow2::backing_chain(&disk.path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound && !disk.path.exists() {
                LaunchMachineError::Open {
                    path: disk.path.clone(),
                    source,
                }
            } else {
                io(source)
            }
        })?;
        let mut above = disk.path.clone();
        let mut levels = Vec::new();
        for path in chain {
            let format = match crate::qcow2::backing_format(&above).map_err(io)?.as_deref() {
                Some("qcow2") => DiskFormat::Qcow2,
                Some("raw") => DiskFormat::Raw,
                other => {
                    return Err(LaunchMachineError::Invalid(format!(
                        "{} names backing file {} with format {other:?}; only qcow2 and raw, recorded with the image, are opened",
                        above.display(),
                        path.display()
                    )))
                }
            };
            levels.push((path.clone(), format));
            above = path;
        }
        Ok(levels)
    }
}

/// The QEMU arguments for `spec` and the files and taps they expect as descriptors
/// ([`FIRST_FD`] onwards, in order). The backing files of qcow2 disks (`backings`) are handed
/// over read-only like every other file, named explicitly rather than found by QEMU.
pub(crate) fn machine_arguments(spec: &MachineSpec, seccomp: bool, backings: &Backings) -> (Vec<String>, Vec<Handed>) {
    let path = |p: &Path| p.display().to_string();
    let mut cl = CommandLine {
        args: Vec::new(),
        handed: Vec::new(),
    };
    let q35 = spec.machine == MachineType::Q35;
    cl.push("-name", spec.name.clone());
    if let Some(uuid) = &spec.uuid {
        cl.push("-uuid", uuid.clone());
    }
    let mut machine = match (spec.machine, &spec.kernel) {
        (MachineType::Q35, _) => "q35".to_owned(),
        (MachineType::Microvm, None) => "microvm,rtc=on".to_owned(),
        // As sandboxes boot: qboot loads the kernel from fw_cfg, no option ROMs needed.
        (MachineType::Microvm, Some(_)) => "microvm,x-option-roms=off,rtc=on".to_owned(),
    };
    if let Firmware::Uefi(ovmf) = &spec.firmware {
        let code = cl.file(&ovmf.code, false);
        let vars = cl.file(&ovmf.nvram, true);
        cl.push(
            "-blockdev",
            format!("driver=raw,node-name=fw-code,read-only=on,file.driver=file,file.filename={code}"),
        );
        cl.push(
            "-blockdev",
            format!("driver=raw,node-name=fw-vars,read-only=off,file.driver=file,file.filename={vars}"),
        );
        machine.push_str(",pflash0=fw-code,pflash1=fw-vars");
    }
    cl.push("-machine", machine);
    if let Some(boot) = &spec.kernel {
        if spec.machine == MachineType::Microvm {
            cl.push("-bios", "qboot.rom".into());
        }
        cl.push("-kernel", path(&boot.kernel));
        cl.push("-initrd", path(&boot.initramfs));
        cl.push("-append", boot.cmdline.clone());
    }
    let (accel, cpu) = spec.accel.qemu_accel_and_cpu();
    cl.push("-accel", accel.into());
    cl.push("-cpu", cpu.into());
    let t = spec.cpus;
    match spec
        .max_vcpus
        .filter(|max| q35 && *max > t.vcpus() && t.cores == 1 && t.threads == 1)
    {
        // Room for vCPUs added while it runs: one socket each, `sockets` the most there can be.
        Some(max) => cl.push(
            "-smp",
            format!("{},sockets={max},cores=1,threads=1,maxcpus={max}", t.vcpus()),
        ),
        None => cl.push(
            "-smp",
            format!(
                "{},sockets={},cores={},threads={}",
                t.vcpus(),
                t.sockets,
                t.cores,
                t.threads
            ),
        ),
    }
    cl.push("-m", format!("{}M", spec.memory_mib));
    cl.args
        .extend(["-nodefaults", "-no-user-config", "-display", "none"].map(String::from));
    cl.push(
        "-chardev",
        format!(
            "socket,id=serial0,path={},server=on,wait=off,telnet=on",
            path(&spec.serial_socket())
        ),
    );
    cl.push("-serial", "chardev:serial0".into());
    cl.push("-qmp", format!("unix:{},server=on,wait=off", path(&spec.qmp_socket())));
    if spec.display == Display::Vnc {
        cl.push("-vnc", format!("unix:{}", path(&spec.vnc_socket())));
        cl.push("-device", "VGA,id=video0".into());
    }
    if seccomp {
        cl.push("-sandbox", SECCOMP.into());
    }
    if spec.agent_channel {
        cl.push(
            "-chardev",
            format!("socket,id=agent,path={},server=on,wait=off", path(&spec.agent_socket())),
        );
        let bus = if q35 {
            "virtio-serial-pci"
        } else {
            "virtio-serial-device"
        };
        cl.push("-device", format!("{bus},id=vser0,max_ports=2"));
        cl.push(
            "-device",
            "virtserialport,chardev=agent,name=vivarium.agent,id=agentport".into(),
        );
    }
    if spec.incoming {
        // Stopped after the load (`-S`) until told to run: a fork of a paused VM stays paused.
        cl.args.push("-S".into());
        cl.push("-incoming", "defer".into());
    }
    if q35 {
        // A guest kernel's panic is reported (pvpanic) and ends QEMU: a crash, not a reboot.
        cl.push("-device", "pvpanic".into());
        cl.push("-action", "panic=exit-failure".into());
    }
    let mut sata_port = 0;
    if spec.disks.iter().any(|d| d.bus == DiskBus::VirtioScsi)
        || spec.cdroms.iter().any(|c| c.bus == CdromBus::VirtioScsi)
    {
        cl.push("-device", "virtio-scsi-pci,id=scsi0".into());
    }
    for disk in &spec.disks {
        let file = cl.file(&disk.path, !disk.read_only);
        let driver = match disk.format {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        };
        let format_node = format!("disk-{}", disk.id);
        let read_only = if disk.read_only { "on" } else { "off" };
        let mut options = format!(
            "driver={driver},node-name={format_node},read-only={read_only},discard=unmap,file.driver=file,file.filename={file}"
        );
        let mut level = String::from("backing");
        for (path, format) in backings.get(&disk.id).map(Vec::as_slice).unwrap_or_default() {
            let file = cl.file(path, false);
            let driver = match format {
                DiskFormat::Qcow2 => "qcow2",
                DiskFormat::Raw => "raw",
            };
            options.push_str(&format!(
                ",{level}.driver={driver},{level}.read-only=on,{level}.file.driver=file,{level}.file.filename={file}"
            ));
            level.push_str(".backing");
        }
        cl.push("-blockdev", options);
        // The device is attached to the throttle filter when the disk has I/O limits.
        let node = match spec.resources.disk_io.get(&disk.id).filter(|l| l.is_limited()) {
            Some(limits) => {
                let filter = resources::throttle_node(&disk.id);
                cl.push("-object", MachineResources::throttle_group(&disk.id, limits));
                cl.push(
                    "-blockdev",
                    format!("driver=throttle,node-name={filter},throttle-group={filter},file={format_node}"),
                );
                filter
            }
            None => format_node,
        };
        let id = &disk.id;
        let device = match (disk.bus, q35) {
            (DiskBus::VirtioBlk, true) => format!("virtio-blk-pci,drive={node},id={id}"),
            (DiskBus::VirtioBlk, false) => format!("virtio-blk-device,drive={node},id={id}"),
            (DiskBus::VirtioScsi, _) => format!("scsi-hd,bus=scsi0.0,drive={node},id={id}"),
            (DiskBus::Nvme, _) => format!("nvme,drive={node},id={id},serial={}", &id[..id.len().min(20)]),
            (DiskBus::Sata, _) => {
                sata_port += 1;
                format!("ide-hd,bus=ide.{},drive={node},id={id}", sata_port - 1)
            }
        };
        cl.push("-device", format!("{device}{}", boot(disk.boot_index)));
    }
    for cdrom in &spec.cdroms {
        let mut device = match cdrom.bus {
            CdromBus::Sata => {
                sata_port += 1;
                format!("ide-cd,bus=ide.{},id={}", sata_port - 1, cdrom.id)
            }
            CdromBus::VirtioScsi => format!("scsi-cd,bus=scsi0.0,id={}", cdrom.id),
        };
        if let Some(iso) = &cdrom.iso {
            let file = cl.file(iso, false);
            let node = medium_node(&cdrom.id, 0);
            cl.push(
                "-blockdev",
                format!("driver=raw,node-name={node},read-only=on,file.driver=file,file.filename={file}"),
            );
            device.push_str(&format!(",drive={node}"));
        }
        cl.push("-device", format!("{device}{}", boot(cdrom.boot_index)));
    }
    if let Some(seed) = &spec.seed {
        let file = cl.file(seed, false);
        cl.push("-device", "virtio-scsi-pci,id=seedscsi".into());
        cl.push(
            "-blockdev",
            format!("driver=raw,node-name=seed-{SEED_DRIVE},read-only=on,file.driver=file,file.filename={file}"),
        );
        cl.push(
            "-device",
            format!("scsi-cd,bus=seedscsi.0,drive=seed-{SEED_DRIVE},id={SEED_DRIVE}"),
        );
    }
    for (n, nic) in spec.nics.iter().enumerate() {
        match nic.backend {
            NicBackend::Tap(_) => {
                let fd = fd_number(cl.handed.len());
                cl.handed.push(Handed::Tap { nic: n });
                cl.push("-netdev", format!("tap,id=net-{},fd={fd}", nic.id));
            }
            NicBackend::User => cl.push("-netdev", format!("user,id=net-{}", nic.id)),
        }
        let model = match (nic.model, q35) {
            (NicModel::E1000, _) => "e1000",
            (NicModel::VirtioNet, true) => "virtio-net-pci",
            (NicModel::VirtioNet, false) => "virtio-net-device",
        };
        cl.push(
            "-device",
            format!(
                "{model},netdev=net-{},id={},mac={}{}",
                nic.id,
                nic.id,
                nic.mac,
                boot(nic.boot_index)
            ),
        );
    }
    // Hotplug ports last, so that every other device keeps the PCI address it had before
    // machines had them (guests name NICs after their slot).
    if q35 && spec.balloon {
        cl.push("-device", "virtio-balloon-pci,id=balloon0".into());
    }
    if q35 {
        for port in 0..spec.hotplug_ports {
            cl.push(
                "-device",
                format!(
                    "pcie-root-port,id={},chassis={},slot={port}",
                    hotplug_port(port),
                    100 + u32::from(port)
                ),
            );
        }
    }
    (cl.args, cl.handed)
}

/// The id of hotplug root port `n` of a q35 machine.
pub(crate) fn hotplug_port(n: u8) -> String {
    format!("hp{n}")
}
