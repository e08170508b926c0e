//! Directory watchers (inotify): `WatchDir` streams a directory's changes; `CreateWatcher`,
//! `GetWatcherEvents` and `RemoveWatcher` collect them for clients that poll.
//!
//! Event names are paths relative to the watched directory. Recursive watchers also watch
//! directories created after they started, and report what such a directory already held when
//! its watch was added (created between its creation and the watch, which inotify cannot see).
//! With `include_entry` (envd 0.6.3) each event carries the entry's description when the entry
//! still exists. A directory on a network file system (NFS, CIFS/SMB, FUSE, as envd tells them)
//! is watched only with `allow_network_mounts` (envd 0.6.4); inotify then reports the changes
//! made inside this guest. A watcher ends when its stream's client goes away or it is removed;
//! its inotify descriptor closes with it.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use viv_proto::filesystem::{EventType, FilesystemEvent, WatchDirResponse, WatchRequest, WatcherEvents, WatcherId};
use viv_proto::process::Empty;
use viv_proto::{envelope, ConnectError};

use crate::server::{connect_error, decode_request, stream_response, unary_ok, AgentState};

/// How often an idle `WatchDir` stream sends a keep-alive message.
const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(30);

/// Most events a polled watcher keeps between two polls.
const MAX_PENDING: usize = 10_000;

/// Watchers created with `CreateWatcher`, by id.
#[derive(Default)]
pub struct Watchers {
    polled: Mutex<HashMap<String, PolledWatcher>>,
}

struct PolledWatcher {
    events: Arc<Mutex<Vec<FilesystemEvent>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PolledWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Routes of the watcher methods of `filesystem.Filesystem`.
pub fn routes() -> Router<AgentState> {
    let s = viv_proto::filesystem::SERVICE;
    Router::new()
        .route(&format!("{s}/WatchDir"), post(watch_dir))
        .route(&format!("{s}/CreateWatcher"), post(create_watcher))
        .route(&format!("{s}/GetWatcherEvents"), post(get_watcher_events))
        .route(&format!("{s}/RemoveWatcher"), post(remove_watcher))
}

/// Filesystem magic numbers (statfs `f_type`) of the network file systems envd refuses to watch
/// without `allow_network_mounts`: NFS, CIFS, SMB, SMB2, FUSE.
const NETWORK_FS_MAGIC: [i64; 5] = [0x6969, 0xFF53_4D42, 0x517B, 0xFE53_4D42, 0x6573_5546];

/// Whether `path` lies on a network file system.
fn on_network_mount(path: &Path) -> io::Result<bool> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: an all-zero statfs is a valid value for the kernel to overwrite.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a statfs buffer, both outliving the call.
    if unsafe { libc::statfs(c.as_ptr(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)]
    let kind = stat.f_type as i64;
    Ok(NETWORK_FS_MAGIC.contains(&kind))
}

/// Resolves and checks the directory of a watch request as the requesting user.
async fn watched_dir(
    state: &AgentState,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(PathBuf, WatchRequest), ConnectError> {
    let req: WatchRequest = decode_request(headers, body)?;
    let user = state.request_user(headers, None)?;
    let path = crate::files::resolve_path(&user, &req.path);
    let check = path.clone();
    let readable = crate::files::as_user(&user, move || {
        std::fs::read_dir(&check)?;
        on_network_mount(&check)
    })
    .await;
    match readable {
        Ok(true) if !req.allow_network_mounts => Err(ConnectError::new(
            "invalid_argument",
            format!(
                "cannot watch path on network filesystem: {} (set allow_network_mounts to watch it)",
                path.display()
            ),
        )),
        Ok(_) => Ok((path, req)),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Err(ConnectError::new(
            "not_found",
            format!("directory {} does not exist", path.display()),
        )),
        Err(err) => Err(ConnectError::new(
            "invalid_argument",
            format!("cannot watch {}: {err}", path.display()),
        )),
    }
}

async fn watch_dir(State(state): State<AgentState>, headers: HeaderMap, body: Bytes) -> Response {
    let started = async {
        let (path, req) = watched_dir(&state, &headers, &body).await?;
        watch(path, req.recursive, req.include_entry)
            .map_err(|e| ConnectError::new("internal", format!("watching: {e}")))
    }
    .await;
    let mut events = match started {
        Ok(events) => events,
        Err(err) => return stream_response(futures::stream::once(async { Err(err) })),
    };
    let (tx, rx) = mpsc::channel::<Result<Bytes, ConnectError>>(16);
    tokio::spawn(async move {
        let send = |message: WatchDirResponse| envelope::encode_json(&message);
        if tx.send(Ok(send(WatchDirResponse::Start(Empty {})))).await.is_err() {
            return;
        }
        loop {
            let message = tokio::select! {
                event = events.recv() => match event {
                    Some(event) => WatchDirResponse::Filesystem(event),
                    None => return,
                },
                () = tokio::time::sleep(KEEPALIVE) => WatchDirResponse::Keepalive(Empty {}),
            };
            if tx.send(Ok(send(message))).await.is_err() {
                return;
            }
        }
    });
    stream_response(tokio_stream::wrappers::ReceiverStream::new(rx))
}

async fn create_watcher(State(state): State<AgentState>, headers: HeaderMap, body: Bytes) -> Response {
    let created = async {
        let (path, req) = watched_dir(&state, &headers, &body).await?;
        let mut events = watch(path, req.recursive, req.include_entry)
            .map_err(|e| ConnectError::new("internal", format!("watching: {e}")))?;
        let pending = Arc::new(Mutex::new(Vec::new()));
        let sink = pending.clone();
        let task = tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                let mut sink = sink.lock().expect("watcher lock");
                if sink.len() < MAX_PENDING {
                    sink.push(event);
                }
            }
        });
        let id = format!("{:016x}", rand_u64());
        state
            .watchers()
            .polled
            .lock()
            .expect("watchers lock")
            .insert(id.clone(), PolledWatcher { events: pending, task });
        Ok(WatcherId { watcher_id: id })
    }
    .await;
    match created {
        Ok(id) => unary_ok(&id),
        Err(err) => connect_error(err),
    }
}

