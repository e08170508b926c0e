//! VMs outlive the server: a server that is killed, stopped or replaced by a newer binary leaves
//! its sandboxes running, and the next one takes them over with their processes, terminals,
//! files, deadlines and network; a VM that died meanwhile is reported gone, with its reason.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use crate::fixture::{failure_of, qemu_of, qemu_processes_under, rpc, wait_until, TestServer, VIV};

/// Counts up in `/tmp/counter` every 100 ms, in the background (written atomically).
const COUNTER: &str = "nohup sh -c 'i=0; while true; do i=$((i+1)); echo $i > /tmp/counter.new; mv /tmp/counter.new /tmp/counter; sleep 0.1; done' >/dev/null 2>&1 &";

fn counter(server: &TestServer, id: &str) -> u64 {
    server
        .exec(id, json!({ "command": "cat /tmp/counter" }))
        .out()
        .trim()
        .parse()
        .unwrap_or(0)
}

fn info(server: &TestServer, id: &str) -> Value {
    server.get(&format!("/sandboxes/{id}")).send().unwrap().json().unwrap()
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// A copy of `viv` at another path, standing for an upgraded binary, and the static agent it
/// is built with (found beside the cargo binary, not beside the copy).
fn upgraded_binary(dir: &Path) -> (PathBuf, PathBuf) {
    let copy = dir.join("viv-upgraded");
    std::fs::copy(VIV, &copy).unwrap();
    let agent = Path::new(VIV)
        .ancestors()
        .take(3)
        .map(|a| a.join("x86_64-unknown-linux-gnu/agent/viv-agent"))
        .find(|p| p.is_file())
        .expect("the static agent is built (scripts/build)");
    (copy, agent)
}

/// Starts a shell under a PTY tagged `terminal` (through a stream that breaks when the server
/// dies) and returns its pid.
fn open_terminal(server: &TestServer, id: &str) -> u64 {
    let url = format!("{}/sandboxes/{id}/envd/process.Process/Start", server.url);
    let key = server.key.clone();
    let msg = json!({
        "process": { "cmd": "/bin/bash", "args": ["-i"] },
        "pty": { "size": { "rows": 24, "cols": 80 } },
        "tag": "terminal",
    })
    .to_string();
    let mut frame = vec![0u8];
    frame.extend((msg.len() as u32).to_be_bytes());
    frame.extend(msg.as_bytes());
    std::thread::spawn(move || {
        let _ = reqwest::blocking::Client::new()
            .post(url)
            .header("X-API-Key", key)
            .header("content-type", "application/connect+json")
            .body(frame)
            .send()
            .and_then(|r| r.bytes());
    });
    let mut pid = None;
    assert!(wait_until(Duration::from_secs(30), || {
        pid = terminal_pid(server, id);
        pid.is_some()
    }));
    pid.unwrap()
}

fn terminal_pid(server: &TestServer, id: &str) -> Option<u64> {
    let (_, list) = rpc(server, id, "process.Process/List", json!({}));
    list["processes"].as_array()?.iter().find(|p| p["tag"] == "terminal")?["pid"].as_u64()
}

#[test]
fn sandboxes_outlive_a_killed_server_and_an_upgraded_one_takes_them_over() {
    let temp = tempfile::Builder::new().prefix("viv-e2e-survive-").tempdir().unwrap();
    // With a warm VM, which no sandbox owns: the next server kills it.
    let first = TestServer::start_pooled_on(temp.path(), 1);

    // A runs a counter and a terminal and holds a file.
    let a = first.create(json!({ "timeout": 900, "metadata": { "who": "a" } }));
    assert_eq!(first.exec(&a, json!({ "command": COUNTER })).exit_code, Some(0));
    let put = first
        .put(&format!("/sandboxes/{a}/files?path=/home/user/keep.txt"))
        .body("kept bytes")
        .send()
        .unwrap();
    assert!(put.status().is_success(), "{}", put.text().unwrap_or_default());
    let terminal = open_terminal(&first, &a);
    let end_a = info(&first, &a)["endAt"].clone();
    // B is paused.
    let b = first.create(json!({ "timeout": 900 }));
    first.exec(&b, json!({ "command": "echo paused-state > /tmp/b.txt" }));
    assert_eq!(
        first.post(&format!("/sandboxes/{b}/pause")).send().unwrap().status(),
        204
    );
    // C's VM will die while no server runs.
    let c = first.create(json!({ "timeout": 900 }));
    let (qemu_a, qemu_c) = (qemu_of(temp.path(), &a), qemu_of(temp.path(), &c));
    let before = counter(&first, &a);
    assert!(wait_until(Duration::from_secs(60), || {
        first.get("/health").send().unwrap().json::<Value>().unwrap()["pooled"] == 1
    }));
    assert_eq!(qemu_processes_under(temp.path()).len(), 3, "A, C and a warm VM");

    first.stop(libc::SIGKILL);
    drop(first);
    std::thread::sleep(Duration::from_secs(1));
    assert!(alive(qemu_a) && alive(qemu_c), "the VMs run on without a server");
    // SAFETY: plain kill of a QEMU this test's server started.
    unsafe { libc::kill(qemu_c as i32, libc::SIGKILL) };
    assert!(wait_until(Duration::from_secs(10), || !alive(qemu_c)));

    let (binary, agent) = upgraded_binary(temp.path());
    let agent = agent.to_string_lossy().into_owned();
    let second = TestServer::start_binary_on(&binary, temp.path(), &["--agent", &agent]);

    // A runs on in the same VM, counting, with its deadline, file and terminal; the warm VM is
    // gone.
    assert_eq!(
        qemu_processes_under(temp.path()),
        vec![qemu_a],
        "the same QEMU, not a new one"
    );
    let metrics = second.get("/metrics").send().unwrap().text().unwrap();
    assert!(metrics.contains("vivarium_sandboxes_taken_over_total 1"), "{metrics}");
    assert!(metrics.contains("vivarium_orphan_vms_killed_total 1"), "{metrics}");
    let a_info = info(&second, &a);
    assert_eq!(a_info["state"], "running", "{a_info}");
    assert_eq!(a_info["endAt"], end_a);
    assert_eq!(a_info["metadata"]["who"], "a");
    let after = counter(&second, &a);
    assert!(
        after > before,
        "the counter went on while no server ran ({before} → {after})"
    );
    assert!(wait_until(Duration::from_secs(10), || counter(&second, &a) > after));
    let file = second
        .get(&format!("/sandboxes/{a}/files?path=/home/user/keep.txt"))
        .send()
        .unwrap();
    assert_eq!(file.text().unwrap(), "kept bytes");
    assert_eq!(terminal_pid(&second, &a), Some(terminal));
    use base64::Engine as _;
    let typed = base64::engine::general_purpose::STANDARD.encode("echo from-the-terminal > /tmp/pty.txt\n");
    let (status, answer) = rpc(
        &second,
        &a,
        "process.Process/SendInput",
        json!({ "process": { "pid": terminal }, "input": { "pty": typed } }),
    );
    assert_eq!(status, 200, "{answer}");
    assert!(wait_until(Duration::from_secs(10), || {
        second.exec(&a, json!({ "command": "cat /tmp/pty.txt" })).out() == "from-the-terminal\n"
    }));
    let health: Value = second.get("/health").send().unwrap().json().unwrap();
    if health["network"] == "isolated" {
        // A took its network slot back: the namespace is counted, and rules and NAT work.
        assert_eq!(health["networkSlots"], 1, "{health}");
        let fetched = second.exec(
            &a,
            json!({ "command": "curl -s -o /dev/null -w '%{http_code}' --max-time 20 http://deb.debian.org/debian/dists/bookworm/Release" }),
        );
        if fetched.out() != "200" {
            let key = crate::fixture::host_key(temp.path());
            let rules = Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "ip netns exec viv-{key}-0 nft list ruleset; nft list table inet vivarium_{key}; ss -ulpn"
                ))
                .output()
                .unwrap();
            let dns = second.exec(
                &a,
                json!({ "command": "cat /etc/resolv.conf; getent hosts deb.debian.org; ip route; ip addr" }),
            );
            panic!(
                "{fetched:?}\n{}\n{}\n{}",
                dns.out(),
                String::from_utf8_lossy(&rules.stdout),
                String::from_utf8_lossy(&rules.stderr)
            );
        }
    }

    // B resumes.
    let resumed = second
        .post(&format!("/sandboxes/{b}/connect"))
        .json(&json!({ "timeout": 60 }))
        .send()
        .unwrap();
    assert_eq!(resumed.status(), 201, "{}", resumed.text().unwrap_or_default());
    assert_eq!(
        second.exec(&b, json!({ "command": "cat /tmp/b.txt" })).out(),
        "paused-state\n"
    );

    // C is gone, with its reason; its files went with it.
    let reason = failure_of(&second, &c).expect("C is reported gone");
    assert!(reason.contains("stopped while no server was running"), "{reason}");
    let listed: Value = second.get("/v2/sandboxes").send().unwrap().json().unwrap();
    assert!(listed.as_array().unwrap().iter().all(|s| s["sandboxID"] != c));
    assert!(!temp.path().join("sandboxes").join(&c).exists());

    drop(second);
    crate::fixture::remove_template_memory(temp.path());
}

