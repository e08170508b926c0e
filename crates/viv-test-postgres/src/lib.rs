//! Test fixture: a PostgreSQL server for the tests of one process, and fresh databases on it;
//! and [`Scratch`] servers of one test's own, which it may crash and start again.
//!
//! The server is Debian's `postgresql` package's, started on first use on a Unix socket in a
//! directory of its own (no TCP port), as the `postgres` user when the tests run as root (the
//! server refuses root). It is killed with the test process (parent-death signal from a thread
//! that lives as long as the process), and the directories of earlier test processes that are
//! gone are removed when the next one starts. Every database is new and empty, so tests never
//! see each other's rows.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Prefix of the servers' directories under the temporary directory.
const DIR_PREFIX: &str = "viv-test-postgres-";

/// The connection string of a new, empty database (user `viv`, no password).
pub fn fresh_database() -> String {
    create_database(server())
}

/// The socket directory of this process's server, started on first use.
pub fn server() -> &'static Path {
    static SERVER: OnceLock<PathBuf> = OnceLock::new();
    SERVER.get_or_init(start)
}

fn start() -> PathBuf {
    remove_stale_dirs();
    let dir = std::env::temp_dir().join(format!("{DIR_PREFIX}{}", std::process::id()));
    init(&dir);
    // The shared server lives as long as the process: its exit is never waited for.
    let _ = spawn(&dir);
    dir
}

/// A PostgreSQL server of one test's own, which the test may stop (as a crash: immediate
/// shutdown) and start again on the same data; [`server`]'s lives as long as the process. It is
/// killed and its directory removed when dropped.
pub struct Scratch {
    dir: PathBuf,
    running: Option<Running>,
}

/// A started server process.
struct Running {
    pid: u32,
    exited: std::sync::mpsc::Receiver<()>,
}

impl Scratch {
    /// Starts a new server.
    pub fn start() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        remove_stale_dirs();
        let dir = std::env::temp_dir().join(format!(
            "{DIR_PREFIX}{}-scratch{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        init(&dir);
        let running = Some(spawn(&dir));
        Self { dir, running }
    }

    /// The connection string of a new, empty database on it.
    pub fn database(&self) -> String {
        create_database(&self.dir)
    }

    /// Stops the server at once, as a crash would (SIGQUIT: immediate shutdown, no checkpoint),
    /// and waits until it is gone.
    pub fn stop(&mut self) {
        if let Some(running) = self.running.take() {
            // SAFETY: kill has no memory-safety preconditions; the pid is our child's, which
            // the thread that started it has not waited for yet.
            unsafe { libc::kill(running.pid as i32, libc::SIGQUIT) };
            let _ = running.exited.recv_timeout(Duration::from_secs(60));
        }
    }

    /// Starts the server again on the same data and socket directory.
    pub fn start_again(&mut self) {
        if self.running.is_none() {
            self.running = Some(spawn(&self.dir));
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            // SAFETY: as in `stop`.
            unsafe { libc::kill(running.pid as i32, libc::SIGKILL) };
            let _ = running.exited.recv_timeout(Duration::from_secs(30));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Creates a new database on the server in `socket_dir`; returns its connection string.
fn create_database(socket_dir: &Path) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = format!("t_{}_{}", std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst));
    let admin = format!("host={} user=viv dbname=postgres", socket_dir.display());
    let statement = format!("CREATE DATABASE {name}");
    // The client blocks on a runtime of its own: off any tokio worker.
    std::thread::spawn(move || {
        let mut client = postgres::Client::connect(&admin, postgres::NoTls)?;
        client.batch_execute(&statement)
    })
    .join()
    .expect("creating a database")
    .expect("creating a database");
    format!("host={} user=viv dbname={name}", socket_dir.display())
}

/// The directory of Debian's PostgreSQL server binaries.
fn bin() -> PathBuf {
    std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .and_then(|versions| {
            versions
                .flatten()
                .map(|v| v.path().join("bin"))
                .filter(|b| b.join("initdb").is_file())
                .max()
        })
        .expect("PostgreSQL's server is not installed: apt-get install postgresql (scripts/install-deps does)")
}

/// Makes `dir` (owned by the server's user) with a new cluster in `dir/data`.
fn init(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("the server's directory");
    let owner = server_user();
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(dir, Some(uid), Some(gid)).expect("giving the directory to postgres");
    }
    let mut initdb = Command::new(bin().join("initdb"));
    initdb
        .args(["-A", "trust", "-U", "viv", "-E", "UTF8", "--no-sync", "-D"])
        .arg(dir.join("data"))
        .stdout(std::process::Stdio::null());
    if let Some((uid, gid)) = owner {
        initdb.uid(uid).gid(gid);
    }
    let status = initdb.status().expect("running initdb");
    assert!(status.success(), "initdb failed: {status}");
}

/// Starts the server of `dir` (socket in `dir`, data in `dir/data`) and waits until it takes
/// connections.
fn spawn(dir: &Path) -> Running {
    let (tx, rx) = std::sync::mpsc::channel();
    let (exited_tx, exited) = std::sync::mpsc::channel();
    let (postgres, socket_dir, data, owner) = (
        bin().join("postgres"),
        dir.to_path_buf(),
        dir.join("data"),
        server_user(),
    );
    // The server's parent-death signal fires when the thread that started it ends: the thread
    // waits for the server, so it lives as long as the server does.
    std::thread::spawn(move || {
        let mut command = Command::new(postgres);
        command
            .arg("-D")
            .arg(&data)
            .arg("-k")
            .arg(&socket_dir)
            .args([
                "-c",
                "listen_addresses=",
                "-c",
                "fsync=off",
                "-c",
                "max_connections=300",
                // Dynamic shared memory in files of the data directory, not /dev/shm: the
                // server dies by SIGKILL with its test process and leaves nothing behind
                // that the directory's removal does not take.
                "-c",
                "dynamic_shared_memory_type=mmap",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if let Some((uid, gid)) = owner {
            command.uid(uid).gid(gid);
        }
        // SAFETY: the closure runs in the child between fork and exec and makes one
        // async-signal-safe system call.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        match command.spawn() {
            Ok(mut child) => {
                let _ = tx.send(Ok(child.id()));
                let _ = child.wait();
                let _ = exited_tx.send(());
            }
            Err(err) => {
                let _ = tx.send(Err(err));
            }
        }
    });
    let pid = rx.recv().expect("the server thread").expect("starting postgres");
    // The socket appears before the server takes connections ("the database system is
    // starting up"): ready is when a connection succeeds.
    let admin = format!("host={} user=viv dbname=postgres", dir.display());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match postgres::Client::connect(&admin, postgres::NoTls) {
            Ok(_) => break,
            Err(err) => assert!(
                Instant::now() < deadline,
                "postgres did not take connections within 60 s: {err}"
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Running { pid, exited }
}

/// The `postgres` user's uid and gid when this process runs as root (the server refuses root).
fn server_user() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").expect("/etc/passwd");
    let line = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .expect("no postgres user: apt-get install postgresql creates it");
    let fields: Vec<&str> = line.split(':').collect();
    Some((
        fields[2].parse().expect("postgres's uid"),
        fields[3].parse().expect("postgres's gid"),
    ))
}

/// Removes the directories of earlier test processes that are gone.
fn remove_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        // `PREFIX<pid>` or, a scratch server's, `PREFIX<pid>-scratch<n>`.
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(DIR_PREFIX))
            .map(|n| n.split('-').next().unwrap_or_default())
        else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
