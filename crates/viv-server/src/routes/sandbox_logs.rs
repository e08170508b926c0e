//! A running sandbox's console log (its serial console, which QEMU writes to `console.log` in
//! the sandbox's run directory): `GET /sandboxes/{id}/logs` in E2B's shape
//! (`{"logs":[{"timestamp","line"}]}`, `start` in Unix milliseconds and `limit`), and
//! `GET /sandboxes/{id}/logs/stream`, the same lines as server-sent events (`event: log`, data
//! `{"timestamp","line"}`) followed as they come, ended by `event: end` (data `{"message"}`)
//! when the sandbox stops running.
//!
//! Lines are read into a per-sandbox index when asked for: a line's timestamp is the log file's
//! modification time at the read that completed it (capped at the read's own time), so it is
//! exact for followed logs and, for lines read late, the time of the last console write.
//!
//! Invariants (the file holds whatever the guest printed): reads are bounded — at most
//! [`MAX_READ`] bytes per refresh, the skipped bytes announced in a line of their own; a line
//! keeps at most [`MAX_LINE`] bytes (the rest is counted, not kept); an index keeps the last
//! [`MAX_LINES`] lines; invalid UTF-8 is shown lossily; the file is opened without following a
//! symlink. An index lives while its sandbox's VM does: a resumed sandbox (a new VM, a new
//! log) starts a new one, and indexes of sandboxes no longer running are dropped at the next
//! request.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::IntoResponse;
use axum::{Extension, Json};

use super::{ApiPath, ApiQuery};
use crate::error::ApiError;
use crate::manager::LiveSandbox;
use crate::AppState;

/// The most bytes one refresh reads; more new output than this is skipped (the newest kept).
pub const MAX_READ: u64 = 1 << 20;
/// The most bytes kept of one line.
pub const MAX_LINE: usize = 8 << 10;
/// The most lines an index keeps.
pub const MAX_LINES: usize = 5000;
/// The default and largest `limit`.
const DEFAULT_LIMIT: usize = 1000;
/// How often a followed log is checked for new lines.
const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// One complete line of the console.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Line {
    seq: u64,
    ms: u64,
    text: String,
}

/// The lines read so far from one VM's console log.
#[derive(Debug, Default)]
struct LogIndex {
    /// Bytes of the file consumed.
    offset: u64,
    /// The unterminated last line (at most [`MAX_LINE`] bytes) and how many bytes of it were cut.
    partial: Vec<u8>,
    cut: u64,
    /// After a skip: drop bytes up to the next newline (the middle of a line).
    resync: bool,
    lines: VecDeque<Line>,
    next_seq: u64,
}

impl LogIndex {
    /// Takes `data`, the file's bytes from `self.offset`, completed lines stamped `ms`.
    fn feed(&mut self, data: &[u8], ms: u64) {
        self.offset += data.len() as u64;
        let mut rest = data;
        while !rest.is_empty() {
            let (piece, newline) = match memchr_newline(rest) {
                Some(at) => (&rest[..at], true),
                None => (rest, false),
            };
            rest = &rest[piece.len() + usize::from(newline)..];
            if self.resync {
                self.resync = !newline;
                continue;
            }
            let room = MAX_LINE.saturating_sub(self.partial.len());
            self.partial.extend_from_slice(&piece[..piece.len().min(room)]);
            self.cut += piece.len().saturating_sub(room) as u64;
            if newline {
                let mut text = String::from_utf8_lossy(&self.partial).into_owned();
                if text.ends_with('\r') {
                    text.pop();
                }
                if self.cut > 0 {
                    text.push_str(&format!(" [… {} more bytes of this line not shown]", self.cut));
                }
                self.partial.clear();
                self.cut = 0;
                self.push(text, ms);
            }
        }
    }

    /// Skips `bytes` of the file (too much new output for one refresh).
    fn skip(&mut self, bytes: u64, ms: u64) {
        self.offset += bytes;
        self.partial.clear();
        self.cut = 0;
        self.resync = true;
        self.push(format!("[… {bytes} bytes of console output not shown]"), ms);
    }

