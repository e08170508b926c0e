//! Faults and lifecycle edges: dying VMs, timeouts, user-supplied images.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use crate::fixture::{failure_of, wait_until, TestServer};

fn state_of(server: &TestServer, id: &str) -> Value {
    server.get(&format!("/sandboxes/{id}")).send().unwrap().json().unwrap()
}

#[test]
fn a_killed_qemu_or_a_panicking_guest_marks_the_sandbox_failed_and_frees_it() {
    let server = TestServer::start();
    let victim = server.sandbox();
    let panicking = server.sandbox();
    let healthy = server.sandbox();
    assert_eq!(server.qemu_processes().len(), 3);

    // QEMU killed from outside.
    let run_dir = server.data_dir.join("sandboxes").join(&victim.id);
    let pid = crate::fixture::qemu_processes_under(&run_dir)[0];
    // SAFETY: plain kill of a process this test's server started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    assert!(wait_until(Duration::from_secs(20), || failure_of(&server, &victim.id).is_some()));
    let reason = failure_of(&server, &victim.id).unwrap();
    assert!(reason.contains("QEMU exited"), "{reason}");
    // Gone for E2B clients: a 404 that says why, and absent from their list.
    let gone = server.get(&format!("/sandboxes/{}", victim.id)).send().unwrap();
    assert_eq!(gone.status(), 404);
    assert!(gone.text().unwrap().contains("QEMU exited"));
    let listed: Value = server.get("/v2/sandboxes").send().unwrap().json().unwrap();
    assert!(listed.as_array().unwrap().iter().all(|s| s["sandboxID"] != victim.id));
    assert!(!run_dir.exists(), "the failed sandbox's files are removed");
    let exec = server
        .post(&format!("/sandboxes/{}/exec", victim.id))
        .json(&json!({"command": "true"}))
        .send()
        .unwrap();
    assert_eq!(exec.status(), 502);
    assert!(exec.text().unwrap().contains("failed"));

    // The guest kernel panics (triggered a moment after the command returns).
    let crash = server.exec(
        &panicking.id,
        json!({ "command": "(sleep 0.5; echo c > /proc/sysrq-trigger) >/dev/null 2>&1 &", "user": "root" }),
    );
    assert_eq!(crash.exit_code, Some(0), "{crash:?}");
    let panicked = wait_until(Duration::from_secs(60), || failure_of(&server, &panicking.id).is_some());
    if !panicked {
        let run_dir = server.data_dir.join("sandboxes").join(&panicking.id);
        let console = std::fs::read_to_string(run_dir.join("console.log")).unwrap_or_default();
        eprintln!("console of the guest that did not go down:\n{console}");
        let ps = server.exec(&panicking.id, json!({ "command": "ps -eo pid,pgid,sid,stat,args" }));
        panic!("the guest did not go down\nconsole:\n{console}\nprocesses: {ps:?}");
    }
    let reason = failure_of(&server, &panicking.id).unwrap();
    assert!(reason.contains("panicked"), "{reason}");

    // Neighbours are unaffected; failed sandboxes can be deleted.
    assert_eq!(healthy.sh("echo fine").out(), "fine\n");
    assert_eq!(server.qemu_processes().len(), 1);
    for id in [&victim.id, &panicking.id] {
        assert_eq!(server.delete(&format!("/sandboxes/{id}")).send().unwrap().status(), 204);
    }
}

#[test]
fn sandboxes_die_when_their_timeout_passes_unless_extended() {
    let server = TestServer::shared();
    let short = server.create(json!({ "timeout": 2 }));
    let extended = server.create(json!({ "timeout": 8 }));
    let set = server
        .post(&format!("/sandboxes/{extended}/timeout"))
        .json(&json!({ "timeout": 120 }))
        .send()
        .unwrap();
    assert_eq!(set.status(), 204);
    assert!(wait_until(Duration::from_secs(15), || server
        .get(&format!("/sandboxes/{short}"))
        .send()
        .unwrap()
        .status()
        == 404));
    assert_eq!(state_of(server, &extended)["state"], "running");
    let bad = server
        .post(&format!("/sandboxes/{extended}/timeout"))
        .json(&json!({ "timeout": 10_000_000 }))
        .send()
        .unwrap();
    assert_eq!(bad.status(), 400);
    assert_eq!(
        server
            .delete(&format!("/sandboxes/{extended}"))
            .send()
            .unwrap()
            .status(),
        204
    );
}

