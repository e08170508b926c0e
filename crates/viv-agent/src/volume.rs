//! `POST /volume/mount?path=/mnt/data`: mounts a FUSE file system at `path` whose file server
//! is the host. The kernel's FUSE requests, read from `/dev/fuse`, are the response body; the
//! request body carries the host's replies, each written back to `/dev/fuse` whole (a reply
//! starts with its own length, so the byte stream needs no other framing).
//!
//! The agent is a client of the mounts it serves (envd's file routes on volume paths), so a
//! request a close waits for (`FUSE_FLUSH`, a no-op for the host) is answered here: a file the
//! agent's connection task drops would otherwise wait for a reply only that task can relay.
//!
//! Invariants: the mount lives exactly as long as this exchange. When the host's side ends (the
//! sandbox's server went away, or a restore reset the channel), the FUSE connection is aborted
//! (every waiting and later file operation fails with `ENOTCONN` instead of hanging) and the
//! mount point is detached. The route is the host's own: the server never forwards it.

use std::io::{Read as _, Write as _};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use axum::body::Body;
use axum::extract::Query;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::{Buf as _, Bytes, BytesMut};
use futures::StreamExt as _;
use serde::Deserialize;

use crate::server::json_error;

/// A reply's header: length, error, unique.
const OUT_HEADER: usize = 16;
/// `FUSE_FLUSH`, sent (and waited for) at every close of a file on the mount.
const FUSE_FLUSH: u32 = 25;
/// The kernel's largest request: the largest write the host allows (128 KiB) and a header page.
const READ_BUFFER: usize = 128 * 1024 + 4096;

#[derive(Debug, Deserialize)]
pub struct MountQuery {
    path: String,
}

/// A mount point: absolute, no `.`/`..` components, not `/`.
fn check_path(path: &str) -> Result<(), String> {
    let ok = path.starts_with('/')
        && path.len() > 1
        && path.len() < 4096
        && !path.contains('\0')
        && path.split('/').skip(1).all(|c| !c.is_empty() && c != "." && c != "..");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "'{path}' is not an absolute, normalized mount point other than /"
        ))
    }
}

/// The FUSE connection number of the mount at `path` (its device's minor number, which names
/// it under fusectl), from `/proc/self/mountinfo`: a `stat` of the mount point would wait for
/// the file server.
fn connection(path: &str) -> Option<u64> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let fs = line.split(" - ").nth(1)?.split(' ').next()?;
        (fields.get(4) == Some(&path) && fs.starts_with("fuse"))
            .then(|| fields.get(2)?.split(':').nth(1)?.parse().ok())
            .flatten()
    })
}

fn fuse_mount(path: &str) -> std::io::Result<OwnedFd> {
    std::fs::create_dir_all(path)?;
    let fuse = std::fs::OpenOptions::new().read(true).write(true).open("/dev/fuse")?;
    let fd = OwnedFd::from(fuse);
    let data = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions",
        fd.as_raw_fd()
    );
    crate::sys::mount(
        "vivarium-volume",
        path,
        Some("fuse"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some(&data),
    )?;
    Ok(fd)
}

/// Ends the FUSE connection `dev` (through the fusectl file system) and detaches its mount
/// point if it is still the top one there (a newer mount may sit on it: a remount after a
/// restore).
fn abort(path: &str, dev: Option<u64>) {
    let connections = "/sys/fs/fuse/connections";
    let Some(dev) = dev else { return };
    if !std::path::Path::new(connections).join(dev.to_string()).exists() {
        let _ = crate::sys::mount("fusectl", connections, Some("fusectl"), 0, None);
    }
    let _ = std::fs::write(format!("{connections}/{dev}/abort"), b"1");
    if connection(path) != Some(dev) {
        return;
    }
    if let Ok(target) = std::ffi::CString::new(path) {
        // SAFETY: `target` is a valid C string.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

pub async fn mount(Query(q): Query<MountQuery>, body: Body) -> Response {
    if let Err(message) = check_path(&q.path) {
        return json_error(StatusCode::BAD_REQUEST, message);
    }
    let path = q.path.clone();
    let mounted = tokio::task::spawn_blocking(move || fuse_mount(&path)).await;
    let (fd, dev) = match mounted {
        Ok(Ok(fd)) => (fd, connection(&q.path)),
        Ok(Err(err)) => {
            return json_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("mounting a volume at {}: {err}", q.path),
            )
        }
        Err(err) => return json_error(StatusCode::INTERNAL_SERVER_ERROR, err.to_string()),
    };
    // SAFETY: duplicating an open descriptor (close-on-exec, so commands the agent starts never
    // hold it) returns a new one that nothing else owns.
    let writer = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if writer < 0 {
        abort(&q.path, dev);
        return json_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            std::io::Error::last_os_error().to_string(),
        );
    }
    // SAFETY: just returned by `fcntl`, owned by nothing else.
    let mut writer = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(writer) });
    let (requests, to_host) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(64);
    let mut reader = std::fs::File::from(fd);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; READ_BUFFER];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => return,
                Ok(n) if n >= 16 && buf[4..8] == FUSE_FLUSH.to_le_bytes() => {
                    // Answered here: the host has nothing to do for it, and a close (which
                    // waits for it) may run inside the agent's own connection task, which must
                    // go on to relay everything else.
                    let mut reply = [0u8; OUT_HEADER];
                    reply[0..4].copy_from_slice(&(OUT_HEADER as u32).to_le_bytes());
                    reply[8..16].copy_from_slice(&buf[8..16]);
                    let _ = (&reader).write(&reply);
                }
                Ok(n) => {
                    if requests.blocking_send(Ok(Bytes::copy_from_slice(&buf[..n]))).is_err() {
                        return;
                    }
                }
                // A request the kernel withdrew before it was read; the next one follows.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) || e.kind() == std::io::ErrorKind::Interrupted => {}
                // ENODEV: the connection was aborted or unmounted.
                Err(_) => return,
            }
        }
    });
    let path = q.path.clone();
    tokio::spawn(async move {
        let mut replies = body.into_data_stream();
        let mut pending = BytesMut::new();
        while let Some(Ok(chunk)) = replies.next().await {
            pending.extend_from_slice(&chunk);
            while pending.len() >= OUT_HEADER {
                let len = u32::from_le_bytes(pending[..4].try_into().expect("4 bytes")) as usize;
                if len < OUT_HEADER {
                    // Not a reply: the host's side is broken; end the mount.
                    pending.clear();
                    break;
                }
                if pending.len() < len {
                    break;
                }
                // A reply to a request the kernel no longer waits for fails; that is fine.
                let _ = writer.write(&pending[..len]);
                pending.advance(len);
            }
        }
        let _ = tokio::task::spawn_blocking(move || abort(&path, dev)).await;
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(to_host);
    (StatusCode::OK, Body::from_stream(stream)).into_response()
}

#[cfg(test)]
mod tests {
    use super::check_path;

    #[test]
    fn mount_points_are_absolute_and_normalized() {
        for ok in ["/mnt/data", "/data", "/home/user/v"] {
            assert!(check_path(ok).is_ok(), "{ok}");
        }
        for bad in ["/", "", "mnt", "/mnt/../etc", "/mnt/./x", "/mnt//x", "/mnt/"] {
            assert!(check_path(bad).is_err(), "{bad}");
        }
    }
}