fn not_found(id: &str) -> ConnectError {
    ConnectError::new("not_found", format!("watcher '{id}' not found"))
}

async fn get_watcher_events(State(state): State<AgentState>, headers: HeaderMap, body: Bytes) -> Response {
    let result = decode_request::<WatcherId>(&headers, &body).and_then(|req| {
        let watchers = state.watchers().polled.lock().expect("watchers lock");
        let watcher = watchers
            .get(&req.watcher_id)
            .ok_or_else(|| not_found(&req.watcher_id))?;
        let events = std::mem::take(&mut *watcher.events.lock().expect("watcher lock"));
        Ok(WatcherEvents { events })
    });
    match result {
        Ok(events) => unary_ok(&events),
        Err(err) => connect_error(err),
    }
}

async fn remove_watcher(State(state): State<AgentState>, headers: HeaderMap, body: Bytes) -> Response {
    let result = decode_request::<WatcherId>(&headers, &body).and_then(|req| {
        state
            .watchers()
            .polled
            .lock()
            .expect("watchers lock")
            .remove(&req.watcher_id)
            .map(|_| Empty {})
            .ok_or_else(|| not_found(&req.watcher_id))
    });
    match result {
        Ok(empty) => unary_ok(&empty),
        Err(err) => connect_error(err),
    }
}

fn rand_u64() -> u64 {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer.
    unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    u64::from_ne_bytes(bytes)
}

const MASK: u32 = libc::IN_CREATE
    | libc::IN_MODIFY
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_ATTRIB
    | libc::IN_DONT_FOLLOW;

