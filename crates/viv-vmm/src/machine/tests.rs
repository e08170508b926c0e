//! Unit tests of machine command lines and specs.

use super::*;

fn spec() -> MachineSpec {
    let mut spec = MachineSpec::new("m1", "/run/m1", Accel::Tcg);
    spec.cpus = CpuTopology {
        sockets: 1,
        cores: 2,
        threads: 2,
    };
    spec.disks = vec![
        Disk {
            id: "root".into(),
            path: "/d/root.qcow2".into(),
            format: DiskFormat::Qcow2,
            bus: DiskBus::VirtioBlk,
            read_only: false,
            boot_index: Some(1),
        },
        Disk {
            id: "data".into(),
            path: "/d/data.raw".into(),
            format: DiskFormat::Raw,
            bus: DiskBus::Sata,
            read_only: true,
            boot_index: None,
        },
    ];
    spec.cdroms = vec![Cdrom {
        id: "cd0".into(),
        iso: Some("/isos/debian.iso".into()),
        boot_index: Some(2),
        bus: Default::default(),
    }];
    spec.display = Display::Vnc;
    spec
}

#[test]
fn every_file_is_a_descriptor_with_the_guests_access() {
    let mut spec = spec();
    spec.firmware = Firmware::Uefi(Ovmf::debian("/run/m1/nvram.fd"));
    let (args, handed) = machine_arguments(&spec, true, &Backings::new());
    let line = args.join(" ");
    assert_eq!(
        handed,
        vec![
            Handed::File {
                path: OVMF_CODE.into(),
                writable: false
            },
            Handed::File {
                path: "/run/m1/nvram.fd".into(),
                writable: true
            },
            Handed::File {
                path: "/d/root.qcow2".into(),
                writable: true
            },
            Handed::File {
                path: "/d/data.raw".into(),
                writable: false
            },
            Handed::File {
                path: "/isos/debian.iso".into(),
                writable: false
            },
        ]
    );
    for expected in [
        "-add-fd fd=3,set=1,opaque=OVMF_CODE_4M.fd",
        "-add-fd fd=7,set=5,opaque=debian.iso",
        "-machine q35,pflash0=fw-code,pflash1=fw-vars",
        "node-name=fw-code,read-only=on,file.driver=file,file.filename=/dev/fdset/1",
        "driver=qcow2,node-name=disk-root,read-only=off,discard=unmap,file.driver=file,file.filename=/dev/fdset/3",
        "-device virtio-blk-pci,drive=disk-root,id=root,bootindex=1",
        "driver=raw,node-name=disk-data,read-only=on",
        "-device ide-hd,bus=ide.0,drive=disk-data,id=data -",
        "-device ide-cd,bus=ide.1,id=cd0,drive=cd-cd0-0,bootindex=2",
        "-smp 4,sockets=1,cores=2,threads=2",
        "-vnc unix:/run/m1/vnc.sock -device VGA",
        "socket,id=serial0,path=/run/m1/serial.sock,server=on,wait=off,telnet=on",
        &format!("-sandbox {SECCOMP}"),
    ] {
        assert!(line.contains(expected), "{expected:?} not in {line}");
    }
    // No path of the server's appears but the run directory's sockets and log.
    for path in ["/d/", "/isos/", "/usr/share/OVMF"] {
        assert!(!line.contains(&format!("={path}")), "{path} opened by name: {line}");
    }
    assert!(!line.contains("-no-reboot"), "a machine's guest may reboot");
}

#[test]
fn seabios_microvm_and_empty_drives() {
    let mut spec = spec();
    spec.cdroms[0].iso = None;
    let (args, handed) = machine_arguments(&spec, false, &Backings::new());
    let line = args.join(" ");
    assert_eq!(handed.len(), 2);
    assert!(line.contains("-machine q35 "));
    assert!(line.contains("-device ide-cd,bus=ide.1,id=cd0,bootindex=2"));
    assert!(!line.contains("-sandbox"));

    let mut micro = MachineSpec::new("m2", "/run/m2", Accel::Tcg);
    micro.machine = MachineType::Microvm;
    micro.disks = vec![spec.disks[0].clone()];
    micro.validate().unwrap();
    let line = machine_arguments(&micro, false, &Backings::new()).0.join(" ");
    assert!(line.contains("-machine microvm,rtc=on"));
    assert!(line.contains("virtio-blk-device,drive=disk-root"));
}

