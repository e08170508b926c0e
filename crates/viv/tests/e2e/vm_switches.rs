//! VM switches with real packets: two busybox guests with a NIC on each of a `nat` switch, an
//! `isolated` switch and an isolated switch with port isolation get addresses by DHCP, ping
//! each other where the switch lets them, and reach (or not) an HTTP server in a network
//! namespace the test creates to stand in for the internet (the masquerade's uplink is the
//! test's veth into it, never a real network). Also: a MAC clash and a switch in use are
//! refused, taps go with their VM, switches survive a restart, a crashed server's leftovers
//! are removed, and nothing of ours is left on the host afterwards.
//!
//! Addresses: 10.250.0.0/16 only (10.250.1-3.0/24 for the switches of the shared server,
//! 10.250.32.0/20 as a dedicated server's switch range, 10.250.200.0/30 for the "internet").

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::fixture::{unique, wait_until, TestServer};
use crate::vm_boot::{booted, library_iso, Guest};
use crate::vm_lifecycle::{act, define, refused};

/// A network namespace with an HTTP server at 10.250.200.2:8080, linked to the host by a veth
/// whose host end is 10.250.200.1/30. Removed on drop.
struct Internet {
    netns: String,
    root: std::path::PathBuf,
    server: std::process::Child,
}

const INTERNET: &str = "10.250.200.2";
/// Bytes of the file the rate limit is measured with.
const BIG: usize = 2_000_000;
/// The rate limit into VM a's nat NIC, kbit/s.
const RATE_IN_KBPS: u32 = 2_000;

fn sh(command: &str) {
    let out = Command::new("sh").args(["-c", command]).output().unwrap();
    assert!(
        out.status.success(),
        "{command}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Internet {
    fn start() -> Self {
        let tag = std::process::id() % 100_000;
        let netns = format!("vivswtest{tag}");
        let host = format!("vswi{tag}");
        let _ = Command::new("ip").args(["netns", "del", &netns]).output();
        let _ = Command::new("ip").args(["link", "del", &host]).output();
        sh(&format!(
            "ip netns add {netns} && ip link add {host} type veth peer name eth0 netns {netns} && \
             ip addr add 10.250.200.1/30 dev {host} && ip link set {host} up && \
             ip -n {netns} addr add {INTERNET}/30 dev eth0 && ip -n {netns} link set eth0 up && \
             ip -n {netns} link set lo up"
        ));
        let root = std::env::temp_dir().join(&netns);
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("index.html"), "VIV-INTERNET-REACHED\n").unwrap();
        std::fs::write(root.join("big"), vec![b'x'; BIG]).unwrap();
        let server = Command::new("ip")
            .args([
                "netns",
                "exec",
                &netns,
                "busybox",
                "httpd",
                "-f",
                "-p",
                &format!("{INTERNET}:8080"),
                "-h",
            ])
            .arg(&root)
            .spawn()
            .unwrap();
        let up = wait_until(Duration::from_secs(10), || {
            Command::new("ip")
                .args(["netns", "exec", &netns, "sh", "-c"])
                .arg(format!(
                    "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | busybox nc -w 2 {INTERNET} 8080"
                ))
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("VIV-INTERNET-REACHED"))
        });
        assert!(up, "the test's internet server did not come up");
        Self { netns, root, server }
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = Command::new("ip").args(["netns", "del", &self.netns]).output();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn create_switch(server: &TestServer, body: Value) -> Value {
    let response = server.post("/switches").json(&body).send().unwrap();
    let status = response.status();
    let made: Value = response.json().unwrap();
    assert_eq!(status, 201, "{made}");
    made
}

/// Our bridges, taps, nftables table and dnsmasqs on the host, for server key `key`.
fn switch_resources(key: &str) -> Vec<String> {
    let links = Command::new("ip").args(["-o", "link", "show"]).output().unwrap();
    let mut found: Vec<String> = String::from_utf8_lossy(&links.stdout)
        .lines()
        .filter_map(|l| {
            l.split(':')
                .nth(1)
                .map(|n| n.trim().split('@').next().unwrap_or("").to_owned())
        })
        .filter(|n| n.starts_with(&format!("vs{key}")) || n.starts_with(&format!("vt{key}")))
        .collect();
    let tables = Command::new("nft").args(["list", "tables"]).output().unwrap();
    found.extend(
        String::from_utf8_lossy(&tables.stdout)
            .lines()
            .filter(|l| l.ends_with(&format!("vivsw_{key}")))
            .map(str::to_owned),
    );
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.starts_with("dnsmasq") && cmdline.contains(&format!("--interface=vs{key}")) {
            found.push(format!("dnsmasq {}", entry.file_name().to_string_lossy()));
        }
    }
    found
}

