//! General-purpose machines on real QEMU (TCG unless the host's KVM is usable): a tiny hybrid
//! ISO built from Debian packages (`tests/fixtures/vm-iso/build`) boots under SeaBIOS and OVMF,
//! boot order decides between disk and CD, the ACPI power button powers the guest off, and the
//! QMP operations (screenshot, CD change and eject, online resize, pause) work on a running
//! machine. Figures (start to serial marker, ACPI stop) are printed with the accelerator.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use viv_vmm::confine::Confinement;
use viv_vmm::machine::{
    Cdrom, Disk, DiskBus, DiskFormat, Display, Firmware, IoLimits, LaunchMachineError, Machine, MachineSpec, Nic, Ovmf,
};
use viv_vmm::qemu::Qemu;
use viv_vmm::{Accel, ExitCause};

/// Boot under TCG on a busy 2-core host takes seconds; this bounds a hang, not a slow boot.
const BOOT_DEADLINE: Duration = Duration::from_secs(240);
const MARKER: &str = "VIVARIUM-ISO-BOOTED";
const READY: &str = "VIVARIUM-ACPID-READY";

fn accel() -> Accel {
    Accel::Auto.resolve()
}

fn qemu() -> Qemu {
    Qemu::default().confined(Confinement::Seccomp)
}

/// The test ISO, built (or taken from the cache) once per test binary: the cached file itself,
/// which the tests only read (nothing is left behind in a temporary directory).
fn iso() -> PathBuf {
    static ISO: OnceLock<PathBuf> = OnceLock::new();
    ISO.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/vm-iso/build");
        let built = std::process::Command::new("bash")
            .arg(&script)
            .output()
            .expect("running the vm-iso fixture builder");
        assert!(
            built.status.success(),
            "tests/fixtures/vm-iso/build failed: {}",
            String::from_utf8_lossy(&built.stderr)
        );
        PathBuf::from(String::from_utf8(built.stdout).unwrap().trim())
    })
    .clone()
}

fn qemu_img(args: &[&str]) {
    let status = std::process::Command::new("qemu-img")
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("running qemu-img (Debian package qemu-utils)");
    assert!(status.success(), "qemu-img {args:?} failed");
}

fn blank_disk(dir: &Path, mib: u64) -> PathBuf {
    let path = dir.join("blank.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        path.to_str().unwrap(),
        &format!("{mib}M"),
    ]);
    path
}

fn disk(id: &str, path: &Path, bus: DiskBus, boot_index: Option<u32>) -> Disk {
    Disk {
        id: id.into(),
        path: path.to_path_buf(),
        format: DiskFormat::Qcow2,
        bus,
        read_only: false,
        boot_index,
    }
}

fn cdrom(iso: Option<PathBuf>, boot_index: Option<u32>) -> Cdrom {
    Cdrom {
        id: "cd0".into(),
        iso,
        boot_index,
        bus: Default::default(),
    }
}

/// A test's run directory: short (socket paths), removed at the end.
fn run_dir() -> tempfile::TempDir {
    tempfile::Builder::new().prefix("vm").tempdir_in("/tmp").unwrap()
}

/// Everything the machine's serial port printed so far.
fn console(spec: &MachineSpec) -> String {
    String::from_utf8_lossy(&std::fs::read(spec.console_log()).unwrap_or_default()).into_owned()
}

/// What to show when a wait fails: the console's and QEMU's last lines.
fn diagnostics(spec: &MachineSpec) -> String {
    let tail = |text: String| {
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    };
    format!(
        "console:\n{}\nQEMU:\n{}",
        tail(console(spec)),
        tail(std::fs::read_to_string(spec.qemu_log()).unwrap_or_default())
    )
}

