//! Real guests through the VM manager's public API: the test ISO (`tests/fixtures/vm-iso/build`:
//! grub, the cloud kernel and a busybox init that prints a marker, powers off on the ACPI power
//! button and runs `run COMMAND` lines from its serial console) booted under SeaBIOS and UEFI,
//! the boot order, an ACPI stop, a VM running on across a server restart, snapshot revert, a
//! linked clone and an online disk resize, each observed from inside the guest.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::Digest as _;

use crate::fixture::unique;
use crate::fixture::{wait_until, TestServer};
use crate::vm_cloudinit::Console;
use crate::vm_console::{add_iso, BOOT_DEADLINE, MARKER, READY};
use crate::vm_lifecycle::{act, define, refused};

/// A guest's serial console, through `GET /vms/{id}/console` (the cloud-init tests' client).
pub(crate) struct Guest {
    console: Console,
}

impl Guest {
    pub(crate) fn attach(server: &TestServer, id: &str) -> Self {
        Self {
            console: Console::open(server, id),
        }
    }

    /// Waits for `needle` anywhere in the console (the replay included).
    pub(crate) fn wait_for(&mut self, needle: &str) {
        self.console.wait_for(needle, 0, BOOT_DEADLINE);
    }

    /// The whole line holding `needle`, once its end arrived.
    fn line_with(&mut self, needle: &str) -> String {
        self.console.wait_for(needle, 0, BOOT_DEADLINE);
        let at = self.console.text.find(needle).expect("waited for it");
        self.console.wait_for("\n", at, BOOT_DEADLINE);
        let text = &self.console.text;
        let end = at + text[at..].find('\n').expect("waited for it");
        let begin = text[..at].rfind('\n').map_or(0, |n| n + 1);
        text[begin..end].trim().to_owned()
    }

    /// Runs a shell command in the guest and returns what it printed.
    pub(crate) fn run(&mut self, command: &str) -> String {
        self.console.run(command, Duration::from_secs(90))
    }

    /// Starts a counter in the guest, bumped every 100 ms in `/tmp/count` (renamed into place:
    /// a read never sees the file truncated and not yet written). The file holds 0 before this
    /// returns: the background loop may not have run its first step when the next command reads.
    pub(crate) fn start_counter(&mut self) {
        self.run(
            "echo 0 >/tmp/count; (i=0; while true; do i=$((i+1)); echo $i >/tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.1; done) >/dev/null 2>&1 & true",
        );
    }

    /// The counter's value now (see [`Guest::start_counter`]).
    pub(crate) fn count(&mut self) -> u64 {
        let out = self.run("cat /tmp/count");
        out.lines()
            .rev()
            .find_map(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("count: {out}"))
    }
}

/// Defines a VM from `body`, starts it and waits until its guest's acpid runs.
pub(crate) fn booted(server: &TestServer, prefix: &str, body: Value) -> (String, Guest) {
    let id = define(server, &unique(prefix), body);
    act(server, &id, "start", "");
    let mut guest = Guest::attach(server, &id);
    guest.wait_for(READY);
    (id, guest)
}

/// Boots the test ISO (a new library copy) in a VM defined from `body` with a new empty pool
/// disk of `bytes` as its only disk; returns the VM's id, its guest, the disk's name and the
/// ISO's.
pub(crate) fn booted_with_disk(
    server: &TestServer,
    prefix: &str,
    bytes: u64,
    mut body: Value,
) -> (String, Guest, String, String) {
    let iso = library_iso(server);
    let disk = unique(&format!("{prefix}disk"));
    create_disk(server, &disk, bytes);
    body["disks"] = json!([{ "disk": disk }]);
    body["cdroms"] = json!([{ "iso": iso }]);
    let (id, guest) = booted(server, prefix, body);
    (id, guest, disk, iso)
}

pub(crate) fn vm(server: &TestServer, id: &str) -> Value {
    server.get(&format!("/vms/{id}")).send().unwrap().json().unwrap()
}

