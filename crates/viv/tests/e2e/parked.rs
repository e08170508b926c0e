//! Parked VMs (`--pause-keep-warm`): a resume soon after a pause continues the stopped VM, a
//! later one restores the node; parked VMs go when their time is over, when their sandbox is
//! killed, when the pause asks, at shutdown and (as orphans) after a crash; the folds they put
//! off happen at eviction.

use std::time::Duration;

use serde_json::{json, Value};

use crate::fixture::{counter, wait_until, TestServer, COUNTER_LOOP as COUNTER};

fn pause(server: &TestServer, id: &str, body: Value) {
    let paused = server
        .post(&format!("/sandboxes/{id}/pause"))
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(paused.status(), 204, "{}", paused.text().unwrap_or_default());
    let info: Value = server.get(&format!("/sandboxes/{id}")).send().unwrap().json().unwrap();
    assert_eq!(info["state"], "paused");
}

/// The pause nodes of sandbox `id`.
fn pause_nodes(server: &TestServer, id: &str) -> Vec<Value> {
    let nodes: Vec<Value> = server.get("/snapshots").send().unwrap().json().unwrap();
    nodes
        .into_iter()
        .filter(|n| n["sandboxID"] == id && n["kind"] == "pause")
        .collect()
}

/// The counter keeps going after a resume, and the guest clock is the host's.
fn assert_alive(server: &TestServer, id: &str) {
    let before = counter(server, id);
    assert!(
        wait_until(Duration::from_secs(10), || counter(server, id) > before + 2),
        "the background process runs on after the resume"
    );
    crate::fixture::assert_guest_clock(server, id);
}

#[test]
fn a_resume_soon_after_a_pause_continues_the_parked_vm_and_a_later_one_restores_the_node() {
    let server = TestServer::start_with_env(0, &["--pause-keep-warm", "4s"], &[]);
    let id = server.create(json!({ "templateID": "base", "timeout": 600 }));
    let setup = server.exec(
        &id,
        json!({ "command": format!("echo one > /home/user/f.txt; {COUNTER}") }),
    );
    assert_eq!(setup.exit_code, Some(0), "{setup:?}");
    assert!(wait_until(Duration::from_secs(10), || {
        server.exec(&id, json!({ "command": "test -s /tmp/count" })).exit_code == Some(0)
    }));
    let qemu = server.qemu_processes();
    assert_eq!(qemu.len(), 1);

    // A command still streaming when the pause comes: its stream stalls while the VM is parked
    // and goes on after the resume (the agent's connection is kept; a new one would wait behind
    // it, since the VM's channel takes one connection at a time).
    let streaming = {
        let url = format!("{}/sandboxes/{id}/exec", server.url);
        let key = server.key.clone();
        std::thread::spawn(move || {
            reqwest::blocking::Client::new()
                .post(url)
                .header("X-API-Key", key)
                .json(&json!({ "command": "sleep 600" }))
                .send()
                .and_then(|r| r.text())
        })
    };
    assert!(wait_until(Duration::from_secs(10), || {
        server
            .exec(&id, json!({ "command": "pgrep -f '^sleep 600$' >/dev/null" }))
            .exit_code
            == Some(0)
    }));

    // Paused and parked: paused to every client, its node saved whole, its QEMU kept.
    pause(&server, &id, json!({}));
    let refused = server
        .post(&format!("/sandboxes/{id}/exec"))
        .json(&json!({ "command": "true" }))
        .send()
        .unwrap();
    assert_eq!(refused.status(), 409, "a parked sandbox is paused");
    let first = pause_nodes(&server, &id);
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(first[0]["memory"], "whole");
    assert_eq!(server.qemu_processes(), qemu, "the paused VM is parked");
    assert_eq!(server.metric("vivarium_sandboxes_parked"), 1);

    // A sandbox created from the pause node meanwhile reads the node's disk beside the parked
    // VM, and writes apart from it.
    let child = server.create(json!({ "templateID": first[0]["snapshotID"], "timeout": 600 }));
    let out = server.exec(
        &child,
        json!({ "command": "cat /home/user/f.txt; echo child > /home/user/f.txt" }),
    );
    assert_eq!(out.out(), "one\n", "{out:?}");

    // Resumed at once: the same QEMU runs on, with its process, files and a correct clock.
    server.resume(&id, "resume of the parked VM");
    assert_eq!(server.metric("vivarium_parked_resumes_total"), 1);
    assert_eq!(server.metric("vivarium_sandboxes_parked"), 0);
    assert!(server.qemu_processes().contains(&qemu[0]), "the parked VM was resumed");
    assert!(!streaming.is_finished(), "the command's stream outlives a parked pause");
    let stopped = server.exec(&id, json!({ "command": "pkill -f '^sleep 600$'" }));
    assert_eq!(stopped.exit_code, Some(0), "{stopped:?}");
    let ended = streaming
        .join()
        .unwrap()
        .expect("the command's stream ends when it does");
    assert!(ended.contains("\"type\":\"end\""), "{ended}");
    let out = server.exec(
        &id,
        json!({ "command": "cat /home/user/f.txt; echo two >> /home/user/f.txt" }),
    );
    assert_eq!(out.out(), "one\n", "the child's write stays in the child");
    assert_alive(&server, &id);
    let killed = server.delete(&format!("/sandboxes/{child}")).send().unwrap();
    assert_eq!(killed.status(), 204);

    // Paused again and left: the VM is evicted after the keep-warm time, and the fold the pause
    // put off happens then, leaving one node.
    pause(&server, &id, json!({}));
    assert_eq!(pause_nodes(&server, &id).len(), 2, "the fold waits for the eviction");
    assert!(
        wait_until(Duration::from_secs(30), || server.qemu_processes().is_empty()),
        "the parked VM is evicted"
    );
    assert_eq!(server.metric("vivarium_sandboxes_parked"), 0);
    assert!(server.metric("vivarium_parked_evictions_total") >= 1);
    assert!(
        wait_until(Duration::from_secs(30), || pause_nodes(&server, &id).len() == 1),
        "the superseded node is folded after the eviction: {:?}",
        pause_nodes(&server, &id)
    );

    // The next resume restores the node: a new QEMU, the same sandbox.
    server.resume(&id, "resume after the eviction");
    let restored = server.qemu_processes();
    assert_eq!(restored.len(), 1);
    assert_ne!(restored, qemu, "restored into a new VM");
    let out = server.exec(&id, json!({ "command": "cat /home/user/f.txt" }));
    assert_eq!(out.out(), "one\ntwo\n");
    assert_alive(&server, &id);

    // A pause that asks to free the VM stops it at once; its resume restores the node.
    pause(&server, &id, json!({ "keepWarm": false }));
    assert!(server.qemu_processes().is_empty(), "keepWarm false frees the VM");
    server.resume(&id, "resume after a keepWarm:false pause");
    assert_eq!(
        server.exec(&id, json!({ "command": "cat /home/user/f.txt" })).out(),
        "one\ntwo\n"
    );
    assert_alive(&server, &id);

    // Killing a parked sandbox kills its VM.
    pause(&server, &id, json!({}));
    assert_eq!(server.qemu_processes().len(), 1);
    let killed = server.delete(&format!("/sandboxes/{id}")).send().unwrap();
    assert_eq!(killed.status(), 204);
    assert!(
        server.qemu_processes().is_empty(),
        "the parked VM went with its sandbox"
    );
    assert_eq!(server.metric("vivarium_sandboxes_parked"), 0);
    assert!(
        wait_until(Duration::from_secs(20), || {
            let nodes: Vec<Value> = server.get("/snapshots").send().unwrap().json().unwrap();
            nodes.is_empty()
        }),
        "the killed sandbox's nodes are collected"
    );
}

