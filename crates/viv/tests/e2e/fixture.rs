//! `TestServer`: a real `viv serve` process with its own data directory, driven through its
//! public API and the `viv` CLI, torn down on drop with a check that nothing was left behind.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const VIV: &str = env!("CARGO_BIN_EXE_viv");

fn cache_dir() -> String {
    std::env::var("VIV_CACHE_DIR").unwrap_or_else(|_| "/var/cache/vivarium".into())
}

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A name no other test uses (the shared server outlives each test).
pub fn unique(prefix: &str) -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos();
    format!("{prefix}-{nanos:x}{}", std::process::id())
}

/// A running server.
pub struct TestServer {
    pub url: String,
    pub key: String,
    /// The SSH gateway's port, for servers started with `--ssh-listen` (the shared one is).
    pub ssh_port: Option<u16>,
    pub data_dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
    child: Mutex<Option<Child>>,
    pub http: reqwest::blocking::Client,
}

impl TestServer {
    /// Starts a server on a fresh data directory, without warm VMs (so that every VM a test
    /// sees is a sandbox's).
    pub fn start() -> Self {
        Self::start_with_pool(0)
    }

    /// Starts a server on a fresh data directory that keeps `pool_size` warm VMs per template.
    pub fn start_with_pool(pool_size: usize) -> Self {
        Self::start_with(pool_size, &[])
    }

    /// Starts a server in the `isolated` network mode (a namespace per sandbox).
    pub fn start_isolated(pool_size: usize) -> Self {
        Self::start_with(pool_size, &["--network", "isolated"])
    }

    /// Starts a server in the `user` network mode (QEMU's user-mode stack).
    pub fn start_user_mode() -> Self {
        Self::start_with(0, &["--network", "user"])
    }

    fn start_with(pool_size: usize, extra: &[&str]) -> Self {
        Self::start_with_env(pool_size, extra, &[])
    }

    /// Starts a server on a fresh data directory with extra options and environment variables.
    pub fn start_with_env(pool_size: usize, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let temp = tempfile::Builder::new().prefix("viv-e2e-").tempdir().unwrap();
        let data_dir = temp.path().to_path_buf();
        let mut server = Self::launch_binary(Path::new(VIV), &data_dir, None, pool_size, extra, env);
        server._temp = Some(temp);
        server
    }

    /// Starts a server without warm VMs on an existing data directory (to test restarts).
    pub fn start_on(data_dir: &Path, parent_death: Option<i32>) -> Self {
        Self::launch(data_dir, parent_death, 0, &[])
    }

    /// Starts a server without warm VMs on an existing data directory with extra environment
    /// variables.
    pub fn start_on_with_env(data_dir: &Path, env: &[(&str, &str)]) -> Self {
        Self::launch_binary(Path::new(VIV), data_dir, None, 0, &[], env)
    }

    /// Starts a server keeping `pool_size` warm VMs on an existing data directory.
    pub fn start_pooled_on(data_dir: &Path, pool_size: usize) -> Self {
        Self::launch(data_dir, None, pool_size, &[])
    }

    /// Starts a server keeping `pool_size` warm VMs on an existing data directory with extra
    /// options.
    pub fn start_pooled_on_with(data_dir: &Path, pool_size: usize, extra: &[&str]) -> Self {
        Self::launch(data_dir, None, pool_size, extra)
    }

    /// Starts a server without warm VMs on an existing data directory with extra options.
    pub fn start_on_with(data_dir: &Path, extra: &[&str]) -> Self {
        Self::launch(data_dir, None, 0, extra)
    }

    /// Starts a server without warm VMs on an existing data directory, running `binary` (a
    /// copy of `viv` elsewhere stands for an upgraded one).
    pub fn start_binary_on(binary: &Path, data_dir: &Path, extra: &[&str]) -> Self {
        Self::launch_binary(binary, data_dir, None, 0, extra, &[])
    }

    fn launch(data_dir: &Path, parent_death: Option<i32>, pool_size: usize, extra: &[&str]) -> Self {
        Self::launch_binary(Path::new(VIV), data_dir, parent_death, pool_size, extra, &[])
    }