/// Uploads `bytes` as pool disk `name` with its checksum.
fn upload_disk(server: &TestServer, name: &str, bytes: Vec<u8>) {
    let sum = hex::encode(sha2::Sha256::digest(&bytes));
    let response = server
        .put(&format!("/disks/{name}/upload"))
        .header("X-Content-SHA256", sum)
        .body(bytes)
        .send()
        .unwrap();
    assert_eq!(response.status(), 201, "{}", response.text().unwrap());
}

pub(crate) fn create_disk(server: &TestServer, name: &str, size: u64) {
    let response = server
        .post("/disks")
        .json(&json!({"name": name, "size": size, "format": "qcow2"}))
        .send()
        .unwrap();
    assert_eq!(response.status(), 201, "{}", response.text().unwrap());
}

/// An ISO in the library under a unique name.
pub(crate) fn library_iso(server: &TestServer) -> String {
    let name = unique("iso");
    add_iso(server, &name);
    name
}

#[test]
fn the_iso_boots_under_seabios_and_uefi_and_powers_off_on_an_acpi_stop() {
    let server = TestServer::shared();
    let iso = library_iso(server);
    for firmware in ["bios", "uefi"] {
        let id = define(
            server,
            &unique(firmware),
            json!({"firmware": firmware, "memoryMib": 256, "cdroms": [{"iso": iso}], "stopTimeoutSecs": 120}),
        );
        let started = Instant::now();
        act(server, &id, "start", "");
        let mut guest = Guest::attach(server, &id);
        guest.wait_for(MARKER);
        eprintln!(
            "FIGURE API start to serial marker ({firmware}): {} ms",
            started.elapsed().as_millis()
        );
        let line = guest.line_with(MARKER);
        assert!(!line.contains("boot=hd0"), "{line}");
        guest.wait_for(READY);
        let stopped = act(server, &id, "stop", "");
        assert_eq!(stopped["state"], "stopped");
        let why = stopped["lastExit"].as_str().unwrap();
        assert!(!why.contains("forced"), "the guest ignored the power button: {why}");
        let log = server
            .get(&format!("/vms/{id}/console/log"))
            .send()
            .unwrap()
            .text()
            .unwrap();
        assert!(
            log.contains("VIVARIUM-POWER-BUTTON"),
            "acpid did not run its action:\n{log}"
        );
        assert_eq!(server.delete(&format!("/vms/{id}")).send().unwrap().status(), 204);
    }
}

#[test]
fn the_boot_order_decides_between_the_disk_and_the_cd() {
    let server = TestServer::shared();
    let iso = library_iso(server);
    // The hybrid ISO is bootable as a disk too; grub says where it came from.
    let disk = unique("bootable");
    upload_disk(server, &disk, std::fs::read(crate::vm_console::iso()).unwrap());
    for (order, expected) in [(json!(["disk", "cdrom"]), true), (json!(["cdrom", "disk"]), false)] {
        let id = define(
            server,
            &unique("order"),
            json!({"memoryMib": 256, "bootOrder": order, "disks": [{"disk": disk, "readOnly": true}],
                   "cdroms": [{"iso": iso}]}),
        );
        act(server, &id, "start", "");
        let mut guest = Guest::attach(server, &id);
        guest.wait_for(MARKER);
        let line = guest.line_with(MARKER);
        assert_eq!(line.contains("boot=hd0"), expected, "boot order {order}: {line}");
        act(server, &id, "kill", "");
        assert_eq!(server.delete(&format!("/vms/{id}")).send().unwrap().status(), 204);
    }
}

