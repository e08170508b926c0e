//! Isolated sandbox networking.
//!
//! Every sandbox gets a *slot*: its own network namespace holding a tap device for its VM
//! (`10.0.2.2/24`, the guest is always `10.0.2.15`, so snapshots and forks keep their address)
//! and one end of a veth pair whose other end, in the host's namespace, has a `/30` from the
//! server's address pool. The namespace routes and masquerades the guest out through the veth;
//! the host masquerades the pool out of its uplink. Rules live in nftables: a fixed table in the
//! host's namespace ([`rules::host_table`]) and a policy table in each sandbox's namespace
//! ([`rules::sandbox_table`]), replaced in one transaction when the policy changes.
//!
//! The server runs two services for its sandboxes: a DNS forwarder (the guest's `10.0.2.3` is
//! redirected to it) that refuses names the policy denies, and an egress proxy that web
//! connections are redirected to when a policy names domains, which reads the HTTP `Host` or
//! TLS SNI before connecting (or refusing).
//!
//! Invariants:
//! - a slot's namespace and links exist exactly while its [`Slot`] value lives, or, once
//!   [`Slot::detach`]ed (its VM runs on while the server stops), while that VM runs; dropping a
//!   slot removes them (also if the VM still runs) and frees the index;
//! - at [`Network::start`] every namespace and link of this server's key is removed except the
//!   slots of VMs that outlived the previous server (the caller names them; they are taken
//!   back with [`Network::adopt`]), so slots are reclaimed after crashes; of other keys whose
//!   lock (under [`LOCK_DIR`], held by a running server) is free, every namespace whose tap no
//!   VM holds is removed, and the key's table once no namespace of it is left;
//! - up to [`NetworkConfig::spares`] slots are made ahead with the open policy (internet on,
//!   no lists; [`spares`]), so a sandbox's start takes one ready; a spare's index counts as
//!   used, [`Network::slots_in_use`] does not count spares, and a spare is removed like any
//!   slot when the server stops, or at the next start after a crash;
//! - per-sandbox rules exist only inside sandbox namespaces: the host table never changes while
//!   the server runs (a starting server replaces it in one transaction, since the DNS
//!   forwarder's port changes, and reloads the rules of every slot it takes back).

use std::collections::{BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, RwLock};

pub mod policy;
pub mod rules;
pub mod switches;

mod dns;
mod proxy;
mod slot;
mod spares;

pub use slot::Slot;
use slot::{make_slot, slot_of, start_proxy};

/// Entry points of the parsers for guest-controlled bytes, for the fuzz targets in `fuzz/`.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::dns::{question_name, refused};
    pub use crate::proxy::{sniff, Sniff};
}

pub use policy::{Cidr, Policy, PolicyError, PolicySpec};

/// Why isolated networking could not be set up or changed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Not root.
    #[error("the isolated network mode needs root (CAP_NET_ADMIN); run as root or use --network user")]
    NotRoot,
    /// `ip` or `nft` is missing.
    #[error("the isolated network mode needs `{tool}` (Debian package {package}): {source}")]
    MissingTool {
        /// The program.
        tool: &'static str,
        /// The Debian package that has it.
        package: &'static str,
        /// Why it could not run.
        source: std::io::Error,
    },
    /// The address pool is unusable.
    #[error("address pool {pool}: {reason}; choose another with --net-pool")]
    Pool {
        /// The pool.
        pool: Cidr,
        /// What is wrong.
        reason: String,
    },
    /// Every slot is taken.
    #[error("all {0} network slots of the address pool are in use; use a larger --net-pool")]
    Exhausted(usize),
    /// A command failed.
    #[error("`{command}` failed: {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// What it printed.
        stderr: String,
    },
    /// A system call or file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
}

/// Settings of isolated networking.
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    /// Host-side addresses: a `/30` per sandbox.
    pub pool: Cidr,
    /// Up to 6 characters `[0-9a-z]` unique to this server on the host; names its namespaces
    /// (`viv-KEY-N`), links (`vhKEYN`) and nftables table (`vivarium_KEY`).
    pub key: String,
    /// Slots kept made ahead, ready for the next sandbox (0: each is made when a sandbox
    /// starts, ~20 ms of `ip` and `nft`).
    pub spares: usize,
}

/// The state the slots, the DNS forwarder and the proxy share.
struct Shared {
    config: NetworkConfig,
    slots: usize,
    used: Mutex<BTreeSet<u32>>,
    /// Policies by the namespace end's address (the source of everything a sandbox sends to the
    /// host's services).
    policies: RwLock<HashMap<Ipv4Addr, Arc<Policy>>>,
    dns_port: u16,
}

