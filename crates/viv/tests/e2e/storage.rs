//! The storage pool through the REST API and the CLI: disks (create, upload with a checksum the
//! server checks, import of foreign formats, download, resize, linked and full clones, wipe,
//! delete) and ISOs, asynchronous operations and their events, and the errors a person meets
//! (400 for bad names and checksums, 404, 409 naming the VM or clone that holds a disk).

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use sha2::Digest as _;

use crate::fixture::TestServer;

const MIB: usize = 1 << 20;

/// Bytes no run of zeros hides: a raw image of `len` bytes (a multiple of 512).
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| ((i * 31) ^ (i >> 9) ^ (i >> 17)) as u8).collect()
}

fn sha256(data: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(data))
}

/// A file holding an ISO 9660 volume descriptor (all the pool checks of an ISO).
fn iso_image() -> Vec<u8> {
    let mut iso = vec![0u8; 64 * 1024];
    iso[0x8000] = 1;
    iso[0x8001..0x8006].copy_from_slice(b"CD001");
    iso[0x9000..0x9010].copy_from_slice(b"vivarium-iso-e2e");
    iso
}

fn error_of(resp: reqwest::blocking::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    let body: Value = resp.json().unwrap();
    assert_eq!(body["code"], status, "{body}");
    (status, body["message"].as_str().unwrap_or_default().to_owned())
}

fn ok_json(resp: reqwest::blocking::Response, status: u16) -> Value {
    let code = resp.status().as_u16();
    let text = resp.text().unwrap();
    assert_eq!(code, status, "{text}");
    serde_json::from_str(&text).unwrap()
}

/// Waits for an operation (a 202 answer's body) to end; returns it.
fn wait(server: &TestServer, op: &Value) -> Value {
    let id = op["id"].as_str().unwrap();
    for _ in 0..20 {
        let op = ok_json(
            server.get(&format!("/operations/{id}/wait?timeout=60")).send().unwrap(),
            200,
        );
        if op["state"] != "running" {
            return op;
        }
    }
    panic!("operation {id} still runs after 20 minutes");
}

pub(crate) fn succeeded(server: &TestServer, resp: reqwest::blocking::Response) -> Value {
    let op = ok_json(resp, 202);
    assert_eq!(op["state"], "running", "{op}");
    let done = wait(server, &op);
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(done["progress"], 1.0);
    assert!(done["finishedAt"].is_string());
    done
}

fn download(server: &TestServer, name: &str) -> Vec<u8> {
    let resp = server.get(&format!("/disks/{name}/download")).send().unwrap();
    assert_eq!(resp.status(), 200);
    let len: usize = resp.headers()["content-length"].to_str().unwrap().parse().unwrap();
    let body = resp.bytes().unwrap().to_vec();
    assert_eq!(body.len(), len);
    body
}