/// Waits until a console line after byte `from` contains `needle`; returns the line and the
/// offset after it. Fails with the console's tail when the machine exits or `deadline` passes.
async fn wait_line(
    spec: &MachineSpec,
    machine: &Machine,
    needle: &str,
    from: usize,
    deadline: Duration,
) -> (String, usize) {
    let start = Instant::now();
    loop {
        let text = console(spec);
        if let Some(rest) = text.get(from..) {
            // The whole line: its end may not have arrived with the needle.
            if let Some(at) = rest.find(needle) {
                if let Some(end) = rest[at..].find('\n').map(|n| at + n) {
                    let line_start = rest[..at].rfind('\n').map_or(0, |n| n + 1);
                    return (rest[line_start..end].trim().to_owned(), from + end);
                }
            }
        }
        if let Some(exit) = machine.exit().borrow().clone() {
            panic!(
                "the machine exited before printing {needle:?}: {}\n{}",
                exit.reason,
                diagnostics(spec)
            );
        }
        assert!(
            start.elapsed() < deadline,
            "no {needle:?} on the serial console within {deadline:?}\n{}",
            diagnostics(spec)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The connection to the machine's serial socket (QEMU serves one client): its output is
/// appended to `console.log` (QEMU keeps no log), the stream returned is for input.
fn serial(spec: &MachineSpec) -> UnixStream {
    let stream = UnixStream::connect(spec.serial_socket()).expect("connecting to the serial socket");
    let mut reader = stream.try_clone().unwrap();
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(spec.console_log())
        .unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = reader.read(&mut buf) {
            log.write_all(&buf[..n]).unwrap();
        }
    });
    stream
}

/// Asks the guest for its block device sizes (512-byte sectors) over the serial console.
async fn guest_sizes(spec: &MachineSpec, machine: &Machine, serial: &mut UnixStream) -> Vec<(String, u64)> {
    let from = console(spec).len();
    serial.write_all(b"sizes\n").unwrap();
    let (_, end) = wait_line(spec, machine, "VIV-SIZES-END", from, Duration::from_secs(60)).await;
    console(spec)[from..end]
        .lines()
        .filter_map(|l| {
            let mut words = l.trim().strip_prefix("VIV-SIZE ")?.split_whitespace();
            Some((words.next()?.to_owned(), words.next()?.parse().ok()?))
        })
        .collect()
}

/// Launches `spec` and waits for the boot marker; returns the serial console's input, the
/// marker line and the time it took.
async fn boot(spec: &MachineSpec) -> (Machine, UnixStream, String, Duration) {
    let started = Instant::now();
    let machine = qemu().launch_machine(spec).await.expect("launching the machine");
    let console_in = serial(spec);
    let (line, _) = wait_line(spec, &machine, MARKER, 0, BOOT_DEADLINE).await;
    (machine, console_in, line, started.elapsed())
}

/// Presses the power button once acpid runs and checks that the guest powered itself off.
async fn acpi_stop(spec: &MachineSpec, machine: &Machine, label: &str) {
    wait_line(spec, machine, READY, 0, Duration::from_secs(60)).await;
    let shutdown = machine.shutdown(Duration::from_secs(60)).await.expect("shutdown");
    assert!(
        !shutdown.forced,
        "the guest ignored the power button for 60 s\n{}",
        diagnostics(spec)
    );
    assert!(
        shutdown.exit.reason.contains("the guest shut down"),
        "exit reason: {}",
        shutdown.exit.reason
    );
    assert!(!shutdown.exit.requested);
    assert_eq!(
        shutdown.exit.cause,
        ExitCause::GuestShutdown,
        "{}",
        shutdown.exit.reason
    );
    // Printed before the power-off; the reader may still be writing it to the log.
    let start = Instant::now();
    while !console(spec).contains("VIVARIUM-POWER-BUTTON") {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "acpid did not run its action"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "FIGURE {label}: ACPI power button to QEMU exit {} ms (accel {})",
        shutdown.took.as_millis(),
        spec.accel
    );
}

/// Decodes an 8-bit RGB or RGBA PNG (what QEMU's screendump writes) into rows of pixels.
fn png_pixels(png: &[u8]) -> (u32, u32, Vec<Vec<u8>>, usize) {
    assert!(png.len() > 8 && &png[..8] == b"\x89PNG\r\n\x1a\n", "not a PNG file");
    let (mut pos, mut idat) = (8, Vec::new());
    let (mut width, mut height, mut bpp) = (0u32, 0u32, 0usize);
    while pos + 8 <= png.len() {
        let len = u32::from_be_bytes(png[pos..pos + 4].try_into().unwrap()) as usize;
        let kind = &png[pos + 4..pos + 8];
        let data = &png[pos + 8..pos + 8 + len];
        match kind {
            b"IHDR" => {
                width = u32::from_be_bytes(data[0..4].try_into().unwrap());
                height = u32::from_be_bytes(data[4..8].try_into().unwrap());
                assert_eq!(data[8], 8, "bit depth");
                bpp = match data[9] {
                    2 => 3,
                    6 => 4,
                    other => panic!("unexpected PNG colour type {other}"),
                };
                assert_eq!(data[12], 0, "interlaced PNG");
            }
            b"IDAT" => idat.extend_from_slice(data),
            b"IEND" => break,
            _ => {}
        }
        pos += 12 + len;
    }
    let mut raw = Vec::new();
    flate2::read::ZlibDecoder::new(&idat[..]).read_to_end(&mut raw).unwrap();
    let stride = width as usize * bpp;
    assert_eq!(raw.len(), (stride + 1) * height as usize, "PNG data size");
    let mut rows: Vec<Vec<u8>> = Vec::new();
    for y in 0..height as usize {
        let filter = raw[y * (stride + 1)];
        let mut row = raw[y * (stride + 1) + 1..(y + 1) * (stride + 1)].to_vec();
        let prior = rows.last().cloned().unwrap_or_else(|| vec![0; stride]);
        for x in 0..stride {
            let a = if x >= bpp { row[x - bpp] as i16 } else { 0 };
            let b = prior[x] as i16;
            let c = if x >= bpp { prior[x - bpp] as i16 } else { 0 };
            let add = match filter {
                0 => 0,
                1 => a,
                2 => b,
                3 => (a + b) / 2,
                4 => {
                    let p = a + b - c;
                    let (pa, pb, pc) = ((p - a).abs(), (p - b).abs(), (p - c).abs());
                    if pa <= pb && pa <= pc {
                        a
                    } else if pb <= pc {
                        b
                    } else {
                        c
                    }
                }
                other => panic!("bad PNG filter {other}"),
            };
            row[x] = row[x].wrapping_add(add as u8);
        }
        rows.push(row);
    }
    (width, height, rows, bpp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seabios_boots_the_cd_behind_a_blank_disk_and_serves_qmp_operations() {
    let dir = run_dir();
    let iso = iso();
    let mut spec = MachineSpec::new("seabios", dir.path(), accel());
    let blank = blank_disk(dir.path(), 64);
    spec.disks = vec![disk("vda", &blank, DiskBus::VirtioBlk, Some(1))];
    spec.cdroms = vec![cdrom(Some(iso.clone()), Some(2))];
    spec.display = Display::Vnc;
    let (machine, mut console_in, line, took) = boot(&spec).await;
    println!(
        "FIGURE SeaBIOS: start to serial marker {} ms (accel {})",
        took.as_millis(),
        spec.accel
    );
    assert!(!line.contains("boot=hd0"), "booted from the blank disk? {line}");

    // Status, pause and resume.
    let status = machine.status().await.unwrap();
    assert!(status.running && status.state == "running", "{status:?}");
    machine.pause().await.unwrap();
    let status = machine.status().await.unwrap();
    assert!(!status.running && status.state == "paused", "{status:?}");
    machine.resume().await.unwrap();
    assert!(machine.status().await.unwrap().running);

    // A screenshot: a PNG whose pixels are not all the same (the init wrote on tty0).
    wait_line(&spec, &machine, READY, 0, Duration::from_secs(60)).await;
    let png = dir.path().join("screen.png");
    machine.screenshot(&png).await.expect("screenshot");
    let (width, height, rows, bpp) = png_pixels(&std::fs::read(&png).unwrap());
    assert!(width >= 320 && height >= 200, "{width}x{height}");
    let first = rows[0][..bpp].to_vec();
    assert!(
        rows.iter().any(|r| r.chunks(bpp).any(|p| p != first.as_slice())),
        "the screenshot is blank"
    );

    // The CD: eject, then another medium, while the guest runs.
    assert!(machine.has_medium("cd0").await.unwrap());
    machine.eject("cd0").await.expect("eject");
    assert!(!machine.has_medium("cd0").await.unwrap(), "still a medium after eject");
    machine.eject("cd0").await.expect("ejecting an empty drive");
    let other = dir.path().join("other.iso");
    std::fs::copy(&iso, &other).unwrap();
    machine.change_medium("cd0", &other).await.expect("change medium");
    assert!(machine.has_medium("cd0").await.unwrap(), "no medium after the change");
    machine.change_medium("cd0", &iso).await.expect("second change");
    assert!(machine.has_medium("cd0").await.unwrap());
    let unknown = machine.change_medium("cd9", &iso).await.unwrap_err();
    assert!(unknown.to_string().contains("no CD-ROM drive \"cd9\""), "{unknown}");

    // Online resize: the guest's virtio disk grows from 64 to 96 MiB.
    let sizes = guest_sizes(&spec, &machine, &mut console_in).await;
    let vda = |sizes: &[(String, u64)]| sizes.iter().find(|(d, _)| d == "vda").map(|(_, s)| *s);
    assert_eq!(vda(&sizes), Some(64 << 11), "guest sizes {sizes:?}");
    machine.resize_disk("vda", 96 << 20).await.expect("block_resize");
    let start = Instant::now();
    loop {
        let sizes = guest_sizes(&spec, &machine, &mut console_in).await;
        if vda(&sizes) == Some(96 << 11) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the guest still sees {sizes:?} 30 s after the resize"
        );
    }
    assert!(matches!(
        machine.resize_disk("nope", 1 << 30).await,
        Err(viv_vmm::machine::ResizeError::UnknownDisk(_))
    ));

    acpi_stop(&spec, &machine, "SeaBIOS").await;
    // Operations on a stopped machine say so.
    assert!(matches!(
        machine.status().await,
        Err(viv_vmm::machine::StatusError::Stopped)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ovmf_boots_the_cd_behind_a_blank_disk_and_powers_off() {
    let ovmf = Ovmf::debian("unused");
    if !Path::new(&ovmf.code).is_file() {
        panic!(
            "{} is missing: install the Debian package ovmf (scripts/install-deps)",
            ovmf.code.display()
        );
    }
    let dir = run_dir();
    let mut spec = MachineSpec::new("uefi", dir.path(), accel());
    spec.firmware = Firmware::Uefi(Ovmf::debian(dir.path().join("nvram.fd")));
    let blank = blank_disk(dir.path(), 64);
    spec.disks = vec![disk("vda", &blank, DiskBus::Nvme, Some(1))];
    spec.cdroms = vec![cdrom(Some(iso()), Some(2))];
    let (machine, _console_in, line, took) = boot(&spec).await;
    println!(
        "FIGURE UEFI: start to serial marker {} ms (accel {})",
        took.as_millis(),
        spec.accel
    );
    assert!(!line.contains("boot=hd0"), "booted from the blank disk? {line}");
    assert!(dir.path().join("nvram.fd").is_file(), "no per-machine NVRAM");
    acpi_stop(&spec, &machine, "UEFI").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bootable_disk_first_in_boot_order_wins_over_the_cd() {
    let dir = run_dir();
    let iso = iso();
    let image = dir.path().join("boot.qcow2");
    qemu_img(&[
        "convert",
        "-q",
        "-O",
        "qcow2",
        iso.to_str().unwrap(),
        image.to_str().unwrap(),
    ]);
    let mut spec = MachineSpec::new("diskboot", dir.path(), accel());
    spec.disks = vec![disk("sda", &image, DiskBus::Sata, Some(1))];
    spec.cdroms = vec![cdrom(Some(iso), Some(2))];
    let (machine, _console_in, line, took) = boot(&spec).await;
    println!(
        "FIGURE SeaBIOS disk: start to serial marker {} ms (accel {})",
        took.as_millis(),
        spec.accel
    );
    assert!(line.contains("boot=hd0"), "not booted from the disk: {line}");
    let exit = machine.quit().await.expect("quit");
    assert!(exit.reason.contains("QEMU exited"), "{}", exit.reason);
}

#[tokio::test]
async fn missing_files_are_named() {
    let dir = run_dir();
    let mut spec = MachineSpec::new("missing", dir.path(), accel());
    spec.disks = vec![disk("vda", &dir.path().join("nope.qcow2"), DiskBus::VirtioBlk, None)];
    let err = qemu().launch_machine(&spec).await.unwrap_err();
    assert!(
        matches!(&err, LaunchMachineError::Open { path, .. } if path.ends_with("nope.qcow2")),
        "{err}"
    );
    spec.disks.clear();
    spec.firmware = Firmware::Uefi(Ovmf {
        code: dir.path().join("OVMF_CODE_4M.fd"),
        vars_template: dir.path().join("OVMF_VARS_4M.fd"),
        nvram: dir.path().join("nvram.fd"),
    });
    let err = qemu().launch_machine(&spec).await.unwrap_err().to_string();
    assert!(err.contains("install the Debian package ovmf"), "{err}");
}

#[tokio::test]
async fn a_guest_that_ignores_the_power_button_is_forced_after_the_timeout() {
    // No boot device: SeaBIOS finds nothing to boot and no OS handles the button.
    let dir = run_dir();
    let spec = MachineSpec::new("hung", dir.path(), accel());
    let machine = qemu().launch_machine(&spec).await.expect("launching the machine");
    let shutdown = machine.shutdown(Duration::from_secs(2)).await.expect("shutdown");
    assert!(shutdown.forced, "{shutdown:?}");
    assert!(shutdown.exit.requested, "{shutdown:?}");
    assert_eq!(shutdown.exit.cause, ExitCause::Host, "{shutdown:?}");
    assert!(shutdown.took >= Duration::from_secs(2));
}

/// Sends `command` to the guest's `run` loop and returns what it printed up to `VIV-RUN-END`.
async fn guest_run(spec: &MachineSpec, machine: &Machine, serial: &mut UnixStream, command: &str) -> String {
    let from = console(spec).len();
    serial.write_all(format!("run {command}\n").as_bytes()).unwrap();
    let (_, end) = wait_line(spec, machine, "VIV-RUN-END", from, Duration::from_secs(90)).await;
    console(spec)[from..end].to_owned()
}

/// A line of `/proc/PID/status`.
fn proc_status(pid: u32, task: &str, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{task}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_controls_a_user_nic_and_reboots_on_a_running_machine() {
    let dir = run_dir();
    let mut spec = MachineSpec::new("limits", dir.path(), accel());
    let blank = blank_disk(dir.path(), 64);
    spec.disks = vec![disk("vda", &blank, DiskBus::VirtioBlk, None)];
    spec.cdroms = vec![cdrom(Some(iso()), Some(1))];
    let mac = "52:54:00:ab:cd:ef";
    spec.nics = vec![Nic::user("net0", mac)];
    let limits = IoLimits {
        iops: Some(200),
        bps: Some(8 << 20),
    };
    spec.resources.disk_io.insert("vda".into(), limits);
    let online = viv_vmm::machine::online_cpus().expect("/sys/devices/system/cpu/online");
    let pinned = *online.last().unwrap();
    spec.resources.host_cpus = Some(vec![pinned]);
    spec.resources.nice = Some(7);
    let (machine, mut console_in, _, _) = boot(&spec).await;
    let pid = machine.identity().pid;

    // Pinning and priority: every QEMU thread runs on the asked CPU only, at nice 7.
    let tasks: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|t| t.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(tasks.len() > 1, "QEMU runs threads");
    for task in &tasks {
        assert_eq!(
            proc_status(pid, task, "Cpus_allowed_list:"),
            pinned.to_string(),
            "thread {task}"
        );
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let nice: i32 = stat
        .rsplit(") ")
        .next()
        .unwrap()
        .split_whitespace()
        .nth(16)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(nice, 7, "{stat}");

    // The user-mode NIC's QEMU is in a network namespace of its own.
    let netns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    assert_ne!(netns(&pid.to_string()), netns("self"), "QEMU shares the host's network");

    // QEMU enforces the disk's limits (its throttle group), and the disk's format node keeps
    // its name: the guest sees an online resize through the throttle filter.
    assert_eq!(machine.io_limits("vda").await.unwrap(), limits);
    wait_line(&spec, &machine, READY, 0, Duration::from_secs(90)).await;
    machine.resize_disk("vda", 96 << 20).await.expect("block_resize");
    let start = Instant::now();
    loop {
        let sizes = guest_sizes(&spec, &machine, &mut console_in).await;
        if sizes.iter().any(|(d, s)| d == "vda" && *s == 96 << 11) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "guest sizes {sizes:?}");
    }

    // The guest sees its NIC with the given MAC and gets an address from QEMU's DHCP server.
    let out = guest_run(&spec, &machine, &mut console_in, "cat /sys/class/net/eth0/address").await;
    assert!(out.contains(mac), "the guest's eth0: {out}\n{}", diagnostics(&spec));
    let out = guest_run(
        &spec,
        &machine,
        &mut console_in,
        "ip link set eth0 up; udhcpc -i eth0 -n -q -t 10 -s /bin/true 2>&1",
    )
    .await;
    assert!(out.contains("10.0.2.15"), "no DHCP lease: {out}");

    // A reboot does not end the machine: it is counted, and the guest boots again.
    let mut resets = machine.resets();
    assert_eq!(*resets.borrow(), 0);
    let from = console(&spec).len();
    console_in.write_all(b"run reboot -f\n").unwrap();
    tokio::time::timeout(BOOT_DEADLINE, resets.wait_for(|n| *n == 1))
        .await
        .expect("no RESET event after the guest rebooted")
        .unwrap();
    wait_line(&spec, &machine, MARKER, from, BOOT_DEADLINE).await;
    let exit = machine.quit().await.expect("quit");
    assert_eq!(exit.cause, ExitCause::Host, "{}", exit.reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_panic_and_a_killed_qemu_are_told_apart() {
    let dir = run_dir();
    let mut spec = MachineSpec::new("panic", dir.path(), accel());
    spec.cdroms = vec![cdrom(Some(iso()), Some(1))];
    let (machine, mut console_in, _, _) = boot(&spec).await;
    wait_line(&spec, &machine, READY, 0, Duration::from_secs(90)).await;
    console_in.write_all(b"run echo c >/proc/sysrq-trigger\n").unwrap();
    let exit = tokio::time::timeout(BOOT_DEADLINE, machine.wait_exit())
        .await
        .expect("QEMU did not exit after the guest panicked");
    assert_eq!(
        exit.cause,
        ExitCause::GuestPanic,
        "{}\n{}",
        exit.reason,
        diagnostics(&spec)
    );
    assert!(exit.cause.is_crash() && !exit.requested);

    // QEMU killed by someone else: the signal, not a guest event.
    let dir = run_dir();
    let spec = MachineSpec::new("killed", dir.path(), accel());
    let machine = qemu().launch_machine(&spec).await.expect("launching the machine");
    // SAFETY: kill with the pid of the QEMU this test started and still holds (not reaped).
    assert_eq!(unsafe { libc::kill(machine.identity().pid as i32, libc::SIGKILL) }, 0);
    let exit = tokio::time::timeout(Duration::from_secs(30), machine.wait_exit())
        .await
        .unwrap();
    assert_eq!(exit.cause, ExitCause::Signal(libc::SIGKILL), "{}", exit.reason);
    assert!(!exit.requested);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_server_takes_over_a_running_machine() {
    let dir = run_dir();
    let iso = iso();
    let mut spec = MachineSpec::new("adopted", dir.path(), accel());
    spec.cdroms = vec![cdrom(Some(iso.clone()), Some(1))];
    let (machine, _console_in, _, _) = boot(&spec).await;
    wait_line(&spec, &machine, READY, 0, Duration::from_secs(90)).await;
    // A medium inserted at run time: the new handle must know it, and name the next one apart.
    let other = dir.path().join("other.iso");
    std::fs::copy(&iso, &other).unwrap();
    machine.change_medium("cd0", &other).await.expect("change medium");
    let identity = machine.identity();
    machine.detach();
    drop(machine);
    let alive = |id: viv_vmm::ProcessIdentity| viv_vmm::process::start_time(id.pid) == Some(id.start_time);
    assert!(alive(identity), "a detached machine's QEMU was killed");

    let machine = qemu()
        .adopt_machine(&spec, identity)
        .await
        .expect("taking the machine over");
    assert!(machine.has_medium("cd0").await.unwrap());
    machine
        .change_medium("cd0", &iso)
        .await
        .expect("a change after the takeover");
    machine.eject("cd0").await.expect("eject after the takeover");
    assert!(!machine.has_medium("cd0").await.unwrap());
    machine.pause().await.unwrap();
    assert_eq!(machine.status().await.unwrap().state, "paused");
    machine.resume().await.unwrap();
    assert!(machine.status().await.unwrap().running);
    let shutdown = machine.shutdown(Duration::from_secs(90)).await.expect("shutdown");
    assert!(!shutdown.forced, "{shutdown:?}\n{}", diagnostics(&spec));
    assert_eq!(
        shutdown.exit.cause,
        ExitCause::GuestShutdown,
        "{}",
        shutdown.exit.reason
    );
    // This test process started QEMU, so it reaps it (a new server is not its parent).
    let mut status = 0;
    // SAFETY: waitpid on a child of this process with a pointer to a live integer.
    let reaped = unsafe { libc::waitpid(identity.pid as i32, &mut status, libc::WNOHANG) };
    assert_eq!(reaped, identity.pid as i32, "QEMU still runs");
    assert!(!alive(identity));

    // A process that is gone cannot be taken over.
    let err = qemu().adopt_machine(&spec, identity).await.unwrap_err();
    assert!(matches!(err, viv_vmm::AdoptError::Gone), "{err}");
}

/// The jailer: the `viv` binary next to this test's directory (`viv __jail SPEC`).
fn jailer() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let viv = exe.parent().and_then(Path::parent).unwrap().join("viv");
    assert!(
        viv.is_file(),
        "{} is missing: the jailed machine test runs QEMU through it (cargo build -p viv)",
        viv.display()
    );
    viv
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jailed_machine_gets_its_cgroup_limits_pinning_and_a_user_nic() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("the jailed machine test needs root (the jail sets uids and cgroups)");
    }
    let state = tempfile::tempdir().unwrap();
    let key = format!("machine-test-{}", std::process::id());
    let cgroups = viv_jail::cgroup::CgroupTree::open(&format!("vivarium-test/{key}"))
        .unwrap()
        .expect("a memory cgroup controller");
    let config = std::sync::Arc::new(viv_vmm::confine::JailConfig {
        jailer: jailer(),
        uids: viv_jail::uids::UidPool::with_dir(state.path().join("uids"), 3_100_001_000, 8).unwrap(),
        cgroups: Some(cgroups.clone()),
        key,
    });
    let qemu = Qemu::default().confined(Confinement::Jail(config));
    let dir = run_dir();
    let mut spec = MachineSpec::new("jailed", dir.path(), accel());
    spec.cdroms = vec![cdrom(Some(iso()), Some(1))];
    let mac = "52:54:00:12:ab:cd";
    spec.nics = vec![Nic::user("net0", mac)];
    let pinned = *viv_vmm::machine::online_cpus().unwrap().first().unwrap();
    spec.resources.host_cpus = Some(vec![pinned]);
    spec.resources.cpu_percent = Some(150);
    spec.resources.cpu_weight = Some(200);
    let machine = qemu.launch_machine(&spec).await.expect("launching the jailed machine");
    let mut console_in = serial(&spec);
    let pid = machine.identity().pid;
    assert_ne!(machine.uid(), 0, "QEMU runs as root");
    assert_eq!(
        proc_status(pid, &pid.to_string(), "Cpus_allowed_list:"),
        pinned.to_string()
    );

    // Its cgroup holds it, with the quota and weight asked for.
    let cgroup = cgroups.get("jailed").expect("the machine's cgroup");
    assert!(cgroup.processes().contains(&pid), "QEMU is not in its cgroup");
    let read = |name: &str| {
        cgroup
            .paths()
            .iter()
            .map(|d| d.join(name))
            .find(|f| f.exists())
            .map(|f| std::fs::read_to_string(f).unwrap().trim().to_owned())
    };
    match cgroup.version() {
        viv_jail::cgroup::Version::V2 => {
            assert_eq!(read("cpu.max").as_deref(), Some("150000 100000"));
            assert_eq!(read("cpu.weight").as_deref(), Some("200"));
        }
        viv_jail::cgroup::Version::V1 => {
            assert_eq!(read("cpu.cfs_quota_us").as_deref(), Some("150000"));
            assert_eq!(read("cpu.shares").as_deref(), Some("2048"));
        }
    }

    // The user-mode NIC works inside the jail's own network namespace.
    let netns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    assert_ne!(netns(&pid.to_string()), netns("self"));
    wait_line(&spec, &machine, READY, 0, BOOT_DEADLINE).await;
    let out = guest_run(&spec, &machine, &mut console_in, "cat /sys/class/net/eth0/address").await;
    assert!(out.contains(mac), "the guest's eth0: {out}");
    let out = guest_run(
        &spec,
        &machine,
        &mut console_in,
        "ip link set eth0 up; udhcpc -i eth0 -n -q -t 10 -s /bin/true 2>&1",
    )
    .await;
    assert!(out.contains("10.0.2.15"), "no DHCP lease in the jail: {out}");

    let shutdown = machine.shutdown(Duration::from_secs(90)).await.expect("shutdown");
    assert_eq!(
        shutdown.exit.cause,
        ExitCause::GuestShutdown,
        "{}",
        shutdown.exit.reason
    );
    assert!(cgroups.get("jailed").is_none(), "the jail's cgroup outlived QEMU");
    cgroups.remove_if_empty();
}
