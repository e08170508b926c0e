//! cloud-init for VMs through the REST API and the CLI: `cloudInit` at create and edit, the
//! NoCloud seed the guest finds as a CD-ROM labelled `cidata` (read back over the serial
//! console from the test ISO's guest), and the refusals (bad documents: 400; microvm: 409).

use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::stream::MaybeTlsStream;
use tokio_tungstenite::tungstenite::{self, Message, WebSocket};

use crate::fixture::{unique, TestServer};
use crate::vm_console::add_iso;

/// Boot under TCG on a busy 2-core host takes seconds; this bounds a hang, not a slow boot.
const BOOT_DEADLINE: Duration = Duration::from_secs(300);

/// A VM's serial console, read through its WebSocket.
pub(crate) struct Console {
    socket: WebSocket<MaybeTlsStream<TcpStream>>,
    pub text: String,
}

impl Console {
    pub fn open(server: &TestServer, vm: &str) -> Self {
        let url = format!("{}/vms/{vm}/console", server.url.replacen("http://", "ws://", 1));
        let mut request = url.into_client_request().unwrap();
        request
            .headers_mut()
            .insert("X-API-Key", HeaderValue::from_str(&server.key).unwrap());
        let (socket, _) = tungstenite::connect(request).expect("console WebSocket");
        if let MaybeTlsStream::Plain(tcp) = socket.get_ref() {
            tcp.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        }
        Self {
            socket,
            text: String::new(),
        }
    }

    /// Reads until `needle` appears after byte `from` of the (CR-free) text.
    pub fn wait_for(&mut self, needle: &str, from: usize, limit: Duration) {
        let start = Instant::now();
        while !self.text[from.min(self.text.len())..].contains(needle) {
            assert!(
                start.elapsed() < limit,
                "no {needle:?} within {limit:?}:\n{}",
                self.text
            );
            match self.socket.read() {
                Ok(Message::Binary(bytes)) => self.text.push_str(&String::from_utf8_lossy(&bytes).replace('\r', "")),
                Ok(Message::Close(_)) => panic!("console closed before {needle:?}:\n{}", self.text),
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                Err(e) => panic!("console WebSocket: {e}\n{}", self.text),
            }
        }
    }

    /// Types `line` (and a newline) on the console.
    pub fn send_line(&mut self, line: &str) {
        self.socket
            .send(Message::Binary(format!("{line}\n").into_bytes().into()))
            .unwrap();
    }

    /// Runs a shell command in the test guest (its `run` command) and returns what it printed
    /// between `BEGIN` and `END` markers (written split so the echoed command line has neither).
    pub fn run(&mut self, command: &str, limit: Duration) -> String {
        let from = self.text.len();
        self.send_line(&format!("run echo VIV-BEG''IN; {command}; echo VIV-E''ND"));
        self.wait_for("VIV-RUN-END", from, limit);
        let out = &self.text[from..];
        let begin = out.rfind("VIV-BEGIN\n").expect("begin marker") + "VIV-BEGIN\n".len();
        let end = out.rfind("VIV-END\n").expect("end marker");
        out[begin..end].to_owned()
    }
}

fn error_of(response: reqwest::blocking::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().unwrap();
    (status, body["message"].as_str().unwrap_or_default().to_owned())
}