#[test]
fn bad_specs_are_refused_with_the_reason() {
    let refused = |change: &dyn Fn(&mut MachineSpec), words: &str| {
        let mut s = spec();
        change(&mut s);
        let err = s.validate().expect_err(words).to_string();
        assert!(err.contains(words), "{err:?} does not say {words:?}");
    };
    refused(&|s| s.cdroms[0].id = "root".into(), "two devices have the id \"root\"");
    refused(&|s| s.cdroms[0].boot_index = Some(1), "same boot index 1");
    refused(&|s| s.disks[0].id = "a,b".into(), "device id");
    refused(&|s| s.cpus.threads = 0, "CPU topology");
    refused(&|s| s.memory_mib = 1, "too little");
    refused(
        &|s| {
            s.machine = MachineType::Microvm;
            s.cdroms.clear();
            s.display = Display::None;
        },
        "virtio-blk disks only",
    );
    refused(
        &|s| {
            for n in 0..6 {
                s.cdroms.push(Cdrom {
                    id: format!("cd{}", n + 1),
                    iso: None,
                    boot_index: None,
                    bus: Default::default(),
                });
            }
        },
        "SATA ports",
    );
    refused(
        &|s| s.run_dir = PathBuf::from(format!("/{}", "x".repeat(100))),
        "socket path",
    );
    spec().validate().unwrap();
}

#[test]
fn missing_ovmf_names_the_debian_package() {
    let dir = tempfile::tempdir().unwrap();
    let ovmf = Ovmf {
        code: dir.path().join("OVMF_CODE_4M.fd"),
        vars_template: dir.path().join("OVMF_VARS_4M.fd"),
        nvram: dir.path().join("nvram.fd"),
    };
    let err = ovmf.reset_nvram().unwrap_err().to_string();
    assert!(err.contains("install the Debian package ovmf"), "{err}");
    std::fs::write(&ovmf.code, b"code").unwrap();
    std::fs::write(&ovmf.vars_template, b"vars").unwrap();
    ovmf.ensure_nvram().unwrap();
    std::fs::write(&ovmf.nvram, b"changed").unwrap();
    ovmf.ensure_nvram().unwrap();
    assert_eq!(
        std::fs::read(&ovmf.nvram).unwrap(),
        b"changed",
        "an existing NVRAM is kept"
    );
    ovmf.reset_nvram().unwrap();
    assert_eq!(std::fs::read(&ovmf.nvram).unwrap(), b"vars");
}

#[test]
fn resources_nics_and_panic_handling_on_the_command_line() {
    let mut spec = spec();
    spec.resources.disk_io.insert(
        "root".into(),
        IoLimits {
            iops: Some(100),
            bps: None,
        },
    );
    spec.nics = vec![Nic::user("net0", "52:54:00:12:34:56"), {
        let mut nic = Nic::user("net1", "52:54:00:12:34:57");
        nic.model = NicModel::E1000;
        nic
    }];
    spec.validate().unwrap();
    let (args, handed) = machine_arguments(&spec, false, &Backings::new());
    let line = args.join(" ");
    for expected in [
        "-object throttle-group,id=io-root,x-iops-total=100",
        "driver=qcow2,node-name=disk-root,",
        "-blockdev driver=throttle,node-name=io-root,throttle-group=io-root,file=disk-root",
        "-device virtio-blk-pci,drive=io-root,id=root",
        "-device ide-hd,bus=ide.0,drive=disk-data,id=data",
        "-netdev user,id=net-net0 -device virtio-net-pci,netdev=net-net0,id=net0,mac=52:54:00:12:34:56",
        "-device e1000,netdev=net-net1,id=net1,mac=52:54:00:12:34:57",
        "-device pvpanic -action panic=exit-failure",
    ] {
        assert!(line.contains(expected), "{expected:?} not in {line}");
    }
    assert!(
        handed.iter().all(|h| matches!(h, Handed::File { .. })),
        "user NICs hand no descriptor over"
    );

    let mut micro = MachineSpec::new("m2", "/run/m2", Accel::Tcg);
    micro.machine = MachineType::Microvm;
    micro.nics = spec.nics.clone();
    let err = micro.validate().unwrap_err().to_string();
    assert!(err.contains("virtio-net cards only"), "{err}");
    micro.nics.truncate(1);
    let line = machine_arguments(&micro, false, &Backings::new()).0.join(" ");
    assert!(line.contains("virtio-net-device,netdev=net-net0"), "{line}");
    assert!(!line.contains("pvpanic"), "microvm has no ISA bus: {line}");
}