    fn launch_binary(
        binary: &Path,
        data_dir: &Path,
        parent_death: Option<i32>,
        pool_size: usize,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");
        let mut command = Command::new(binary);
        command
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--accel"])
            .arg(std::env::var("VIV_ACCEL").unwrap_or_else(|_| "auto".into()))
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--cache-dir")
            .arg(cache_dir())
            .arg("--memory-mib")
            .arg("256")
            .arg("--pool-size")
            .arg(pool_size.to_string())
            // A test's pool stays at the size it asks for unless it tests the pool's growth
            // (warming VMs for demand competes with the test for the CPU).
            .args(if extra.contains(&"--pool-max") {
                Vec::new()
            } else {
                vec!["--pool-max".to_owned(), pool_size.to_string()]
            })
            // A pause stops the VM unless the test is about parked VMs: the other tests' resumes
            // restore their nodes (the E2B suites run with the default and resume parked VMs).
            .args(if extra.contains(&"--pause-keep-warm") {
                Vec::new()
            } else {
                vec!["--pause-keep-warm".to_owned(), "0".to_owned()]
            })
            .args(extra)
            .env("VIV_LOG", "info,viv_net=debug")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // Servers of one test run must not share an address pool (as root, `auto` networking is
        // the isolated mode), not even with a killed server whose VMs still hold their slots;
        // each gets a /26 of its own (16 sandboxes) unless the test gives one, 79 before the
        // first comes round again. The 80th is the shared server's for the whole run: a run
        // starts more than 80 servers, and one given the shared server's pool again refused to
        // start ("it overlaps … choose another with --net-pool").
        if !extra.contains(&"--net-pool") {
            static NEXT_POOL: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = NEXT_POOL.fetch_add(1, std::sync::atomic::Ordering::SeqCst) % SHARED_POOL;
            command.arg("--net-pool").arg(test_pool(n));
        }
        // Stopping a test server kills its sandboxes unless the test asks otherwise (the
        // product's default leaves them running for the next server).
        if !extra.contains(&"--on-shutdown") {
            command.args(["--on-shutdown", "kill"]);
        }
        if let Some(signal) = parent_death {
            // SAFETY: prctl is async-signal-safe; runs in the child before exec.
            unsafe {
                command.pre_exec(move || {
                    libc::prctl(libc::PR_SET_PDEATHSIG, signal);
                    Ok(())
                });
            }
        }
        // This machine's egress may intercept TLS with its own CA: sandboxes trust what the host
        // added to its trust store.
        let extra_cas: Vec<u8> = std::fs::read_dir("/usr/local/share/ca-certificates")
            .map(|d| {
                d.flatten()
                    .filter_map(|e| std::fs::read(e.path()).ok())
                    .flatten()
                    .collect()
            })
            .unwrap_or_default();
        if !extra_cas.is_empty() {
            let bundle = data_dir.join("guest-ca.pem");
            std::fs::write(&bundle, &extra_cas).unwrap();
            command.arg("--guest-ca-file").arg(bundle);
        }
        let mut child = command.spawn().expect("spawn viv serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(line) if line.contains("listening on") => break,
                Ok(_) => {}
                Err(_) if Instant::now() > deadline => panic!("server did not start"),
                Err(_) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        panic!("server exited during start: {status}");
                    }
                }
            }
        }
        // A server whose state is in PostgreSQL has its keys there too.
        let mut keys_create = vec!["keys", "create", "--name", "e2e"];
        if let Some(i) = extra.iter().position(|a| *a == "--database") {
            keys_create.extend(["--database", extra[i + 1]]);
        }
        let created = cli_in(data_dir, &keys_create);
        let key = created.stdout.trim().to_owned();
        if !key.starts_with("e2b_") {
            // Not a TestServer yet: nothing else would stop this server.
            let _ = child.kill();
            let _ = child.wait();
            panic!("unexpected key {key:?}: {}", created.stderr);
        }
        let ssh_port = extra
            .iter()
            .position(|a| *a == "--ssh-listen")
            .and_then(|i| extra.get(i + 1)?.rsplit(':').next()?.parse().ok());
        Self {
            url,
            key,
            ssh_port,
            data_dir: data_dir.to_path_buf(),
            _temp: None,
            child: Mutex::new(Some(child)),
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(300))
                .build()
                .unwrap(),
        }
    }

    /// The server shared by tests that do not stop or restart it. It lives until the test
    /// process exits; its death signal then makes it shut down cleanly.
    pub fn shared() -> &'static TestServer {
        static SHARED: OnceLock<TestServer> = OnceLock::new();
        SHARED.get_or_init(|| {
            // Parent-death signals follow the spawning thread, so spawn from one that never ends.
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                // Not a temporary directory: nothing would delete it when the process exits.
                let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("e2e-shared");
                let _ = std::fs::remove_dir_all(&dir);
                remove_template_memory(&dir);
                std::fs::create_dir_all(&dir).unwrap();
                // The server's defaults: warm VMs from the pool serve most creates. Its SSH
                // gateway serves the ssh tests.
                let ssh = format!("127.0.0.1:{}", free_port());
                let pool = test_pool(SHARED_POOL);
                let _ = tx.send(Self::launch(
                    &dir,
                    Some(libc::SIGTERM),
                    1,
                    &["--ssh-listen", &ssh, "--net-pool", &pool],
                ));
                loop {
                    std::thread::park();
                }
            });
            rx.recv().expect("shared server")
        })
    }

    pub fn get(&self, path: &str) -> reqwest::blocking::RequestBuilder {
        self.http
            .get(format!("{}{path}", self.url))
            .header("X-API-Key", &self.key)
    }

    pub fn post(&self, path: &str) -> reqwest::blocking::RequestBuilder {
        self.http
            .post(format!("{}{path}", self.url))
            .header("X-API-Key", &self.key)
    }

    pub fn put(&self, path: &str) -> reqwest::blocking::RequestBuilder {
        self.http
            .put(format!("{}{path}", self.url))
            .header("X-API-Key", &self.key)
    }

    pub fn patch(&self, path: &str) -> reqwest::blocking::RequestBuilder {
        self.http
            .patch(format!("{}{path}", self.url))
            .header("X-API-Key", &self.key)
    }

    pub fn delete(&self, path: &str) -> reqwest::blocking::RequestBuilder {
        self.http
            .delete(format!("{}{path}", self.url))
            .header("X-API-Key", &self.key)
    }

    /// A series of `GET /metrics` (its name with its labels, such as `name{path="network"}`).
    pub fn metric(&self, series: &str) -> u64 {
        let text = self.get("/metrics").send().unwrap().text().unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
    }

    /// Resumes paused sandbox `id` (E2B's connect) and asserts the 201 of a resume; `context`
    /// starts the failure message.
    pub fn resume(&self, id: &str, context: &str) {
        let resumed = self
            .post(&format!("/sandboxes/{id}/connect"))
            .json(&json!({ "timeout": 600 }))
            .send()
            .unwrap();
        assert_eq!(
            resumed.status(),
            201,
            "{context}: {}",
            resumed.text().unwrap_or_default()
        );
    }

    /// Forks sandbox `id` once (`POST /sandboxes/{id}/fork`) and returns the child's id.
    pub fn fork_one(&self, id: &str) -> String {
        let forks: Value = self
            .post(&format!("/sandboxes/{id}/fork"))
            .json(&serde_json::json!({ "count": 1, "timeout": 600 }))
            .send()
            .unwrap()
            .json()
            .unwrap();
        forks[0]["sandbox"]["sandboxID"]
            .as_str()
            .unwrap_or_else(|| panic!("no fork of {id}: {forks}"))
            .to_owned()
    }

    /// Creates a sandbox and returns its id (asserting 201).
    pub fn create(&self, body: Value) -> String {
        let response = self.post("/sandboxes").json(&body).send().unwrap();
        let status = response.status();
        let text = response.text().unwrap();
        assert_eq!(status, 201, "create failed: {text}");
        let created: Value = serde_json::from_str(&text).unwrap();
        created["sandboxID"].as_str().unwrap().to_owned()
    }

    /// Creates a sandbox from `base`.
    pub fn sandbox(&self) -> Sandbox<'_> {
        self.sandbox_with(json!({ "templateID": "base", "timeout": 600 }))
    }

    /// Creates a sandbox from a create request body.
    pub fn sandbox_with(&self, body: Value) -> Sandbox<'_> {
        Sandbox {
            server: self,
            id: self.create(body),
        }
    }

    /// A sandbox (killed when dropped) and the access token its agent expects from clients.
    pub fn secure_sandbox(&self) -> (Sandbox<'_>, String) {
        let created: Value = self
            .post("/sandboxes")
            .json(&json!({ "timeout": 600 }))
            .send()
            .unwrap()
            .json()
            .unwrap();
        let token = created["envdAccessToken"].as_str().unwrap().to_owned();
        let id = created["sandboxID"].as_str().unwrap().to_owned();
        (Sandbox { server: self, id }, token)
    }

    /// Runs a command through the exec route; returns (stdout, stderr, exit code or error).
    pub fn exec(&self, id: &str, body: Value) -> ExecResult {
        self.exec_at(&format!("/sandboxes/{id}/exec"), body)
    }

    /// Runs a command through exec route `path` (a sandbox's or a VM's).
    pub fn exec_at(&self, path: &str, body: Value) -> ExecResult {
        let response = self.post(path).json(&body).send().unwrap();
        assert_eq!(response.status(), 200, "exec failed: {}", response.text().unwrap());
        let text = response.text().unwrap();
        let mut result = ExecResult::default();
        use base64::Engine as _;
        let decode = |v: &Value| {
            base64::engine::general_purpose::STANDARD
                .decode(v["data"].as_str().unwrap())
                .unwrap()
        };
        for line in text.lines() {
            let event: Value = serde_json::from_str(line).unwrap();
            match event["type"].as_str().unwrap() {
                "start" => result.pid = event["pid"].as_u64(),
                "stdout" => result.stdout.extend(decode(&event)),
                "stderr" => result.stderr.extend(decode(&event)),
                "end" => {
                    result.exit_code = event["exitCode"].as_i64();
                    result.status = event["status"].as_str().map(str::to_owned);
                }
                "error" => result.error = event["message"].as_str().map(str::to_owned),
                other => panic!("unknown event {other}"),
            }
        }
        result
    }

    /// Runs the CLI against this server.
    pub fn cli(&self, args: &[&str]) -> CliOutput {
        cli_with(args, &[("VIV_API_URL", &self.url), ("VIV_API_KEY", &self.key)], None)
    }

    /// Stops the server with a signal and waits for it to exit.
    pub fn stop(&self, signal: i32) -> std::process::ExitStatus {
        let mut guard = self.child.lock().unwrap();
        let mut child = guard.take().expect("server running");
        // SAFETY: kill with plain integers on our own child.
        unsafe { libc::kill(child.id() as i32, signal) };
        child.wait().unwrap()
    }

    /// The server's pid.
    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap().as_ref().expect("server running").id()
    }

    /// QEMU processes whose command line mentions this server's data directory.
    pub fn qemu_processes(&self) -> Vec<u32> {
        qemu_processes_under(&self.data_dir)
    }
}

