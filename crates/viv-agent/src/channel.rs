//! The transport between host and agent: HTTP/2 over a virtio-serial port.
//!
//! A virtio-serial port is one byte stream that the host may connect to and disconnect from at
//! any time. While no host is connected, `read` returns 0 at once; while one is, it blocks until
//! data arrives. The port can be opened only once, so the agent keeps one fd for its lifetime and
//! treats each stretch between "first byte after a hang-up" and "next hang-up" as one HTTP/2
//! connection, bridged to hyper through an in-memory duplex pipe.

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

/// What the port reader thread reports.
enum PortEvent {
    Data(Vec<u8>),
    HangUp,
}

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
    let open = {
        let device = device.clone();
        // Non-blocking: a write to a port whose host is gone would otherwise block until a host
        // returns, holding stale bytes that would then open the next connection.
        move || {
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&device)
        }
    };
    let port = open().with_context(|| format!("opening {}", device.display()))?;
    tracing::info!(device = %device.display(), "agent channel open");
    // Shared by the reader and writer threads; the reader swaps it out when it reopens the port.
    let port = std::sync::Arc::new(std::sync::RwLock::new(Some(port)));

    let (events_tx, mut events_rx) = mpsc::channel::<PortEvent>(64);
    let reader_port = port.clone();
    std::thread::Builder::new().name("port-reader".into()).spawn(move || {
        let port = reader_port;
        let mut buf = vec![0u8; 256 * 1024];
        let mut connected = false;
        loop {
            let read = {
                let guard = port.read().expect("port lock");
                let file = guard.as_ref().expect("port open");
                read_gathering(file, &mut buf)
            };
            match read {
                usize::MAX => continue,
                0 => {
                    if connected {
                        connected = false;
                        if events_tx.blocking_send(PortEvent::HangUp).is_err() {
                            return;
                        }
                    }
                    if let Some(limit) = take_reopen_request() {
                        // Release the port so that QEMU and the guest forget its state (the VM
                        // is about to be snapshotted), and open it afresh after the restore.
                        *port.write().expect("port lock") = None;
                        wait_for_restore(limit);
                        loop {
                            match open() {
                                Ok(file) => break *port.write().expect("port lock") = Some(file),
                                Err(_) => std::thread::sleep(Duration::from_millis(5)),
                            }
                        }
                        tracing::debug!("agent channel reopened");
                        continue;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                n => {
                    connected = true;
                    if events_tx.blocking_send(PortEvent::Data(buf[..n].to_vec())).is_err() {
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
                let result = match port.read().expect("port lock").as_ref() {
                    Some(mut file) => file.write(&chunk[written..]),
                    None => Err(std::io::ErrorKind::WouldBlock.into()),
                };
                match result {
                    Ok(n) => written += n,
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        }
    })?;

    let mut session: Option<tokio::io::WriteHalf<tokio::io::DuplexStream>> = None;
    // Bytes received while no session runs, kept until an HTTP/2 preface shows up in them.
    let mut pending: Vec<u8> = Vec::new();
    while let Some(event) = events_rx.recv().await {
        match event {
            PortEvent::HangUp => {
                tracing::debug!("host hung up");
                GENERATION.fetch_add(1, Ordering::SeqCst);
                session = None;
                pending.clear();
            }
            PortEvent::Data(data) => {
                let data = if session.is_some() {
                    data
                } else {
                    // A new host connection starts with the client preface. Anything before it
                    // is the tail of an earlier connection (for example one cut by a snapshot or
                    // a restore) and is dropped, so a new session never starts mid-stream.
                    pending.extend_from_slice(&data);
                    match find_preface(&pending) {
                        Some(at) => {
                            let data = pending.split_off(at);
                            pending.clear();
                            tracing::debug!(skipped = at, "host connected");
                            session = Some(start_session(app.clone(), out_tx.clone()));
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
                let to_hyper = session.as_mut().expect("session running");
                if to_hyper.write_all(&data).await.is_err() {
                    // hyper closed the connection (protocol error); wait for the host's next one.
                    tracing::debug!("session closed by the agent");
                    session = None;
                }
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

/// Reads what the port has, gathering everything already queued: virtio-console hands over at
/// most a page per read, and each hop to the async side should carry a large chunk. Returns 0
/// when no host is connected (or on error).
fn read_gathering(mut file: &std::fs::File, buf: &mut [u8]) -> usize {
    // Wait for data or a hang-up (the fd is non-blocking).
    wait_readable(file, 100);
    let mut n = match file.read(buf) {
        Ok(n) => n,
        Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => return usize::MAX,
        Err(_) => return 0,
    };
    while n > 0 && buf.len() - n >= 4096 && readable_now(file) {
        match file.read(&mut buf[n..]) {
            Ok(0) | Err(_) => break,
            Ok(more) => n += more,
        }
    }
    n
}

/// Number of the current host connection; bumped at every hang-up.
static GENERATION: AtomicU64 = AtomicU64::new(0);

/// Waits up to `timeout_ms` for the port to be readable or hung up.
fn wait_readable(port: &std::fs::File, timeout_ms: i32) {
    use std::os::fd::AsRawFd as _;
    let mut pfd = libc::pollfd {
        fd: port.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd on the stack for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
}

/// Waits until the VM has been restored from a snapshot, or `limit` of guest time has passed.
/// A restore shows as the RTC (which follows the host's clock) jumping ahead of the guest's own
/// monotonic clock, which stood still while the VM was saved.
fn wait_for_restore(limit: Duration) {
    let rtc = || {
        std::fs::read_to_string("/sys/class/rtc/rtc0/since_epoch")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    let start = std::time::Instant::now();
    let rtc_start = rtc();
    while start.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(2));
        if let (Some(before), Some(now)) = (rtc_start, rtc()) {
            if now.saturating_sub(before) >= start.elapsed().as_secs() + 2 {
                return;
            }
        }
    }
}

/// A pending request to release the port at the next hang-up and reopen it after a pause.
static REOPEN_AFTER_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Asks the channel to release the port once the host hangs up, and to reopen it `pause` later.
pub fn request_reopen(pause: Duration) {
    REOPEN_AFTER_MS.store(pause.as_millis().max(1) as u64, std::sync::atomic::Ordering::SeqCst);
}

fn take_reopen_request() -> Option<Duration> {
    let ms = REOPEN_AFTER_MS.swap(0, std::sync::atomic::Ordering::SeqCst);
    (ms > 0).then(|| Duration::from_millis(ms))
}

/// Whether a read from `port` would return data without blocking.
fn readable_now(port: &std::fs::File) -> bool {
    use std::os::fd::AsRawFd as _;
    let mut pfd = libc::pollfd {
        fd: port.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd on the stack for the duration of the call; timeout 0.
    let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
    ready == 1 && pfd.revents & libc::POLLIN != 0
}

/// Starts one HTTP/2 connection over an in-memory pipe; returns the half that feeds it.
fn start_session(
    app: Router,
    out_tx: std::sync::mpsc::Sender<(u64, Vec<u8>)>,
) -> tokio::io::WriteHalf<tokio::io::DuplexStream> {
    let generation = GENERATION.load(Ordering::SeqCst);
    let (ours, theirs) = tokio::io::duplex(1 << 20);
    let (mut from_hyper, to_hyper) = tokio::io::split(ours);
    tokio::spawn(async move {
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
    to_hyper
}

fn http2_builder() -> hyper::server::conn::http2::Builder<TokioExecutor> {
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
        let (stream, _) = listener.accept().await?;
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let _ = http2_builder().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}
