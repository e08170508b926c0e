//! Memory diff snapshots: pause and fork nodes are saved whole and rewritten in the background
//! to keep only the pages that changed since their parent; chains of them restore the guest's
//! memory exactly, also when a resume races the rewrite; a damaged chain is refused with a
//! message naming the part, and the collector keeps parents (and the base) while anything needs
//! them; a paused sandbox kept as a diff moves to another node of a cluster as one whole state;
//! with diffs off, whole nodes restore over the template memory their VM mapped, exactly, and
//! alone when that file does not fit.

use std::path::{Path, PathBuf};

use std::time::Duration;

use serde_json::{json, Value};

use crate::fixture::{wait_until, TestServer};

/// Bytes a pause node may take after a small change in an idle 256 MiB guest (measured: about
/// 1–3 MiB of memory pages plus the disk layer's few blocks).
const SMALL_NODE: u64 = 8 << 20;

fn pause(server: &TestServer, id: &str) -> Value {
    let response = server.post(&format!("/sandboxes/{id}/pause")).send().unwrap();
    assert_eq!(response.status(), 204, "{}", response.text().unwrap_or_default());
    // The paused sandbox stands on this pause's node (its older pause nodes are its parents).
    let nodes: Vec<Value> = server.get("/snapshots").send().unwrap().json().unwrap();
    nodes
        .into_iter()
        .find(|n| n["kind"] == "pause" && n["sandboxes"].as_array().is_some_and(|s| s.contains(&json!(id))))
        .unwrap_or_else(|| panic!("no pause node of {id}"))
}

/// Node `node` as `GET /snapshots` shows it now.
fn node_now(server: &TestServer, node: &Value) -> Value {
    let nodes: Vec<Value> = server.get("/snapshots").send().unwrap().json().unwrap();
    nodes
        .into_iter()
        .find(|n| n["snapshotID"] == node["snapshotID"])
        .unwrap_or_else(|| panic!("node {} is gone", node["snapshotID"]))
}

/// Waits for node `node`'s background diff to be installed and returns the node then.
fn diffed(server: &TestServer, node: &Value) -> Value {
    let mut last = Value::Null;
    let done = wait_until(Duration::from_secs(180), || {
        last = node_now(server, node);
        last["memory"] == "diff"
    });
    assert!(done, "node {} was not rewritten as a diff: {last}", node["snapshotID"]);
    last
}

fn resume(server: &TestServer, id: &str) -> reqwest::blocking::Response {
    server
        .post(&format!("/sandboxes/{id}/connect"))
        .json(&json!({ "timeout": 600 }))
        .send()
        .unwrap()
}

fn node_id(node: &Value) -> String {
    node["snapshotID"]
        .as_str()
        .unwrap()
        .trim_end_matches(":default")
        .to_owned()
}

fn node_dir(server: &TestServer, node: &Value) -> PathBuf {
    server.data_dir.join("snapshots").join(node_id(node))
}

/// How many diffs the restore of `dir` composes (its own and its memory parents').
fn chain_depth(server: &TestServer, dir: &Path) -> usize {
    let mut depth = 1;
    let mut current = dir.to_path_buf();
    while let Ok(parent) = std::fs::read_to_string(current.join("memory.parent")) {
        depth += 1;
        current = server.data_dir.join("snapshots").join(parent.trim());
    }
    depth
}

fn bases(server: &TestServer) -> Vec<PathBuf> {
    std::fs::read_dir(server.data_dir.join("memory-bases"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "mem"))
        .collect()
}

/// The guest's memory-only data: a 16 MiB random file on a tmpfs and a log grown each round.
fn checksum(server: &TestServer, id: &str) -> String {
    let out = server.exec(
        id,
        json!({ "command": "sha256sum /dev/shm/blob /dev/shm/log | cut -c1-64" }),
    );
    assert_eq!(out.exit_code, Some(0), "{out:?}");
    out.out()
}