    fn push(&mut self, text: String, ms: u64) {
        self.lines.push_back(Line {
            seq: self.next_seq,
            ms,
            text,
        });
        self.next_seq += 1;
        while self.lines.len() > MAX_LINES {
            self.lines.pop_front();
        }
    }

    /// Reads what the file gained since the last refresh (at most [`MAX_READ`] bytes of it).
    fn refresh(&mut self, path: &std::path::Path) -> std::io::Result<()> {
        use std::io::{Read as _, Seek as _};
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
        {
            Ok(file) => file,
            // Not written yet.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(std::io::Error::other("the console log is not a regular file"));
        }
        let now = now_ms();
        let ms = meta.modified().map(ms_of).unwrap_or(now).min(now);
        let len = meta.len();
        if len < self.offset {
            // The file was truncated: start over from its beginning.
            self.offset = 0;
            self.partial.clear();
            self.cut = 0;
        }
        if len - self.offset > MAX_READ {
            self.skip(len - self.offset - MAX_READ, ms);
        }
        file.seek(std::io::SeekFrom::Start(self.offset))?;
        let mut data = Vec::new();
        file.take(len - self.offset).read_to_end(&mut data)?;
        self.feed(&data, ms);
        Ok(())
    }

    /// Lines stamped at or after `start` (ms), at most `limit`.
    fn since(&self, start: u64, limit: usize) -> Vec<Line> {
        self.lines
            .iter()
            .filter(|l| l.ms >= start)
            .take(limit)
            .cloned()
            .collect()
    }

    /// Lines after sequence number `seq`.
    fn after(&self, seq: Option<u64>) -> Vec<Line> {
        self.lines
            .iter()
            .filter(|l| !matches!(seq, Some(s) if l.seq <= s))
            .cloned()
            .collect()
    }
}

fn memchr_newline(data: &[u8]) -> Option<usize> {
    data.iter().position(|&b| b == b'\n')
}

fn now_ms() -> u64 {
    ms_of(SystemTime::now())
}

