//! A server whose state lives in PostgreSQL (`--database`): the same product on the second
//! engine, through the public API, across a killed server and a crash of PostgreSQL.

use std::time::Duration;

use serde_json::{json, Value};

use crate::fixture::{wait_until, TestServer};

#[test]
fn a_server_on_postgres_keeps_its_keys_sandboxes_and_snapshots_across_a_kill() {
    let database = viv_test_postgres::fresh_database();
    let temp = tempfile::Builder::new().prefix("viv-e2e-postgres-").tempdir().unwrap();
    let first = TestServer::start_on_with(temp.path(), &["--database", &database]);
    assert!(
        !temp.path().join("vivarium.db").exists(),
        "the state is in PostgreSQL, not in an SQLite file"
    );

    // A runs and holds a file; B is paused with one, under a named snapshot too.
    let a = first.create(json!({ "timeout": 900, "metadata": { "engine": "postgres" } }));
    let put = first
        .put(&format!("/sandboxes/{a}/files?path=/home/user/keep.txt"))
        .body("kept in a running VM")
        .send()
        .unwrap();
    assert!(put.status().is_success(), "{}", put.text().unwrap_or_default());
    let b = first.create(json!({ "timeout": 900 }));
    first.exec(&b, json!({ "command": "echo paused-state > /tmp/b.txt" }));
    let named = first
        .post(&format!("/sandboxes/{b}/snapshots"))
        .json(&json!({ "name": "pg-snap" }))
        .send()
        .unwrap();
    assert!(named.status().is_success(), "{}", named.text().unwrap_or_default());
    assert_eq!(
        first.post(&format!("/sandboxes/{b}/pause")).send().unwrap().status(),
        204
    );

    let first_key = first.key.clone();
    first.stop(libc::SIGKILL);
    drop(first);

    let second = TestServer::start_on_with(temp.path(), &["--database", &database]);
    // The first server's key lives in the database too.
    let old_key = reqwest::blocking::Client::new()
        .get(format!("{}/v2/sandboxes", second.url))
        .header("X-API-Key", &first_key)
        .send()
        .unwrap();
    assert_eq!(old_key.status(), 200);
    let listed: Value = second.get("/v2/sandboxes").send().unwrap().json().unwrap();
    let state_of = |id: &str| {
        listed
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["sandboxID"] == id)
            .map(|s| s["state"].clone())
    };
    assert_eq!(state_of(&a), Some(json!("running")), "{listed}");
    assert_eq!(state_of(&b), Some(json!("paused")), "{listed}");
    let file = second
        .get(&format!("/sandboxes/{a}/files?path=/home/user/keep.txt"))
        .send()
        .unwrap();
    assert_eq!(file.text().unwrap(), "kept in a running VM");
    let info: Value = second.get(&format!("/sandboxes/{a}")).send().unwrap().json().unwrap();
    assert_eq!(info["metadata"]["engine"], "postgres");

    let resumed = second
        .post(&format!("/sandboxes/{b}/connect"))
        .json(&json!({ "timeout": 60 }))
        .send()
        .unwrap();
    assert_eq!(resumed.status(), 201, "{}", resumed.text().unwrap_or_default());
    assert_eq!(
        second.exec(&b, json!({ "command": "cat /tmp/b.txt" })).out(),
        "paused-state\n"
    );
    // The named snapshot starts a new sandbox with B's state at the time.
    let c = second.create(json!({ "templateID": "pg-snap", "timeout": 300 }));
    assert_eq!(
        second.exec(&c, json!({ "command": "cat /tmp/b.txt" })).out(),
        "paused-state\n"
    );

    for id in [&a, &b, &c] {
        assert_eq!(second.delete(&format!("/sandboxes/{id}")).send().unwrap().status(), 204);
    }
    assert_eq!(second.delete("/snapshots/pg-snap").send().unwrap().status(), 204);
    assert!(wait_until(Duration::from_secs(30), || {
        second
            .get("/v2/sandboxes")
            .send()
            .unwrap()
            .json::<Value>()
            .unwrap()
            .as_array()
            .unwrap()
            .is_empty()
    }));
    drop(second);
    crate::fixture::remove_template_memory(temp.path());
}

#[test]
fn requests_fail_cleanly_while_postgres_is_down_and_work_again_once_it_is_back() {
    let mut postgres = viv_test_postgres::Scratch::start();
    let database = postgres.database();
    let temp = tempfile::Builder::new()
        .prefix("viv-e2e-pg-restart-")
        .tempdir()
        .unwrap();
    let server = TestServer::start_on_with(
        temp.path(),
        &["--database", &database, "--heartbeat", "1s", "--node-down-after", "5s"],
    );
    let id = server.create(json!({ "timeout": 900 }));
    server.exec(&id, json!({ "command": "echo before > /tmp/note.txt" }));

    // PostgreSQL crashes: every request that needs the store answers at once with a 503 that
    // says why, never a hang or a 500.
    postgres.stop();
    for path in [
        format!("/sandboxes/{id}"),
        "/v2/sandboxes".to_owned(),
        "/nodes".to_owned(),
    ] {
        let started = std::time::Instant::now();
        let answer = server.get(&path).send().unwrap();
        assert_eq!(answer.status(), 503, "{path}");
        let body: Value = answer.json().unwrap();
        let message = body["message"].as_str().unwrap_or_default();
        assert!(message.contains("state database"), "{path}: {body}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{path} took {:?}",
            started.elapsed()
        );
    }
    // The server itself goes on: health answers, and the sandbox's VM still runs.
    assert_eq!(
        server
            .http
            .get(format!("{}/health", server.url))
            .send()
            .unwrap()
            .status(),
        200
    );
    assert_eq!(crate::fixture::qemu_processes_under(temp.path()).len(), 1);

    // Back: the server reconnects by itself, the sandbox is as it was, and the node heartbeats.
    postgres.start_again();
    let back = wait_until(Duration::from_secs(30), || {
        server
            .get(&format!("/sandboxes/{id}"))
            .send()
            .is_ok_and(|r| r.status() == 200)
    });
    assert!(back, "the server did not recover once PostgreSQL was back");
    assert_eq!(
        server.exec(&id, json!({ "command": "cat /tmp/note.txt" })).out(),
        "before\n"
    );
    let fresh = wait_until(Duration::from_secs(15), || {
        let nodes: Value = server.get("/nodes").send().unwrap().json().unwrap();
        let heartbeat = nodes[0]["heartbeatAt"].as_str().unwrap_or_default().to_owned();
        nodes[0]["state"] == "up"
            && humantime::parse_rfc3339_weak(&heartbeat)
                .ok()
                .and_then(|at| std::time::SystemTime::now().duration_since(at).ok())
                .is_some_and(|age| age < Duration::from_secs(3))
    });
    assert!(fresh, "the node's heartbeats did not resume");
    let again = server.create(json!({ "timeout": 300 }));
    for sandbox in [&id, &again] {
        assert_eq!(
            server.delete(&format!("/sandboxes/{sandbox}")).send().unwrap().status(),
            204
        );
    }
    drop(server);
    crate::fixture::remove_template_memory(temp.path());
}
