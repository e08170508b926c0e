//! The SSH gateway (`viv serve --ssh-listen`) driven by OpenSSH's own clients (`ssh`, `scp`,
//! `sftp`) and rsync, with keys made by `ssh-keygen` and registered with `viv keys ssh-add`.

use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::Digest as _;

use crate::fixture::{cli_in, unique, wait_until, TestServer};

/// An OpenSSH client identity: a fresh key pair and a known-hosts file in a temporary directory.
pub(crate) struct Client {
    dir: tempfile::TempDir,
    port: u16,
}

impl Client {
    pub(crate) fn new(server: &TestServer) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let made = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "ssh-e2e", "-f"])
            .arg(dir.path().join("id"))
            .output()
            .unwrap();
        assert!(made.status.success(), "ssh-keygen: {made:?}");
        Self {
            dir,
            port: server.ssh_port.expect("a server with --ssh-listen"),
        }
    }

    fn public_key(&self) -> PathBuf {
        self.dir.path().join("id.pub")
    }

    /// Registers this client's key to the API key whose secret is `api_key`.
    fn register(&self, server: &TestServer, api_key: &str) {
        self.register_with(server, api_key, &[]);
    }

    /// Registers this client's key to the API key whose secret is `api_key`, with `viv keys`
    /// options such as `--database URL`.
    pub(crate) fn register_with(&self, server: &TestServer, api_key: &str, options: &[&str]) {
        let public_key = self.public_key();
        let mut args = vec![
            "keys",
            "ssh-add",
            "--key-id",
            &api_key[..10],
            public_key.to_str().unwrap(),
        ];
        args.extend(options);
        let added = cli_in(&server.data_dir, &args);
        assert_eq!(added.code, 0, "{added:?}");
        assert!(added.stdout.starts_with("added "), "{}", added.stdout);
    }

    /// Options every OpenSSH client here takes: no user configuration, agent or prompts.
    fn options(&self) -> Vec<String> {
        let known_hosts = self.dir.path().join("known_hosts");
        [
            "-F",
            "/dev/null",
            "-i",
            self.dir.path().join("id").to_str().unwrap(),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "IdentityAgent=none",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            &format!("UserKnownHostsFile={}", known_hosts.display()),
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=60",
            "-o",
            "ServerAliveInterval=15",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    }

    pub(crate) fn ssh(&self) -> Command {
        let mut command = Command::new("ssh");
        command.args(self.options()).args(["-p", &self.port.to_string()]);
        command
    }

    /// `ssh SANDBOX COMMAND` with `stdin`, bounded in time.
    pub(crate) fn run(&self, sandbox: &str, command: &str, stdin: &[u8]) -> Output {
        let mut ssh = self.ssh();
        ssh.arg(format!("{sandbox}@127.0.0.1")).arg(command);
        bounded(ssh, stdin, Duration::from_secs(180))
    }

    fn scp(&self, from: &str, to: &str) -> Output {
        let mut scp = Command::new("scp");
        scp.args(self.options())
            .args(["-P", &self.port.to_string(), "-q", from, to]);
        bounded(scp, b"", Duration::from_secs(300))
    }
}

