//! A VM's consoles through the REST API and the CLI: the serial console WebSocket (shared by
//! several clients, the replay, input, breaks, closed when the VM stops), its capped log,
//! `viv console` (raw terminal restored, the escape sequence, `--no-replay`, `--log`), the VNC
//! WebSocket and PNG screenshots; and what the routes answer for VMs that do not run.
//!
//! The tests that start a VM need the VM runtime's `POST /vms/{id}/start` and `/kill`.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::stream::MaybeTlsStream;
use tokio_tungstenite::tungstenite::{self, Message, WebSocket};

use crate::fixture::{unique, TestServer, VIV};

/// Boot under TCG on a busy 2-core host takes seconds; this bounds a hang, not a slow boot.
pub const BOOT_DEADLINE: Duration = Duration::from_secs(240);
pub const MARKER: &str = "VIVARIUM-ISO-BOOTED";
pub const READY: &str = "VIVARIUM-ACPID-READY";

pub type Socket = WebSocket<MaybeTlsStream<TcpStream>>;

/// How a WebSocket request authenticates.
#[derive(Clone, Copy)]
pub enum Auth<'a> {
    /// The `X-API-Key` header.
    Header,
    /// A `viv-key.KEY` subprotocol (what a browser does).
    Subprotocol(&'a str),
    /// None.
    Without,
}

