//! VMM processes that outlive the server: watched and signalled through pidfds, so a process the
//! server spawned and one it found after a restart (no longer its child) are handled alike.
//!
//! Invariants:
//! - a process is identified by its pid *and* its start time (clock ticks since boot, from
//!   `/proc/PID/stat`), so a recycled pid is never taken for a VM; the pidfd is opened before
//!   the start time is checked a second time, after which it can no longer refer to another
//!   process;
//! - signals go through the pidfd (`pidfd_send_signal`), never to a bare pid;
//! - the server's own children are reaped when they exit (their exit status is reported); an
//!   adopted process is reaped by init.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::path::Path;

use tokio::io::unix::AsyncFd;

/// Who a process is: pid and start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcessIdentity {
    /// The pid.
    pub pid: u32,
    /// Start time in clock ticks since boot (`/proc/PID/stat`, field 22).
    pub start_time: u64,
}

impl std::fmt::Display for ProcessIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.pid, self.start_time)
    }
}

impl std::str::FromStr for ProcessIdentity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (pid, start) = s.split_once('@').ok_or_else(|| format!("bad process identity {s:?}"))?;
        Ok(Self {
            pid: pid.parse().map_err(|_| format!("bad pid in {s:?}"))?,
            start_time: start.parse().map_err(|_| format!("bad start time in {s:?}"))?,
        })
    }
}

/// The start time of `pid`, if it runs (zombies included).
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces; fields after it start with state
    // (field 3), so the start time (field 22) is the 20th after the closing parenthesis.
    stat.rsplit_once(')')?.1.split_whitespace().nth(19)?.parse().ok()
}

/// The command line of `pid`, arguments joined by spaces.
pub fn command_line(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(String::from_utf8_lossy(&raw).replace('\0', " ").trim_end().to_owned())
}

/// The uid `pid` runs as.
pub fn uid_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Registers a pidfd with the runtime (it turns readable when the process exits).
fn watch_pidfd(pidfd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an OwnedFd's descriptor is open, and stays the same open descriptor until the
    // AsyncFd that now owns it is dropped.
    unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }.map_err(|e| e.into_parts().1)
}

/// A VMM process.
#[derive(Debug)]
pub struct VmProcess {
    identity: ProcessIdentity,
    pidfd: AsyncFd<OwnedFd>,
    /// Whether this server spawned it (and so reaps it).
    child: bool,
}

impl VmProcess {
    /// Starts `command`; the process is not killed when the server exits.
    pub fn spawn(command: &mut std::process::Command) -> std::io::Result<Self> {
        let child = command.spawn()?;
        let pid = child.id();
        // Not waited for through `child`: the pidfd below reports the exit and `exit_status`
        // reaps it. Dropping a std Child neither kills nor waits.
        drop(child);
        let pidfd = pidfd_open(pid)?;
        let start_time = start_time(pid).unwrap_or_default();
        Ok(Self {
            identity: ProcessIdentity { pid, start_time },
            pidfd: watch_pidfd(pidfd)?,
            child: true,
        })
    }