/// Files in the pool's disk directory whose names start with a dot (temporaries).
fn temporaries(server: &TestServer) -> Vec<String> {
    std::fs::read_dir(server.data_dir.join("storage/disks"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect()
}

fn qemu_img(args: &[&str]) {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn disks_are_created_uploaded_downloaded_resized_and_deleted() {
    let server = TestServer::start();

    // Create, get, list.
    let disk = ok_json(
        server
            .post("/disks")
            .json(&json!({"name": "empty", "size": 64 * MIB}))
            .send()
            .unwrap(),
        201,
    );
    assert_eq!(disk["format"], "qcow2", "{disk}");
    assert_eq!(disk["virtualSize"], 64 * MIB);
    assert_eq!(disk["usedBy"], json!([]));
    let got = ok_json(server.get("/disks/empty").send().unwrap(), 200);
    assert_eq!(got["virtualSize"], 64 * MIB);
    let (status, message) = error_of(
        server
            .post("/disks")
            .json(&json!({"name": "empty", "size": 1024}))
            .send()
            .unwrap(),
    );
    assert_eq!(status, 409, "{message}");

    // Bad input.
    let (status, message) = error_of(
        server
            .post("/disks")
            .json(&json!({"name": "odd", "size": 1000}))
            .send()
            .unwrap(),
    );
    assert_eq!(status, 400);
    assert!(message.contains("512"), "{message}");
    let (status, message) = error_of(
        server
            .post("/disks")
            .json(&json!({"name": "huge", "size": (64u64 << 40) + 512}))
            .send()
            .unwrap(),
    );
    assert_eq!(status, 400);
    assert!(message.contains("64 TiB"), "{message}");
    for bad in ["", "..", "../x", ".hidden", "a b", "x/y"] {
        let resp = server
            .post("/disks")
            .json(&json!({"name": bad, "size": 1024}))
            .send()
            .unwrap();
        assert_eq!(error_of(resp).0, 400, "{bad}");
    }
    assert_eq!(error_of(server.get("/disks/..%2Fx").send().unwrap()).0, 400);
    assert_eq!(error_of(server.get("/disks/.x").send().unwrap()).0, 400);
    assert_eq!(error_of(server.delete("/disks/nope").send().unwrap()).0, 404);
    assert_eq!(error_of(server.get("/disks/nope/download").send().unwrap()).0, 404);
    assert_eq!(error_of(server.get("/operations/op-nope").send().unwrap()).0, 404);

    // Upload with the right checksum: listed, and downloaded byte for byte.
    let image = pattern(4 * MIB);
    let created = ok_json(
        server
            .put("/disks/data/upload")
            .header("X-Content-SHA256", sha256(&image))
            .body(image.clone())
            .send()
            .unwrap(),
        201,
    );
    assert_eq!(created["format"], "raw", "{created}");
    assert_eq!(created["virtualSize"], 4 * MIB);
    let list: Vec<Value> = server.get("/disks").send().unwrap().json().unwrap();
    let names: Vec<&str> = list.iter().map(|d| d["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["data", "empty"]);
    assert!(
        download(&server, "data") == image,
        "the download differs from the upload"
    );

    // A wrong checksum: 400, no disk, no temporary file.
    let (status, message) = error_of(
        server
            .put(&format!("/disks/bad/upload?sha256={}", sha256(b"something else")))
            .body(image.clone())
            .send()
            .unwrap(),
    );
    assert_eq!(status, 400);
    assert!(message.contains("SHA-256"), "{message}");
    assert_eq!(error_of(server.get("/disks/bad").send().unwrap()).0, 404);
    assert_eq!(temporaries(&server), Vec::<String>::new());
    // No checksum at all (a small body: the answer comes before the body is read).
    let (status, message) = error_of(server.put("/disks/bad/upload").body(pattern(512)).send().unwrap());
    assert_eq!(status, 400);
    assert!(message.contains("X-Content-SHA256"), "{message}");

    // Grow; a shrink needs force and says what is lost.
    let grown = ok_json(
        server
            .post("/disks/data/resize")
            .json(&json!({"size": 8 * MIB}))
            .send()
            .unwrap(),
        200,
    );
    assert_eq!(grown["virtualSize"], 8 * MIB);
    let (status, message) = error_of(
        server
            .post("/disks/data/resize")
            .json(&json!({"size": 2 * MIB}))
            .send()
            .unwrap(),
    );
    assert_eq!(status, 400);
    assert!(message.contains("loses the data"), "{message}");
    let shrunk = ok_json(
        server
            .post("/disks/data/resize")
            .json(&json!({"size": 2 * MIB, "force": true}))
            .send()
            .unwrap(),
        200,
    );
    assert_eq!(shrunk["virtualSize"], 2 * MIB);
    assert!(
        download(&server, "data") == image[..2 * MIB],
        "a shrink keeps the data before the end"
    );

    // Delete.
    assert_eq!(server.delete("/disks/empty").send().unwrap().status(), 204);
    assert_eq!(error_of(server.get("/disks/empty").send().unwrap()).0, 404);
}

#[test]
fn the_cli_creates_uploads_downloads_and_resizes_disks() {
    let server = TestServer::start();
    let dir = tempfile::tempdir().unwrap();
    let image = pattern(3 * MIB);
    let source = dir.path().join("disk.img");
    std::fs::write(&source, &image).unwrap();

    let out = server.cli(&["disk", "create", "root", "--size", "10G"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.contains("root") && out.stdout.contains("10.00 GiB"),
        "{}",
        out.stdout
    );
    let out = server.cli(&["disk", "upload", "data", source.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out = server.cli(&["disk", "upload", "data", source.to_str().unwrap()]);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("already exists"), "{}", out.stderr);
    let out = server.cli(&["disk", "upload", "other", "/no/such/file"]);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("/no/such/file"), "{}", out.stderr);
    let out = server.cli(&["--json", "disk", "list"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let list: Vec<Value> = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(list.len(), 2, "{list:?}");
    let back = dir.path().join("back.img");
    let out = server.cli(&["disk", "download", "data", back.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(std::fs::read(&back).unwrap() == image, "the CLI's download differs");

    let out = server.cli(&["disk", "resize", "root", "1G"]);
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains("--force") || out.stderr.contains("force"),
        "{}",
        out.stderr
    );
    let out = server.cli(&["--json", "disk", "resize", "root", "1G", "--force"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let disk: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(disk["virtualSize"], 1u64 << 30);
    let out = server.cli(&["disk", "create", "x", "--size", "1.5G"]);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("not a size"), "{}", out.stderr);

    let out = server.cli(&["disk", "delete", "root", "data"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out = server.cli(&["disk", "get", "root"]);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("404"), "{}", out.stderr);
}

#[test]
fn foreign_images_are_imported_and_converted() {
    let server = TestServer::start();
    let dir = tempfile::tempdir().unwrap();
    let image = pattern(4 * MIB);
    let raw = dir.path().join("source.raw");
    std::fs::write(&raw, &image).unwrap();
    let vmdk = dir.path().join("source.vmdk");
    let vdi = dir.path().join("source.vdi");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vmdk",
        raw.to_str().unwrap(),
        vmdk.to_str().unwrap(),
    ]);
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vdi",
        raw.to_str().unwrap(),
        vdi.to_str().unwrap(),
    ]);

    // Through the API: a vmdk becomes a qcow2 with the same content.
    let body = std::fs::read(&vmdk).unwrap();
    let done = succeeded(
        &server,
        server
            .put("/disks/from-vmdk/import")
            .header("X-Content-SHA256", sha256(&body))
            .body(body.clone())
            .send()
            .unwrap(),
    );
    assert_eq!(done["kind"], "import");
    assert_eq!(done["result"]["format"], "qcow2", "{done}");
    assert_eq!(done["result"]["virtualSize"], 4 * MIB);
    let qcow2 = dir.path().join("back.qcow2");
    std::fs::write(&qcow2, download(&server, "from-vmdk")).unwrap();
    qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        raw.to_str().unwrap(),
        qcow2.to_str().unwrap(),
    ]);
    assert_eq!(
        temporaries(&server),
        Vec::<String>::new(),
        "the received image is removed"
    );

    // A wrong checksum is refused before any work; no disk, no temporary.
    let (status, _) = error_of(
        server
            .put("/disks/bad/import")
            .header("X-Content-SHA256", sha256(b"x"))
            .body(body)
            .send()
            .unwrap(),
    );
    assert_eq!(status, 400);
    assert_eq!(error_of(server.get("/disks/bad").send().unwrap()).0, 404);
    assert_eq!(temporaries(&server), Vec::<String>::new());
    // Not an image qemu-img accepts from outside: the operation fails and leaves nothing.
    let backed = dir.path().join("backed.qcow2");
    let backed = backed.to_str().unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        raw.to_str().unwrap(),
        "-F",
        "raw",
        backed,
    ]);
    let op = ok_json(
        server
            .put("/disks/sneaky/import")
            .body(std::fs::read(backed).unwrap())
            .send()
            .unwrap(),
        202,
    );
    let done = wait(&server, &op);
    assert_eq!(done["state"], "failed", "{done}");
    assert_eq!(done["errorCode"], 400, "{done}");
    assert_eq!(error_of(server.get("/disks/sneaky").send().unwrap()).0, 404);
    assert_eq!(temporaries(&server), Vec::<String>::new());

    // Through the CLI: a vdi becomes a raw disk equal to the source byte for byte.
    let out = server.cli(&[
        "--json",
        "disk",
        "import",
        "from-vdi",
        vdi.to_str().unwrap(),
        "--format",
        "raw",
    ]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let disk: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(disk["format"], "raw", "{disk}");
    assert!(
        download(&server, "from-vdi") == image,
        "the imported raw disk differs from the source"
    );
}

#[test]
fn clones_and_wipes_are_operations_whose_events_are_published() {
    let server = TestServer::start();
    let image = pattern(2 * MIB);
    ok_json(
        server
            .put("/disks/base/upload")
            .header("X-Content-SHA256", sha256(&image))
            .body(image.clone())
            .send()
            .unwrap(),
        201,
    );

    // Follow the event stream from before the first operation.
    let events = server.get("/events?kind=operation").send().unwrap();
    assert_eq!(events.status(), 200);
    let (tx, rx) = std::sync::mpsc::channel::<Value>();
    std::thread::spawn(move || {
        for line in BufReader::new(events).lines().map_while(Result::ok) {
            if let Some(data) = line.strip_prefix("data:") {
                if tx.send(serde_json::from_str(data.trim()).unwrap()).is_err() {
                    return;
                }
            }
        }
    });

    // A linked clone names its backing disk, which then cannot be deleted, resized or wiped.
    let linked = succeeded(
        &server,
        server
            .post("/disks/base/clone")
            .json(&json!({"name": "thin", "linked": true}))
            .send()
            .unwrap(),
    );
    assert_eq!(linked["kind"], "clone");
    assert_eq!(linked["target"], "thin");
    assert_eq!(linked["result"]["backing"], "base", "{linked}");
    let thin = ok_json(server.get("/disks/thin").send().unwrap(), 200);
    assert_eq!(thin["backing"], "base");
    let (status, message) = error_of(server.delete("/disks/base").send().unwrap());
    assert_eq!(status, 409);
    assert!(message.contains("thin"), "{message}");
    let (status, message) = error_of(
        server
            .post("/disks/base/clone")
            .json(&json!({"name": "thin"}))
            .send()
            .unwrap(),
    );
    assert_eq!(status, 409, "{message}");
    assert_eq!(
        error_of(
            server
                .post("/disks/nope/clone")
                .json(&json!({"name": "y"}))
                .send()
                .unwrap()
        )
        .0,
        404
    );
    assert!(
        download(&server, "thin") != image,
        "a linked clone's file is a thin qcow2"
    );

    // A full clone is independent.
    let full = succeeded(
        &server,
        server
            .post("/disks/thin/clone")
            .json(&json!({"name": "copy"}))
            .send()
            .unwrap(),
    );
    assert_eq!(full["result"]["format"], "qcow2");
    assert!(full["result"].get("backing").is_none(), "{full}");

    // Wipe: same size, zeros.
    let copy_of_base = succeeded(
        &server,
        server
            .post("/disks/base/clone")
            .json(&json!({"name": "plain"}))
            .send()
            .unwrap(),
    );
    assert_eq!(copy_of_base["result"]["format"], "raw");
    assert!(download(&server, "plain") == image);
    let wiped = succeeded(&server, server.post("/disks/plain/wipe").send().unwrap());
    assert_eq!(wiped["kind"], "wipe");
    assert_eq!(wiped["result"]["virtualSize"], 2 * MIB);
    assert!(
        download(&server, "plain").iter().all(|&b| b == 0),
        "a wiped disk reads zeros"
    );
    let (status, message) = error_of(server.post("/disks/base/wipe").send().unwrap());
    assert_eq!(status, 409);
    assert!(message.contains("thin"), "{message}");
    let (status, message) = error_of(
        server
            .get(&format!(
                "/operations/{}/wait?timeout=601",
                wiped["id"].as_str().unwrap()
            ))
            .send()
            .unwrap(),
    );
    assert_eq!(status, 400);
    assert!(message.contains("600"), "{message}");
    let listed: Vec<Value> = server.get("/operations").send().unwrap().json().unwrap();
    assert!(listed.iter().any(|o| o["id"] == wiped["id"]), "{listed:?}");

    // Every operation's start and end arrived on the event stream.
    let mut seen: Vec<(String, String)> = Vec::new();
    let wanted = [linked["id"].clone(), full["id"].clone(), wiped["id"].clone()];
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !wanted
        .iter()
        .all(|id| seen.contains(&(id.as_str().unwrap().to_owned(), "succeeded".to_owned())))
    {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let event = rx.recv_timeout(left).expect("operation events within a minute");
        assert_eq!(event["kind"], "operation", "{event}");
        seen.push((
            event["id"].as_str().unwrap().to_owned(),
            event["state"].as_str().unwrap().to_owned(),
        ));
    }
    for id in &wanted {
        let id = id.as_str().unwrap().to_owned();
        assert!(seen.contains(&(id.clone(), "running".to_owned())), "{id}: {seen:?}");
    }

    // The CLI follows operations; the clone must go before its parent.
    let out = server.cli(&["disk", "clone", "base", "thin2", "--linked"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.stdout.contains("base"), "{}", out.stdout);
    let out = server.cli(&["disk", "wipe", "copy"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out = server.cli(&["disk", "delete", "base"]);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("409"), "{}", out.stderr);
    let out = server.cli(&["disk", "delete", "thin", "thin2", "base", "copy", "plain"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
}

#[test]
fn disks_and_isos_named_by_a_vm_cannot_be_deleted() {
    let server = TestServer::start();
    let dir = tempfile::tempdir().unwrap();
    ok_json(
        server
            .post("/disks")
            .json(&json!({"name": "root", "size": 16 * MIB}))
            .send()
            .unwrap(),
        201,
    );
    // ISOs: upload with a checksum, list, get; a wrong one is refused and leaves nothing.
    let iso = iso_image();
    let added = ok_json(
        server
            .put("/isos/installer")
            .header("X-Content-SHA256", sha256(&iso))
            .body(iso.clone())
            .send()
            .unwrap(),
        201,
    );
    assert_eq!(added["sha256"], sha256(&iso));
    assert_eq!(added["size"], iso.len());
    let (status, _) = error_of(
        server
            .put("/isos/other")
            .header("X-Content-SHA256", sha256(b"no"))
            .body(iso.clone())
            .send()
            .unwrap(),
    );
    assert_eq!(status, 400);
    assert_eq!(error_of(server.get("/isos/other").send().unwrap()).0, 404);
    let isos_dir: Vec<_> = std::fs::read_dir(server.data_dir.join("storage/isos"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(isos_dir.len(), 2, "only installer.iso and its sidecar: {isos_dir:?}");
    let (status, message) = error_of(server.put("/isos/notiso").body(pattern(64 * 1024)).send().unwrap());
    assert_eq!(status, 400);
    assert!(message.contains("ISO 9660"), "{message}");
    assert_eq!(error_of(server.delete("/isos/nope").send().unwrap()).0, 404);
    assert_eq!(error_of(server.get("/isos/.x").send().unwrap()).0, 400);

    // The CLI adds a local file (named after it) and lists it.
    let local = dir.path().join("rescue.iso");
    std::fs::write(&local, &iso).unwrap();
    let out = server.cli(&["iso", "add", local.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out = server.cli(&["--json", "iso", "list"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let isos: Vec<Value> = serde_json::from_str(&out.stdout).unwrap();
    let names: Vec<&str> = isos.iter().map(|i| i["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["installer", "rescue"]);
    assert!(isos.iter().all(|i| i["addedAt"].is_string()), "{isos:?}");

    // A VM names the disk and the ISO: neither can be deleted, and they say who holds them.
    ok_json(
        server
            .post("/vms")
            .json(&json!({
                "name": "web",
                "disks": [{"disk": "root"}],
                "cdroms": [{"iso": "installer"}],
            }))
            .send()
            .unwrap(),
        201,
    );
    let disk = ok_json(server.get("/disks/root").send().unwrap(), 200);
    assert_eq!(disk["usedBy"], json!(["web"]));
    let (status, message) = error_of(server.delete("/disks/root").send().unwrap());
    assert_eq!(status, 409);
    assert!(message.contains("VM 'web'") && message.contains("detach"), "{message}");
    let (status, message) = error_of(server.delete("/isos/installer").send().unwrap());
    assert_eq!(status, 409);
    assert!(message.contains("VM 'web'"), "{message}");
    let out = server.cli(&["iso", "delete", "installer"]);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("VM 'web'"), "{}", out.stderr);

    // Without the VM, both go.
    assert_eq!(server.delete("/vms/web").send().unwrap().status(), 204);
    assert_eq!(server.delete("/disks/root").send().unwrap().status(), 204);
    let out = server.cli(&["iso", "delete", "installer", "rescue"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let isos: Vec<Value> = server.get("/isos").send().unwrap().json().unwrap();
    assert!(isos.is_empty(), "{isos:?}");
    assert!(Path::new(&server.data_dir.join("storage/isos"))
        .read_dir()
        .unwrap()
        .next()
        .is_none());
}

/// Unmounts a test's file system when dropped (after the server on it stopped).
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn uploads_that_do_not_fit_are_refused_and_leave_nothing() {
    // The server's data directory on a 40 MiB file system.
    let dir = tempfile::Builder::new().prefix("viv-e2e-full-").tempdir().unwrap();
    let status = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=40m", "tmpfs"])
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success(), "mounting a tmpfs (the e2e tests run as root)");
    let _mounted = Mounted(dir.path().to_path_buf());
    let server = TestServer::start_on(dir.path(), None);
    let image = pattern(48 * MIB);

    // Announced larger than the free space: refused before a byte is stored. The server answers
    // at once and closes; a client still sending may see the connection close before it reads
    // the answer (reqwest does), so either is accepted, and nothing may be left.
    let sent = server
        .put("/disks/big/upload")
        .header("X-Content-SHA256", sha256(&image))
        .body(image.clone())
        .send();
    if let Ok(response) = sent {
        let (status, message) = error_of(response);
        assert_eq!(status, 413);
        assert!(message.contains("free"), "{message}");
    }
    assert_eq!(server.get("/disks/big").send().unwrap().status(), 404);
    // Not announced (chunked): the file system fills up, and the partial file goes.
    for route in ["/disks/big/upload", "/disks/big/import", "/isos/big"] {
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> = image.chunks(MIB).map(|c| Ok(c.to_vec())).collect();
        let body = reqwest::blocking::Body::new(ChunkedReader::new(chunks));
        let sent = server
            .put(&format!("{route}?sha256={}", sha256(&image)))
            .body(body)
            .send();
        // The server answers as soon as the file system is full; a client still sending may
        // see the connection close before it reads the answer.
        match sent {
            Ok(resp) => {
                // Its body unread, the connection closes: no next request may go on it.
                let connection = resp.headers().get("connection").cloned();
                assert_eq!(
                    connection.as_ref().map(|v| v.as_bytes()),
                    Some(&b"close"[..]),
                    "{route}"
                );
                let (status, message) = error_of(resp);
                assert_eq!(status, 413, "{route}: {message}");
                assert!(message.contains("no room"), "{route}: {message}");
            }
            Err(e) => assert!(e.is_body() || e.is_request(), "{route}: {e}"),
        }
        assert!(
            crate::fixture::wait_until(Duration::from_secs(30), || temporaries(&server).is_empty()),
            "{route}: {:?}",
            temporaries(&server)
        );
    }
    let isos: Vec<Value> = server.get("/isos").send().unwrap().json().unwrap();
    assert!(isos.is_empty(), "{isos:?}");
    assert!(std::fs::read_dir(server.data_dir.join("storage/isos"))
        .unwrap()
        .next()
        .is_none());
    let disks: Vec<Value> = server.get("/disks").send().unwrap().json().unwrap();
    assert!(disks.is_empty(), "{disks:?}");
    drop(server);
}

/// A body of unknown length (sent chunked): reads `chunks` one after the other.
struct ChunkedReader {
    chunks: std::vec::IntoIter<Result<Vec<u8>, std::io::Error>>,
    current: std::io::Cursor<Vec<u8>>,
}

impl ChunkedReader {
    fn new(chunks: Vec<Result<Vec<u8>, std::io::Error>>) -> Self {
        Self {
            chunks: chunks.into_iter(),
            current: std::io::Cursor::new(Vec::new()),
        }
    }
}

impl std::io::Read for ChunkedReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let n = self.current.read(buf)?;
            if n > 0 {
                return Ok(n);
            }
            match self.chunks.next() {
                Some(chunk) => self.current = std::io::Cursor::new(chunk?),
                None => return Ok(0),
            }
        }
    }
}
