//! The transport between host and agent: HTTP/2 over a virtio-serial port.
//!
//! A virtio-serial port is one byte stream that the host may connect to and disconnect from at
//! any time. While no host is connected, `read` returns 0 at once; while one is, it blocks until
//! data arrives. The port can be opened only once, so the agent keeps one fd for its lifetime and
//! serves each host connection as one HTTP/2 connection (a *session*), bridged to hyper through
//! an in-memory duplex pipe.
//!
//! Invariants:
//! - a session starts only at the reset handshake of [`viv_proto::channel`] followed by an
//!   HTTP/2 client preface, and ends only at the next reset: a new host always opens with one,
//!   and nothing else reliably tells hosts apart. In particular the port's hang-up state is not
//!   used: the guest learns of a host's arrival and departure through control messages that
//!   may be processed after the next host's first bytes were already read, so a "hang-up" seen
//!   by `read` returning 0 can belong to the previous host and must not end a live session;
//! - an ended session is closed: its pipe is dropped, so hyper sees the end of its connection
//!   and every request still open on it fails instead of waiting forever;
//! - every chunk written to the port carries the number of the session it belongs to, and
//!   chunks of an ended session are dropped (even half-written), so a new host never receives
//!   bytes of an older session after the answer to its reset; bytes before that answer the host
//!   discards itself;
//! - bytes before an HTTP/2 preface (the tail of a connection cut by a snapshot or a restore)
//!   are dropped, so a session never starts mid-stream.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use viv_proto::channel;

/// Finds the character device of the virtio-serial port with the given name.
fn find_port(name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir("/sys/class/virtio-ports").ok()?.flatten() {
        let port_name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if port_name.trim() == name {
            return Some(Path::new("/dev").join(entry.file_name()));
        }
    }
    None
}