fn taps(key: &str) -> usize {
    switch_resources(key)
        .iter()
        .filter(|r| r.starts_with(&format!("vt{key}")))
        .count()
}

/// A MAC address unique to this test run.
fn mac(vm: u8, nic: u8) -> String {
    let pid = std::process::id();
    format!("52:54:{:02x}:{:02x}:{vm:02x}:{nic:02x}", (pid >> 8) as u8, pid as u8)
}

/// The guest's interface with MAC `mac`, brought up, and the address DHCP gave it.
fn dhcp(guest: &mut Guest, mac: &str) -> (String, String) {
    let out = guest.run(&format!(
        "for i in /sys/class/net/*; do [ \"$(cat $i/address)\" = {mac} ] && echo VIV-IF ${{i##*/}}; done"
    ));
    let ifname = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("VIV-IF "))
        .unwrap_or_else(|| panic!("no interface with MAC {mac}: {out}"))
        .to_owned();
    let out = guest.run(&format!(
        "ip link set {ifname} up; udhcpc -i {ifname} -n -q -f -t 10 -T 2 -s /bin/true 2>&1"
    ));
    let address = out
        .lines()
        .find_map(|l| l.split("lease of ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no DHCP lease on {ifname}: {out}"))
        .to_owned();
    guest.run(&format!("ip addr add {address}/24 dev {ifname}"));
    (ifname, address)
}

fn pings(guest: &mut Guest, address: &str) -> bool {
    guest
        .run(&format!("ping -c 2 -W 2 {address} >/dev/null 2>&1 && echo VIV-PING-OK"))
        .contains("VIV-PING-OK")
}

fn fetches(guest: &mut Guest) -> bool {
    // busybox nc, not wget: the static busybox's wget crashes with a timeout option.
    guest
        .run(&format!(
            "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {INTERNET} 8080 2>&1"
        ))
        .contains("VIV-INTERNET-REACHED")
}

