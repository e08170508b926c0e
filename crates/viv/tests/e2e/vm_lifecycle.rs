//! The VM manager's running VMs through the REST API, the CLI and the event stream: start,
//! pause, resume, stop (ACPI, then forced), kill and restart; crashes and the restart policy;
//! autostart order after a server restart; the errors a person meets.
//!
//! These VMs have no disk, so their firmware finds nothing to boot and the guest never answers
//! the power button: what is tested here is the state machine around QEMU. Booting real guests
//! is `vm_boot.rs`'s.

use std::io::{BufRead as _, BufReader};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::fixture::{unique, wait_until, TestServer};
use crate::vm_boot::vm;

/// The server's event stream, read on a thread: events arrive on the channel as JSON.
pub struct EventStream {
    rx: mpsc::Receiver<(String, Value)>,
    /// Events read while looking for another VM's, in order.
    unread: std::cell::RefCell<std::collections::VecDeque<(String, Value)>>,
}

impl EventStream {
    /// Subscribes to `GET /events{query}` and waits until the server answered.
    pub fn open(server: &TestServer, query: &str) -> Self {
        let response = reqwest::blocking::Client::new()
            .get(format!("{}/events{query}", server.url))
            .header("X-API-Key", &server.key)
            .send()
            .unwrap();
        assert_eq!(response.status(), 200);
        assert!(response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut event = String::new();
            for line in BufReader::new(response).lines() {
                let Ok(line) = line else { return };
                if let Some(name) = line.strip_prefix("event:") {
                    event = name.trim().to_owned();
                } else if let Some(data) = line.strip_prefix("data:") {
                    let value: Value = serde_json::from_str(data.trim()).unwrap_or(Value::Null);
                    if tx.send((event.clone(), value)).is_err() {
                        return;
                    }
                }
            }
        });
        Self {
            rx,
            unread: Default::default(),
        }
    }

    /// The states VM `id` goes through until it reaches `last` (within `limit`).
    pub fn states_of(&self, id: &str, last: &str, limit: Duration) -> Vec<String> {
        let deadline = std::time::Instant::now() + limit;
        let mut states = Vec::new();
        let mut skipped = Vec::new();
        let mut earlier: Vec<(String, Value)> = self.unread.borrow_mut().drain(..).collect();
        earlier.reverse();
        loop {
            let next = match earlier.pop() {
                Some(event) => event,
                None => {
                    let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) else {
                        break;
                    };
                    let Ok(event) = self.rx.recv_timeout(left) else { break };
                    event
                }
            };
            let (kind, event) = next;
            if event["id"] != id {
                skipped.push((kind, event));
                continue;
            }
            assert_eq!(kind, event["kind"].as_str().unwrap(), "{event}");
            let state = event["state"].as_str().unwrap().to_owned();
            states.push(state.clone());
            if state == last {
                let mut unread = self.unread.borrow_mut();
                unread.extend(skipped);
                unread.extend(earlier.into_iter().rev());
                return states;
            }
        }
        panic!("VM {id} did not reach {last} within {limit:?}; states seen: {states:?}");
    }
}

/// Creates a VM from `body` (a name is added) and returns its id.
pub fn define(server: &TestServer, name: &str, mut body: Value) -> String {
    body["name"] = json!(name);
    let created = server.post("/vms").json(&body).send().unwrap();
    assert_eq!(created.status(), 201, "{}", created.text().unwrap());
    created.json::<Value>().unwrap()["id"].as_str().unwrap().to_owned()
}

/// `POST /vms/{id}/{action}{query}`, asserting 200; the VM after it.
pub fn act(server: &TestServer, id: &str, action: &str, query: &str) -> Value {
    let response = server.post(&format!("/vms/{id}/{action}{query}")).send().unwrap();
    let status = response.status();
    let body: Value = response.json().unwrap();
    assert_eq!(status, 200, "{action} {id}: {body}");
    body
}

/// The status and message of a refused request.
pub fn refused(response: reqwest::blocking::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().unwrap();
    (status, body["message"].as_str().unwrap_or_default().to_owned())
}

