//! The warm pool sizes itself to recent demand: a burst of creates grows a template's pool (up
//! to `--pool-max`), the next burst is served from it, and warm VMs beyond `--pool-size` that no
//! create takes within `--pool-idle` are killed, shrinking the pool back.

use std::time::Duration;

use serde_json::{json, Value};

use crate::fixture::{wait_until, TestServer};
use crate::pool::run_dirs;

#[test]
fn a_burst_grows_the_pool_which_serves_the_next_burst_and_shrinks_when_idle() {
    let server = TestServer::start_with_env(
        1,
        &["--pool-max", "3", "--pool-window", "600", "--pool-idle", "20"],
        &[],
    );
    let health = || -> Value { server.get("/health").send().unwrap().json().unwrap() };
    let settled = |n: u64| {
        let h = health();
        h["pooled"].as_u64() == Some(n) && h["poolWarming"].as_u64() == Some(0)
    };

    // Three creates within the window: the pool grows to three warm VMs.
    let mut ids: Vec<String> = (0..3).map(|_| server.create(json!({ "templateID": "base" }))).collect();
    assert!(
        wait_until(Duration::from_secs(400), || settled(3)),
        "the pool did not grow to the demand: {}",
        health()
    );

    // The next burst is served from it: every new sandbox is a VM that was warm before.
    let warm = run_dirs(&server);
    let hits = server.metric("vivarium_pool_hits_total");
    for _ in 0..3 {
        let id = server.create(json!({ "templateID": "base" }));
        assert!(warm.contains(&id), "{id} was not one of the warm VMs ({warm:?})");
        assert_eq!(server.exec(&id, json!({ "command": "echo ok" })).out(), "ok\n");
        ids.push(id);
    }
    assert_eq!(server.metric("vivarium_pool_hits_total"), hits + 3);

    // Nobody creates any more: the warm VMs beyond --pool-size expire once idle for 20 s.
    assert!(
        wait_until(Duration::from_secs(400), || settled(1)),
        "the pool did not shrink back to --pool-size: {}",
        health()
    );
    assert!(server.metric("vivarium_pool_expired_total") >= 2);
    // An expired VM leaves the pool first, then is killed and its run directory removed.
    assert!(
        wait_until(Duration::from_secs(60), || run_dirs(&server).len() == ids.len() + 1),
        "expired VMs left run directories: {:?} besides {} sandboxes",
        run_dirs(&server),
        ids.len()
    );
    for id in &ids {
        assert_eq!(server.delete(&format!("/sandboxes/{id}")).send().unwrap().status(), 204);
    }
}
