//! A machine's resource controls: which host CPUs it may run on, its CPU quota and weight, its
//! scheduling priority and its disks' I/O limits.
//!
//! How each is enforced:
//! - **CPU pinning** ([`MachineResources::host_cpus`]): the QEMU process's CPU affinity is set
//!   before it executes (`sched_setaffinity` in the child), so every thread QEMU ever creates
//!   inherits it. QEMU's seccomp filter (`resourcecontrol=deny`, always on when confined) refuses
//!   `sched_setaffinity`, so a subverted QEMU cannot widen it. This works with or without a
//!   cgroup, and on hosts whose cgroups are v1 without a delegated `cpuset` (as this project's
//!   CI host) as well as on v2.
//! - **CPU quota and weight** ([`MachineResources::cpu_percent`], [`MachineResources::cpu_weight`]):
//!   the jail's cgroup (`cpu.max`/`cpu.weight` on v2, `cpu.cfs_quota_us`/`cpu.shares` on v1),
//!   through [`super::machine_limits`]. Without a jail there is no cgroup, and they are not
//!   enforced.
//! - **Memory**: the cgroup's memory limit is the guest's memory plus QEMU's overhead.
//! - **Priority** ([`MachineResources::nice`]): the nice value of the QEMU process (set before it
//!   executes; the seccomp filter refuses `setpriority`). It orders the machine against every
//!   process of the host, where the cgroup weight orders it against other cgroups (other VMs).
//! - **Disk I/O** ([`MachineResources::disk_io`]): a QEMU throttle group per limited disk
//!   (`-object throttle-group,id=io-ID`) and a `throttle` filter node `io-ID` above the disk's
//!   format node, which keeps its name `disk-ID`; the device is attached to the filter, and an
//!   online resize addresses the filter (which passes it down), since only the parents of the
//!   resized node hear of the new size. QEMU's `query-block` shows no limits for such a disk
//!   (its `iops`/`bps` fields are those of the legacy per-drive throttling): the group's
//!   `limits` (`qom-get`) do, see `Machine::io_limits`.

use std::collections::BTreeMap;

/// Resource controls of a machine; the default sets none (the cgroup gets the machine's vCPUs'
/// worth of CPU at the default weight).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MachineResources {
    /// Host CPUs (numbers as in `/sys/devices/system/cpu/online`) QEMU may run on; `None` for
    /// all.
    pub host_cpus: Option<Vec<u32>>,
    /// CPU time in hundredths of a host CPU (150 = one and a half CPUs); `None` for the
    /// machine's vCPUs' worth (100 per vCPU). Enforced by the jail's cgroup.
    pub cpu_percent: Option<u32>,
    /// Relative CPU weight against other VMs (1 to 10000, 100 by default). Enforced by the
    /// jail's cgroup.
    pub cpu_weight: Option<u32>,
    /// The nice value of the QEMU process (-20, most favoured, to 19); `None` keeps the
    /// server's.
    pub nice: Option<i32>,
    /// Disk id → its I/O limits.
    pub disk_io: BTreeMap<String, IoLimits>,
}

/// I/O limits of one disk (reads and writes together); `None` for no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoLimits {
    /// Operations per second.
    pub iops: Option<u64>,
    /// Bytes per second.
    pub bps: Option<u64>,
}

impl IoLimits {
    /// Whether it limits anything.
    pub fn is_limited(&self) -> bool {
        self.iops.is_some() || self.bps.is_some()
    }
}

/// The throttle group and filter node of disk `id`.
pub(crate) fn throttle_node(id: &str) -> String {
    format!("io-{id}")
}

/// Parses a kernel CPU list (`0-3,5`).
pub fn parse_cpu_list(text: &str) -> Option<Vec<u32>> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                if a > b || b - a > 4096 {
                    return None;
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse().ok()?),
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    Some(cpus)
}

/// The host's online CPUs.
pub fn online_cpus() -> Option<Vec<u32>> {
    parse_cpu_list(&std::fs::read_to_string("/sys/devices/system/cpu/online").ok()?)
}

