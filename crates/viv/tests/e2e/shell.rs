//! Terminals in sandboxes: the terminal WebSocket (`GET /sandboxes/{id}/terminal`) as a client
//! speaks it, `viv shell` on a pseudo-terminal as a person uses it (prompt, commands, resize,
//! exit code, the terminal restored, the sandbox killed under it) and piped, `viv sandbox logs`
//! (the console log, `-f`), and `viv top` on a pseudo-terminal.

use std::io::{Read as _, Write as _};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt as _;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::{self, Message};

use crate::fixture::{cli_with, wait_until, TestServer, VIV};
use crate::vm_console::{ws, Auth, Socket};

/// Bounds a hang, not a slow step: a busy 2-core host under TCG.
const LIMIT: Duration = Duration::from_secs(60);

/// A `viv` command on a pseudo-terminal (its controlling terminal: stdin, stdout and stderr),
/// the way a person runs it; what it writes is collected by a thread.
pub struct PtyCli {
    child: Child,
    master: std::fs::File,
    slave: std::fs::File,
    output: Arc<Mutex<Vec<u8>>>,
}

impl PtyCli {
    pub fn spawn(server: &TestServer, args: &[&str], (cols, rows): (u16, u16)) -> Self {
        let (mut master, mut slave) = (0, 0);
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: openpty writes two descriptors into the integers and reads the window size;
        // the name and termios pointers are null.
        let opened = unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), &size) };
        assert_eq!(opened, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: both descriptors were just opened and are owned by nothing else.
        let (master, slave): (std::fs::File, std::fs::File) = unsafe {
            use std::os::fd::FromRawFd as _;
            (std::fs::File::from_raw_fd(master), std::fs::File::from_raw_fd(slave))
        };
        let mut command = Command::new(VIV);
        command
            .args(args)
            .env("VIV_API_URL", &server.url)
            .env("VIV_API_KEY", &server.key)
            .env("TERM", "xterm")
            .stdin(slave.try_clone().unwrap())
            .stdout(slave.try_clone().unwrap())
            .stderr(slave.try_clone().unwrap());
        // SAFETY: between fork and exec only async-signal-safe calls: a new session whose
        // controlling terminal is the pseudo-terminal on stdin (so it gets SIGWINCH).
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().unwrap();
        let output = Arc::new(Mutex::new(Vec::new()));
        let mut reader = master.try_clone().unwrap();
        let sink = output.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = reader.read(&mut buf) {
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Self {
            child,
            master,
            slave,
            output,
        }
    }

    /// Everything written so far, lossily decoded.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.output.lock().unwrap().len()
    }

    /// Waits until the output after byte `from` contains `needle`.
    pub fn wait_for(&self, needle: &str, from: usize, limit: Duration) {
        let start = Instant::now();
        loop {
            let text = {
                let out = self.output.lock().unwrap();
                String::from_utf8_lossy(&out[from.min(out.len())..]).into_owned()
            };
            if text.contains(needle) {
                return;
            }
            assert!(
                start.elapsed() < limit,
                "no {needle:?} within {limit:?}; output:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The screen as a full-screen program (ratatui over crossterm) drew it, lines of
    /// characters: cursor moves (`CSI row;col H`) and clears (`CSI 2 J`) are followed, other
    /// escape sequences (styles, modes) skipped. A program that redraws only changed cells
    /// leaves words split across its writes; the screen puts them back together.
    pub fn screen(&self) -> Vec<String> {
        let text = self.text();
        let mut grid: Vec<Vec<char>> = Vec::new();
        let (mut row, mut col) = (0usize, 0usize);
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\x1b' => {
                    if chars.peek() != Some(&'[') {
                        chars.next();
                        continue;
                    }
                    chars.next();
                    let mut params = String::new();
                    let mut end = ' ';
                    for c in chars.by_ref() {
                        if ('\x40'..='\x7e').contains(&c) {
                            end = c;
                            break;
                        }
                        params.push(c);
                    }
                    match end {
                        'H' => {
                            let mut it = params.split(';').map(|n| n.parse::<usize>().unwrap_or(1));
                            row = it.next().unwrap_or(1).saturating_sub(1);
                            col = it.next().unwrap_or(1).saturating_sub(1);
                        }
                        'J' if params == "2" => grid.clear(),
                        _ => {}
                    }
                }
                '\r' => col = 0,
                '\n' => row += 1,
                c => {
                    while grid.len() <= row {
                        grid.push(Vec::new());
                    }
                    let line = &mut grid[row];
                    while line.len() <= col {
                        line.push(' ');
                    }
                    line[col] = c;
                    col += 1;
                }
            }
        }
        grid.into_iter().map(|l| l.into_iter().collect()).collect()
    }

    /// Waits until the screen (see [`PtyCli::screen`]) shows `needle` on some line.
    pub fn wait_for_screen(&self, needle: &str, limit: Duration) {
        let start = Instant::now();
        while !self.screen().iter().any(|l| l.contains(needle)) {
            assert!(
                start.elapsed() < limit,
                "no {needle:?} on the screen within {limit:?}:\n{}",
                self.screen().join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Types on the terminal.
    pub fn type_in(&mut self, bytes: &[u8]) {
        self.master.write_all(bytes).unwrap();
    }

    /// Resizes the terminal (the kernel sends SIGWINCH to the command).
    fn resize(&self, cols: u16, rows: u16) {
        set_window_size(&self.master, cols, rows);
    }

    /// Whether the terminal is in canonical (cooked) mode with echo.
    pub fn canonical(&self) -> bool {
        // SAFETY: all zeroes is a valid termios, filled by tcgetattr on an open descriptor.
        let mut termios: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: the descriptor is open; termios is writable.
        assert_eq!(unsafe { libc::tcgetattr(self.slave.as_raw_fd(), &mut termios) }, 0);
        termios.c_lflag & libc::ICANON != 0 && termios.c_lflag & libc::ECHO != 0
    }

    /// Waits for the command to exit; its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> i32 {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(
                start.elapsed() < limit,
                "the command did not exit within {limit:?}; output:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for PtyCli {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a terminal WebSocket said until it closed.
#[derive(Debug, Default)]
struct Transcript {
    texts: Vec<Value>,
    output: Vec<u8>,
    close: Option<u16>,
}

impl Transcript {
    fn lossy(&self) -> String {
        String::from_utf8_lossy(&self.output).into_owned()
    }

    /// Reads one message (up to the socket's read timeout); false once closed.
    fn pump(&mut self, socket: &mut Socket) -> bool {
        match socket.read() {
            Ok(Message::Binary(bytes)) => self.output.extend_from_slice(&bytes),
            Ok(Message::Text(text)) => self.texts.push(serde_json::from_str(&text).unwrap()),
            Ok(Message::Close(frame)) => {
                self.close = Some(frame.map_or(1005, |f| f.code.into()));
                return false;
            }
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                self.close.get_or_insert(1006);
                return false;
            }
            Err(e) => panic!("terminal WebSocket: {e}"),
        }
        true
    }

    fn until_closed(mut self, socket: &mut Socket) -> Self {
        let start = Instant::now();
        while self.pump(socket) {
            assert!(start.elapsed() < LIMIT, "not closed within {LIMIT:?}: {self:?}");
        }
        self
    }

    fn until_output(&mut self, socket: &mut Socket, needle: &str) {
        let start = Instant::now();
        while !self.lossy().contains(needle) {
            assert!(self.pump(socket), "closed before {needle:?}: {self:?} {}", self.lossy());
            assert!(
                start.elapsed() < LIMIT,
                "no {needle:?} within {LIMIT:?}: {}",
                self.lossy()
            );
        }
    }
}

#[test]
fn the_terminal_websocket_speaks_its_contract() {
    let server = TestServer::shared();
    let sandbox = server.sandbox();
    let id = &sandbox.id;
    let path = format!("/sandboxes/{id}/terminal");

    // Refusals come before the upgrade, as HTTP errors.
    let status = |result: Result<(Socket, Option<String>), (u16, Value)>| match result {
        Ok(_) => panic!("the upgrade was accepted"),
        Err((status, body)) => (status, body["message"].as_str().unwrap_or_default().to_owned()),
    };
    let (code, _) = status(ws(server, &path, Auth::Subprotocol("e2b_wrong"), &["viv-terminal.v1"]));
    assert_eq!(code, 401);
    let (code, _) = status(ws(server, &path, Auth::Without, &["viv-terminal.v1"]));
    assert_eq!(code, 401);
    let (code, message) = status(ws(
        server,
        "/sandboxes/nope/terminal",
        Auth::Header,
        &["viv-terminal.v1"],
    ));
    assert_eq!(code, 404, "{message}");
    assert!(message.contains("nope"), "{message}");
    let (code, message) = status(ws(server, &format!("{path}?cols=0&rows=5"), Auth::Header, &[]));
    assert_eq!(code, 400, "{message}");
    let plain = server.get(&path).send().unwrap();
    assert_eq!(plain.status(), 400);

    // A command: started, its output, its exit, close 1000. The key offered as a subprotocol
    // (as browsers do) is never echoed back: the terminal's own protocol is selected.
    let (mut socket, selected) = ws(
        server,
        &format!("{path}?cols=90&rows=20&cmd=echo%20hello%20$((6*7));%20stty%20size;%20exit%205"),
        Auth::Subprotocol(&server.key),
        &["viv-terminal.v1"],
    )
    .unwrap();
    assert_eq!(selected.as_deref(), Some("viv-terminal.v1"));
    let done = Transcript::default().until_closed(&mut socket);
    assert_eq!(done.texts.first().unwrap()["type"], "started", "{done:?}");
    assert!(done.texts[0]["pid"].as_u64().unwrap() > 1);
    assert!(done.lossy().contains("hello 42"), "{}", done.lossy());
    assert!(done.lossy().contains("20 90"), "{}", done.lossy());
    assert_eq!(done.texts.last().unwrap(), &json!({"type": "exit", "exitCode": 5}));
    assert_eq!(done.close, Some(1000));

    // An interactive shell: input, a resize applied before the input after it, `exit`.
    let (mut socket, _) = ws(
        server,
        &format!("{path}?cols=80&rows=24"),
        Auth::Header,
        &["viv-terminal.v1"],
    )
    .unwrap();
    let mut live = Transcript::default();
    live.until_output(&mut socket, "$ ");
    socket
        .send(Message::Text(r#"{"type":"resize","cols":77,"rows":11}"#.into()))
        .unwrap();
    socket
        .send(Message::Binary(b"stty size; whoami\r".to_vec().into()))
        .unwrap();
    live.until_output(&mut socket, "11 77");
    live.until_output(&mut socket, "user");
    socket.send(Message::Binary(b"exit 3\r".to_vec().into())).unwrap();
    let done = live.until_closed(&mut socket);
    assert_eq!(done.texts.last().unwrap(), &json!({"type": "exit", "exitCode": 3}));
    assert_eq!(done.close, Some(1000));

    // Without a terminal: stdin until `eof`, no echo.
    let (mut socket, _) = ws(server, &format!("{path}?pty=false&user=root"), Auth::Header, &[]).unwrap();
    socket
        .send(Message::Binary(b"echo piped as $(whoami)\nexit 4\n".to_vec().into()))
        .unwrap();
    socket.send(Message::Text(r#"{"type":"eof"}"#.into())).unwrap();
    let done = Transcript::default().until_closed(&mut socket);
    assert_eq!(done.lossy(), "piped as root\n");
    assert_eq!(done.texts.last().unwrap(), &json!({"type": "exit", "exitCode": 4}));

    // Failures after the upgrade: an error frame and close 1011; a control message the server
    // does not take: an error frame and close 1003.
    let (mut socket, _) = ws(server, &format!("{path}?user=nosuchuser"), Auth::Header, &[]).unwrap();
    let done = Transcript::default().until_closed(&mut socket);
    assert_eq!(done.texts.last().unwrap()["type"], "error", "{done:?}");
    assert!(
        done.texts.last().unwrap()["message"]
            .as_str()
            .unwrap()
            .contains("nosuchuser"),
        "{done:?}"
    );
    assert_eq!(done.close, Some(1011));
    let (mut socket, _) = ws(server, &path, Auth::Header, &[]).unwrap();
    socket.send(Message::Text(r#"{"type":"launch"}"#.into())).unwrap();
    let done = Transcript::default().until_closed(&mut socket);
    assert_eq!(done.texts.last().unwrap()["type"], "error", "{done:?}");
    assert_eq!(done.close, Some(1003));
}

#[test]
fn a_client_that_leaves_ends_its_process() {
    let server = TestServer::shared();
    let sandbox = server.sandbox();
    let path = format!("/sandboxes/{}/terminal?cmd=sleep%20987", sandbox.id);
    let (mut socket, _) = ws(server, &path, Auth::Header, &[]).unwrap();
    let mut transcript = Transcript::default();
    while transcript.texts.is_empty() {
        assert!(transcript.pump(&mut socket));
    }
    // -x: the whole command line, so the shell running pgrep (whose own line names the
    // pattern) does not match.
    let running = || sandbox.sh("pgrep -fx 'sleep 987' || true").out();
    assert!(!running().trim().is_empty(), "the command runs");
    drop(socket);
    assert!(
        wait_until(LIMIT, || running().trim().is_empty()),
        "the process outlived its client"
    );
}

#[test]
fn viv_shell_is_a_terminal_in_the_sandbox() {
    let server = TestServer::shared();
    let sandbox = server.sandbox();
    let started = Instant::now();
    let mut shell = PtyCli::spawn(server, &["shell", &sandbox.id], (100, 30));
    shell.wait_for("$ ", 0, LIMIT);
    // A figure for bench/RESULTS.md: the CLI started to the prompt shown.
    eprintln!("viv shell: prompt after {:?}", started.elapsed());
    assert!(!shell.canonical(), "raw mode while the shell runs");
    let mark = shell.len();
    shell.type_in(b"stty size; echo $((6*7))\r");
    shell.wait_for("30 100", mark, LIMIT);
    shell.wait_for("42", mark, LIMIT);
    // A resize reaches the remote terminal (SIGWINCH → resize message). The signal and the
    // typed line race, so the check repeats until the new size shows.
    shell.resize(120, 40);
    let start = Instant::now();
    loop {
        let mark = shell.len();
        shell.type_in(b"stty size\r");
        shell.wait_for("$ ", mark, LIMIT);
        if shell.text()[..].get(mark..).is_some_and(|t| t.contains("40 120")) {
            break;
        }
        assert!(start.elapsed() < LIMIT, "the resize never arrived:\n{}", shell.text());
    }
    shell.type_in(b"exit 3\r");
    assert_eq!(shell.wait_exit(LIMIT), 3, "{}", shell.text());
    assert!(shell.canonical(), "the terminal is restored");
}

#[test]
fn viv_shell_runs_commands_and_piped_scripts() {
    let server = TestServer::shared();
    let sandbox = server.sandbox();
    let env = [
        ("VIV_API_URL", server.url.as_str()),
        ("VIV_API_KEY", server.key.as_str()),
    ];
    let run = cli_with(
        &["shell", &sandbox.id, "--", "echo", "hi;", "exit", "7"],
        &env,
        Some(b""),
    );
    assert_eq!((run.code, run.stdout.as_str()), (7, "hi\n"), "{run:?}");
    let root = cli_with(&["shell", "-u", "root", &sandbox.id, "--", "whoami"], &env, Some(b""));
    assert_eq!((root.code, root.stdout.as_str()), (0, "root\n"), "{root:?}");
    let piped = cli_with(
        &["shell", &sandbox.id],
        &env,
        Some(b"cd /tmp && pwd\necho \"$((1+2))\" >&2\nexit 4\n"),
    );
    // stdout and stderr are merged (their relative order is not kept: two pipes).
    let mut lines: Vec<&str> = piped.stdout.lines().collect();
    lines.sort_unstable();
    assert_eq!((piped.code, lines), (4, vec!["/tmp", "3"]), "{piped:?}");
    let missing = cli_with(&["shell", "nope"], &env, Some(b""));
    assert_eq!(missing.code, 1);
    assert!(
        missing.stderr.contains("nope") && missing.stderr.contains("404"),
        "{missing:?}"
    );
}

#[test]
fn viv_shell_ends_with_a_message_when_its_sandbox_is_killed() {
    let server = TestServer::shared();
    let sandbox = server.sandbox();
    let mut shell = PtyCli::spawn(server, &["shell", &sandbox.id], (80, 24));
    shell.wait_for("$ ", 0, LIMIT);
    let killed = server.delete(&format!("/sandboxes/{}", sandbox.id)).send().unwrap();
    assert_eq!(killed.status(), 204);
    assert_eq!(shell.wait_exit(LIMIT), 1, "{}", shell.text());
    shell.wait_for("the shell ended: the sandbox is no longer running", 0, LIMIT);
    assert!(shell.text().contains(&sandbox.id), "{}", shell.text());
    assert!(shell.canonical(), "the terminal is restored");
}

/// A child whose stdout and stderr are collected by threads.
struct Collected {
    child: Child,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
}

impl Collected {
    fn spawn(server: &TestServer, args: &[&str]) -> Self {
        let mut child = Command::new(VIV)
            .args(args)
            .env("VIV_API_URL", &server.url)
            .env("VIV_API_KEY", &server.key)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let collect = |mut from: Box<dyn std::io::Read + Send>| {
            let sink = Arc::new(Mutex::new(Vec::new()));
            let into = sink.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = from.read(&mut buf) {
                    into.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            });
            sink
        };
        let stdout = collect(Box::new(child.stdout.take().unwrap()));
        let stderr = collect(Box::new(child.stderr.take().unwrap()));
        Self { child, stdout, stderr }
    }

    fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    fn err(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }
}

impl Drop for Collected {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn viv_sandbox_logs_shows_and_follows_the_console() {
    let server = TestServer::shared();
    // A cold boot: the console has the boot's lines (a restored snapshot's log starts at the
    // restore).
    let sandbox = server.sandbox_with(json!({ "templateID": "base", "timeout": 600, "coldBoot": true }));
    let id = &sandbox.id;
    let shown = server.cli(&["sandbox", "logs", id]);
    assert_eq!(shown.code, 0, "{shown:?}");
    eprintln!("console of a cold-booted sandbox:\n{}", shown.stdout);
    assert!(shown.stdout.contains("viv_agent"), "{}", shown.stdout);

    // The API in E2B's shape, with its bounds.
    let logs: Value = server
        .get(&format!("/sandboxes/{id}/logs"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let lines = logs["logs"].as_array().unwrap();
    assert!(!lines.is_empty());
    assert!(lines[0]["timestamp"].as_str().unwrap().ends_with('Z'), "{logs}");
    assert!(lines[0]["line"].is_string(), "{logs}");
    let one: Value = server
        .get(&format!("/sandboxes/{id}/logs?limit=1"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(one["logs"].as_array().unwrap().len(), 1);
    let future: Value = server
        .get(&format!("/sandboxes/{id}/logs?start=99999999999999"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(future["logs"], json!([]));
    assert_eq!(
        server
            .get(&format!("/sandboxes/{id}/logs?limit=0"))
            .send()
            .unwrap()
            .status(),
        400
    );
    assert_eq!(server.get("/sandboxes/nope/logs").send().unwrap().status(), 404);

    // -f: a line the guest writes to its console shows up; a hostile line (invalid UTF-8, very
    // long) is shown lossily and cut.
    let follow = Collected::spawn(server, &["sandbox", "logs", id, "-f"]);
    assert!(
        wait_until(LIMIT, || follow.out().contains("viv_agent")),
        "{}",
        follow.err()
    );
    let mark = format!("VIV-CONSOLE-MARK-{}", std::process::id());
    let wrote = server.exec(
        id,
        json!({ "command": format!("echo {mark} > /dev/console; printf 'bad\\377\\376 %020000d\\n' 7 > /dev/console"), "user": "root" }),
    );
    assert_eq!(wrote.exit_code, Some(0), "{wrote:?}");
    assert!(wait_until(LIMIT, || follow.out().contains(&mark)), "{}", follow.out());
    assert!(
        wait_until(LIMIT, || follow.out().contains("more bytes of this line not shown")),
        "{}",
        follow.out()
    );
    assert!(follow.out().contains("bad\u{fffd}\u{fffd} 0000"), "{}", follow.out());
    let longest = follow.out().lines().map(str::len).max().unwrap();
    assert!(longest < 9000, "a line of {longest} bytes");

    // A flood (root writing 6 MiB to the console) is cut back on the host: the log file stays
    // under its cap once the flood is over, and what the guest writes afterwards is still shown.
    let console = server.data_dir.join("sandboxes").join(id).join("console.log");
    assert!(console.is_file(), "{}", console.display());
    let flood = server.exec(
        id,
        json!({ "command": "head -c 6291456 /dev/zero | tr '\\0' x | fold -w 128 > /dev/console", "user": "root" }),
    );
    assert_eq!(flood.exit_code, Some(0), "{flood:?}");
    let size = || std::fs::metadata(&console).map(|m| m.len()).unwrap_or(0);
    assert!(
        wait_until(Duration::from_secs(10), || size() <= 4 << 20),
        "the console log holds {} bytes after a 6 MiB flood",
        size()
    );
    let after = format!("VIV-AFTER-FLOOD-{}", std::process::id());
    let wrote = server.exec(
        id,
        json!({ "command": format!("echo {after} > /dev/console"), "user": "root" }),
    );
    assert_eq!(wrote.exit_code, Some(0), "{wrote:?}");
    assert!(wait_until(LIMIT, || follow.out().contains(&after)), "{}", follow.err());

    // The sandbox killed: the follow ends, saying why.
    let mut follow = follow;
    server.delete(&format!("/sandboxes/{id}")).send().unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(status) = follow.child.try_wait().unwrap() {
            break status;
        }
        assert!(start.elapsed() < LIMIT, "-f did not end with its sandbox");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{}", follow.err());
    assert!(
        wait_until(Duration::from_secs(5), || follow.err().contains("no longer running")),
        "{}",
        follow.err()
    );
}

#[test]
fn viv_top_shows_sandboxes_and_pauses_resumes_and_kills_the_selected_one() {
    // A server of its own: the only sandbox there is the first row.
    let server = TestServer::start();
    let id = server.create(json!({ "templateID": "base", "timeout": 600 }));
    let mut top = PtyCli::spawn(&server, &["top", "--interval", "0.5"], (120, 30));
    top.wait_for_screen(&id, LIMIT);
    top.wait_for_screen("running", LIMIT);
    assert!(!top.canonical(), "raw mode while the table shows");
    let state = || -> Value { server.get(&format!("/sandboxes/{id}")).send().unwrap().json().unwrap() };
    // Pause asks first; any key but `y` declines.
    top.type_in(b"p");
    top.wait_for_screen(&format!("Pause sandbox {id}? y: yes"), LIMIT);
    top.type_in(b"n");
    top.wait_for_screen("cancelled", LIMIT);
    assert_eq!(state()["state"], "running", "a declined pause does nothing");
    top.type_in(b"py");
    assert!(wait_until(LIMIT, || state()["state"] == "paused"), "not paused");
    top.wait_for_screen("paused", LIMIT);
    top.type_in(b"p");
    top.wait_for_screen(&format!("Resume sandbox {id}?"), LIMIT);
    top.type_in(b"y");
    assert!(wait_until(LIMIT, || state()["state"] == "running"), "not resumed");
    top.wait_for_screen(&format!("Resume sandbox {id}: done"), LIMIT);
    top.type_in(b"k");
    top.wait_for_screen(&format!("Kill sandbox {id}?"), LIMIT);
    top.type_in(b"y");
    assert!(
        wait_until(LIMIT, || server
            .get(&format!("/sandboxes/{id}"))
            .send()
            .unwrap()
            .status()
            == 404),
        "the sandbox was not killed:\n{}",
        top.screen().join("\n")
    );
    top.wait_for_screen(&format!("Kill sandbox {id}: done"), LIMIT);
    top.wait_for_screen("0 sandboxes", LIMIT);
    top.type_in(b"q");
    assert_eq!(top.wait_exit(LIMIT), 0, "{}", top.text());
    assert!(top.canonical(), "the terminal is restored");

    // Not on a terminal: a clear refusal.
    let piped = server.cli(&["top"]);
    assert_eq!(piped.code, 1);
    assert!(piped.stderr.contains("needs a terminal"), "{piped:?}");
}

#[test]
fn a_client_that_does_not_read_holds_its_process_back() {
    let server = TestServer::shared();
    let sandbox = server.sandbox();
    // A writer that records how many 64 KiB chunks it got out.
    let script = "i=0; while :; do head -c 65536 /dev/zero; i=$((i+1)); echo $i > /tmp/progress; done";
    let path = format!("/sandboxes/{}/terminal?pty=false&cmd={}", sandbox.id, encode(script));
    let (mut socket, _) = ws(server, &path, Auth::Header, &[]).unwrap();
    let progress = || {
        sandbox
            .sh("cat /tmp/progress 2>/dev/null || echo 0")
            .out()
            .trim()
            .parse::<u64>()
            .unwrap_or(0)
    };
    // Nobody reads: the writer stalls once every buffer on the way is full.
    let start = Instant::now();
    let mut last = progress();
    loop {
        std::thread::sleep(Duration::from_secs(2));
        let now = progress();
        if now == last && now > 0 {
            break;
        }
        last = now;
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the writer never stalled: {now} chunks"
        );
    }
    // Pipes, the agent's queue, the HTTP/2 stream window (8 MiB), the socket buffers: bounded.
    eprintln!("with nobody reading, the writer stalled after {} KiB", last * 64);
    assert!(last * 64 < 64 * 1024, "{} KiB went out with nobody reading", last * 64);
    // Reading again lets it go on.
    let mut transcript = Transcript::default();
    let mut received = 0usize;
    while received < 2 * (last as usize) * 65536 {
        assert!(transcript.pump(&mut socket), "{transcript:?}");
        received += std::mem::take(&mut transcript.output).len();
        assert!(
            start.elapsed() < Duration::from_secs(240),
            "reading stalled at {received} bytes"
        );
    }
    assert!(wait_until(LIMIT, || progress() > last), "the writer did not resume");
}

/// `text` percent-encoded for a query (everything but unreserved characters).
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Sets the size of the terminal whose master side is `master` (the kernel sends SIGWINCH to
/// its foreground process group).
pub(crate) fn set_window_size(master: &impl AsRawFd, cols: u16, rows: u16) {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from a valid pointer on an open descriptor.
    let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
    assert_eq!(rc, 0, "TIOCSWINSZ: {}", std::io::Error::last_os_error());
}
