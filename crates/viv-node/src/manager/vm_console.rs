//! A VM's serial console, shared: one connection to QEMU's serial socket, fanned out to any
//! number of clients, every byte kept in a size-capped log, the last bytes replayed to a client
//! that attaches late.
//!
//! QEMU's serial chardev is a Unix socket server in telnet mode (`telnet=on`, see
//! `viv_vmm::machine`), so that a client can send a serial *break* (`IAC BREAK`). The hub is
//! its only client and speaks just enough telnet: it drops the option negotiation QEMU sends
//! first on each connection (QEMU needs no answer), doubles every `0xFF` byte of client input
//! (`IAC IAC`, which QEMU turns back into one `0xFF`), and sends `IAC BREAK` for a break. QEMU
//! does not escape its output, so output bytes after the negotiation reach clients unchanged.
//!
//! Invariants:
//! - one task per hub owns the connection to QEMU; it reconnects (with back-off) when the
//!   connection drops, until [`ConsoleHub::close`]. Output reaches, in this order, the log, the
//!   replay ring and the clients, each chunk under the state lock, so a client that attaches
//!   sees the replay and then every later byte exactly once, with nothing missing in between;
//! - nothing a client does blocks QEMU or another client: output is broadcast through a
//!   bounded channel, and a client that falls more than [`CLIENT_BACKLOG`] chunks behind loses
//!   the oldest ones and reads a notice saying how many were dropped. Client input goes
//!   through its own bounded queue and a writer task per connection, so a guest that does not
//!   read its UART never stalls the reading of its output;
//! - the log is two files, `console.log` and `console.log.1`, each at most half of its cap:
//!   when `console.log` would pass half the cap it becomes `console.log.1` (replacing the
//!   older one). So the log never exceeds its cap, always holds at least the newest half cap
//!   of output, and a rotation costs a rename, never a copy. It is appended to across VM
//!   starts and lives outside the VM's run directory (QEMU cannot touch it);
//! - output QEMU printed while no hub was connected (the first milliseconds after launch,
//!   between two connections) is lost: QEMU's socket chardev drops it.

use std::collections::VecDeque;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use super::Manager;
use crate::error::ApiError;

/// Bytes of the console log kept per VM: `console.log` and `console.log.1` hold at most half
/// each.
pub const CONSOLE_LOG_CAP: u64 = 4 << 20;
/// The last bytes of output replayed to a client when it attaches.
pub const REPLAY_BYTES: usize = 64 << 10;
/// Chunks of output a client may fall behind before it loses some.
pub const CLIENT_BACKLOG: usize = 1024;
/// Largest chunk read from QEMU at once.
const READ_CHUNK: usize = 4096;
/// Client inputs queued for QEMU before senders wait.
const INPUT_QUEUE: usize = 256;
/// Longest wait between two attempts to reach QEMU's socket.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Telnet: "interpret as command".
const IAC: u8 = 0xFF;
/// Telnet: break.
const BREAK: u8 = 0xF3;
/// Telnet: WILL, WONT, DO and DONT (option negotiation, three bytes with the option).
const NEGOTIATION: std::ops::RangeInclusive<u8> = 0xFB..=0xFE;

/// Sizes of a hub (the constants above, smaller in tests).
#[derive(Debug, Clone, Copy)]
pub struct HubLimits {
    /// See [`CONSOLE_LOG_CAP`].
    pub log_cap: u64,
    /// See [`REPLAY_BYTES`].
    pub replay: usize,
    /// See [`CLIENT_BACKLOG`].
    pub backlog: usize,
}

impl Default for HubLimits {
    fn default() -> Self {
        Self {
            log_cap: CONSOLE_LOG_CAP,
            replay: REPLAY_BYTES,
            backlog: CLIENT_BACKLOG,
        }
    }
}

/// The shared serial console of one running VM.
#[derive(Debug)]
pub struct ConsoleHub {
    shared: Arc<Shared>,
    input: mpsc::Sender<Input>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    log: Mutex<ConsoleLog>,
    closed: CancellationToken,
}

#[derive(Debug)]
struct State {
    ring: VecDeque<u8>,
    replay: usize,
    /// The clients' channel; `None` once closed.
    out: Option<broadcast::Sender<Bytes>>,
}