    /// The process `identity` if it still runs and its command line mentions `marker` (a path
    /// only its VM uses); `None` if it is gone or is some other process.
    pub fn adopt(identity: ProcessIdentity, marker: &Path) -> std::io::Result<Option<Self>> {
        let is_ours = || {
            start_time(identity.pid) == Some(identity.start_time)
                && command_line(identity.pid).is_some_and(|c| c.contains(&*marker.to_string_lossy()))
        };
        if !is_ours() {
            return Ok(None);
        }
        let pidfd = match pidfd_open(identity.pid) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(None),
            Err(e) => return Err(e),
        };
        // The pidfd now pins this pid: if it is still our process, it stays ours.
        if !is_ours() {
            return Ok(None);
        }
        Ok(Some(Self {
            identity,
            pidfd: watch_pidfd(pidfd)?,
            child: false,
        }))
    }

    /// Pid and start time.
    pub fn identity(&self) -> ProcessIdentity {
        self.identity
    }

    /// Sends `signal` (through the pidfd: never to a recycled pid).
    pub fn signal(&self, signal: i32) -> std::io::Result<()> {
        // SAFETY: pidfd_send_signal takes a descriptor this value owns, a signal number, a null
        // siginfo and no flags.
        let result = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.get_ref().as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if result == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        // Already gone is not an error for a kill.
        if err.raw_os_error() == Some(libc::ESRCH) {
            Ok(())
        } else {
            Err(err)
        }
    }

    /// Waits until the process has exited; returns its exit status when this server spawned
    /// it (a description such as `exit status: 0` or `signal: 9 (SIGKILL)`).
    pub async fn exited(&self) -> Option<String> {
        loop {
            match self.pidfd.readable().await {
                Ok(mut guard) => {
                    guard.retain_ready();
                    break;
                }
                Err(_) => {
                    // Polling failed (it cannot for a pidfd); fall back to checking /proc.
                    if start_time(self.identity.pid) != Some(self.identity.start_time) {
                        return None;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
        if !self.child {
            return None;
        }
        let mut status: libc::c_int = 0;
        // SAFETY: waitpid on our own child with a pointer to a live integer.
        let reaped = unsafe { libc::waitpid(self.identity.pid as libc::pid_t, &mut status, libc::WNOHANG) };
        (reaped > 0).then(|| describe_status(status))
    }
}

fn describe_status(status: libc::c_int) -> String {
    if libc::WIFEXITED(status) {
        format!("exit status: {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        let signal = libc::WTERMSIG(status);
        let name = match signal {
            libc::SIGKILL => " (SIGKILL)",
            libc::SIGTERM => " (SIGTERM)",
            libc::SIGSEGV => " (SIGSEGV)",
            libc::SIGABRT => " (SIGABRT)",
            libc::SIGSYS => " (SIGSYS: a system call its seccomp filter forbids)",
            _ => "",
        };
        format!("signal: {signal}{name}")
    } else {
        format!("wait status {status}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_spawned_process_is_watched_killed_and_reaped() {
        let mut command = std::process::Command::new("sleep");
        command.arg("30");
        let process = VmProcess::spawn(&mut command).unwrap();
        let identity = process.identity();
        assert_eq!(start_time(identity.pid), Some(identity.start_time));
        assert_eq!(identity.to_string().parse::<ProcessIdentity>().unwrap(), identity);
        process.signal(libc::SIGKILL).unwrap();
        assert_eq!(process.exited().await.as_deref(), Some("signal: 9 (SIGKILL)"));
        // Reaped: the pid is gone.
        assert_eq!(start_time(identity.pid), None);
        // Signalling a process that is gone is fine.
        process.signal(libc::SIGKILL).unwrap();
    }

    #[tokio::test]
    async fn adoption_checks_the_start_time_and_the_command_line() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("qmp.sock");
        let mut command = std::process::Command::new("sh");
        command.arg("-c").arg("sleep 30; : \"$0\"").arg(&marker);
        let spawned = VmProcess::spawn(&mut command).unwrap();
        let identity = spawned.identity();
        // `spawn` returns once the child is past the point of no return of its exec, a moment
        // before the kernel has set up its arguments: `/proc/PID/cmdline` is empty until then.
        // Adoption is of VMs that have run for a while; wait for that here.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !command_line(identity.pid).is_some_and(|c| c.contains(&*marker.to_string_lossy())) {
            assert!(
                std::time::Instant::now() < deadline,
                "the child never showed its arguments"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let wrong_time = ProcessIdentity {
            start_time: identity.start_time + 1,
            ..identity
        };
        assert!(VmProcess::adopt(wrong_time, &marker).unwrap().is_none());
        assert!(VmProcess::adopt(identity, Path::new("/elsewhere/qmp.sock"))
            .unwrap()
            .is_none());
        let adopted = VmProcess::adopt(identity, &marker).unwrap().expect("adopted");
        adopted.signal(libc::SIGKILL).unwrap();
        // The adopter does not reap (it is not the parent); the spawner does.
        assert_eq!(spawned.exited().await.as_deref(), Some("signal: 9 (SIGKILL)"));
        assert!(VmProcess::adopt(identity, &marker).unwrap().is_none());
    }
}