/// Runs `command` with `stdin`, killing it (and failing the test) if it outlives `limit`.
pub(crate) fn bounded(mut command: Command, stdin: &[u8], limit: Duration) -> Output {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    writer.join().unwrap();
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

pub(crate) fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

/// A sandbox of the shared server's key and a client whose key is registered to that key.
fn sandbox_and_client(server: &TestServer) -> (crate::fixture::Sandbox<'_>, Client) {
    let client = Client::new(server);
    client.register(server, &server.key);
    (server.sandbox(), client)
}

#[test]
fn ssh_runs_commands_and_terminals_in_a_sandbox() {
    let server = TestServer::shared();
    let (sandbox, client) = sandbox_and_client(server);
    let id = &sandbox.id;

    // exec: stdout and stderr apart, the exit status passed back, as the sandbox's `user`.
    let run = client.run(id, "whoami; pwd; echo oops >&2; exit 7", b"");
    assert_eq!(run.status.code(), Some(7), "{run:?}");
    assert_eq!(text(&run.stdout), "user\n/home/user\n");
    assert_eq!(text(&run.stderr), "oops\n");

    // stdin is streamed to the command and closed at its end.
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let counted = client.run(id, "sha256sum | cut -d' ' -f1", &data);
    assert_eq!(counted.status.code(), Some(0), "{counted:?}");
    assert_eq!(text(&counted.stdout).trim(), sha256_hex(&data));

    // Locale and terminal variables pass, others do not.
    let mut ssh = client.ssh();
    ssh.args(["-o", "SetEnv=LANG=C.UTF-8 LC_TIME=C FOO=bar"])
        .arg(format!("{id}@127.0.0.1"))
        .arg("echo \"$LANG|$LC_TIME|$FOO|${SSH_CONNECTION%% *}\"");
    let env = bounded(ssh, b"", Duration::from_secs(120));
    assert_eq!(text(&env.stdout), "C.UTF-8|C||127.0.0.1\n", "{env:?}");

    // A PTY: `ssh -tt` on a terminal of 30×100 sees that size in the sandbox, follows a resize
    // of its terminal, and passes the exit status back.
    let mut ssh = client.ssh();
    ssh.arg("-tt")
        .arg(format!("{id}@127.0.0.1"))
        .arg("tty; stty size; while read -r line; do [ \"$line\" = end ] && exit 4; stty size; done");
    let mut terminal = Terminal::spawn(ssh, 30, 100);
    terminal.expect("/dev/pts/", Duration::from_secs(120));
    terminal.expect("30 100", Duration::from_secs(60));
    terminal.resize(40, 120);
    // The resize travels as a window-change beside the keystrokes; each line asks for the size
    // again until the new one shows.
    let resized = wait_until(Duration::from_secs(60), || {
        terminal.write(b"\r");
        terminal.seen_within("40 120", Duration::from_millis(500))
    });
    assert!(resized, "the resize never reached the sandbox: {}", terminal.screen());
    terminal.write(b"end\r");
    assert_eq!(terminal.wait(Duration::from_secs(60)), Some(4), "{}", terminal.screen());
}

#[test]
fn ssh_copies_files_with_scp_sftp_and_rsync() {
    let server = TestServer::shared();
    let (sandbox, client) = sandbox_and_client(server);
    let id = &sandbox.id;
    let local = tempfile::tempdir().unwrap();
    let mut data = vec![0u8; 1536 * 1024];
    rand_bytes(&mut data);
    let source = local.path().join("blob.bin");
    std::fs::write(&source, &data).unwrap();

    // scp in, checked inside the sandbox, and out again: byte for byte.
    let put = client.scp(source.to_str().unwrap(), &format!("{id}@127.0.0.1:blob.bin"));
    assert!(put.status.success(), "scp in: {put:?}");
    let sum = client.run(id, "sha256sum /home/user/blob.bin", b"");
    assert!(text(&sum.stdout).starts_with(&sha256_hex(&data)), "{sum:?}");
    let back = local.path().join("back.bin");
    let get = client.scp(&format!("{id}@127.0.0.1:blob.bin"), back.to_str().unwrap());
    assert!(get.status.success(), "scp out: {get:?}");
    assert_eq!(sha256_hex(&std::fs::read(&back).unwrap()), sha256_hex(&data));
    // The legacy protocol (`scp -O` runs `scp -t` in the sandbox) works too.
    let mut legacy = Command::new("scp");
    legacy
        .args(client.options())
        .args(["-O", "-q", "-P", &client.port.to_string()])
        .arg(&source)
        .arg(format!("{id}@127.0.0.1:legacy.bin"));
    let legacy = bounded(legacy, b"", Duration::from_secs(300));
    assert!(legacy.status.success(), "scp -O: {legacy:?}");
    let sum = client.run(id, "sha256sum legacy.bin", b"");
    assert!(text(&sum.stdout).starts_with(&sha256_hex(&data)), "{sum:?}");

    // sftp: mkdir, put, ls, get.
    let batch = local.path().join("batch");
    let fetched = local.path().join("fetched.bin");
    std::fs::write(
        &batch,
        format!(
            "mkdir up\nput {} up/again.bin\nls -l up\nget up/again.bin {}\n",
            source.display(),
            fetched.display()
        ),
    )
    .unwrap();
    let mut sftp = Command::new("sftp");
    sftp.args(client.options())
        .args(["-P", &client.port.to_string(), "-b"])
        .arg(&batch)
        .arg(format!("{id}@127.0.0.1"));
    let session = bounded(sftp, b"", Duration::from_secs(300));
    assert!(session.status.success(), "sftp: {session:?}");
    let listing = text(&session.stdout);
    assert!(
        listing.contains("again.bin") && listing.contains(&data.len().to_string()),
        "{listing}"
    );
    assert_eq!(std::fs::read(&fetched).unwrap(), data);

    // rsync over the gateway (rsync is in the base image).
    let tree = local.path().join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("a.txt"), "alpha\n").unwrap();
    std::fs::write(tree.join("sub/b.txt"), "beta\n").unwrap();
    let mut rsync = Command::new("rsync");
    rsync
        .arg("-a")
        .arg("-e")
        .arg(format!("ssh {} -p {}", client.options().join(" "), client.port))
        .arg(format!("{}/", tree.display()))
        .arg(format!("{id}@127.0.0.1:synced/"));
    let synced = bounded(rsync, b"", Duration::from_secs(300));
    assert!(synced.status.success(), "rsync: {synced:?}");
    let seen = client.run(id, "cat synced/a.txt synced/sub/b.txt", b"");
    assert_eq!(text(&seen.stdout), "alpha\nbeta\n", "{seen:?}");
}

