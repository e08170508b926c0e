//! VM backups through the public API and CLI against a real guest (the test ISO's busybox
//! guest): random data written by the guest, a full backup of the running VM, more data, an
//! incremental backup, more data again, restored into a new disk whose raw export's SHA-256
//! equals what the guest read from its disk at the incremental backup; then an incremental
//! backup of the stopped VM (qemu-storage-daemon), a deleted middle backup merged into its child,
//! and in-place restore.

use serde_json::{json, Value};
use sha2::Digest as _;

use crate::fixture::{unique, TestServer};
use crate::vm_boot::{booted_with_disk, create_disk, Guest};
use crate::vm_lifecycle::{act, refused};

/// Waits for a 202 answer's operation to end; asserts it succeeded and returns it.
fn succeeded(server: &TestServer, response: reqwest::blocking::Response) -> Value {
    let op = ended(server, response);
    assert_eq!(op["state"], "succeeded", "{op}");
    op
}

/// Waits for a 202 answer's operation to end and returns it.
fn ended(server: &TestServer, response: reqwest::blocking::Response) -> Value {
    let status = response.status().as_u16();
    let op: Value = response.json().unwrap();
    assert_eq!(status, 202, "{op}");
    let id = op["id"].as_str().unwrap();
    for _ in 0..20 {
        let op: Value = server
            .get(&format!("/operations/{id}/wait?timeout=60"))
            .send()
            .unwrap()
            .json()
            .unwrap();
        if op["state"] != "running" {
            return op;
        }
    }
    panic!("operation {id} still runs after 20 minutes");
}

fn backup(server: &TestServer, vm: &str, kind: &str) -> Value {
    let op = succeeded(
        server,
        server
            .post(&format!("/vms/{vm}/backups"))
            .json(&json!({"kind": kind}))
            .send()
            .unwrap(),
    );
    op["backup"].clone()
}

fn restore_new(server: &TestServer, vm: &str, backup: &str, disk: &str) {
    let op = succeeded(
        server,
        server
            .post(&format!("/vms/{vm}/backups/{backup}/restore"))
            .json(&json!({"newDisks": [disk]}))
            .send()
            .unwrap(),
    );
    assert_eq!(op["disks"], json!([disk]), "{op}");
}

/// SHA-256 of disk `name` exported as raw.
fn raw_sha256(server: &TestServer, name: &str) -> String {
    let response = server.get(&format!("/disks/{name}/export?format=raw")).send().unwrap();
    assert_eq!(response.status(), 200);
    let bytes = response.bytes().unwrap();
    hex::encode(sha2::Sha256::digest(&bytes))
}

/// Writes `count` random 64 KiB blocks at block `seek` of the guest's disk and syncs.
fn scribble(guest: &mut Guest, seek: u32, count: u32) {
    guest.run(&format!(
        "dd if=/dev/urandom of=/dev/vda bs=65536 seek={seek} count={count} conv=notrunc 2>/dev/null; sync; echo 3 >/proc/sys/vm/drop_caches"
    ));
}

/// The SHA-256 of the guest's whole disk as the guest reads it.
fn guest_sha256(guest: &mut Guest) -> String {
    let out = guest.run("sha256sum /dev/vda");
    out.lines()
        .find_map(|l| l.split_whitespace().next().filter(|w| w.len() == 64).map(str::to_owned))
        .unwrap_or_else(|| panic!("sha256sum printed: {out}"))
}