#[test]
fn a_vm_boots_with_its_cloud_init_seed_and_reads_it_back() {
    let server = TestServer::shared();
    let name = unique("ci");
    let iso = format!("{name}-iso");
    add_iso(server, &iso);
    let dir = tempfile::tempdir().unwrap();
    let user_data = "#cloud-config\nhostname: ci-guest\nssh_authorized_keys:\n  - ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOx7 test@viv\npackages: [curl, \"jq\"]\n";
    let file = dir.path().join("user-data");
    std::fs::write(&file, user_data).unwrap();
    let meta = dir.path().join("meta-data");
    std::fs::write(&meta, "local-hostname: ci-guest\n").unwrap();

    // Created through the CLI, with the ISO to boot from.
    let out = server.cli(&[
        "vm",
        "create",
        &name,
        "--cdrom",
        &iso,
        "--memory",
        "256",
        "--user-data",
        file.to_str().unwrap(),
        "--meta-data",
        meta.to_str().unwrap(),
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    let id = out.stdout.trim().to_owned();
    let vm: Value = server.get(&format!("/vms/{id}")).send().unwrap().json().unwrap();
    assert_eq!(vm["definition"]["cloudInit"]["userData"], user_data, "{vm}");

    let started = server.post(&format!("/vms/{id}/start")).send().unwrap();
    assert!(started.status().is_success(), "start: {}", started.text().unwrap());
    let mut console = Console::open(server, &id);
    console.wait_for("VIVARIUM-ACPID-READY", 0, BOOT_DEADLINE);

    // The CD labelled cidata (SCSI CD-ROMs appear asynchronously after their driver loads).
    let device = console.run(
        "for i in $(seq 100); do findfs LABEL=cidata && break; sleep 0.2; done",
        Duration::from_secs(60),
    );
    let device = device.trim().to_owned();
    assert!(
        device.starts_with("/dev/sr"),
        "no device labelled cidata: {device:?}\n{}",
        console.text
    );
    let read = console.run(
        &format!("mkdir -p /ci && mount -t iso9660 -o ro {device} /ci && cat /ci/user-data"),
        Duration::from_secs(60),
    );
    assert_eq!(read, user_data, "user-data read back\n{}", console.text);
    let meta_read = console.run("cat /ci/meta-data", Duration::from_secs(60));
    assert_eq!(meta_read, format!("instance-id: {id}\nlocal-hostname: ci-guest\n"));
    assert!(
        !console
            .run("ls /ci", Duration::from_secs(60))
            .contains("network-config"),
        "no network-config was given"
    );

    // An edit through the CLI waits for the next start, which builds the seed again.
    let network = dir.path().join("network-config");
    std::fs::write(&network, "version: 2\nethernets:\n  eth0:\n    dhcp4: true\n").unwrap();
    let out = server.cli(&["vm", "edit", &id, "--network-config", network.to_str().unwrap()]);
    assert_eq!(out.code, 0, "{out:?}");
    let vm: Value = server.get(&format!("/vms/{id}")).send().unwrap().json().unwrap();
    assert_eq!(vm["definition"]["cloudInit"].get("networkConfig"), None, "{vm}");
    assert_eq!(
        vm["pendingDefinition"]["cloudInit"]["userData"], user_data,
        "an edit merges into cloudInit: {vm}"
    );
    let restarted = server.post(&format!("/vms/{id}/kill")).send().unwrap();
    assert!(restarted.status().is_success(), "kill: {}", restarted.text().unwrap());
    let started = server.post(&format!("/vms/{id}/start")).send().unwrap();
    assert!(started.status().is_success(), "start: {}", started.text().unwrap());
    let mut console = Console::open(server, &id);
    let from = console.text.len();
    console.wait_for("VIVARIUM-ACPID-READY", from, BOOT_DEADLINE);
    let read = console.run(
        "for i in $(seq 100); do d=$(findfs LABEL=cidata) && break; sleep 0.2; done; mkdir -p /ci && mount -t iso9660 -o ro $d /ci && cat /ci/network-config",
        Duration::from_secs(60),
    );
    assert_eq!(
        read, "version: 2\nethernets:\n  eth0:\n    dhcp4: true\n",
        "{}",
        console.text
    );

    assert!(server
        .post(&format!("/vms/{id}/kill"))
        .send()
        .unwrap()
        .status()
        .is_success());
    let seed = server.data_dir.join(format!("storage/seeds/{id}.iso"));
    assert!(seed.exists(), "the seed lives in the pool: {}", seed.display());
    // Unchanged data: the next start keeps the seed as it is.
    let built = std::fs::metadata(&seed).unwrap().modified().unwrap();
    let started = server.post(&format!("/vms/{id}/start")).send().unwrap();
    assert!(started.status().is_success(), "start: {}", started.text().unwrap());
    assert_eq!(
        std::fs::metadata(&seed).unwrap().modified().unwrap(),
        built,
        "the seed was rebuilt"
    );
    assert!(server
        .post(&format!("/vms/{id}/kill"))
        .send()
        .unwrap()
        .status()
        .is_success());
    assert_eq!(server.delete(&format!("/vms/{id}")).send().unwrap().status(), 204);
    assert!(!seed.exists(), "the seed goes with the VM");
}

#[test]
fn bad_cloud_init_is_refused() {
    let server = TestServer::shared();
    let create = |body: Value| error_of(server.post("/vms").json(&body).send().unwrap());
    let name = unique("ci-bad");

    let (status, message) = create(json!({"name": name, "cloudInit": {"userData": "hostname: x\n"}}));
    assert_eq!(status, 400, "{message}");
    assert!(message.contains("#cloud-config"), "{message}");
    let big = format!("#cloud-config\n#{}\n", "x".repeat(64 * 1024));
    let (status, message) = create(json!({"name": name, "cloudInit": {"userData": big}}));
    assert_eq!(status, 400, "{message}");
    assert!(
        message.contains("cloudInit.userData") && message.contains("65536"),
        "{message}"
    );
    let (status, message) =
        create(json!({"name": name, "cloudInit": {"userData": "#!/bin/sh\n", "metaData": "a: \u{0}"}}));
    assert_eq!(status, 400, "{message}");
    assert!(message.contains("meta-data"), "{message}");
    let (status, message) = create(json!({"name": name, "cloudInit": {"userData": "#!/bin/sh\n", "vendorData": "x"}}));
    assert_eq!(status, 400, "{message}");
    assert!(message.contains("vendorData"), "{message}");
    let (status, message) = create(json!({"name": name, "cloudInit": {"metaData": "a: b\n"}}));
    assert_eq!(status, 400, "{message}");
    assert!(message.contains("userData"), "{message}");

    let (status, message) =
        create(json!({"name": name, "machine": "microvm", "cloudInit": {"userData": "#cloud-config\n"}}));
    assert_eq!(status, 409, "{message}");
    assert!(
        message.contains("microvm") && message.contains("cloudInit"),
        "{message}"
    );

    // Edits: onto a microvm VM (409), bad documents (400); nothing is stored.
    let created = server
        .post("/vms")
        .json(&json!({"name": name, "machine": "microvm"}))
        .send()
        .unwrap();
    assert_eq!(created.status(), 201);
    let patch = |body: Value| error_of(server.patch(&format!("/vms/{name}")).json(&body).send().unwrap());
    let (status, message) = patch(json!({"cloudInit": {"userData": "#cloud-config\n"}}));
    assert_eq!(status, 409, "{message}");
    assert!(message.contains("microvm"), "{message}");
    let (status, message) = patch(json!({"machine": "q35", "cloudInit": {"userData": "\u{1b}[2J#cloud-config\n"}}));
    assert_eq!(status, 400, "{message}");
    let vm: Value = server.get(&format!("/vms/{name}")).send().unwrap().json().unwrap();
    assert_eq!(vm["definition"].get("cloudInit"), None, "{vm}");

    // The CLI: a file that cannot be read is named.
    let out = server.cli(&["vm", "edit", &name, "--user-data", "/nonexistent/user-data"]);
    assert_ne!(out.code, 0);
    assert!(out.stderr.contains("/nonexistent/user-data"), "{out:?}");
    // And a good edit, then its removal.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("u");
    std::fs::write(&file, "#cloud-config\n").unwrap();
    let out = server.cli(&[
        "vm",
        "edit",
        &name,
        "--machine",
        "q35",
        "--user-data",
        file.to_str().unwrap(),
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    let vm: Value = server.get(&format!("/vms/{name}")).send().unwrap().json().unwrap();
    assert_eq!(
        vm["definition"]["cloudInit"],
        json!({"userData": "#cloud-config\n"}),
        "{vm}"
    );
    let out = server.cli(&["vm", "edit", &name, "--no-cloud-init"]);
    assert_eq!(out.code, 0, "{out:?}");
    let vm: Value = server.get(&format!("/vms/{name}")).send().unwrap().json().unwrap();
    assert_eq!(vm["definition"].get("cloudInit"), None, "{vm}");
    assert_eq!(server.delete(&format!("/vms/{name}")).send().unwrap().status(), 204);
}

#[test]
fn a_vm_running_with_its_seed_is_taken_over_by_the_next_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_on_with(dir.path(), &["--on-shutdown", "leave"]);
    let name = unique("ci-adopt");
    let iso = format!("{name}-iso");
    add_iso(&server, &iso);
    let user_data = "#!/bin/sh\necho hello from the seed\n";
    let created = server
        .post("/vms")
        .json(&json!({"name": name, "memoryMib": 256, "cdroms": [{"iso": iso}], "cloudInit": {"userData": user_data}}))
        .send()
        .unwrap();
    assert_eq!(created.status(), 201);
    let id = created.json::<Value>().unwrap()["id"].as_str().unwrap().to_owned();
    let started = server.post(&format!("/vms/{id}/start")).send().unwrap();
    assert!(started.status().is_success(), "start: {}", started.text().unwrap());
    let mut console = Console::open(&server, &id);
    console.wait_for("VIVARIUM-ACPID-READY", 0, BOOT_DEADLINE);
    let pid = server
        .get(&format!("/vms/{id}"))
        .send()
        .unwrap()
        .json::<Value>()
        .unwrap()["pid"]
        .clone();
    drop(console);
    assert!(server.stop(libc::SIGTERM).success());
    drop(server);

    let server = TestServer::start_on_with(dir.path(), &["--on-shutdown", "kill"]);
    let vm: Value = server.get(&format!("/vms/{id}")).send().unwrap().json().unwrap();
    assert_eq!((vm["state"].as_str(), &vm["pid"]), (Some("running"), &pid), "{vm}");
    // The taken-over machine still has its seed drive, and the guest reads it.
    let mut console = Console::open(&server, &id);
    let read = console.run(
        "for i in $(seq 100); do d=$(findfs LABEL=cidata) && break; sleep 0.2; done; mkdir -p /ci && mount -t iso9660 -o ro $d /ci && cat /ci/user-data",
        Duration::from_secs(60),
    );
    assert_eq!(read, user_data, "{}", console.text);
    let metrics = server.get("/metrics").send().unwrap().text().unwrap();
    let reads = format!("vivarium_vm_disk_read_bytes_total{{vm=\"{id}\",name=\"{name}\",disk=\"cidata\"}} ");
    let line = metrics.lines().find_map(|l| l.strip_prefix(&reads));
    assert!(
        line.is_some_and(|v| v.parse::<f64>().unwrap() > 0.0),
        "the seed drive's reads:\n{metrics}"
    );
    assert!(server
        .post(&format!("/vms/{id}/kill"))
        .send()
        .unwrap()
        .status()
        .is_success());
}