#[test]
fn ssh_forwards_a_local_port_to_a_server_in_the_sandbox() {
    let server = TestServer::shared();
    let (sandbox, client) = sandbox_and_client(server);
    let id = &sandbox.id;
    // A web server in the sandbox, on its loopback only.
    let started = sandbox.sh("mkdir -p /tmp/www && echo forwarded-hello > /tmp/www/index.html; \
         setsid nohup python3 -m http.server 8765 --bind 127.0.0.1 --directory /tmp/www >/dev/null 2>&1 &");
    assert_eq!(started.exit_code, Some(0), "{started:?}");
    let local_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut tunnel = client
        .ssh()
        .args(["-N", "-o", "ExitOnForwardFailure=yes", "-L"])
        .arg(format!("127.0.0.1:{local_port}:localhost:8765"))
        .arg(format!("{id}@127.0.0.1"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let http = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let url = format!("http://127.0.0.1:{local_port}/index.html");
    let mut body = String::new();
    let reached = wait_until(Duration::from_secs(120), || {
        match http.get(&url).send().and_then(|r| r.error_for_status()?.text()) {
            Ok(text) => {
                body = text;
                true
            }
            Err(_) => false,
        }
    });
    let _ = tunnel.kill();
    let _ = tunnel.wait();
    assert!(reached, "the forwarded port never answered");
    assert_eq!(body, "forwarded-hello\n");

    // A port nothing listens on is a refused open, not a hang.
    let mut refused = client.ssh();
    refused
        .args(["-o", "ExitOnForwardFailure=yes", "-W", "localhost:1"])
        .arg(format!("{id}@127.0.0.1"));
    let refused = bounded(refused, b"", Duration::from_secs(120));
    assert!(!refused.status.success());
    assert!(text(&refused.stderr).contains("stdio forwarding failed"), "{refused:?}");
}

#[test]
fn ssh_refuses_unknown_keys_and_other_keys_sandboxes() {
    let server = TestServer::shared();
    let (mine, client) = sandbox_and_client(server);

    // Another API key with its own SSH key and its own sandbox.
    let other_key: Value = serde_json::from_str(
        &cli_in(
            &server.data_dir,
            &["keys", "create", "--name", &unique("ssh-other"), "--json"],
        )
        .stdout,
    )
    .unwrap();
    let other_key = other_key["key"].as_str().unwrap().to_owned();
    let other = Client::new(server);
    other.register(server, &other_key);
    let theirs = server
        .http
        .post(format!("{}/sandboxes", server.url))
        .header("X-API-Key", &other_key)
        .json(&json!({ "timeout": 600 }))
        .send()
        .unwrap();
    assert_eq!(theirs.status(), 201);
    let theirs: Value = theirs.json().unwrap();
    let theirs = theirs["sandboxID"].as_str().unwrap().to_owned();
    let _cleanup = crate::fixture::Sandbox {
        server,
        id: theirs.clone(),
    };

    // Each key reaches its own key's sandbox...
    assert_eq!(text(&other.run(&theirs, "echo theirs", b"").stdout), "theirs\n");
    assert_eq!(text(&client.run(&mine.id, "echo mine", b"").stdout), "mine\n");
    // ...and another key's sandbox looks exactly like one that does not exist.
    let crossed = client.run(&theirs, "echo should-not-run", b"");
    let missing = client.run("nosuchsandbox0", "echo should-not-run", b"");
    for refused in [&crossed, &missing] {
        assert_eq!(refused.status.code(), Some(255), "{refused:?}");
        assert!(refused.stdout.is_empty());
        assert!(
            text(&refused.stderr).contains("Permission denied (publickey)"),
            "{refused:?}"
        );
    }
    assert_eq!(
        text(&crossed.stderr).replace(&theirs, "ID"),
        text(&missing.stderr).replace("nosuchsandbox0", "ID")
    );

    // A fork belongs to the key that forked it.
    let forked: Value = server
        .post(&format!("/sandboxes/{}/fork", mine.id))
        .json(&json!({ "timeout": 600 }))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let child = forked[0]["sandbox"]["sandboxID"]
        .as_str()
        .unwrap_or_else(|| panic!("fork failed: {forked}"))
        .to_owned();
    let _child = crate::fixture::Sandbox {
        server,
        id: child.clone(),
    };
    assert_eq!(text(&client.run(&child, "echo forked", b"").stdout), "forked\n");
    assert_eq!(other.run(&child, "true", b"").status.code(), Some(255));

    // An unregistered key, and passwords, are refused.
    let stranger = Client::new(server);
    let refused = stranger.run(&mine.id, "echo should-not-run", b"");
    assert_eq!(refused.status.code(), Some(255), "{refused:?}");
    assert!(text(&refused.stderr).contains("Permission denied (publickey)"));
    let mut password = client.ssh();
    password
        .args(["-o", "PreferredAuthentications=password,keyboard-interactive"])
        .arg(format!("{}@127.0.0.1", mine.id))
        .arg("true");
    let password = bounded(password, b"", Duration::from_secs(60));
    assert_eq!(password.status.code(), Some(255), "{password:?}");

    // A removed key no longer signs in.
    let listed: Vec<Value> =
        serde_json::from_str(&cli_in(&server.data_dir, &["keys", "ssh-list", "--json"]).stdout).unwrap();
    let other_line = std::fs::read_to_string(other.public_key()).unwrap();
    let fingerprint = listed
        .iter()
        .find(|k| k["publicKey"].as_str().is_some_and(|p| other_line.starts_with(p)))
        .expect("the other client's key is listed")["fingerprint"]
        .as_str()
        .unwrap()
        .to_owned();
    let removed = cli_in(&server.data_dir, &["keys", "ssh-remove", &fingerprint]);
    assert_eq!(removed.code, 0, "{removed:?}");
    assert_eq!(other.run(&theirs, "true", b"").status.code(), Some(255));

    // Sign-ins and refusals are counted.
    let metrics = server.get("/metrics").send().unwrap().text().unwrap();
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from {metrics}"))
    };
    assert!(value("vivarium_ssh_connections_total ") >= 6.0);
    assert!(value("vivarium_ssh_auth_failures_total ") >= 3.0);
    assert!(value("vivarium_ssh_channels_total{kind=\"exec\"} ") >= 2.0);
}

#[test]
fn ssh_session_ends_with_a_message_when_its_sandbox_dies() {
    let server = TestServer::shared();
    let (sandbox, client) = sandbox_and_client(server);
    let mut ssh = client.ssh();
    ssh.arg(format!("{}@127.0.0.1", sandbox.id))
        .arg("echo started; sleep 600")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = ssh.spawn().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 8];
    stdout.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"started\n");
    let killed = server.delete(&format!("/sandboxes/{}", sandbox.id)).send().unwrap();
    assert_eq!(killed.status(), 204);
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "ssh still waits after its sandbox was killed"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert_eq!(status.code(), Some(255), "{stderr}");
    // What the API would say of it, not the channel's error.
    assert!(
        stderr.contains("vivarium: ") && stderr.contains("not found"),
        "{stderr}"
    );
}