/// The server keeps template memory on tmpfs across restarts; tests remove it with the server.
pub fn remove_template_memory(data_dir: &Path) {
    let _ = std::fs::remove_dir_all(shm_dir(data_dir));
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if self._temp.is_some() {
            remove_template_memory(&self.data_dir);
        }
        // A server a test already stopped is the test's to check.
        if self.child.lock().unwrap().is_some() {
            let status = self.stop(libc::SIGTERM);
            if !std::thread::panicking() {
                assert!(status.success(), "server exited with {status}");
                assert_no_leftovers(&self.data_dir);
            }
        }
    }
}

/// Asserts that no VM process, run directory, memory file, network resource, cgroup or jail
/// uid of this data directory remains.
pub fn assert_no_leftovers(data_dir: &Path) {
    wait_until(Duration::from_secs(10), || qemu_processes_under(data_dir).is_empty());
    assert!(qemu_processes_under(data_dir).is_empty(), "QEMU processes left behind");
    let runs: Vec<_> = std::fs::read_dir(data_dir.join("sandboxes"))
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(runs.is_empty(), "sandbox run directories left behind: {runs:?}");
    let net = network_resources(data_dir);
    assert!(
        net.is_empty(),
        "network namespaces, links or nftables tables left behind: {net:?}"
    );
    let jail = jail_resources(data_dir);
    assert!(jail.is_empty(), "cgroups or jail uids left behind: {jail:?}");
}

