//! Control groups for jailed processes: one cgroup per VM under `vivarium/<key>/`, with a
//! memory limit, a CPU quota and weight, a process limit and an I/O weight.
//!
//! Both layouts are served: the unified v2 hierarchy (`/sys/fs/cgroup` with the `memory`
//! controller in `cgroup.controllers`), and the v1 hierarchies of hosts that still mount one per
//! controller (found in `/proc/self/mountinfo`; a host may mount v2 beside them without
//! controllers, as systemd's hybrid layout does). Firecracker's jailer supports both for the same
//! reason.
//!
//! Invariants: a VM's cgroup exists while its VMM may run and is named after the VM, so a server
//! that restarts finds the cgroups of VMs it did not start (or that a crash left) by listing
//! [`CgroupTree::children`]; the memory, CPU and pids limits are set before a process joins
//! (a failure to set one is an error), the I/O weight where the host's I/O scheduler offers one.

use std::path::{Path, PathBuf};

use crate::{io_error, JailError};

/// The cgroup layout of the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// One hierarchy per controller.
    V1,
    /// The unified hierarchy.
    V2,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::V1 => "v1",
            Self::V2 => "v2",
        })
    }
}

/// Limits of one cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Memory the processes may use, in bytes (page cache included).
    pub memory_bytes: u64,
    /// CPU time per period, in hundredths of a CPU (200 = two CPUs' worth).
    pub cpu_percent: u32,
    /// Relative CPU weight (v2 `cpu.weight`: 1 to 10000, 100 is the default).
    pub cpu_weight: u32,
    /// Most processes and threads.
    pub pids: u32,
    /// Relative I/O weight (v2 `io.weight`: 1 to 10000, 100 is the default).
    pub io_weight: u32,
}

/// The scheduling period the CPU quota is expressed in, in microseconds.
const CPU_PERIOD_US: u64 = 100_000;

/// v1 controllers a VM's cgroup is made in (the first is where processes are listed).
const V1_CONTROLLERS: [&str; 4] = ["memory", "cpu", "pids", "blkio"];

/// The cgroups of one server: `vivarium/<key>` in every hierarchy it uses.
#[derive(Debug, Clone)]
pub struct CgroupTree {
    version: Version,
    /// The group's path under each hierarchy's mount point.
    group: PathBuf,
    /// `(controller, mount point)`; for v2 one entry named `unified`.
    mounts: Vec<(String, PathBuf)>,
    /// The v2 controllers each level hands to its children.
    delegated: Vec<String>,
    /// `(controller, directory of the group)`.
    groups: Vec<(String, PathBuf)>,
}
/// Mount points of cgroup file systems: `(fstype, mount point, super options)`.
fn cgroup_mounts() -> Vec<(String, PathBuf, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|line| {
            // "36 35 0:31 / /sys/fs/cgroup/memory rw,... shared:15 - cgroup cgroup rw,memory"
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            let mut right = right.split_whitespace();
            let fstype = right.next()?;
            let _source = right.next()?;
            let options = right.next().unwrap_or_default();
            fstype
                .starts_with("cgroup")
                .then(|| (fstype.to_owned(), PathBuf::from(mount_point), options.to_owned()))
        })
        .collect()
}

fn write(path: &Path, value: &str) -> Result<(), JailError> {
    std::fs::write(path, value).map_err(io_error(format!("writing {value:?} to {}", path.display())))
}

