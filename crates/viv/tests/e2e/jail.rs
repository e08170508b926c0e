//! The jail every QEMU runs in, seen from the host: its own uid without capabilities,
//! `no_new_privs` and a seccomp filter, a mount namespace that shows only its VM's files, a
//! cgroup with limits, and neighbours that a hostile guest cannot slow down or starve.

use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::fixture::{data_key, proc_status, qemu_of, shm_dir, TestServer};

fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Whether a process running as `uid` can read `path`.
fn readable_as(uid: u32, path: &Path) -> bool {
    Command::new("/bin/cat")
        .arg(path)
        .uid(uid)
        .gid(uid)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// A cgroup v1 or v2 control file of sandbox `id`'s cgroup, trimmed.
fn cgroup_value(data_dir: &Path, id: &str, v1: (&str, &str), v2: &str) -> String {
    let key = data_key(data_dir);
    let unified = Path::new("/sys/fs/cgroup/vivarium").join(&key).join(id).join(v2);
    let path = if unified.exists() {
        unified
    } else {
        Path::new("/sys/fs/cgroup")
            .join(v1.0)
            .join("vivarium")
            .join(&key)
            .join(id)
            .join(v1.1)
    };
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_owned()
}

#[test]
fn qemu_runs_jailed_under_its_own_uid_in_its_own_mount_namespace_and_cgroup() {
    if !root() {
        eprintln!("skipped: the jail needs root");
        return;
    }
    let server = TestServer::start();
    let health: serde_json::Value = server.get("/health").send().unwrap().json().unwrap();
    assert!(health["confinement"].as_str().unwrap().starts_with("jail"), "{health}");
    let a = server.sandbox();
    // A booted sandbox has a memory file of its own (a restored one maps its template's).
    let b = server.sandbox_with(json!({ "timeout": 600, "coldBoot": true }));
    let (pa, pb) = (qemu_of(&server.data_dir, &a.id), qemu_of(&server.data_dir, &b.id));

    for pid in [pa, pb] {
        let uids: Vec<u32> = proc_status(pid, "Uid")
            .split_whitespace()
            .map(|u| u.parse().unwrap())
            .collect();
        assert_eq!(uids.len(), 4);
        assert!(uids.iter().all(|u| *u == uids[0] && *u != 0), "{uids:?}");
        assert_eq!(proc_status(pid, "CapEff"), "0000000000000000");
        assert_eq!(proc_status(pid, "CapPrm"), "0000000000000000");
        assert_eq!(proc_status(pid, "CapBnd"), "0000000000000000");
        assert_eq!(proc_status(pid, "NoNewPrivs"), "1");
        assert_eq!(proc_status(pid, "Seccomp"), "2");
    }
    let uid = |pid: u32| -> u32 {
        proc_status(pid, "Uid")
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (uid_a, uid_b) = (uid(pa), uid(pb));
    assert_ne!(uid_a, uid_b, "every VM has a uid of its own");

    // Its cgroup, with the limits of a 1-vCPU, 256 MiB sandbox.
    let cgroups = std::fs::read_to_string(format!("/proc/{pa}/cgroup")).unwrap();
    let path = format!("/vivarium/{}/{}", data_key(&server.data_dir), a.id);
    assert!(cgroups.lines().any(|l| l.ends_with(&path)), "{cgroups}");
    let memory: u64 = cgroup_value(
        &server.data_dir,
        &a.id,
        ("memory", "memory.limit_in_bytes"),
        "memory.max",
    )
    .parse()
    .unwrap();
    assert!(
        memory > 256 << 20 && memory <= (256 + 1024) << 20,
        "memory limit {memory}: guest memory plus QEMU's overhead"
    );
    let cpu = cgroup_value(&server.data_dir, &a.id, ("cpu", "cpu.cfs_quota_us"), "cpu.max");
    assert!(cpu == "100000" || cpu == "100000 100000", "one vCPU's worth: {cpu}");
    let pids = cgroup_value(&server.data_dir, &a.id, ("pids", "pids.max"), "pids.max");
    assert_eq!(pids, "256");

    // Its mount namespace: a read-only root with /usr, a few devices and its own files.
    let root = Path::new("/proc").join(pa.to_string()).join("root");
    let top: std::collections::BTreeSet<String> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for absent in ["etc", "home", "root", "proc", "sys", "var/lib", "boot"] {
        assert!(!root.join(absent).exists(), "/{absent} is visible in the jail: {top:?}");
    }
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap());
    let run_a = server.data_dir.join("sandboxes").join(&a.id);
    let run_b = server.data_dir.join("sandboxes").join(&b.id);
    assert!(inside(&run_a).join("root.qcow2").exists(), "its own run directory");
    assert!(!inside(&run_b).exists(), "another sandbox's run directory is not there");
    assert!(
        !inside(&server.data_dir.join("vivarium.db")).exists(),
        "nor the database"
    );
    let seen: Vec<String> = std::fs::read_dir(inside(&server.data_dir.join("sandboxes")))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(seen, vec![a.id.clone()]);

    // As A's uid: its own overlay opens (through its jail's view), B's overlay and memory file
    // do not, by any path: through B's jail, or on the host.
    let memory_b = shm_dir(&server.data_dir).join(format!("{}.mem", b.id));
    assert!(memory_b.exists(), "{}", memory_b.display());
    assert!(
        readable_as(uid_a, &inside(&run_a).join("root.qcow2")),
        "the check can succeed"
    );
    let root_b = Path::new("/proc").join(pb.to_string()).join("root");
    let inside_b = |p: &Path| root_b.join(p.strip_prefix("/").unwrap());
    assert!(
        readable_as(uid_b, &inside_b(&run_b).join("root.qcow2")),
        "the check can succeed"
    );
    assert!(readable_as(uid_b, &inside_b(&memory_b)), "the check can succeed");
    for path in [
        run_b.join("root.qcow2"),
        inside_b(&run_b).join("root.qcow2"),
        memory_b.clone(),
        inside_b(&memory_b),
    ] {
        assert!(!readable_as(uid_a, &path), "uid {uid_a} read {}", path.display());
    }
    // What B's uid owns, nobody else may open.
    use std::os::unix::fs::MetadataExt as _;
    for path in [run_b.clone(), run_b.join("root.qcow2"), memory_b.clone()] {
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.uid(), uid_b, "{}", path.display());
        assert_eq!(meta.mode() & 0o077, 0, "{} is open to others", path.display());
    }
    // Neither may signal the other.
    let killed = Command::new("/bin/kill")
        .args(["-0", &pb.to_string()])
        .uid(uid_a)
        .gid(uid_a)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!killed.success(), "A's uid may not signal B's QEMU");

    // Both still work.
    assert_eq!(a.sh("echo a").out(), "a\n");
    assert_eq!(b.sh("echo b").out(), "b\n");
}

