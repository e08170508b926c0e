//! Disks attached to and detached from a running q35 VM through `POST /vms/{id}/disks` and
//! `DELETE /vms/{id}/disks/{disk}`, and vCPUs added through `PUT /vms/{id}/vcpus`, seen from
//! inside the busybox guest: the new disk appears, takes a write and reads it back, and
//! disappears when detached; a new vCPU comes online; a balloon (`PUT /vms/{id}/memory`) takes
//! memory from the guest and gives it back; what cannot be done live is refused with a 409
//! that says what to do.

use std::time::Duration;

use serde_json::{json, Value};

use crate::fixture::{unique, wait_until, TestServer};
use crate::vm_boot::{booted, booted_with_disk, create_disk, library_iso, vm};
use crate::vm_lifecycle::refused;

fn disk_names(info: &Value) -> Vec<String> {
    info["definition"]["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["disk"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn a_disk_hot_added_to_a_running_vm_appears_takes_writes_and_goes_when_detached() {
    let server = TestServer::shared();
    let iso = library_iso(server);
    let (root, extra) = (unique("hproot"), unique("hpextra"));
    create_disk(server, &root, 64 << 20);
    create_disk(server, &extra, 32 << 20);
    let (id, mut guest) = booted(
        server,
        "hotplug",
        json!({"memoryMib": 256, "disks": [{"disk": root}], "cdroms": [{"iso": iso}]}),
    );
    assert_eq!(
        vm(server, &id)["definition"]["hotplugPorts"],
        4,
        "q35 VMs get hotplug ports"
    );
    assert!(!guest.run("ls /sys/block").contains("vdb"));

    // Bad input: a disk that does not exist, a bus that cannot be hot-added.
    let missing = server
        .post(&format!("/vms/{id}/disks"))
        .json(&json!({"disk": unique("nosuchdisk")}))
        .send()
        .unwrap();
    assert!(
        [400, 404].contains(&missing.status().as_u16()),
        "{}",
        missing.text().unwrap()
    );
    let (status, message) = refused(
        server
            .post(&format!("/vms/{id}/disks"))
            .json(&json!({"disk": extra, "bus": "sata"}))
            .send()
            .unwrap(),
    );
    assert_eq!(status, 400, "{message}");
    assert!(message.contains("virtio-blk"), "{message}");

    // Attach while it runs: applied now, and the guest sees a second disk.
    let attached = server
        .post(&format!("/vms/{id}/disks"))
        .json(&json!({"disk": extra}))
        .send()
        .unwrap();
    assert_eq!(attached.status(), 200, "{}", attached.text().unwrap());
    let attached: Value = attached.json().unwrap();
    assert_eq!(attached["appliedNow"], json!(["disks"]));
    assert_eq!(disk_names(&attached["vm"]), vec![root.clone(), extra.clone()]);
    assert!(
        wait_until(Duration::from_secs(60), || guest.run("ls /sys/block").contains("vdb")),
        "the hot-added disk never appeared in the guest"
    );
    let read = guest.run(
        "printf HOTPLUG-MARK | dd of=/dev/vdb conv=notrunc 2>/dev/null; sync; echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/vdb bs=12 count=1 2>/dev/null; echo",
    );
    assert!(read.contains("HOTPLUG-MARK"), "{read}");
    let (status, message) = refused(
        server
            .post(&format!("/vms/{id}/disks"))
            .json(&json!({"disk": extra}))
            .send()
            .unwrap(),
    );
    assert_eq!(status, 409, "{message}");
    // Its saved state would not load into the machine its definition now describes.
    let (status, message) = refused(
        server
            .post(&format!("/vms/{id}/fork"))
            .json(&json!({"name": unique("hpfork")}))
            .send()
            .unwrap(),
    );
    assert_eq!(status, 409, "{message}");
    assert!(message.contains("restart it first"), "{message}");

    // The disk attached at start is not on a hotplug port: refused while the VM runs.
    let (status, message) = refused(server.delete(&format!("/vms/{id}/disks/{root}")).send().unwrap());
    assert_eq!(status, 409, "{message}");
    assert!(message.contains("stop the VM"), "{message}");

    // Detach the hot-added disk: the guest lets go, the definition forgets it.
    let detached = server.delete(&format!("/vms/{id}/disks/{extra}")).send().unwrap();
    assert_eq!(detached.status(), 200, "{}", detached.text().unwrap());
    let detached: Value = detached.json().unwrap();
    assert_eq!(detached["appliedNow"], json!(["disks"]));
    assert_eq!(disk_names(&detached["vm"]), vec![root.clone()]);
    assert!(
        wait_until(Duration::from_secs(30), || !guest.run("ls /sys/block").contains("vdb")),
        "the detached disk is still in the guest"
    );

    // The data written through the hot-added device is in the pool disk; it attaches again.
    let again = server
        .post(&format!("/vms/{id}/disks"))
        .json(&json!({"disk": extra, "readOnly": true}))
        .send()
        .unwrap();
    assert_eq!(again.status(), 200, "{}", again.text().unwrap());
    assert!(wait_until(Duration::from_secs(60), || guest
        .run("dd if=/dev/vdb bs=12 count=1 2>/dev/null; echo")
        .contains("HOTPLUG-MARK")));

    let killed = server.post(&format!("/vms/{id}/kill")).send().unwrap();
    assert_eq!(killed.status(), 200);
    assert_eq!(
        server
            .delete(&format!("/vms/{id}?disks=delete"))
            .send()
            .unwrap()
            .status(),
        204
    );
}

fn online_cpus(guest: &mut crate::vm_boot::Guest) -> u32 {
    let out = guest.run("grep -c ^processor /proc/cpuinfo");
    out.lines()
        .rev()
        .find_map(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("cpuinfo: {out}"))
}

#[test]
fn vcpus_added_to_a_running_vm_come_online_up_to_its_maximum() {
    let server = TestServer::shared();
    let (id, mut guest, _disk, _iso) = booted_with_disk(
        server,
        "hotcpu",
        16 << 20,
        json!({"memoryMib": 256, "cpu": {"sockets": 1}, "maxVcpus": 2}),
    );
    assert_eq!(online_cpus(&mut guest), 1);

    // Past the maximum: refused; fewer than it runs: refused while it runs.
    let (status, message) = refused(
        server
            .put(&format!("/vms/{id}/vcpus"))
            .json(&json!({"count": 3}))
            .send()
            .unwrap(),
    );
    assert_eq!(status, 400, "{message}");
    assert!(message.contains("maxVcpus"), "{message}");

    let added = server
        .put(&format!("/vms/{id}/vcpus"))
        .json(&json!({"count": 2}))
        .send()
        .unwrap();
    assert_eq!(added.status(), 200, "{}", added.text().unwrap());
    let added: Value = added.json().unwrap();
    assert_eq!(added["appliedNow"], json!(["cpu"]));
    assert_eq!(added["vm"]["definition"]["cpu"]["sockets"], 2);
    // The guest sees the new CPU and brings it online (no udev in this guest to do it).
    assert!(
        wait_until(Duration::from_secs(60), || {
            guest.run("echo 1 > /sys/devices/system/cpu/cpu1/online 2>/dev/null; true");
            online_cpus(&mut guest) == 2
        }),
        "the added vCPU never came online"
    );
    let (status, message) = refused(
        server
            .put(&format!("/vms/{id}/vcpus"))
            .json(&json!({"count": 1}))
            .send()
            .unwrap(),
    );
    assert_eq!(status, 409, "{message}");
    assert!(message.contains("stop"), "{message}");
    let (status, message) = refused(
        server
            .post(&format!("/vms/{id}/snapshots"))
            .json(&json!({"name": "with-cpus"}))
            .send()
            .unwrap(),
    );
    assert_eq!(status, 409, "a snapshot with memory of a changed machine: {message}");
    assert!(message.contains("restart it first"), "{message}");

    let killed = server.post(&format!("/vms/{id}/kill")).send().unwrap();
    assert_eq!(killed.status(), 200);
    // Stopped, any count goes into the definition for the next start.
    let set = server
        .put(&format!("/vms/{id}/vcpus"))
        .json(&json!({"count": 1}))
        .send()
        .unwrap();
    assert_eq!(set.status(), 200, "{}", set.text().unwrap());
    let set: Value = set.json().unwrap();
    assert_eq!(set["appliedNow"], json!([]));
    assert_eq!(set["vm"]["definition"]["cpu"]["sockets"], 1);
    assert_eq!(
        server
            .delete(&format!("/vms/{id}?disks=delete"))
            .send()
            .unwrap()
            .status(),
        204
    );
}

/// The guest's `MemTotal`, in MiB.
fn mem_total_mib(guest: &mut crate::vm_boot::Guest) -> u64 {
    let out = guest.run("grep MemTotal /proc/meminfo");
    out.split_whitespace()
        .find_map(|w| w.parse::<u64>().ok())
        .map(|kib| kib / 1024)
        .unwrap_or_else(|| panic!("meminfo: {out}"))
}

#[test]
fn a_balloon_takes_memory_from_a_running_guest_and_gives_it_back() {
    let server = TestServer::shared();
    let iso = library_iso(server);
    let (id, mut guest) = booted(server, "balloon", json!({"memoryMib": 256, "cdroms": [{"iso": iso}]}));
    assert_eq!(vm(server, &id)["definition"]["balloon"], true, "q35 VMs get a balloon");
    let full = mem_total_mib(&mut guest);
    let memory: Value = server.get(&format!("/vms/{id}/memory")).send().unwrap().json().unwrap();
    assert_eq!(memory["memoryMib"], 256);
    assert_eq!(memory["actualMib"], 256);
    for bad in [16, 1024] {
        let (status, message) = refused(
            server
                .put(&format!("/vms/{id}/memory"))
                .json(&json!({"targetMib": bad}))
                .send()
                .unwrap(),
        );
        assert_eq!(status, 400, "{message}");
        assert!(message.contains("targetMib"), "{message}");
    }

    let set = server
        .put(&format!("/vms/{id}/memory"))
        .json(&json!({"targetMib": 160}))
        .send()
        .unwrap();
    assert_eq!(set.status(), 200, "{}", set.text().unwrap());
    assert!(
        wait_until(Duration::from_secs(60), || mem_total_mib(&mut guest) + 64 <= full),
        "the guest kept its memory: {} MiB of {full}",
        mem_total_mib(&mut guest)
    );
    assert!(wait_until(Duration::from_secs(30), || {
        let memory: Value = server.get(&format!("/vms/{id}/memory")).send().unwrap().json().unwrap();
        memory["actualMib"].as_u64().unwrap() <= 170
    }));

    let back = server
        .put(&format!("/vms/{id}/memory"))
        .json(&json!({"targetMib": 256}))
        .send()
        .unwrap();
    assert_eq!(back.status(), 200, "{}", back.text().unwrap());
    assert!(
        wait_until(Duration::from_secs(60), || mem_total_mib(&mut guest) + 8 >= full),
        "the guest did not get its memory back"
    );

    let killed = server.post(&format!("/vms/{id}/kill")).send().unwrap();
    assert_eq!(killed.status(), 200);
    let (status, message) = refused(server.get(&format!("/vms/{id}/memory")).send().unwrap());
    assert_eq!(status, 409, "a stopped VM has no balloon to read: {message}");
    assert_eq!(server.delete(&format!("/vms/{id}")).send().unwrap().status(), 204);
}