/// What a client sends to the guest.
#[derive(Debug)]
enum Input {
    Bytes(Bytes),
    Break,
}

/// The console is closed: the VM stopped.
#[derive(Debug, thiserror::Error)]
#[error("the console is closed: the VM stopped")]
pub struct ConsoleClosed;

impl ConsoleHub {
    /// Starts reading `socket` (QEMU's serial chardev, a Unix socket server in telnet mode)
    /// into `log` (created with its directory if missing, appended to otherwise). Must be
    /// called within a Tokio runtime.
    pub fn start(socket: PathBuf, log: PathBuf) -> Arc<Self> {
        Self::start_with(socket, log, HubLimits::default())
    }

    /// [`ConsoleHub::start`] with other sizes.
    pub fn start_with(socket: PathBuf, log: PathBuf, limits: HubLimits) -> Arc<Self> {
        let (out, _) = broadcast::channel(limits.backlog.max(1));
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                ring: VecDeque::new(),
                replay: limits.replay,
                out: Some(out),
            }),
            log: Mutex::new(ConsoleLog::open(log, limits.log_cap)),
            closed: CancellationToken::new(),
        });
        let (input, input_rx) = mpsc::channel(INPUT_QUEUE);
        tokio::spawn(run(shared.clone(), socket, input_rx));
        Arc::new(Self { shared, input })
    }

    /// A new client: the replay (the last output, empty without `replay`) and every byte
    /// after it.
    pub fn attach(&self, replay: bool) -> ConsoleClient {
        let state = self.shared.state.lock().expect("console state lock");
        let replay = if replay {
            let (a, b) = state.ring.as_slices();
            Bytes::from([a, b].concat())
        } else {
            Bytes::new()
        };
        ConsoleClient {
            replay: Some(replay).filter(|r| !r.is_empty()),
            rx: state.out.as_ref().map(broadcast::Sender::subscribe),
        }
    }

    /// Sends `bytes` to the guest's serial port (waits while the input queue is full).
    pub async fn send(&self, bytes: &[u8]) -> Result<(), ConsoleClosed> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.queue(Input::Bytes(Bytes::copy_from_slice(bytes))).await
    }

    /// Sends a serial break to the guest.
    pub async fn send_break(&self) -> Result<(), ConsoleClosed> {
        self.queue(Input::Break).await
    }

    async fn queue(&self, input: Input) -> Result<(), ConsoleClosed> {
        if self.is_closed() {
            return Err(ConsoleClosed);
        }
        tokio::select! {
            sent = self.input.send(input) => sent.map_err(|_| ConsoleClosed),
            () = self.shared.closed.cancelled() => Err(ConsoleClosed),
        }
    }

    /// The last `tail` bytes of the log (all of it without `tail`).
    pub fn read_log(&self, tail: Option<u64>) -> std::io::Result<Vec<u8>> {
        let log = self.shared.log.lock().expect("console log lock");
        read_log(&log.path, tail)
    }

    /// Stops reading (the VM has stopped); clients see their stream end once they have read
    /// what was sent before.
    pub fn close(&self) {
        self.shared.closed.cancel();
        self.shared.state.lock().expect("console state lock").out = None;
    }

    /// Whether [`ConsoleHub::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.is_cancelled()
    }
}

impl Drop for ConsoleHub {
    fn drop(&mut self) {
        self.close();
    }
}

/// One attached client of a [`ConsoleHub`].
#[derive(Debug)]
pub struct ConsoleClient {
    replay: Option<Bytes>,
    rx: Option<broadcast::Receiver<Bytes>>,
}

impl ConsoleClient {
    /// The next output for this client: the replay first, then live output; a notice in the
    /// stream when this client fell behind and lost output; `None` once the console closed.
    pub async fn recv(&mut self) -> Option<Bytes> {
        if let Some(replay) = self.replay.take() {
            return Some(replay);
        }
        let rx = self.rx.as_mut()?;
        match rx.recv().await {
            Ok(bytes) => Some(bytes),
            Err(broadcast::error::RecvError::Lagged(n)) => Some(Bytes::from(format!(
                "\r\n[viv: this console client fell behind; {n} chunks of output were dropped]\r\n"
            ))),
            Err(broadcast::error::RecvError::Closed) => {
                self.rx = None;
                None
            }
        }
    }
}

