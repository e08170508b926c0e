//! The one place that reaps child processes.
//!
//! As PID 1 the agent inherits every orphan in the guest and must reap them, so it calls
//! `waitpid(-1)` on each `SIGCHLD`. That would steal exit statuses from any other waiter, so
//! processes the agent starts are spawned through [`spawn`] or [`spawn_registered`], which
//! register a waiter for the child's pid under the same lock the reaper holds while it reaps.
//!
//! Invariant: `waitpid(-1)` runs only under the waiters lock, and [`spawn`] holds that lock for
//! the whole of `Command::spawn`. When `exec` fails, std waits for the dead child itself and
//! panics if the child is already gone; reaping it in between turned a missing program into a
//! panicked request (the client saw its stream reset).

use std::collections::HashMap;
use std::process::{Child, Command};
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

/// Spawns `command` and returns the child with a receiver of its exit status.
pub fn spawn(command: &mut Command) -> std::io::Result<(Child, oneshot::Receiver<Exit>)> {
    let mut waiters = waiters().lock().expect("reaper lock");
    let child = command.spawn()?;
    let (tx, rx) = oneshot::channel();
    waiters.insert(child.id(), tx);
    Ok((child, rx))
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

fn reap_all() {
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
        // The reaper and spawns of a missing program, side by side: every spawn must return
        // NotFound (std's own wait for the failed child used to find it reaped, and panicked).
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reaper = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    reap_all();
                }
            })
        };
        for _ in 0..2000 {
            let mut command = Command::new("/no/such/program");
            // A pre_exec closure makes std fork and exec (as the agent's spawns do) instead of
            // using posix_spawn, whose libc waits for a failed child itself.
            // SAFETY: the closure does nothing.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut command, || Ok(()));
            }
            let err = spawn(&mut command).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
        }
        // A program that runs gets its exit status from the reaper.
        let (_child, exit) = spawn(Command::new("sh").args(["-c", "exit 3"])).unwrap();
        assert_eq!(exit.blocking_recv().unwrap(), Exit::Code(3));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        reaper.join().unwrap();
    }
}
