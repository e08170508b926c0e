//! OVA export and import through the public API against a real guest: the test ISO's busybox
//! guest writes a marker to its disk, the stopped VM is exported as an OVA (a tar whose first
//! entry is the OVF descriptor), imported under a new name, booted, and the marker read back
//! from inside the imported guest. Hostile packages are refused.

use serde_json::{json, Value};

use crate::fixture::{unique, TestServer};
use crate::vm_boot::{booted_with_disk, create_disk, library_iso, Guest};
use crate::vm_console::READY;
use crate::vm_lifecycle::{act, refused};

#[test]
fn an_exported_ova_imports_and_boots_with_its_disk() {
    let server = TestServer::shared();
    let (id, mut guest, _disk, iso) = booted_with_disk(
        server,
        "ova",
        16 << 20,
        json!({"memoryMib": 192, "stopTimeoutSecs": 120}),
    );
    let marker = format!("OVA-MARK-{}", unique("m"));
    guest.run(&format!(
        "printf {marker} | dd of=/dev/vda conv=notrunc 2>/dev/null; sync"
    ));
    let (status, message) = refused(server.get(&format!("/vms/{id}/export.ova")).send().unwrap());
    assert_eq!(status, 409, "a running VM is not exported: {message}");
    act(server, &id, "stop", "");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("vm.ova");
    let file_arg = file.to_str().unwrap();
    let exported = server.cli(&["vm", "export", &id, file_arg]);
    assert_eq!(exported.code, 0, "{exported:?}");
    let ova = std::fs::read(&file).unwrap();
    let first = String::from_utf8_lossy(&ova[..100]);
    assert!(
        first.trim_end_matches('\0').ends_with(".ovf"),
        "the first entry is the descriptor: {first:?}"
    );
    assert!(
        String::from_utf8_lossy(&ova).contains("streamOptimized"),
        "the disks are streamOptimized VMDKs"
    );

    let name = unique("ovaimp");
    let response = server
        .post(&format!("/vms/import?name={name}"))
        .body(ova.clone())
        .send()
        .unwrap();
    let status = response.status().as_u16();
    let imported: Value = response.json().unwrap();
    assert_eq!(status, 201, "{imported}");
    let new_id = imported["id"].as_str().unwrap().to_owned();
    let def: Value = server.get(&format!("/vms/{new_id}")).send().unwrap().json().unwrap();
    assert_eq!(
        def["definition"]["memoryMib"].as_u64().or(def["memoryMib"].as_u64()),
        Some(192),
        "{def}"
    );
    let again = refused(
        server
            .post(&format!("/vms/import?name={name}"))
            .body(ova)
            .send()
            .unwrap(),
    );
    assert_eq!(again.0, 409, "{}", again.1);

    // The package carries no ISO: give the imported VM the boot ISO, boot it, read the marker.
    let patched = server
        .patch(&format!("/vms/{new_id}"))
        .json(&json!({"cdroms": [{"iso": iso}]}))
        .send()
        .unwrap();
    assert_eq!(patched.status(), 200, "{}", patched.text().unwrap());
    act(server, &new_id, "start", "");
    let mut copy = Guest::attach(server, &new_id);
    copy.wait_for(READY);
    let read = copy.run("dd if=/dev/vda bs=64 count=1 2>/dev/null; echo");
    assert!(read.contains(&marker), "the imported disk holds the marker: {read}");
    act(server, &new_id, "kill", "");

    // Hostile packages: not a tar, and a descriptor naming a file outside the package.
    let (status, message) = refused(server.post("/vms/import").body(vec![7u8; 4096]).send().unwrap());
    assert_eq!(status, 400, "{message}");
    let mut evil = tar_entry("evil.ovf", EVIL.as_bytes());
    evil.extend(vec![0u8; 1024]);
    let (status, message) = refused(server.post("/vms/import").body(evil).send().unwrap());
    assert_eq!((status, message.contains("plain names")), (400, true), "{message}");

    for vm in [&id, &new_id] {
        assert_eq!(
            server
                .delete(&format!("/vms/{vm}?disks=delete"))
                .send()
                .unwrap()
                .status(),
            204
        );
    }
}