/// The 8-hex-digit key of a server's cgroups, jail uids and memory directory.
pub fn data_key(data_dir: &Path) -> String {
    use sha2::Digest as _;
    hex::encode(&sha2::Sha256::digest(data_dir.to_string_lossy().as_bytes())[..4])
}

/// The tmpfs directory (guest and template memory) of the server of `data_dir`.
pub fn shm_dir(data_dir: &Path) -> PathBuf {
    PathBuf::from(format!("/dev/shm/vivarium-{}", data_key(data_dir)))
}

/// Cgroup directories and jail uid records of the server of `data_dir`.
pub fn jail_resources(data_dir: &Path) -> Vec<String> {
    let key = data_key(data_dir);
    let mut found: Vec<String> = ["memory", "cpu", "pids", "blkio", "unified", ""]
        .iter()
        .map(|c| Path::new("/sys/fs/cgroup").join(c).join("vivarium").join(&key))
        .filter(|p| p.exists())
        .map(|p| p.display().to_string())
        .collect();
    for entry in std::fs::read_dir("/run/vivarium/jail/uids")
        .into_iter()
        .flatten()
        .flatten()
    {
        let owner = std::fs::read_to_string(entry.path()).unwrap_or_default();
        if owner.starts_with(&format!("{key} ")) {
            found.push(format!("uid {} ({owner})", entry.file_name().to_string_lossy()));
        }
    }
    found
}