#[test]
fn ssh_bounds_the_sessions_of_a_connection() {
    let server = TestServer::shared();
    let (sandbox, client) = sandbox_and_client(server);
    let target = format!("{}@127.0.0.1", sandbox.id);
    // One connection (an OpenSSH control master) carries every session below.
    let socket = client.dir.path().join("control");
    let mut master = client
        .ssh()
        .args(["-M", "-N", "-S"])
        .arg(&socket)
        .arg(&target)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(120), || socket.exists()),
        "no control master"
    );
    let session = |command: &str| {
        let mut ssh = client.ssh();
        ssh.arg("-S").arg(&socket).arg(&target).arg(command);
        ssh
    };
    let mut holders: Vec<std::process::Child> = (0..10)
        .map(|_| {
            session("sleep 600")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let sleeping = || sandbox.sh("pgrep -cx sleep || true").out().trim().to_owned();
    assert!(
        wait_until(Duration::from_secs(120), || sleeping() == "10"),
        "ten sessions never ran: {}",
        sleeping()
    );
    // The eleventh is refused on this connection (OpenSSH then opens a connection of its own
    // for it, which is admitted).
    let refused = bounded(session("echo eleventh"), b"", Duration::from_secs(60));
    assert!(
        text(&refused.stderr).contains("Session open refused by peer"),
        "{refused:?}"
    );
    // A session that ends frees its place, and its process goes with it.
    let mut first = holders.remove(0);
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || sleeping() == "9"),
        "a closed session's process lived on: {}",
        sleeping()
    );
    let admitted = bounded(session("echo admitted"), b"", Duration::from_secs(60));
    assert_eq!(text(&admitted.stdout), "admitted\n", "{admitted:?}");
    assert!(!text(&admitted.stderr).contains("refused"), "{admitted:?}");
    for mut holder in holders {
        let _ = holder.kill();
        let _ = holder.wait();
    }
    let _ = master.kill();
    let _ = master.wait();
}