/// Opens a WebSocket on `path`, offering `protocols`; the error is the refusal's status and
/// JSON body.
pub fn ws(
    server: &TestServer,
    path: &str,
    auth: Auth,
    protocols: &[&str],
) -> Result<(Socket, Option<String>), (u16, Value)> {
    let url = format!("{}{path}", server.url.replacen("http://", "ws://", 1));
    let mut request = url.into_client_request().unwrap();
    let mut offered: Vec<String> = protocols.iter().map(|p| p.to_string()).collect();
    match auth {
        Auth::Header => {
            request
                .headers_mut()
                .insert("X-API-Key", HeaderValue::from_str(&server.key).unwrap());
        }
        Auth::Subprotocol(key) => offered.push(format!("viv-key.{key}")),
        Auth::Without => {}
    }
    if !offered.is_empty() {
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_str(&offered.join(", ")).unwrap(),
        );
    }
    match tungstenite::connect(request) {
        Ok((socket, response)) => {
            let selected = response
                .headers()
                .get("Sec-WebSocket-Protocol")
                .map(|v| v.to_str().unwrap().to_owned());
            if let MaybeTlsStream::Plain(tcp) = socket.get_ref() {
                tcp.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
            }
            Ok((socket, selected))
        }
        Err(tungstenite::Error::Http(response)) => {
            let status = response.status().as_u16();
            let body = response.into_body().unwrap_or_default();
            Err((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
        }
        Err(e) => panic!("WebSocket {path}: {e}"),
    }
}

/// Asserts a refused WebSocket: this status and a message containing `needle`.
fn refused(result: Result<(Socket, Option<String>), (u16, Value)>, status: u16, needle: &str) {
    match result {
        Ok(_) => panic!("the WebSocket was accepted; expected {status}"),
        Err((code, body)) => {
            assert_eq!(code, status, "{body}");
            assert_eq!(body["code"], status, "{body}");
            let message = body["message"].as_str().unwrap_or_default();
            assert!(message.contains(needle), "'{needle}' not in '{message}'");
        }
    }
}

fn error_of(response: reqwest::blocking::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: Value = response.json().unwrap();
    assert_eq!(body["code"], status, "{body}");
    (status, body["message"].as_str().unwrap_or_default().to_owned())
}

#[test]
fn console_routes_answer_for_unknown_and_stopped_vms() {
    let server = TestServer::shared();
    let name = unique("console");
    let created = server
        .post("/vms")
        .json(&json!({"name": name, "display": "vnc"}))
        .send()
        .unwrap();
    assert_eq!(created.status(), 201);
    let id = created.json::<Value>().unwrap()["id"].as_str().unwrap().to_owned();

    // Unknown VMs: 404 naming the VM (not the router's "no such route").
    for path in ["/vms/nope/console", "/vms/nope/vnc"] {
        refused(ws(server, path, Auth::Header, &[]), 404, "no VM 'nope'");
    }
    for path in ["/vms/nope/console/log", "/vms/nope/screenshot"] {
        let (status, message) = error_of(server.get(path).send().unwrap());
        assert_eq!((status, message.as_str()), (404, "no VM 'nope'"), "{path}");
    }

    // A defined VM: its consoles need it running; its log is there (empty) all the same.
    refused(
        ws(server, &format!("/vms/{name}/console"), Auth::Header, &[]),
        409,
        "start it first",
    );
    refused(
        ws(server, &format!("/vms/{id}/vnc"), Auth::Header, &["binary"]),
        409,
        "start it first",
    );
    let (status, message) = error_of(server.get(&format!("/vms/{id}/screenshot")).send().unwrap());
    assert_eq!(status, 409, "{message}");
    let log = server.get(&format!("/vms/{name}/console/log")).send().unwrap();
    assert_eq!(log.status(), 200);
    assert_eq!(log.headers()["content-type"], "text/plain");
    assert!(log.bytes().unwrap().is_empty());
    for query in ["tail=abc", "tail=-1", "lines=3"] {
        let (status, _) = error_of(server.get(&format!("/vms/{id}/console/log?{query}")).send().unwrap());
        assert_eq!(status, 400, "{query}");
    }
    let (status, _) = error_of(server.get(&format!("/vms/{id}/console?replay=maybe")).send().unwrap());
    assert_eq!(status, 400);

    // Browsers' authentication: the key as a subprotocol passes (409: the VM is not running),
    // a wrong one or none does not, and a key in the URL is never taken.
    let path = format!("/vms/{id}/console");
    refused(
        ws(server, &path, Auth::Subprotocol(&server.key), &["viv-console"]),
        409,
        "start it first",
    );
    refused(
        ws(server, &path, Auth::Subprotocol("e2b_0000"), &["viv-console"]),
        401,
        "invalid",
    );
    refused(ws(server, &path, Auth::Without, &["viv-console"]), 401, "X-API-Key");
    let in_url = format!("{path}?key={}", server.key);
    refused(ws(server, &in_url, Auth::Without, &[]), 401, "X-API-Key");

    // The CLI says the same, and prints the (empty) log of a stopped VM.
    let out = server.cli(&["console", &name, "--log"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.stdout, "");
    let out = server.cli(&["console", "nope"]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("no VM 'nope' (HTTP 404)"), "{}", out.stderr);
    let out = server.cli(&["console", &name]);
    assert_eq!(out.code, 1);
    assert!(
        out.stderr.contains("start it first") && out.stderr.contains("HTTP 409"),
        "{}",
        out.stderr
    );

    assert_eq!(server.delete(&format!("/vms/{id}")).send().unwrap().status(), 204);
}

/// The test ISO (`tests/fixtures/vm-iso/build`, cached).
pub fn iso() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/vm-iso/build");
    let built = Command::new("bash")
        .arg(&script)
        .output()
        .expect("running the vm-iso fixture builder");
    assert!(
        built.status.success(),
        "tests/fixtures/vm-iso/build failed: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    PathBuf::from(String::from_utf8(built.stdout).unwrap().trim())
}

/// Adds the test ISO to the server's library under `name` (the storage API's `POST /isos`
/// from a local path).
pub fn add_iso(server: &TestServer, name: &str) {
    let added = server
        .put(&format!("/isos/{name}"))
        .body(std::fs::read(iso()).unwrap())
        .send()
        .unwrap();
    assert!(added.status().is_success(), "adding the ISO: {}", added.text().unwrap());
}

/// Output read from a console WebSocket.
pub struct Seen {
    socket: Socket,
    /// Everything read so far.
    pub text: Vec<u8>,
    closed: Option<String>,
}

impl Seen {
    pub fn new(socket: Socket) -> Self {
        Self {
            socket,
            text: Vec::new(),
            closed: None,
        }
    }

    pub fn lossy(&self) -> String {
        String::from_utf8_lossy(&self.text).into_owned()
    }

    /// Reads one message (up to the socket's read timeout); false once closed.
    pub fn pump(&mut self) -> Option<Message> {
        match self.socket.read() {
            Ok(Message::Binary(bytes)) => {
                self.text.extend_from_slice(&bytes);
                None
            }
            Ok(Message::Close(frame)) => {
                self.closed = Some(frame.map(|f| f.reason.to_string()).unwrap_or_default());
                None
            }
            Ok(other) => Some(other),
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
            {
                None
            }
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                self.closed.get_or_insert_with(String::new);
                None
            }
            Err(e) => panic!("console WebSocket: {e}"),
        }
    }

    /// Reads until `needle` appears after byte `from`.
    pub fn wait_for(&mut self, needle: &str, from: usize, limit: Duration) {
        let start = Instant::now();
        while !String::from_utf8_lossy(&self.text[from.min(self.text.len())..]).contains(needle) {
            assert!(self.closed.is_none(), "closed before {needle:?}:\n{}", self.lossy());
            assert!(
                start.elapsed() < limit,
                "no {needle:?} within {limit:?}:\n{}",
                self.lossy()
            );
            self.pump();
        }
    }

    /// Reads until the server closes the socket; returns the close reason.
    pub fn wait_closed(&mut self, limit: Duration) -> String {
        let start = Instant::now();
        while self.closed.is_none() {
            assert!(start.elapsed() < limit, "the console did not close within {limit:?}");
            self.pump();
        }
        self.closed.clone().unwrap()
    }

    pub fn send(&mut self, message: Message) {
        self.socket.send(message).unwrap();
    }
}

/// Decodes a PNG; true when its pixels are not all the same.
fn png_is_not_blank(png: &[u8]) -> (u32, u32, bool) {
    let decoder = png::Decoder::new(std::io::Cursor::new(png));
    let mut reader = decoder.read_info().expect("a PNG header");
    let mut pixels = vec![0; reader.output_buffer_size().expect("a PNG of a sane size")];
    let frame = reader.next_frame(&mut pixels).expect("PNG data");
    let bpp = frame.line_size / frame.width as usize;
    let pixels = &pixels[..frame.buffer_size()];
    let first = &pixels[..bpp];
    (frame.width, frame.height, pixels.chunks(bpp).any(|p| p != first))
}

/// `viv console ARGS` with its stdin on a pseudo-terminal (so it takes raw mode) and its stdout
/// and stderr read by threads.
struct CliConsole {
    child: std::process::Child,
    master: std::fs::File,
    slave: std::fs::File,
    out: mpsc::Receiver<Vec<u8>>,
    err: mpsc::Receiver<Vec<u8>>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

impl CliConsole {
    fn spawn(server: &TestServer, args: &[&str]) -> Self {
        let (mut master, mut slave) = (0, 0);
        // SAFETY: openpty writes two descriptors into the integers; the optional name,
        // termios and window size pointers are null.
        let opened = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(opened, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: both descriptors were just opened and are owned by nothing else.
        let (master, slave): (std::fs::File, std::fs::File) = unsafe {
            use std::os::fd::FromRawFd as _;
            (std::fs::File::from_raw_fd(master), std::fs::File::from_raw_fd(slave))
        };
        let mut child = Command::new(VIV)
            .arg("console")
            .args(args)
            .env("VIV_API_URL", &server.url)
            .env("VIV_API_KEY", &server.key)
            .stdin(slave.try_clone().unwrap())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let pipe = |mut from: Box<dyn std::io::Read + Send>| {
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = from.read(&mut buf) {
                    if tx.send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            });
            rx
        };
        let out = pipe(Box::new(child.stdout.take().unwrap()));
        let err = pipe(Box::new(child.stderr.take().unwrap()));
        Self {
            child,
            master,
            slave,
            out,
            err,
            stdout: Vec::new(),
            stderr: Vec::new(),
        }
    }

    fn drain(&mut self) {
        while let Ok(chunk) = self.out.try_recv() {
            self.stdout.extend(chunk);
        }
        while let Ok(chunk) = self.err.try_recv() {
            self.stderr.extend(chunk);
        }
    }

    /// Waits until stdout (or stderr) contains `needle` after byte `from`.
    fn wait_for(&mut self, needle: &str, stderr: bool, from: usize, limit: Duration) {
        let start = Instant::now();
        loop {
            self.drain();
            let text = if stderr { &self.stderr } else { &self.stdout };
            if String::from_utf8_lossy(&text[from.min(text.len())..]).contains(needle) {
                return;
            }
            assert!(
                start.elapsed() < limit,
                "no {needle:?} from viv console within {limit:?}; stdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&self.stdout),
                String::from_utf8_lossy(&self.stderr)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Types on the terminal.
    fn type_in(&mut self, bytes: &[u8]) {
        self.master.write_all(bytes).unwrap();
    }

    /// Whether the terminal is in canonical (cooked) mode.
    fn canonical(&self) -> bool {
        use std::os::fd::AsRawFd as _;
        // SAFETY: all zeroes is a valid termios, filled by tcgetattr on an open descriptor.
        let mut termios: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: the descriptor is open; termios is writable.
        assert_eq!(unsafe { libc::tcgetattr(self.slave.as_raw_fd(), &mut termios) }, 0);
        termios.c_lflag & libc::ICANON != 0 && termios.c_lflag & libc::ECHO != 0
    }

    /// Waits for the CLI to exit; its status.
    fn wait_exit(&mut self, limit: Duration) -> i32 {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                self.drain();
                return status.code().unwrap_or(-1);
            }
            assert!(start.elapsed() < limit, "viv console did not exit within {limit:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for CliConsole {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_running_vms_consoles_through_the_api_and_the_cli() {
    let server = TestServer::shared();
    let name = unique("console");
    let iso_name = format!("{name}-iso");
    add_iso(server, &iso_name);
    let created = server
        .post("/vms")
        .json(&json!({"name": name, "cdroms": [{"iso": iso_name}], "display": "vnc"}))
        .send()
        .unwrap();
    assert_eq!(created.status(), 201);
    let id = created.json::<Value>().unwrap()["id"].as_str().unwrap().to_owned();
    let started = server.post(&format!("/vms/{id}/start")).send().unwrap();
    assert!(started.status().is_success(), "start: {}", started.text().unwrap());

    // Two clients from boot on, one with the header, one as a browser (the key as a
    // subprotocol, never echoed back).
    let console = format!("/vms/{id}/console");
    let (socket, selected) = ws(server, &console, Auth::Header, &["viv-console"]).unwrap();
    assert_eq!(selected.as_deref(), Some("viv-console"));
    let mut first = Seen::new(socket);
    let (socket, selected) = ws(server, &console, Auth::Subprotocol(&server.key), &["viv-console"]).unwrap();
    assert_eq!(
        selected.as_deref(),
        Some("viv-console"),
        "the key subprotocol is never selected"
    );
    let mut second = Seen::new(socket);
    first.wait_for(MARKER, 0, BOOT_DEADLINE);
    second.wait_for(MARKER, 0, Duration::from_secs(30));
    first.wait_for(READY, 0, Duration::from_secs(120));

    // A late client gets the boot banner replayed; one without replay only what comes next.
    let attach = Instant::now();
    let (socket, _) = ws(server, &console, Auth::Header, &[]).unwrap();
    let mut late = Seen::new(socket);
    late.wait_for(MARKER, 0, Duration::from_secs(30));
    println!(
        "FIGURE console attach (WebSocket upgrade to the replayed boot banner): {} ms",
        attach.elapsed().as_millis()
    );
    let (socket, _) = ws(server, &format!("{console}?replay=false"), Auth::Header, &[]).unwrap();
    let mut fresh = Seen::new(socket);

    // Input from one client; every client sees the answer.
    let from = first.text.len();
    first.send(Message::Binary(b"sizes\n".to_vec().into()));
    first.wait_for("VIV-SIZES-END", from, Duration::from_secs(60));
    second.wait_for("VIV-SIZES-END", 0, Duration::from_secs(30));
    fresh.wait_for("VIV-SIZES-END", 0, Duration::from_secs(30));
    assert!(
        !fresh.lossy().contains(MARKER),
        "replayed with replay=false:\n{}",
        fresh.lossy()
    );

    // A break: the guest kernel's serial driver takes break + key as a magic SysRq.
    let from = second.text.len();
    second.send(Message::Text(r#"{"type":"break"}"#.into()));
    second.send(Message::Binary(b"h".to_vec().into()));
    second.wait_for("sysrq", from, Duration::from_secs(30));
    // An unknown control message is answered, and the session goes on.
    second.send(Message::Text(r#"{"type":"reboot"}"#.into()));
    let start = Instant::now();
    let answer = loop {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no answer to an unknown control"
        );
        if let Some(Message::Text(text)) = second.pump() {
            break serde_json::from_str::<Value>(&text).unwrap();
        }
    };
    assert_eq!(answer["type"], "error", "{answer}");
    assert!(answer["message"].as_str().unwrap().contains("break"), "{answer}");

    // The log has the boot; a tail is its end. (The guest may print between the two reads: the
    // tail read first is then inside the log read after it, as the end of what it was.)
    let tail = server
        .get(&format!("/vms/{name}/console/log?tail=64"))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    assert_eq!(tail.len(), 64);
    let log = server.get(&format!("/vms/{id}/console/log")).send().unwrap();
    assert_eq!(log.status(), 200);
    let log = log.bytes().unwrap();
    assert!(String::from_utf8_lossy(&log).contains(MARKER));
    assert!(log.ends_with(&tail) || log.windows(tail.len()).any(|w| w == &tail[..]));

    // A screenshot: a non-blank PNG (the guest wrote its marker on tty0).
    let shot = server.get(&format!("/vms/{id}/screenshot")).send().unwrap();
    assert_eq!(shot.status(), 200);
    assert_eq!(shot.headers()["content-type"], "image/png");
    let png = shot.bytes().unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    let (width, height, varied) = png_is_not_blank(&png);
    assert!(width >= 320 && height >= 200, "{width}x{height}");
    assert!(varied, "the screenshot is blank");

    // The display through its WebSocket: the RFB banner, as noVNC reads it.
    let (socket, selected) = ws(
        server,
        &format!("/vms/{id}/vnc"),
        Auth::Subprotocol(&server.key),
        &["binary"],
    )
    .unwrap();
    assert_eq!(selected.as_deref(), Some("binary"));
    let mut display = Seen::new(socket);
    display.wait_for("RFB 003.008\n", 0, Duration::from_secs(30));
    assert!(display.text.starts_with(b"RFB 003.008\n"), "{}", display.lossy());
    display.send(Message::Binary(b"RFB 003.008\n".to_vec().into()));
    // The server's security types follow (a count, then that many types; 1 = none).
    let start = Instant::now();
    while display.text.len() < 13 {
        assert!(start.elapsed() < Duration::from_secs(30), "no security types");
        display.pump();
    }
    assert!(
        display.text[12] >= 1,
        "no security type offered: {:?}",
        &display.text[12..]
    );

    // The CLI: raw terminal while attached, the replay, input, the escape sequence, cooked
    // terminal again after.
    let mut cli = CliConsole::spawn(server, &[&name]);
    assert!(cli.canonical(), "the pseudo-terminal starts cooked");
    cli.wait_for("Ctrl-] . detaches", true, 0, Duration::from_secs(30));
    assert!(!cli.canonical(), "not in raw mode while attached");
    cli.wait_for(MARKER, false, 0, Duration::from_secs(30));
    let from = cli.stdout.len();
    cli.type_in(b"sizes\r");
    cli.wait_for("VIV-SIZES-END", false, from, Duration::from_secs(60));
    cli.type_in(b"\x1d.");
    assert_eq!(cli.wait_exit(Duration::from_secs(30)), 0);
    assert!(String::from_utf8_lossy(&cli.stderr).contains("detached"));
    assert!(cli.canonical(), "the terminal was not restored after detaching");
    drop(cli);

    let mut cli = CliConsole::spawn(server, &[&name, "--no-replay"]);
    cli.wait_for("Ctrl-] . detaches", true, 0, Duration::from_secs(30));
    cli.type_in(b"sizes\r");
    cli.wait_for("VIV-SIZES-END", false, 0, Duration::from_secs(60));
    assert!(
        !String::from_utf8_lossy(&cli.stdout).contains(MARKER),
        "replayed with --no-replay"
    );
    cli.type_in(b"\x1dq");
    assert_eq!(cli.wait_exit(Duration::from_secs(30)), 0);
    assert!(cli.canonical());
    drop(cli);

    let out = server.cli(&["console", &name, "--log", "--tail", "100"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let tail = server
        .get(&format!("/vms/{id}/console/log?tail=100"))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    assert_eq!(tail.len(), 100);
    assert_eq!(out.stdout, String::from_utf8_lossy(&tail));

    // A CLI attached when the VM stops leaves by itself, with its terminal restored.
    let mut cli = CliConsole::spawn(server, &[&id]);
    cli.wait_for("Ctrl-] . detaches", true, 0, Duration::from_secs(30));

    // The VM stops: every console closes, saying why; the log stays readable.
    let killed = server.post(&format!("/vms/{id}/kill")).send().unwrap();
    assert!(killed.status().is_success(), "kill: {}", killed.text().unwrap());
    for client in [&mut first, &mut second, &mut late, &mut fresh] {
        assert_eq!(client.wait_closed(Duration::from_secs(60)), "the VM stopped");
    }
    assert_eq!(cli.wait_exit(Duration::from_secs(60)), 0);
    assert!(String::from_utf8_lossy(&cli.stderr).contains("the VM stopped"));
    assert!(cli.canonical(), "the terminal was not restored when the VM stopped");
    refused(ws(server, &console, Auth::Header, &[]), 409, "start it first");
    let (status, _) = error_of(server.get(&format!("/vms/{id}/screenshot")).send().unwrap());
    assert_eq!(status, 409);
    let after = server
        .get(&format!("/vms/{id}/console/log"))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    assert!(String::from_utf8_lossy(&after).contains(MARKER));
    let out = server.cli(&["console", &name, "--log"]);
    assert!(out.stdout.contains(MARKER), "{}", out.stderr);

    // Deleting the VM deletes its log.
    let logs = server.data_dir.join("consoles").join(&id);
    assert!(logs.join("console.log").is_file());
    assert_eq!(server.delete(&format!("/vms/{id}")).send().unwrap().status(), 204);
    assert!(!logs.exists(), "{} left behind", logs.display());
    let _ = server.delete(&format!("/isos/{iso_name}")).send();
}

#[test]
fn a_vm_without_a_display_has_no_vnc_or_screenshot() {
    let server = TestServer::shared();
    let name = unique("headless");
    let iso_name = format!("{name}-iso");
    add_iso(server, &iso_name);
    let created = server
        .post("/vms")
        .json(&json!({"name": name, "cdroms": [{"iso": iso_name}]}))
        .send()
        .unwrap();
    assert_eq!(created.status(), 201);
    let id = created.json::<Value>().unwrap()["id"].as_str().unwrap().to_owned();
    let started = server.post(&format!("/vms/{id}/start")).send().unwrap();
    assert!(started.status().is_success(), "start: {}", started.text().unwrap());

    refused(
        ws(server, &format!("/vms/{id}/vnc"), Auth::Header, &["binary"]),
        409,
        "has no display",
    );
    let (status, message) = error_of(server.get(&format!("/vms/{id}/screenshot")).send().unwrap());
    assert_eq!(status, 409);
    assert!(message.contains("has no display"), "{message}");
    // Its serial console works all the same.
    let (socket, _) = ws(server, &format!("/vms/{id}/console"), Auth::Header, &[]).unwrap();
    Seen::new(socket).wait_for(MARKER, 0, BOOT_DEADLINE);
    // A plain GET of a WebSocket route is told what to do.
    let (status, message) = error_of(server.get(&format!("/vms/{id}/console")).send().unwrap());
    assert_eq!(status, 400);
    assert!(message.contains("WebSocket"), "{message}");

    let killed = server.post(&format!("/vms/{id}/kill")).send().unwrap();
    assert!(killed.status().is_success(), "kill: {}", killed.text().unwrap());
    assert_eq!(server.delete(&format!("/vms/{id}")).send().unwrap().status(), 204);
    let _ = server.delete(&format!("/isos/{iso_name}")).send();
}