/// Serves `app` on the named virtio-serial port until the agent stops.
pub async fn serve_port(name: &str, app: Router) -> Result<()> {
    let mut waited = Duration::ZERO;
    let device = loop {
        if let Some(dev) = find_port(name) {
            if dev.exists() {
                break dev;
            }
        }
        if waited > Duration::from_secs(30) {
            anyhow::bail!("virtio-serial port {name} did not appear");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        waited += Duration::from_millis(5);
    };
    // Non-blocking: a write to a port whose host is gone would otherwise block until a host
    // returns (after a snapshot restore, say) and then open that host's connection with stale
    // bytes.
    let port = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&device)
        .with_context(|| format!("opening {}", device.display()))?;
    tracing::info!(device = %device.display(), "agent channel open");
    let port = std::sync::Arc::new(port);

    let (events_tx, mut events_rx) = mpsc::channel::<Vec<u8>>(64);
    let reader_port = port.clone();
    std::thread::Builder::new().name("port-reader".into()).spawn(move || {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match read_gathering(&reader_port, &mut buf) {
                PortRead::Nothing => {}
                // No host right now; the next one announces itself with a reset.
                PortRead::HungUp => std::thread::sleep(Duration::from_millis(2)),
                PortRead::Data(n) => {
                    if events_tx.blocking_send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    })?;

    // Bytes hyper writes go to the port through one writer thread, in order. Each chunk carries
    // the number of the connection it belongs to; chunks of a connection that has ended are
    // dropped instead of being sent to the next host.
    let (out_tx, out_rx) = std::sync::mpsc::channel::<(u64, Vec<u8>)>();
    std::thread::Builder::new().name("port-writer".into()).spawn(move || {
        for (generation, chunk) in out_rx {
            let mut written = 0;
            while written < chunk.len() && GENERATION.load(Ordering::SeqCst) == generation {
                match (&*port).write(&chunk[written..]) {
                    Ok(n) => written += n,
                    // Full (or no host): wait for room, then look at the generation again.
                    Err(_) => wait_for(&port, libc::POLLOUT, 20),
                }
            }
        }
    })?;

    let mut session: Option<Session> = None;
    // Bytes received while no session runs, kept until an HTTP/2 preface shows up in them.
    let mut pending: Vec<u8> = Vec::new();
    // Reset markers may span any number of reads.
    let mut resets = channel::ResetScanner::default();
    while let Some(data) = events_rx.recv().await {
        let data = match resets.scan(&channel_key(), &data) {
            Some(channel::Reset { after, nonce }) => {
                // A new host: end the old session and drop whatever it still had to send.
                let generation = GENERATION.fetch_add(1, Ordering::SeqCst) + 1;
                if let Some(old) = session.take() {
                    old.close();
                }
                pending.clear();
                let _ = out_tx.send((generation, channel::ready_marker(&nonce)));
                tracing::debug!(generation, "host connection reset");
                data[after..].to_vec()
            }
            None => data,
        };
        let data = if session.is_some() {
            data
        } else {
            // A new host connection starts with the client preface. Anything before it is the
            // tail of an earlier connection (for example one cut by a snapshot or a restore)
            // and is dropped, so a new session never starts mid-stream.
            pending.extend_from_slice(&data);
            match find_preface(&pending) {
                Some(at) => {
                    let data = pending.split_off(at);
                    pending.clear();
                    tracing::debug!(skipped = at, "host connected");
                    session = Some(Session::start(app.clone(), out_tx.clone()));
                    data
                }
                None => {
                    // Keep only what could be the start of a preface.
                    let keep = pending.len().min(PREFACE.len() - 1);
                    pending.drain(..pending.len() - keep);
                    continue;
                }
            }
        };
        let live = session.as_mut().expect("session running");
        if live.input.write_all(&data).await.is_err() {
            // hyper closed the connection (a protocol error); wait for the host's next one.
            tracing::debug!("session closed by the agent");
            if let Some(old) = session.take() {
                old.close();
            }
        }
    }
    Ok(())
}

/// The HTTP/2 client connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn find_preface(data: &[u8]) -> Option<usize> {
    data.windows(PREFACE.len()).position(|w| w == PREFACE)
}

/// The outcome of one read from the port.
enum PortRead {
    /// This many bytes are at the start of the buffer.
    Data(usize),
    /// No host is connected (or the port failed).
    HungUp,
    /// Nothing arrived within the poll interval.
    Nothing,
}

/// Reads what the port has, gathering everything already queued: virtio-console hands over at
/// most a page per read, and each hop to the async side should carry a large chunk. The port is
/// non-blocking, so the gathering reads stop at `WouldBlock` without a `poll` before each one
/// (a system call per page saved: under TCG each costs microseconds).
fn read_gathering(mut file: &std::fs::File, buf: &mut [u8]) -> PortRead {
    wait_for(file, libc::POLLIN, 100);
    let mut n = match file.read(buf) {
        Ok(0) => return PortRead::HungUp,
        Ok(n) => n,
        Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => return PortRead::Nothing,
        Err(_) => return PortRead::HungUp,
    };
    while buf.len() - n >= 4096 {
        match file.read(&mut buf[n..]) {
            Ok(0) | Err(_) => break,
            Ok(more) => n += more,
        }
    }
    PortRead::Data(n)
}

/// The key host reset markers carry (see [`viv_proto::channel`]); empty until `/init` sets one.
static CHANNEL_KEY: std::sync::RwLock<String> = std::sync::RwLock::new(String::new());

/// Sets the key of the host's reset markers.
pub fn set_channel_key(key: String) {
    *CHANNEL_KEY.write().expect("key lock") = key;
}

fn channel_key() -> String {
    CHANNEL_KEY.read().expect("key lock").clone()
}

/// Number of the current host connection; bumped at every reset.
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// Waits up to `timeout_ms` for `events` (or a hang-up) on the port.
fn wait_for(port: &std::fs::File, events: libc::c_short, timeout_ms: i32) {
    use std::os::fd::AsRawFd as _;
    let mut pfd = libc::pollfd {
        fd: port.as_raw_fd(),
        events,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd on the stack for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
}

/// One host connection served by hyper over an in-memory pipe.
struct Session {
    /// Feeds hyper the host's bytes.
    input: tokio::io::WriteHalf<tokio::io::DuplexStream>,
    /// Carries hyper's bytes to the port writer; owns the other half of the pipe.
    output: tokio::task::JoinHandle<()>,
}

impl Session {
    /// Starts one HTTP/2 connection; its output goes to the port tagged with the current
    /// connection number.
    fn start(app: Router, out_tx: std::sync::mpsc::Sender<(u64, Vec<u8>)>) -> Self {
        let generation = GENERATION.load(Ordering::SeqCst);
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let (mut from_hyper, input) = tokio::io::split(ours);
        let output = tokio::spawn(async move {
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                match from_hyper.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if out_tx.send((generation, buf[..n].to_vec())).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        tokio::spawn(async move {
            let service = TowerToHyperService::new(app);
            if let Err(err) = http2_builder().serve_connection(TokioIo::new(theirs), service).await {
                tracing::debug!(error = ?err, "host connection ended");
            }
        });
        Self { input, output }
    }

    /// Ends the session: with both halves of the pipe dropped, hyper reads the end of its
    /// connection, fails the requests still open on it and stops.
    fn close(self) {
        self.output.abort();
        drop(self.input);
    }
}

pub(crate) fn http2_builder() -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .initial_stream_window_size(8 << 20)
        .initial_connection_window_size(16 << 20)
        .max_frame_size(1 << 20)
        .max_concurrent_streams(1024);
    builder
}

/// Serves `app` on a Unix socket, one HTTP/2 connection per client (for running on a host).
pub async fn serve_unix(path: &Path, app: Router) -> Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    loop {
        let (mut stream, _) = listener.accept().await?;
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            // The host opens with a reset marker and waits for the answer before HTTP/2.
            let mut seen = Vec::new();
            let mut buf = [0u8; 512];
            let found = loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
                if let Some(found) = channel::find_reset(&seen, &channel_key()) {
                    break found;
                }
            };
            if stream.write_all(&channel::ready_marker(&found.nonce)).await.is_err() {
                return;
            }
            let _ = http2_builder().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}