impl Shared {
    fn policy_of(&self, addr: std::net::IpAddr) -> Option<Arc<Policy>> {
        let std::net::IpAddr::V4(addr) = addr else { return None };
        self.policies.read().expect("policies lock").get(&addr).cloned()
    }

    fn table_name(&self) -> String {
        format!("vivarium_{}", self.config.key)
    }

    fn link_prefix(&self) -> String {
        format!("vh{}", self.config.key)
    }

    fn netns_prefix(&self) -> String {
        format!("viv-{}-", self.config.key)
    }
}

/// Isolated networking of one server: the host table, the services, the slots.
pub struct Network {
    shared: Arc<Shared>,
    spares: Arc<spares::Spares>,
    tasks: Vec<tokio::task::AbortHandle>,
    /// Held while the server runs (see [`LOCK_DIR`]).
    _lock: std::fs::File,
    stopped: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Network").field("config", &self.shared.config).finish()
    }
}

/// A program's missing-tool error, naming the Debian package that has it.
fn missing(program: &'static str) -> impl FnOnce(std::io::Error) -> NetError {
    move |source| NetError::MissingTool {
        tool: program,
        package: if program == "nft" { "nftables" } else { "iproute2" },
        source,
    }
}

/// Runs a program with `input` on stdin; a non-zero exit is an error with what it printed.
fn run(program: &'static str, args: &[&str], input: Option<&str>) -> Result<(), NetError> {
    use std::io::Write as _;
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(missing(program))?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(input.as_bytes()).map_err(|source| NetError::Io {
            context: format!("writing to {program}"),
            source,
        })?;
    }
    let out = child.wait_with_output().map_err(|source| NetError::Io {
        context: format!("waiting for {program}"),
        source,
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetError::Command {
            command: format!("{program} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// What a program printed (for listings; an empty listing is no error).
fn output(program: &'static str, args: &[&str]) -> Result<String, NetError> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(missing(program))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The IPv4 name servers of the host's `/etc/resolv.conf`.
fn host_resolvers() -> Vec<SocketAddr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<Ipv4Addr>().ok())
        .map(|a| SocketAddr::from((a, 53)))
        .collect()
}

impl Network {
    /// Sets up this server's networking: removes what an earlier run with the same key left
    /// (but the slots in `keep`, whose VMs still run: take them back with [`Network::adopt`]),
    /// checks the pool, enables forwarding, loads the host table and starts the DNS forwarder
    /// and the egress proxy. Needs a Tokio runtime.
    pub async fn start(config: NetworkConfig, keep: BTreeSet<u32>) -> Result<Self, NetError> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(NetError::NotRoot);
        }
        if config.pool.prefix > 30 {
            return Err(NetError::Pool {
                pool: config.pool,
                reason: "it must be a /30 or larger (each sandbox takes a /30)".into(),
            });
        }
        let slots = (config.pool.size() / 4).min(u64::from(u32::MAX)) as usize;
        let lock = lock_own_key(&config.key).await?.ok_or_else(|| NetError::Pool {
            pool: config.pool,
            reason: format!(
                "another server holds the network key {} (same data directory?)",
                config.key
            ),
        })?;
        let dns = tokio::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
            .await
            .map_err(|source| NetError::Io {
                context: "binding the sandbox DNS forwarder".into(),
                source,
            })?;
        let port = |addr: std::io::Result<SocketAddr>| addr.map(|a| a.port()).unwrap_or_default();
        let shared = Arc::new(Shared {
            config,
            slots,
            used: Mutex::new(keep.clone()),
            policies: RwLock::new(HashMap::new()),
            dns_port: port(dns.local_addr()),
        });
        let setup = shared.clone();
        tokio::task::spawn_blocking(move || {
            remove_leftovers(&setup, &keep)?;
            check_pool(&setup)?;
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(|source| NetError::Io {
                context: "enabling IPv4 forwarding (/proc/sys/net/ipv4/ip_forward)".into(),
                source,
            })?;
            let table = rules::host_table(
                &setup.table_name(),
                &setup.link_prefix(),
                setup.config.pool,
                setup.dns_port,
            );
            run("nft", &["-f", "-"], Some(&table))
        })
        .await
        .map_err(|e| NetError::Io {
            context: "setting up networking".into(),
            source: std::io::Error::other(e),
        })??;
        let resolvers = host_resolvers();
        if resolvers.is_empty() {
            tracing::warn!("/etc/resolv.conf names no IPv4 name server; sandboxes will not resolve names");
        }
        let tasks = vec![tokio::spawn(dns::serve(Arc::new(dns), resolvers, shared.clone())).abort_handle()];
        tracing::info!(pool = %shared.config.pool, slots, dns_port = shared.dns_port, "isolated networking ready");
        let network = Self {
            spares: Arc::new(spares::Spares::new(shared.config.spares)),
            shared,
            tasks,
            _lock: lock,
            stopped: std::sync::atomic::AtomicBool::new(false),
        };
        network.spares.refill(&network.shared, std::time::Duration::ZERO);
        Ok(network)
    }

    /// Takes back slot `index` of a VM that outlived the previous server (kept at
    /// [`Network::start`]): puts `policy` in force again (with this server's DNS port) and
    /// starts its egress proxy. Dropping the slot removes it, as for any other.
    pub async fn adopt(&self, index: u32, policy: Policy) -> Result<Slot, NetError> {
        self.shared.used.lock().expect("slots lock").insert(index);
        let mut slot = slot_of(&self.shared, index);
        if !slot.netns_path().exists() {
            return Err(NetError::Io {
                context: format!("taking back network slot {index}"),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            });
        }
        // The pool may have changed since the slot was made (`--net-pool`): its links take
        // this server's addresses for the index.
        slot.readdress().await?;
        slot.apply(policy).await?;
        start_proxy(&self.shared, &mut slot)?;
        tracing::info!(netns = %slot.netns_name(), "took back a network slot");
        Ok(slot)
    }

    /// Takes a free slot: a namespace with a tap device for the VM, linked to the host, with
    /// `policy` in force. A spare made ahead is taken first (its rules replaced unless `policy`
    /// is the open one it was made with), and the spares are made up again afterwards.
    pub async fn acquire(&self, policy: Policy) -> Result<Slot, NetError> {
        let started = std::time::Instant::now();
        let spare = self.spares.take();
        let from_spare = spare.is_some();
        let slot = match spare {
            Some(slot) if policy == Policy::default() => Ok(slot),
            Some(slot) => slot.apply(policy).await.map(|()| slot),
            None => make_slot(&self.shared, policy).await,
        };
        self.refill_spares();
        let slot = slot?;
        tracing::debug!(netns = %slot.netns_name(), from_spare, ms = started.elapsed().as_millis() as u64, "network slot ready");
        Ok(slot)
    }

    /// Makes spare slots in the background, a moment after a start, until there are
    /// [`NetworkConfig::spares`].
    fn refill_spares(&self) {
        self.spares.refill(&self.shared, spares::REFILL_AFTER_TAKE);
    }

    /// Slots sandboxes hold (spares, ready or being made, are not counted).
    pub fn slots_in_use(&self) -> usize {
        let used = self.shared.used.lock().expect("slots lock").len();
        used.saturating_sub(self.spares.held())
    }
}

impl Network {
    /// Removes this server's table, namespaces and links (those of VMs still running too) and
    /// stops the services. Idempotent; also done on drop.
    pub fn shutdown(&self) {
        if self.stopped.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        for task in &self.tasks {
            task.abort();
        }
        self.spares.close();
        remove_resources(&self.shared.config.key);
        // Nothing of this server's is left for another to clean up: its lock file goes too
        // (removed while held, so no other server takes the key meanwhile).
        let _ = std::fs::remove_file(lock_path(&self.shared.config.key));
    }

    /// Stops the services but leaves the host table and the namespaces of detached slots: their
    /// VMs run on (reaching out through the table's NAT, without DNS until a server runs again)
    /// for the next server to take back.
    pub fn stop_leaving_slots(&self) {
        if self.stopped.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        for task in &self.tasks {
            task.abort();
        }
        // No VM holds a spare: it goes.
        self.spares.close();
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Where servers hold a lock per key while they run, so that another server can tell resources
/// of a live server from those of a crashed one.
const LOCK_DIR: &str = "/run/vivarium/net";

fn lock_path(key: &str) -> String {
    format!("{LOCK_DIR}/{key}.lock")
}

/// Takes the lock of `key` without waiting: `None` while another process holds it.
///
/// Lock files are removed only by a process holding their lock (a stopping server its own, a
/// starting one those of servers that are gone). A process that opened the file before such a
/// removal would lock a file no longer at the path, so a lock counts only once the path still
/// names the locked file; otherwise the path is opened again.
fn lock_key(key: &str) -> Result<Option<std::fs::File>, NetError> {
    use std::os::fd::AsRawFd as _;
    use std::os::unix::fs::MetadataExt as _;
    std::fs::create_dir_all(LOCK_DIR).map_err(|source| NetError::Io {
        context: format!("creating {LOCK_DIR}"),
        source,
    })?;
    let path = lock_path(key);
    loop {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| NetError::Io {
                context: format!("opening {path}"),
                source,
            })?;
        // SAFETY: flock on a descriptor `file` owns, with plain flags.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Ok(None);
        }
        let locked = file.metadata().map_err(|source| NetError::Io {
            context: format!("reading {path}"),
            source,
        })?;
        let at_path = std::fs::metadata(&path).ok();
        if at_path.is_some_and(|m| (m.dev(), m.ino()) == (locked.dev(), locked.ino())) {
            return Ok(Some(file));
        }
    }
}

/// Takes this server's own lock of `key`. A starting server looking for the leftovers of
/// servers that are gone holds each lock it finds for a moment, so a lock that is busy is asked
/// for again for up to a second before it counts as another live server's.
async fn lock_own_key(key: &str) -> Result<Option<std::fs::File>, NetError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        if let Some(file) = lock_key(key)? {
            return Ok(Some(file));
        }
        if std::time::Instant::now() > deadline {
            return Ok(None);
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Names of the host's links.
fn link_names() -> Result<Vec<String>, NetError> {
    Ok(output("ip", &["-o", "link", "show"])?
        .lines()
        // "7: vhabc1230@if2: <...>"
        .filter_map(|l| {
            l.split(':')
                .nth(1)
                .map(|n| n.trim().split('@').next().unwrap_or("").to_owned())
        })
        .collect())
}

/// Names of the host's named network namespaces.
fn netns_names() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Removes the namespaces, links and table named with `key`; what is gone already is no error.
fn remove_resources(key: &str) {
    let prefix = format!("viv-{key}-");
    for name in netns_names().into_iter().filter(|n| n.starts_with(&prefix)) {
        tracing::info!(netns = %name, "removing a network namespace");
        let _ = run("ip", &["netns", "del", &name], None);
    }
    let links = format!("vh{key}");
    for name in link_names()
        .unwrap_or_default()
        .into_iter()
        .filter(|n| n.starts_with(&links))
    {
        let _ = run("ip", &["link", "del", &name], None);
    }
    let _ = run("nft", &["delete", "table", "inet", &format!("vivarium_{key}")], None);
}

/// Keys of Vivarium resources on the host, of any server, by their distinctive names
/// (namespaces, tables; a link never outlives its namespace, where its peer lives).
fn resource_keys() -> BTreeSet<String> {
    let is_key = |k: &str| k.len() == 6 && k.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_lowercase());
    let mut keys = BTreeSet::new();
    for name in netns_names() {
        if let Some((key, _)) = name.strip_prefix("viv-").and_then(|r| r.split_once('-')) {
            keys.insert(key.to_owned());
        }
    }
    let tables = output("nft", &["list", "tables"]).unwrap_or_default();
    for line in tables.lines() {
        if let Some(key) = line.trim().strip_prefix("table inet vivarium_") {
            keys.insert(key.to_owned());
        }
    }
    keys.retain(|k| is_key(k));
    keys
}

/// Whether a VM holds the tap device of namespace `netns` (a tap without one has no carrier).
fn tap_in_use(netns: &str) -> bool {
    let out = Command::new("ip")
        .args(["-n", netns, "-o", "link", "show", rules::TAP])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    match out {
        Ok(out) if out.status.success() => !String::from_utf8_lossy(&out.stdout).contains("NO-CARRIER"),
        _ => false,
    }
}

/// Removes slot `index` of `key` (its links and namespace); what is gone already is no error.
fn remove_slot(key: &str, index: &str) {
    let _ = run(
        "ip",
        &["-force", "-batch", "-"],
        Some(&format!("link del vh{key}{index}\nnetns del viv-{key}-{index}\n")),
    );
}

/// Removes what this server's key left from an earlier run (but the slots in `keep`), and what
/// servers that are gone left under other keys (their lock is free: they crashed, stopped
/// leaving VMs running, or their data directory is gone): every slot no VM holds, and the table
/// once no slot is left.
fn remove_leftovers(shared: &Shared, keep: &BTreeSet<u32>) -> Result<(), NetError> {
    let own = &shared.config.key;
    let prefix = shared.netns_prefix();
    for name in netns_names() {
        let Some(index) = name.strip_prefix(&prefix) else {
            continue;
        };
        if !index.parse::<u32>().is_ok_and(|i| keep.contains(&i)) {
            tracing::info!(netns = %name, "removing a network namespace");
            remove_slot(own, index);
        }
    }
    // Links whose namespace is gone (a crash between creating the two).
    for name in link_names().unwrap_or_default() {
        let Some(index) = name.strip_prefix(&shared.link_prefix()) else {
            continue;
        };
        if !index.parse::<u32>().is_ok_and(|i| keep.contains(&i)) {
            let _ = run("ip", &["link", "del", &name], None);
        }
    }
    let with_resources = resource_keys();
    for key in &with_resources {
        if key == own {
            continue;
        }
        if let Some(_lock) = lock_key(key)? {
            let prefix = format!("viv-{key}-");
            let mut left = 0;
            for name in netns_names() {
                let Some(index) = name.strip_prefix(&prefix) else {
                    continue;
                };
                if tap_in_use(&name) {
                    left += 1;
                } else {
                    tracing::info!(netns = %name, "removing the network namespace of a server that is gone");
                    remove_slot(key, index);
                }
            }
            if left == 0 {
                tracing::info!(key = %key, "removing the networking of a server that is gone");
                remove_resources(key);
                let _ = std::fs::remove_file(lock_path(key));
            }
        }
    }
    // Lock files of servers that are gone and left nothing (older servers kept theirs); those
    // of keys with resources were dealt with above.
    for entry in std::fs::read_dir(LOCK_DIR).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(key) = name.strip_suffix(".lock") else {
            continue;
        };
        if key == own.as_str() || with_resources.contains(key) {
            continue;
        }
        if let Some(_lock) = lock_key(key)? {
            let _ = std::fs::remove_file(lock_path(key));
        }
    }
    Ok(())
}