#[test]
fn an_incremental_backup_restored_equals_the_disk_at_its_moment() {
    let server = TestServer::shared();
    let (id, mut guest, disk, _iso) = booted_with_disk(
        server,
        "backup",
        32 << 20,
        json!({"memoryMib": 192, "stopTimeoutSecs": 120}),
    );
    scribble(&mut guest, 0, 40);
    let full = backup(server, &id, "auto");
    assert_eq!(
        (full["kind"].as_str(), full["live"].as_bool()),
        (Some("full"), Some(true)),
        "{full}"
    );

    // Changes after the full backup: new blocks and some overwritten ones.
    scribble(&mut guest, 200, 30);
    scribble(&mut guest, 20, 5);
    let at_incremental = guest_sha256(&mut guest);
    let inc = backup(server, &id, "incremental");
    assert_eq!(
        (inc["kind"].as_str(), inc["parentId"].as_str()),
        (Some("incremental"), full["id"].as_str()),
        "{inc}"
    );
    let inc_size = inc["disks"][0]["fileSize"].as_u64().unwrap();
    let full_size = full["disks"][0]["fileSize"].as_u64().unwrap();
    assert!(
        inc_size < full_size,
        "the incremental holds only changes: {inc_size} vs {full_size}"
    );

    // The disk moves on; the restored copy must be the disk as it was at the incremental.
    scribble(&mut guest, 400, 10);
    let restored = unique("bkrestored");
    restore_new(server, &id, inc["id"].as_str().unwrap(), &restored);
    assert_eq!(
        raw_sha256(server, &restored),
        at_incremental,
        "restored incremental vs the disk at its moment"
    );

    // A stopped VM is backed up by a storage daemon over its disks, still incrementally.
    let now = guest_sha256(&mut guest);
    act(server, &id, "stop", "");
    assert_eq!(raw_sha256(server, &disk), now);
    let cli = server.cli(&["vm", "backup", "create", &id, "--incremental", "--json"]);
    assert_eq!(cli.code, 0, "{cli:?}");
    let stopped: Value = serde_json::from_str(&cli.stdout).unwrap();
    assert_eq!(
        (
            stopped["kind"].as_str(),
            stopped["parentId"].as_str(),
            stopped["live"].as_bool()
        ),
        (Some("incremental"), inc["id"].as_str(), Some(false)),
        "{stopped}"
    );

    // Deleting the middle backup merges it into the last, which still restores the disk.
    let deleted = server.cli(&["vm", "backup", "delete", &id, inc["id"].as_str().unwrap()]);
    assert_eq!(deleted.code, 0, "{deleted:?}");
    let listed = server.cli(&["vm", "backup", "list", &id, "--json"]);
    let listed: Vec<Value> = serde_json::from_str(&listed.stdout).unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(listed[1]["parentId"], full["id"], "{listed:?}");
    let table = server.cli(&["vm", "backup", "list", &id]);
    assert!(
        table.stdout.contains("incremental") && table.stdout.contains("full"),
        "{table:?}"
    );
    let again = unique("bkrestored");
    restore_new(server, &id, stopped["id"].as_str().unwrap(), &again);
    assert_eq!(raw_sha256(server, &again), now, "restored after the merge");

    // In place: the VM's own disk goes back to the full backup (the VM stopped).
    let cli = server.cli(&["vm", "backup", "restore", &id, full["id"].as_str().unwrap(), "--json"]);
    assert_eq!(cli.code, 0, "{cli:?}");
    assert_ne!(raw_sha256(server, &disk), now);
    // An incremental backup after that finds no bitmap to follow; auto takes a full one.
    let op = ended(
        server,
        server
            .post(&format!("/vms/{id}/backups"))
            .json(&json!({"kind": "incremental"}))
            .send()
            .unwrap(),
    );
    assert_eq!(
        (op["state"].as_str(), op["errorCode"].as_u64()),
        (Some("failed"), Some(409)),
        "{op}"
    );
    assert!(op["error"].as_str().unwrap().contains("full backup"), "{op}");
    let auto = backup(server, &id, "auto");
    assert_eq!(auto["kind"], "full", "{auto}");
    // A snapshot revert changes the disk behind the bitmaps' back: they go, the next is full.
    let snap = server
        .post(&format!("/vms/{id}/snapshots"))
        .json(&json!({"name": "s1", "memory": false}))
        .send()
        .unwrap();
    assert_eq!(snap.status(), 201);
    let before_revert = backup(server, &id, "incremental");
    assert_eq!(before_revert["kind"], "incremental", "{before_revert}");
    act(server, &id, "snapshots/s1/revert", "");
    let op = ended(
        server,
        server
            .post(&format!("/vms/{id}/backups"))
            .json(&json!({"kind": "incremental"}))
            .send()
            .unwrap(),
    );
    assert_eq!(op["errorCode"].as_u64(), Some(409), "after a revert: {op}");
    let (status, message) = refused(
        server
            .post(&format!("/vms/{id}/backups/nope/restore"))
            .json(&json!({}))
            .send()
            .unwrap(),
    );
    assert_eq!(status, 404, "{message}");

    assert_eq!(
        server
            .delete(&format!("/vms/{id}?disks=delete"))
            .send()
            .unwrap()
            .status(),
        204
    );
    for name in [&restored, &again] {
        assert_eq!(server.delete(&format!("/disks/{name}")).send().unwrap().status(), 204);
    }
}

/// A server killed while a backup runs lists, after its restart, only complete backups: every
/// listed backup restores, and files of backups never recorded (left by the crash, or planted
/// as such a crash would leave them) are gone; the storage daemon died with the server.
#[test]
fn a_crash_mid_backup_leaves_no_half_written_backup() {
    let temp = tempfile::Builder::new()
        .prefix("viv-e2e-backup-crash-")
        .tempdir()
        .unwrap();
    let first = TestServer::start_on(temp.path(), None);
    let disk = unique("crashdisk");
    create_disk(&first, &disk, 64 << 20);
    let id = crate::vm_lifecycle::define(
        &first,
        &unique("crash"),
        json!({"memoryMib": 128, "disks": [{"disk": disk}]}),
    );
    let full = backup(&first, &id, "full");
    let started = first
        .post(&format!("/vms/{id}/backups"))
        .json(&json!({"kind": "full"}))
        .send()
        .unwrap();
    assert_eq!(started.status(), 202);
    first.stop(libc::SIGKILL);
    drop(first);
    let dir = temp.path().join("backups").join(&id);
    std::fs::write(dir.join(".tmp-bk-crashed-0.qcow2"), b"partial").unwrap();
    std::fs::write(dir.join("bk-unrecorded-0.qcow2"), b"linked, never recorded").unwrap();

    let second = TestServer::start_on(temp.path(), None);
    assert!(
        crate::fixture::wait_until(std::time::Duration::from_secs(10), || {
            std::process::Command::new("pgrep")
                .args(["-f", &format!("qemu-storage-daemon.*{}", temp.path().display())])
                .status()
                .map(|s| !s.success())
                .unwrap_or(true)
        }),
        "no storage daemon outlives the server"
    );
    let listed: Vec<Value> = second
        .get(&format!("/vms/{id}/backups"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert!(!listed.is_empty() && listed[0]["id"] == full["id"], "{listed:?}");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let mut expected: Vec<String> = listed
        .iter()
        .map(|b| format!("{}-0.qcow2", b["id"].as_str().unwrap()))
        .collect();
    expected.sort();
    assert_eq!(files, expected, "only listed backups keep files");
    for b in &listed {
        let name = unique("crashrestored");
        restore_new(&second, &id, b["id"].as_str().unwrap(), &name);
        assert_eq!(raw_sha256(&second, &name), raw_sha256(&second, &disk));
    }
}