#[test]
fn a_stopped_server_leaves_its_sandboxes_running_or_pauses_them_as_asked() {
    let temp = tempfile::Builder::new().prefix("viv-e2e-stop-").tempdir().unwrap();
    // The default: leave them running.
    let leaving = TestServer::start_on_with(temp.path(), &["--on-shutdown", "leave"]);
    let id = leaving.create(json!({ "timeout": 900 }));
    leaving.exec(&id, json!({ "command": COUNTER }));
    let qemu = qemu_of(temp.path(), &id);
    assert!(leaving.stop(libc::SIGTERM).success());
    drop(leaving);
    assert!(alive(qemu), "a graceful stop left the VM running");

    let pausing = TestServer::start_on_with(temp.path(), &["--on-shutdown", "pause"]);
    assert_eq!(qemu_of(temp.path(), &id), qemu);
    let counted = counter(&pausing, &id);
    assert!(wait_until(Duration::from_secs(10), || counter(&pausing, &id) > counted));
    assert!(pausing.stop(libc::SIGTERM).success());
    drop(pausing);
    assert!(
        wait_until(Duration::from_secs(10), || qemu_processes_under(temp.path()).is_empty()),
        "pausing at shutdown stops the VM"
    );

    let last = TestServer::start_on(temp.path(), None);
    assert_eq!(info(&last, &id)["state"], "paused");
    let resumed = last
        .post(&format!("/sandboxes/{id}/connect"))
        .json(&json!({ "timeout": 60 }))
        .send()
        .unwrap();
    assert_eq!(resumed.status(), 201, "{}", resumed.text().unwrap_or_default());
    let counted = counter(&last, &id);
    assert!(counted > 0);
    assert!(wait_until(Duration::from_secs(10), || counter(&last, &id) > counted));
    // Stopping this one kills (the fixture's choice) and leaves nothing behind.
    drop(last);
    crate::fixture::remove_template_memory(temp.path());
}

