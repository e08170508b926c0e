//! Two servers on one PostgreSQL database: a cluster of two nodes, each with its own data
//! directory, address and VMs. Creates are placed by free memory, any server answers for any
//! sandbox (API, files, host-name traffic, WebSockets), a node killed with `kill -9` is marked
//! down and its running sandboxes reported lost while its paused ones resume from their copies
//! elsewhere, a drained cluster places nothing, and paused sandboxes move between nodes (a
//! resume or a drain carries their snapshot over).

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::fixture::{qemu_processes_under, wait_until, TestServer};
use crate::vm_console::{ws, Auth};

fn node_args<'a>(database: &'a str, name: &'a str) -> Vec<&'a str> {
    let mut args = vec![
        "--database",
        database,
        "--node-name",
        name,
        "--heartbeat",
        "1s",
        "--node-down-after",
        "5s",
    ];
    // A copies every pause to another node; on B a sandbox asks for it itself.
    if name == "node-a" {
        args.extend(["--pause-replicas", "1"]);
    }
    args
}

pub(crate) fn json_of(response: reqwest::blocking::Response) -> Value {
    let status = response.status();
    let body: Value = response.json().unwrap();
    assert!(status.is_success(), "{status}: {body}");
    body
}

pub(crate) fn node_named<'a>(nodes: &'a Value, name: &str) -> &'a Value {
    nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == name)
        .unwrap_or_else(|| panic!("no node {name} in {nodes}"))
}

/// Starts a web server on port 8000 of sandbox `id` serving `text`, and checks that `server`
/// reaches it by host name (`8000-ID.localhost`).
pub(crate) fn serves_by_host_name(server: &TestServer, id: &str, text: &str) {
    server.exec(
        id,
        json!({ "command": format!("mkdir -p /tmp/www && echo {text} > /tmp/www/index.html && \
                                    (setsid nohup python3 -m http.server 8000 --directory /tmp/www >/dev/null 2>&1 &)") }),
    );
    let mut page = String::new();
    let served = wait_until(Duration::from_secs(60), || {
        let response = server
            .http
            .get(format!("{}/index.html", server.url))
            .header("Host", format!("8000-{id}.localhost"))
            .send();
        page = response.map(|r| r.text().unwrap_or_default()).unwrap_or_default();
        page == format!("{text}\n")
    });
    assert!(
        served,
        "the service in sandbox {id} answered {page:?} through {}",
        server.url
    );
}

/// Everything a terminal WebSocket for `cmd` on `server` prints before it closes.
pub(crate) fn terminal_output(server: &TestServer, id: &str, cmd: &str) -> String {
    let path = format!("/sandboxes/{id}/terminal?cmd={}", cmd.replace(' ', "%20"));
    let (mut socket, _) = ws(server, &path, Auth::Header, &["viv-terminal.v1"]).unwrap_or_else(|e| panic!("{e:?}"));
    let started = Instant::now();
    let mut output = Vec::new();
    while started.elapsed() < Duration::from_secs(120) {
        match socket.read() {
            Ok(Message::Binary(bytes)) => output.extend_from_slice(&bytes),
            Ok(Message::Close(_)) => break,
            Ok(_) => {}
            Err(tokio_tungstenite::tungstenite::Error::Io(e))
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&output).into_owned()
}

/// On a failure while node B's server is dead, a server started on B's data directory (its
/// own networking names derive from it) stops what the killed one left: its VM, its network
/// namespace and rules. Otherwise they would outlive the test and its temporary directory.
struct CleanUpNode<'a> {
    dir: &'a std::path::Path,
    args: Vec<&'a str>,
    /// Set while the node's server is dead.
    armed: std::cell::Cell<bool>,
}

impl Drop for CleanUpNode<'_> {
    fn drop(&mut self) {
        if self.armed.get() && std::thread::panicking() && !qemu_processes_under(self.dir).is_empty() {
            let _ = std::panic::catch_unwind(|| drop(TestServer::start_on_with(self.dir, &self.args)));
        }
    }
}

