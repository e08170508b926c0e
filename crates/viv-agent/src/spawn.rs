//! Starting a process as `posix_spawn` does: `clone(CLONE_VM | CLONE_VFORK)`, so the child runs
//! on the agent's own memory until it calls `execve`, instead of `fork`, which copies the
//! agent's page tables and makes every page either side writes next a copy-on-write fault.
//! Under TCG that copy is most of an exec's cost in the guest (a `fork` + `exec` of `/bin/true`
//! took 14 ms, a `posix_spawn` 5 ms). `posix_spawn` itself cannot switch users or take a
//! controlling terminal, which the agent's processes need, hence this module.
//!
//! Invariants:
//! - everything the child uses is prepared before the clone (paths, argument and environment
//!   arrays, descriptors); between the clone and `execve` the child only makes system calls
//!   (no allocation, no locks, no unwinding), since it shares the parent's memory and another
//!   thread of the agent may hold the allocator's lock;
//! - every signal is blocked in the calling thread across the clone, and the child sets every
//!   disposition back to the default before it unblocks them, so no handler of the agent ever
//!   runs in the child;
//! - the program is looked up in the child's `PATH` before the clone, so a missing program is an
//!   error of [`spawn`] (`NotFound`), as with `std::process::Command`; an `execve` that still
//!   fails leaves its errno for the parent, which reaps the child and returns that error;
//! - descriptors the parent keeps are close-on-exec; the child gets only the three it is given,
//!   as its stdin, stdout and stderr.

use std::ffi::CString;
use std::os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};

/// The child's stack: what `execve`'s path through the C library needs, with room to spare.
const CHILD_STACK: usize = 64 * 1024;

/// What to start, and as whom.
pub struct Spawn<'a> {
    /// The program, a path or a name looked up in `PATH` of `env`.
    pub program: &'a str,
    /// Its arguments, without the program.
    pub args: &'a [String],
    /// Its whole environment, `(name, value)`; a later entry of a name replaces an earlier one.
    pub env: Vec<(String, String)>,
    /// Its working directory (entered before the identity switch).
    pub cwd: &'a Path,
    /// Its stdin, stdout and stderr.
    pub stdio: [BorrowedFd<'a>; 3],
    /// Its user, group and supplementary groups.
    pub uid: u32,
    /// Its group.
    pub gid: u32,
    /// Its supplementary groups.
    pub groups: &'a [u32],
    /// Whether its stdin (a terminal) becomes its session's controlling terminal.
    pub controlling_terminal: bool,
}

/// What the child reads: raw pointers into data the parent holds until the clone returns.
struct ChildArgs {
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    cwd: *const libc::c_char,
    stdio: [libc::c_int; 3],
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: *const libc::gid_t,
    groups_len: usize,
    controlling_terminal: bool,
    /// The errno of the step that failed, 0 while none did.
    error: AtomicI32,
}

