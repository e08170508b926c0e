//! Forks of running VMs and the bridge between sandboxes and VMs, through the public API and
//! the CLI against real guests: a fork's counter continues in both VMs and their disks part
//! ways; a VM made from a sandbox snapshot boots that snapshot's files with the sandbox agent
//! and answers `exec`.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::fixture::{unique, wait_until, TestServer};
use crate::vm_boot::{booted, create_disk, library_iso, vm, Guest};
use crate::vm_lifecycle::{act, define, refused};

fn delete_with_disks(server: &TestServer, id: &str) {
    let response = server.delete(&format!("/vms/{id}?disks=delete")).send().unwrap();
    assert_eq!(response.status(), 204, "{}", response.text().unwrap());
}

#[test]
fn a_forked_vm_continues_the_counter_in_both_with_its_own_disk_and_mac() {
    let server = TestServer::shared();
    let iso = library_iso(server);
    let disk = unique("forkdisk");
    create_disk(server, &disk, 64 << 20);
    let (source, mut guest) = booted(
        server,
        "forksrc",
        json!({"memoryMib": 256, "disks": [{"disk": disk}], "cdroms": [{"iso": iso}], "nics": [{}]}),
    );
    guest.run("printf MARK-SRC | dd of=/dev/vda conv=notrunc 2>/dev/null; sync");
    guest.start_counter();
    assert!(wait_until(Duration::from_secs(30), || guest.count() > 2));

    // Bad input first: an unknown VM, a name in use.
    assert_eq!(
        server
            .post("/vms/no-such-vm/fork")
            .json(&json!({"name": unique("x")}))
            .send()
            .unwrap()
            .status(),
        404
    );
    let source_name = vm(server, &source)["name"].as_str().unwrap().to_owned();
    let (status, message) = refused(
        server
            .post(&format!("/vms/{source}/fork"))
            .json(&json!({"name": source_name}))
            .send()
            .unwrap(),
    );
    assert_eq!((status, message.contains("already exists")), (409, true), "{message}");

    let before = guest.count();
    let fork_name = unique("fork");
    let started = Instant::now();
    let forked = server
        .post(&format!("/vms/{source}/fork"))
        .json(&json!({"name": fork_name}))
        .send()
        .unwrap();
    assert_eq!(forked.status(), 201, "{}", forked.text().unwrap());
    let fork: Value = forked.json().unwrap();
    eprintln!("fork of a running VM: {} ms", started.elapsed().as_millis());
    let fork_id = fork["id"].as_str().unwrap().to_owned();
    assert_eq!(fork["state"], "running", "{fork}");
    let original = vm(server, &source);
    assert_eq!(original["state"], "running", "the source runs on");
    let mac_of = |v: &Value| v["definition"]["nics"][0]["mac"].as_str().unwrap().to_owned();
    assert_ne!(mac_of(&fork), mac_of(&original), "the fork has a new MAC");
    assert_ne!(fork["uuid"], original["uuid"]);
    let fork_disk = fork["definition"]["disks"][0]["disk"].as_str().unwrap().to_owned();
    assert_ne!(fork_disk, disk, "the fork has a disk of its own");

    // The counter continues from where it was in both.
    let mut twin = Guest::attach(server, &fork_id);
    let in_fork = twin.count();
    assert!(in_fork >= before, "the fork's counter went on from {before}: {in_fork}");
    assert!(
        wait_until(Duration::from_secs(60), || twin.count() > in_fork + 5),
        "the fork's counter runs"
    );
    let in_source = guest.count();
    assert!(
        wait_until(Duration::from_secs(60), || guest.count() > in_source + 5),
        "the source's counter runs"
    );

    // The fork's disk held the source's marker; from then on their disks part ways.
    let head = |g: &mut Guest| g.run("dd if=/dev/vda bs=8 count=1 2>/dev/null; echo");
    assert!(head(&mut twin).contains("MARK-SRC"), "the fork's disk");
    twin.run("printf MARK-FRK | dd of=/dev/vda conv=notrunc 2>/dev/null; sync");
    assert!(head(&mut twin).contains("MARK-FRK"));
    assert!(head(&mut guest).contains("MARK-SRC"), "the source's disk is its own");

    // A paused VM forks into a paused VM; a stopped one is refused with what to do.
    act(server, &fork_id, "pause", "");
    let cli = server.cli(&["--json", "vm", "fork", &fork_id, &unique("fork2")]);
    assert_eq!(cli.code, 0, "{cli:?}");
    let paused_fork: Value = serde_json::from_str(&cli.stdout).unwrap();
    assert_eq!(paused_fork["state"], "paused");
    assert_eq!(vm(server, &fork_id)["state"], "paused");
    let second = paused_fork["id"].as_str().unwrap().to_owned();
    act(server, &second, "kill", "");
    let (status, message) = refused(
        server
            .post(&format!("/vms/{second}/fork"))
            .json(&json!({"name": unique("x")}))
            .send()
            .unwrap(),
    );
    assert_eq!(status, 409, "{message}");
    assert!(
        message.contains("start it first") && message.contains("clone"),
        "{message}"
    );

    for id in [&second, &fork_id, &source] {
        if vm(server, id)["state"] != "stopped" {
            act(server, id, "kill", "");
        }
        delete_with_disks(server, id);
    }
}

