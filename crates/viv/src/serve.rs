//! `viv serve`: prepares images, takes over what the previous server left (running VMs
//! included), and serves the API until SIGINT/SIGTERM, then leaves, pauses or kills the running
//! sandboxes as `--on-shutdown` says.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use viv_server::{AppState, Config, Manager, Metrics};
use viv_vmm::Accel;

use crate::output::TerminalProgress;
use crate::Dirs;

/// Options of `viv serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "VIV_LISTEN", default_value = "127.0.0.1:3000")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub dirs: Dirs,
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
    /// Accelerator: auto, kvm or tcg.
    #[arg(long, env = "VIV_ACCEL", default_value = "auto")]
    pub accel: Accel,
    /// Default vCPUs per sandbox.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Default memory per sandbox, MiB.
    #[arg(long, default_value_t = 512)]
    pub memory_mib: u32,
    /// The static agent binary (found beside `viv` by default).
    #[arg(long, env = "VIV_AGENT")]
    pub agent: Option<PathBuf>,
    /// Kernel package instead of the one linux-image-cloud-amd64 depends on.
    #[arg(long)]
    pub kernel_package: Option<String>,
    /// Seconds a cold boot may take until the agent answers.
    #[arg(long, default_value_t = 120)]
    pub boot_timeout: u64,
    /// Start sandboxes by restoring their template's snapshot instead of booting them, and allow
    /// pause, resume, fork and snapshots. `--snapshots=false` boots every sandbox.
    #[arg(long, env = "VIV_SNAPSHOTS", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub snapshots: bool,
    /// Warm VMs kept ready per template and VM shape, restored and with a first command run,
    /// that creates take over (0 disables the pool).
    #[arg(long, env = "VIV_POOL_SIZE", default_value_t = 1)]
    pub pool_size: usize,
    /// Most warm VMs per template and VM shape: a template's pool grows to the creates of the
    /// last `--pool-window` seconds, up to this (and while the host has room for another VM).
    #[arg(long, env = "VIV_POOL_MAX", default_value_t = 4)]
    pub pool_max: usize,
    /// Seconds over which creates count as demand for the warm pool.
    #[arg(long, env = "VIV_POOL_WINDOW", default_value_t = 60)]
    pub pool_window: u64,
    /// Seconds a warm VM beyond `--pool-size` waits for a create before it is killed.
    #[arg(long, env = "VIV_POOL_IDLE", default_value_t = 300)]
    pub pool_idle: u64,
    /// Versions kept per template: after each build or commit, the oldest versions beyond this
    /// number that no tag points at and nothing uses are deleted (unset: all are kept).
    #[arg(long, env = "VIV_KEEP_VERSIONS", value_parser = clap::value_parser!(u32).range(1..))]
    pub keep_versions: Option<u32>,
    /// Sandbox pause, fork and snapshot nodes store only the memory pages that differ from their
    /// parent, in chains of at most this many diffs (a save past it diffs against the template's
    /// memory alone). Nodes are saved whole and rewritten as diffs in the background. 0 keeps
    /// each node's memory whole (the default for now).
    #[arg(long, env = "VIV_MEMORY_DIFF_CHAIN", default_value_t = 0)]
    pub memory_diff_chain: usize,
    /// How long a paused sandbox's VM is kept, stopped, after the pause (e.g. `10s`; `0` turns
    /// it off). A resume within that time continues the VM (tens of milliseconds) instead of
    /// restoring its snapshot; the pause itself is saved to disk either way. The VM's memory
    /// stays in use meanwhile (it is freed sooner when a new sandbox needs the room). Never in
    /// a cluster.
    #[arg(long, env = "VIV_PAUSE_KEEP_WARM", default_value = "10s", value_parser = parse_keep_warm)]
    pub pause_keep_warm: Duration,
    /// Domain of sandbox host names: `PORT-SANDBOXID.DOMAIN` reaches PORT in the sandbox
    /// (point a wildcard DNS record at this server; `*.localhost` resolves to loopback in
    /// browsers).
    #[arg(long, env = "VIV_DOMAIN", default_value = "localhost")]
    pub domain: String,
    /// Sandbox networking: `isolated` (a network namespace, tap device and veth pair per
    /// sandbox, nftables NAT and per-sandbox allow/deny rules; needs root), `user` (QEMU's
    /// user-mode stack, no root needed, internet on or off only, and the host's loopback
    /// services are reachable), `none` (no network card), or `auto`: isolated when running as
    /// root with `ip` and `nft` installed, else user.
    #[arg(long, env = "VIV_NETWORK", default_value = "auto")]
    pub network: String,
    /// Host-side address pool of the isolated mode: a /30 per running sandbox. Must not overlap
    /// the host's networks or another server's pool.
    #[arg(long, env = "VIV_NET_POOL", default_value = "10.200.0.0/16")]
    pub net_pool: viv_net::Cidr,
    /// Network slots (namespace, links and rules) of the isolated mode made ahead with the open
    /// policy, so that a restore, resume or fork takes a ready one instead of making it (~20 ms);
    /// 0 makes each when its sandbox starts.
    #[arg(long, env = "VIV_NET_SPARES", default_value_t = 1)]
    pub net_spares: usize,
    /// Where VM switches created without a subnet get theirs (a /24 each). Must not overlap the
    /// host's networks, the sandbox pool (--net-pool) or another server's range.
    #[arg(long, env = "VIV_SWITCH_RANGE", default_value = "10.201.0.0/16")]
    pub switch_range: viv_net::Cidr,
    /// The first three pairs of the MAC addresses generated for VM NICs (unicast).
    #[arg(long, env = "VIV_MAC_PREFIX", default_value = "52:54:00")]
    pub mac_prefix: String,
    /// A registry mirror (base URL, e.g. `http://10.0.0.5:5000`) tried before Docker Hub for
    /// images templates are built from, as Docker's `registry-mirrors` (for air-gapped hosts);
    /// repeat for several, tried in order.
    #[arg(long = "registry-mirror", env = "VIV_REGISTRY_MIRRORS", value_delimiter = ',')]
    pub registry_mirrors: Vec<String>,
    /// PEM file of CA certificates trusted for HTTPS registries and mirrors besides the host's
    /// CA store (a private registry's or a mirror's own CA).
    #[arg(long, env = "VIV_REGISTRY_CA")]
    pub registry_ca: Option<PathBuf>,
    /// A directory of template build layers shared with other servers on this host (a build
    /// takes a step's layer from it instead of running the step; finished builds add theirs).
    /// Off by default: a server's own data directory already caches its layers.
    #[arg(long, env = "VIV_LAYER_CACHE_DIR")]
    pub layer_cache_dir: Option<PathBuf>,
    /// PEM file of CA certificates every sandbox trusts besides its image's own (for egress
    /// through a TLS-intercepting proxy), added to the guest's system bundle.
    #[arg(long, env = "VIV_GUEST_CA_FILE")]
    pub guest_ca_file: Option<PathBuf>,
    /// What stopping the server (SIGTERM, Ctrl-C) does with running sandboxes: `leave` them
    /// running for the next server to take over (upgrades, restarts), `pause` them into
    /// snapshots, or `kill` them.
    #[arg(long, env = "VIV_ON_SHUTDOWN", default_value = "leave")]
    pub on_shutdown: viv_server::ShutdownMode,
    /// Jail every QEMU (a uid of its own, no capabilities, seccomp, a mount namespace, a
    /// cgroup). `--jail=false` exists to measure what the jail costs; never run untrusted code
    /// without it.
    #[arg(long, env = "VIV_JAIL", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", hide = true)]
    pub jail: bool,
    /// Also serve SSH on this address (`ssh SANDBOXID@HOST -p PORT`): sign-in by public keys
    /// registered with `viv keys ssh-add`, to sandboxes the key's API key created. The host key
    /// is made on first start in DATA_DIR/ssh. In a cluster it reaches the sandboxes of every
    /// node (not on `--role node`).
    #[arg(long, env = "VIV_SSH_LISTEN")]
    pub ssh_listen: Option<SocketAddr>,
    /// Serve `GET /metrics` without an API key. By default a scraper authenticates like any
    /// client (`X-API-Key`, or `Authorization: Bearer KEY` as Prometheus sends it): the metrics
    /// name VMs and count sandboxes.
    #[arg(long, env = "VIV_PUBLIC_METRICS")]
    pub public_metrics: bool,
    /// The host-wide range of uids jailed QEMUs run as, `FIRST-LAST` (shared by every server on
    /// the host; must not overlap real users or subuid ranges).
    #[arg(long, env = "VIV_JAIL_UIDS", default_value = "1879048192-1879113727", value_parser = parse_uid_range)]
    pub jail_uids: (u32, u32),
    /// How long a web console session lasts after signing in with an API key (e.g. `12h`,
    /// `30m`); the browser signs in again after it.
    #[arg(long, env = "VIV_SESSION_TTL", default_value = "12h", value_parser = parse_ttl)]
    pub session_ttl: Duration,
    /// What this server does in its cluster: `all` (API server and node in one, the default),
    /// `api` (the REST API, web console, events, placement and forwarding; runs no VM) or
    /// `node` (runs VMs; answers only requests API servers forward to it). `api` and `node`
    /// need a shared `--database postgres://…`.
    #[arg(long, env = "VIV_ROLE", default_value = "all")]
    pub role: viv_api::nodes::NodeRole,
    /// This node's name in the cluster (`viv node list`) and its sandboxes' `clientID`
    /// (default: the host name).
    #[arg(long, env = "VIV_NODE_NAME")]
    pub node_name: Option<String>,
    /// The address the other servers of the cluster reach this one's API at (default:
    /// `http://` and the `--listen` address, the host name for an unspecified IP).
    #[arg(long, env = "VIV_NODE_URL")]
    pub node_url: Option<String>,
    /// How often this node heartbeats and looks for nodes that stopped (e.g. `5s`).
    #[arg(long, env = "VIV_HEARTBEAT", default_value = "5s", value_parser = parse_ttl)]
    pub heartbeat: Duration,
    /// How long a node may miss heartbeats before it is marked down and its running sandboxes
    /// are reported lost (e.g. `30s`).
    #[arg(long, env = "VIV_NODE_DOWN_AFTER", default_value = "30s", value_parser = parse_ttl)]
    pub node_down_after: Duration,
    /// How many other nodes get a copy of each sandbox paused here (its disk, memory and agent
    /// key), so that it resumes on one of them when this node dies; a pause returns once the
    /// copies are made. 0 keeps paused sandboxes on this node alone.
    #[arg(long, env = "VIV_PAUSE_REPLICAS", default_value_t = 0)]
    pub pause_replicas: usize,
}