#[test]
fn a_running_vm_outlives_its_server_and_is_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    let leave = ["--on-shutdown", "leave"];
    let server = TestServer::start_on_with(dir.path(), &leave);
    let iso = library_iso(&server);
    let id = define(&server, "survivor", json!({"memoryMib": 256, "cdroms": [{"iso": iso}]}));
    let pid = act(&server, &id, "start", "")["pid"].as_u64().unwrap();
    Guest::attach(&server, &id).wait_for(READY);
    server.stop(libc::SIGTERM);
    drop(server);
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the VM died with its server"
    );

    let server = TestServer::start_on_with(dir.path(), &leave);
    let taken = vm(&server, &id);
    assert_eq!(
        (taken["state"].as_str(), taken["pid"].as_u64()),
        (Some("running"), Some(pid))
    );
    let mut guest = Guest::attach(&server, &id);
    assert!(guest.run("echo taken-over-$((6*7))").contains("taken-over-42"));
    let stopped = act(&server, &id, "stop", "");
    assert_eq!(stopped["state"], "stopped");
    assert!(!stopped["lastExit"].as_str().unwrap().contains("forced"), "{stopped}");
    assert!(wait_until(Duration::from_secs(10), || !std::path::Path::new(&format!(
        "/proc/{pid}"
    ))
    .exists()));
}