#[test]
fn memory_diff_chains_restore_the_guest_exactly_and_nodes_are_small() {
    let server = TestServer::start_with_env(0, &["--memory-diff-chain", "64"], &[]);
    let id = server.create(json!({ "templateID": "base", "timeout": 600 }));
    let setup = server.exec(
        &id,
        json!({ "command": "head -c 16M /dev/urandom > /dev/shm/blob && echo 0 > /dev/shm/log" }),
    );
    assert_eq!(setup.exit_code, Some(0), "{setup:?}");
    let mut expected = checksum(&server, &id);
    let first = pause(&server, &id);
    assert_eq!(first["memory"], "whole", "a pause returns before its diff is made");
    let first = diffed(&server, &first);
    assert!(
        node_dir(&server, &first).join("memory.base").is_file(),
        "a node of a template's sandbox is a diff"
    );
    assert_eq!(bases(&server).len(), 1, "the template's memory was persisted once");
    let mut last = first.clone();
    let mut nodes = Vec::new();
    for round in 1..=11 {
        let resumed = resume(&server, &id);
        assert_eq!(
            resumed.status(),
            201,
            "round {round}: {}",
            resumed.text().unwrap_or_default()
        );
        assert_eq!(
            checksum(&server, &id),
            expected,
            "round {round}: memory differs after the resume"
        );
        let changed = server.exec(&id, json!({ "command": format!("echo {round} >> /dev/shm/log") }));
        assert_eq!(changed.exit_code, Some(0));
        expected = checksum(&server, &id);
        // Every other round resumes at once, racing the node's rewrite (the restore reads the
        // whole state it opened, or the chain once the diff is in).
        last = pause(&server, &id);
        if round % 2 == 0 {
            last = diffed(&server, &last);
        }
        nodes.push(last.clone());
    }
    for (round, node) in nodes.iter().enumerate() {
        let node = diffed(&server, node);
        let bytes = node["sizeBytes"].as_u64().unwrap();
        assert!(
            bytes < SMALL_NODE,
            "round {}: a pause node after a small change took {bytes} bytes",
            round + 1
        );
        eprintln!("round {}: node {} takes {bytes} bytes", round + 1, node_id(&node));
    }
    let dir = node_dir(&server, &last);
    assert!(
        chain_depth(&server, &dir) >= 11,
        "the chain is {} deep",
        chain_depth(&server, &dir)
    );
    assert!(
        first["sizeBytes"].as_u64().unwrap() > 16 << 20,
        "the first node holds the 16 MiB written since the template"
    );

    // The deep chain restores exactly, and a fork of the restored sandbox has the same memory.
    let resumed = resume(&server, &id);
    assert_eq!(resumed.status(), 201, "{}", resumed.text().unwrap_or_default());
    assert_eq!(checksum(&server, &id), expected);
    let child = server.fork_one(&id);
    assert_eq!(checksum(&server, &child), expected, "the fork sees the parent's memory");

    // Everything is collected once no sandbox needs it, the base included.
    for sandbox in [&id, &child] {
        assert_eq!(
            server.delete(&format!("/sandboxes/{sandbox}")).send().unwrap().status(),
            204
        );
    }
    let nodes: Vec<Value> = server.get("/snapshots").send().unwrap().json().unwrap();
    assert!(nodes.is_empty(), "{nodes:?}");
    assert!(bases(&server).is_empty(), "the memory base outlived its nodes");
}

#[test]
fn memory_diff_damaged_chain_is_refused_by_name_and_parents_live_while_needed() {
    let server = TestServer::start_with_env(0, &["--memory-diff-chain", "16"], &[]);
    let a = server.create(json!({ "templateID": "base", "timeout": 600 }));
    let b = server.create(json!({ "templateID": "base", "timeout": 600 }));
    for id in [&a, &b] {
        let out = server.exec(
            id,
            json!({ "command": "head -c 1M /dev/urandom > /dev/shm/blob; echo x > /dev/shm/log" }),
        );
        assert_eq!(out.exit_code, Some(0));
    }
    let b_sum = checksum(&server, &b);
    let a1 = diffed(&server, &pause(&server, &a));
    assert_eq!(resume(&server, &a).status(), 201);
    let a2 = diffed(&server, &pause(&server, &a));
    assert_eq!(
        std::fs::read_to_string(node_dir(&server, &a2).join("memory.parent")).unwrap(),
        node_id(&a1),
        "the second pause is a diff against the first"
    );
    let b1 = diffed(&server, &pause(&server, &b));

    // The parent is kept while its child needs it.
    let refused = server.delete(&format!("/snapshots/{}", node_id(&a1))).send().unwrap();
    assert_eq!(refused.status(), 409);
    assert!(node_dir(&server, &a1).join("state").is_file());

    // A damaged part: 409, the message names the file; the sandbox stays paused.
    let part = node_dir(&server, &a1).join("state");
    let mut bytes = std::fs::read(&part).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&part, &bytes).unwrap();
    let damaged = resume(&server, &a);
    assert_eq!(damaged.status(), 409);
    let message = damaged.text().unwrap();
    assert!(
        message.contains(&part.display().to_string()) && message.contains("damaged"),
        "{message}"
    );
    let info: Value = server.get(&format!("/sandboxes/{a}")).send().unwrap().json().unwrap();
    assert_eq!(info["state"], "paused");

    // A missing part: the same, saying so.
    std::fs::remove_file(&part).unwrap();
    let missing = resume(&server, &a);
    assert_eq!(missing.status(), 409);
    let message = missing.text().unwrap();
    assert!(
        message.contains(&part.display().to_string()) && message.contains("missing"),
        "{message}"
    );

    // Another sandbox's chain is unaffected.
    assert_eq!(resume(&server, &b).status(), 201);
    assert_eq!(checksum(&server, &b), b_sum);
    assert!(node_dir(&server, &b1).join("memory.base").is_file());
    for id in [&a, &b] {
        assert_eq!(server.delete(&format!("/sandboxes/{id}")).send().unwrap().status(), 204);
    }
    assert!(bases(&server).is_empty());
}