/// Starts `spec` in a new session; returns the child's pid. The caller reaps it.
pub fn spawn(spec: Spawn<'_>) -> std::io::Result<u32> {
    let invalid =
        |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{what} holds a NUL byte"));
    let mut env: Vec<(String, String)> = Vec::with_capacity(spec.env.len());
    for (name, value) in spec.env {
        env.retain(|(n, _)| *n != name);
        env.push((name, value));
    }
    let path_var = env
        .iter()
        .find(|(n, _)| n == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or("");
    let program = resolve(spec.program, path_var)?;
    let program = CString::new(program.as_os_str().as_bytes()).map_err(|_| invalid("the program"))?;
    let argv: Vec<CString> = std::iter::once(spec.program)
        .chain(spec.args.iter().map(String::as_str))
        .map(|a| CString::new(a).map_err(|_| invalid("an argument")))
        .collect::<Result<_, _>>()?;
    let envp: Vec<CString> = env
        .iter()
        .map(|(n, v)| CString::new(format!("{n}={v}")).map_err(|_| invalid("the environment")))
        .collect::<Result<_, _>>()?;
    let cwd = CString::new(spec.cwd.as_os_str().as_bytes()).map_err(|_| invalid("the working directory"))?;
    let argv_ptrs: Vec<*const libc::c_char> = argv
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp_ptrs: Vec<*const libc::c_char> = envp
        .iter()
        .map(|e| e.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let args = ChildArgs {
        program: program.as_ptr(),
        argv: argv_ptrs.as_ptr(),
        envp: envp_ptrs.as_ptr(),
        cwd: cwd.as_ptr(),
        stdio: spec.stdio.map(|fd| fd.as_raw_fd()),
        uid: spec.uid,
        gid: spec.gid,
        groups: spec.groups.as_ptr(),
        groups_len: spec.groups.len(),
        controlling_terminal: spec.controlling_terminal,
        error: AtomicI32::new(0),
    };
    // A program file that was just written may still be open for writing in another child
    // between its clone and its exec (every child starts with a copy of the descriptor table):
    // its exec fails with ETXTBSY until that child execs. Try again a few times, backing off.
    let mut backoff = std::time::Duration::from_millis(1);
    loop {
        match clone_and_exec(&args) {
            Err(err) if err.raw_os_error() == Some(libc::ETXTBSY) && backoff <= TEXT_BUSY_BACKOFF_MAX => {
                std::thread::sleep(backoff);
                backoff *= 2;
                args.error.store(0, Ordering::SeqCst);
            }
            started => return started,
        }
    }
}

/// The longest wait between attempts of an exec that failed with ETXTBSY.
const TEXT_BUSY_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_millis(32);

/// Clones a child that runs [`child`] on `args`; returns its pid once it exec'd, or the errno
/// of the step that failed (the child then reaped).
fn clone_and_exec(args: &ChildArgs) -> std::io::Result<u32> {
    let mut stack = vec![0u8; CHILD_STACK];
    // The stack grows down from its end, which must be 16-byte aligned.
    let top = (stack.as_mut_ptr() as usize + CHILD_STACK) & !15;

    // SAFETY: a sigset_t is plain data, valid zeroed; sigfillset writes the set we own;
    // pthread_sigmask reads it and writes `old`.
    let old = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        old
    };
    // SAFETY: `child` runs on `stack` (alive until clone returns: CLONE_VFORK suspends this
    // thread until the child execs or exits) and reads `args`, which outlives it likewise;
    // it makes only system calls (see the module's invariants).
    let pid = unsafe {
        libc::clone(
            child,
            top as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            args as *const ChildArgs as *mut libc::c_void,
        )
    };
    let clone_error = std::io::Error::last_os_error();
    // SAFETY: puts back the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    drop(stack);
    if pid < 0 {
        return Err(clone_error);
    }
    match args.error.load(Ordering::SeqCst) {
        0 => Ok(pid as u32),
        errno => {
            // The child has exited: reap it here, it is nobody else's.
            let mut status = 0;
            // SAFETY: waits for our own child, writing its status into a local.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            Err(std::io::Error::from_raw_os_error(errno))
        }
    }
}

/// A pipe whose ends are both close-on-exec: `(read, write)`.
pub(crate) fn cloexec_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded: both descriptors are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The file `program` names: itself when it holds a `/`, else the first executable regular
/// file of that name in the directories of `path_var`.
fn resolve(program: &str, path_var: &str) -> std::io::Result<PathBuf> {
    if program.is_empty() {
        return Err(std::io::Error::from(std::io::ErrorKind::NotFound));
    }
    if program.contains('/') {
        return Ok(PathBuf::from(program));
    }
    for dir in path_var.split(':').filter(|d| !d.is_empty()) {
        let candidate = Path::new(dir).join(program);
        let Ok(c_path) = CString::new(candidate.as_os_str().as_bytes()) else {
            continue;
        };
        let is_file = std::fs::metadata(&candidate).is_ok_and(|m| m.is_file());
        // SAFETY: access reads a NUL-terminated path we own.
        if is_file && unsafe { libc::access(c_path.as_ptr(), libc::X_OK) } == 0 {
            return Ok(candidate);
        }
    }
    Err(std::io::Error::from(std::io::ErrorKind::NotFound))
}

/// The child's side, from the clone to `execve`. Only system calls: it shares the parent's
/// memory, and its stack is the parent's `stack`.
extern "C" fn child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` points at the parent's `ChildArgs`, alive while the parent is suspended.
    let args = unsafe { &*(arg as *const ChildArgs) };
    let fail = |args: &ChildArgs| -> libc::c_int {
        // SAFETY: reads this thread's errno; `_exit` ends the child without running anything
        // of the parent's (no atexit handlers, no flushing of shared buffers).
        unsafe {
            let errno = *libc::__errno_location();
            args.error
                .store(if errno == 0 { libc::EINVAL } else { errno }, Ordering::SeqCst);
            libc::_exit(127)
        }
    };
    // SAFETY: each call below is a system call wrapper on values prepared by the parent.
    unsafe {
        // Default dispositions for every signal (the agent's handlers are not the child's, and
        // std ignores SIGPIPE), then nothing blocked.
        for signal in 1..=64 {
            if signal != libc::SIGKILL && signal != libc::SIGSTOP {
                libc::signal(signal, libc::SIG_DFL);
            }
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        for (target, &fd) in args.stdio.iter().enumerate() {
            let target = target as libc::c_int;
            let placed = if fd == target {
                // Already in place: only keep it across the exec.
                libc::fcntl(fd, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, target)
            };
            if placed < 0 {
                return fail(args);
            }
        }
        if libc::chdir(args.cwd) < 0 || libc::setsid() < 0 || libc::setgroups(args.groups_len, args.groups) < 0 {
            return fail(args);
        }
        // A terminal's process leads a session whose controlling terminal is the PTY.
        if args.controlling_terminal && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
            return fail(args);
        }
        if libc::setgid(args.gid) < 0 || libc::setuid(args.uid) < 0 {
            return fail(args);
        }
        libc::execve(args.program, args.argv, args.envp);
    }
    fail(args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reaper::Exit;
    use std::io::Read as _;
    use std::os::fd::AsFd as _;

    /// Waits for a child registered with the reaper, reaping as the agent's reaper task would
    /// (other tests' children are reaped alike, never stolen).
    fn wait(mut exit: tokio::sync::oneshot::Receiver<Exit>) -> Exit {
        loop {
            crate::reaper::reap_all();
            match exit.try_recv() {
                Ok(exit) => return exit,
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(1)),
            }
        }
    }

    fn run(program: &str, args: &[&str], env: Vec<(String, String)>, cwd: &Path) -> std::io::Result<(Exit, String)> {
        let (read, write) = cloexec_pipe().unwrap();
        let null = std::fs::File::open("/dev/null").unwrap();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        // The agent runs as root (PID 1 of the guest), and so do these tests: the child switches
        // to nobody.
        let (uid, gid, groups) = (65534, 65534, vec![65534]);
        let started = crate::reaper::spawn_registered(|| {
            spawn(Spawn {
                program,
                args: &args,
                env,
                cwd,
                stdio: [null.as_fd(), write.as_fd(), write.as_fd()],
                uid,
                gid,
                groups: &groups,
                controlling_terminal: false,
            })
        });
        drop(write);
        let (_, exit) = started?;
        let mut out = String::new();
        std::fs::File::from(read).read_to_string(&mut out).unwrap();
        Ok((wait(exit), out))
    }

    #[test]
    fn a_program_runs_with_its_arguments_environment_directory_and_a_new_session() {
        let env = vec![
            ("PATH".into(), "/nonexistent:/usr/bin:/bin".into()),
            ("FOO".into(), "first".into()),
            ("FOO".into(), "second".into()),
        ];
        let (exit, out) = run(
            "sh",
            &[
                "-c",
                "echo \"$0 $1 $FOO $(pwd) $(id -u)\"; read -r _ _ _ _ _ sid _ < /proc/$$/stat; [ \"$sid\" = $$ ] && echo leader; exit 3",
                "zero",
                "one",
            ],
            env,
            Path::new("/tmp"),
        )
        .unwrap();
        assert_eq!(exit, Exit::Code(3));
        assert_eq!(out, "zero one second /tmp 65534\nleader\n");
    }

    #[test]
    fn a_missing_program_is_not_found_and_a_failed_exec_its_errno() {
        let env = vec![("PATH".into(), "/usr/bin:/bin".into())];
        let missing = run("no-such-program-here", &[], env.clone(), Path::new("/")).unwrap_err();
        assert_eq!(missing.kind(), std::io::ErrorKind::NotFound);
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let missing_cwd = run("true", &[], env.clone(), &dir.path().join("gone")).unwrap_err();
        assert_eq!(missing_cwd.raw_os_error(), Some(libc::ENOENT));
        // A file that is not a program: the exec fails in the child and the parent says why.
        let text = dir.path().join("text");
        std::fs::write(&text, b"\x00\x01 not a program").unwrap();
        std::fs::set_permissions(&text, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let not_a_program = run(text.to_str().unwrap(), &[], env, Path::new("/")).unwrap_err();
        assert_eq!(not_a_program.raw_os_error(), Some(libc::ENOEXEC));
    }
}
