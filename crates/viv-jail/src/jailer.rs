//! The jailer's side: runs in the freshly spawned process that is to become the VMM, builds the
//! jail described by a [`JailSpec`] and executes the VMM in it.
//!
//! It must run before any other thread exists (unsharing a mount namespace needs a
//! single-threaded process), so the `viv` binary calls [`run_jailer`] first thing in `main`.
//!
//! Order matters, and each step depends on the one before:
//! 1. join the cgroups (while the host's `/sys` is still visible);
//! 2. start a session (no terminal, no signals meant for the server's process group);
//! 3. unshare the mount, IPC and (optionally) network namespaces, and make every mount private
//!    so nothing done here propagates to the host;
//! 4. mount a tmpfs as the new root and show `/usr`, the device nodes and the spec's files in
//!    it at their host paths;
//! 5. `pivot_root` into it, detach the host's tree, remount the root read-only;
//! 6. mark every descriptor but stdio and the kept ones close-on-exec;
//! 7. empty the capability bounding set, drop the groups, gid and uid (which clears every
//!    capability), clear the ambient set, set `no_new_privs`;
//! 8. execute the program with an empty environment.

use std::convert::Infallible;
use std::ffi::{CStr, CString};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

use crate::{JailSpec, JAILER_FAILED, JAIL_ROOT_MOUNT};

/// Builds the jail `spec_json` describes and executes its program; never returns. On failure it
/// prints what failed on stderr and exits with [`JAILER_FAILED`].
pub fn run_jailer(spec_json: &str) -> ! {
    match jail(spec_json) {
        Ok(never) => match never {},
        Err(err) => {
            eprintln!("vivarium jailer: {err}");
            std::process::exit(JAILER_FAILED)
        }
    }
}

/// The last error of a system call, with what was being done.
fn os_error(what: impl std::fmt::Display) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn c_path(path: &Path) -> Result<CString, String> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| format!("{} contains a NUL byte", path.display()))
}

fn check(result: libc::c_int, what: impl FnOnce() -> String) -> Result<(), String> {
    if result == 0 {
        Ok(())
    } else {
        Err(os_error(what()))
    }
}

/// `mount(2)` with optional source, file system type and data.
fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> Result<(), String> {
    let source_c = source.map(c_path).transpose()?;
    let target_c = c_path(target)?;
    // SAFETY: every pointer is either null or a NUL-terminated string that outlives the call.
    let result = unsafe {
        libc::mount(
            source_c.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            target_c.as_ptr(),
            fstype.map_or(std::ptr::null(), CStr::as_ptr),
            flags,
            data.map_or(std::ptr::null(), |d| d.as_ptr().cast()),
        )
    };
    check(result, || {
        format!(
            "mounting {} on {}",
            source.map_or_else(|| "(none)".into(), |s| s.display().to_string()),
            target.display()
        )
    })
}

/// Shows host path `source` at the same path under `root`: read-only unless `writable`, never
/// with set-uid programs, and without device nodes unless `device`.
fn bind(root: &Path, source: &Path, writable: bool, device: bool) -> Result<(), String> {
    let meta = std::fs::metadata(source).map_err(|e| format!("{}: {e}", source.display()))?;
    let target = root.join(
        source
            .strip_prefix("/")
            .map_err(|_| format!("{} is not absolute", source.display()))?,
    );
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("creating {}: {e}", parent.display()))?;
    }
    if !target.exists() {
        let made = if meta.is_dir() {
            std::fs::create_dir(&target)
        } else {
            std::fs::File::create(&target).map(drop)
        };
        made.map_err(|e| format!("creating the mount point {}: {e}", target.display()))?;
    }
    mount(Some(source), &target, None, libc::MS_BIND | libc::MS_REC, None)?;
    let mut flags = libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOSUID;
    if !writable {
        flags |= libc::MS_RDONLY;
    }
    if !device {
        flags |= libc::MS_NODEV;
    }
    mount(None, &target, None, flags, None)
}

/// Recreates a host symlink such as `/lib -> usr/lib` under `root`, or shows the directory
/// read-only where the host has a real one.
fn system_path(root: &Path, path: &str) -> Result<(), String> {
    let host = Path::new(path);
    match std::fs::symlink_metadata(host) {
        Ok(meta) if meta.file_type().is_symlink() => {
            let target = std::fs::read_link(host).map_err(|e| format!("reading {path}: {e}"))?;
            std::os::unix::fs::symlink(target, root.join(&path[1..])).map_err(|e| format!("linking {path}: {e}"))
        }
        Ok(meta) if meta.is_dir() => bind(root, host, false, false),
        _ => Ok(()),
    }
}

/// The highest capability number this kernel knows.
fn last_capability() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63)
}