/// A session lifetime such as `12h` or `90s`: at least a second, at most a year.
fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (use e.g. 12h, 30m, 90s)"))?;
    if d < Duration::from_secs(1) || d > Duration::from_secs(366 * 86_400) {
        return Err("a session lasts between 1s and a year".into());
    }
    Ok(d)
}

/// `--pause-keep-warm`: `0` (off) or a duration up to an hour.
fn parse_keep_warm(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    let d = humantime::parse_duration(s).map_err(|e| format!("{e} (use e.g. 10s, 2m, or 0 for off)"))?;
    if d > Duration::from_secs(3600) {
        return Err("a paused VM is kept for at most an hour (1h)".into());
    }
    Ok(d)
}

/// A `FIRST-LAST` uid range as first uid and count.
fn parse_uid_range(s: &str) -> Result<(u32, u32), String> {
    let (first, last) = s
        .split_once('-')
        .ok_or("use FIRST-LAST, such as 1879048192-1879113727")?;
    let first: u32 = first.trim().parse().map_err(|_| format!("'{first}' is not a uid"))?;
    let last: u32 = last.trim().parse().map_err(|_| format!("'{last}' is not a uid"))?;
    if first == 0 || last < first || last == u32::MAX {
        return Err("the range must start above 0, end at or after its start and below 4294967295".into());
    }
    Ok((first, last - first + 1))
}