/// The round trip of `echo` in `sandbox`, in seconds.
fn echo_seconds(server: &TestServer, id: &str) -> f64 {
    let started = Instant::now();
    let out = server.exec(id, json!({ "command": "echo x" })).out();
    assert_eq!(out, "x\n");
    started.elapsed().as_secs_f64()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn oom_kills() -> u64 {
    std::fs::read_to_string("/proc/vmstat")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill ").and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

/// A timing test: it runs alone (`scripts/test` runs the ignored tests one at a time after the
/// suite), since another test's VMs on the same two cores would be a second hog.
#[test]
#[ignore = "timing: run alone with --ignored --test-threads=1 (scripts/test does)"]
fn a_guest_that_exhausts_its_memory_and_fork_bombs_does_not_slow_its_neighbour() {
    if !root() {
        eprintln!("skipped: the jail needs root");
        return;
    }
    let server = TestServer::start();
    let neighbour = server.sandbox();
    let hog = server.sandbox();
    let hog_qemu = qemu_of(&server.data_dir, &hog.id);
    let oom_before = oom_kills();
    for _ in 0..3 {
        echo_seconds(&server, &neighbour.id);
    }
    // All its memory, then processes without end, as root and as a user; the guest's own OOM
    // killer deals with it inside.
    let started = hog.sh(
        "(python3 -c 'b = []\nwhile True: b.append(bytearray(1 << 20))' >/dev/null 2>&1 &) ; \
         (sudo -u user bash -c 'f() { f | f & }; f' >/dev/null 2>&1 &) ; \
         (bash -c 'f() { f | f & }; f' >/dev/null 2>&1 &) ; echo started",
    );
    assert_eq!(started.out(), "started\n", "{started:?}");
    std::thread::sleep(Duration::from_secs(3));
    // The hog running and stopped in turns (SIGSTOP freezes its QEMU), so both halves see the
    // same host noise.
    let (mut loaded, mut quiet) = (Vec::new(), Vec::new());
    for _ in 0..6 {
        for _ in 0..4 {
            loaded.push(echo_seconds(&server, &neighbour.id));
        }
        // SAFETY: plain kill of a QEMU this test's server started.
        unsafe { libc::kill(hog_qemu as i32, libc::SIGSTOP) };
        std::thread::sleep(Duration::from_millis(200));
        for _ in 0..4 {
            quiet.push(echo_seconds(&server, &neighbour.id));
        }
        // SAFETY: as above.
        unsafe { libc::kill(hog_qemu as i32, libc::SIGCONT) };
        std::thread::sleep(Duration::from_millis(300));
    }
    let (loaded, quiet) = (median(loaded), median(quiet));
    eprintln!(
        "neighbour's echo: {:.1} ms beside the hog, {:.1} ms with it frozen",
        loaded * 1e3,
        quiet * 1e3
    );
    assert!(
        loaded <= 2.0 * quiet,
        "the hog slowed its neighbour down from {quiet:.3} s to {loaded:.3} s"
    );
    assert_eq!(oom_kills(), oom_before, "something on the host was OOM-killed");
    assert!(
        Path::new(&format!("/proc/{hog_qemu}")).exists(),
        "the hog's QEMU stayed within its cgroup's memory"
    );
    let memory_peak: u64 = cgroup_value(
        &server.data_dir,
        &hog.id,
        ("memory", "memory.max_usage_in_bytes"),
        "memory.peak",
    )
    .parse()
    .unwrap_or(0);
    eprintln!("the hog's QEMU peaked at {} MiB", memory_peak >> 20);
}