fn process_exists(pid: u64) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn a_vm_starts_pauses_resumes_stops_and_is_killed_with_every_transition_on_the_event_stream() {
    let server = TestServer::shared();
    let events = EventStream::open(server, "?kind=vm");
    let id = define(server, &unique("life"), json!({"memoryMib": 128, "stopTimeoutSecs": 2}));

    let running = act(server, &id, "start", "");
    assert_eq!(running["state"], "running");
    let pid = running["pid"].as_u64().expect("a running VM reports its QEMU's pid");
    assert!(process_exists(pid));
    assert_eq!(running["starts"], 1);
    assert_eq!(
        events.states_of(&id, "running", Duration::from_secs(60)),
        ["starting", "running"]
    );

    assert_eq!(act(server, &id, "pause", "")["state"], "paused");
    assert_eq!(vm(server, &id)["state"], "paused");
    assert_eq!(act(server, &id, "resume", "")["state"], "running");
    assert_eq!(
        events.states_of(&id, "running", Duration::from_secs(30)),
        ["paused", "running"]
    );

    // No OS answers the power button: the stop forces it off after the 2 s timeout.
    let started = std::time::Instant::now();
    let stopped = act(server, &id, "stop", "");
    assert!(started.elapsed() >= Duration::from_secs(2), "{:?}", started.elapsed());
    assert_eq!(stopped["state"], "stopped");
    assert!(stopped.get("pid").is_none(), "{stopped}");
    let why = stopped["lastExit"].as_str().unwrap();
    assert!(why.contains("forced off") && why.contains("2 s"), "{why}");
    assert!(wait_until(Duration::from_secs(10), || !process_exists(pid)));
    assert_eq!(
        events.states_of(&id, "stopped", Duration::from_secs(30)),
        ["stopping", "stopped"]
    );

    // A restart of a stopped VM starts it; kill pulls the plug at once.
    let restarted = act(server, &id, "restart", "");
    assert_eq!(
        (restarted["state"].as_str(), restarted["starts"].as_u64()),
        (Some("running"), Some(2))
    );
    let killed = act(server, &id, "kill", "");
    assert_eq!(
        (killed["state"].as_str(), killed["lastExit"].as_str()),
        (Some("stopped"), Some("killed"))
    );
    assert_eq!(
        events.states_of(&id, "stopped", Duration::from_secs(30)),
        ["starting", "running", "stopped"]
    );
    // A running VM restarted with --force comes back with a new QEMU.
    let first = act(server, &id, "start", "")["pid"].as_u64().unwrap();
    let again = act(server, &id, "restart", "?force=true");
    assert_eq!(again["state"], "running");
    assert_ne!(again["pid"].as_u64().unwrap(), first);
    assert!(wait_until(Duration::from_secs(10), || !process_exists(first)));
    act(server, &id, "kill", "");
    assert_eq!(server.delete(&format!("/vms/{id}")).send().unwrap().status(), 204);
}

#[test]
fn the_cli_drives_a_vm_and_follows_its_events() {
    let server = TestServer::shared();
    let name = unique("cli");
    let created = server.cli(&["vm", "create", &name, "--memory", "128", "--stop-timeout", "1"]);
    assert!(created.code == 0, "{}", created.stderr);
    let start = server.cli(&["vm", "start", &name]);
    assert!(start.code == 0, "{}", start.stderr);
    assert_eq!(start.stdout.trim(), format!("{name} running"));
    let list = server.cli(&["vm", "list"]);
    let line = list.stdout.lines().find(|l| l.contains(&name)).unwrap().to_owned();
    assert!(line.contains("running"), "{line}");
    let stop = server.cli(&["vm", "stop", &name]);
    assert!(stop.code == 0, "{}", stop.stderr);
    assert!(
        stop.stdout.starts_with(&format!("{name} stopped: forced off")),
        "{}",
        stop.stdout
    );
    let json: Value = serde_json::from_str(&server.cli(&["--json", "vm", "get", &name]).stdout).unwrap();
    assert_eq!(json["state"], "stopped");
    let gone = server.cli(&["vm", "kill", &name]);
    assert!(gone.code != 0);
    assert!(gone.stderr.contains("not running"), "{}", gone.stderr);
    assert!(server.cli(&["vm", "delete", &name]).code == 0);
}