#[test]
fn a_vm_made_from_a_sandbox_snapshot_answers_exec_and_keeps_the_snapshots_files() {
    let server = TestServer::shared();
    let sandbox = server.sandbox();
    let wrote = sandbox.sh("echo from-the-sandbox > /home/user/marker.txt; sync");
    assert_eq!(wrote.exit_code, Some(0), "{wrote:?}");
    let snapshot_name = unique("tovm");
    let snap = server
        .post(&format!("/sandboxes/{}/snapshots", sandbox.id))
        .json(&json!({ "name": snapshot_name }))
        .send()
        .unwrap();
    assert_eq!(snap.status(), 201, "{}", snap.text().unwrap());
    let snap: Value = snap.json().unwrap();
    let snapshot_id = snap["snapshotID"].as_str().unwrap().to_owned();
    drop(sandbox);

    // Bad input: an unknown snapshot, both sources at once.
    let (status, message) = refused(
        server
            .post("/vms")
            .json(&json!({"name": unique("x"), "fromSnapshot": "no-such-snapshot"}))
            .send()
            .unwrap(),
    );
    assert_eq!((status, message.contains("no-such-snapshot")), (404, true), "{message}");
    let (status, _) = refused(
        server
            .post("/vms")
            .json(&json!({"name": unique("x"), "fromSnapshot": snapshot_id, "fromTemplate": "base"}))
            .send()
            .unwrap(),
    );
    assert_eq!(status, 400);

    let name = unique("fromsnap");
    let started = Instant::now();
    let made = server
        .post("/vms")
        .json(&json!({"name": name, "fromSnapshot": snapshot_id, "memoryMib": 512, "nics": [{}]}))
        .send()
        .unwrap();
    assert_eq!(made.status(), 201, "{}", made.text().unwrap());
    let made: Value = made.json().unwrap();
    let id = made["id"].as_str().unwrap().to_owned();
    assert_eq!(made["definition"]["sandboxKernel"], true, "{made}");
    assert_eq!(made["definition"]["machine"], "microvm");
    let root = made["definition"]["disks"][0]["disk"].as_str().unwrap().to_owned();
    let disk: Value = server.get(&format!("/disks/{root}")).send().unwrap().json().unwrap();
    assert!(disk.get("backing").is_none(), "a standalone copy: {disk}");

    let (status, message) = refused(
        server
            .post(&format!("/vms/{id}/exec"))
            .json(&json!({"command": "true"}))
            .send()
            .unwrap(),
    );
    assert_eq!((status, message.contains("start")), (409, true), "{message}");

    act(server, &id, "start", "");
    let read = server.exec_at(
        &format!("/vms/{id}/exec"),
        json!({"command": "cat /home/user/marker.txt"}),
    );
    eprintln!(
        "VM from a sandbox snapshot, create to exec answer: {} ms",
        started.elapsed().as_millis()
    );
    assert_eq!(read.exit_code, Some(0), "{read:?}");
    assert_eq!(read.out(), "from-the-sandbox\n");
    let cli = server.cli(&["vm", "exec", &name, "--", "sh", "-c", "echo $((6*7)); exit 3"]);
    assert_eq!((cli.code, cli.stdout.as_str()), (3, "42\n"), "{cli:?}");

    // A VM without the agent says why it cannot exec.
    let plain = define(server, &unique("plain"), json!({"memoryMib": 128}));
    act(server, &plain, "start", "");
    let (status, message) = refused(
        server
            .post(&format!("/vms/{plain}/exec"))
            .json(&json!({"command": "true"}))
            .send()
            .unwrap(),
    );
    assert_eq!((status, message.contains("sandbox agent")), (409, true), "{message}");
    act(server, &plain, "kill", "");

    // One tree: the VM's snapshot hangs under the sandbox snapshot it was made from.
    let taken = server
        .post(&format!("/vms/{id}/snapshots"))
        .json(&json!({"name": "in-vm"}))
        .send()
        .unwrap();
    assert_eq!(taken.status(), 201, "{}", taken.text().unwrap());
    let taken: Value = taken.json().unwrap();
    let tree: Vec<Value> = server.get("/snapshot-tree").send().unwrap().json().unwrap();
    let node = |want: &str| tree.iter().find(|n| n["id"] == want).cloned();
    let node_id = tree
        .iter()
        .find(|n| n["kind"] == "sandbox" && n["name"] == snapshot_name.as_str())
        .and_then(|n| n["id"].as_str())
        .expect("the sandbox snapshot is in the tree")
        .to_owned();
    let vm_node = node(taken["id"].as_str().unwrap()).expect("the VM snapshot is in the tree");
    assert_eq!(
        (
            vm_node["kind"].as_str(),
            vm_node["parentId"].as_str(),
            vm_node["ownerId"].as_str()
        ),
        (Some("vm"), Some(node_id.as_str()), Some(id.as_str())),
        "{vm_node}"
    );
    assert!(vm_node["sizeBytes"].as_u64().unwrap() > 0, "its memory: {vm_node}");
    let sandbox_node = node(&node_id).unwrap();
    assert_eq!(sandbox_node["kind"], "sandbox");
    let cli = server.cli(&["snapshot", "tree"]);
    assert_eq!(cli.code, 0, "{cli:?}");
    let under = cli.stdout.lines().position(|l| l.contains(&node_id)).unwrap();
    let child = cli
        .stdout
        .lines()
        .position(|l| l.contains(taken["id"].as_str().unwrap()))
        .unwrap();
    assert!(child > under, "{}", cli.stdout);

    // The sandbox snapshot may go: the VM holds a copy; the VM snapshot becomes a root.
    assert_eq!(
        server
            .delete(&format!("/snapshots/{snapshot_id}"))
            .send()
            .unwrap()
            .status(),
        204
    );
    let tree: Vec<Value> = server.get("/snapshot-tree").send().unwrap().json().unwrap();
    let vm_node = tree.iter().find(|n| n["id"] == taken["id"]).unwrap();
    assert!(vm_node.get("parentId").is_none(), "{vm_node}");

    // A sandbox template from the VM: refused while it runs, then sandboxes boot its files.
    let template = unique("fromvm");
    let (status, message) = refused(
        server
            .post(&format!("/vms/{id}/template"))
            .json(&json!({"name": template}))
            .send()
            .unwrap(),
    );
    assert_eq!((status, message.contains("stop it")), (409, true), "{message}");
    assert_eq!(
        server
            .exec_at(
                &format!("/vms/{id}/exec"),
                json!({"command": "echo from-the-vm > /home/user/vm.txt; sync"})
            )
            .exit_code,
        Some(0)
    );
    act(server, &id, "kill", "");
    let made = server
        .post(&format!("/vms/{id}/template"))
        .json(&json!({"name": template}))
        .send()
        .unwrap();
    assert_eq!(made.status(), 201, "{}", made.text().unwrap());
    let sandbox = server.sandbox_with(json!({"templateID": template, "timeout": 300}));
    let read = sandbox.sh("cat /home/user/marker.txt /home/user/vm.txt");
    assert_eq!(read.out(), "from-the-sandbox\nfrom-the-vm\n", "{read:?}");
    drop(sandbox);
    let (status, message) = refused(
        server
            .post(&format!("/vms/{plain}/template"))
            .json(&json!({"name": unique("x")}))
            .send()
            .unwrap(),
    );
    assert_eq!((status, message.contains("sandbox kernel")), (409, true), "{message}");
    delete_with_disks(server, &plain);
    assert_eq!(
        server
            .delete(&format!("/templates/{template}"))
            .send()
            .unwrap()
            .status(),
        204
    );

    delete_with_disks(server, &id);
    assert_eq!(server.get(&format!("/disks/{root}")).send().unwrap().status(), 404);
}

