//! PID 1 duties: bring up the guest from the initramfs and switch into the root filesystem.
//!
//! The initramfs holds only `/init` (this binary) and `/modules/` with the kernel modules the
//! guest needs plus `/modules/order`, the load order the host computed from `modules.dep`.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::sys;

const NEW_ROOT: &str = "/newroot";

/// Mounts the pseudo file systems, loads modules, mounts the root disk and switches into it.
pub fn boot() -> Result<()> {
    let _ = fs::create_dir_all("/dev");
    let _ = fs::create_dir_all("/proc");
    let _ = fs::create_dir_all("/sys");
    mount_ignore_busy("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, Some("mode=0755"))?;
    mount_ignore_busy(
        "proc",
        "/proc",
        "proc",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )?;
    mount_ignore_busy(
        "sysfs",
        "/sys",
        "sysfs",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )?;

    let cmdline = fs::read_to_string("/proc/cmdline").unwrap_or_default();
    load_modules(&cmdline)?;

    let root_dev = kernel_arg(&cmdline, "root").unwrap_or("/dev/vda").to_owned();
    let root_fs = kernel_arg(&cmdline, "rootfstype").unwrap_or("ext4").to_owned();
    wait_for(Path::new(&root_dev), Duration::from_secs(30))?;
    fs::create_dir_all(NEW_ROOT)?;
    sys::mount(&root_dev, NEW_ROOT, Some(&root_fs), libc::MS_NOATIME, None)
        .with_context(|| format!("mounting root file system {root_dev} ({root_fs})"))?;

    // Free the initramfs's memory: its files would otherwise stay in RAM under the new root.
    let _ = fs::remove_dir_all("/modules");
    let _ = fs::remove_file("/init");

    for dir in ["/dev", "/proc", "/sys"] {
        let target = format!("{NEW_ROOT}{dir}");
        let _ = fs::create_dir_all(&target);
        sys::mount(dir, &target, None, libc::MS_MOVE, None)
            .with_context(|| format!("moving {dir} into the root file system"))?;
    }
    std::env::set_current_dir(NEW_ROOT)?;
    sys::mount(".", "/", None, libc::MS_MOVE, None).context("moving the root file system to /")?;
    sys::chroot(".").context("chroot into the root file system")?;
    std::env::set_current_dir("/")?;

    for (dir, fstype, flags, data) in [
        (
            "/dev/pts",
            "devpts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
            "gid=5,mode=620,ptmxmode=666",
        ),
        ("/dev/shm", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV, "mode=1777"),
        ("/run", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV, "mode=0755"),
    ] {
        let _ = fs::create_dir_all(dir);
        mount_ignore_busy(fstype, dir, fstype, flags, Some(data))?;
    }
    let _ = fs::remove_file("/dev/ptmx");
    let _ = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx");
    let _ = std::os::unix::fs::symlink("/proc/self/fd", "/dev/fd");
    if let Some(name) = kernel_arg(&cmdline, "viv.hostname") {
        let _ = sys::set_hostname(name);
        let _ = fs::write("/etc/hostname", format!("{name}\n"));
    }
    if let Err(err) = sys::loopback_up() {
        tracing::warn!(error = %err, "cannot bring up the loopback interface");
    }
    if let Some(net) = kernel_arg(&cmdline, "viv.net") {
        if let Err(err) = configure_network(net) {
            tracing::warn!(error = %err, "cannot configure the network card");
        }
    }
    // SAFETY: umask only changes this process's file creation mask.
    unsafe { libc::umask(0o022) };
    Ok(())
}

fn mount_ignore_busy(source: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: Option<&str>) -> Result<()> {
    match sys::mount(source, target, Some(fstype), flags, data) {
        Ok(()) => Ok(()),
        Err(err) if err.raw_os_error() == Some(libc::EBUSY) => Ok(()),
        Err(err) => Err(err).with_context(|| format!("mounting {fstype} on {target}")),
    }
}

/// Loads `/modules/*.ko` in the order `/modules/order` lists them. Module parameters given on
/// the kernel command line as `module.param=value` are passed on, as modprobe would.
fn load_modules(cmdline: &str) -> Result<()> {
    let Ok(order) = fs::read_to_string("/modules/order") else {
        return Ok(());
    };
    for file in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let name = file.trim_end_matches(".ko").replace('-', "_");
        let prefix = format!("{name}.");
        let params: Vec<&str> = cmdline
            .split_whitespace()
            .filter_map(|arg| arg.strip_prefix(&prefix))
            .collect();
        sys::load_module(&Path::new("/modules").join(file), &params.join(" "))
            .with_context(|| format!("loading kernel module {file}"))?;
    }
    Ok(())
}

/// The value of `key=value` on the kernel command line.
fn kernel_arg<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split_whitespace()
        .find_map(|arg| arg.strip_prefix(key).and_then(|rest| rest.strip_prefix('=')))
}

/// Waits until a device node appears.
pub fn wait_for(path: &Path, limit: Duration) -> Result<()> {
    let start = Instant::now();
    while !path.exists() {
        if start.elapsed() > limit {
            bail!("{} did not appear within {limit:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Ends the VM after flushing file systems. The host runs QEMU with `-no-reboot`, so a reboot
/// makes it exit and the host reports the sandbox as failed, with the console log.
pub fn halt() -> ! {
    // SAFETY: sync and reboot take no pointers; reboot only returns if it failed.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Configures the first network card from `viv.net=ADDR/PREFIX,GATEWAY,DNS` and points the
/// resolver at `DNS`.
fn configure_network(spec: &str) -> anyhow::Result<()> {
    let mut parts = spec.split(',');
    let (cidr, gateway, dns) = (parts.next(), parts.next(), parts.next());
    let (Some(cidr), Some(gateway), Some(dns)) = (cidr, gateway, dns) else {
        anyhow::bail!("malformed viv.net={spec}");
    };
    let (addr, prefix) = cidr.split_once('/').context("viv.net needs ADDR/PREFIX")?;
    let card = fs::read_dir("/sys/class/net")?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name != "lo")
        .min()
        .context("no network card in the guest")?;
    let gateway = gateway.parse()?;
    sys::configure_ipv4(&card, addr.parse()?, prefix.parse()?, gateway)
        .with_context(|| format!("configuring {card}"))?;
    crate::data_path::set_gateway(gateway);
    let _ = fs::remove_file("/etc/resolv.conf");
    fs::write("/etc/resolv.conf", format!("nameserver {dns}\n")).context("writing /etc/resolv.conf")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::kernel_arg;

    #[test]
    fn finds_kernel_arguments() {
        let cmdline = "console=ttyS0 root=/dev/vda rootfstype=ext4 viv.hostname=sbx";
        assert_eq!(kernel_arg(cmdline, "root"), Some("/dev/vda"));
        assert_eq!(kernel_arg(cmdline, "rootfstype"), Some("ext4"));
        assert_eq!(kernel_arg(cmdline, "viv.hostname"), Some("sbx"));
        assert_eq!(kernel_arg(cmdline, "missing"), None);
    }
}