#[test]
fn a_crashed_vm_restarts_only_with_the_on_failure_policy() {
    let server = TestServer::shared();
    let events = EventStream::open(server, "?kind=vm");
    let stays = define(server, &unique("crash-never"), json!({"memoryMib": 128}));
    let comes_back = define(
        server,
        &unique("crash-restart"),
        json!({"memoryMib": 128, "restartPolicy": "on-failure"}),
    );
    let mut pids = Vec::new();
    for id in [&stays, &comes_back] {
        let pid = act(server, id, "start", "")["pid"].as_u64().unwrap();
        // SAFETY: kill with plain integers; the pid is the VM's QEMU, just reported.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        pids.push(pid);
    }
    let seen = events.states_of(&stays, "crashed", Duration::from_secs(60));
    assert_eq!(seen, ["starting", "running", "crashed"]);
    let crashed = vm(server, &stays);
    assert!(crashed["lastExit"].as_str().unwrap().contains("SIGKILL"), "{crashed}");
    let seen = events.states_of(&comes_back, "crashed", Duration::from_secs(60));
    assert_eq!(seen, ["starting", "running", "crashed"]);
    assert_eq!(
        events.states_of(&comes_back, "running", Duration::from_secs(60)),
        ["starting", "running"],
        "restarted by its policy"
    );
    let back = vm(server, &comes_back);
    assert_eq!(back["starts"], 2);
    assert_ne!(back["pid"].as_u64().unwrap(), pids[1]);
    assert_eq!(vm(server, &stays)["state"], "crashed", "policy never: it stays crashed");
    act(server, &comes_back, "kill", "");
    for id in [&stays, &comes_back] {
        assert_eq!(server.delete(&format!("/vms/{id}")).send().unwrap().status(), 204);
    }
}

