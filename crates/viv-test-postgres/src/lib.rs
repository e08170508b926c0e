//! Test fixture: a PostgreSQL server for the tests of one process, and fresh databases on it.
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
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let socket_dir = server();
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

/// The socket directory of this process's server, started on first use.
pub fn server() -> &'static Path {
    static SERVER: OnceLock<PathBuf> = OnceLock::new();
    SERVER.get_or_init(start)
}

fn start() -> PathBuf {
    let bin = std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .and_then(|versions| {
            versions
                .flatten()
                .map(|v| v.path().join("bin"))
                .filter(|b| b.join("initdb").is_file())
                .max()
        })
        .expect("PostgreSQL's server is not installed: apt-get install postgresql (scripts/install-deps does)");
    remove_stale_dirs();
    let dir = std::env::temp_dir().join(format!("{DIR_PREFIX}{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("the server's directory");
    let owner = server_user();
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).expect("giving the directory to postgres");
    }
    let data = dir.join("data");
    let mut initdb = Command::new(bin.join("initdb"));
    initdb
        .args(["-A", "trust", "-U", "viv", "-E", "UTF8", "--no-sync", "-D"])
        .arg(&data)
        .stdout(std::process::Stdio::null());
    if let Some((uid, gid)) = owner {
        initdb.uid(uid).gid(gid);
    }
    let status = initdb.status().expect("running initdb");
    assert!(status.success(), "initdb failed: {status}");

    let (tx, rx) = std::sync::mpsc::channel();
    let (postgres, socket_dir) = (bin.join("postgres"), dir.clone());
    // The server's parent-death signal fires when the thread that started it ends: this thread
    // lives as long as the test process.
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
        let child = command.spawn();
        let started = child.is_ok();
        let _ = tx.send(child.map(|c| c.id()));
        if started {
            loop {
                std::thread::park();
            }
        }
    });
    rx.recv().expect("the server thread").expect("starting postgres");
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
    dir
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
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(DIR_PREFIX)) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