/// Connect-to-prompt time and keystroke echo latency through the gateway (figures for
/// bench/RESULTS.md; `cargo test ... ssh_figures -- --ignored --nocapture` prints them).
#[test]
#[ignore = "timing: run alone with --ignored --test-threads=1 (scripts/test does)"]
fn ssh_figures() {
    let server = TestServer::shared();
    let (sandbox, client) = sandbox_and_client(server);
    let mut prompts = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        let mut ssh = client.ssh();
        ssh.arg("-tt")
            .arg(format!("{}@127.0.0.1", sandbox.id))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = ssh.spawn().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        // The login shell's prompt ends in "$ ".
        let mut seen = Vec::new();
        let mut byte = [0u8; 1];
        while !seen.ends_with(b"$ ") {
            assert!(stdout.read(&mut byte).unwrap() == 1, "no prompt: {}", text(&seen));
            seen.push(byte[0]);
        }
        prompts.push(start.elapsed());
        let mut stdin = child.stdin.take().unwrap();
        // Keystroke echo: one byte at a time, each read back from the terminal's echo.
        let mut echoes = Vec::new();
        for key in b"abcdefghijklmnopqrst" {
            let sent = Instant::now();
            stdin.write_all(&[*key]).unwrap();
            loop {
                assert!(stdout.read(&mut byte).unwrap() == 1);
                if byte[0] == *key {
                    break;
                }
            }
            echoes.push(sent.elapsed());
        }
        stdin.write_all(b"\x15exit 0\r").unwrap();
        drop(stdin);
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(0));
        echoes.sort();
        println!(
            "ssh keystroke echo: p50 {:?}, p95 {:?}",
            echoes[echoes.len() / 2],
            echoes[echoes.len() * 95 / 100]
        );
    }
    prompts.sort();
    println!(
        "ssh connect to prompt: p50 {:?}, max {:?} (of {})",
        prompts[prompts.len() / 2],
        prompts[prompts.len() - 1],
        prompts.len()
    );
    assert!(prompts[prompts.len() / 2] < Duration::from_secs(30));
}