#[test]
fn a_vm_from_a_template_answers_exec_after_a_server_restart_and_in_its_fork() {
    let dir = tempfile::tempdir().unwrap();
    let leave = ["--on-shutdown", "leave"];
    let server = TestServer::start_on_with(dir.path(), &leave);
    let made = server
        .post("/vms")
        .json(&json!({"name": "from-base", "fromTemplate": "base", "memoryMib": 512}))
        .send()
        .unwrap();
    assert_eq!(made.status(), 201, "{}", made.text().unwrap());
    let id = made.json::<Value>().unwrap()["id"].as_str().unwrap().to_owned();
    act(&server, &id, "start", "");
    let exec = |server: &TestServer, vm: &str, command: &str| {
        server.exec_at(&format!("/vms/{vm}/exec"), json!({ "command": command }))
    };
    let wrote = exec(&server, &id, "echo before-restart > /tmp/mark; cat /tmp/mark");
    assert_eq!(wrote.out(), "before-restart\n", "{wrote:?}");
    server.stop(libc::SIGTERM);
    drop(server);

    // Taken over: its agent answers the server's key, and its memory (/tmp) is the same.
    let server = TestServer::start_on_with(dir.path(), &["--on-shutdown", "kill"]);
    assert_eq!(vm(&server, &id)["state"], "running");
    let read = exec(&server, &id, "cat /tmp/mark");
    assert_eq!(read.out(), "before-restart\n", "{read:?}");

    // A fork's agent continues its source's.
    let fork = server
        .post(&format!("/vms/{id}/fork"))
        .json(&json!({"name": "from-base-twin"}))
        .send()
        .unwrap();
    assert_eq!(fork.status(), 201, "{}", fork.text().unwrap());
    let twin = fork.json::<Value>().unwrap()["id"].as_str().unwrap().to_owned();
    let read = exec(&server, &twin, "cat /tmp/mark; echo twin > /tmp/mark");
    assert_eq!(read.out(), "before-restart\n", "{read:?}");
    assert_eq!(exec(&server, &id, "cat /tmp/mark").out(), "before-restart\n");
    for vm in [&twin, &id] {
        act(&server, vm, "kill", "");
        delete_with_disks(&server, vm);
    }
}