impl Manager {
    /// Where the console log of VM `vm_id` (an id, not a name) is kept: the runtime gives it
    /// to [`ConsoleHub::start`]. Outside the VM's run directory, kept across starts.
    pub fn vm_console_log_path(&self, vm_id: &str) -> PathBuf {
        self.vm_console_dir(vm_id).join("console.log")
    }

    /// A server-owned directory of VM `vm_id`'s console (its log, temporary screenshots).
    pub fn vm_console_dir(&self, vm_id: &str) -> PathBuf {
        self.config.data_dir.join("consoles").join(vm_id)
    }

    /// The last `tail` bytes (all without) of a VM's console log, running or not.
    pub fn vm_console_log(&self, id_or_name: &str, tail: Option<u64>) -> Result<Vec<u8>, ApiError> {
        let info = self.vm_info(id_or_name)?;
        let read = match self.live_vm(&info.id) {
            Ok(live) => live.console.read_log(tail),
            Err(_) => read_log(&self.vm_console_log_path(&info.id), tail),
        };
        read.map_err(|e| ApiError::Internal(format!("reading the console log of VM '{}': {e}", info.name)))
    }

    /// Removes a deleted VM's console log.
    pub fn remove_vm_console(&self, vm_id: &str) {
        let dir = self.vm_console_dir(vm_id);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(vm = %vm_id, error = %e, "removing the console log");
            }
        }
    }
}

/// The hub's task: connects, reads, reconnects, until closed.
async fn run(shared: Arc<Shared>, socket: PathBuf, mut input: mpsc::Receiver<Input>) {
    let mut backoff = Duration::from_millis(20);
    let mut buf = vec![0u8; READ_CHUNK];
    while !shared.closed.is_cancelled() {
        let stream = tokio::select! {
            connected = UnixStream::connect(&socket) => connected,
            () = shared.closed.cancelled() => break,
        };
        let stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                tracing::trace!(socket = %socket.display(), error = %e, "serial console not reachable yet");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = shared.closed.cancelled() => break,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        backoff = Duration::from_millis(20);
        tracing::debug!(socket = %socket.display(), "serial console connected");
        let (mut reader, writer) = stream.into_split();
        let connection = shared.closed.child_token();
        let writing = tokio::spawn(write_input(writer, input, connection.clone()));
        let mut prefix = TelnetPrefix::default();
        loop {
            let read = tokio::select! {
                read = reader.read(&mut buf) => read,
                () = shared.closed.cancelled() => break,
            };
            match read {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let data = prefix.strip(&buf[..n]);
                    if !data.is_empty() {
                        shared.publish(&data);
                    }
                }
            }
        }
        connection.cancel();
        input = match writing.await {
            Ok(input) => input,
            Err(_) => return,
        };
    }
}

/// Writes client input to one connection until it ends; hands the queue back.
async fn write_input(
    mut writer: tokio::net::unix::OwnedWriteHalf,
    mut input: mpsc::Receiver<Input>,
    stop: CancellationToken,
) -> mpsc::Receiver<Input> {
    loop {
        let next = tokio::select! {
            next = input.recv() => next,
            () = stop.cancelled() => break,
        };
        let Some(next) = next else { break };
        let bytes = match next {
            Input::Bytes(bytes) => escape_iac(&bytes),
            Input::Break => vec![IAC, BREAK],
        };
        let written = tokio::select! {
            written = writer.write_all(&bytes) => written,
            () = stop.cancelled() => break,
        };
        if written.is_err() {
            break;
        }
    }
    input
}

impl Shared {
    /// One chunk of output: to the log, the replay ring and the clients.
    fn publish(&self, data: &[u8]) {
        self.log.lock().expect("console log lock").append(data);
        let mut state = self.state.lock().expect("console state lock");
        state.ring.extend(data);
        let excess = state.ring.len().saturating_sub(state.replay);
        state.ring.drain(..excess);
        if let Some(out) = &state.out {
            // No receiver is not an error: nobody is attached.
            let _ = out.send(Bytes::copy_from_slice(data));
        }
    }
}