/// Refuses a pool that overlaps an address the host already has (on a link not ours).
fn check_pool(shared: &Shared) -> Result<(), NetError> {
    let pool = shared.config.pool;
    for line in output("ip", &["-o", "-4", "addr", "show"])?.lines() {
        // "2: eth0    inet 192.0.2.2/24 brd ... scope global eth0"
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(link), Some(addr)) = (fields.get(1), fields.iter().position(|f| *f == "inet")) else {
            continue;
        };
        let Some(Ok(cidr)) = fields.get(addr + 1).map(|a| a.parse::<Cidr>()) else {
            continue;
        };
        if !link.starts_with(&shared.link_prefix()) && cidr.overlaps(&pool) {
            return Err(NetError::Pool {
                pool,
                reason: format!("it overlaps {cidr} on {link}"),
            });
        }
    }
    Ok(())
}

/// Runs `work` on a short-lived thread that joins the network namespace at `netns`: sockets it
/// opens stay in that namespace, and no other thread changes namespace. Blocking.
fn in_namespace<T: Send>(
    netns: &std::path::Path,
    work: impl FnOnce() -> std::io::Result<T> + Send,
) -> std::io::Result<T> {
    use std::os::fd::AsRawFd as _;
    let file = std::fs::File::open(netns)?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns on a descriptor this function keeps open; it changes only this
                // thread's namespace, and the thread ends right after `work`.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                work()
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the thread in the namespace panicked")))
    })
}

/// A TCP listener on `port` inside the namespace at `netns` (the socket stays there).
fn listen_in(netns: &std::path::Path, port: u16) -> Result<tokio::net::TcpListener, NetError> {
    let io = |context: String| move |source| NetError::Io { context, source };
    let listener = in_namespace(netns, || {
        let listener = std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    })
    .map_err(io(format!("binding the egress proxy in {}", netns.display())))?;
    tokio::net::TcpListener::from_std(listener).map_err(io("registering the egress proxy".into()))
}

/// A TCP connection to `address`, opened from inside the namespace at `netns` (the socket stays
/// there), within `timeout`. Blocking.
pub fn connect_in(
    netns: &std::path::Path,
    address: std::net::SocketAddr,
    timeout: std::time::Duration,
) -> std::io::Result<std::net::TcpStream> {
    in_namespace(netns, || std::net::TcpStream::connect_timeout(&address, timeout))
}