#[test]
fn operations_that_do_not_fit_the_state_are_refused_with_the_state() {
    let server = TestServer::shared();
    let name = unique("states");
    let id = define(server, &name, json!({"memoryMib": 128}));
    for action in ["stop", "kill", "pause", "resume"] {
        let (status, message) = refused(server.post(&format!("/vms/{id}/{action}")).send().unwrap());
        assert_eq!(status, 409, "{action}: {message}");
        assert!(message.contains("defined"), "{action}: {message}");
    }
    act(server, &id, "start", "");
    let (status, message) = refused(server.post(&format!("/vms/{id}/start")).send().unwrap());
    assert_eq!((status, message.contains("already running")), (409, true), "{message}");
    let (status, message) = refused(server.post(&format!("/vms/{id}/resume")).send().unwrap());
    assert_eq!((status, message.contains("not paused")), (409, true), "{message}");
    let (status, message) = refused(server.delete(&format!("/vms/{id}")).send().unwrap());
    assert_eq!((status, message.contains("stop or kill it")), (409, true), "{message}");
    let (status, message) = refused(server.post(&format!("/vms/{id}/stop?timeoutSecs=0")).send().unwrap());
    assert_eq!((status, message.contains("timeoutSecs")), (400, true), "{message}");
    let (status, _) = refused(server.post(&format!("/vms/{id}/stop?forcefully=1")).send().unwrap());
    assert_eq!(status, 400, "an unknown option is refused");
    // A running VM takes some edits at once and the rest at its next start.
    let edit: Value = server
        .patch(&format!("/vms/{id}"))
        .json(&json!({"memoryMib": 160, "description": "now"}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(edit["appliedNow"], json!(["description"]));
    assert_eq!(edit["atNextStart"], json!(["memoryMib"]));
    act(server, &id, "kill", "");
    let started = act(server, &id, "start", "");
    assert_eq!(
        started["definition"]["memoryMib"], 160,
        "the pending definition took effect"
    );
    assert!(started.get("pendingDefinition").is_none(), "{started}");
    act(server, &id, "kill", "");
    for action in ["start", "stop", "restart", "pause", "resume", "kill"] {
        let (status, message) = refused(server.post(&format!("/vms/no-such-vm/{action}")).send().unwrap());
        assert_eq!(
            (status, message.contains("no-such-vm")),
            (404, true),
            "{action}: {message}"
        );
    }
    let (status, message) = refused(server.get("/events?kind=vms").send().unwrap());
    assert_eq!(
        (status, message.contains("unknown event kind")),
        (400, true),
        "{message}"
    );
    assert_eq!(server.delete(&format!("/vms/{id}")).send().unwrap().status(), 204);
}

#[test]
fn autostart_starts_vms_in_their_order_with_their_delays_after_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_on(dir.path(), None);
    let second = define(
        &server,
        "second",
        json!({"memoryMib": 128, "autostart": {"enabled": true, "order": 2}}),
    );
    let first = define(
        &server,
        "first",
        json!({"memoryMib": 128, "autostart": {"enabled": true, "order": 1, "delaySecs": 2}}),
    );
    let manual = define(&server, "manual", json!({"memoryMib": 128}));
    assert_eq!(
        vm(&server, &first)["state"],
        "defined",
        "autostart waits for a server start"
    );
    // Stopping with --on-shutdown kill (the fixture's) stops every VM.
    act(&server, &manual, "start", "");
    server.stop(libc::SIGTERM);
    drop(server);
    let server = TestServer::start_on(dir.path(), None);
    assert_eq!(vm(&server, &manual)["state"], "stopped");
    assert!(wait_until(Duration::from_secs(60), || {
        vm(&server, &second)["state"] == "running"
    }));
    let (a, b) = (vm(&server, &first), vm(&server, &second));
    assert_eq!(a["state"], "running");
    let at = |v: &Value| humantime::parse_rfc3339(v["startedAt"].as_str().unwrap()).unwrap();
    let gap = at(&b).duration_since(at(&a)).expect("order 1 starts before order 2");
    assert!(gap >= Duration::from_secs(1), "the first VM's 2 s delay: {gap:?}");
    assert_eq!(vm(&server, &manual)["state"], "stopped", "not marked autostart");
    for id in [&first, &second] {
        act(&server, id, "kill", "");
    }
}

#[test]
fn the_cli_clones_vms_and_names_what_blocks_snapshots_and_media() {
    let server = TestServer::shared();
    let name = unique("tmpl");
    let created = server.cli(&[
        "vm", "create", &name, "--memory", "128", "--nics", "1", "--cdrom", "empty",
    ]);
    assert_eq!(created.code, 0, "{}", created.stderr);
    let copy = unique("copy");
    let cloned = server.cli(&["vm", "clone", &name, &copy]);
    assert_eq!(cloned.code, 0, "{}", cloned.stderr);
    let get = |vm: &str| -> Value { serde_json::from_str(&server.cli(&["--json", "vm", "get", vm]).stdout).unwrap() };
    let (a, b) = (get(&name), get(&copy));
    assert_ne!(a["definition"]["nics"][0]["mac"], b["definition"]["nics"][0]["mac"]);
    assert_ne!(a["uuid"], b["uuid"]);
    assert_eq!(b["id"].as_str(), Some(cloned.stdout.trim()));

    let snap = server.cli(&["vm", "snapshot", "create", &name, "first"]);
    assert_ne!(snap.code, 0);
    assert!(snap.stderr.contains("no writable disk"), "{}", snap.stderr);
    let listed = server.cli(&["vm", "snapshot", "list", &name]);
    assert_eq!(
        (listed.code, listed.stdout.lines().count()),
        (0, 1),
        "a header only: {}",
        listed.stdout
    );
    let media = server.cli(&["vm", "media", &name, "0", "no-such-iso"]);
    assert_ne!(media.code, 0);
    assert!(media.stderr.contains("not in the ISO library"), "{}", media.stderr);
    let eject = server.cli(&["vm", "media", &name, "0", "--eject"]);
    assert_eq!(
        (eject.code, eject.stdout.trim()),
        (0, format!("{name} drive 0: empty").as_str()),
        "{}",
        eject.stderr
    );
    let nvram = server.cli(&["vm", "nvram-reset", &name]);
    assert!(nvram.stderr.contains("SeaBIOS"), "{}", nvram.stderr);
    for vm in [&name, &copy] {
        assert_eq!(server.cli(&["vm", "delete", vm]).code, 0);
    }
}