impl CgroupTree {
    /// The cgroup tree `group` (such as `vivarium/ab12cd`) on this host, created if missing;
    /// `None` when the host has no usable memory controller (no cgroup file system, or a
    /// container that hides it).
    pub fn open(group: &str) -> Result<Option<Self>, JailError> {
        let found = cgroup_mounts();
        let unified = found.iter().find(|(fstype, mount, _)| {
            fstype == "cgroup2"
                && std::fs::read_to_string(mount.join("cgroup.controllers"))
                    .is_ok_and(|c| c.split_whitespace().any(|x| x == "memory"))
        });
        let (version, mounts, delegated) = if let Some((_, mount, _)) = unified {
            let available = std::fs::read_to_string(mount.join("cgroup.controllers")).unwrap_or_default();
            let delegated: Vec<String> = ["memory", "cpu", "pids", "io"]
                .into_iter()
                .filter(|c| available.split_whitespace().any(|a| a == *c))
                .map(str::to_owned)
                .collect();
            (Version::V2, vec![("unified".to_owned(), mount.clone())], delegated)
        } else {
            let mut mounts = Vec::new();
            for controller in V1_CONTROLLERS {
                match found
                    .iter()
                    .find(|(fstype, _, options)| fstype == "cgroup" && options.split(',').any(|o| o == controller))
                {
                    Some((_, mount, _)) => mounts.push((controller.to_owned(), mount.clone())),
                    None if controller == "memory" => return Ok(None),
                    None => {}
                }
            }
            (Version::V1, mounts, Vec::new())
        };
        let group = PathBuf::from(group);
        let groups = mounts.iter().map(|(c, m)| (c.clone(), m.join(&group))).collect();
        let tree = Self {
            version,
            group,
            mounts,
            delegated,
            groups,
        };
        tree.ensure()?;
        Ok(Some(tree))
    }

    /// Creates the group's directories where they are missing (and, for v2, hands the
    /// controllers down every level).
    fn ensure(&self) -> Result<(), JailError> {
        for ((_, mount), (_, dir)) in self.mounts.iter().zip(&self.groups) {
            if self.version == Version::V1 {
                make_dir_all(dir)?;
                continue;
            }
            let enable: String = self.delegated.iter().map(|c| format!("+{c} ")).collect();
            let mut level = mount.clone();
            for part in self.group.components() {
                let _ = std::fs::write(level.join("cgroup.subtree_control"), enable.trim_end());
                level.push(part);
                make_dir_all(&level)?;
            }
            write(&dir.join("cgroup.subtree_control"), enable.trim_end())?;
        }
        Ok(())
    }

    /// Removes what servers that are gone left beside this tree (the cgroups of their VMs that
    /// have had no process for `min_age`, then their emptied trees), so that a crashed server
    /// whose data directory was deleted leaves nothing behind for ever.
    pub fn remove_stale_siblings(&self, min_age: std::time::Duration) {
        for (_, dir) in &self.groups {
            let (Some(parent), Some(own)) = (dir.parent(), dir.file_name()) else {
                continue;
            };
            for sibling in std::fs::read_dir(parent).into_iter().flatten().flatten() {
                let path = sibling.path();
                if sibling.file_name() == own || !path.is_dir() {
                    continue;
                }
                for vm in std::fs::read_dir(&path).into_iter().flatten().flatten() {
                    let vm = vm.path();
                    let idle = std::fs::read_to_string(vm.join("cgroup.procs")).is_ok_and(|p| p.trim().is_empty());
                    let old = std::fs::metadata(&vm)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok())
                        .is_some_and(|age| age >= min_age);
                    if vm.is_dir() && idle && old {
                        let _ = std::fs::remove_dir(&vm);
                    }
                }
                // A live server's tree is empty between its VMs: only one idle for `min_age`
                // goes (and a server racing this recreates its tree, see `create`).
                let idle_tree = std::fs::metadata(&path)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age >= min_age);
                if idle_tree {
                    let _ = std::fs::remove_dir(&path);
                }
            }
        }
    }

    /// The host's layout.
    pub fn version(&self) -> Version {
        self.version
    }

    /// The controllers (v1) or `unified` (v2) the tree spans.
    pub fn controllers(&self) -> Vec<String> {
        self.groups.iter().map(|(c, _)| c.clone()).collect()
    }

    /// Creates the cgroup `name` with `limits` (replacing an empty one left behind).
    ///
    /// Another server's sweep of stale trees (`remove_stale_siblings`) may remove this tree's
    /// empty directory at any moment: a cgroup whose parent vanished is made again, a few times.
    pub fn create(&self, name: &str, limits: &Limits) -> Result<Cgroup, JailError> {
        check_name(name)?;
        let cgroup = Cgroup {
            version: self.version,
            dirs: self.groups.iter().map(|(c, d)| (c.clone(), d.join(name))).collect(),
        };
        let mut attempts = 0;
        'again: loop {
            attempts += 1;
            self.ensure()?;
            for (_, dir) in &cgroup.dirs {
                match std::fs::create_dir(dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound && attempts < 5 => continue 'again,
                    Err(e) => {
                        let _ = cgroup.remove();
                        return Err(io_error(format!("creating {}", dir.display()))(e));
                    }
                }
            }
            break;
        }
        if let Err(err) = cgroup.set_limits(limits) {
            let _ = cgroup.remove();
            return Err(err);
        }
        Ok(cgroup)
    }

    /// The existing cgroup `name`, if there is one.
    pub fn get(&self, name: &str) -> Option<Cgroup> {
        check_name(name).ok()?;
        let dirs: Vec<(String, PathBuf)> = self.groups.iter().map(|(c, d)| (c.clone(), d.join(name))).collect();
        dirs.first()?.1.is_dir().then_some(Cgroup {
            version: self.version,
            dirs,
        })
    }

    /// Names of the cgroups in the tree.
    pub fn children(&self) -> Vec<String> {
        let Some((_, dir)) = self.groups.first() else {
            return Vec::new();
        };
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// Removes the tree's own directories when no cgroup is left in them (and their parent,
    /// `vivarium`, when it is empty too).
    pub fn remove_if_empty(&self) {
        for (_, dir) in &self.groups {
            if std::fs::remove_dir(dir).is_ok() {
                if let Some(parent) = dir.parent() {
                    let _ = std::fs::remove_dir(parent);
                }
            }
        }
    }
}

