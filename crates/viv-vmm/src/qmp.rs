//! A small client for QEMU's machine protocol (QMP): JSON lines over a Unix socket.
//!
//! Commands carry an `id`; a reader task matches replies to callers and forwards asynchronous
//! events to subscribers.

use std::collections::HashMap;
use std::os::fd::{AsRawFd as _, BorrowedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot};

/// A QMP failure.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Socket I/O failed.
    #[error("QMP socket: {0}")]
    Io(#[from] std::io::Error),
    /// QEMU answered with an error.
    #[error("QEMU refused {command}: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class.
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// The connection closed (QEMU exited).
    #[error("QMP connection closed")]
    Closed,
    /// QEMU sent something that is not QMP.
    #[error("unexpected QMP message: {0}")]
    Protocol(String),
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value, (String, String)>>>>>;

/// A connected, capability-negotiated QMP session.
#[derive(Debug)]
pub struct Qmp {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    next_id: AtomicU64,
    events: broadcast::Sender<Value>,
    /// Turns true once QEMU closed the connection and every event it sent was published.
    closed: tokio::sync::watch::Receiver<bool>,
}

impl Qmp {
    /// Connects, reads the greeting and leaves negotiation mode.
    pub async fn connect(path: &Path) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path).await?;
        let (read, write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let greeting = lines.next_line().await?.ok_or(QmpError::Closed)?;
        if !greeting.contains("\"QMP\"") {
            return Err(QmpError::Protocol(greeting));
        }
        let pending: Pending = Arc::default();
        let (events, _) = broadcast::channel(64);
        let (closed_tx, closed) = tokio::sync::watch::channel(false);
        let qmp = Self {
            writer: tokio::sync::Mutex::new(write),
            pending: pending.clone(),
            next_id: AtomicU64::new(1),
            events: events.clone(),
            closed,
        };
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(msg) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if msg.get("event").is_some() {
                    let _ = events.send(msg);
                    continue;
                }
                let Some(id) = msg.get("id").and_then(Value::as_u64) else {
                    continue;
                };
                let Some(tx) = pending.lock().expect("qmp lock").remove(&id) else {
                    continue;
                };
                let reply = match msg.get("error") {
                    Some(err) => Err((
                        err["class"].as_str().unwrap_or("GenericError").to_owned(),
                        err["desc"].as_str().unwrap_or_default().to_owned(),
                    )),
                    None => Ok(msg.get("return").cloned().unwrap_or(Value::Null)),
                };
                let _ = tx.send(reply);
            }
            // Connection gone: fail everyone still waiting.
            pending.lock().expect("qmp lock").clear();
            let _ = closed_tx.send(true);
        });
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Runs a command and returns its `return` value.
    pub async fn execute(&self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        self.execute_passing(command, arguments, None).await
    }

    /// Hands QEMU a copy of descriptor `fd` as fd set `id` (`add-fd`), which file names
    /// `/dev/fdset/ID` then refer to (a `file:` migration URI, say). A jailed QEMU can open no
    /// file of ours, so saved states are read and written through descriptors passed this way.
    pub async fn pass_fdset(&self, id: u64, fd: BorrowedFd<'_>) -> Result<(), QmpError> {
        self.execute_passing("add-fd", Some(json!({ "fdset-id": id })), Some(fd))
            .await
            .map(|_| ())
    }

    /// Hands QEMU a copy of descriptor `fd` under `name` (`getfd`), which a later command
    /// consumes (a tap netdev's `fd`), or `closefd` drops.
    pub async fn pass_named_fd(&self, name: &str, fd: BorrowedFd<'_>) -> Result<(), QmpError> {
        self.execute_passing("getfd", Some(json!({ "fdname": name })), Some(fd))
            .await
            .map(|_| ())
    }

    async fn execute_passing(
        &self,
        command: &str,
        arguments: Option<Value>,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("qmp lock").insert(id, tx);
        let mut line = msg.to_string();
        line.push('\n');
        let sent = {
            let mut writer = self.writer.lock().await;
            match fd {
                None => writer.write_all(line.as_bytes()).await,
                Some(fd) => send_with_fd(&mut writer, line.as_bytes(), fd).await,
            }
        };
        if let Err(err) = sent {
            self.pending.lock().expect("qmp lock").remove(&id);
            return Err(err.into());
        }
        match rx.await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err((class, desc))) => Err(QmpError::Command {
                command: command.to_owned(),
                class,
                desc,
            }),
            Err(_) => Err(QmpError::Closed),
        }
    }

    /// Subscribes to asynchronous events (`SHUTDOWN`, `RESET`, `STOP`, ...).
    pub fn events(&self) -> broadcast::Receiver<Value> {
        self.events.subscribe()
    }

    /// Watches the connection: true once QEMU closed it and every event it sent before was
    /// published to the subscribers.
    pub fn closed(&self) -> tokio::sync::watch::Receiver<bool> {
        self.closed.clone()
    }
}

/// Writes `bytes` with `fd` attached (SCM_RIGHTS) to the first byte that goes out.
async fn send_with_fd(writer: &mut OwnedWriteHalf, bytes: &[u8], fd: BorrowedFd<'_>) -> std::io::Result<()> {
    let stream: &UnixStream = writer.as_ref();
    let sent = loop {
        stream.writable().await?;
        match stream.try_io(tokio::io::Interest::WRITABLE, || {
            sendmsg_with_fd(stream.as_raw_fd(), bytes, fd)
        }) {
            Ok(n) => break n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    };
    writer.write_all(&bytes[sent..]).await
}

/// One `sendmsg` of (a prefix of) `bytes` carrying `fd`.
fn sendmsg_with_fd(socket: i32, bytes: &[u8], fd: BorrowedFd<'_>) -> std::io::Result<usize> {
    let raw = fd.as_raw_fd();
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // Room for one descriptor, aligned as cmsghdr needs.
    let mut control = [0u64; 4];
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<i32>() as u32) } as usize;
    debug_assert!(space <= std::mem::size_of_val(&control));
    // SAFETY: an all-zero msghdr is valid; its pointers are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: `msg` points at `control`, which has room for one header and one descriptor
    // (checked above), so the first header and its data are inside it.
    unsafe {
        let header = libc::CMSG_FIRSTHDR(&msg);
        (*header).cmsg_level = libc::SOL_SOCKET;
        (*header).cmsg_type = libc::SCM_RIGHTS;
        (*header).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<i32>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(header).cast::<i32>(), raw);
    }
    // SAFETY: `msg`, `iov`, `bytes` and `control` all outlive the call.
    let n = unsafe { libc::sendmsg(socket, &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