#[test]
fn resource_limits_go_to_the_cgroup() {
    let mut spec = spec();
    assert_eq!(
        launch::machine_limits(&spec).cpu_percent,
        400,
        "4 vCPUs' worth by default"
    );
    assert_eq!(launch::machine_limits(&spec).cpu_weight, 100);
    spec.resources.cpu_percent = Some(150);
    spec.resources.cpu_weight = Some(300);
    let limits = launch::machine_limits(&spec);
    assert_eq!((limits.cpu_percent, limits.cpu_weight), (150, 300));
    spec.resources.disk_io.insert("nope".into(), IoLimits::default());
    let err = spec.validate().unwrap_err().to_string();
    assert!(err.contains("not a disk of the machine"), "{err}");
}

#[test]
fn a_seed_is_a_scsi_cd_of_its_own_after_the_other_drives() {
    let mut spec = spec();
    spec.seed = Some("/pool/seeds/vm-1.iso".into());
    spec.validate().unwrap();
    let (args, handed) = machine_arguments(&spec, false, &Backings::new());
    let line = args.join(" ");
    assert!(handed.contains(&Handed::File {
        path: "/pool/seeds/vm-1.iso".into(),
        writable: false
    }));
    let cd = line.find("id=cd0").unwrap();
    let seed = line
        .find("-device scsi-cd,bus=seedscsi.0,drive=seed-cidata,id=cidata")
        .unwrap();
    assert!(cd < seed, "{line}");
    assert!(line.contains("-device virtio-scsi-pci,id=seedscsi"));
    assert!(!line[seed..].split(" -").next().unwrap().contains("bootindex"));
    assert!(!line.contains("=/pool/"), "the seed is opened by name: {line}");

    let mut micro = MachineSpec::new("m2", "/run/m2", Accel::Tcg);
    micro.machine = MachineType::Microvm;
    micro.seed = spec.seed.clone();
    assert!(micro.validate().is_err());
}

#[test]
fn a_sandbox_kernel_machine_boots_the_kernel_with_the_agent_port_and_may_wait_for_a_state() {
    let mut spec = MachineSpec::new("m2", "/run/m2", Accel::Tcg);
    spec.machine = MachineType::Microvm;
    spec.disks = vec![Disk {
        id: "disk0".into(),
        path: "/d/root.qcow2".into(),
        format: DiskFormat::Qcow2,
        bus: DiskBus::VirtioBlk,
        read_only: false,
        boot_index: None,
    }];
    let (args, _) = machine_arguments(&spec, true, &Backings::new());
    let plain = args.join(" ");
    assert!(!plain.contains("-kernel") && !plain.contains("vivarium.agent") && !plain.contains("-incoming"));
    spec.kernel = Some(KernelBoot {
        kernel: "/img/vmlinuz".into(),
        initramfs: "/img/initrd".into(),
        cmdline: "console=ttyS0 root=/dev/vda".into(),
    });
    spec.agent_channel = true;
    spec.incoming = true;
    spec.validate().unwrap();
    let (args, _) = machine_arguments(&spec, true, &Backings::new());
    let line = args.join(" ");
    for part in [
        "-machine microvm,x-option-roms=off,rtc=on",
        "-bios qboot.rom",
        "-kernel /img/vmlinuz -initrd /img/initrd",
        "socket,id=agent,path=/run/m2/agent.sock,server=on,wait=off",
        "virtio-serial-device,id=vser0",
        "virtserialport,chardev=agent,name=vivarium.agent,id=agentport",
        "-S -incoming defer",
    ] {
        assert!(line.contains(part), "{part} in {line}");
    }
    let append = args.iter().position(|a| a == "-append").unwrap();
    assert_eq!(args[append + 1], "console=ttyS0 root=/dev/vda", "one argument");
    spec.kernel.as_mut().unwrap().cmdline = "a\nb".into();
    assert!(spec.validate().is_err(), "a command line of one line only");
}
