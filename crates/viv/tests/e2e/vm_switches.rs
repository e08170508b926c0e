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

/// A network namespace with an HTTP server at 10.250.(200+slot).2:8080, linked to the host by a
/// veth whose host end is 10.250.(200+slot).1/30. Removed on drop.
struct Internet {
    netns: String,
    root: std::path::PathBuf,
    server: std::process::Child,
    /// The server's address.
    address: String,
}

/// The first test's internet (slot 0).
const INTERNET: &str = "10.250.200.2";
/// Bytes of the file the rate limit is measured with.
const BIG: usize = 2_000_000;
/// The rate limit into VM a's nat NIC, kbit/s.
const RATE_IN_KBPS: u32 = 2_000;

pub(crate) fn sh(command: &str) {
    let out = Command::new("sh").args(["-c", command]).output().unwrap();
    assert!(
        out.status.success(),
        "{command}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Internet {
    fn start(slot: u8) -> Self {
        let tag = std::process::id() % 100_000;
        let netns = format!("vivswtest{tag}-{slot}");
        let host = format!("vswi{tag}{slot}");
        let (address, host_address) = (format!("10.250.{}.2", 200 + slot), format!("10.250.{}.1", 200 + slot));
        let _ = Command::new("ip").args(["netns", "del", &netns]).output();
        let _ = Command::new("ip").args(["link", "del", &host]).output();
        sh(&format!(
            "ip netns add {netns} && ip link add {host} type veth peer name eth0 netns {netns} && \
             ip addr add {host_address}/30 dev {host} && ip link set {host} up && \
             ip -n {netns} addr add {address}/30 dev eth0 && ip -n {netns} link set eth0 up && \
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
                &format!("{address}:8080"),
                "-h",
            ])
            .arg(&root)
            .spawn()
            .unwrap();
        let up = wait_until(Duration::from_secs(10), || {
            Command::new("ip")
                .args(["netns", "exec", &netns, "sh", "-c"])
                .arg(format!(
                    "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | busybox nc -w 2 {address} 8080"
                ))
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("VIV-INTERNET-REACHED"))
        });
        assert!(up, "the test's internet server did not come up");
        Self {
            netns,
            root,
            server,
            address,
        }
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

pub(crate) fn create_switch(server: &TestServer, body: Value) -> Value {
    let response = server.post("/switches").json(&body).send().unwrap();
    let status = response.status();
    let made: Value = response.json().unwrap();
    assert_eq!(status, 201, "{made}");
    made
}

/// Our bridges, taps, nftables tables and dnsmasqs on the host, for server key `key`.
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
            .filter(|l| l.ends_with(&format!("vivsw_{key}")) || l.ends_with(&format!("vivnic_{key}")))
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

/// The taps of VM `id` (by the alias the server gives each: `viv:ID:nicN`), whatever other
/// tests on the same server have.
fn taps_of(id: &str) -> usize {
    std::fs::read_dir("/sys/class/net")
        .unwrap()
        .flatten()
        .filter(|link| {
            std::fs::read_to_string(link.path().join("ifalias"))
                .is_ok_and(|alias| alias.starts_with(&format!("viv:{id}:")))
        })
        .count()
}

/// A MAC address unique to this test run.
fn mac(vm: u8, nic: u8) -> String {
    let pid = std::process::id();
    format!("52:54:{:02x}:{:02x}:{vm:02x}:{nic:02x}", (pid >> 8) as u8, pid as u8)
}

/// The guest's interface with MAC `mac`, brought up, and the address DHCP gave it.
fn dhcp(guest: &mut Guest, mac: &str) -> (String, String) {
    let ifname = interface_of(guest, mac).unwrap_or_else(|| panic!("no interface with MAC {mac}"));
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

/// Whether the guest's interface `ifname` gets answers from `address`.
fn pings_from(guest: &mut Guest, ifname: &str, address: &str) -> bool {
    guest
        .run(&format!(
            "ping -c 2 -W 2 -I {ifname} {address} >/dev/null 2>&1 && echo VIV-PING-OK"
        ))
        .contains("VIV-PING-OK")
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
    let internet = Internet::start(0);
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
    assert_eq!(
        taps_of(&a_id) + taps_of(&b_id),
        6,
        "a tap per NIC: {:?}",
        switch_resources(&key)
    );
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
        wait_until(Duration::from_secs(10), || taps_of(&a_id) + taps_of(&b_id) == 0),
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

/// The rate limit out of the VM of the NIC test, kbit/s.
const RATE_OUT_KBPS: u32 = 2_000;

/// The NIC API's answer, checked for status 200.
fn nic_edit(response: reqwest::blocking::Response) -> Value {
    let status = response.status();
    let body: Value = response.json().unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

/// The guest's interface with MAC `mac`, if it has one.
pub(crate) fn interface_of(guest: &mut Guest, mac: &str) -> Option<String> {
    let out = guest.run(&format!(
        "for i in /sys/class/net/*; do [ \"$(cat $i/address)\" = {mac} ] && echo VIV-IF ${{i##*/}}; done; true"
    ));
    out.lines()
        .find_map(|l| l.trim().strip_prefix("VIV-IF "))
        .map(str::to_owned)
}

#[test]
fn a_running_vms_nics_are_hot_added_moved_to_another_switch_limited_and_removed() {
    let server = TestServer::shared();
    let internet = Internet::start(1);
    let (nat, iso_switch, routed) = (unique("hnat"), unique("hiso"), unique("hrtd"));
    create_switch(server, json!({"name": nat, "kind": "nat", "subnet": "10.250.4.0/24"}));
    create_switch(
        server,
        json!({"name": iso_switch, "kind": "isolated", "subnet": "10.250.5.0/24"}),
    );
    create_switch(
        server,
        json!({"name": routed, "kind": "routed", "subnet": "10.250.6.0/24"}),
    );
    let iso = library_iso(server);
    let (first, added) = (mac(3, 0), mac(3, 1));
    let (id, mut guest) = booted(
        server,
        "hotnic",
        json!({"memoryMib": 192, "cdroms": [{"iso": iso}], "nics": [{"switch": nat, "mac": first}]}),
    );
    let patch_nic = |index: usize, body: Value| {
        server
            .patch(&format!("/vms/{id}/nics/{index}"))
            .json(&body)
            .send()
            .unwrap()
    };
    let (first_if, first_address) = dhcp(&mut guest, &first);
    assert!(first_address.starts_with("10.250.4."), "{first_address}");

    // Hot-added through the CLI: the guest sees a new card, which gets an address on its switch.
    let started = Instant::now();
    let out = server.cli(&["vm", "nic", "add", &id, "--switch", &iso_switch, "--mac", &added]);
    assert!(
        out.code == 0 && out.stdout.contains("at once"),
        "{}{}",
        out.stdout,
        out.stderr
    );
    let mut added_if = None;
    assert!(
        wait_until(Duration::from_secs(30), || {
            added_if = interface_of(&mut guest, &added);
            added_if.is_some()
        }),
        "the hot-added NIC never appeared in the guest"
    );
    eprintln!(
        "NIC hotplug to the guest's interface (TCG): {} ms",
        started.elapsed().as_millis()
    );
    assert_eq!(taps_of(&id), 2, "a tap for the new NIC");
    let (added_if, address) = dhcp(&mut guest, &added);
    assert!(address.starts_with("10.250.5."), "{address}");
    let info: Value = server.get(&format!("/vms/{id}")).send().unwrap().json().unwrap();
    assert_eq!(info["definition"]["nics"][1]["mac"], json!(added), "{info}");
    assert!(info["pendingDefinition"].is_null(), "{info}");

    // Moved to the nat switch while the VM runs: the same card asks DHCP again and is there.
    let moved = nic_edit(patch_nic(1, json!({"switch": nat})));
    assert_eq!(moved["appliedNow"], json!(["nics"]), "{moved}");
    guest.run(&format!("ip addr flush dev {added_if}"));
    let (_, moved_address) = dhcp(&mut guest, &added);
    assert!(moved_address.starts_with("10.250.4."), "{moved_address}");
    assert!(
        pings_from(&mut guest, &added_if, "10.250.4.1"),
        "the moved card reaches the host on the nat switch"
    );

    // Moved again, to a routed switch: the guest keeps its address on the way out and is
    // reached from outside (the internet namespace routes the subnet to the host), which a
    // nat switch's guest is not.
    let moved = nic_edit(patch_nic(1, json!({"switch": routed})));
    assert_eq!(moved["appliedNow"], json!(["nics"]), "{moved}");
    guest.run(&format!("ip addr flush dev {added_if}"));
    let (_, routed_address) = dhcp(&mut guest, &added);
    assert!(routed_address.starts_with("10.250.6."), "{routed_address}");
    // The guest's way back to the outside: through the routed switch's host address.
    guest.run(&format!("ip route add 10.250.201.0/30 via 10.250.6.1 dev {added_if}"));
    let outside = |command: &str| {
        Command::new("ip")
            .args(["netns", "exec", &internet.netns, "sh", "-c", command])
            .output()
            .unwrap()
            .status
            .success()
    };
    sh(&format!(
        "ip -n {ns} route add 10.250.6.0/24 via 10.250.201.1 && ip -n {ns} route add 10.250.4.0/24 via 10.250.201.1",
        ns = internet.netns
    ));
    assert!(
        outside(&format!("busybox ping -c 2 -W 2 {routed_address}")),
        "a VM on a routed switch is reached from outside"
    );
    assert!(
        !outside(&format!("busybox ping -c 2 -W 2 {first_address}")),
        "a VM on a nat switch is not"
    );
    assert!(
        guest
            .run(&format!(
                "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {} 8080 2>&1",
                internet.address
            ))
            .contains("VIV-INTERNET-REACHED"),
        "a VM on a routed switch reaches outside"
    );
    guest.run("ip route del 10.250.201.0/30");

    // A firewall on what the first card sends, changed while the VM runs: a denied destination,
    // then an allow list (allowed wins over denied), DHCP passing whatever the lists say.
    let host_reached = |guest: &mut Guest| pings_from(guest, &first_if, "10.250.4.1");
    assert!(host_reached(&mut guest), "no firewall yet");
    let firewall = |rules: Value| patch_nic(0, json!({ "firewall": rules }));
    let denied = nic_edit(firewall(json!({"denyOut": ["10.250.4.1/32"]})));
    assert_eq!(denied["appliedNow"], json!(["nics"]), "{denied}");
    assert!(!host_reached(&mut guest), "a denied destination");
    nic_edit(firewall(json!({"allowOut": ["10.250.4.1"], "denyOut": ["0.0.0.0/0"]})));
    assert!(
        host_reached(&mut guest),
        "an allowed destination wins over 0.0.0.0/0 denied"
    );
    let (_, renewed) = dhcp(&mut guest, &first);
    assert!(renewed.starts_with("10.250.4."), "DHCP passes the firewall: {renewed}");
    let (status, message) = refused(firewall(json!({"denyOut": ["example.com"]})));
    assert_eq!(status, 400, "{message}");
    nic_edit(firewall(Value::Null));

    // A limit on what the guest sends, set while it runs: a TCP transfer out of the guest (the
    // test reads it) holds to it.
    let limited = nic_edit(patch_nic(0, json!({"rateOutKbps": RATE_OUT_KBPS})));
    assert_eq!(limited["appliedNow"], json!(["nics"]), "{limited}");
    guest.run(&format!("ip link set {added_if} down"));
    guest.run(&format!(
        "dd if=/dev/zero of=/tmp/big bs=1000 count={} 2>/dev/null; (nc -l -p 8090 < /tmp/big >/dev/null 2>&1 &)",
        BIG / 1000
    ));
    let mut stream = None;
    assert!(
        wait_until(Duration::from_secs(10), || {
            stream = std::net::TcpStream::connect((first_address.as_str(), 8090)).ok();
            stream.is_some()
        }),
        "the guest's listener on {first_address}:8090"
    );
    let mut stream = stream.unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // Timed from the first tenth on: the steady rate, not the policer's first burst.
    let (mut got, mut buffer, mut began) = (0usize, vec![0u8; 65536], None);
    while got < BIG {
        let n = std::io::Read::read(&mut stream, &mut buffer).unwrap();
        assert!(n > 0, "the guest closed after {got} bytes");
        got += n;
        if got >= BIG / 10 {
            began.get_or_insert((got, Instant::now()));
        }
    }
    let (from, at) = began.unwrap();
    let kbps = ((BIG - from) as f64) * 8.0 / 1000.0 / at.elapsed().as_secs_f64();
    eprintln!("upload out of a VM limited to {RATE_OUT_KBPS} kbit/s (TCG): {kbps:.0} kbit/s");
    let wanted = f64::from(RATE_OUT_KBPS);
    assert!(
        (wanted * 0.5..=wanted * 1.2).contains(&kbps),
        "outbound limit {wanted} kbit/s, measured {kbps:.0} kbit/s"
    );
    drop(stream);
    guest.run(&format!("ip link set {added_if} up"));

    // The hot-added last card goes at once; the card of the VM's start waits for its restart.
    let removed = nic_edit(server.delete(&format!("/vms/{id}/nics/1")).send().unwrap());
    assert_eq!(removed["appliedNow"], json!(["nics"]), "{removed}");
    assert!(
        wait_until(Duration::from_secs(30), || interface_of(&mut guest, &added).is_none()),
        "the removed NIC is still in the guest"
    );
    assert!(
        wait_until(Duration::from_secs(10), || taps_of(&id) == 1),
        "its tap went"
    );
    let later = nic_edit(server.delete(&format!("/vms/{id}/nics/0")).send().unwrap());
    assert_eq!(later["atNextStart"], json!(["nics"]), "{later}");
    assert_eq!(later["vm"]["pendingDefinition"]["nics"], json!([]), "{later}");
    assert!(
        interface_of(&mut guest, &first).is_some(),
        "{first_if} stays until the restart"
    );
    let (status, _) = refused(server.delete(&format!("/vms/{id}/nics/5")).send().unwrap());
    assert_eq!(status, 404);

    act(server, &id, "kill", "");
    assert_eq!(server.delete(&format!("/vms/{id}")).send().unwrap().status(), 204);
    for name in [&nat, &iso_switch, &routed] {
        assert_eq!(
            server.delete(&format!("/switches/{name}")).send().unwrap().status(),
            204
        );
    }
}

/// Network namespaces of a test, deleted on drop.
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for netns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", netns]).output();
        }
    }
}

/// Seconds a command took in a guest by its `/proc/uptime` (10 ms steps), and its output.
fn timed_in_guest(guest: &mut Guest, command: &str) -> (f64, String) {
    let out = guest.run(&format!(
        "t0=$(cut -d' ' -f1 /proc/uptime); {command}; t1=$(cut -d' ' -f1 /proc/uptime); echo VIV-TIME $t0 $t1"
    ));
    let times: Vec<f64> = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("VIV-TIME "))
        .unwrap_or_else(|| panic!("{out}"))
        .split_whitespace()
        .map(|w| w.parse().unwrap())
        .collect();
    (times[1] - times[0], out)
}

/// The throughput figure: TCP from one VM to another on one `nat` switch against the
/// same transfer between two network namespaces joined by a veth, in the same run, both with
/// busybox `nc` (`cargo test -p viv --test e2e -- switch_figures --ignored --nocapture`).
#[test]
#[ignore = "figures; run by hand"]
fn switch_figures() {
    // Each side's size takes it well past its start-up: TCG guests move megabytes a second.
    const VM_MIB: u64 = 16;
    const HOST_MIB: u64 = 2048;
    let server = TestServer::shared();
    let name = unique("fig");
    create_switch(server, json!({"name": name, "kind": "nat", "subnet": "10.250.7.0/24"}));
    let iso = library_iso(server);
    let body =
        |vm: u8| json!({"memoryMib": 256, "cdroms": [{"iso": iso}], "nics": [{"switch": name, "mac": mac(4, vm)}]});
    let (a_id, mut a) = booted(server, "figa", body(0));
    let (b_id, mut b) = booted(server, "figb", body(1));
    dhcp(&mut a, &mac(4, 0));
    let (_, b_address) = dhcp(&mut b, &mac(4, 1));
    let mut vm_to_vm = Vec::new();
    let mut host_to_host = Vec::new();
    let tag = std::process::id() % 100_000;
    let (one, two) = (format!("vivfig{tag}a"), format!("vivfig{tag}b"));
    // Deleted however the test ends.
    let _namespaces = Namespaces(vec![one.clone(), two.clone()]);
    sh(&format!(
        "ip netns add {one} && ip netns add {two} && ip link add fig{tag} netns {one} type veth peer name eth0 netns {two} && \
         ip -n {one} addr add 10.250.210.1/30 dev fig{tag} && ip -n {two} addr add 10.250.210.2/30 dev eth0 && \
         ip -n {one} link set fig{tag} up && ip -n {two} link set eth0 up"
    ));
    for _ in 0..3 {
        // VM to VM: b sends VM_MIB MiB of zeros, a reads them (head ends the transfer).
        b.run(&format!(
            "(dd if=/dev/zero bs=64k count={} 2>/dev/null | nc -l -p 9100 >/dev/null 2>&1 &)",
            VM_MIB * 16
        ));
        std::thread::sleep(Duration::from_millis(300));
        let (seconds, out) = timed_in_guest(
            &mut a,
            &format!("nc {b_address} 9100 | head -c {} | wc -c", VM_MIB << 20),
        );
        assert!(out.contains(&(VM_MIB << 20).to_string()), "{out}");
        vm_to_vm.push(VM_MIB as f64 * 8.388_608 / seconds);
        // Host to host: the same through a veth between two namespaces.
        let server = Command::new("ip")
            .args(["netns", "exec", &one, "sh", "-c"])
            .arg(format!(
                "dd if=/dev/zero bs=64k count={} 2>/dev/null | busybox nc -l -p 9100 >/dev/null 2>&1",
                HOST_MIB * 16
            ))
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let started = Instant::now();
        let received = Command::new("ip")
            .args(["netns", "exec", &two, "sh", "-c"])
            // nc ends at the end of its input: its input is a FIFO held open, which never ends.
            .arg(format!(
                "f=$(mktemp -u); mkfifo $f; exec 3<>$f; rm $f; busybox nc 10.250.210.1 9100 <&3 | head -c {} | wc -c",
                HOST_MIB << 20
            ))
            .output()
            .unwrap();
        let seconds = started.elapsed().as_secs_f64();
        let received = String::from_utf8_lossy(&received.stdout).trim().to_owned();
        assert_eq!(received, (HOST_MIB << 20).to_string(), "host to host");
        host_to_host.push(HOST_MIB as f64 * 8.388_608 / seconds);
        let mut server = server;
        let _ = server.kill();
        let _ = server.wait();
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (vm, host) = (median(&mut vm_to_vm), median(&mut host_to_host));
    eprintln!(
        "TCP over busybox nc, median of 3 (TCG): VM to VM on one nat switch ({VM_MIB} MiB) {vm:.1} Mbit/s, \
         host to host over a veth ({HOST_MIB} MiB) {host:.0} Mbit/s, ratio {:.4}",
        vm / host
    );
    for id in [&a_id, &b_id] {
        act(server, id, "kill", "");
        assert_eq!(server.delete(&format!("/vms/{id}")).send().unwrap().status(), 204);
    }
    assert_eq!(
        server.delete(&format!("/switches/{name}")).send().unwrap().status(),
        204
    );
}