#[test]
fn two_nodes_on_one_database_place_route_and_report_a_dead_node() {
    let database = viv_test_postgres::fresh_database();
    let dir = |prefix: &str| tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    let (dir_a, dir_b) = (dir("viv-e2e-node-a-"), dir("viv-e2e-node-b-"));
    let a = TestServer::start_on_with(dir_a.path(), &node_args(&database, "node-a"));
    let b = TestServer::start_on_with(dir_b.path(), &node_args(&database, "node-b"));
    let clean_up = CleanUpNode {
        dir: dir_b.path(),
        args: node_args(&database, "node-b"),
        armed: std::cell::Cell::new(false),
    };

    let snapshot_dirs = |dir: &std::path::Path| {
        std::fs::read_dir(dir.join("snapshots"))
            .map(|d| {
                d.flatten()
                    .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                    .count()
            })
            .unwrap_or(0)
    };

    // Both servers see both nodes up; each knows which one it is.
    let nodes = json_of(b.get("/nodes").send().unwrap());
    assert_eq!(nodes.as_array().unwrap().len(), 2, "{nodes}");
    for name in ["node-a", "node-b"] {
        assert_eq!(node_named(&nodes, name)["state"], "up", "{nodes}");
    }
    assert_eq!(node_named(&nodes, "node-b")["local"], true);
    assert_eq!(node_named(&nodes, "node-a")["local"], false);
    assert_eq!(node_named(&nodes, "node-a")["url"], a.url);
    let listed = b.cli(&["--json", "node", "list"]);
    assert_eq!(listed.code, 0, "{}", listed.stderr);
    let listed: Value = serde_json::from_str(&listed.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");

    // A's event stream shows what happens on every node.
    let stream = a.get("/events?kind=sandbox,node").send().unwrap();
    assert_eq!(stream.status(), 200);
    let (events_tx, events) = std::sync::mpsc::channel::<Value>();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stream).lines().map_while(Result::ok) {
            if let Some(data) = line.strip_prefix("data:") {
                if let Ok(event) = serde_json::from_str(data.trim()) {
                    if events_tx.send(event).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let wait_for_event = |what: &dyn Fn(&Value) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match events.recv_timeout(left) {
                Ok(event) if what(&event) => return event,
                Ok(event) => seen.push(event),
                Err(_) => break,
            }
        }
        panic!("no such event; saw {seen:?}");
    };

    // Two creates through A: the first stays on A (equal room, no hop), the second goes to B,
    // which has more memory free.
    let on_a = a.create(json!({ "timeout": 600, "metadata": { "n": "1" } }));
    let on_b = a.create(json!({ "timeout": 600, "metadata": { "n": "2" } }));
    let client_of = |server: &TestServer, id: &str| {
        json_of(server.get(&format!("/sandboxes/{id}")).send().unwrap())["clientID"].clone()
    };
    assert_eq!(client_of(&a, &on_a), "node-a");
    assert_eq!(client_of(&a, &on_b), "node-b");
    assert_eq!(client_of(&b, &on_a), "node-a");
    assert_eq!(qemu_processes_under(dir_a.path()).len(), 1);
    assert_eq!(qemu_processes_under(dir_b.path()).len(), 1);
    // B's sandbox started on B; A's clients heard it from B over the database.
    let started = wait_for_event(&|e| e["id"] == on_b.as_str() && e["state"] == "running");
    assert_eq!(started["node"], "node-b", "{started}");
    assert_eq!(started["kind"], "sandbox");
    let nodes = json_of(a.get("/nodes").send().unwrap());
    assert_eq!(node_named(&nodes, "node-a")["sandboxes"], 1, "{nodes}");
    assert_eq!(node_named(&nodes, "node-b")["sandboxes"], 1, "{nodes}");

    // Either server answers for either sandbox: exec, files, lists.
    for (server, id, node) in [(&b, &on_a, "node-a"), (&a, &on_b, "node-b")] {
        assert_eq!(server.exec(id, json!({ "command": "echo $((6*7))" })).out(), "42\n");
        let put = server
            .put(&format!("/sandboxes/{id}/files?path=/tmp/where.txt"))
            .body(node)
            .send()
            .unwrap();
        assert!(put.status().is_success(), "{}", put.text().unwrap_or_default());
    }
    let read = a
        .get(&format!("/sandboxes/{on_a}/files?path=/tmp/where.txt"))
        .send()
        .unwrap();
    assert_eq!(read.text().unwrap(), "node-a");
    let read = b
        .get(&format!("/sandboxes/{on_b}/files?path=/tmp/where.txt"))
        .send()
        .unwrap();
    assert_eq!(read.text().unwrap(), "node-b");
    for server in [&a, &b] {
        let all = json_of(server.get("/v2/sandboxes").send().unwrap());
        assert_eq!(all.as_array().unwrap().len(), 2, "{all}");
    }

    // Host-name traffic to a sandbox's port and a WebSocket, through the server that does not
    // hold it.
    serves_by_host_name(&b, &on_a, "served-by-a");
    let output = terminal_output(&b, &on_a, "echo terminal $((6*7)); cat /tmp/where.txt");
    assert!(
        output.contains("terminal 42") && output.contains("node-a"),
        "{output:?}"
    );

    // Pause and resume through the other server: the sandbox stays on its node with its files.
    assert_eq!(
        b.post(&format!("/sandboxes/{on_a}/pause")).send().unwrap().status(),
        204
    );
    assert!(wait_until(Duration::from_secs(30), || qemu_processes_under(
        dir_a.path()
    )
    .is_empty()));
    let resumed = b
        .post(&format!("/sandboxes/{on_a}/connect"))
        .json(&json!({ "timeout": 600 }))
        .send()
        .unwrap();
    assert_eq!(resumed.status(), 201, "{}", resumed.text().unwrap_or_default());
    assert_eq!(
        b.exec(&on_a, json!({ "command": "cat /tmp/where.txt" })).out(),
        "node-a"
    );

    // A sandbox paused on B is copied to A before the pause answers (it asks for one copy; B's
    // default is none).
    let paused_b = b.create(json!({ "timeout": 600, "pauseReplicas": 1 }));
    assert_eq!(client_of(&b, &paused_b), "node-b");
    b.exec(
        &paused_b,
        json!({ "command": "echo kept-on-b > /tmp/kept.txt && sync" }),
    );
    assert_eq!(
        a.post(&format!("/sandboxes/{paused_b}/pause")).send().unwrap().status(),
        204
    );
    assert_eq!(snapshot_dirs(dir_a.path()), 2, "A holds on_a's snapshot and the copy");
    // B dropped its copy of on_a's snapshot when on_a resumed on A.
    assert!(wait_until(Duration::from_secs(10), || snapshot_dirs(dir_b.path()) == 1));

    // kill -9 of node B: A marks it down within the down time and reports its sandbox lost.
    let b_url = b.url.clone();
    b.stop(libc::SIGKILL);
    clean_up.armed.set(true);
    let killed = Instant::now();
    let mut nodes = Value::Null;
    let down = wait_until(Duration::from_secs(30), || {
        nodes = json_of(a.get("/nodes").send().unwrap());
        node_named(&nodes, "node-b")["state"] == "down"
    });
    assert!(down, "{nodes}");
    let detected = killed.elapsed();
    let event = wait_for_event(&|e| e["kind"] == "node" && e["name"] == "node-b" && e["state"] == "down");
    assert_eq!(event["node"], "node-a", "A marked it: {event}");
    let event = wait_for_event(&|e| e["id"] == on_b.as_str() && e["state"] == "failed");
    assert!(
        event["message"].as_str().unwrap_or_default().contains("node-b"),
        "{event}"
    );
    assert!(
        detected < Duration::from_secs(30),
        "marked down {detected:?} after the kill"
    );
    // Not before its down time: from its last heartbeat to being marked down took at least 5 s.
    let time_of = |field: &str| {
        let text = node_named(&nodes, "node-b")[field].as_str().unwrap().to_owned();
        humantime::parse_rfc3339_weak(&text).unwrap()
    };
    let silent = time_of("downSince").duration_since(time_of("heartbeatAt")).unwrap();
    assert!(
        silent >= Duration::from_secs(5),
        "marked down {silent:?} after its last heartbeat"
    );
    // E2B-style, a lost sandbox is gone, and says why.
    let lost = a.get(&format!("/sandboxes/{on_b}")).send().unwrap();
    assert_eq!(lost.status(), 404);
    let lost: Value = lost.json().unwrap();
    let reason = lost["message"].as_str().unwrap_or_default();
    assert!(reason.contains("node-b") && reason.contains("heartbeat"), "{lost}");
    // It is answered from its row, not by the dead node.
    let exec = a
        .post(&format!("/sandboxes/{on_b}/exec"))
        .json(&json!({ "command": "true" }))
        .send()
        .unwrap();
    // (502 is what the SDKs read as "not running".)
    assert_eq!(exec.status(), 502);
    let message = exec.json::<Value>().unwrap()["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(message.contains(&on_b), "{message}");
    // The sandbox paused on B resumes on A from A's copy, its files there.
    let resumed = a
        .post(&format!("/sandboxes/{paused_b}/connect"))
        .json(&json!({ "timeout": 600 }))
        .send()
        .unwrap();
    assert_eq!(resumed.status(), 201, "{}", resumed.text().unwrap_or_default());
    assert_eq!(client_of(&a, &paused_b), "node-a");
    assert_eq!(
        a.exec(&paused_b, json!({ "command": "cat /tmp/kept.txt" })).out(),
        "kept-on-b\n"
    );
    assert_eq!(
        a.delete(&format!("/sandboxes/{paused_b}")).send().unwrap().status(),
        204
    );
    // A dead node cannot be drained; creates go to the node that is left.
    let drain = a.post("/nodes/node-b/drain").send().unwrap();
    assert_eq!(drain.status(), 409);
    let again = a.create(json!({ "timeout": 600 }));
    assert_eq!(client_of(&a, &again), "node-a");

    // Draining A pauses its sandboxes; with B down, nothing can be placed and they cannot move.
    let drained = a.cli(&["--json", "node", "drain", "node-a"]);
    assert_eq!(drained.code, 1, "{}", drained.stderr);
    let drained: Value = serde_json::from_str(&drained.stdout).unwrap();
    assert_eq!(drained["node"]["state"], "draining", "{drained}");
    let sorted = |ids: Vec<String>| {
        let mut ids = ids;
        ids.sort();
        ids
    };
    let paused: Vec<String> = serde_json::from_value(drained["paused"].clone()).unwrap();
    let expected = sorted(vec![on_a.clone(), again.clone()]);
    assert_eq!(sorted(paused), expected);
    let unmoved: Vec<String> = drained["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            assert!(f["error"].as_str().unwrap().contains("no node can take"), "{f}");
            f["id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(sorted(unmoved), expected);
    assert!(wait_until(Duration::from_secs(30), || qemu_processes_under(
        dir_a.path()
    )
    .is_empty()));
    let refused = a.post("/sandboxes").json(&json!({})).send().unwrap();
    assert_eq!(refused.status(), 429);
    let body: Value = refused.json().unwrap();
    assert!(body["message"].as_str().unwrap().contains("no node"), "{body}");

    // B's server comes back on its data directory: the node is up again, and the VM of its lost
    // sandbox (which outlived the kill) is gone.
    drop(b);
    let b = TestServer::start_on_with(dir_b.path(), &node_args(&database, "node-b"));
    clean_up.armed.set(false);
    let nodes = json_of(a.get("/nodes").send().unwrap());
    assert_eq!(node_named(&nodes, "node-b")["state"], "up", "{nodes}");
    assert_ne!(b.url, b_url, "the restarted server listens elsewhere");
    assert_eq!(node_named(&nodes, "node-b")["url"], b.url, "{nodes}");
    assert!(wait_until(Duration::from_secs(30), || qemu_processes_under(
        dir_b.path()
    )
    .is_empty()));

    // A sandbox paused on A (draining) resumes on B: B fetches its snapshot from A, and its
    // files and processes (the web server it ran) are there.
    let resumed = a
        .post(&format!("/sandboxes/{on_a}/connect"))
        .json(&json!({ "timeout": 600 }))
        .send()
        .unwrap();
    assert_eq!(resumed.status(), 201, "{}", resumed.text().unwrap_or_default());
    assert_eq!(client_of(&a, &on_a), "node-b");
    assert_eq!(qemu_processes_under(dir_b.path()).len(), 1);
    assert_eq!(
        a.exec(&on_a, json!({ "command": "cat /tmp/where.txt" })).out(),
        "node-a"
    );
    let page = a
        .http
        .get(format!("{}/index.html", a.url))
        .header("Host", format!("8000-{on_a}.localhost"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert_eq!(page, "served-by-a\n");
    // A drain moves what is still paused on A, with its files, to B.
    let drained = json_of(a.post("/nodes/node-a/drain").send().unwrap());
    assert_eq!(drained["paused"], json!([]), "{drained}");
    assert_eq!(drained["failed"], json!([]), "{drained}");
    assert_eq!(
        drained["moved"],
        json!([{ "id": again, "node": "node-b" }]),
        "{drained}"
    );
    let resumed = a
        .post(&format!("/sandboxes/{again}/connect"))
        .json(&json!({ "timeout": 600 }))
        .send()
        .unwrap();
    assert_eq!(resumed.status(), 201, "{}", resumed.text().unwrap_or_default());
    assert_eq!(client_of(&b, &again), "node-b");
    assert_eq!(a.exec(&again, json!({ "command": "echo $((6*7))" })).out(), "42\n");
    // A keeps no snapshot: on_a's first pause was folded into its second (the drain's), which
    // B adopted with again's; B counts the two.
    assert_eq!((snapshot_dirs(dir_a.path()), snapshot_dirs(dir_b.path())), (0, 2));
    let metrics = b.get("/metrics").send().unwrap().text().unwrap();
    assert!(metrics.contains("vivarium_sandboxes_moved_total 2"), "{metrics}");
    // A removed node must be down first.
    let removal = a.delete("/nodes/node-b").send().unwrap();
    assert_eq!(removal.status(), 409);

    // A template built on A starts on B: B fetches its layers from A over the node API (which
    // takes the cluster's secret, not an API key).
    let build = a
        .post("/templates")
        .json(&json!({ "name": "built-on-a", "spec": "FROM base\nRUN echo made-on-a > /etc/made-on\n" }))
        .send()
        .unwrap();
    assert_eq!(build.status(), 200);
    let events = build.text().unwrap();
    assert!(
        events.lines().last().unwrap_or_default().contains("\"done\""),
        "{events}"
    );
    let layers = |dir: &std::path::Path| {
        std::fs::read_dir(dir.join("layers"))
            .map(|d| {
                d.flatten()
                    .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                    .count()
            })
            .unwrap_or(0)
    };
    assert_eq!(layers(dir_b.path()), 0);
    let key = std::fs::read_dir(dir_a.path().join("layers"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    let key = key.file_stem().unwrap().to_string_lossy().into_owned();
    let internal = format!("/internal/layers/{key}");
    assert_eq!(
        a.get(&internal).send().unwrap().status(),
        401,
        "an API key is not the cluster's secret"
    );
    let on_b_from_a = a.create(json!({ "templateID": "built-on-a", "timeout": 600 }));
    assert_eq!(client_of(&a, &on_b_from_a), "node-b");
    assert_eq!(
        a.exec(&on_b_from_a, json!({ "command": "cat /etc/made-on" })).out(),
        "made-on-a\n"
    );
    assert_eq!(layers(dir_b.path()), layers(dir_a.path()));
    // A volume's files live on one node: made through A (drained) it lands on B, a sandbox
    // mounting it starts there, and its content API (the volume's token) answers through A.
    let volume = json_of(
        a.post("/volumes")
            .json(&json!({ "name": "cluster-vol" }))
            .send()
            .unwrap(),
    );
    let volume_id = volume["volumeID"].as_str().unwrap().to_owned();
    let volume_token = volume["token"].as_str().unwrap().to_owned();
    assert!(dir_b.path().join("volumes").join(&volume_id).is_dir());
    let mounting = a.create(json!({
        "timeout": 600,
        "volumeMounts": [{ "name": "cluster-vol", "path": "/mnt/vol" }],
    }));
    assert_eq!(client_of(&a, &mounting), "node-b");
    a.exec(&mounting, json!({ "command": "echo kept > /mnt/vol/note.txt" }));
    let note = a
        .http
        .get(format!("{}/volumecontent/{volume_id}/file?path=/note.txt", a.url))
        .bearer_auth(&volume_token)
        .send()
        .unwrap();
    assert_eq!(note.status(), 200);
    assert_eq!(note.text().unwrap(), "kept\n");
    assert_eq!(
        a.delete(&format!("/sandboxes/{mounting}")).send().unwrap().status(),
        204
    );
    assert_eq!(a.delete(&format!("/volumes/{volume_id}")).send().unwrap().status(), 204);
    assert!(!dir_b.path().join("volumes").join(&volume_id).exists());

    let mut nodes = Value::Null;
    let reported = wait_until(Duration::from_secs(20), || {
        nodes = json_of(a.get("/nodes").send().unwrap());
        let templates = &node_named(&nodes, "node-b")["capacity"]["templates"];
        templates.as_array().is_some_and(|t| t.contains(&json!("built-on-a")))
    });
    assert!(reported, "{nodes}");
    assert_eq!(json_of(a.post("/nodes/node-a/undrain").send().unwrap())["state"], "up");

    for id in [&on_a, &on_b, &again, &on_b_from_a] {
        assert_eq!(a.delete(&format!("/sandboxes/{id}")).send().unwrap().status(), 204);
    }
    // The template deleted through A goes from B too (its layers, at B's next heartbeat).
    assert!(layers(dir_b.path()) > 0);
    assert_eq!(a.delete("/templates/built-on-a").send().unwrap().status(), 204);
    assert!(
        wait_until(Duration::from_secs(20), || layers(dir_b.path()) == 0
            && layers(dir_a.path()) == 0),
        "layers of the deleted template stayed: A {} B {}",
        layers(dir_a.path()),
        layers(dir_b.path())
    );
    drop(a);
    drop(b);
    crate::fixture::remove_template_memory(dir_a.path());
    crate::fixture::remove_template_memory(dir_b.path());
}