/// Finds the agent binary: the given path, else beside this executable, else where
/// `scripts/build` puts it in the cargo target directory.
pub fn find_agent(given: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(path) = given {
        return Ok(path);
    }
    let exe = std::env::current_exe().context("locating the viv executable")?;
    let dir = exe.parent().context("the viv executable has no directory")?;
    // target/{debug,release}/viv → target/<triple>/agent/viv-agent, where scripts/build puts
    // the static build; a `viv-agent` beside `viv` (an install) comes next.
    let mut candidates: Vec<PathBuf> = dir
        .ancestors()
        .take(3)
        .map(|a| a.join("x86_64-unknown-linux-gnu/agent/viv-agent"))
        .collect();
    candidates.push(dir.join("viv-agent"));
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .context("cannot find the viv-agent binary; build it with `scripts/build` or pass --agent / VIV_AGENT")
}

/// Runs the server.
pub async fn run(args: ServeArgs) -> Result<()> {
    let agent = find_agent(args.agent)?;
    std::fs::create_dir_all(&args.dirs.data_dir)
        .with_context(|| format!("creating {}", args.dirs.data_dir.display()))?;
    let _lock = lock_data_dir(&args.dirs.data_dir)?;
    let store = Arc::new(crate::commands::open_store(&args.dirs)?);
    tracing::info!(engine = store.engine(), "state store open");
    let node_id = viv_server::cluster::node_id(&args.dirs.data_dir)
        .with_context(|| format!("reading this node's id in {}", args.dirs.data_dir.display()))?;
    store.set_node(&node_id);
    store.claim_unowned_rows()?;
    if args.node_down_after <= args.heartbeat {
        bail!(
            "--node-down-after ({:?}) must be longer than --heartbeat ({:?}), or live nodes are marked down",
            args.node_down_after,
            args.heartbeat
        );
    }
    let role = args.role;
    if role != viv_api::nodes::NodeRole::All && store.postgres_url().is_none() {
        bail!(
            "--role {role} needs a store shared with the rest of the cluster: add --database postgres://… \
             (with the embedded SQLite store a server is alone, --role all)"
        );
    }
    if role == viv_api::nodes::NodeRole::Node && args.ssh_listen.is_some() {
        bail!(
            "--ssh-listen is for servers clients talk to (--role api or all): a node answers clients \
             nothing but its health, and an API server's gateway reaches the sandboxes of every node"
        );
    }
    if let Some(url) = args.node_url.as_deref().filter(|u| !u.starts_with("http://")) {
        bail!("--node-url {url}: expected http://HOST:PORT (the cluster's servers talk plain HTTP to each other)");
    }
    let node_name = args.node_name.clone().unwrap_or_else(hostname);
    if store.list_keys()?.is_empty() {
        let key = viv_server::create_api_key(&store, "initial")?;
        println!("Created the first API key (shown only once): {}", key.key);
    }
    let config = Config {
        data_dir: args.dirs.data_dir.clone(),
        cache_dir: args.dirs.cache_dir.clone(),
        accel: args.accel,
        vcpus: args.vcpus,
        memory_mib: args.memory_mib,
        agent_binary: agent,
        kernel_package: args.kernel_package,
        boot_timeout: Duration::from_secs(args.boot_timeout),
        node_name: node_name.clone(),
        snapshots: args.snapshots,
        pool: viv_server::manager::PoolPolicy {
            // An API server keeps no warm VM.
            min: if role.runs_vms() { args.pool_size } else { 0 },
            max: if role.runs_vms() { args.pool_max } else { 0 },
            window: Duration::from_secs(args.pool_window),
            idle: Duration::from_secs(args.pool_idle),
        },
        keep_versions: args.keep_versions,
        memory_diff_chain: args.memory_diff_chain,
        pause_keep_warm: args.pause_keep_warm,
        pause_replicas: args.pause_replicas,
        domain: args.domain.clone(),
        network: if role.runs_vms() {
            network_mode(&args.network)?
        } else {
            viv_server::NetworkMode::None
        },
        net_pool: args.net_pool,
        net_spares: args.net_spares,
        switch_range: args.switch_range,
        mac_prefix: {
            if !viv_server::manager::valid_mac_prefix(&args.mac_prefix) {
                anyhow::bail!(
                    "--mac-prefix {}: expected three hex pairs with a unicast first byte, such as 52:54:00",
                    args.mac_prefix
                );
            }
            args.mac_prefix.clone()
        },
        role,
        guest_ca_certificates: match &args.guest_ca_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading the guest CA certificates {}", path.display()))?,
            ),
            None => None,
        },
        jail: args.jail,
        jail_uids: args.jail_uids,
        registry_mirrors: args.registry_mirrors,
        layer_cache_dir: args.layer_cache_dir.clone(),
        registry_ca_certificates: match &args.registry_ca {
            Some(path) => Some(registry_ca(path)?),
            None => None,
        },
    };
    let metrics = Arc::new(Metrics::default());
    let manager = {
        let (store, metrics) = (store.clone(), metrics.clone());
        tokio::task::spawn_blocking(move || {
            let progress = TerminalProgress::new();
            Manager::prepare(config, store, metrics, &progress)
        })
        .await??
    };
    let manager = Arc::new(manager);
    // An API server holds no VM: nothing to take over, time out or start.
    if role.runs_vms() {
        let recovery = manager
            .recover()
            .await
            .context("taking over from the previous server")?;
        if !recovery.adopted.is_empty() || !recovery.failed.is_empty() {
            tracing::info!(
                taken_over = recovery.adopted.len(),
                lost = recovery.failed.len(),
                orphans_killed = recovery.orphans.len(),
                "took over from the previous server"
            );
        }
        if !recovery.vms.adopted.is_empty() || !recovery.vms.lost.is_empty() {
            tracing::info!(
                taken_over = recovery.vms.adopted.len(),
                lost = recovery.vms.lost.len(),
                "took over the VM manager's VMs"
            );
        }
        tracing::info!(confinement = %manager.confinement(), "VMs are confined");
        manager.start_deadline_enforcer();
        manager.start_parked_sweeper();
        manager.start_console_log_cap();
        manager.autostart_vms();
        if manager.accel() == Accel::Tcg && args.accel == Accel::Auto {
            tracing::info!("using TCG (software emulation): /dev/kvm is missing, unusable, or nested");
        }
        if let Some(reporting) = viv_vmm::host_memory::free_page_reporting(std::path::Path::new("/")) {
            tracing::warn!(order = reporting.order, "{}", reporting.advice());
        }
    }
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(l) => l,
        Err(e) => bail!(
            "cannot listen on {}: {e} (is another server running? use --listen)",
            args.listen
        ),
    };
    let node_url = match &args.node_url {
        Some(url) => url.trim_end_matches('/').to_owned(),
        None => {
            let addr = listener.local_addr()?;
            if addr.ip().is_unspecified() {
                format!("http://{}:{}", hostname(), addr.port())
            } else {
                format!("http://{addr}")
            }
        }
    };
    let cluster = viv_server::cluster::Cluster::join(
        &store,
        &manager,
        node_id,
        viv_server::cluster::ClusterConfig {
            role,
            name: node_name,
            url: node_url,
            heartbeat: args.heartbeat,
            down_after: args.node_down_after,
        },
    )
    .context("registering this server as a node")?;
    cluster.start(store.clone(), &manager, metrics.clone());
    let state = AppState {
        manager: manager.clone(),
        store,
        metrics,
        session_ttl: args.session_ttl,
        public_metrics: args.public_metrics,
        cluster,
    };
    tracing::info!(listen = %args.listen, %role, accel = %manager.accel(), network = %manager.network_mode(), "Vivarium is serving");
    if role.runs_vms() {
        println!(
            "Vivarium listening on http://{} (role {role}, accel {})",
            listener.local_addr()?,
            manager.accel()
        );
    } else {
        println!(
            "Vivarium listening on http://{} (role api: VMs run on the cluster's nodes)",
            listener.local_addr()?
        );
    }
    println!(
        "Web console: http://{}/ (sign in with an API key)",
        listener.local_addr()?
    );
    if let Some(addr) = args.tls.tls_listen {
        let (config, ca) = crate::tls::server_config(&args.tls, &args.dirs.data_dir, &args.domain)?;
        let tls = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (--tls-listen)"))?;
        println!(
            "Sandbox host names over TLS: https://PORT-SANDBOXID.{}:{}",
            args.domain,
            tls.local_addr()?.port()
        );
        if let Some(ca) = ca {
            println!(
                "  issued by Vivarium's CA {}: trust it (e.g. copy it to /usr/local/share/ca-certificates/vivarium.crt \
                 and run update-ca-certificates, or set SSL_CERT_FILE / NODE_EXTRA_CA_CERTS)",
                ca.display()
            );
        }
        tokio::spawn(crate::tls::serve(
            tls,
            config,
            viv_server::routes::router(state.clone()),
        ));
    }
    let ssh_shutdown = tokio_util::sync::CancellationToken::new();
    if let Some(addr) = args.ssh_listen {
        let key = viv_ssh::host_key::load_or_create(&viv_ssh::host_key::host_key_path(&args.dirs.data_dir))?;
        let fingerprint = key.fingerprint(viv_ssh::HashAlg::Sha256);
        let ssh = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (--ssh-listen)"))?;
        let port = ssh.local_addr()?.port();
        println!(
            "SSH gateway on {} (host key {fingerprint}): ssh -p {port} SANDBOXID@HOST",
            ssh.local_addr()?
        );
        tokio::spawn(viv_ssh::serve(
            ssh,
            state.clone(),
            key,
            viv_ssh::Limits::default(),
            ssh_shutdown.clone(),
        ));
    }
    let stopping = Arc::new(tokio::sync::Notify::new());
    let serve = {
        let stopping = stopping.clone();
        // No Nagle: a streamed answer's last small write (an exec's end event) must not wait
        // for the client's delayed ACK of the one before it, 40 ms on a kept-alive connection.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, viv_server::routes::router(state)).with_graceful_shutdown(async move {
            shutdown_signal().await;
            stopping.notify_one();
        })
    };
    // Streams (command output, template builds) may not end by themselves; they get a moment.
    tokio::select! {
        served = serve => served.context("serving")?,
        () = async {
            stopping.notified().await;
            tokio::time::sleep(GRACE).await;
        } => tracing::warn!("requests still open {GRACE:?} after the signal; closing them"),
    }
    ssh_shutdown.cancel();
    tracing::info!(on_shutdown = %args.on_shutdown, "shutting down");
    manager.shutdown(args.on_shutdown).await;
    Ok(())
}