#[test]
fn parked_vms_go_at_shutdown_and_after_a_crash_and_their_sandboxes_resume_from_disk() {
    let temp = tempfile::Builder::new().prefix("viv-e2e-").tempdir().unwrap();
    let keep = ["--pause-keep-warm", "10m"];
    let server = TestServer::start_on_with(temp.path(), &keep);
    let id = server.create(json!({ "templateID": "base", "timeout": 600 }));
    let setup = server.exec(
        &id,
        json!({ "command": format!("echo kept > /home/user/k.txt; {COUNTER}") }),
    );
    assert_eq!(setup.exit_code, Some(0), "{setup:?}");
    pause(&server, &id, json!({}));
    assert_eq!(server.qemu_processes().len(), 1, "parked");

    // A stopping server kills its parked VMs; the sandbox stays paused on its node.
    assert!(server.stop(libc::SIGTERM).success());
    assert!(crate::fixture::qemu_processes_under(temp.path()).is_empty());
    let server = TestServer::start_on_with(temp.path(), &keep);
    let info: Value = server.get(&format!("/sandboxes/{id}")).send().unwrap().json().unwrap();
    assert_eq!(info["state"], "paused");
    server.resume(&id, "resume after a restart");
    assert_eq!(
        server.exec(&id, json!({ "command": "cat /home/user/k.txt" })).out(),
        "kept\n"
    );
    assert_alive(&server, &id);

    // A crashed server leaves its parked VM behind: the next one kills it as an orphan, and the
    // sandbox resumes from its node.
    pause(&server, &id, json!({}));
    let parked = server.qemu_processes();
    assert_eq!(parked.len(), 1);
    server.stop(libc::SIGKILL);
    let server = TestServer::start_on_with(temp.path(), &keep);
    assert!(
        wait_until(Duration::from_secs(10), || server.qemu_processes().is_empty()),
        "the crashed server's parked VM is killed at start"
    );
    assert!(server.metric("vivarium_orphan_vms_killed_total") >= 1);
    server.resume(&id, "resume after a crash");
    assert_ne!(server.qemu_processes(), parked);
    assert_eq!(
        server.exec(&id, json!({ "command": "cat /home/user/k.txt" })).out(),
        "kept\n"
    );
    assert_alive(&server, &id);
    let killed = server.delete(&format!("/sandboxes/{id}")).send().unwrap();
    assert_eq!(killed.status(), 204);
}
