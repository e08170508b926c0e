//! Per-VM series of `GET /metrics`, gathered when it is scraped: every VM's state, and for each
//! VM whose QEMU runs its CPU time and resident memory (from `/proc/PID`) and its devices' I/O
//! counters (QMP `query-blockstats`).
//!
//! Invariants:
//! - a scrape never waits on a VM for more than [`VM_STATS_TIMEOUT`]: the VMs are read at once,
//!   each bounded, and a VM that did not answer in time reports `vivarium_vm_stats_up 0`
//!   (and none of its series) instead of holding the scrape;
//! - series of a VM exist only while it is in the live map, i.e. while its QEMU may run, so a
//!   stopped VM's series disappear; its `vivarium_vm_state` stays, 1 for its current state;
//! - label values are escaped as the text format requires.
//!
//! Network counters are not reported: NICs are QEMU's user-mode stack inside an empty network
//! namespace, which no host interface sees, and QMP has no per-NIC counters (QEMU's
//! `query-stats` has KVM and cryptodev providers only).

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use viv_api::vms::VmState;
use viv_vmm::machine::BlockStats;

use super::vm_runtime::LiveVm;
use super::Manager;

/// Longest wait for one VM's statistics during a scrape.
pub(crate) const VM_STATS_TIMEOUT: Duration = Duration::from_secs(2);

const STATES: [VmState; 7] = [
    VmState::Defined,
    VmState::Starting,
    VmState::Running,
    VmState::Paused,
    VmState::Stopping,
    VmState::Stopped,
    VmState::Crashed,
];

/// A drive counter family: its name, help and value.
type DiskFamily = (&'static str, &'static str, fn(&BlockStats) -> u64);

/// What one running VM reported.
struct VmSample {
    cpu_seconds: f64,
    rss_bytes: u64,
    disks: Vec<BlockStats>,
}

impl Manager {
    /// The per-VM series in the Prometheus text format (empty without VMs).
    pub async fn render_vm_metrics(&self) -> String {
        let rows = match self.store.local_vms() {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "listing VMs for /metrics failed");
                return String::new();
            }
        };
        if rows.is_empty() {
            return String::new();
        }
        let live: Vec<(String, String, Arc<LiveVm>)> = rows
            .iter()
            .filter_map(|r| self.vm_runtime.get(&r.id).map(|l| (r.id.clone(), r.name.clone(), l)))
            .collect();
        let samples =
            futures::future::join_all(live.iter().map(|(_, _, vm)| async move {
                tokio::time::timeout(VM_STATS_TIMEOUT, sample(vm)).await.ok().flatten()
            }))
            .await;

        let labels = |id: &str, vm_name: &str| format!("vm=\"{}\",name=\"{}\"", escape(id), escape(vm_name));
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str, samples: Vec<(String, String)>| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{{{labels}}} {value}");
            }
        };
        family(
            "vivarium_vm_state",
            "gauge",
            "1 for the state each VM is in, 0 for the others.",
            rows.iter()
                .flat_map(|row| {
                    STATES.iter().map(move |state| {
                        (
                            format!("{},state=\"{}\"", labels(&row.id, &row.name), state.as_str()),
                            u8::from(row.state == state.as_str()).to_string(),
                        )
                    })
                })
                .collect(),
        );
        family(
            "vivarium_vm_stats_up",
            "gauge",
            "1 when a running VM's QEMU reported its statistics within the scrape's time limit.",
            live.iter()
                .zip(&samples)
                .map(|((id, vm_name, _), sample)| (labels(id, vm_name), u8::from(sample.is_some()).to_string()))
                .collect(),
        );
        let answered: Vec<(String, &VmSample)> = live
            .iter()
            .zip(&samples)
            .filter_map(|((id, vm_name, _), sample)| Some((labels(id, vm_name), sample.as_ref()?)))
            .collect();
        family(
            "vivarium_vm_cpu_seconds_total",
            "counter",
            "CPU time of a running VM's QEMU process (all its threads, user and system).",
            answered
                .iter()
                .map(|(l, s)| (l.clone(), s.cpu_seconds.to_string()))
                .collect(),
        );
        family(
            "vivarium_vm_memory_rss_bytes",
            "gauge",
            "Resident memory of a running VM's QEMU process.",
            answered
                .iter()
                .map(|(l, s)| (l.clone(), s.rss_bytes.to_string()))
                .collect(),
        );
        let disk_families: [DiskFamily; 4] = [
            (
                "vivarium_vm_disk_read_bytes_total",
                "Bytes a running VM read from a drive.",
                |d| d.read_bytes,
            ),
            (
                "vivarium_vm_disk_written_bytes_total",
                "Bytes a running VM wrote to a drive.",
                |d| d.write_bytes,
            ),
            (
                "vivarium_vm_disk_reads_total",
                "Read operations of a running VM on a drive.",
                |d| d.read_ops,
            ),
            (
                "vivarium_vm_disk_writes_total",
                "Write operations of a running VM on a drive.",
                |d| d.write_ops,
            ),
        ];
        for (name, help, value) in disk_families {
            let samples = answered
                .iter()
                .flat_map(|(l, s)| {
                    s.disks
                        .iter()
                        .map(move |d| (format!("{l},disk=\"{}\"", escape(&d.device)), value(d).to_string()))
                })
                .collect();
            family(name, "counter", help, samples);
        }
        out
    }
}

/// A running VM's CPU time, resident memory and block counters; none when its QEMU is gone.
async fn sample(vm: &LiveVm) -> Option<VmSample> {
    let pid = vm.machine.identity().pid;
    let (cpu_seconds, rss_bytes) = process_usage(pid)?;
    let disks = vm.machine.block_stats().await.ok()?;
    Some(VmSample {
        cpu_seconds,
        rss_bytes,
        disks,
    })
}

/// CPU seconds (`utime + stime` of `/proc/PID/stat`) and resident bytes (`VmRSS` of
/// `/proc/PID/status`) of process `pid`.
fn process_usage(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = if ticks > 0 { ticks as f64 } else { 100.0 };
    Some((cpu_ticks(&stat)? as f64 / ticks, rss_kib(&status)? * 1024))
}

/// `utime + stime` of a `/proc/PID/stat` line (fields 14 and 15; the command name, field 2,
/// may hold spaces and parentheses, so fields are counted after its last `)`).
fn cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// `VmRSS` of a `/proc/PID/status`, in KiB.
fn rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A label value as the text format writes it.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_are_parsed() {
        let stat = "1234 (qemu (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 5 0 100 0 0";
        assert_eq!(cpu_ticks(stat), Some(300));
        assert_eq!(cpu_ticks("garbage"), None);
        assert_eq!(rss_kib("Name:\tqemu\nVmRSS:\t  2048 kB\n"), Some(2048));
        assert_eq!(rss_kib("Name:\tqemu\n"), None);
        let (cpu, rss) = process_usage(std::process::id()).unwrap();
        assert!(cpu >= 0.0 && rss > 0);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