#[test]
fn vms_on_nat_isolated_and_port_isolated_switches_reach_what_their_switch_allows() {
    let server = TestServer::shared();
    let internet = Internet::start();
    let names = [unique("nat"), unique("iso"), unique("pis")];
    let nat = create_switch(
        server,
        json!({"name": names[0], "kind": "nat", "subnet": "10.250.1.0/24"}),
    );
    create_switch(
        server,
        json!({"name": names[1], "kind": "isolated", "subnet": "10.250.2.0/24"}),
    );
    create_switch(
        server,
        json!({"name": names[2], "kind": "isolated", "subnet": "10.250.3.0/24", "portIsolation": true}),
    );
    let key = nat["bridge"].as_str().unwrap()[2..8].to_owned();
    assert_eq!(nat["hostAddress"], "10.250.1.1", "{nat}");
    // Overlapping subnets and names are refused.
    let (status, message) = refused(
        server
            .post("/switches")
            .json(&json!({"name": unique("dup"), "subnet": "10.250.1.128/25"}))
            .send()
            .unwrap(),
    );
    assert_eq!((status, message.contains(&names[0])), (409, true), "{message}");

    let iso = library_iso(server);
    let body = |vm: u8| {
        json!({"memoryMib": 192, "cdroms": [{"iso": iso}], "nics": [
            {"switch": names[0], "mac": mac(vm, 0), "rateInKbps": if vm == 1 { Some(RATE_IN_KBPS) } else { None }},
            {"switch": names[1], "mac": mac(vm, 1)},
            {"switch": names[2], "mac": mac(vm, 2)},
        ]})
    };
    // A MAC address another VM has is refused, naming that VM.
    let first = unique("a");
    let a_id = define(server, &first, body(1));
    let (status, message) = refused(
        server
            .post("/vms")
            .json(&json!({"name": unique("clash"), "nics": [{"switch": names[0], "mac": mac(1, 0)}]}))
            .send()
            .unwrap(),
    );
    assert_eq!(status, 409, "{message}");
    assert!(message.contains(&first) && message.contains(&mac(1, 0)), "{message}");
    // So is a NIC on a switch that does not exist.
    let (status, _) = refused(
        server
            .post("/vms")
            .json(&json!({"name": unique("nosw"), "nics": [{"switch": "no-such-switch"}]}))
            .send()
            .unwrap(),
    );
    assert_eq!(status, 404);

    act(server, &a_id, "start", "");
    let mut a = Guest::attach(server, &a_id);
    let (b_id, mut b) = booted(server, "b", body(2));
    a.wait_for(crate::vm_console::READY);
    assert_eq!(taps(&key), 6, "a tap per NIC: {:?}", switch_resources(&key));
    let qdiscs =
        String::from_utf8_lossy(&Command::new("tc").args(["qdisc", "show"]).output().unwrap().stdout).into_owned();
    let on_taps = |kind: &str| {
        qdiscs
            .lines()
            .filter(|l| l.starts_with(&format!("qdisc {kind}")) && l.contains(&format!("dev vt{key}")))
            .count()
    };
    assert_eq!(on_taps("tbf"), 1, "one rate limit: {qdiscs}");

    // A switch in use is not deleted; the refusal names its VMs.
    let (status, message) = refused(server.delete(&format!("/switches/{}", names[0])).send().unwrap());
    assert_eq!(status, 409, "{message}");
    assert!(message.contains(&first), "{message}");

    // nat: DHCP, each other, the internet through the masquerade (with the default route DHCP
    // named), DNS from the switch.
    let started = Instant::now();
    let (a_nat_if, a_nat) = dhcp(&mut a, &mac(1, 0));
    eprintln!("DHCP lease on a nat switch (TCG): {} ms", started.elapsed().as_millis());
    let (_, b_nat) = dhcp(&mut b, &mac(2, 0));
    assert!(
        a_nat.starts_with("10.250.1.") && b_nat.starts_with("10.250.1."),
        "{a_nat} {b_nat}"
    );
    assert_ne!(a_nat, b_nat);
    assert!(pings(&mut a, &b_nat), "VM to VM on the nat switch");
    assert!(!fetches(&mut a), "no route yet: the check below is the masquerade's");
    a.run(&format!("ip route add default via 10.250.1.1 dev {a_nat_if}"));
    assert!(fetches(&mut a), "a VM on the nat switch reaches the internet namespace");
    // The rate limit into a: a download of BIG bytes, timed by the guest's /proc/uptime.
    let out = a.run(&format!(
        "t0=$(cut -d' ' -f1 /proc/uptime); n=$(printf 'GET /big HTTP/1.0\\r\\n\\r\\n' | nc -w 20 {INTERNET} 8080 | wc -c); \
         t1=$(cut -d' ' -f1 /proc/uptime); echo VIV-RATE $n $t0 $t1"
    ));
    let words: Vec<&str> = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("VIV-RATE "))
        .unwrap_or_else(|| panic!("{out}"))
        .split_whitespace()
        .collect();
    let (bytes, t0, t1): (f64, f64, f64) = (
        words[0].parse().unwrap(),
        words[1].parse().unwrap(),
        words[2].parse().unwrap(),
    );
    assert!(bytes >= BIG as f64, "the whole file: {out}");
    let kbps = bytes * 8.0 / 1000.0 / (t1 - t0);
    eprintln!("download into a VM limited to {RATE_IN_KBPS} kbit/s (TCG): {kbps:.0} kbit/s");
    let wanted = f64::from(RATE_IN_KBPS);
    assert!(
        (wanted * 0.8..=wanted * 1.2).contains(&kbps),
        "rate limit {wanted} kbit/s, measured {kbps:.0} kbit/s"
    );

    // isolated: each other only, even with a route through the host.
    let (a_iso_if, _) = dhcp(&mut a, &mac(1, 1));
    let (_, b_iso) = dhcp(&mut b, &mac(2, 1));
    assert!(b_iso.starts_with("10.250.2."), "{b_iso}");
    assert!(pings(&mut a, &b_iso), "VM to VM on the isolated switch");
    a.run("ip route del default");
    a.run(&format!("ip route add 10.250.200.0/30 via 10.250.2.1 dev {a_iso_if}"));
    assert!(!fetches(&mut a), "the isolated switch forwards nothing");
    assert!(
        !pings(&mut a, "10.250.2.1"),
        "the host answers nothing but DHCP on an isolated switch"
    );

    // Port isolation: addresses by DHCP (the host's side is reachable), not each other.
    let (_, _) = dhcp(&mut a, &mac(1, 2));
    let (_, b_pis) = dhcp(&mut b, &mac(2, 2));
    assert!(b_pis.starts_with("10.250.3."), "{b_pis}");
    assert!(!pings(&mut a, &b_pis), "port isolation keeps VMs apart");
    // Turned off at once for running VMs.
    let edited: Value = server
        .patch(&format!("/switches/{}", names[2]))
        .json(&json!({"portIsolation": false}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(edited["portIsolation"], false, "{edited}");
    assert!(pings(&mut a, &b_pis), "without port isolation they reach each other");

    // Taps go with their VM; then the switches can go, and nothing of ours is left.
    for id in [&a_id, &b_id] {
        act(server, id, "kill", "");
    }
    assert!(
        wait_until(Duration::from_secs(10), || taps(&key) == 0),
        "taps left after the VMs stopped: {:?}",
        switch_resources(&key)
    );
    for id in [&a_id, &b_id] {
        assert_eq!(server.delete(&format!("/vms/{id}")).send().unwrap().status(), 204);
    }
    for name in &names {
        assert_eq!(
            server.delete(&format!("/switches/{name}")).send().unwrap().status(),
            204
        );
    }
    drop(internet);
    let left = switch_resources(&key);
    // Other tests of this run may have switches of their own on the shared server.
    let listed: Vec<Value> = server.get("/switches").send().unwrap().json().unwrap();
    if listed.is_empty() {
        assert!(left.is_empty(), "left behind: {left:?}");
    }
}

#[test]
fn switches_survive_a_restart_and_a_crashed_servers_leftovers_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let range = ["--switch-range", "10.250.32.0/20"];
    let server = TestServer::start_on_with(dir.path(), &range);
    let name = unique("keep");
    let made = server.cli(&["--json", "switch", "create", &name]);
    assert!(made.code == 0, "{}", made.stderr);
    let made: Value = serde_json::from_str(&made.stdout).unwrap();
    assert_eq!(made["subnet"], "10.250.32.0/24", "allocated from the range: {made}");
    let bridge = made["bridge"].as_str().unwrap().to_owned();
    let key = bridge[2..8].to_owned();
    let listed = server.cli(&["switch", "list"]);
    assert!(
        listed.stdout.contains(&name) && listed.stdout.contains("10.250.32.0/24"),
        "{}",
        listed.stdout
    );

    // A crash leaves the bridge, dnsmasq and table; add a bridge the store does not know.
    server.stop(libc::SIGKILL);
    assert!(switch_resources(&key).len() >= 3, "{:?}", switch_resources(&key));
    let stale = format!("vs{key}99");
    sh(&format!("ip link add {stale} type bridge"));
    let server = TestServer::start_on_with(dir.path(), &range);
    let now = switch_resources(&key);
    assert!(!now.contains(&stale), "the stale bridge is removed: {now:?}");
    assert!(now.contains(&bridge), "the switch is back: {now:?}");
    assert_eq!(
        now.iter().filter(|r| r.starts_with("dnsmasq")).count(),
        1,
        "one dnsmasq: {now:?}"
    );
    let got = server.cli(&["--json", "switch", "get", &name]);
    assert!(got.code == 0, "{}", got.stderr);

    // NICs through the CLI: on the switch at create, one added, moved to user mode, removed.
    let vm = unique("nics");
    let made = server.cli(&["vm", "create", &vm, "--nic", &format!("switch={name},model=e1000")]);
    assert!(made.code == 0, "{}", made.stderr);
    for args in [
        vec!["vm", "nic", "add", &vm, "--switch", &name],
        vec!["vm", "nic", "edit", &vm, "1", "--user"],
        vec!["vm", "nic", "remove", &vm, "0"],
    ] {
        let out = server.cli(&args);
        assert!(out.code == 0, "{args:?}: {}", out.stderr);
    }
    let nics: Value = server.get(&format!("/vms/{vm}")).send().unwrap().json().unwrap();
    let nics = &nics["definition"]["nics"];
    assert_eq!(nics.as_array().map(Vec::len), Some(1), "{nics}");
    assert!(
        nics[0].get("switch").is_none() && nics[0]["mac"].as_str().is_some_and(|m| m.starts_with("52:54:00:")),
        "{nics}"
    );
    let on_switch = server.cli(&["vm", "nic", "edit", &vm, "0", "--switch", &name]);
    assert!(on_switch.code == 0, "{}", on_switch.stderr);
    let in_use = server.cli(&["switch", "delete", &name]);
    assert!(in_use.code != 0 && in_use.stderr.contains(&vm), "{}", in_use.stderr);
    assert!(server.cli(&["vm", "delete", &vm]).code == 0);

    // Deleting removes the bridge and dnsmasq; the table goes with the last switch.
    let deleted = server.cli(&["switch", "delete", &name]);
    assert!(deleted.code == 0, "{}", deleted.stderr);
    assert_eq!(switch_resources(&key), Vec::<String>::new());
    let missing = server.cli(&["switch", "get", &name]);
    assert!(
        missing.code != 0 && missing.stderr.contains("no switch"),
        "{}",
        missing.stderr
    );

    // A clean shutdown with switches (and no VM running) leaves nothing on the host.
    let again = server.cli(&["switch", "create", &unique("last"), "--kind", "isolated"]);
    assert!(again.code == 0, "{}", again.stderr);
    server.stop(libc::SIGTERM);
    assert_eq!(switch_resources(&key), Vec::<String>::new());
}