fn ms_of(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The VM an index belongs to, and the index.
type Owned = (Weak<LiveSandbox>, Arc<Mutex<LogIndex>>);

/// The console log indexes of running sandboxes.
#[derive(Default)]
pub(super) struct ConsoleLogs {
    indexes: Mutex<HashMap<String, Owned>>,
}

impl ConsoleLogs {
    /// The index of `live`'s current VM, new if there is none or it was another VM's; indexes
    /// of VMs that are gone are dropped.
    fn index(&self, live: &Arc<LiveSandbox>) -> Arc<Mutex<LogIndex>> {
        let mut indexes = self.indexes.lock().expect("logs lock");
        indexes.retain(|_, (owner, _)| owner.strong_count() > 0);
        let entry = indexes
            .entry(live.id.clone())
            .or_insert_with(|| (Arc::downgrade(live), Arc::default()));
        if !entry.0.upgrade().is_some_and(|owner| Arc::ptr_eq(&owner, live)) {
            *entry = (Arc::downgrade(live), Arc::default());
        }
        entry.1.clone()
    }
}

/// Refreshes `index` from `live`'s console log off the runtime's threads.
async fn refresh(live: &Arc<LiveSandbox>, index: &Arc<Mutex<LogIndex>>) -> Result<(), ApiError> {
    let path = live.console_log();
    let index = index.clone();
    tokio::task::spawn_blocking(move || index.lock().expect("index lock").refresh(&path))
        .await
        .map_err(|e| ApiError::Internal(format!("reading the console log: {e}")))?
        .map_err(|e| ApiError::Internal(format!("reading the console log: {e}")))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LogsQuery {
    /// Only lines stamped at or after this time (Unix milliseconds).
    start: Option<i64>,
    /// At most this many lines (1 to 10000, default 1000).
    limit: Option<usize>,
}

#[derive(serde::Serialize)]
struct LogLine {
    timestamp: String,
    line: String,
}

impl From<Line> for LogLine {
    fn from(line: Line) -> Self {
        let time = UNIX_EPOCH + Duration::from_millis(line.ms);
        Self {
            timestamp: humantime::format_rfc3339_millis(time).to_string(),
            line: line.text,
        }
    }
}

pub(super) async fn logs(
    State(state): State<AppState>,
    Extension(logs): Extension<Arc<ConsoleLogs>>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<LogsQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let limit = match q.limit {
        None => DEFAULT_LIMIT,
        Some(n @ 1..=10_000) => n,
        Some(n) => {
            return Err(ApiError::BadRequest(format!(
                "limit must be between 1 and 10000, not {n}"
            )))
        }
    };
    let start = start_ms(q.start)?;
    let live = state.manager.live(&id)?;
    let index = logs.index(&live);
    refresh(&live, &index).await?;
    let lines: Vec<LogLine> = index
        .lock()
        .expect("index lock")
        .since(start, limit)
        .into_iter()
        .map(LogLine::from)
        .collect();
    Ok(Json(serde_json::json!({ "logs": lines })))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StreamQuery {
    /// Only lines stamped at or after this time (Unix milliseconds); all kept lines when absent.
    start: Option<i64>,
}

/// `start` as the document has it: Unix milliseconds, an int64 of 0 or more.
fn start_ms(start: Option<i64>) -> Result<u64, ApiError> {
    match start {
        None => Ok(0),
        Some(ms) => u64::try_from(ms)
            .map_err(|_| ApiError::BadRequest(format!("start must be Unix milliseconds (0 or more), got {ms}"))),
    }
}

pub(super) async fn stream(
    State(state): State<AppState>,
    Extension(logs): Extension<Arc<ConsoleLogs>>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<StreamQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let start = start_ms(q.start)?;
    let live = state.manager.live(&id)?;
    let index = logs.index(&live);
    refresh(&live, &index).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<SseEvent>(16);
    tokio::spawn(follow(state, live, index, start, tx));
    let events = tokio_stream::wrappers::ReceiverStream::new(rx);
    Ok(Sse::new(futures::StreamExt::map(events, Ok::<_, Infallible>)).keep_alive(KeepAlive::default()))
}

/// Sends the lines of `index` from `start` on, then new ones as they come, until the sandbox
/// stops running (an `end` event) or the client leaves. The channel is bounded: a client that
/// does not read holds this task, never memory.
async fn follow(
    state: AppState,
    live: Arc<LiveSandbox>,
    index: Arc<Mutex<LogIndex>>,
    start: u64,
    tx: tokio::sync::mpsc::Sender<SseEvent>,
) {
    let mut last: Option<u64> = None;
    let mut exit = live.vm.exit();
    loop {
        let lines = {
            let index = index.lock().expect("index lock");
            index.after(last)
        };
        for line in lines {
            last = Some(line.seq);
            if line.ms < start {
                continue;
            }
            let event = SseEvent::default()
                .event("log")
                .json_data(LogLine::from(line))
                .unwrap_or_else(|_| SseEvent::default().event("log").data("{}"));
            if tx.send(event).await.is_err() {
                return;
            }
        }
        let stopped = tokio::select! {
            () = tokio::time::sleep(FOLLOW_POLL) => false,
            _ = exit.wait_for(Option::is_some) => true,
            () = tx.closed() => return,
        };
        if stopped {
            // The last lines it wrote, then why it ended.
            let _ = refresh(&live, &index).await;
            let tail = index.lock().expect("index lock").after(last);
            for line in tail {
                let event = SseEvent::default().event("log").json_data(LogLine::from(line));
                if let Ok(event) = event {
                    if tx.send(event).await.is_err() {
                        return;
                    }
                }
            }
            state.manager.settle(&live).await;
            let message = match state.manager.live(&live.id) {
                Err(now) => format!("the sandbox is no longer running: {now}"),
                Ok(_) => "the sandbox's VM was replaced (paused and resumed); follow its log again".to_owned(),
            };
            let end = SseEvent::default()
                .event("end")
                .json_data(serde_json::json!({ "message": message }));
            if let Ok(end) = end {
                let _ = tx.send(end).await;
            }
            return;
        }
        if let Err(err) = refresh(&live, &index).await {
            tracing::debug!(sandbox = %live.id, error = %err, "following a console log");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(index: &LogIndex) -> Vec<String> {
        index.lines.iter().map(|l| l.text.clone()).collect()
    }

    #[test]
    fn lines_complete_across_reads_and_keep_their_stamp() {
        let mut index = LogIndex::default();
        index.feed(b"boot\r\nhal", 10);
        index.feed(b"f line\n\xff\xfebad\n", 20);
        assert_eq!(texts(&index), ["boot", "half line", "\u{fffd}\u{fffd}bad"]);
        assert_eq!(index.lines.iter().map(|l| l.ms).collect::<Vec<_>>(), [10, 20, 20]);
        assert_eq!(index.offset, 22);
        assert_eq!(index.since(20, 10).len(), 2);
        assert_eq!(index.since(0, 1)[0].text, "boot");
        assert_eq!(index.after(Some(1)).len(), 1);
    }

    #[test]
    fn huge_lines_are_cut_and_counted() {
        let mut index = LogIndex::default();
        let long = vec![b'x'; MAX_LINE + 100];
        index.feed(&long[..MAX_LINE - 1], 1);
        index.feed(&long[MAX_LINE - 1..], 1);
        index.feed(b"\nnext\n", 1);
        let lines = texts(&index);
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with(&"x".repeat(MAX_LINE)), "{}", &lines[0][..20]);
        assert!(
            lines[0].ends_with("[… 100 more bytes of this line not shown]"),
            "{}",
            &lines[0][MAX_LINE..]
        );
        assert_eq!(lines[1], "next");
    }

    #[test]
    fn old_lines_go_first() {
        let mut index = LogIndex::default();
        for i in 0..MAX_LINES + 5 {
            index.feed(format!("{i}\n").as_bytes(), 1);
        }
        assert_eq!(index.lines.len(), MAX_LINES);
        assert_eq!(index.lines.front().unwrap().text, "5");
    }

    #[test]
    fn a_flood_is_skipped_to_its_newest_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut index = LogIndex::default();
        std::fs::write(&path, b"first\n").unwrap();
        index.refresh(&path).unwrap();
        let mut flood = b"partial line start ".to_vec();
        let line = format!("{}\n", "x".repeat(999));
        for _ in 0..MAX_READ as usize / 1000 + 10 {
            flood.extend_from_slice(line.as_bytes());
        }
        flood.extend_from_slice(b"last\n");
        let mut all = b"first\n".to_vec();
        all.extend_from_slice(&flood);
        std::fs::write(&path, &all).unwrap();
        index.refresh(&path).unwrap();
        assert_eq!(index.offset, all.len() as u64);
        // The read was bounded: the skip is announced, and what follows starts at a line.
        let notice = format!(
            "[… {} bytes of console output not shown]",
            flood.len() - MAX_READ as usize
        );
        let lines = texts(&index);
        assert_eq!(lines[0], "first");
        assert_eq!(lines[1], notice);
        assert!(lines[2..lines.len() - 1].iter().all(|l| *l == line.trim_end()));
        assert_eq!(lines.last().unwrap(), "last");
        // Truncation (a new VM's log) starts over.
        std::fs::write(&path, b"again\n").unwrap();
        index.refresh(&path).unwrap();
        assert_eq!(texts(&index).last().unwrap(), "again");
        // A symlink is not followed.
        let link = dir.path().join("link.log");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert!(LogIndex::default().refresh(&link).is_err());
    }
}
