//! The console hub on a real machine (QEMU, TCG unless KVM is usable): the ISO of
//! `tests/fixtures/vm-iso/build` boots with its serial port in telnet mode, the hub connected
//! to it; the boot marker reaches two clients, the replay of a late one and the log; input
//! reaches the guest's shell; a break reaches the guest's serial driver as a real break (the
//! kernel's magic SysRq answers).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use viv_server::manager::{ConsoleClient, ConsoleHub};
use viv_vmm::confine::Confinement;
use viv_vmm::machine::{Cdrom, Machine, MachineSpec};
use viv_vmm::qemu::Qemu;
use viv_vmm::Accel;

/// Boot under TCG on a busy 2-core host takes seconds; this bounds a hang, not a slow boot.
const BOOT_DEADLINE: Duration = Duration::from_secs(240);
const MARKER: &str = "VIVARIUM-ISO-BOOTED";

fn iso() -> PathBuf {
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
}

/// A client's output so far, read until it contains `needle`.
struct Seen {
    client: ConsoleClient,
    text: Vec<u8>,
}

impl Seen {
    fn new(client: ConsoleClient) -> Self {
        Self {
            client,
            text: Vec::new(),
        }
    }

    fn lossy(&self) -> String {
        String::from_utf8_lossy(&self.text).into_owned()
    }

    /// Reads until `needle` appears after byte `from`; fails with what was seen when the
    /// machine exits or `limit` passes.
    async fn wait_for(&mut self, machine: &Machine, needle: &str, from: usize, limit: Duration) {
        let start = Instant::now();
        let mut exit = machine.exit();
        while !String::from_utf8_lossy(&self.text[from.min(self.text.len())..]).contains(needle) {
            let left = limit.saturating_sub(start.elapsed());
            tokio::select! {
                chunk = self.client.recv() => match chunk {
                    Some(chunk) => self.text.extend_from_slice(&chunk),
                    None => panic!("the console closed before {needle:?}:\n{}", self.lossy()),
                },
                _ = exit.wait_for(Option::is_some) => {
                    panic!("the machine exited before {needle:?}:\n{}", self.lossy())
                }
                () = tokio::time::sleep(left) => {
                    panic!("no {needle:?} within {limit:?}:\n{}", self.lossy())
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_booting_machine_is_seen_by_two_clients_the_replay_and_the_log() {
    let dir = tempdir();
    let mut spec = MachineSpec::new("console", &dir, Accel::Auto.resolve());
    spec.cdroms = vec![Cdrom {
        id: "cd0".into(),
        iso: Some(iso()),
        boot_index: Some(1),
        bus: Default::default(),
    }];
    let machine = Qemu::default()
        .confined(Confinement::Seccomp)
        .launch_machine(&spec)
        .await
        .expect("launching the machine");
    let log = dir.join("log").join("console.log");
    let hub = ConsoleHub::start(machine.serial_socket(), log.clone());
    let mut first = Seen::new(hub.attach(true));
    let mut second = Seen::new(hub.attach(true));

    first.wait_for(&machine, MARKER, 0, BOOT_DEADLINE).await;
    second.wait_for(&machine, MARKER, 0, Duration::from_secs(10)).await;
    let attach = Instant::now();
    let mut late = Seen::new(hub.attach(true));
    late.wait_for(&machine, MARKER, 0, Duration::from_secs(10)).await;
    println!(
        "FIGURE console hub attach to replayed boot banner: {} us (accel {})",
        attach.elapsed().as_micros(),
        spec.accel
    );
    let logged = String::from_utf8_lossy(&hub.read_log(None).unwrap()).into_owned();
    assert!(logged.contains(MARKER), "not in the log:\n{logged}");
    assert!(
        !logged.as_bytes().starts_with(&[0xff]),
        "the telnet negotiation leaked into the log"
    );

    // Input reaches the guest's shell loop; every client sees the answer.
    first
        .wait_for(&machine, "VIVARIUM-ACPID-READY", 0, Duration::from_secs(120))
        .await;
    let from = first.text.len();
    hub.send(b"sizes\n").await.unwrap();
    first
        .wait_for(&machine, "VIV-SIZES-END", from, Duration::from_secs(60))
        .await;
    second
        .wait_for(&machine, "VIV-SIZES-END", 0, Duration::from_secs(10))
        .await;

    // A break, then a key: the kernel's serial driver takes it as a magic SysRq ("sysrq: ..."
    // whether or not the key's function is enabled), which only a real break triggers.
    let from = first.text.len();
    hub.send_break().await.unwrap();
    hub.send(b"h").await.unwrap();
    first.wait_for(&machine, "sysrq", from, Duration::from_secs(30)).await;

    machine.kill().await.unwrap();
    hub.close();
    assert!(tokio::time::timeout(Duration::from_secs(10), async {
        while first.client.recv().await.is_some() {}
    })
    .await
    .is_ok());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A short run directory (socket paths are limited), removed by the test.
fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vc{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
