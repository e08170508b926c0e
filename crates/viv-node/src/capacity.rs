//! What the host can give sandboxes: the largest VM shape it can ever run (a create asking for
//! more is a 400, and the served OpenAPI document states these maxima) and whether it has room
//! for one more VM now (a 429 when it has not, instead of a VM that fails to start or a guest
//! that exhausts the host's memory later).
//!
//! Guest memory is mapped from files and copied on write, so a new VM costs far less than its
//! size at first; admission still asks for the whole size to be available, since a guest may
//! touch all of it.

use crate::error::ApiError;

/// Memory the host keeps for itself, its page cache and QEMU's own overhead, in MiB: guests
/// never get the last `max(1 GiB, 1/8 of RAM)` of it.
fn host_reserve_mib(total_mib: u64) -> u64 {
    (total_mib / 8).max(1024)
}

/// Free memory a new VM must leave to the host, in MiB.
const ROOM_RESERVE_MIB: u64 = 256;

/// The largest VM this host can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLimits {
    /// vCPUs: the CPUs this process may run on (more vCPUs than host CPUs only thrash; under
    /// TCG the guest kernel's watchdogs then panic it).
    pub max_vcpus: u32,
    /// Guest memory in MiB: the host's RAM less its reserve, and no more than the tmpfs that
    /// holds guest memory files.
    pub max_memory_mib: u32,
}

impl HostLimits {
    /// The limits of this host, detected once.
    pub fn host() -> Self {
        static LIMITS: std::sync::OnceLock<HostLimits> = std::sync::OnceLock::new();
        *LIMITS.get_or_init(Self::detect)
    }

    /// The limits of this host.
    pub fn detect() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Self::from_facts(cpus, &meminfo, shm_size_mib())
    }

    /// The limits for `cpus` CPUs, `/proc/meminfo` text and a tmpfs of `shm_mib` MiB.
    pub fn from_facts(cpus: usize, meminfo: &str, shm_mib: Option<u64>) -> Self {
        let total = meminfo_mib(meminfo, "MemTotal").unwrap_or(0);
        let mut memory = total.saturating_sub(host_reserve_mib(total));
        if let Some(shm) = shm_mib {
            memory = memory.min(shm);
        }
        Self {
            max_vcpus: (cpus as u32).clamp(1, viv_api::MAX_VCPUS),
            max_memory_mib: (memory as u32).clamp(viv_api::MIN_MEMORY_MIB, viv_api::MAX_MEMORY_MIB),
        }
    }

    /// Checks a VM shape a client asked for: 400 with what this host allows.
    pub fn check_shape(&self, vcpus: u32, memory_mib: u32) -> Result<(), ApiError> {
        if !(1..=self.max_vcpus).contains(&vcpus) {
            return Err(ApiError::BadRequest(format!(
                "cpuCount must be between 1 and {} (the CPUs of this host), got {vcpus}",
                self.max_vcpus
            )));
        }
        if !(viv_api::MIN_MEMORY_MIB..=self.max_memory_mib).contains(&memory_mib) {
            return Err(ApiError::BadRequest(format!(
                "memoryMB must be between {} and {} (what this host can give one sandbox), got {memory_mib}",
                viv_api::MIN_MEMORY_MIB,
                self.max_memory_mib
            )));
        }
        Ok(())
    }
}

/// Bytes of tmpfs that template snapshots' memory files may take together: an eighth of the
/// host's RAM, at least 1 GiB, unless `VIV_TEMPLATE_MEMORY_MIB` sets it.
pub fn template_memory_budget() -> u64 {
    if let Some(mib) = std::env::var("VIV_TEMPLATE_MEMORY_MIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        return mib << 20;
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let total_mib = meminfo_mib(&meminfo, "MemTotal").unwrap_or(0);
    (total_mib / 8).max(1024) << 20
}

/// Whether the host has room for a VM of `memory_mib` now: 429 naming what is free when not.
pub fn check_room(memory_mib: u32) -> Result<(), ApiError> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    room_in(&meminfo, memory_mib)
}

/// [`check_room`] on `/proc/meminfo` text (a host without `MemAvailable` is not checked).
pub fn room_in(meminfo: &str, memory_mib: u32) -> Result<(), ApiError> {
    let Some(available) = meminfo_mib(meminfo, "MemAvailable") else {
        return Ok(());
    };
    if u64::from(memory_mib) + ROOM_RESERVE_MIB > available {
        return Err(ApiError::NoRoom(format!(
            "the host has {available} MiB of memory available now, not enough for a VM of {memory_mib} MiB \
             and the {ROOM_RESERVE_MIB} MiB it keeps free; kill or pause sandboxes, ask for less memoryMB, or retry later"
        )));
    }
    Ok(())
}

/// A `/proc/meminfo` field in MiB.
fn meminfo_mib(meminfo: &str, field: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        let kib: u64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kib / 1024)
    })
}

/// Size of the tmpfs that holds guest memory files, in MiB.
fn shm_size_mib() -> Option<u64> {
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a NUL-terminated literal and `stat` a live, writable struct.
    if unsafe { libc::statvfs(c"/dev/shm".as_ptr(), &mut stat) } != 0 {
        return None;
    }
    Some((stat.f_blocks as u64 * stat.f_frsize as u64) >> 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:       24576000 kB\nMemFree:        20000000 kB\nMemAvailable:   2097152 kB\n";

    #[test]
    fn limits_leave_the_host_its_reserve_and_follow_the_cpus() {
        let limits = HostLimits::from_facts(2, MEMINFO, None);
        assert_eq!(limits.max_vcpus, 2);
        // 24000 MiB less an eighth.
        assert_eq!(limits.max_memory_mib, 21000);
        assert_eq!(HostLimits::from_facts(2, MEMINFO, Some(4096)).max_memory_mib, 4096);
        // A small host keeps 1 GiB, and a sandbox can still have the minimum.
        let small = HostLimits::from_facts(1, "MemTotal: 1048576 kB\n", None);
        assert_eq!(small.max_memory_mib, viv_api::MIN_MEMORY_MIB);
        let huge = HostLimits::from_facts(512, "MemTotal: 1073741824 kB\n", None);
        assert_eq!(
            (huge.max_vcpus, huge.max_memory_mib),
            (viv_api::MAX_VCPUS, viv_api::MAX_MEMORY_MIB)
        );
    }

    #[test]
    fn shapes_beyond_the_host_are_bad_requests_that_say_the_limit() {
        let limits = HostLimits::from_facts(2, MEMINFO, None);
        assert!(limits.check_shape(2, 21000).is_ok());
        let err = limits.check_shape(64, 256).unwrap_err();
        assert_eq!(err.status(), 400);
        assert!(err.to_string().contains("between 1 and 2"), "{err}");
        let err = limits.check_shape(1, 65535).unwrap_err();
        assert!(err.to_string().contains("between 128 and 21000"), "{err}");
        assert!(limits.check_shape(0, 256).is_err());
        assert!(limits.check_shape(1, 127).is_err());
    }

    #[test]
    fn no_room_is_a_429_that_says_what_is_free() {
        assert!(room_in(MEMINFO, 1024).is_ok());
        let err = room_in(MEMINFO, 2000).unwrap_err();
        assert_eq!(err.status(), 429);
        assert!(err.to_string().contains("2048 MiB of memory available"), "{err}");
        assert!(
            room_in("MemTotal: 1 kB\n", 60000).is_ok(),
            "no MemAvailable: not checked"
        );
    }
}