/// A process on its own pseudo-terminal (its controlling terminal), read in the background.
struct Terminal {
    master: std::fs::File,
    child: std::process::Child,
    output: std::sync::mpsc::Receiver<Vec<u8>>,
    seen: Vec<u8>,
}

impl Terminal {
    fn spawn(mut command: Command, rows: u16, cols: u16) -> Self {
        use std::os::fd::{FromRawFd as _, OwnedFd};
        use std::os::unix::process::CommandExt as _;
        let (mut master, mut slave) = (0, 0);
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: openpty writes two descriptors into the given integers; the name buffer and
        // termios may be null, the size points to a live winsize.
        let opened = unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), &size) };
        assert_eq!(opened, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: both descriptors were just opened and are owned here alone.
        let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        command
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave));
        // SAFETY: setsid and ioctl are async-signal-safe; they run in the child before exec and
        // make the terminal on stdin its controlling terminal (so SIGWINCH reaches it).
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().unwrap();
        drop(command);
        let master = std::fs::File::from(master);
        let mut reader = master.try_clone().unwrap();
        let (tx, output) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // EIO once the last process holding the terminal is gone.
            while let Ok(n @ 1..) = reader.read(&mut buf) {
                if tx.send(buf[..n].to_vec()).is_err() {
                    return;
                }
            }
        });
        Self {
            master,
            child,
            output,
            seen: Vec::new(),
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        self.master.write_all(bytes).unwrap();
    }

    fn resize(&self, rows: u16, cols: u16) {
        crate::shell::set_window_size(&self.master, cols, rows);
    }

    fn screen(&self) -> String {
        text(&self.seen)
    }

    /// Whether `needle` appears in the output (everything read so far, or within `limit`).
    fn seen_within(&mut self, needle: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if self.screen().contains(needle) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.output.recv_timeout(left) {
                Ok(chunk) => self.seen.extend(chunk),
                Err(_) => return self.screen().contains(needle),
            }
        }
    }

    fn expect(&mut self, needle: &str, limit: Duration) {
        assert!(
            self.seen_within(needle, limit),
            "'{needle}' never showed on the terminal: {}",
            self.screen()
        );
    }

    /// The exit code, once the process ended within `limit`.
    fn wait(&mut self, limit: Duration) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("the terminal's process did not end within {limit:?}: {}", self.screen());
            }
            while let Ok(chunk) = self.output.try_recv() {
                self.seen.extend(chunk);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rand_bytes(buf: &mut [u8]) {
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ std::process::id() as u64;
    for b in buf.iter_mut() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        *b = state as u8;
    }
}
