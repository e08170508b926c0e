//! Thin safe wrappers over the Linux system calls the agent needs and `std` does not offer.

use std::ffi::CString;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

fn cstr(text: &str) -> io::Result<CString> {
    CString::new(text).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in argument"))
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `mount(2)`.
pub fn mount(
    source: &str,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = cstr(source)?;
    let target = cstr(target)?;
    let fstype = fstype.map(cstr).transpose()?;
    let data = data.map(cstr).transpose()?;
    // SAFETY: every pointer is either null or points to a NUL-terminated string that outlives
    // the call; mount does not retain them.
    check(unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |s| s.as_ptr()),
            flags,
            data.as_ref().map_or(std::ptr::null(), |s| s.as_ptr().cast()),
        )
    })
}

/// `chroot(2)`.
pub fn chroot(path: &str) -> io::Result<()> {
    let path = cstr(path)?;
    // SAFETY: `path` is a valid NUL-terminated string for the duration of the call.
    check(unsafe { libc::chroot(path.as_ptr()) })
}

/// Loads a kernel module from a file with `finit_module(2)`.
pub fn load_module(file: &Path, params: &str) -> io::Result<()> {
    let module = std::fs::File::open(file)?;
    let params = cstr(params)?;
    // SAFETY: the fd is open for the duration of the call and `params` is NUL-terminated.
    let ret = unsafe { libc::syscall(libc::SYS_finit_module, module.as_raw_fd(), params.as_ptr(), 0) };
    if ret < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EEXIST) {
            return Ok(());
        }
        return Err(err);
    }
    Ok(())
}

/// Brings the loopback interface up, so services in the guest can reach each other (and the
/// host's port forwarding can reach them) without any network device.
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: socket takes plain integers; the descriptor is owned and closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: the ioctls read and write `request`, a live ifreq naming "lo", through a valid
    // socket descriptor.
    let result = unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut request) < 0 {
            -1
        } else {
            request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(fd, libc::SIOCSIFFLAGS, &request)
        }
    };
    let err = io::Error::last_os_error();
    // SAFETY: fd is ours and not used after this.
    unsafe { libc::close(fd) };
    if result < 0 {
        Err(err)
    } else {
        Ok(())
    }
}

/// An IPv4 socket address for the ioctls below.
fn sockaddr_v4(addr: std::net::Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the kernel reads the family to
    // interpret the rest.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// Gives interface `name` the address `addr/prefix`, brings it up and routes everything else
/// through `gateway`.
pub fn configure_ipv4(name: &str, addr: std::net::Ipv4Addr, prefix: u8, gateway: std::net::Ipv4Addr) -> io::Result<()> {
    // SAFETY: socket takes plain integers; the descriptor is owned by `OwnedFd` below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just created and nothing else owns it.
    let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&socket);
    let request = || {
        // SAFETY: ifreq is plain old data; all zeroes is a valid value.
        let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
        for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes().take(libc::IFNAMSIZ - 1)) {
            *slot = byte as libc::c_char;
        }
        request
    };
    let mask = std::net::Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0));
    let mut with_addr = request();
    with_addr.ifr_ifru.ifru_addr = sockaddr_v4(addr);
    let mut with_mask = request();
    with_mask.ifr_ifru.ifru_netmask = sockaddr_v4(mask);
    // SAFETY: reads a live ifreq naming the interface, through a valid socket descriptor.
    check(unsafe { libc::ioctl(fd, libc::SIOCSIFADDR, &with_addr) })?;
    // SAFETY: as above.
    check(unsafe { libc::ioctl(fd, libc::SIOCSIFNETMASK, &with_mask) })?;
    let mut flags = request();
    // SAFETY: writes the interface's flags into a live ifreq.
    check(unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut flags) })?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { flags.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    // SAFETY: reads a live ifreq naming the interface, through a valid socket descriptor.
    check(unsafe { libc::ioctl(fd, libc::SIOCSIFFLAGS, &flags) })?;
    // SAFETY: rtentry is plain old data; all zeroes is a valid value.
    let mut route: libc::rtentry = unsafe { std::mem::zeroed() };
    route.rt_dst = sockaddr_v4(std::net::Ipv4Addr::UNSPECIFIED);
    route.rt_genmask = sockaddr_v4(std::net::Ipv4Addr::UNSPECIFIED);
    route.rt_gateway = sockaddr_v4(gateway);
    route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    // SAFETY: SIOCADDRT reads a live rtentry whose device pointer is null (any interface).
    match check(unsafe { libc::ioctl(fd, libc::SIOCADDRT, &route) }) {
        Err(err) if err.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        other => other,
    }
}

/// `sethostname(2)`.
pub fn set_hostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes, which outlive the call.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })
}

/// Sets the realtime clock to `unix_ms` milliseconds after the epoch.
pub fn set_clock_ms(unix_ms: i64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: unix_ms.div_euclid(1000),
        tv_nsec: unix_ms.rem_euclid(1000) * 1_000_000,
    };
    // SAFETY: `ts` is a valid timespec on the stack.
    check(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) })
}

/// Identity for file-system access checks, switched per thread.
#[derive(Debug, Clone)]
pub struct FsIdentity {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

/// Runs `op` on the current thread with its file-system uid, gid and groups switched to `who`,
/// restoring root's afterwards. Linux keeps these credentials per thread when changed with the raw
/// system calls (glibc's wrappers would change every thread), so this must run on a thread that
/// nothing else uses meanwhile, such as a `spawn_blocking` worker.
pub fn with_fs_identity<T>(who: &FsIdentity, op: impl FnOnce() -> T) -> io::Result<T> {
    if who.uid == 0 {
        return Ok(op());
    }
    // SAFETY: raw syscalls that change this thread's credentials; arguments are plain integers
    // and a pointer/length pair into `who.groups`, which outlives the call.
    unsafe {
        if libc::syscall(libc::SYS_setgroups, who.groups.len(), who.groups.as_ptr()) < 0 {
            return Err(io::Error::last_os_error());
        }
        libc::syscall(libc::SYS_setfsgid, who.gid);
        libc::syscall(libc::SYS_setfsuid, who.uid);
    }
    let out = op();
    // SAFETY: as above; restores root's identity on this thread.
    unsafe {
        libc::syscall(libc::SYS_setfsuid, 0);
        libc::syscall(libc::SYS_setfsgid, 0);
        libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>());
    }
    Ok(out)
}
