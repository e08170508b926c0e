//! Vivarium's SSH gateway (`viv serve --ssh-listen ADDR`): `ssh SANDBOXID@host` signs in with a
//! public key registered to an API key (`viv keys ssh-add`) and reaches the sandbox through its
//! agent channel, never through guest networking.
//!
//! - [`host_key`]: the persistent host key in the data directory;
//! - [`public_key`]: parsing and checking keys people register;
//! - `handler`: one russh handler per connection: sign-in (public keys only), channel opens,
//!   the synchronous replies to channel requests;
//! - `session`: a session channel (a shell under a PTY, `exec`, the `sftp` subsystem) as a
//!   process in the sandbox ([`viv_server::process_session`]);
//! - `forward`: `direct-tcpip` (`ssh -L`) to a port inside the sandbox over the agent's tunnel;
//! - `reach`: where a sandbox's agent is: this server's VM, or another node's through its node
//!   API, so that an API server's gateway (`--role api`) reaches the sandboxes of every node.
//!
//! Invariants:
//! - a connection signs in only with a public key registered to an active API key, and only
//!   as (the user name is) a sandbox that API key created; everything else (unknown keys, a
//!   sandbox of another key, a sandbox that does not exist, passwords, keyboard-interactive) is
//!   the same refusal, so a sandbox's existence never leaks to other keys;
//! - every connection, channel and buffer is bounded: [`Limits`] caps connections, session and
//!   forwarding channels per connection, the time to sign in and the time a connection may sit
//!   without channels; output reaches the client only as its SSH window allows (a client that
//!   does not read stalls its own process, not the server's memory);
//! - a sandbox that stops, pauses or stops answering ends its channels with a message and exit
//!   status 255 (sessions) or a closed channel (forwards); nothing waits on it forever.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use russh::keys::{HashAlg, PrivateKey};
use russh::server::Config;
use russh::{Disconnect, MethodKind, MethodSet};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use viv_server::AppState;

mod forward;
mod handler;
pub mod host_key;
pub mod public_key;
mod reach;
mod session;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The host key could not be read or made.
    #[error("SSH host key: {0}")]
    HostKey(String),
}

/// Bounds on what clients may hold.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections open at once (more are closed as they arrive).
    pub max_connections: usize,
    /// Session channels (shells, commands, SFTP) per connection, as OpenSSH's `MaxSessions`.
    pub max_sessions: usize,
    /// `direct-tcpip` channels per connection.
    pub max_forwards: usize,
    /// Time from connecting to signing in, as OpenSSH's `LoginGraceTime`.
    pub login_grace: Duration,
    /// A signed-in connection with no channel open for this long is closed.
    pub idle_timeout: Duration,
    /// Keep-alive probes are sent after this much silence from the client; three unanswered
    /// ones close the connection (a vanished client).
    pub keepalive: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            max_sessions: 10,
            max_forwards: 64,
            login_grace: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(15 * 60),
            keepalive: Duration::from_secs(30),
        }
    }
}

/// What every connection shares.
pub(crate) struct Shared {
    pub state: AppState,
    pub limits: Limits,
    connections: AtomicUsize,
}

/// Serves SSH on `listener` until `shutdown` is cancelled, then disconnects every client.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    host_key: PrivateKey,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let config = Arc::new(Config {
        server_id: russh::SshId::Standard(format!("SSH-2.0-Vivarium_{}", env!("CARGO_PKG_VERSION")).into()),
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        // Refusals take this long whatever caused them, so timing tells nothing either.
        auth_rejection_time: Duration::from_millis(300),
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![host_key],
        max_auth_attempts: 6,
        inactivity_timeout: None,
        keepalive_interval: Some(limits.keepalive),
        keepalive_max: 3,
        nodelay: true,
        // Bounded per-channel queues: a channel whose process does not take input holds the
        // connection's reads back instead of growing a buffer.
        channel_buffer_size: 32,
        ..Config::default()
    });
    let shared = Arc::new(Shared {
        state,
        limits,
        connections: AtomicUsize::new(0),
    });
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of descriptors and the like: wait rather than spin.
                    tracing::warn!(error = %err, "SSH accept failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => return,
        };
        shared.state.metrics.ssh.connections.inc();
        if shared.connections.load(Ordering::Relaxed) >= shared.limits.max_connections {
            tracing::warn!(%peer, max = shared.limits.max_connections, "SSH connection refused: too many open");
            continue;
        }
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().ok();
        tokio::spawn(connection(
            stream,
            peer,
            local,
            config.clone(),
            shared.clone(),
            shutdown.clone(),
        ));
    }
}

/// Counts a connection while it lives.
struct ConnectionSlot(Arc<Shared>);

impl ConnectionSlot {
    fn new(shared: Arc<Shared>) -> Self {
        shared.connections.fetch_add(1, Ordering::Relaxed);
        shared.state.metrics.ssh.connections_open.inc();
        Self(shared)
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
        self.0.state.metrics.ssh.connections_open.dec();
    }
}

async fn connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    local: Option<SocketAddr>,
    config: Arc<Config>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let _slot = ConnectionSlot::new(shared.clone());
    let limits = shared.limits.clone();
    let handler = handler::Handler::new(shared, peer, local);
    let signed_in = handler.signed_in();
    let mut open_channels = handler.open_channels();
    // The version exchange happens inside run_stream: bounded by the grace time too.
    let started = tokio::time::timeout(limits.login_grace, russh::server::run_stream(config, stream, handler)).await;
    let session = match started {
        Ok(Ok(session)) => session,
        Ok(Err(err)) => {
            tracing::debug!(%peer, error = %err, "SSH connection ended before its session started");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "SSH client sent no version in time");
            return;
        }
    };
    let handle = session.handle();
    tokio::pin!(session);
    let grace = async {
        tokio::time::sleep(limits.login_grace).await;
        if *signed_in.borrow() {
            std::future::pending::<()>().await;
        }
    };
    tokio::pin!(grace);
    let idle = idle_for(&mut open_channels, limits.idle_timeout);
    tokio::pin!(idle);
    let reason = tokio::select! {
        ended = &mut session => {
            match ended {
                Ok(()) => tracing::debug!(%peer, "SSH connection closed"),
                Err(err) => tracing::debug!(%peer, error = %err, "SSH connection ended"),
            }
            return;
        }
        () = &mut grace => "sign-in took too long",
        () = shutdown.cancelled() => "the server is shutting down",
        () = &mut idle => "no channel was open for too long",
    };
    tracing::info!(%peer, reason, "closing SSH connection");
    let _ = handle
        .disconnect(Disconnect::ByApplication, reason.into(), String::new())
        .await;
    // The session ends once the disconnect is written; a client that stops reading does not
    // hold it.
    let _ = tokio::time::timeout(Duration::from_secs(5), &mut session).await;
}

/// Resolves once no channel has been open for `limit` (and never while one is).
async fn idle_for(open: &mut tokio::sync::watch::Receiver<usize>, limit: Duration) {
    loop {
        if *open.borrow_and_update() == 0 {
            tokio::select! {
                () = tokio::time::sleep(limit) => return,
                changed = open.changed() => if changed.is_err() { return std::future::pending().await },
            }
        } else if open.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}
