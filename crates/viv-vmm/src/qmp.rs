//! A small client for QEMU's machine protocol (QMP): JSON lines over a Unix socket.
//!
//! Commands carry an `id`; a reader task matches replies to callers and forwards asynchronous
//! events to subscribers.

use std::collections::HashMap;
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
        let qmp = Self {
            writer: tokio::sync::Mutex::new(write),
            pending: pending.clone(),
            next_id: AtomicU64::new(1),
            events: events.clone(),
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
        });
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Runs a command and returns its `return` value.
    pub async fn execute(&self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("qmp lock").insert(id, tx);
        let mut line = msg.to_string();
        line.push('\n');
        self.writer.lock().await.write_all(line.as_bytes()).await?;
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
}