#[test]
fn user_supplied_directories_and_ext4_images_become_sandboxes() {
    let server = TestServer::shared();
    let cache = std::env::var("VIV_CACHE_DIR").unwrap_or_else(|_| "/var/cache/vivarium".into());
    let tree = tempfile::tempdir().unwrap();
    let root = tree.path();
    for dir in ["bin", "etc", "root", "tmp"] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static is installed");
    std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
    std::fs::write(root.join("etc/motd"), "tiny image\n").unwrap();
    let name = format!("tiny-{}", std::process::id());
    // The images land in the shared cache; they go when the test ends, however it ends.
    let _imported = RemoveOnDrop(vec![
        Path::new(&cache).join(format!("rootfs/{name}.qcow2")),
        Path::new(&cache).join(format!("rootfs/{name}-ext4.qcow2")),
    ]);
    let imported = crate::fixture::cli_with(
        &[
            "image",
            "import",
            &name,
            "--dir",
            root.to_str().unwrap(),
            "--cache-dir",
            &cache,
            "--json",
        ],
        &[],
        None,
    );
    assert_eq!(imported.code, 0, "{imported:?}");

    let id = server.create(json!({ "templateID": name, "timeout": 600 }));
    let run = server.exec(&id, json!({ "argv": ["/bin/busybox", "cat", "/etc/motd"] }));
    assert_eq!(run.out(), "tiny image\n");
    assert_eq!(
        server.exec(&id, json!({ "argv": ["/bin/busybox", "id", "-u"] })).out(),
        "0\n"
    );

    // The same tree as an ext4 image.
    let img_dir = tempfile::tempdir().unwrap();
    let img = img_dir.path().join("tiny.ext4");
    let status = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(root)
        .arg(&img)
        .arg("64M")
        .status()
        .unwrap();
    assert!(status.success());
    let ext4_name = format!("{name}-ext4");
    let imported = crate::fixture::cli_with(
        &[
            "image",
            "import",
            &ext4_name,
            "--ext4",
            img.to_str().unwrap(),
            "--cache-dir",
            &cache,
        ],
        &[],
        None,
    );
    assert_eq!(imported.code, 0, "{imported:?}");
    let id2 = server.create(json!({ "templateID": ext4_name, "timeout": 600 }));
    assert_eq!(
        server
            .exec(&id2, json!({ "argv": ["/bin/busybox", "cat", "/etc/motd"] }))
            .out(),
        "tiny image\n"
    );

    let not_ext4 = crate::fixture::cli_with(
        &[
            "image",
            "import",
            "bad",
            "--ext4",
            "/etc/hostname",
            "--cache-dir",
            &cache,
        ],
        &[],
        None,
    );
    assert_eq!(not_ext4.code, 1);
    assert!(not_ext4.stderr.contains("not an ext2/3/4"), "{}", not_ext4.stderr);
    let bad_name = crate::fixture::cli_with(
        &["image", "import", "Bad/Name", "--dir", "/tmp", "--cache-dir", &cache],
        &[],
        None,
    );
    assert!(bad_name.stderr.contains("invalid image name"), "{}", bad_name.stderr);

    for id in [id, id2] {
        assert_eq!(server.delete(&format!("/sandboxes/{id}")).send().unwrap().status(), 204);
    }
    for n in [&name, &ext4_name] {
        let _ = std::fs::remove_file(std::path::Path::new(&cache).join("rootfs").join(format!("{n}.qcow2")));
    }
}

/// Files removed when dropped.
struct RemoveOnDrop(Vec<std::path::PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}