/// `create_dir_all` that accepts a directory another process makes or removes meanwhile (the
/// standard one reports `AlreadyExists` when the directory vanishes between its two checks).
fn make_dir_all(dir: &Path) -> Result<(), JailError> {
    match std::fs::create_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            Err(io_error(format!("creating {}", dir.display()))(e))
        }
        _ => Ok(()),
    }
}

fn check_name(name: &str) -> Result<(), JailError> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(JailError::Config(format!("invalid cgroup name {name:?}")))
    }
}

/// One VM's cgroup.
#[derive(Debug, Clone)]
pub struct Cgroup {
    version: Version,
    dirs: Vec<(String, PathBuf)>,
}

impl Cgroup {
    fn dir(&self, controller: &str) -> Option<&Path> {
        match self.version {
            Version::V2 => self.dirs.first().map(|(_, d)| d.as_path()),
            Version::V1 => self
                .dirs
                .iter()
                .find(|(c, _)| c == controller)
                .map(|(_, d)| d.as_path()),
        }
    }

    fn file(&self, controller: &str, name: &str) -> Option<PathBuf> {
        self.dir(controller).map(|d| d.join(name)).filter(|p| p.exists())
    }

    fn set_limits(&self, limits: &Limits) -> Result<(), JailError> {
        let quota = CPU_PERIOD_US * u64::from(limits.cpu_percent.max(1)) / 100;
        let required = |controller: &str, name: &str| {
            self.file(controller, name).ok_or_else(|| {
                JailError::Config(format!(
                    "the {} cgroup controller has no {name} (cgroup {})",
                    controller, self.version
                ))
            })
        };
        match self.version {
            Version::V2 => {
                write(&required("memory", "memory.max")?, &limits.memory_bytes.to_string())?;
                if let Some(swap) = self.file("memory", "memory.swap.max") {
                    write(&swap, "0")?;
                }
                write(&required("cpu", "cpu.max")?, &format!("{quota} {CPU_PERIOD_US}"))?;
                write(
                    &required("cpu", "cpu.weight")?,
                    &limits.cpu_weight.clamp(1, 10_000).to_string(),
                )?;
                write(&required("pids", "pids.max")?, &limits.pids.to_string())?;
                if let Some(io) = self.file("io", "io.weight") {
                    if let Err(err) = write(&io, &format!("default {}", limits.io_weight.clamp(1, 10_000))) {
                        tracing::debug!(error = %err, "no I/O weight (the disk's scheduler has none)");
                    }
                }
            }
            Version::V1 => {
                write(
                    &required("memory", "memory.limit_in_bytes")?,
                    &limits.memory_bytes.to_string(),
                )?;
                if let Some(swap) = self.file("memory", "memory.memsw.limit_in_bytes") {
                    write(&swap, &limits.memory_bytes.to_string())?;
                }
                if let Some(swappiness) = self.file("memory", "memory.swappiness") {
                    let _ = write(&swappiness, "0");
                }
                write(&required("cpu", "cpu.cfs_period_us")?, &CPU_PERIOD_US.to_string())?;
                write(&required("cpu", "cpu.cfs_quota_us")?, &quota.to_string())?;
                // v2's weight 100 is v1's 1024 shares.
                let shares = (u64::from(limits.cpu_weight.clamp(1, 10_000)) * 1024 / 100).max(2);
                write(&required("cpu", "cpu.shares")?, &shares.to_string())?;
                write(&required("pids", "pids.max")?, &limits.pids.to_string())?;
                // v1 weights run from 10 to 1000, 500 by default.
                let weight = (limits.io_weight.clamp(1, 10_000) * 5).clamp(10, 1000).to_string();
                let io = self
                    .file("blkio", "blkio.weight")
                    .or_else(|| self.file("blkio", "blkio.bfq.weight"));
                if let Some(io) = io {
                    if let Err(err) = write(&io, &weight) {
                        tracing::debug!(error = %err, "no I/O weight (the disk's scheduler has none)");
                    }
                }
            }
        }
        Ok(())
    }

