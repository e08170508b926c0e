//! The VM manager's definitions through the REST API and the CLI: define, list, get, edit,
//! rename and delete, and the errors a person meets (404, 400, 409 naming the conflict).

use serde_json::{json, Value};

use crate::fixture::{unique, TestServer};

fn error_of(resp: reqwest::blocking::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    let body: Value = resp.json().unwrap();
    assert_eq!(body["code"], status, "{body}");
    (status, body["message"].as_str().unwrap_or_default().to_owned())
}

#[test]
fn a_vm_is_defined_listed_edited_renamed_and_deleted() {
    let server = TestServer::shared();
    let name = unique("web");
    let created = server
        .post("/vms")
        .json(&json!({
            "name": name,
            "cpu": {"sockets": 1, "cores": 2},
            "memoryMib": 768,
            "firmware": "uefi",
            "disks": [{"disk": format!("{name}-root"), "bus": "nvme"}],
            "cdroms": [{"iso": "installer", "ejectAfterFirstBoot": true}],
            "nics": [{}],
            "display": "vnc",
            "tags": ["tier=web"],
        }))
        .send()
        .unwrap();
    assert_eq!(created.status(), 201);
    let vm: Value = created.json().unwrap();
    let id = vm["id"].as_str().unwrap().to_owned();
    assert_eq!(vm["state"], "defined");
    assert_eq!(vm["definition"]["cpu"], json!({"sockets": 1, "cores": 2, "threads": 1}));
    assert_eq!(vm["definition"]["machine"], "q35", "defaults are filled in");
    assert_eq!(vm["definition"]["bootOrder"], json!(["disk", "cdrom"]));
    let mac = vm["definition"]["nics"][0]["mac"].as_str().unwrap().to_owned();
    assert!(mac.starts_with("52:54:00:"), "a MAC is generated at create: {mac}");

    // Found by id and by name; listed.
    let by_name: Value = server.get(&format!("/vms/{name}")).send().unwrap().json().unwrap();
    assert_eq!(by_name["id"], id);
    let list: Vec<Value> = server.get("/vms").send().unwrap().json().unwrap();
    assert!(list.iter().any(|v| v["id"] == id));

    // A stopped VM takes every change at once; the MAC stays.
    let edit: Value = server
        .patch(&format!("/vms/{id}"))
        .json(&json!({"memoryMib": 1024, "description": "front end", "cdroms": null}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(edit["appliedNow"], json!(["cdroms", "description", "memoryMib"]));
    assert_eq!(edit["atNextStart"], json!([]));
    assert_eq!(edit["vm"]["definition"]["memoryMib"], 1024);
    assert_eq!(edit["vm"]["definition"]["cdroms"], json!([]));
    assert_eq!(edit["vm"]["definition"]["nics"][0]["mac"], mac.as_str());

    // Renamed; the old name is free again, the new one taken.
    let renamed = format!("{name}-2");
    let info: Value = server
        .post(&format!("/vms/{id}/rename"))
        .json(&json!({"name": renamed}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(info["name"], renamed.as_str());
    assert_eq!(server.get(&format!("/vms/{name}")).send().unwrap().status(), 404);

    assert_eq!(server.delete(&format!("/vms/{renamed}")).send().unwrap().status(), 204);
    let (status, message) = error_of(server.get(&format!("/vms/{id}")).send().unwrap());
    assert_eq!(status, 404);
    assert!(message.contains(&id), "{message}");
    assert_eq!(server.delete(&format!("/vms/{id}")).send().unwrap().status(), 404);
}

#[test]
fn bad_definitions_are_refused_with_what_to_change() {
    let server = TestServer::shared();
    let refuse = |body: Value| error_of(server.post("/vms").json(&body).send().unwrap());
    let name = unique("bad");

    // Impossible sizes and values → 400.
    let (status, message) = refuse(json!({"name": name, "memoryMib": 1}));
    assert_eq!(status, 400);
    assert!(message.contains("memoryMib must be between"), "{message}");
    let (status, message) = refuse(json!({"name": name, "cpu": {"sockets": 4096, "cores": 4096}}));
    assert_eq!(status, 400);
    assert!(message.contains("vCPUs"), "{message}");
    let (status, message) = refuse(json!({"name": name, "cpu": {"cores": 0}}));
    assert_eq!(status, 400);
    assert!(message.contains("at least 1"), "{message}");
    let (status, message) = refuse(json!({"name": "../etc"}));
    assert_eq!(status, 400);
    assert!(message.contains("invalid VM name"), "{message}");
    let (status, message) = refuse(json!({"name": name, "disks": [{"disk": "../../passwd"}]}));
    assert_eq!(status, 400);
    assert!(message.contains("invalid disk name"), "{message}");
    // The pool's own rule: a name the pool could not hold is refused at definition time.
    let too_long = "d".repeat(viv_storage::name::MAX_LEN + 1);
    let (status, message) = refuse(json!({"name": name, "disks": [{"disk": too_long}]}));
    assert_eq!(status, 400);
    assert!(message.contains("too long"), "{message}");
    let (status, message) = refuse(json!({"name": name, "cdroms": [{"iso": ".hidden.iso"}]}));
    assert_eq!(status, 400);
    assert!(message.contains("invalid ISO name"), "{message}");
    let (status, message) = refuse(json!({"name": name, "memoryMB": 512}));
    assert_eq!(status, 400, "a misspelt field is not silently ignored");
    assert!(message.contains("memoryMB"), "{message}");
    let (status, _) = refuse(json!({"name": name, "nics": [{"mac": "01:00:5e:00:00:01"}]}));
    assert_eq!(status, 400, "a multicast MAC");
    let (status, message) = refuse(json!({"name": name, "bootOrder": ["disk", "disk"]}));
    assert_eq!(status, 400);
    assert!(message.contains("twice"), "{message}");

    // Conflicting devices → 409 naming the conflict.
    let (status, message) = refuse(json!({"name": name, "machine": "microvm", "firmware": "uefi"}));
    assert_eq!(status, 409);
    assert!(message.contains("microvm") && message.contains("uefi"), "{message}");
    let (status, message) = refuse(json!({"name": name, "disks": [{"disk": "d"}, {"disk": "d"}]}));
    assert_eq!(status, 409);
    assert!(message.contains("'d' is attached twice"), "{message}");
    let disk = unique("shared-disk");
    let first = unique("owner");
    let created = server
        .post("/vms")
        .json(&json!({"name": first, "disks": [{"disk": disk}]}))
        .send()
        .unwrap();
    assert_eq!(created.status(), 201);
    let (status, message) = refuse(json!({"name": name, "disks": [{"disk": disk, "readOnly": true}]}));
    assert_eq!(status, 409, "read-write elsewhere");
    assert!(message.contains(&first) && message.contains("read-write"), "{message}");
    let (status, message) = refuse(json!({"name": first}));
    assert_eq!(status, 409);
    assert!(message.contains("already exists"), "{message}");
    // Nothing was stored by the refused requests.
    assert_eq!(server.get(&format!("/vms/{name}")).send().unwrap().status(), 404);
    // An edit is checked the same way and leaves the VM as it was.
    let (status, _) = error_of(
        server
            .patch(&format!("/vms/{first}"))
            .json(&json!({"memoryMib": 0}))
            .send()
            .unwrap(),
    );
    assert_eq!(status, 400);
    let kept: Value = server.get(&format!("/vms/{first}")).send().unwrap().json().unwrap();
    assert_eq!(kept["definition"]["memoryMib"], 512);
    assert_eq!(server.delete(&format!("/vms/{first}")).send().unwrap().status(), 204);
}

#[test]
fn the_cli_defines_lists_edits_and_deletes_vms() {
    let server = TestServer::shared();
    let name = unique("cli");
    let created = server.cli(&[
        "vm",
        "create",
        &name,
        "--vcpus",
        "1",
        "--memory",
        "640",
        "--disk",
        &format!("{name}-root,bus=sata"),
        "--cdrom",
        "installer,eject-after-boot",
        "--tag",
        "env=test",
    ]);
    assert_eq!(created.code, 0, "{}", created.stderr);
    let id = created.stdout.trim().to_owned();
    assert!(id.starts_with("vm-"), "{id}");
    let list = server.cli(&["vm", "list"]);
    assert_eq!(list.code, 0, "{}", list.stderr);
    let line = list.stdout.lines().find(|l| l.contains(&id)).expect("listed");
    assert!(
        line.contains("defined") && line.contains("640 MiB") && line.contains("q35/bios"),
        "{line}"
    );
    let edited = server.cli(&["vm", "edit", &name, "--memory", "700", "--firmware", "uefi"]);
    assert_eq!(edited.code, 0, "{}", edited.stderr);
    assert!(
        edited.stdout.contains("applied now: firmware, memoryMib"),
        "{}",
        edited.stdout
    );
    let got = server.cli(&["--json", "vm", "get", &id]);
    let vm: Value = serde_json::from_str(&got.stdout).unwrap();
    assert_eq!(vm["definition"]["firmware"], "uefi");
    assert_eq!(vm["definition"]["disks"][0]["bus"], "sata");
    let bad = server.cli(&[
        "vm",
        "create",
        &format!("{name}-x"),
        "--machine",
        "microvm",
        "--cdrom",
        "installer",
    ]);
    assert_ne!(bad.code, 0);
    assert!(bad.stderr.contains("CD-ROM"), "{}", bad.stderr);
    let deleted = server.cli(&["vm", "delete", &name]);
    assert_eq!(deleted.code, 0, "{}", deleted.stderr);
    let missing = server.cli(&["vm", "get", &name]);
    assert_ne!(missing.code, 0);
    assert!(missing.stderr.contains("no VM"), "{}", missing.stderr);
}
