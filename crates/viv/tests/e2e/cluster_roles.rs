//! Two API servers (`--role api`) and three nodes (`--role node`) on one PostgreSQL database:
//! the API servers run no VM and place every create on a node by free memory; either of them
//! answers for every sandbox (API, files, host-name traffic, terminals); nodes refuse clients
//! that come to them directly; an API server's SSH gateway reaches sandboxes on the nodes;
//! node-local work goes to the node a client names; a drain moves a
//! node's sandboxes to the others; an API server killed mid-create leaves no half-made sandbox.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};

use crate::cluster::{json_of, node_named, serves_by_host_name, terminal_output};
use crate::fixture::{free_port, qemu_processes_under, wait_until, TestServer};

fn role_args<'a>(database: &'a str, role: &'a str, name: &'a str) -> Vec<&'a str> {
    vec![
        "--database",
        database,
        "--role",
        role,
        "--node-name",
        name,
        "--heartbeat",
        "1s",
        "--node-down-after",
        "5s",
    ]
}

#[test]
fn api_servers_place_on_nodes_and_answer_for_every_sandbox() {
    let database = viv_test_postgres::fresh_database();
    let dir = |prefix: &str| tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    let node_dirs = [
        dir("viv-e2e-role-n1-"),
        dir("viv-e2e-role-n2-"),
        dir("viv-e2e-role-n3-"),
    ];
    let names = ["node-1", "node-2", "node-3"];
    let nodes: Vec<TestServer> = node_dirs
        .iter()
        .zip(names)
        .map(|(d, name)| TestServer::start_on_with(d.path(), &role_args(&database, "node", name)))
        .collect();
    let (api1_dir, api2_dir) = (dir("viv-e2e-role-api1-"), dir("viv-e2e-role-api2-"));
    // API server 1 has the SSH gateway, which reaches sandboxes through their nodes.
    let ssh_address = format!("127.0.0.1:{}", free_port());
    let mut api1_args = role_args(&database, "api", "api-1");
    api1_args.extend(["--ssh-listen", &ssh_address]);
    let api1 = TestServer::start_on_with(api1_dir.path(), &api1_args);
    let api2 = TestServer::start_on_with(api2_dir.path(), &role_args(&database, "api", "api-2"));
    let vms_on = |i: usize| qemu_processes_under(node_dirs[i].path()).len();

    // Five servers, each with its role; API servers offer no capacity.
    let listed = json_of(api2.get("/nodes").send().unwrap());
    assert_eq!(listed.as_array().unwrap().len(), 5, "{listed}");
    for name in names {
        assert_eq!(node_named(&listed, name)["role"], "node", "{listed}");
        assert_eq!(node_named(&listed, name)["state"], "up", "{listed}");
    }
    for name in ["api-1", "api-2"] {
        assert_eq!(node_named(&listed, name)["role"], "api", "{listed}");
        assert_eq!(node_named(&listed, name)["capacity"]["memoryMib"], 0, "{listed}");
    }
    let table = api1.cli(&["node", "list"]);
    assert_eq!(table.code, 0, "{}", table.stderr);
    assert!(
        table.stdout.contains("ROLE") && table.stdout.contains(" api "),
        "{}",
        table.stdout
    );

    // A node answers its health, not clients: they are sent to an API server.
    assert_eq!(nodes[0].get("/health").send().unwrap().status(), 200);
    let direct = nodes[0].get("/v2/sandboxes").send().unwrap();
    assert_eq!(direct.status(), 421);
    let message = direct.json::<Value>().unwrap()["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        message.contains("--role node") && message.contains("API server"),
        "{message}"
    );

    // Three creates through API server 1 spread over the three nodes (each goes where most
    // memory is free); the API servers run none.
    let created: Vec<String> = (0..3)
        .map(|n| api1.create(json!({ "timeout": 600, "metadata": { "n": n.to_string() } })))
        .collect();
    let client_of = |server: &TestServer, id: &str| -> String {
        json_of(server.get(&format!("/sandboxes/{id}")).send().unwrap())["clientID"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let placed: BTreeSet<String> = created.iter().map(|id| client_of(&api2, id)).collect();
    assert_eq!(
        placed,
        names.iter().map(|n| n.to_string()).collect(),
        "placed on {placed:?}"
    );
    assert_eq!((vms_on(0), vms_on(1), vms_on(2)), (1, 1, 1));
    assert!(qemu_processes_under(api1_dir.path()).is_empty());
    assert!(qemu_processes_under(api2_dir.path()).is_empty());
    // Lists come from the store; each sandbox names its node.
    let all = json_of(api2.get("/v2/sandboxes").send().unwrap());
    assert_eq!(all.as_array().unwrap().len(), 3, "{all}");
    for sandbox in all.as_array().unwrap() {
        let id = sandbox["sandboxID"].as_str().unwrap();
        assert_eq!(sandbox["clientID"], client_of(&api1, id), "{all}");
    }

    // Either API server answers for every sandbox: exec, files written through one and read
    // through the other.
    for id in &created {
        assert_eq!(api2.exec(id, json!({ "command": "echo $((6*7))" })).out(), "42\n");
        let put = api1
            .put(&format!("/sandboxes/{id}/files?path=/tmp/id.txt"))
            .body(id.clone())
            .send()
            .unwrap();
        assert!(put.status().is_success(), "{}", put.text().unwrap_or_default());
        let read = api2
            .get(&format!("/sandboxes/{id}/files?path=/tmp/id.txt"))
            .send()
            .unwrap();
        assert_eq!(&read.text().unwrap(), id);
    }

    // Host-name traffic to a sandbox's port and a terminal WebSocket through API server 2.
    let first = &created[0];
    serves_by_host_name(&api2, first, "via-api");
    let output = terminal_output(&api2, first, "echo terminal $((6*7)); cat /tmp/id.txt");
    assert!(
        output.contains("terminal 42") && output.contains(first.as_str()),
        "{output:?}"
    );

    // SSH through API server 1, which runs no VM: a command with its exit status and streamed
    // stdin, and a forward (`ssh -W`) to the sandbox's web server, each passed on by the node.
    let ssh = crate::ssh::Client::new(&api1);
    ssh.register_with(&api1, &api1.key, &["--database", &database]);
    let run = ssh.run(first, "cat /tmp/www/index.html; echo oops >&2; exit 5", b"");
    assert_eq!(run.status.code(), Some(5), "{run:?}");
    assert_eq!(crate::ssh::text(&run.stdout), "via-api\n");
    assert_eq!(crate::ssh::text(&run.stderr), "oops\n");
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let counted = ssh.run(first, "sha256sum | cut -d' ' -f1", &data);
    assert_eq!(
        crate::ssh::text(&counted.stdout).trim(),
        crate::ssh::sha256_hex(&data),
        "{counted:?}"
    );
    let mut forward = ssh.ssh();
    forward.args(["-W", "localhost:8000"]).arg(format!("{first}@127.0.0.1"));
    let page = crate::ssh::bounded(
        forward,
        b"GET /index.html HTTP/1.0\r\nHost: sandbox\r\n\r\n",
        Duration::from_secs(120),
    );
    let page = crate::ssh::text(&page.stdout);
    assert!(
        page.starts_with("HTTP/1.0 200") && page.ends_with("via-api\n"),
        "{page:?}"
    );
    // A paused sandbox's node says so, as a server alone does; resumed, the session runs.
    let second = &created[1];
    let paused = api2.post(&format!("/sandboxes/{second}/pause")).send().unwrap();
    assert_eq!(paused.status(), 204, "{}", paused.text().unwrap_or_default());
    let refused = ssh.run(second, "cat /tmp/id.txt", b"");
    assert_eq!(refused.status.code(), Some(255), "{refused:?}");
    assert!(
        crate::ssh::text(&refused.stderr).contains("is paused; resume it first"),
        "{refused:?}"
    );
    let resumed = api1
        .post(&format!("/sandboxes/{second}/connect"))
        .json(&json!({}))
        .send()
        .unwrap();
    assert_eq!(resumed.status(), 201, "{}", resumed.text().unwrap_or_default());
    let run = ssh.run(second, "cat /tmp/id.txt", b"");
    assert_eq!(crate::ssh::text(&run.stdout), second.as_str(), "{run:?}");
    // A session whose sandbox is killed on its node ends with what the API says of it.
    let mut session = ssh.ssh();
    session
        .arg(format!("{second}@127.0.0.1"))
        .arg("echo started; sleep 600")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut session = session.spawn().unwrap();
    let mut started = [0u8; 8];
    std::io::Read::read_exact(session.stdout.as_mut().unwrap(), &mut started).unwrap();
    assert_eq!(&started, b"started\n");
    assert_eq!(
        api2.delete(&format!("/sandboxes/{second}")).send().unwrap().status(),
        204
    );
    let mut status = None;
    let ended = wait_until(Duration::from_secs(60), || {
        status = session.try_wait().unwrap();
        status.is_some()
    });
    if !ended {
        let _ = session.kill();
    }
    let mut said = String::new();
    std::io::Read::read_to_string(session.stderr.as_mut().unwrap(), &mut said).unwrap();
    assert!(ended, "ssh still waits after its sandbox was killed: {said}");
    assert_eq!(status.unwrap().code(), Some(255), "{said}");
    assert!(said.contains("vivarium: ") && said.contains("not found"), "{said}");

    // Node-local work goes to the node a client names (`Viv-Node`), else the first up node by
    // name; a node that is not up is refused.
    let disk = api1
        .post("/disks")
        .header("Viv-Node", "node-2")
        .json(&json!({ "name": "on-node-2", "size": 1 << 20 }))
        .send()
        .unwrap();
    assert_eq!(disk.status(), 201, "{}", disk.text().unwrap_or_default());
    let disks_on = |node: Option<&str>| -> Vec<String> {
        let mut request = api2.get("/disks");
        if let Some(node) = node {
            request = request.header("Viv-Node", node);
        }
        let listed = json_of(request.send().unwrap());
        listed
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(disks_on(Some("node-2")), ["on-node-2"]);
    assert!(disks_on(None).is_empty(), "node-1 holds no disk");
    assert!(node_dirs[1].path().join("storage/disks/on-node-2.qcow2").is_file());
    let listed = api1.cli(&["--node", "node-2", "--json", "disk", "list"]);
    assert_eq!(listed.code, 0, "{}", listed.stderr);
    assert!(listed.stdout.contains("on-node-2"), "{}", listed.stdout);
    let nowhere = api1.get("/disks").header("Viv-Node", "api-1").send().unwrap();
    assert_eq!(nowhere.status(), 503);
    let deleted = api1
        .delete("/disks/on-node-2")
        .header("Viv-Node", "node-2")
        .send()
        .unwrap();
    assert_eq!(deleted.status(), 204);

    // Draining the first sandbox's node through API server 2 pauses it and moves it to another
    // node; it resumes there through API server 1 with its files.
    let first_node = client_of(&api1, first);
    let drained = json_of(api2.post(&format!("/nodes/{first_node}/drain")).send().unwrap());
    assert_eq!(drained["node"]["state"], "draining", "{drained}");
    assert_eq!(drained["failed"], json!([]), "{drained}");
    let moved_to = drained["moved"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == first.as_str())
        .unwrap_or_else(|| panic!("{first} was not moved: {drained}"))["node"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(moved_to, first_node);
    let i = names.iter().position(|n| *n == first_node).unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || vms_on(i) == 0),
        "the drained node still runs a VM"
    );
    let listed = json_of(api1.get("/nodes").send().unwrap());
    assert_eq!(node_named(&listed, &first_node)["sandboxes"], 0, "{listed}");
    let resumed = api1
        .post(&format!("/sandboxes/{first}/connect"))
        .json(&json!({ "timeout": 600 }))
        .send()
        .unwrap();
    assert_eq!(resumed.status(), 201, "{}", resumed.text().unwrap_or_default());
    assert_eq!(client_of(&api2, first), moved_to);
    assert_eq!(
        api1.exec(first, json!({ "command": "cat /tmp/id.txt" })).out(),
        first.as_str()
    );
    assert_eq!(
        api2.post(&format!("/nodes/{first_node}/undrain"))
            .send()
            .unwrap()
            .status(),
        200
    );

    // API server 1 killed while a create it forwarded boots: the node finishes it (or nothing
    // is left of it); no sandbox stays half-made and no VM runs without a row.
    let request = api1
        .post("/sandboxes")
        .json(&json!({ "timeout": 600, "coldBoot": true }))
        .timeout(Duration::from_secs(300));
    let creating = std::thread::spawn(move || request.send().map(|r| r.status()));
    let before = vms_on(0) + vms_on(1) + vms_on(2);
    assert!(
        wait_until(Duration::from_secs(120), || vms_on(0) + vms_on(1) + vms_on(2) > before),
        "no VM started for the create"
    );
    api1.stop(libc::SIGKILL);
    assert!(
        creating.join().unwrap().is_err(),
        "the client saw an answer, not a broken connection"
    );
    let mut listed = Value::Null;
    let settled = wait_until(Duration::from_secs(120), || {
        listed = json_of(api2.get("/v2/sandboxes?state=starting,running,paused").send().unwrap());
        listed.as_array().unwrap().iter().all(|s| s["state"] == "running")
    });
    assert!(settled, "a sandbox stayed half-made: {listed}");
    let running = listed.as_array().unwrap().len();
    assert!((2..=3).contains(&running), "{listed}");
    assert_eq!(
        vms_on(0) + vms_on(1) + vms_on(2),
        running,
        "a VM without a running sandbox: {listed}"
    );

    // Everything deleted through the API server that is left; every node ends empty.
    for sandbox in listed.as_array().unwrap() {
        let id = sandbox["sandboxID"].as_str().unwrap();
        assert_eq!(api2.delete(&format!("/sandboxes/{id}")).send().unwrap().status(), 204);
    }
    assert!(wait_until(Duration::from_secs(30), || vms_on(0)
        + vms_on(1)
        + vms_on(2)
        == 0));
    drop(api2);
    drop(api1);
    for (node, dir) in nodes.into_iter().zip(&node_dirs) {
        drop(node);
        crate::fixture::remove_template_memory(dir.path());
    }
}

/// A running VM moves live from one node to another (`{"node": NAME}`): it keeps its id and
/// row, its disk comes along, its guest's counter continues, and every request for it, through
/// the API server, reaches its new node. Stopped, it moves back by copying its disk, and starts
/// there with what it wrote.
#[test]
fn a_running_vm_moves_between_nodes_keeping_its_id() {
    use crate::vm_boot::{booted, create_disk, library_iso};
    use crate::vm_lifecycle::{act, refused};

    let database = viv_test_postgres::fresh_database();
    let dir = |prefix: &str| tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    let (n1_dir, n2_dir, api_dir) = (
        dir("viv-e2e-move-n1-"),
        dir("viv-e2e-move-n2-"),
        dir("viv-e2e-move-api-"),
    );
    let n1 = TestServer::start_on_with(n1_dir.path(), &role_args(&database, "node", "node-1"));
    let n2 = TestServer::start_on_with(n2_dir.path(), &role_args(&database, "node", "node-2"));
    let api = TestServer::start_on_with(api_dir.path(), &role_args(&database, "api", "api-1"));

    // Defined and started through the API server: on node-1 (the first by name), with a disk
    // and the test ISO there; node-2 gets the ISO too (a move needs it on the target).
    let iso = library_iso(&api);
    let added = api
        .put(&format!("/isos/{iso}"))
        .header("Viv-Node", "node-2")
        .body(std::fs::read(crate::vm_console::iso()).unwrap())
        .send()
        .unwrap();
    assert!(added.status().is_success(), "{}", added.text().unwrap_or_default());
    let disk = crate::fixture::unique("movedisk");
    create_disk(&api, &disk, 16 << 20);
    let (id, mut guest) = booted(
        &api,
        "move",
        json!({"memoryMib": 256, "disks": [{"disk": disk}], "cdroms": [{"iso": iso}], "nics": [{}]}),
    );
    assert_eq!(qemu_processes_under(n1_dir.path()).len(), 1);
    guest.run("printf MOVE-MARK | dd of=/dev/vda conv=notrunc 2>/dev/null; sync");
    guest.start_counter();

    let migrate = |body: Value| api.post(&format!("/vms/{id}/migrate")).json(&body).send().unwrap();
    for (body, status, words) in [
        (json!({"node": "node-1"}), 409, "already"),
        (json!({"node": "api-1"}), 409, "takes no VM"),
        (json!({"node": "nowhere"}), 404, "nowhere"),
        (json!({"node": "node-2", "target": "http://127.0.0.1:1"}), 400, "either"),
    ] {
        let (got, message) = refused(migrate(body.clone()));
        assert_eq!(got, status, "{body}: {message}");
        assert!(message.contains(words), "{body}: {message}");
    }

    let before = guest.count();
    // The move, through the CLI (which follows the operation).
    let out = api.cli(&["vm", "migrate", &id, "--to-node", "node-2", "--json"]);
    assert_eq!(out.code, 0, "{out:?}");
    let done: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(done["state"], "succeeded", "{done}");
    let live_move = done["id"].as_str().unwrap().to_owned();
    eprintln!(
        "FIGURE VM moved between nodes (256 MiB guest, 16 MiB disk): total {} ms, downtime {} ms",
        done["migration"]["totalMs"], done["migration"]["downtimeMs"]
    );

    // The same VM (id, name, row), running on node-2 only; its disk moved with it.
    let moved = json_of(api.get(&format!("/vms/{id}")).send().unwrap());
    assert_eq!(moved["state"], "running", "{moved}");
    assert_eq!(moved["id"], id.as_str());
    assert!(wait_until(Duration::from_secs(10), || qemu_processes_under(
        n1_dir.path()
    )
    .is_empty()));
    assert_eq!(qemu_processes_under(n2_dir.path()).len(), 1);
    let disk_on = |node: &str| {
        api.get(&format!("/disks/{disk}"))
            .header("Viv-Node", node)
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!((disk_on("node-1"), disk_on("node-2")), (404, 200));
    let listed = json_of(api.get("/vms").send().unwrap());
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");

    // Its console, through the API server, now reaches node-2: the counter goes on.
    let mut guest = crate::vm_boot::Guest::attach(&api, &id);
    let after = guest.count();
    assert!(after >= before, "the counter went back: {before} then {after}");
    assert!(wait_until(Duration::from_secs(60), || guest.count() > after));
    let mark = guest.run("dd if=/dev/vda bs=9 count=1 2>/dev/null; echo");
    assert!(mark.contains("MOVE-MARK"), "{mark}");

    // Stopped, it moves back by copying: its disk and row go to node-1, where it starts again
    // with what its guest wrote.
    guest.run("printf AFTER-MOVE | dd of=/dev/vda bs=512 seek=8 conv=notrunc 2>/dev/null; sync");
    drop(guest);
    act(&api, &id, "kill", "");
    let out = api.cli(&["vm", "migrate", &id, "--to-node", "node-1", "--json"]);
    assert_eq!(out.code, 0, "{out:?}");
    let done: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(done["state"], "succeeded", "{done}");
    let copy_move = done["id"].as_str().unwrap().to_owned();
    assert_eq!((disk_on("node-1"), disk_on("node-2")), (200, 404));
    // Each move ran on the node it left, which keeps its operation: the API server lists both.
    let ops = json_of(api.get("/operations").send().unwrap());
    let listed: Vec<&str> = ops
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o["id"].as_str())
        .collect();
    assert!(
        listed.contains(&live_move.as_str()) && listed.contains(&copy_move.as_str()),
        "{live_move} and {copy_move} in {ops}"
    );
    assert!(
        !n2_dir.path().join("vms").join(&id).exists(),
        "node-2 kept the VM's files"
    );
    let stopped = json_of(api.get(&format!("/vms/{id}")).send().unwrap());
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    act(&api, &id, "start", "");
    assert_eq!(qemu_processes_under(n1_dir.path()).len(), 1);
    assert!(qemu_processes_under(n2_dir.path()).is_empty());
    let mut guest = crate::vm_boot::Guest::attach(&api, &id);
    guest.wait_for(crate::vm_console::READY);
    let written = guest.run("dd if=/dev/vda bs=512 skip=8 count=1 2>/dev/null | head -c 10; echo");
    assert!(written.contains("AFTER-MOVE"), "{written}");
    drop(guest);
    // A node that already has a disk of that name refuses it, and the VM stays where it is.
    act(&api, &id, "kill", "");
    let clash = api
        .post("/disks")
        .header("Viv-Node", "node-2")
        .json(&json!({ "name": disk, "size": 1 << 20 }))
        .send()
        .unwrap();
    assert_eq!(clash.status(), 201);
    let out = api.cli(&["vm", "migrate", &id, "--to-node", "node-2", "--json"]);
    assert_ne!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("already exists"), "{}", out.stderr);
    assert_eq!(disk_on("node-1"), 200);
    let removed = api
        .delete(&format!("/disks/{disk}"))
        .header("Viv-Node", "node-2")
        .send()
        .unwrap();
    assert_eq!(removed.status(), 204);

    // A disk that is the base of a linked clone does not leave its node; a VM on a linked
    // clone moves, its disk flattened (the base stays for its other clones).
    let thin = crate::fixture::unique("movethin");
    crate::storage::succeeded(
        &api,
        api.post(&format!("/disks/{disk}/clone"))
            .header("Viv-Node", "node-1")
            .json(&json!({ "name": thin, "linked": true }))
            .send()
            .unwrap(),
    );
    let out = api.cli(&["vm", "migrate", &id, "--to-node", "node-2", "--json"]);
    assert_ne!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("linked clones"), "{}", out.stderr);
    let on_thin = crate::vm_lifecycle::define(
        &api,
        &crate::fixture::unique("onthin"),
        json!({ "memoryMib": 128, "disks": [{ "disk": thin }] }),
    );
    let out = api.cli(&["vm", "migrate", &on_thin, "--to-node", "node-2", "--json"]);
    assert_eq!(out.code, 0, "{out:?}");
    let moved_thin = json_of(
        api.get(&format!("/disks/{thin}"))
            .header("Viv-Node", "node-2")
            .send()
            .unwrap(),
    );
    assert_eq!(moved_thin["backing"], Value::Null, "{moved_thin}");
    let download = |name: &str, node: &str| {
        let bytes = api
            .get(&format!("/disks/{name}/download"))
            .header("Viv-Node", node)
            .send()
            .unwrap()
            .bytes()
            .unwrap();
        let path = n2_dir.path().join(format!("{name}.{node}.download"));
        std::fs::write(&path, bytes).unwrap();
        path
    };
    let same = std::process::Command::new("qemu-img")
        .args(["compare", "-q"])
        .arg(download(&disk, "node-1"))
        .arg(download(&thin, "node-2"))
        .status()
        .unwrap();
    assert!(same.success(), "the moved clone's content differs from its base's");
    assert_eq!(
        api.delete(&format!("/vms/{on_thin}?disks=delete"))
            .send()
            .unwrap()
            .status(),
        204
    );

    assert_eq!(
        api.delete(&format!("/vms/{id}?disks=delete")).send().unwrap().status(),
        204
    );
    assert_eq!(disk_on("node-1"), 404);
    drop(api);
    drop(n2);
    drop(n1);
}