#[test]
fn a_paused_sandbox_kept_as_a_memory_diff_moves_whole_to_another_node() {
    let database = viv_test_postgres::fresh_database();
    let dir = |prefix: &str| tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    let (dir_a, dir_b) = (dir("viv-e2e-diff-a-"), dir("viv-e2e-diff-b-"));
    let args = |name: &'static str| {
        vec![
            "--database",
            database.as_str(),
            "--node-name",
            name,
            "--memory-diff-chain",
            "8",
        ]
    };
    let a = TestServer::start_on_with(dir_a.path(), &args("diff-a"));
    let b = TestServer::start_on_with(dir_b.path(), &args("diff-b"));
    let id = a.create(json!({ "templateID": "base", "timeout": 600 }));
    let sandbox = crate::cluster::json_of(a.get(&format!("/sandboxes/{id}")).send().unwrap());
    // Placement decides the node; the test follows it.
    let (home, home_name, there, other, other_dir) = match sandbox["clientID"].as_str() {
        Some("diff-a") => (&a, "diff-a", &b, "diff-b", dir_b.path()),
        _ => (&b, "diff-b", &a, "diff-a", dir_a.path()),
    };
    let setup = home.exec(
        &id,
        json!({ "command": "head -c 8M /dev/urandom > /dev/shm/blob && echo 0 > /dev/shm/log && echo kept > /tmp/kept.txt" }),
    );
    assert_eq!(setup.exit_code, Some(0), "{setup:?}");
    let expected = checksum(home, &id);

    // Paused, its node's memory becomes a diff against that node's base.
    let node = diffed(home, &pause(home, &id));
    // The other server, which has none of its files, lists it as its node recorded it.
    assert_eq!(node_now(there, &node)["memory"], "diff");
    // A drain moves it, its memory composed into one whole state on the other node.
    let drained = crate::cluster::json_of(home.post(&format!("/nodes/{home_name}/drain")).send().unwrap());
    assert_eq!(drained["failed"], json!([]), "{drained}");
    assert_eq!(drained["moved"], json!([{ "id": id, "node": other }]), "{drained}");
    let moved = other_dir.join("snapshots").join(node_id(&node));
    assert!(moved.join("state").is_file(), "no state in {}", moved.display());
    assert!(
        !moved.join("memory.base").exists(),
        "the moved node names a base of the node it left"
    );
    for server in [home, there] {
        assert_eq!(node_now(server, &node)["memory"], "whole");
    }

    // Resumed there, the guest's memory-only data is exactly what it was.
    let resumed = resume(home, &id);
    assert_eq!(resumed.status(), 201, "{}", resumed.text().unwrap_or_default());
    let now = crate::cluster::json_of(home.get(&format!("/sandboxes/{id}")).send().unwrap());
    assert_eq!(now["clientID"], other, "{now}");
    assert_eq!(checksum(home, &id), expected);
    assert_eq!(
        home.exec(&id, json!({ "command": "cat /tmp/kept.txt" })).out(),
        "kept\n"
    );
    assert_eq!(home.delete(&format!("/sandboxes/{id}")).send().unwrap().status(), 204);
}

#[test]
fn whole_nodes_restore_over_the_template_memory_exactly_and_without_it_when_it_does_not_fit() {
    // Diffs off (the default): pause and fork nodes keep their whole state, which a restore
    // loads onto the template's memory file, skipping the pages that file already holds.
    let server = TestServer::start_with_env(0, &[], &[]);
    let id = server.create(json!({ "templateID": "base", "timeout": 600 }));
    let setup = server.exec(
        &id,
        json!({ "command": "head -c 16M /dev/urandom > /dev/shm/blob && echo 0 > /dev/shm/log" }),
    );
    assert_eq!(setup.exit_code, Some(0), "{setup:?}");
    let expected = checksum(&server, &id);
    let forked = expected.clone();

    let child = server.fork_one(&id);
    assert_eq!(checksum(&server, &child), expected, "the fork sees the parent's memory");

    let node = pause(&server, &id);
    assert_eq!(node["memory"], "whole");
    let source = node_dir(&server, &node).join("memory.source");
    assert!(
        std::fs::read_to_string(&source).is_ok_and(|s| s.ends_with(".mem")),
        "the node names the template memory its VM mapped"
    );
    let resumed = resume(&server, &id);
    assert_eq!(resumed.status(), 201, "{}", resumed.text().unwrap_or_default());
    assert_eq!(checksum(&server, &id), expected, "memory differs after the resume");

    // A node whose memory file is gone or of another size restores from its whole state alone.
    let changed = server.exec(&id, json!({ "command": "echo 1 >> /dev/shm/log" }));
    assert_eq!(changed.exit_code, Some(0));
    let expected = checksum(&server, &id);
    let node = pause(&server, &id);
    let wrong = server.data_dir.join("not-the-template.mem");
    std::fs::write(&wrong, [7u8; 4096]).unwrap();
    std::fs::write(node_dir(&server, &node).join("memory.source"), wrong.to_str().unwrap()).unwrap();
    let resumed = resume(&server, &id);
    assert_eq!(resumed.status(), 201, "{}", resumed.text().unwrap_or_default());
    assert_eq!(checksum(&server, &id), expected, "memory differs after a whole resume");
    assert_eq!(checksum(&server, &child), forked, "the fork kept its own memory");
}