/// Doubles every `0xFF` (telnet's IAC), so QEMU reads it as data.
fn escape_iac(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 2);
    for &b in data {
        out.push(b);
        if b == IAC {
            out.push(IAC);
        }
    }
    out
}

/// Drops the telnet option negotiation (`IAC WILL|WONT|DO|DONT option` triplets) QEMU sends
/// at the start of each connection; everything from the first other byte on is data.
#[derive(Debug, Default)]
struct TelnetPrefix {
    pending: Vec<u8>,
    done: bool,
}

impl TelnetPrefix {
    fn strip(&mut self, data: &[u8]) -> Vec<u8> {
        if self.done {
            return data.to_vec();
        }
        self.pending.extend_from_slice(data);
        loop {
            match self.pending.as_slice() {
                [] | [IAC] => return Vec::new(),
                [IAC, command, ..] if NEGOTIATION.contains(command) => {
                    if self.pending.len() < 3 {
                        return Vec::new();
                    }
                    self.pending.drain(..3);
                }
                _ => {
                    self.done = true;
                    return std::mem::take(&mut self.pending);
                }
            }
        }
    }
}

/// The size-capped log of one VM's console (see the module's invariants).
#[derive(Debug)]
struct ConsoleLog {
    path: PathBuf,
    half: u64,
    file: Option<std::fs::File>,
    size: u64,
}

impl ConsoleLog {
    fn open(path: PathBuf, cap: u64) -> Self {
        let mut log = Self {
            half: (cap / 2).max(1),
            path,
            file: None,
            size: 0,
        };
        if let Err(e) = log.reopen() {
            tracing::warn!(log = %log.path.display(), error = %e, "opening the console log");
        }
        log
    }

    fn rotated(&self) -> PathBuf {
        rotated(&self.path)
    }

    /// Opens the log for appending; a file bigger than half the cap (a smaller cap than
    /// before) is cut to its newest half cap.
    fn reopen(&mut self) -> std::io::Result<()> {
        if let Some(parent) = self.path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        for path in [self.rotated(), self.path.clone()] {
            if std::fs::metadata(&path).is_ok_and(|m| m.len() > self.half) {
                let keep = read_tail(&path, self.half)?;
                std::fs::write(&path, keep)?;
            }
        }
        use std::os::unix::fs::OpenOptionsExt as _;
        // What a guest printed may be private (a password typed at a prompt).
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.path)?;
        self.size = file.metadata()?.len();
        self.file = Some(file);
        Ok(())
    }

    fn append(&mut self, data: &[u8]) {
        if let Err(e) = self.try_append(data) {
            tracing::warn!(log = %self.path.display(), error = %e, "writing the console log");
            self.file = None;
        }
    }

    fn try_append(&mut self, data: &[u8]) -> std::io::Result<()> {
        let data = &data[data.len().saturating_sub(self.half as usize)..];
        if self.file.is_none() {
            self.reopen()?;
        }
        if self.size + data.len() as u64 > self.half {
            self.file = None;
            std::fs::rename(&self.path, self.rotated())?;
            self.reopen()?;
        }
        let file = self.file.as_mut().expect("console log open");
        file.write_all(data)?;
        self.size += data.len() as u64;
        Ok(())
    }
}

fn rotated(log: &Path) -> PathBuf {
    let mut name = log.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// The last `tail` bytes of one file (empty when it does not exist).
fn read_tail(path: &Path, tail: u64) -> std::io::Result<Vec<u8>> {
    use std::io::{Read as _, Seek as _};
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    file.seek(std::io::SeekFrom::Start(len.saturating_sub(tail)))?;
    let mut out = Vec::new();
    file.take(tail).read_to_end(&mut out)?;
    Ok(out)
}

/// The last `tail` bytes (all without) of the console log at `log`: `log.1` then `log`.
pub fn read_log(log: &Path, tail: Option<u64>) -> std::io::Result<Vec<u8>> {
    let tail = tail.unwrap_or(u64::MAX);
    let mut newest = read_tail(log, tail)?;
    let left = tail - newest.len() as u64;
    if left == 0 {
        return Ok(newest);
    }
    let mut out = read_tail(&rotated(log), left)?;
    out.append(&mut newest);
    Ok(out)
}

#[cfg(test)]
#[path = "vm_console_tests.rs"]
mod tests;