/// The QEMU process of sandbox `id` of the server of `data_dir`.
pub fn qemu_of(data_dir: &Path, id: &str) -> u32 {
    let run_dir = data_dir.join("sandboxes").join(id);
    let found = qemu_processes_under(&run_dir);
    assert_eq!(found.len(), 1, "one QEMU for sandbox {id}: {found:?}");
    found[0]
}

/// A line of `/proc/PID/status`, such as `Uid` or `CapEff`, without its label.
pub fn proc_status(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")).map(|v| v.trim().to_owned()))
        .unwrap_or_default()
}

/// The index of the shared server's address pool among a run's 80 (see [`test_pool`]).
const SHARED_POOL: u32 = 79;

/// The `--net-pool` of a run's test server number `n` (0–79): a /26 of its own. Test runs side
/// by side on one host set VIV_TEST_NET_BASE (the second octet of their first /24) apart by at
/// least 20.
fn test_pool(n: u32) -> String {
    let base: u32 = std::env::var("VIV_TEST_NET_BASE")
        .ok()
        .and_then(|b| b.parse().ok())
        // The last /26 of a run is at BASE + 19, so 236 is the highest base.
        .filter(|b| (1..=236).contains(b))
        .unwrap_or(160);
    format!("10.{}.{}.0/26", base + n / 4, (n % 4) * 64)
}

/// The key a server of `data_dir` names its host resources with.
pub fn host_key(data_dir: &Path) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(data_dir.to_string_lossy().as_bytes()))[..6].to_owned()
}

/// Network namespaces, links and nftables tables of the server of `data_dir`.
pub fn network_resources(data_dir: &Path) -> Vec<String> {
    let key = host_key(data_dir);
    let mut found: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("viv-{key}-")))
                .collect()
        })
        .unwrap_or_default();
    let links = Command::new("ip").args(["-o", "link", "show"]).output().unwrap();
    found.extend(
        String::from_utf8_lossy(&links.stdout)
            .lines()
            .filter_map(|l| {
                l.split(':')
                    .nth(1)
                    .map(|n| n.trim().split('@').next().unwrap_or("").to_owned())
            })
            .filter(|n| n.starts_with(&format!("vh{key}"))),
    );
    if let Ok(tables) = Command::new("nft").args(["list", "tables"]).output() {
        found.extend(
            String::from_utf8_lossy(&tables.stdout)
                .lines()
                .filter(|l| l.ends_with(&format!("vivarium_{key}")))
                .map(str::to_owned),
        );
    }
    found
}

