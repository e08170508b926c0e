//! The CPU weight of a warm VM while it waits in the pool: low, so that warming a replacement
//! (a restore, the agent's `/init` and the warm-up commands, all CPU-bound under TCG) yields to
//! the sandboxes that run, above all the one just created from the pool, whose first commands
//! are what a client waits for. The weight the VM's cgroup had is put back when a create takes
//! it.
//!
//! The weight is that of the cgroup the VMM process runs in (the jail's cgroup per VM: v2
//! `cpu.weight`, v1 `cpu.shares`), found through `/proc/PID/cgroup` and the host's mount table;
//! a VMM in no cgroup of its own (no jail) is left alone. Best effort: a failure only costs
//! latency, never a VM.

use std::path::PathBuf;

/// v2 weight (v1 shares are this × 1024 / 100) of a VM waiting in the pool.
const WAITING_WEIGHT_V2: u32 = 5;

/// A cgroup CPU weight file and the value it had.
#[derive(Debug, Clone)]
pub(super) struct SavedWeight {
    file: PathBuf,
    value: String,
}

impl SavedWeight {
    /// Puts the saved weight back.
    pub(super) fn restore(&self) {
        if let Err(err) = std::fs::write(&self.file, &self.value) {
            tracing::debug!(file = %self.file.display(), error = %err, "restoring a pooled VM's CPU weight");
        }
    }
}

/// Lowers the CPU weight of the cgroup of process `pid`; returns what to restore.
pub(super) fn lower(pid: u32) -> Option<SavedWeight> {
    let file = weight_file(pid)?;
    let value = std::fs::read_to_string(&file).ok()?.trim().to_owned();
    let low = if file.ends_with("cpu.shares") {
        (WAITING_WEIGHT_V2 * 1024 / 100).max(2)
    } else {
        WAITING_WEIGHT_V2
    };
    match std::fs::write(&file, low.to_string()) {
        Ok(()) => Some(SavedWeight { file, value }),
        Err(err) => {
            tracing::debug!(file = %file.display(), error = %err, "lowering a pooled VM's CPU weight");
            None
        }
    }
}

/// The weight file of `pid`'s own cgroup, if it is in one below the root.
fn weight_file(pid: u32) -> Option<PathBuf> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    weight_file_in(&cgroups, &mountinfo)
}

/// [`weight_file`] from the texts of `/proc/PID/cgroup` and `/proc/self/mountinfo`.
fn weight_file_in(cgroups: &str, mountinfo: &str) -> Option<PathBuf> {
    // v1: a line `N:CONTROLLERS:/path` whose controllers include `cpu`.
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if controllers.split(',').any(|c| c == "cpu") && path != "/" {
            let mount = mount_point(mountinfo, |fstype, options| {
                fstype == "cgroup" && options.split(',').any(|o| o == "cpu")
            })?;
            return Some(mount.join(path.trim_start_matches('/')).join("cpu.shares"));
        }
    }
    // v2: the line `0::/path`.
    let path = cgroups.lines().find_map(|l| l.strip_prefix("0::"))?;
    if path == "/" {
        return None;
    }
    let mount = mount_point(mountinfo, |fstype, _| fstype == "cgroup2")?;
    let file = mount.join(path.trim_start_matches('/')).join("cpu.weight");
    file.exists().then_some(file)
}

/// The mount point of the first mount whose file system type and super options fit.
fn mount_point(mountinfo: &str, fits: impl Fn(&str, &str) -> bool) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mount = left.split_whitespace().nth(4)?;
        let mut right = right.split_whitespace();
        let fstype = right.next()?;
        let _source = right.next()?;
        let options = right.next().unwrap_or_default();
        fits(fstype, options).then(|| PathBuf::from(mount))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTS_V1: &str = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
        32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
        33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct\n";

    #[test]
    fn a_v1_vm_cgroup_has_its_shares_file_under_the_cpu_mount() {
        let cgroups = "8:pids:/vivarium/k/vm1\n2:cpuacct:/\n1:cpu:/vivarium/k/vm1\n0::/\n";
        assert_eq!(
            weight_file_in(cgroups, MOUNTS_V1),
            Some(PathBuf::from("/sys/fs/cgroup/cpu/vivarium/k/vm1/cpu.shares"))
        );
    }

    #[test]
    fn a_process_in_the_root_cgroup_is_left_alone() {
        assert_eq!(weight_file_in("1:cpu:/\n0::/\n", MOUNTS_V1), None);
    }
}
