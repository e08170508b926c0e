//! Leak soak: create/kill cycles and pause/resume/fork cycles leave nothing behind — no
//! process, no descriptor or socket in the server, no run directory, memory file or snapshot,
//! no namespace, link or nftables table, no cgroup, jail uid or mount.
//!
//! CI runs a short soak; `bash bench/leak-soak` runs 1,000 create/kill and 200
//! pause/resume/fork cycles (`VIV_LEAK_CREATES`, `VIV_LEAK_FORKS`).

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::fixture::{
    data_key, jail_resources, network_resources, qemu_processes_under, shm_dir, wait_until, TestServer,
};

fn count(var: &str, default: usize) -> usize {
    std::env::var(var).ok().and_then(|n| n.parse().ok()).unwrap_or(default)
}

fn entries(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Inodes of TCP sockets connected to `port` on this host (the test client's connections to
/// the server, which its connection pool keeps open as it likes).
fn client_sockets(port: u16) -> BTreeSet<String> {
    let mut inodes = BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(table).unwrap_or_default().lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields
                .get(1)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if local_port == Some(port) {
                if let Some(inode) = fields.get(9) {
                    inodes.insert(format!("socket:[{inode}]"));
                }
            }
        }
    }
    inodes
}

/// Everything a server holds on the host, by kind.
#[derive(Debug, PartialEq, Eq)]
struct Holdings {
    descriptors: Vec<String>,
    qemu: usize,
    run_dirs: BTreeSet<String>,
    memory: BTreeSet<String>,
    snapshots: BTreeSet<String>,
    network: Vec<String>,
    jail: Vec<String>,
    mounts: Vec<String>,
}

fn holdings(server: &TestServer) -> Holdings {
    let port: u16 = server.url.rsplit(':').next().unwrap().parse().unwrap();
    let clients = client_sockets(port);
    let mut descriptors: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", server.pid()))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|t| t.to_string_lossy().into_owned())
        .filter(|t| !clients.contains(t))
        // Which socket is not compared, how many are: the spare network slot's proxy listener
        // is a new socket whenever a start took the spare and another was made.
        .map(|t| {
            if t.starts_with("socket:[") {
                "socket".to_owned()
            } else {
                t
            }
        })
        .collect();
    descriptors.sort();
    let dir = server.data_dir.to_string_lossy().into_owned();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(&dir) || l.contains("/run/vivarium/jail"))
        .map(str::to_owned)
        .collect();
    Holdings {
        descriptors,
        qemu: qemu_processes_under(&server.data_dir).len(),
        run_dirs: entries(&server.data_dir.join("sandboxes")),
        memory: entries(&shm_dir(&server.data_dir)),
        snapshots: entries(&server.data_dir.join("snapshots")),
        // By kind, not index: the spare slot made ahead may have another index after cycles.
        network: {
            let mut kinds: Vec<String> = network_resources(&server.data_dir)
                .into_iter()
                .map(|r| r.trim_end_matches(|c: char| c.is_ascii_digit()).to_owned())
                .collect();
            kinds.sort();
            kinds
        },
        jail: jail_resources(&server.data_dir)
            .into_iter()
            // The server's own cgroup directories stay while it runs; its VMs' must go.
            .filter(|r| r.starts_with("uid"))
            .collect(),
        mounts,
    }
}

/// Whether the server has no child process running (an `ip`, `nft` or `qemu-img`) and, when it
/// networks in isolation, its spare slot is made (a namespace and a link beside its table).
fn settled(server: &TestServer) -> bool {
    let children = std::fs::read_dir(format!("/proc/{}/task", server.pid()))
        .map(|tasks| {
            tasks
                .flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
                .any(|c| !c.trim().is_empty())
        })
        .unwrap_or(false);
    let network = network_resources(&server.data_dir);
    !children && (network.is_empty() || network.len() == 3)
}

/// The VM cgroups (directories) under the server's cgroup trees.
fn cgroups_of_vms(server: &TestServer) -> Vec<String> {
    let key = data_key(&server.data_dir);
    ["memory", "cpu", "pids", "blkio", "unified", ""]
        .iter()
        .map(|c| Path::new("/sys/fs/cgroup").join(c).join("vivarium").join(&key))
        .flat_map(|tree| std::fs::read_dir(tree).into_iter().flatten().flatten())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path().display().to_string())
        .collect()
}

#[test]
fn create_kill_and_pause_resume_fork_cycles_leave_nothing_behind() {
    let creates = count("VIV_LEAK_CREATES", 40);
    let forks = count("VIV_LEAK_FORKS", 10);
    let server = TestServer::start();
    // Once first: the template snapshot is built and what a server keeps open is opened.
    let warm = server.create(json!({ "timeout": 300 }));
    assert_eq!(
        server.delete(&format!("/sandboxes/{warm}")).send().unwrap().status(),
        204
    );
    // The spare network slot the warm create took is made up again in the background (its
    // `ip` and `nft` run with pipes, its proxy listens on a socket): count once it is there.
    assert!(wait_until(Duration::from_secs(10), || settled(&server)));
    let before = holdings(&server);
    assert_eq!(before.qemu, 0);
    assert!(cgroups_of_vms(&server).is_empty());

    let started = Instant::now();
    for i in 0..creates {
        let id = server.create(json!({ "timeout": 300, "metadata": { "cycle": i.to_string() } }));
        assert_eq!(server.delete(&format!("/sandboxes/{id}")).send().unwrap().status(), 204);
    }
    let create_kill = started.elapsed();
    let started = Instant::now();
    for i in 0..forks {
        let id = server.create(json!({ "timeout": 300 }));
        let wrote = server.exec(&id, json!({ "command": format!("echo {i} > /tmp/cycle") }));
        assert_eq!(wrote.exit_code, Some(0), "{wrote:?}");
        assert_eq!(
            server.post(&format!("/sandboxes/{id}/pause")).send().unwrap().status(),
            204
        );
        let resumed = server
            .post(&format!("/sandboxes/{id}/connect"))
            .json(&json!({ "timeout": 300 }))
            .send()
            .unwrap();
        assert_eq!(resumed.status(), 201, "{}", resumed.text().unwrap_or_default());
        let forked: Value = server
            .post(&format!("/sandboxes/{id}/fork"))
            .json(&json!({ "count": 1, "timeout": 300 }))
            .send()
            .unwrap()
            .json()
            .unwrap();
        let child = forked[0]["sandbox"]["sandboxID"].as_str().expect("a fork").to_owned();
        assert_eq!(
            server.exec(&child, json!({ "command": "cat /tmp/cycle" })).out(),
            format!("{i}\n")
        );
        for sandbox in [&child, &id] {
            assert_eq!(
                server.delete(&format!("/sandboxes/{sandbox}")).send().unwrap().status(),
                204
            );
        }
    }
    let pause_fork = started.elapsed();
    eprintln!(
        "{creates} create/kill cycles in {:.1} s, {forks} create/pause/resume/fork/kill cycles in {:.1} s",
        create_kill.as_secs_f64(),
        pause_fork.as_secs_f64()
    );
    wait_until(Duration::from_secs(10), || {
        settled(&server) && holdings(&server) == before
    });
    assert_eq!(holdings(&server), before);
    assert!(cgroups_of_vms(&server).is_empty(), "{:?}", cgroups_of_vms(&server));
    let health: Value = server.get("/health").send().unwrap().json().unwrap();
    assert_eq!(health["sandboxes"], 0, "{health}");
    assert_eq!(health["networkSlots"], 0, "{health}");
}