/// A server stopped while it warms a pooled VM (the create before took the warm one, so the pool
/// is refilling) leaves no VM, run directory, cgroup, uid record or network state behind: in the
/// default mode, with no sandbox left running, as when it kills its sandboxes. Before, the VM
/// being warmed outlived its server.
#[test]
fn a_server_stopped_while_it_warms_its_pool_leaves_nothing_behind() {
    for mode in ["leave", "kill"] {
        let temp = tempfile::Builder::new().prefix("viv-e2e-warming-").tempdir().unwrap();
        let server = TestServer::start_pooled_on_with(temp.path(), 1, &["--on-shutdown", mode]);
        let first = server.create(json!({ "timeout": 300 }));
        // Once the pool holds a VM, the next create takes it and the pool starts warming another.
        assert!(
            wait_until(Duration::from_secs(120), || qemu_processes_under(temp.path()).len()
                >= 2),
            "the pool did not fill"
        );
        let taken = server.create(json!({ "timeout": 300 }));
        for id in [&first, &taken] {
            let killed = server.delete(&format!("/sandboxes/{id}")).send().unwrap();
            assert_eq!(killed.status(), 204);
        }
        assert!(server.stop(libc::SIGTERM).success(), "{mode}");
        drop(server);
        crate::fixture::remove_template_memory(temp.path());
        crate::fixture::assert_no_leftovers(temp.path());
    }
}