/// The network mode `--network` asks for, with `auto` resolved: the isolated mode where it can
/// work (root, iproute2 and nftables), else the user-mode stack.
/// Reads `--registry-ca` and checks that a puller can trust it, so a bad bundle stops the
/// server at start rather than failing builds later.
fn registry_ca(path: &std::path::Path) -> Result<String> {
    let pem = std::fs::read_to_string(path)
        .with_context(|| format!("reading the registry CA certificates {}", path.display()))?;
    viv_oci::Puller::new(Vec::new(), Some(&pem))
        .with_context(|| format!("the registry CA certificates {}", path.display()))?;
    Ok(pem)
}

fn network_mode(asked: &str) -> Result<viv_server::NetworkMode> {
    use viv_server::NetworkMode;
    if asked != "auto" {
        return asked
            .parse::<NetworkMode>()
            .map_err(|e| anyhow::anyhow!("--network: {e}, or auto"));
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let runs = |program: &str, arg: &str| {
        std::process::Command::new(program)
            .arg(arg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    let mode = if !root {
        tracing::info!("network mode user: the isolated mode needs root");
        NetworkMode::User
    } else if !runs("nft", "--version") || !runs("ip", "-V") {
        tracing::warn!("network mode user: the isolated mode needs `ip` and `nft` (apt-get install iproute2 nftables)");
        NetworkMode::User
    } else {
        NetworkMode::Isolated
    };
    Ok(mode)
}

/// How long open requests may go on after SIGTERM or Ctrl-C.
const GRACE: Duration = Duration::from_secs(5);

/// Holds an exclusive lock on the data directory for as long as the returned file lives, so two
/// servers never manage the same sandboxes.
fn lock_data_dir(dir: &std::path::Path) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd as _;
    let path = dir.join("server.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock takes a descriptor this function owns and plain flags.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!(
            "another Vivarium server is using {}; stop it first or pass another --data-dir",
            dir.display()
        );
    }
    Ok(file)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "local".into())
}
