//! The one place that reaps child processes.
//!
//! As PID 1 the agent inherits every orphan in the guest and must reap them, so it calls
//! `waitpid(-1)` on each `SIGCHLD`. That would steal exit statuses from any other waiter, so
//! processes the agent starts are spawned through [`spawn_registered`], which registers a
//! waiter for the child's pid under the same lock the reaper holds while it reaps.
//!
//! Invariant: `waitpid(-1)` runs only under the waiters lock, and [`spawn_registered`] holds
//! that lock for the whole of the start. When `exec` fails, the starter waits for the dead
//! child itself (`crate::spawn`); had the reaper reaped it in between, the starter would not
//! learn why (with std's `Command` that wait panicked, and the client saw its stream reset).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

type Waiters = Mutex<HashMap<u32, oneshot::Sender<Exit>>>;

fn waiters() -> &'static Waiters {
    static WAITERS: OnceLock<Waiters> = OnceLock::new();
    WAITERS.get_or_init(Default::default)
}

/// Runs `start`, which starts a child and returns its pid, and registers a waiter for it;
/// returns the pid with a receiver of its exit status. `start` runs under the reaper's lock,
/// so it may reap a child that failed to start itself.
pub fn spawn_registered(
    start: impl FnOnce() -> std::io::Result<u32>,
) -> std::io::Result<(u32, oneshot::Receiver<Exit>)> {
    let mut waiters = waiters().lock().expect("reaper lock");
    let pid = start()?;
    let (tx, rx) = oneshot::channel();
    waiters.insert(pid, tx);
    Ok((pid, rx))
}

/// Starts the reaper task; call once, inside the runtime.
pub fn start() {
    let mut sigchld = signal(SignalKind::child()).expect("SIGCHLD handler");
    tokio::spawn(async move {
        loop {
            reap_all();
            if sigchld.recv().await.is_none() {
                return;
            }
        }
    });
}

/// Reaps every child that has ended, handing each registered one's status to its waiter.
pub(crate) fn reap_all() {
    let mut waiters = waiters().lock().expect("reaper lock");
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into our local integer; WNOHANG never blocks.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
        let exit = if libc::WIFEXITED(status) {
            Exit::Code(libc::WEXITSTATUS(status))
        } else {
            Exit::Signal(libc::WTERMSIG(status))
        };
        if let Some(tx) = waiters.remove(&(pid as u32)) {
            let _ = tx.send(exit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_program_that_cannot_start_is_an_error_while_the_reaper_runs() {
        // The reaper and starts of a missing program, side by side: every start must return
        // NotFound (a failed child reaped by the reaper first would leave the start no errno).
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reaper = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    reap_all();
                }
            })
        };
        let start = |program: &str, args: &[&str]| {
            let null = std::fs::File::open("/dev/null").unwrap();
            let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            spawn_registered(|| {
                use std::os::fd::AsFd as _;
                crate::spawn::spawn(crate::spawn::Spawn {
                    program,
                    args: &args,
                    env: vec![("PATH".into(), "/usr/bin:/bin".into())],
                    cwd: std::path::Path::new("/"),
                    stdio: [null.as_fd(), null.as_fd(), null.as_fd()],
                    uid: 0,
                    gid: 0,
                    groups: &[],
                    controlling_terminal: false,
                })
            })
        };
        for _ in 0..2000 {
            // A path is not looked up: the child's exec fails, and the start reaps it.
            let err = start("/no/such/program", &[]).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
        }
        // A program that runs gets its exit status from the reaper.
        let (_pid, exit) = start("sh", &["-c", "exit 3"]).unwrap();
        assert_eq!(exit.blocking_recv().unwrap(), Exit::Code(3));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        reaper.join().unwrap();
    }
}
