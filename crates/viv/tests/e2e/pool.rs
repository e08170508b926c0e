//! Warm VMs: creates take a restored, warmed VM from the pool, which refills in the background;
//! `pooled: false` bypasses it; shutdown leaves no pooled VM behind.

use std::time::Duration;

use serde_json::{json, Value};

use crate::fixture::{wait_until, TestServer};

/// Names of the server's sandbox run directories (pooled VMs included).
pub(crate) fn run_dirs(server: &TestServer) -> Vec<String> {
    std::fs::read_dir(server.data_dir.join("sandboxes"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn creates_take_warm_vms_from_the_pool_which_refills() {
    let server = TestServer::start_with_pool(1);
    let pooled = || -> u64 {
        let health: Value = server.get("/health").send().unwrap().json().unwrap();
        health["pooled"].as_u64().unwrap()
    };
    // The first create of a template restores a VM and starts filling its pool.
    let first = server.create(json!({ "templateID": "base", "envVars": { "A": "first" } }));
    assert!(
        wait_until(Duration::from_secs(120), || pooled() == 1),
        "the pool did not fill"
    );
    let warm = run_dirs(&server);
    assert_eq!(warm.len(), 2, "one sandbox and one warm VM: {warm:?}");

    // The next create takes the warm VM (its directory existed before the call) and gets its
    // own environment, metadata and token.
    let second = server.create(json!({ "envVars": { "A": "second" }, "metadata": { "k": "v" } }));
    assert!(warm.contains(&second), "{second} was not the warm VM ({warm:?})");
    let run = server.exec(&second, json!({ "command": "echo $A; whoami" }));
    assert_eq!(run.out(), "second\nuser\n", "{run:?}");
    let info: Value = server
        .get(&format!("/sandboxes/{second}"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(info["metadata"]["k"], "v");
    assert_eq!(info["state"], "running");
    assert_eq!(server.exec(&first, json!({ "command": "echo $A" })).out(), "first\n");

    // It refills; `pooled: false` restores a new VM instead of taking it.
    assert!(
        wait_until(Duration::from_secs(120), || pooled() == 1),
        "the pool did not refill"
    );
    let before = run_dirs(&server);
    let third = server.create(json!({ "pooled": false }));
    assert!(!before.contains(&third));
    assert_eq!(pooled(), 1);
    // A shape other than the template's gets no pool of its own: warm VMs for every shape
    // clients ask for would grow without bound (found by schemathesis).
    let odd = server.create(json!({ "memoryMB": 320, "pooled": false }));
    std::thread::sleep(Duration::from_secs(10));
    assert_eq!(pooled(), 1, "a pool was filled for a shape nobody made the default");
    assert_eq!(run_dirs(&server).len(), 5, "four sandboxes and one warm VM");
    for id in [&first, &second, &third, &odd] {
        assert_eq!(server.delete(&format!("/sandboxes/{id}")).send().unwrap().status(), 204);
    }
    // Dropping the server stops it and checks that no VM or run directory (pooled ones
    // included) is left.
}