const EVIL: &str = r#"<?xml version="1.0"?><Envelope xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"><References><File ovf:id="f" ovf:href="../../etc/shadow"/></References><VirtualSystem ovf:id="x"/></Envelope>"#;

/// One ustar entry (header and padded data).
fn tar_entry(name: &str, data: &[u8]) -> Vec<u8> {
    let mut header = [0u8; 512];
    header[..name.len()].copy_from_slice(name.as_bytes());
    header[100..107].copy_from_slice(b"0000644");
    header[108..115].copy_from_slice(b"0000000");
    header[116..123].copy_from_slice(b"0000000");
    header[124..135].copy_from_slice(format!("{:011o}", data.len()).as_bytes());
    header[136..147].copy_from_slice(b"00000000000");
    header[156] = b'0';
    header[257..263].copy_from_slice(b"ustar\0");
    header[263..265].copy_from_slice(b"00");
    header[148..156].copy_from_slice(b"        ");
    let sum: u32 = header.iter().map(|b| u32::from(*b)).sum();
    header[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    let mut out = header.to_vec();
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out
}

#[test]
fn a_libvirt_domain_becomes_a_vm_of_pool_files_only() {
    let server = TestServer::shared();
    let iso = library_iso(server);
    let disk = unique("lvdisk");
    create_disk(server, &disk, 16 << 20);
    let pool = server.data_dir.join("storage");
    let name = unique("lvvm");
    let mac = "52:54:00:7a:01:02";
    let domain = |disk_path: &str| {
        format!(
            r#"<domain type='kvm'><name>{name}</name><memory unit='MiB'>256</memory><vcpu>2</vcpu>
  <os firmware='efi'><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='{disk_path}'/><target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='cdrom'><source file='{}/isos/{iso}.iso'/><target dev='sda' bus='sata'/><readonly/></disk>
    <interface type='network'><mac address='{mac}'/><model type='e1000'/></interface>
  </devices></domain>"#,
            pool.display()
        )
    };
    let import = |xml: String| {
        server
            .post("/vms/import")
            .header("Content-Type", "application/xml")
            .body(xml)
            .send()
            .unwrap()
    };
    let (status, message) = refused(import(domain("/etc/shadow")));
    assert_eq!((status, message.contains("storage pool")), (400, true), "{message}");
    let sneaky = format!("{}/disks/../../../etc/{disk}.qcow2", pool.display());
    assert_eq!(refused(import(domain(&sneaky))).0, 400);
    let dtd = format!("<!DOCTYPE d [<!ENTITY x 'y'>]>{}", domain("/x"));
    assert_eq!(refused(import(dtd)).0, 400);

    let response = import(domain(&format!("{}/disks/{disk}.qcow2", pool.display())));
    let status = response.status().as_u16();
    let vm: Value = response.json().unwrap();
    assert_eq!(status, 201, "{vm}");
    let def = &vm["definition"];
    assert_eq!(vm["name"], name.as_str());
    assert_eq!(
        (def["memoryMib"].as_u64(), def["cpu"]["cores"].as_u64()),
        (Some(256), Some(2)),
        "{def}"
    );
    assert_eq!(def["firmware"], "uefi");
    assert_eq!(def["disks"][0]["disk"], disk.as_str());
    assert_eq!(def["cdroms"][0]["iso"], iso.as_str());
    assert_eq!(
        (def["nics"][0]["model"].as_str(), def["nics"][0]["mac"].as_str()),
        (Some("e1000"), Some(mac))
    );
    let id = vm["id"].as_str().unwrap();
    assert_eq!(
        server
            .delete(&format!("/vms/{id}?disks=delete"))
            .send()
            .unwrap()
            .status(),
        204
    );
}
