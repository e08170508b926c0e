//! A cap on what sandboxes' guests write to their serial consoles.
//!
//! QEMU writes a sandbox's serial console to `console.log` in its run directory (opened with
//! `append=on`), and a guest with root can write there as fast as the emulated UART goes, for as
//! long as it lives. Once a second this task cuts every live sandbox's log that grew past
//! [`SANDBOX_CONSOLE_CAP`] back to nothing: QEMU's next write lands at the start again (append
//! mode), and the log reader (`routes/sandbox_logs.rs`) starts over when it finds the file
//! shorter than what it had read, so the lines it already indexed stay readable.
//!
//! Invariants: a console log never holds more than the cap plus one second of UART output; the
//! file is opened without following symlinks (the run directory is the server's, but the name
//! is not trusted to be a regular file); the task holds only a weak reference to the manager.

use std::os::unix::fs::OpenOptionsExt as _;

use super::*;

/// The size past which a sandbox's console log is cut (the VMs' console hub keeps as much).
pub const SANDBOX_CONSOLE_CAP: u64 = super::CONSOLE_LOG_CAP;

impl Manager {
    /// Starts the task that keeps every live sandbox's console log under the cap.
    pub fn start_console_log_cap(self: &Arc<Self>) {
        let manager = Arc::downgrade(self);
        let stopping = self.stopping();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            while super::stopping::next_tick(&mut tick, &stopping).await {
                let Some(manager) = manager.upgrade() else { return };
                let logs: Vec<PathBuf> = manager
                    .live
                    .lock()
                    .expect("live lock")
                    .values()
                    .map(|live| live.console_log())
                    .collect();
                drop(manager);
                let _ = tokio::task::spawn_blocking(move || {
                    for log in logs {
                        cut_if_over(&log, SANDBOX_CONSOLE_CAP);
                    }
                })
                .await;
            }
        });
    }
}

/// Empties `log` when it holds more than `cap` bytes; returns whether it did.
fn cut_if_over(log: &std::path::Path, cap: u64) -> bool {
    let Ok(file) = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(log)
    else {
        return false;
    };
    match file.metadata() {
        Ok(meta) if meta.is_file() && meta.len() > cap => {
            let cut = file.set_len(0).is_ok();
            if cut {
                tracing::info!(log = %log.display(), bytes = meta.len(), "sandbox console log over its cap; cut");
            }
            cut
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::cut_if_over;

    #[test]
    fn only_a_regular_file_over_the_cap_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        std::fs::write(&log, vec![b'x'; 100]).unwrap();
        assert!(!cut_if_over(&log, 100), "at the cap");
        assert_eq!(std::fs::metadata(&log).unwrap().len(), 100);
        // A writer in append mode (as QEMU's chardev is) goes on at the new end.
        let mut writer = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        writer.write_all(b"y").unwrap();
        assert!(cut_if_over(&log, 100));
        writer.write_all(b"after\n").unwrap();
        assert_eq!(std::fs::read(&log).unwrap(), b"after\n");
        // A symlink is never followed.
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, vec![b'z'; 500]).unwrap();
        let link = dir.path().join("link.log");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(!cut_if_over(&link, 100));
        assert_eq!(std::fs::metadata(&target).unwrap().len(), 500);
        assert!(!cut_if_over(&dir.path().join("missing.log"), 100));
    }
}