pub fn qemu_processes_under(data_dir: &Path) -> Vec<u32> {
    let needle = data_dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            let program = cmdline.split('\0').next().unwrap_or_default();
            program.rsplit('/').next().is_some_and(|p| p.starts_with("qemu-system")) && cmdline.contains(&needle)
        })
        .collect()
}

/// Polls `check` until it holds or `limit` passes.
pub fn wait_until(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    check()
}

/// A sandbox killed when dropped.
pub struct Sandbox<'a> {
    pub server: &'a TestServer,
    pub id: String,
}

impl Sandbox<'_> {
    pub fn sh(&self, command: &str) -> ExecResult {
        self.server.exec(&self.id, json!({ "command": command }))
    }
}

impl Drop for Sandbox<'_> {
    fn drop(&mut self) {
        let _ = self.server.delete(&format!("/sandboxes/{}", self.id)).send();
    }
}

#[derive(Debug, Default)]
pub struct ExecResult {
    pub pid: Option<u64>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit_code: Option<i64>,
    pub status: Option<String>,
    pub error: Option<String>,
}

impl ExecResult {
    pub fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn err(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

#[derive(Debug)]
pub struct CliOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub fn cli_in(data_dir: &Path, args: &[&str]) -> CliOutput {
    let mut all: Vec<&str> = args.to_vec();
    let dir = data_dir.to_string_lossy().into_owned();
    all.extend(["--data-dir", &dir]);
    cli_with(&all, &[], None)
}

pub fn cli_with(args: &[&str], env: &[(&str, &str)], stdin: Option<&[u8]>) -> CliOutput {
    let mut command = Command::new(VIV);
    command
        .args(args)
        .env_remove("VIV_API_KEY")
        .env_remove("E2B_API_KEY")
        .envs(env.iter().copied());
    command
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().unwrap();
    if let Some(data) = stdin {
        use std::io::Write as _;
        child.stdin.take().unwrap().write_all(data).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    CliOutput {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A unary envd call through the server's `/sandboxes/{id}/envd/` route: status and JSON answer.
pub fn rpc(server: &TestServer, id: &str, method: &str, body: Value) -> (u16, Value) {
    let response = server
        .post(&format!("/sandboxes/{id}/envd/{method}"))
        .header("content-type", "application/json")
        .header("connect-protocol-version", "1")
        .json(&body)
        .send()
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().unwrap_or(Value::Null))
}

/// Why sandbox `id` failed, once its VM died: it is gone from `GET /sandboxes/{id}` (404, as
/// E2B has it) and listed with `?state=failed`, with the reason.
pub fn failure_of(server: &TestServer, id: &str) -> Option<String> {
    if server.get(&format!("/sandboxes/{id}")).send().unwrap().status() != 404 {
        return None;
    }
    let failed: Value = server.get("/sandboxes?state=failed").send().unwrap().json().unwrap();
    failed
        .as_array()?
        .iter()
        .find(|s| s["sandboxID"] == id)
        .map(|s| s["error"].as_str().unwrap_or_default().to_owned())
}

/// A shell command that starts a background counter in the guest, bumped every 100 ms and
/// renamed into place (so a read never sees a truncated file): [`counter`] reads it.
pub const COUNTER_LOOP: &str = "(i=0; while true; do i=$((i+1)); echo $i > /tmp/count.new; mv /tmp/count.new /tmp/count; sleep 0.1; done) >/dev/null 2>&1 &";

/// The value of the [`COUNTER_LOOP`] counter in sandbox `id`.
pub fn counter(server: &TestServer, id: &str) -> u64 {
    let read = server.exec(id, json!({ "command": "cat /tmp/count" }));
    read.out()
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no counter: {read:?}"))
}

/// The guest's clock in sandbox `id` is within 2 s of the host's (a restored or resumed guest's
/// clock is set from the host's).
pub fn assert_guest_clock(server: &TestServer, id: &str) {
    let guest: f64 = server
        .exec(id, json!({ "command": "date +%s.%N" }))
        .out()
        .trim()
        .parse()
        .unwrap();
    let host = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((host - guest).abs() < 2.0, "guest clock {guest} vs host {host}");
}