/// Watches `root` (and, if `recursive`, its subdirectories); events arrive on the receiver
/// until it is dropped, with the entry's description if `include_entry`.
fn watch(root: PathBuf, recursive: bool, include_entry: bool) -> io::Result<mpsc::Receiver<FilesystemEvent>> {
    // SAFETY: inotify_init1 takes flags and returns a new descriptor or -1.
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just created and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut dirs = HashMap::new();
    add_tree(&fd, &root, Path::new(""), recursive, &mut dirs)?;
    // SAFETY: `fd` is an open inotify descriptor that the AsyncFd owns from here on, so it stays
    // open and the same for the AsyncFd's whole life.
    let fd = unsafe { AsyncFd::register(fd) }?;
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        // Rename cookies of uploads moved out of their temporary names.
        let mut uploads: Vec<u32> = Vec::new();
        loop {
            let read = tokio::select! {
                ready = fd.readable() => ready,
                () = tx.closed() => return,
            };
            let Ok(mut guard) = read else { return };
            let n = match guard.try_io(|inner| {
                // SAFETY: reads into a buffer of `buf.len()` bytes from the inotify descriptor.
                let n = unsafe { libc::read(inner.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }) {
                Ok(Ok(n)) => n,
                Ok(Err(_)) => return,
                Err(_would_block) => continue,
            };
            let mut offset = 0;
            while offset + std::mem::size_of::<libc::inotify_event>() <= n {
                // SAFETY: the kernel wrote whole inotify_event records; read_unaligned copes
                // with the byte buffer's alignment.
                let event: libc::inotify_event = unsafe { std::ptr::read_unaligned(buf[offset..].as_ptr().cast()) };
                let name_start = offset + std::mem::size_of::<libc::inotify_event>();
                let name_end = (name_start + event.len as usize).min(n);
                let raw = &buf[name_start..name_end];
                let name =
                    String::from_utf8_lossy(&raw[..raw.iter().position(|&b| b == 0).unwrap_or(raw.len())]).into_owned();
                offset = name_end;
                let Some(dir) = dirs.get(&event.wd).cloned() else {
                    continue;
                };
                let relative = if name.is_empty() { dir.clone() } else { dir.join(&name) };
                let is_dir = event.mask & libc::IN_ISDIR != 0;
                // What a new directory held before its watch was in place is reported as created
                // (after the directory's own event).
                let mut found = Vec::new();
                if recursive && is_dir && event.mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0 {
                    let before = dirs.len();
                    let _ = add_tree(fd.get_ref(), &root.join(&relative), &relative, true, &mut dirs);
                    if dirs.len() > before {
                        contents(&root, &relative, &mut found);
                    }
                }
                // An upload is written to a temporary file and renamed into place: watchers see
                // it as the file being created and written, as when a client writes in place.
                if crate::files::is_upload_temp(&name) {
                    if event.mask & libc::IN_MOVED_FROM != 0 {
                        uploads.push(event.cookie);
                    }
                    continue;
                }
                let Some(event_type) = event_type(event.mask) else {
                    continue;
                };
                let mut types = vec![event_type];
                if event.mask & libc::IN_MOVED_TO != 0 && uploads.contains(&event.cookie) {
                    uploads.retain(|c| *c != event.cookie);
                    types.push(EventType::Write);
                }
                let later = found.into_iter().map(|p| (p, EventType::Create));
                for (relative, event_type) in types.into_iter().map(|t| (relative.clone(), t)).chain(later) {
                    let entry = include_entry
                        .then(|| crate::files::entry_info(&root.join(&relative)).ok().map(Box::new))
                        .flatten();
                    let event = FilesystemEvent {
                        name: relative.to_string_lossy().into_owned(),
                        event_type,
                        entry,
                    };
                    if tx.send(event).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    Ok(rx)
}

fn event_type(mask: u32) -> Option<EventType> {
    if mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0 {
        Some(EventType::Create)
    } else if mask & libc::IN_MODIFY != 0 {
        Some(EventType::Write)
    } else if mask & libc::IN_DELETE != 0 {
        Some(EventType::Remove)
    } else if mask & libc::IN_MOVED_FROM != 0 {
        Some(EventType::Rename)
    } else if mask & libc::IN_ATTRIB != 0 {
        Some(EventType::Chmod)
    } else {
        None
    }
}

/// Every path below `root/relative` (as paths relative to `root`), parents before children.
fn contents(root: &Path, relative: &Path, out: &mut Vec<PathBuf>) {
    let Ok(items) = std::fs::read_dir(root.join(relative)) else {
        return;
    };
    for item in items.flatten() {
        let name = item.file_name();
        if crate::files::is_upload_temp(&name.to_string_lossy()) {
            continue;
        }
        let path = relative.join(&name);
        out.push(path.clone());
        if item.file_type().is_ok_and(|t| t.is_dir()) && out.len() < MAX_PENDING {
            contents(root, &path, out);
        }
    }
}

/// Watches `dir` (known as `relative`) and, if `recursive`, every directory below it.
fn add_tree(
    fd: &OwnedFd,
    dir: &Path,
    relative: &Path,
    recursive: bool,
    dirs: &mut HashMap<i32, PathBuf>,
) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: a valid descriptor and a NUL-terminated path that outlives the call.
    let wd = unsafe { libc::inotify_add_watch(fd.as_raw_fd(), path.as_ptr(), MASK) };
    if wd < 0 {
        return Err(io::Error::last_os_error());
    }
    dirs.insert(wd, relative.to_path_buf());
    if recursive {
        for entry in std::fs::read_dir(dir)?.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                let _ = add_tree(fd, &entry.path(), &relative.join(entry.file_name()), true, dirs);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_a_new_tree_parents_first_without_upload_temporaries() {
        let root = std::env::temp_dir().join(format!("viv-agent-watch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("new/deep")).unwrap();
        std::fs::write(root.join("new/deep/f.txt"), "x").unwrap();
        std::fs::write(root.join("new/.g.txt.viv-upload-0-1"), "partial").unwrap();
        let mut found = Vec::new();
        contents(&root, Path::new("new"), &mut found);
        assert_eq!(found, [PathBuf::from("new/deep"), PathBuf::from("new/deep/f.txt")]);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