    /// The host's layout.
    pub fn version(&self) -> Version {
        self.version
    }

    /// The `cgroup.procs` files a process writes its pid to in order to join (one per v1
    /// hierarchy).
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|(_, d)| d.join("cgroup.procs")).collect()
    }

    /// The directories of the cgroup (one per v1 hierarchy).
    pub fn paths(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|(_, d)| d.clone()).collect()
    }

    /// The processes in it.
    pub fn processes(&self) -> Vec<u32> {
        let Some((_, dir)) = self.dirs.first() else {
            return Vec::new();
        };
        std::fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Sends SIGKILL to every process in it.
    pub fn kill_all(&self) {
        if let Some(kill) = self.file("unified", "cgroup.kill") {
            if std::fs::write(kill, "1").is_ok() {
                return;
            }
        }
        for pid in self.processes() {
            // SAFETY: kill with plain integers; the pids were read from this cgroup.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }

    /// Removes it; waits up to two seconds for exiting processes to leave it.
    pub fn remove(&self) -> Result<(), JailError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        for (_, dir) in &self.dirs {
            loop {
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) if std::time::Instant::now() < deadline => {
                        let _ = e;
                        std::thread::sleep(std::time::Duration::from_millis(10));
                    }
                    Err(e) => return Err(io_error(format!("removing {}", dir.display()))(e)),
                }
            }
        }
        Ok(())
    }

    /// How many times the kernel's OOM killer killed a process of this cgroup.
    pub fn oom_kills(&self) -> u64 {
        let (file, key) = match self.version {
            Version::V2 => ("memory.events", "oom_kill"),
            Version::V1 => ("memory.oom_control", "oom_kill"),
        };
        self.file("memory", file)
            .and_then(|f| std::fs::read_to_string(f).ok())
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix(key).and_then(|v| v.trim().parse().ok()))
            })
            .unwrap_or(0)
    }

    /// The most memory it has used, in bytes, when the kernel tracks it.
    pub fn memory_peak(&self) -> Option<u64> {
        let file = match self.version {
            Version::V2 => "memory.peak",
            Version::V1 => "memory.max_usage_in_bytes",
        };
        std::fs::read_to_string(self.file("memory", file)?)
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The memory it uses now, in bytes.
    pub fn memory_current(&self) -> Option<u64> {
        let file = match self.version {
            Version::V2 => "memory.current",
            Version::V1 => "memory.usage_in_bytes",
        };
        std::fs::read_to_string(self.file("memory", file)?)
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 64 MiB, half a CPU, 16 processes.
    fn test_limits() -> Limits {
        Limits {
            memory_bytes: 64 << 20,
            cpu_percent: 50,
            cpu_weight: 100,
            pids: 16,
            io_weight: 100,
        }
    }

    fn root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn a_cgroup_gets_its_limits_holds_a_process_and_is_removed() {
        if !root() {
            eprintln!("skipped: needs root");
            return;
        }
        let group = format!("vivarium-test/{}", std::process::id());
        let Some(tree) = CgroupTree::open(&group).unwrap() else {
            eprintln!("skipped: no memory controller on this host");
            return;
        };
        let limits = test_limits();
        let cgroup = tree.create("vm-1", &limits).unwrap();
        assert_eq!(tree.children(), vec!["vm-1".to_owned()]);
        let read = |controller: &str, name: &str| {
            std::fs::read_to_string(cgroup.file(controller, name).unwrap())
                .unwrap()
                .trim()
                .to_owned()
        };
        match cgroup.version() {
            Version::V2 => {
                assert_eq!(read("memory", "memory.max"), (64u64 << 20).to_string());
                assert_eq!(read("cpu", "cpu.max"), "50000 100000");
                assert_eq!(read("pids", "pids.max"), "16");
            }
            Version::V1 => {
                assert_eq!(read("memory", "memory.limit_in_bytes"), (64u64 << 20).to_string());
                assert_eq!(read("cpu", "cpu.cfs_quota_us"), "50000");
                assert_eq!(read("pids", "pids.max"), "16");
            }
        }
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        for procs in cgroup.procs_files() {
            std::fs::write(procs, child.id().to_string()).unwrap();
        }
        assert_eq!(cgroup.processes(), vec![child.id()]);
        cgroup.kill_all();
        child.wait().unwrap();
        cgroup.remove().unwrap();
        assert!(tree.get("vm-1").is_none());
        tree.remove_if_empty();
        assert!(tree.children().is_empty());
    }

    /// Another server's sweep leaves a live server's tree alone even when it holds no VM, and a
    /// tree removed under a server anyway is made again when that server creates a cgroup.
    #[test]
    fn a_sweep_spares_a_fresh_empty_tree_and_a_removed_tree_comes_back() {
        if !root() {
            eprintln!("skipped: needs root");
            return;
        }
        let base = format!("vivarium-sweep-test-{}", std::process::id());
        let (Some(live), Some(sweeper)) = (
            CgroupTree::open(&format!("{base}/live")).unwrap(),
            CgroupTree::open(&format!("{base}/sweeper")).unwrap(),
        ) else {
            eprintln!("skipped: no memory controller on this host");
            return;
        };
        sweeper.remove_stale_siblings(std::time::Duration::from_secs(600));
        assert!(
            live.groups.iter().all(|(_, dir)| dir.is_dir()),
            "a fresh empty tree was swept"
        );
        sweeper.remove_stale_siblings(std::time::Duration::ZERO);
        assert!(live.groups.iter().all(|(_, dir)| !dir.exists()), "an idle tree stays");
        let limits = test_limits();
        let cgroup = live.create("vm-1", &limits).unwrap();
        assert!(cgroup.paths().iter().all(|p| p.is_dir()));
        cgroup.remove().unwrap();
        live.remove_if_empty();
        sweeper.remove_if_empty();
        for (_, dir) in &live.groups {
            let _ = std::fs::remove_dir(dir.parent().unwrap());
        }
    }
}