#[test]
fn a_snapshot_revert_brings_back_a_disk_marker_and_a_running_counter() {
    let server = TestServer::shared();
    let (id, mut guest, disk, _iso) = booted_with_disk(server, "snap", 64 << 20, json!({"memoryMib": 256}));
    guest.run("printf MARK-ONE | dd of=/dev/vda conv=notrunc 2>/dev/null; sync");
    guest.start_counter();
    assert!(wait_until(Duration::from_secs(30), || guest.count() > 2));
    let taken: Value = server
        .post(&format!("/vms/{id}/snapshots"))
        .json(&json!({"name": "one"}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(
        (taken["memory"].as_bool(), taken["current"].as_bool()),
        (Some(true), Some(true)),
        "{taken}"
    );
    let at_snapshot = guest.count();
    guest.run("printf MARK-TWO | dd of=/dev/vda conv=notrunc 2>/dev/null; sync");
    assert!(wait_until(Duration::from_secs(60), || guest.count() > at_snapshot + 20));
    let before_revert = guest.count();

    let reverted = act(server, &id, "snapshots/one/revert", "");
    assert_eq!(reverted["current"], true);
    assert_eq!(vm(server, &id)["state"], "running");
    let disk_now = guest.run("dd if=/dev/vda bs=8 count=1 2>/dev/null; echo");
    assert!(disk_now.contains("MARK-ONE"), "the disk after the revert: {disk_now}");
    let after = guest.count();
    assert!(
        after < before_revert,
        "the counter went back: {after} vs {before_revert} before the revert"
    );
    assert!(
        wait_until(Duration::from_secs(30), || guest.count() > after),
        "the counter runs on"
    );

    // A disk-only snapshot needs the VM stopped to be reverted.
    let disk_only: Value = server
        .post(&format!("/vms/{id}/snapshots"))
        .json(&json!({"name": "two", "memory": false}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(
        (disk_only["memory"].as_bool(), disk_only["parentId"].as_str()),
        (Some(false), taken["id"].as_str())
    );
    let (status, message) = refused(server.post(&format!("/vms/{id}/snapshots/two/revert")).send().unwrap());
    assert_eq!((status, message.contains("stop it")), (409, true), "{message}");
    act(server, &id, "kill", "");
    let listed: Vec<Value> = server
        .get(&format!("/vms/{id}/snapshots"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(
        server
            .delete(&format!("/vms/{id}/snapshots/one"))
            .send()
            .unwrap()
            .status(),
        204
    );
    let two: Value = server
        .get(&format!("/vms/{id}/snapshots/two"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert!(
        two.get("parentId").is_none(),
        "its parent's deletion moved it to the root: {two}"
    );
    assert_eq!(
        server
            .delete(&format!("/vms/{id}?disks=delete"))
            .send()
            .unwrap()
            .status(),
        204
    );
    assert_eq!(
        server.get(&format!("/disks/{disk}")).send().unwrap().status(),
        404,
        "deleted with its VM"
    );
}

#[test]
fn a_linked_clone_boots_with_its_own_mac_and_uuid_and_its_source_waits() {
    let server = TestServer::shared();
    let iso = library_iso(server);
    let disk = unique("base");
    create_disk(server, &disk, 32 << 20);
    let source = define(
        server,
        &unique("source"),
        json!({"memoryMib": 256, "disks": [{"disk": disk}], "cdroms": [{"iso": iso}], "nics": [{}]}),
    );
    let clone_name = unique("clone");
    let response = server
        .post(&format!("/vms/{source}/clone"))
        .json(&json!({"name": clone_name}))
        .send()
        .unwrap();
    assert_eq!(response.status(), 201);
    let clone: Value = response.json().unwrap();
    let original = vm(server, &source);
    let mac_of = |v: &Value| v["definition"]["nics"][0]["mac"].as_str().unwrap().to_owned();
    assert_ne!(mac_of(&clone), mac_of(&original));
    assert_ne!(clone["uuid"], original["uuid"]);
    let clone_disk = clone["definition"]["disks"][0]["disk"].as_str().unwrap().to_owned();
    let disk_info: Value = server
        .get(&format!("/disks/{clone_disk}"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(disk_info["backing"], disk.as_str(), "{disk_info}");

    let clone_id = clone["id"].as_str().unwrap().to_owned();
    act(server, &clone_id, "start", "");
    let mut guest = Guest::attach(server, &clone_id);
    guest.wait_for(READY);
    let mac = guest.run("cat /sys/class/net/eth0/address");
    assert!(mac.contains(&mac_of(&clone)), "the clone's NIC: {mac}");
    let uuid = guest.run("cat /sys/class/dmi/id/product_uuid");
    assert!(
        uuid.to_lowercase().contains(clone["uuid"].as_str().unwrap()),
        "the clone's UUID: {uuid}"
    );

    // The source's disk backs the clone: the source may not write it.
    let (status, message) = refused(server.post(&format!("/vms/{source}/start")).send().unwrap());
    assert_eq!(status, 409, "{message}");
    assert!(
        message.contains("backs linked clones") && message.contains(&clone_disk),
        "{message}"
    );
    act(server, &clone_id, "kill", "");
    assert_eq!(
        server
            .delete(&format!("/vms/{clone_id}?disks=delete"))
            .send()
            .unwrap()
            .status(),
        204
    );
    act(server, &source, "start", "");
    act(server, &source, "kill", "");
    assert_eq!(
        server
            .delete(&format!("/vms/{source}?disks=delete"))
            .send()
            .unwrap()
            .status(),
        204
    );
}

#[test]
fn a_running_vms_disk_grows_online_and_the_guest_sees_it() {
    let server = TestServer::shared();
    let iso = library_iso(server);
    let disk = unique("grow");
    create_disk(server, &disk, 32 << 20);
    let (id, mut guest) = booted(
        server,
        "grow",
        json!({"memoryMib": 256, "disks": [{"disk": disk}], "cdroms": [{"iso": iso}]}),
    );
    let sectors = |guest: &mut Guest| guest.run("cat /sys/block/vda/size").trim().to_owned();
    assert!(sectors(&mut guest).contains(&(32u64 << 11).to_string()));
    let (status, message) = refused(
        server
            .post(&format!("/disks/{disk}/resize"))
            .json(&json!({"size": 16 << 20, "force": true}))
            .send()
            .unwrap(),
    );
    assert_eq!(
        (status, message.contains("stop the VM to shrink")),
        (409, true),
        "{message}"
    );
    let grown = server
        .post(&format!("/disks/{disk}/resize"))
        .json(&json!({"size": 48 << 20}))
        .send()
        .unwrap();
    assert_eq!(grown.status(), 200, "{}", grown.text().unwrap());
    assert!(
        wait_until(Duration::from_secs(60), || sectors(&mut guest)
            .contains(&(48u64 << 11).to_string())),
        "the guest did not see the new size"
    );
    act(server, &id, "kill", "");
    assert_eq!(
        server
            .delete(&format!("/vms/{id}?disks=delete"))
            .send()
            .unwrap()
            .status(),
        204
    );
}

#[test]
fn a_cd_is_changed_and_ejected_while_the_vm_runs_and_a_uefi_nvram_resets() {
    let server = TestServer::shared();
    let iso = library_iso(server);
    let (id, mut guest) = booted(
        server,
        "media",
        json!({"firmware": "uefi", "memoryMib": 256, "cdroms": [{"iso": iso}, {"bus": "virtio-scsi"}]}),
    );
    // The guest's view of the second drive (its kernel has no AHCI, so the SATA drive it
    // booted from is invisible and the SCSI one is sr0): an ISO's volume descriptor, or none.
    let has_iso = |guest: &mut Guest| -> bool {
        guest
            .run("dd if=/dev/sr0 bs=2048 skip=16 count=1 2>/dev/null | head -c 6; echo")
            .contains("CD001")
    };
    assert!(!has_iso(&mut guest), "the drive starts empty");
    let put = |body: Value| server.put(&format!("/vms/{id}/cdroms/1")).json(&body).send().unwrap();
    let inserted = put(json!({"iso": iso}));
    assert_eq!(inserted.status(), 200);
    let inserted: Value = inserted.json().unwrap();
    assert_eq!(inserted["definition"]["cdroms"][1]["iso"], iso.as_str());
    assert!(
        wait_until(Duration::from_secs(60), || has_iso(&mut guest)),
        "the guest did not see the inserted ISO"
    );
    let ejected: Value = put(json!({"iso": null})).json().unwrap();
    assert!(ejected["definition"]["cdroms"][1].get("iso").is_none(), "{ejected}");
    assert!(
        wait_until(Duration::from_secs(60), || !has_iso(&mut guest)),
        "the guest still sees a medium"
    );
    assert_eq!(put(json!({"iso": "no-such-iso"})).status(), 404);
    assert_eq!(
        server
            .put(&format!("/vms/{id}/cdroms/7"))
            .json(&json!({"iso": null}))
            .send()
            .unwrap()
            .status(),
        404
    );
    let (status, message) = refused(server.post(&format!("/vms/{id}/nvram/reset")).send().unwrap());
    assert_eq!((status, message.contains("stop it")), (409, true), "{message}");
    act(server, &id, "kill", "");
    let reset = server.post(&format!("/vms/{id}/nvram/reset")).send().unwrap();
    assert_eq!(reset.status(), 200, "{}", reset.text().unwrap());
    // It boots again from the fresh variable store.
    act(server, &id, "start", "");
    let mut guest = Guest::attach(server, &id);
    guest.wait_for(READY);
    act(server, &id, "kill", "");
    assert_eq!(server.delete(&format!("/vms/{id}")).send().unwrap().status(), 204);
}

#[test]
fn a_guest_kernel_panic_is_a_crash() {
    let server = TestServer::shared();
    let iso = library_iso(server);
    let (id, mut guest) = booted(server, "panic", json!({"memoryMib": 256, "cdroms": [{"iso": iso}]}));
    guest.console.send_line("run echo c >/proc/sysrq-trigger");
    assert!(wait_until(BOOT_DEADLINE, || vm(server, &id)["state"] == "crashed"));
    let crashed = vm(server, &id);
    assert!(
        crashed["lastExit"]
            .as_str()
            .unwrap()
            .contains("the guest kernel panicked"),
        "{crashed}"
    );
    assert_eq!(server.delete(&format!("/vms/{id}")).send().unwrap().status(), 204);
}
