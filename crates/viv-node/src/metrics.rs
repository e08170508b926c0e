//! Prometheus metrics, rendered in the text exposition format at `GET /metrics`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Uploads (`POST /files` to agents) this process sent over a sandbox's network, the data path;
/// process-wide, since agent clients hold no reference to the metrics.
pub static FILE_UPLOADS_NETWORK: Counter = Counter(AtomicU64::new(0));
/// Uploads sent over the channel (sandboxes without a network, or whose data path failed).
pub static FILE_UPLOADS_CHANNEL: Counter = Counter(AtomicU64::new(0));

/// Sum and count of observations, with cumulative buckets.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    state: Mutex<(Vec<u64>, f64, u64)>,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            state: Mutex::new((vec![0; bounds.len()], 0.0, 0)),
        }
    }

    /// Records one value.
    pub fn observe(&self, value: f64) {
        let mut state = self.state.lock().expect("histogram lock");
        for (i, bound) in self.bounds.iter().enumerate() {
            if value <= *bound {
                state.0[i] += 1;
            }
        }
        state.1 += value;
        state.2 += 1;
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(std::sync::atomic::AtomicI64);

impl Gauge {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    /// Subtracts one.
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
    fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Kinds of SSH channels the gateway counts.
pub const SSH_CHANNEL_KINDS: [&str; 5] = ["shell", "exec", "sftp", "direct-tcpip", "refused"];

/// The SSH gateway's metrics (`crates/viv-ssh`).
#[derive(Debug, Default)]
pub struct SshMetrics {
    /// TCP connections accepted.
    pub connections: Counter,
    /// Connections open now.
    pub connections_open: Gauge,
    /// Sign-ins refused (unknown key, a sandbox not the key's, other methods).
    pub auth_failures: Counter,
    /// Channels started, by kind (indexes of [`SSH_CHANNEL_KINDS`]).
    pub channels: [Counter; 5],
    /// Channels open now.
    pub channels_open: Gauge,
}

impl SshMetrics {
    /// Counts a channel of `kind` (one of [`SSH_CHANNEL_KINDS`]).
    pub fn channel(&self, kind: &str) {
        if let Some(i) = SSH_CHANNEL_KINDS.iter().position(|k| *k == kind) {
            self.channels[i].inc();
        }
    }

    fn render(&self, out: &mut String) {
        let mut metric = |name: &str, kind: &str, help: &str, lines: &[(String, i64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in lines {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        let one = |v: i64| [(String::new(), v)];
        metric(
            "vivarium_ssh_connections_total",
            "counter",
            "SSH connections accepted.",
            &one(self.connections.get() as i64),
        );
        metric(
            "vivarium_ssh_connections_open",
            "gauge",
            "SSH connections open.",
            &one(self.connections_open.get()),
        );
        metric(
            "vivarium_ssh_auth_failures_total",
            "counter",
            "SSH sign-ins refused.",
            &one(self.auth_failures.get() as i64),
        );
        let by_kind: Vec<(String, i64)> = SSH_CHANNEL_KINDS
            .iter()
            .zip(&self.channels)
            .map(|(kind, c)| (format!("{{kind=\"{kind}\"}}"), c.get() as i64))
            .collect();
        metric(
            "vivarium_ssh_channels_total",
            "counter",
            "SSH channels opened, by kind (refused: open or request refused).",
            &by_kind,
        );
        metric(
            "vivarium_ssh_channels_open",
            "gauge",
            "SSH channels open.",
            &one(self.channels_open.get()),
        );
    }
}

/// The server's metrics.
#[derive(Debug)]
pub struct Metrics {
    /// Sandboxes created.
    pub sandboxes_created: Counter,
    /// Sandboxes killed on request or timeout.
    pub sandboxes_killed: Counter,
    /// Sandboxes killed because their timeout passed.
    pub sandboxes_timed_out: Counter,
    /// Sandboxes whose creation failed or whose VM died.
    pub sandbox_failures: Counter,
    /// Time from create request to a ready agent.
    pub boot_seconds: Histogram,
    /// HTTP requests served.
    pub http_requests: Counter,
    /// Running sandboxes taken over from a previous server.
    pub sandboxes_taken_over: Counter,
    /// VMs no sandbox owned, killed at start.
    pub orphan_vms_killed: Counter,
    /// Paused sandboxes resumed by traffic for them (auto-resume).
    pub sandboxes_auto_resumed: Counter,
    /// Requests sent on to the node holding their sandbox, VM or snapshot, or placed there.
    pub requests_forwarded: Counter,
    /// Nodes this server marked down (they stopped heartbeating).
    pub nodes_marked_down: Counter,
    /// Sandboxes this server reported lost with their node.
    pub sandboxes_lost_with_node: Counter,
    /// Paused sandboxes this node adopted from another one (a resume or a drain moved them).
    pub sandboxes_moved: Counter,
    /// The SSH gateway.
    pub ssh: SshMetrics,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            sandboxes_created: Counter::default(),
            sandboxes_killed: Counter::default(),
            sandboxes_timed_out: Counter::default(),
            sandbox_failures: Counter::default(),
            boot_seconds: Histogram::new(&[0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0]),
            http_requests: Counter::default(),
            sandboxes_taken_over: Counter::default(),
            orphan_vms_killed: Counter::default(),
            sandboxes_auto_resumed: Counter::default(),
            requests_forwarded: Counter::default(),
            nodes_marked_down: Counter::default(),
            sandboxes_lost_with_node: Counter::default(),
            sandboxes_moved: Counter::default(),
            ssh: SshMetrics::default(),
        }
    }
}

impl Metrics {
    /// Renders every metric; `live` is the number of running sandboxes.
    pub fn render(&self, live: usize) -> String {
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
        };
        counter(
            "vivarium_sandboxes_created_total",
            "Sandboxes created.",
            self.sandboxes_created.get(),
        );
        counter(
            "vivarium_sandboxes_killed_total",
            "Sandboxes killed.",
            self.sandboxes_killed.get(),
        );
        counter(
            "vivarium_sandboxes_timed_out_total",
            "Sandboxes killed by their timeout.",
            self.sandboxes_timed_out.get(),
        );
        counter(
            "vivarium_sandbox_failures_total",
            "Sandbox creations that failed and VMs that died.",
            self.sandbox_failures.get(),
        );
        counter(
            "vivarium_sandboxes_taken_over_total",
            "Running sandboxes taken over from a previous server.",
            self.sandboxes_taken_over.get(),
        );
        counter(
            "vivarium_orphan_vms_killed_total",
            "VMs no sandbox owned (warm VMs, interrupted starts of a previous server), killed at start.",
            self.orphan_vms_killed.get(),
        );
        counter(
            "vivarium_sandboxes_auto_resumed_total",
            "Paused sandboxes resumed by traffic for them (auto-resume).",
            self.sandboxes_auto_resumed.get(),
        );
        counter(
            "vivarium_requests_forwarded_total",
            "Requests sent on to the node holding their sandbox, VM or snapshot, or placed there.",
            self.requests_forwarded.get(),
        );
        counter(
            "vivarium_nodes_marked_down_total",
            "Nodes this server marked down after they stopped heartbeating.",
            self.nodes_marked_down.get(),
        );
        counter(
            "vivarium_sandboxes_lost_with_node_total",
            "Running sandboxes this server reported lost with their node.",
            self.sandboxes_lost_with_node.get(),
        );
        counter(
            "vivarium_sandboxes_moved_total",
            "Paused sandboxes this node adopted from another node (a resume or a drain moved them).",
            self.sandboxes_moved.get(),
        );
        counter(
            "vivarium_http_requests_total",
            "HTTP requests served.",
            self.http_requests.get(),
        );
        let _ = writeln!(
            out,
            "# HELP vivarium_file_uploads_total File uploads to sandboxes, by the path they took (network: the data path over the sandbox's network; channel: the virtio-serial channel).\n# TYPE vivarium_file_uploads_total counter\nvivarium_file_uploads_total{{path=\"network\"}} {}\nvivarium_file_uploads_total{{path=\"channel\"}} {}",
            FILE_UPLOADS_NETWORK.get(),
            FILE_UPLOADS_CHANNEL.get()
        );
        let _ = writeln!(out, "# HELP vivarium_sandboxes_running Sandboxes whose VM runs.\n# TYPE vivarium_sandboxes_running gauge\nvivarium_sandboxes_running {live}");
        let state = self.boot_seconds.state.lock().expect("histogram lock");
        let name = "vivarium_sandbox_start_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time from create request to a ready sandbox.\n# TYPE {name} histogram"
        );
        for (bound, count) in self.boot_seconds.bounds.iter().zip(&state.0) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}",
            state.2, state.1, state.2
        );
        drop(state);
        self.ssh.render(&mut out);
        out
    }
}
