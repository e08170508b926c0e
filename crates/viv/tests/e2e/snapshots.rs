//! Pause, resume, fork and named snapshots: files and running processes survive, nodes form a
//! tree that refuses deletes while in use and collects what nothing needs, and repeated pauses
//! fold into one node.

use std::time::Duration;

use serde_json::{json, Value};

use crate::fixture::{counter, wait_until, TestServer, COUNTER_LOOP};

fn snapshots(server: &TestServer) -> Vec<Value> {
    server.get("/snapshots").send().unwrap().json().unwrap()
}

#[test]
fn pause_resume_and_fork_keep_files_and_processes_and_the_tree_is_collected() {
    let server = TestServer::start();
    let id = server.create(json!({ "templateID": "base", "timeout": 600, "envVars": { "FOO": "bar" } }));
    let setup = server.exec(
        &id,
        json!({ "command": format!("echo hello > /home/user/f.txt; {COUNTER_LOOP}") }),
    );
    assert_eq!(setup.exit_code, Some(0), "{setup:?}");
    // The loop may not have written its first value yet.
    assert!(wait_until(Duration::from_secs(10), || {
        server.exec(&id, json!({ "command": "test -s /tmp/count" })).exit_code == Some(0) && counter(&server, &id) > 2
    }));

    // Pause: the sandbox is paused, its node holds it, commands are refused with a hint.
    assert_eq!(
        server.post(&format!("/sandboxes/{id}/pause")).send().unwrap().status(),
        204
    );
    let info: Value = server.get(&format!("/sandboxes/{id}")).send().unwrap().json().unwrap();
    assert_eq!(info["state"], "paused");
    let refused = server
        .post(&format!("/sandboxes/{id}/exec"))
        .json(&json!({ "command": "true" }))
        .send()
        .unwrap();
    assert_eq!(refused.status(), 409);
    assert!(refused.text().unwrap().contains("resume"));
    let nodes = snapshots(&server);
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    let pause_node = nodes[0]["snapshotID"].as_str().unwrap().to_owned();
    assert_eq!(nodes[0]["kind"], "pause");
    assert!(nodes[0]["sizeBytes"].as_u64().unwrap() > 0);
    // Memory diffs are off by default: the node keeps its memory whole, and no base is copied.
    assert_eq!(nodes[0]["memory"], "whole");
    assert!(!server.data_dir.join("memory-bases").exists());
    assert_eq!(server.qemu_processes().len(), 0, "a paused sandbox has no VM");
    let in_use = server.delete(&format!("/snapshots/{pause_node}")).send().unwrap();
    assert_eq!(in_use.status(), 409, "a node a paused sandbox needs cannot be deleted");

    // Resume (E2B's connect): 201, then files, environment and the process are all there.
    server.resume(&id, "resume");
    let again = server
        .post(&format!("/sandboxes/{id}/connect"))
        .json(&json!({ "timeout": 600 }))
        .send()
        .unwrap();
    assert_eq!(again.status(), 200, "connecting to a running sandbox");
    let out = server.exec(&id, json!({ "command": "cat /home/user/f.txt; echo $FOO" }));
    assert_eq!(out.out(), "hello\nbar\n");
    let before = counter(&server, &id);
    assert!(
        wait_until(Duration::from_secs(10), || counter(&server, &id) > before + 2),
        "the background process runs on after the resume"
    );
    // The guest clock was set from the host's at resume.
    crate::fixture::assert_guest_clock(&server, &id);

    // Fork into two: both children have the parent's files and process; writes stay apart.
    let forked = server
        .post(&format!("/sandboxes/{id}/fork"))
        .json(&json!({ "count": 2, "timeout": 600 }))
        .send()
        .unwrap();
    assert_eq!(forked.status(), 201);
    let forks: Vec<Value> = forked.json().unwrap();
    assert_eq!(forks.len(), 2);
    let children: Vec<String> = forks
        .iter()
        .map(|f| {
            f["sandbox"]["sandboxID"]
                .as_str()
                .unwrap_or_else(|| panic!("{f}"))
                .to_owned()
        })
        .collect();
    for (n, child) in children.iter().enumerate() {
        let out = server.exec(
            child,
            json!({ "command": format!("cat /home/user/f.txt; echo child{n} > /home/user/mine.txt") }),
        );
        assert_eq!(out.out(), "hello\n");
        let start = counter(&server, child);
        assert!(wait_until(Duration::from_secs(10), || counter(&server, child) > start));
    }
    let parent = server.exec(
        &id,
        json!({ "command": "cat /home/user/mine.txt 2>&1; echo parent > /home/user/p.txt" }),
    );
    assert!(
        parent.out().contains("No such file"),
        "a child's write is not in the parent: {parent:?}"
    );
    let child0 = server.exec(
        &children[0],
        json!({ "command": "cat /home/user/mine.txt; ls /home/user" }),
    );
    assert_eq!(child0.out(), "child0\nf.txt\nmine.txt\n");

    // A named snapshot starts new sandboxes; a snapshot in use cannot be deleted.
    let snap = server
        .post(&format!("/sandboxes/{id}/snapshots"))
        .json(&json!({ "name": "with-p" }))
        .send()
        .unwrap();
    assert_eq!(snap.status(), 201);
    let snap: Value = snap.json().unwrap();
    assert!(snap["names"].as_array().unwrap().iter().any(|n| n == "with-p:default"));
    let duplicate = server
        .post(&format!("/sandboxes/{id}/snapshots"))
        .json(&json!({ "name": "with-p" }))
        .send()
        .unwrap();
    assert_eq!(duplicate.status(), 409);
    let from_snap = server.create(json!({ "templateID": "with-p", "timeout": 600 }));
    assert_eq!(
        server
            .exec(&from_snap, json!({ "command": "cat /home/user/p.txt" }))
            .out(),
        "parent\n"
    );

    // Kill everything: only the named snapshot remains (with its ancestors), deletable now.
    for sandbox in children.iter().chain([&id, &from_snap]) {
        assert_eq!(
            server.delete(&format!("/sandboxes/{sandbox}")).send().unwrap().status(),
            204
        );
    }
    let left = snapshots(&server);
    assert!(left
        .iter()
        .any(|n| n["names"].as_array().unwrap().iter().any(|x| x == "with-p:default")));
    assert!(
        left.iter().all(|n| n["sandboxes"].as_array().unwrap().is_empty()),
        "{left:?}"
    );
    assert_eq!(server.delete("/snapshots/with-p").send().unwrap().status(), 204);
    assert!(
        snapshots(&server).is_empty(),
        "unreferenced pause and fork nodes are collected"
    );
    let entries = std::fs::read_dir(server.data_dir.join("snapshots")).unwrap().count();
    assert_eq!(entries, 0, "no snapshot files are left");

    // A deleted snapshot is gone for good.
    let gone = server
        .post("/sandboxes")
        .json(&json!({ "templateID": snap["snapshotID"] }))
        .send()
        .unwrap();
    assert_eq!(gone.status(), 404);
    assert_eq!(server.get("/snapshots/with-p").send().unwrap().status(), 404);
    assert_eq!(server.qemu_processes().len(), 0);
}

