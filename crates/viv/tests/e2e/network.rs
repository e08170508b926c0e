//! Sandbox networking in the server's default mode (`auto`: isolated as root, else user) and in
//! `user` mode: a sandbox reaches the Debian mirror and PyPI (registries this machine may reach)
//! with DNS set up by the agent; one created without internet reaches nothing yet still runs
//! commands; forks of one snapshot use the network at the same time. In `user` mode egress lists
//! are refused (they need the isolated mode, see `isolation.rs`).

use serde_json::json;

use crate::fixture::TestServer;

pub const RELEASE: &str = "curl -sS -m 30 http://deb.debian.org/debian/dists/bookworm/Release | grep -m1 '^Codename:'";

#[test]
fn sandboxes_reach_the_network_unless_created_without_internet() {
    let server = TestServer::shared();
    let online = server.sandbox();
    let fetched = online.sh(RELEASE);
    assert_eq!(fetched.out(), "Codename: bookworm\n", "{fetched:?}");
    assert_eq!(online.sh("cat /etc/resolv.conf").out(), "nameserver 10.0.2.3\n");
    // PyPI over HTTPS, with pip from the base template.
    let pip = online.sh("python3 -m pip download -q --no-deps -d /tmp/pkgs six && ls /tmp/pkgs");
    assert_eq!(pip.exit_code, Some(0), "{pip:?}");
    assert!(
        pip.out().starts_with("six-") && pip.out().trim_end().ends_with(".whl"),
        "{pip:?}"
    );

    let offline = server.sandbox_with(json!({ "allow_internet_access": false, "timeout": 300 }));
    let refused = offline.sh("curl -sS -m 5 -o /dev/null http://deb.debian.org/debian/ || echo unreachable");
    assert!(refused.out().contains("unreachable"), "{refused:?}");
    let direct = offline.sh("curl -sS -m 5 -o /dev/null http://10.0.2.2/ || echo unreachable");
    assert!(direct.out().contains("unreachable"), "{direct:?}");
    assert_eq!(
        offline.sh("echo still works > /tmp/f; cat /tmp/f").out(),
        "still works\n"
    );
    let info: serde_json::Value = server
        .get(&format!("/sandboxes/{}", offline.id))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(info["state"], "running");
}

#[test]
fn forks_of_one_snapshot_use_the_network_at_once() {
    let server = TestServer::shared();
    let parent = server.sandbox();
    let forks: Vec<serde_json::Value> = server
        .post(&format!("/sandboxes/{}/fork", parent.id))
        .json(&json!({ "count": 2, "timeout": 300 }))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let ids: Vec<String> = forks
        .iter()
        .map(|f| f["sandbox"]["sandboxID"].as_str().expect("fork started").to_owned())
        .collect();
    let children: Vec<_> = ids
        .iter()
        .map(|id| crate::fixture::Sandbox { server, id: id.clone() })
        .collect();
    let results: Vec<String> = std::thread::scope(|scope| {
        let running: Vec<_> = children
            .iter()
            .chain([&parent])
            .map(|sandbox| scope.spawn(move || sandbox.sh(RELEASE).out()))
            .collect();
        running.into_iter().map(|t| t.join().unwrap()).collect()
    });
    assert!(results.iter().all(|r| r == "Codename: bookworm\n"), "{results:?}");
}

#[test]
fn user_mode_turns_internet_on_and_off_and_refuses_lists() {
    let server = TestServer::start_user_mode();
    let health: serde_json::Value = server.get("/health").send().unwrap().json().unwrap();
    assert_eq!(health["network"], "user");
    let online = server.sandbox();
    assert_eq!(online.sh(RELEASE).out(), "Codename: bookworm\n");
    let offline = server.sandbox_with(json!({ "allow_internet_access": false, "timeout": 300 }));
    let refused = offline.sh("curl -sS -m 5 -o /dev/null http://deb.debian.org/debian/ || echo unreachable");
    assert!(refused.out().contains("unreachable"), "{refused:?}");

    // Lists need the isolated mode; a user-mode card's internet access cannot change while it
    // runs (an answer a person can act on, not a silent no-op).
    let rules = server
        .post("/sandboxes")
        .json(&json!({ "network": { "denyOut": ["1.1.1.1"] } }))
        .send()
        .unwrap();
    assert_eq!(rules.status(), 400);
    assert!(rules.text().unwrap().contains("isolated"));
    let update = server
        .put(&format!("/sandboxes/{}/network", offline.id))
        .json(&json!({ "allow_internet_access": true }))
        .send()
        .unwrap();
    assert_eq!(update.status(), 409);
    let same = server
        .put(&format!("/sandboxes/{}/network", offline.id))
        .json(&json!({ "allow_internet_access": false }))
        .send()
        .unwrap();
    assert_eq!(same.status(), 204);
}
