//! The one place that reaps child processes.
//!
//! As PID 1 the agent inherits every orphan in the guest and must reap them, so it calls
//! `waitpid(-1)` on each `SIGCHLD`. That would steal exit statuses from any other waiter, so
//! processes the agent starts are spawned through [`spawn`], which registers a waiter for the
//! child's pid under the same lock the reaper takes to deliver statuses.

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
        let waiter = waiters().lock().expect("reaper lock").remove(&(pid as u32));
        if let Some(tx) = waiter {
            let _ = tx.send(exit);
        }
    }
}