/// The nodes taken of sandbox `id`, oldest first.
fn nodes_of(server: &TestServer, id: &str) -> Vec<Value> {
    snapshots(server).into_iter().filter(|n| n["sandboxID"] == id).collect()
}

fn pause_and_resume(server: &TestServer, id: &str, round: usize) {
    pause(server, id, round);
    resume(server, id, round);
}

fn pause(server: &TestServer, id: &str, round: usize) {
    let paused = server.post(&format!("/sandboxes/{id}/pause")).send().unwrap();
    assert_eq!(
        paused.status(),
        204,
        "round {round}: {}",
        paused.text().unwrap_or_default()
    );
}

fn resume(server: &TestServer, id: &str, round: usize) {
    server.resume(id, &format!("round {round}"));
}

#[test]
fn repeated_pauses_fold_into_one_node_that_keeps_every_write() {
    // Each pause of a sandbox resumed from a pause node supersedes that node. Before pauses
    // were folded, every cycle added a link to the disk's backing chain (resumes slowed down
    // cycle after cycle, the 256th pause could not be resumed) and kept the old node's memory.
    let server = TestServer::start();
    let id = server.create(json!({ "templateID": "base", "timeout": 600 }));
    let setup = server.exec(&id, json!({ "command": COUNTER_LOOP }));
    assert_eq!(setup.exit_code, Some(0), "{setup:?}");
    let rounds = 8;
    for round in 1..=rounds {
        let write = server.exec(
            &id,
            json!({ "command": format!("echo disk{round} > /home/user/r{round}.txt && echo mem{round} > /dev/shm/r{round}") }),
        );
        assert_eq!(write.exit_code, Some(0), "{write:?}");
        pause_and_resume(&server, &id, round);
        // The resume waited for the fold: one node, straight on the template.
        let nodes = nodes_of(&server, &id);
        assert_eq!(nodes.len(), 1, "round {round}: {nodes:?}");
        assert_eq!(nodes[0]["kind"], "pause");
        assert!(nodes[0]["parentID"].is_null(), "round {round}: {nodes:?}");
        assert!(nodes[0]["sizeBytes"].as_u64().unwrap() > 0);
    }
    // Every round's disk and memory writes are there, and the process ran through them all.
    let expected: String = (1..=rounds).map(|r| format!("disk{r}\nmem{r}\n")).collect();
    let read = server.exec(
        &id,
        json!({ "command": format!("for r in $(seq 1 {rounds}); do cat /home/user/r$r.txt /dev/shm/r$r; done") }),
    );
    assert_eq!(read.out(), expected, "{read:?}");
    let before = counter(&server, &id);
    assert!(wait_until(Duration::from_secs(10), || counter(&server, &id) > before + 2));
    let entries = std::fs::read_dir(server.data_dir.join("snapshots")).unwrap().count();
    assert_eq!(entries, 1, "the folded nodes' files are gone");

    // A node something else needs is not folded: while the fork's child runs, its node keeps
    // the pause under it, and only the pauses after it fold (into one node under the fork's).
    let last_pause = nodes_of(&server, &id)[0]["snapshotID"].as_str().unwrap().to_owned();
    let child = server.fork_one(&id);
    for round in rounds + 1..=rounds + 3 {
        pause_and_resume(&server, &id, round);
    }
    let nodes = nodes_of(&server, &id);
    let kinds: Vec<&str> = nodes.iter().map(|n| n["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["pause", "fork", "pause"], "{nodes:?}");
    assert_eq!(nodes[0]["snapshotID"], last_pause);
    let fork_node = nodes[1]["snapshotID"]
        .as_str()
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .to_owned();
    assert_eq!(nodes[2]["parentID"], fork_node.as_str(), "{nodes:?}");
    assert_eq!(
        server
            .exec(&child, json!({ "command": format!("cat /home/user/r{rounds}.txt") }))
            .out(),
        format!("disk{rounds}\n")
    );
    // Once the fork's child is gone, its node is the sandbox's alone: the next pause folds it
    // and the pause under it too.
    let mine = server.exec(&child, json!({ "command": "echo child > /home/user/child.txt" }));
    assert_eq!(mine.exit_code, Some(0), "{mine:?}");
    assert_eq!(
        server.delete(&format!("/sandboxes/{child}")).send().unwrap().status(),
        204
    );
    pause_and_resume(&server, &id, rounds + 4);
    let nodes = nodes_of(&server, &id);
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    assert!(nodes[0]["parentID"].is_null(), "{nodes:?}");
    let read = server.exec(
        &id,
        json!({ "command": "cat /home/user/r1.txt /dev/shm/r1 /home/user/child.txt 2>&1" }),
    );
    assert!(read.out().starts_with("disk1\nmem1\n"), "{read:?}");
    assert!(
        read.out().contains("No such file"),
        "the child's write is not the parent's: {read:?}"
    );

    // A sandbox created from the new pause node as soon as the pause answers waits for the fold
    // under way (it would otherwise open a disk chain being merged) and reads every write.
    pause(&server, &id, rounds + 5);
    let paused_on = snapshots(&server)
        .into_iter()
        .find(|n| n["sandboxes"].as_array().is_some_and(|s| s.contains(&json!(id))))
        .expect("the node the paused sandbox stands on");
    let from_node = server.create(json!({ "templateID": paused_on["snapshotID"], "timeout": 600 }));
    let read = server.exec(
        &from_node,
        json!({ "command": format!("cat /home/user/r1.txt /home/user/r{rounds}.txt /dev/shm/r{rounds}") }),
    );
    assert_eq!(read.out(), format!("disk1\ndisk{rounds}\nmem{rounds}\n"), "{read:?}");
    let nodes = nodes_of(&server, &id);
    assert_eq!(nodes.len(), 1, "the fold ended before the create: {nodes:?}");
    assert_eq!(
        server
            .delete(&format!("/sandboxes/{from_node}"))
            .send()
            .unwrap()
            .status(),
        204
    );

    assert_eq!(server.delete(&format!("/sandboxes/{id}")).send().unwrap().status(), 204);
    assert!(snapshots(&server).is_empty(), "{:?}", snapshots(&server));
    let entries = std::fs::read_dir(server.data_dir.join("snapshots")).unwrap().count();
    assert_eq!(entries, 0, "no snapshot files are left");
}

#[test]
fn a_fold_a_crash_interrupted_is_finished_by_the_next_pause() {
    // A fold renames the merged layer over the new node's disk (step 3), then re-parents the
    // new node and deletes the folded one (step 4). A crash between the two left a node with
    // neither layer nor state as the new node's parent; no later pause could fold it, so it
    // stayed for the sandbox's life. The state such a crash leaves is made here by hand: the
    // server stopped, a row without files put between the sandbox's node and the template.
    let temp = tempfile::Builder::new().prefix("viv-e2e-").tempdir().unwrap();
    let server = TestServer::start_on(temp.path(), None);
    let id = server.create(json!({ "templateID": "base", "timeout": 600 }));
    server.exec(&id, json!({ "command": "echo one > /home/user/one.txt" }));
    pause_and_resume(&server, &id, 1);
    server.exec(&id, json!({ "command": "echo two > /home/user/two.txt" }));
    pause(&server, &id, 2);
    assert!(wait_until(Duration::from_secs(20), || nodes_of(&server, &id).len() == 1));
    let node = nodes_of(&server, &id)[0]["snapshotID"]
        .as_str()
        .unwrap()
        .trim_end_matches(":default")
        .to_owned();
    assert!(server.stop(libc::SIGTERM).success());

    let remnant = "interruptedfold00000";
    let db = rusqlite::Connection::open(temp.path().join("vivarium.db")).unwrap();
    db.execute_batch(&format!(
        "CREATE TEMP TABLE copied AS SELECT * FROM snapshots WHERE id = '{node}';
         UPDATE copied SET id = '{remnant}';
         INSERT INTO snapshots SELECT * FROM copied;
         UPDATE snapshots SET parent_id = '{remnant}' WHERE id = '{node}';"
    ))
    .unwrap();
    drop(db);
    std::fs::create_dir(temp.path().join("snapshots").join(remnant)).unwrap();

    let server = TestServer::start_on(temp.path(), None);
    let nodes = nodes_of(&server, &id);
    assert_eq!(nodes.len(), 2, "{nodes:?}");
    resume(&server, &id, 2);
    server.exec(&id, json!({ "command": "echo three > /home/user/three.txt" }));
    pause_and_resume(&server, &id, 3);
    let nodes = nodes_of(&server, &id);
    assert_eq!(nodes.len(), 1, "the empty row was folded too: {nodes:?}");
    assert!(nodes[0]["parentID"].is_null(), "{nodes:?}");
    assert!(!temp.path().join("snapshots").join(remnant).exists());
    let read = server.exec(
        &id,
        json!({ "command": "cat /home/user/one.txt /home/user/two.txt /home/user/three.txt" }),
    );
    assert_eq!(read.out(), "one\ntwo\nthree\n", "{read:?}");
    assert_eq!(server.delete(&format!("/sandboxes/{id}")).send().unwrap().status(), 204);
    assert!(nodes_of(&server, &id).is_empty());
    assert!(server.stop(libc::SIGTERM).success());
    crate::fixture::remove_template_memory(temp.path());
}

#[test]
fn a_pause_whose_qemu_dies_fails_cleanly_and_paused_sandboxes_survive_a_restart() {
    let temp = tempfile::Builder::new().prefix("viv-e2e-").tempdir().unwrap();
    let server = TestServer::start_on(temp.path(), None);
    let kept = server.create(json!({ "templateID": "base", "timeout": 600 }));
    server.exec(&kept, json!({ "command": "echo kept > /home/user/k.txt" }));
    assert_eq!(
        server
            .post(&format!("/sandboxes/{kept}/pause"))
            .send()
            .unwrap()
            .status(),
        204
    );

    // QEMU killed while its sandbox is being paused: the pause fails, nothing half-written stays.
    let victim = server.create(json!({ "templateID": "base", "timeout": 600 }));
    server.exec(
        &victim,
        json!({ "command": "head -c 200000000 /dev/urandom > /dev/shm/big" }),
    );
    let run_dir = server.data_dir.join("sandboxes").join(&victim);
    let pid = crate::fixture::qemu_processes_under(&run_dir)[0];
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(150));
        // SAFETY: plain kill of a process this test's server started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    });
    let pause = server.post(&format!("/sandboxes/{victim}/pause")).send().unwrap();
    killer.join().unwrap();
    if pause.status() == 204 {
        // The pause won the race; the sandbox is paused, which is fine too.
        eprintln!("the pause finished before QEMU was killed");
    } else {
        assert_eq!(pause.status(), 502, "{}", pause.text().unwrap_or_default());
        assert!(wait_until(Duration::from_secs(20), || {
            crate::fixture::failure_of(&server, &victim).is_some()
        }));
        let building: Vec<_> = std::fs::read_dir(server.data_dir.join("snapshots"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".building"))
            .collect();
        assert!(building.is_empty(), "no half-written snapshot is left");
    }
    let nodes = snapshots(&server);
    assert!(nodes
        .iter()
        .any(|n| n["sandboxes"].as_array().unwrap().iter().any(|s| s == &kept)));

    // Restart: the paused sandbox is still paused and resumes with its files. A server without
    // network cards cannot restore a node saved with one: a 409 that says what to do, and the
    // sandbox stays paused.
    assert!(server.stop(libc::SIGTERM).success());
    let without_cards = TestServer::start_on_with(temp.path(), &["--network", "none"]);
    let refused = without_cards
        .post(&format!("/sandboxes/{kept}/connect"))
        .json(&json!({ "timeout": 60 }))
        .send()
        .unwrap();
    assert_eq!(refused.status(), 409);
    assert!(refused.text().unwrap().contains("--network"));
    let info: Value = without_cards
        .get(&format!("/sandboxes/{kept}"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(info["state"], "paused");
    assert!(without_cards.stop(libc::SIGTERM).success());
    let server = TestServer::start_on(temp.path(), None);
    let info: Value = server
        .get(&format!("/sandboxes/{kept}"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(info["state"], "paused");
    let resumed = server
        .post(&format!("/sandboxes/{kept}/connect"))
        .json(&json!({ "timeout": 60 }))
        .send()
        .unwrap();
    assert_eq!(resumed.status(), 201, "{}", resumed.text().unwrap_or_default());
    assert_eq!(
        server.exec(&kept, json!({ "command": "cat /home/user/k.txt" })).out(),
        "kept\n"
    );
    let missing = server
        .post("/sandboxes/nope/connect")
        .json(&json!({ "timeout": 60 }))
        .send()
        .unwrap();
    assert_eq!(missing.status(), 404);
    for id in [&kept, &victim] {
        let _ = server.delete(&format!("/sandboxes/{id}")).send();
    }
    assert!(server.stop(libc::SIGTERM).success());
    crate::fixture::remove_template_memory(temp.path());
}

#[test]
fn pauses_and_forks_racing_the_collector_keep_their_nodes() {
    // Every kill runs the collector, which deletes pause and fork nodes nothing uses. A new
    // node used to be visible to it for a moment before its sandbox pointed at it: a pause
    // then failed ("FOREIGN KEY constraint failed") and took the sandbox with it.
    let server = TestServer::shared();
    let sandbox = server.sandbox();
    let id = sandbox.id.clone();
    assert_eq!(sandbox.sh("echo kept > /home/user/kept.txt").exit_code, Some(0));
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let other = server.create(json!({ "templateID": "base", "timeout": 120 }));
                let killed = server.delete(&format!("/sandboxes/{other}")).send().unwrap();
                assert_eq!(killed.status(), 204);
            }
        });
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            for round in 0..6 {
                let paused = server.post(&format!("/sandboxes/{id}/pause")).send().unwrap();
                assert_eq!(paused.status(), 204, "round {round}: {}", paused.text().unwrap());
                let resumed = server
                    .post(&format!("/sandboxes/{id}/connect"))
                    .json(&json!({ "timeout": 600 }))
                    .send()
                    .unwrap();
                assert_eq!(resumed.status(), 201, "round {round}: {}", resumed.text().unwrap());
                let child = server.fork_one(&id);
                assert_eq!(
                    server
                        .exec(&child, json!({ "command": "cat /home/user/kept.txt" }))
                        .out(),
                    "kept\n"
                );
                assert_eq!(
                    server.delete(&format!("/sandboxes/{child}")).send().unwrap().status(),
                    204
                );
                assert_eq!(sandbox.sh("cat /home/user/kept.txt").out(), "kept\n", "round {round}");
            }
        }));
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    });
}