fn jail(spec_json: &str) -> Result<Infallible, String> {
    let spec: JailSpec = serde_json::from_str(spec_json).map_err(|e| format!("reading the jail spec: {e}"))?;
    if spec.uid == 0 || spec.gid == 0 {
        return Err("refusing to run a jailed process as root".into());
    }
    if !spec.program.is_absolute() {
        return Err(format!(
            "the program {} is not an absolute path",
            spec.program.display()
        ));
    }
    let program = c_path(&spec.program)?;
    let mut argv: Vec<CString> = vec![program.clone()];
    for arg in &spec.args {
        argv.push(CString::new(arg.as_bytes()).map_err(|_| format!("argument {arg:?} contains a NUL byte"))?);
    }
    let last_cap = last_capability();
    // SAFETY: umask only changes this process's file creation mask.
    unsafe { libc::umask(0o022) };

    // 1. The cgroups, while the host's /sys is in view.
    let pid = std::process::id().to_string();
    for procs in &spec.cgroup_procs {
        std::fs::write(procs, &pid).map_err(|e| format!("joining the cgroup {}: {e}", procs.display()))?;
    }
    // 2. A session of its own.
    // SAFETY: setsid has no preconditions; it fails only for a process group leader.
    if unsafe { libc::setsid() } < 0 {
        return Err(os_error("starting a session"));
    }
    // 3. Namespaces; nothing mounted from here on reaches the host.
    let root = PathBuf::from(JAIL_ROOT_MOUNT);
    std::fs::create_dir_all(&root).map_err(|e| format!("creating {}: {e}", root.display()))?;
    let mut flags = libc::CLONE_NEWNS | libc::CLONE_NEWIPC;
    if spec.new_network {
        flags |= libc::CLONE_NEWNET;
    }
    // SAFETY: unshare takes plain flags; this process is single-threaded (see the module doc).
    check(unsafe { libc::unshare(flags) }, || "unsharing namespaces".into())?;
    mount(None, Path::new("/"), None, libc::MS_REC | libc::MS_PRIVATE, None)?;

    // 4. The new root.
    mount(
        Some(Path::new("tmpfs")),
        &root,
        Some(c"tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some(c"mode=0755,size=4m"),
    )?;
    bind(&root, Path::new("/usr"), false, false)?;
    for path in ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"] {
        system_path(&root, path)?;
    }
    let basic = ["/dev/null", "/dev/zero", "/dev/random", "/dev/urandom"].map(PathBuf::from);
    for device in basic.iter().chain(&spec.devices) {
        bind(&root, device, true, true)?;
    }
    // Parents before children, so a file inside a shown directory lands on that directory.
    let mut binds = spec.binds.clone();
    binds.sort_by_key(|b| b.path.components().count());
    for b in &binds {
        bind(&root, &b.path, b.writable, false)?;
    }

    // 5. Into it; the host's tree goes.
    let old = root.join(".host");
    std::fs::create_dir(&old).map_err(|e| format!("creating {}: {e}", old.display()))?;
    let (root_c, old_c) = (c_path(&root)?, c_path(&old)?);
    // SAFETY: pivot_root takes two NUL-terminated paths that outlive the call.
    let pivoted = unsafe { libc::syscall(libc::SYS_pivot_root, root_c.as_ptr(), old_c.as_ptr()) };
    if pivoted != 0 {
        return Err(os_error("pivot_root into the jail"));
    }
    std::env::set_current_dir("/").map_err(|e| format!("entering the jail: {e}"))?;
    // SAFETY: umount2 takes a NUL-terminated path and plain flags.
    check(unsafe { libc::umount2(c"/.host".as_ptr(), libc::MNT_DETACH) }, || {
        "detaching the host's file systems".into()
    })?;
    std::fs::remove_dir("/.host").map_err(|e| format!("removing /.host: {e}"))?;
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
        None,
    )?;

    // 6. Descriptors: stdio and the kept ones only.
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC only sets flags on this process's descriptors.
    let marked = unsafe { libc::close_range(3, libc::c_uint::MAX, libc::CLOSE_RANGE_CLOEXEC as libc::c_int) };
    check(marked, || "marking descriptors close-on-exec".into())?;
    for &fd in &spec.keep_fds {
        // SAFETY: fcntl on a descriptor number; an invalid one fails with EBADF, reported.
        check(unsafe { libc::fcntl(fd, libc::F_SETFD, 0) }, || {
            format!("keeping descriptor {fd}")
        })?;
    }

    // 7. Privileges.
    for cap in 0..=last_cap {
        // SAFETY: prctl with plain integers. EINVAL for a capability the kernel does not know is
        // harmless.
        let dropped = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if dropped != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            return Err(os_error(format!("dropping capability {cap} from the bounding set")));
        }
    }
    // SAFETY: setgroups reads `groups.len()` gids from a live slice.
    let grouped = unsafe { libc::setgroups(spec.groups.len(), spec.groups.as_ptr()) };
    check(grouped, || "setting the supplementary groups".into())?;
    // SAFETY: plain integers.
    check(unsafe { libc::setresgid(spec.gid, spec.gid, spec.gid) }, || {
        format!("changing to gid {}", spec.gid)
    })?;
    // SAFETY: plain integers. With every uid non-zero the kernel clears all capabilities.
    check(unsafe { libc::setresuid(spec.uid, spec.uid, spec.uid) }, || {
        format!("changing to uid {}", spec.uid)
    })?;
    // SAFETY: prctl with plain integers.
    let cleared = unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) };
    check(cleared, || "clearing ambient capabilities".into())?;
    // SAFETY: prctl with plain integers.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }, || {
        "setting no_new_privs".into()
    })?;

    // 8. The program.
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    // SAFETY: `program`, every argv string and both null-terminated arrays outlive the call.
    unsafe { libc::execve(program.as_ptr(), argv_ptrs.as_ptr(), envp.as_ptr()) };
    Err(os_error(format!("executing {}", spec.program.display())))
}