impl MachineResources {
    /// Checks the controls against the machine's disks and the host's CPUs.
    pub(crate) fn validate(&self, disk_ids: &[&str]) -> Result<(), String> {
        if let Some(cpus) = &self.host_cpus {
            if cpus.is_empty() {
                return Err("the list of host CPUs to pin to is empty".into());
            }
            if let Some(online) = online_cpus() {
                if let Some(cpu) = cpus.iter().find(|c| !online.contains(c)) {
                    return Err(format!(
                        "host CPU {cpu} is not online (online: {})",
                        online.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
                    ));
                }
            }
            if cpus.iter().any(|&c| c as usize >= libc::CPU_SETSIZE as usize) {
                return Err(format!("host CPU numbers must be below {}", libc::CPU_SETSIZE));
            }
        }
        if let Some(percent) = self.cpu_percent {
            if !(1..=100_000).contains(&percent) {
                return Err(format!("a CPU quota of {percent}% is out of range (1 to 100000)"));
            }
        }
        if let Some(weight) = self.cpu_weight {
            if !(1..=10_000).contains(&weight) {
                return Err(format!("CPU weight {weight} is out of range (1 to 10000)"));
            }
        }
        if let Some(nice) = self.nice {
            if !(-20..=19).contains(&nice) {
                return Err(format!("nice value {nice} is out of range (-20 to 19)"));
            }
        }
        for (disk, limits) in &self.disk_io {
            if !disk_ids.contains(&disk.as_str()) {
                return Err(format!("I/O limits for {disk:?}, which is not a disk of the machine"));
            }
            if limits.iops == Some(0) || limits.bps == Some(0) {
                return Err(format!(
                    "disk {disk:?}: an I/O limit of 0 would stop it; leave it unset"
                ));
            }
        }
        Ok(())
    }

    /// The `-object throttle-group` argument of a disk's limits.
    pub(crate) fn throttle_group(id: &str, limits: &IoLimits) -> String {
        let mut object = format!("throttle-group,id={}", throttle_node(id));
        if let Some(iops) = limits.iops {
            object.push_str(&format!(",x-iops-total={iops}"));
        }
        if let Some(bps) = limits.bps {
            object.push_str(&format!(",x-bps-total={bps}"));
        }
        object
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_as_the_kernel_writes_them() {
        assert_eq!(parse_cpu_list("0-3,5\n"), Some(vec![0, 1, 2, 3, 5]));
        assert_eq!(parse_cpu_list("1"), Some(vec![1]));
        assert_eq!(parse_cpu_list("3,1,1"), Some(vec![1, 3]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
    }

    #[test]
    fn out_of_range_controls_are_refused_with_the_reason() {
        let refused = |r: MachineResources, words: &str| {
            let err = r.validate(&["vda"]).expect_err(words);
            assert!(err.contains(words), "{err:?} does not say {words:?}");
        };
        refused(
            MachineResources {
                host_cpus: Some(vec![]),
                ..Default::default()
            },
            "empty",
        );
        refused(
            MachineResources {
                host_cpus: Some(vec![100_000]),
                ..Default::default()
            },
            "100000",
        );
        refused(
            MachineResources {
                cpu_weight: Some(0),
                ..Default::default()
            },
            "CPU weight 0",
        );
        refused(
            MachineResources {
                nice: Some(20),
                ..Default::default()
            },
            "nice value 20",
        );
        refused(
            MachineResources {
                cpu_percent: Some(0),
                ..Default::default()
            },
            "CPU quota of 0%",
        );
        let io = |disk: &str, iops| MachineResources {
            disk_io: [(disk.to_owned(), IoLimits { iops, bps: None })].into(),
            ..Default::default()
        };
        refused(io("vdb", Some(10)), "not a disk");
        refused(io("vda", Some(0)), "would stop it");
        io("vda", Some(10)).validate(&["vda"]).unwrap();
        assert_eq!(
            MachineResources::throttle_group(
                "vda",
                &IoLimits {
                    iops: Some(50),
                    bps: Some(1 << 20)
                }
            ),
            "throttle-group,id=io-vda,x-iops-total=50,x-bps-total=1048576"
        );
    }
}
