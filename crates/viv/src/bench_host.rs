//! `viv bench`'s reading of the host itself: how much CPU time the hypervisor under this machine
//! gave to other tenants during a run, and whether this machine hands free memory back to that
//! hypervisor (which slows every restore, resume and fork; see `viv_vmm::host_memory`). Figures
//! taken while the stolen share is high are slower than the machine is, so every report carries
//! both.

/// This host's CPU time so far, in clock ticks: (steal, all states), from `/proc/stat`.
pub(crate) fn cpu_times() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    // user nice system idle iowait irq softirq steal (guest times are already in user).
    let steal = *ticks.get(7)?;
    Some((steal, ticks.iter().take(8).sum()))
}

/// The table row of [`stolen_percent`].
pub(crate) fn stolen_row(stolen: Option<f64>) -> Vec<String> {
    vec![
        "host CPU time stolen by the hypervisor during the run (other tenants)".into(),
        stolen.map_or_else(|| "-".into(), |p| format!("{p:.1} %")),
        "-".into(),
    ]
}

/// The share of this host's CPU time that its hypervisor gave to other guests between two
/// readings: figures taken while it is high are slower than the machine is.
pub(crate) fn stolen_percent(start: Option<(u64, u64)>, end: Option<(u64, u64)>) -> Option<f64> {
    let ((steal0, all0), (steal1, all1)) = (start?, end?);
    let all = all1.checked_sub(all0).filter(|&t| t > 0)?;
    Some((steal1.saturating_sub(steal0) as f64 * 1000.0 / all as f64).round() / 10.0)
}

/// The size in KiB of the free blocks this host reports to its hypervisor, if it does.
pub(crate) fn free_page_reporting_kib() -> Option<u64> {
    viv_vmm::host_memory::free_page_reporting(std::path::Path::new("/")).map(|r| r.block_bytes() / 1024)
}

/// The table row of [`free_page_reporting_kib`].
pub(crate) fn reporting_row(kib: Option<u64>) -> Vec<String> {
    vec![
        "host returns free memory to its hypervisor (free page reporting; slows restores)".into(),
        kib.map_or_else(|| "no".into(), |k| format!("blocks of {k} KiB")),
        "-".into(),
    ]
}