/// A VM that a restarted server cannot take over (here its QEMU is frozen, so it never answers)
/// is killed, its sandbox is reported lost with the reason, and what its jail held (cgroup, uid
/// record) is freed at once. Before, a failed take-over left both behind for good.
#[test]
fn a_vm_that_cannot_be_taken_over_is_killed_and_its_jail_freed() {
    let temp = tempfile::Builder::new().prefix("viv-e2e-frozen-").tempdir().unwrap();
    let first = TestServer::start_on(temp.path(), None);
    let id = first.create(json!({ "timeout": 900 }));
    let qemu = qemu_of(temp.path(), &id);
    first.stop(libc::SIGKILL);
    drop(first);
    // SAFETY: plain kill of a QEMU this test's server started.
    unsafe { libc::kill(qemu as i32, libc::SIGSTOP) };

    let second = TestServer::start_on(temp.path(), None);
    assert!(
        wait_until(Duration::from_secs(10), || !alive(qemu)),
        "the frozen VM was killed"
    );
    let reason = failure_of(&second, &id).expect("the sandbox is reported lost");
    assert!(reason.contains("taking over its VM failed"), "{reason}");
    let key = crate::fixture::data_key(temp.path());
    let cgroups: Vec<_> = ["memory", "cpu", "pids", "blkio", "unified", ""]
        .iter()
        .map(|c| {
            Path::new("/sys/fs/cgroup")
                .join(c)
                .join("vivarium")
                .join(&key)
                .join(&id)
        })
        .filter(|p| p.exists())
        .collect();
    assert!(cgroups.is_empty(), "the lost VM's cgroup is left: {cgroups:?}");
    let uids = crate::fixture::jail_resources(temp.path());
    assert!(
        !uids.iter().any(|r| r.contains(&format!("{key} {id}"))),
        "the lost VM's uid is still recorded: {uids:?}"
    );
    drop(second);
    crate::fixture::remove_template_memory(temp.path());
    crate::fixture::assert_no_leftovers(temp.path());
}

/// A server killed (`kill -9`) in the middle of a create leaves no half-made sandbox: the next
/// server on its data directory kills the VM that was booting, reports the sandbox gone with
/// the reason, and leaves nothing of it behind.
#[test]
fn a_server_killed_mid_create_leaves_no_half_made_sandbox() {
    let temp = tempfile::Builder::new().prefix("viv-e2e-midcreate-").tempdir().unwrap();
    let first = TestServer::start_on(temp.path(), None);
    // A cold boot: the kernel boots before the agent answers, so the create takes seconds.
    let request = first
        .post("/sandboxes")
        .json(&json!({ "timeout": 300, "coldBoot": true }))
        .timeout(Duration::from_secs(300));
    let creating = std::thread::spawn(move || request.send().map(|r| r.status()));
    let run_dirs = temp.path().join("sandboxes");
    let mut id = String::new();
    let booting = wait_until(Duration::from_secs(120), || {
        id = std::fs::read_dir(&run_dirs)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .next()
            .unwrap_or_default();
        !id.is_empty() && !qemu_processes_under(temp.path()).is_empty()
    });
    assert!(booting, "no VM started for the create");
    first.stop(libc::SIGKILL);
    drop(first);
    // The client saw its connection break, not an answer.
    assert!(creating.join().unwrap().is_err());

    let second = TestServer::start_on(temp.path(), None);
    assert!(
        wait_until(Duration::from_secs(30), || qemu_processes_under(temp.path()).is_empty()),
        "the VM of the interrupted create outlived the restart"
    );
    let gone = second.get(&format!("/sandboxes/{id}")).send().unwrap();
    assert_eq!(gone.status(), 404);
    let body: Value = gone.json().unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("while the sandbox was starting"),
        "{body}"
    );
    let listed: Value = second.get("/v2/sandboxes").send().unwrap().json().unwrap();
    assert_eq!(listed, json!([]));
    // The restarted server works, and stops leaving nothing.
    let fresh = second.create(json!({ "timeout": 300 }));
    assert_eq!(
        second.delete(&format!("/sandboxes/{fresh}")).send().unwrap().status(),
        204
    );
    assert!(second.stop(libc::SIGTERM).success());
    drop(second);
    crate::fixture::remove_template_memory(temp.path());
    crate::fixture::assert_no_leftovers(temp.path());
}
