//! `GET /metrics`: the guest's CPU, memory and disk use, as E2B's sandbox metrics report them.
//! CPU use is measured over the time since the previous call (or over 100 ms for the first).

use std::sync::Mutex;
use std::time::Duration;

use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Busy and total jiffies of all CPUs at the previous call.
static LAST: Mutex<Option<(u64, u64)>> = Mutex::new(None);

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Metrics {
    timestamp: String,
    timestamp_unix: u64,
    cpu_count: u64,
    cpu_used_pct: f64,
    mem_used: u64,
    mem_total: u64,
    mem_cache: u64,
    disk_used: u64,
    disk_total: u64,
}

/// (busy, total) jiffies from the aggregate line of `/proc/stat`.
fn cpu_times() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = fields.iter().sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

fn meminfo(key: &str, text: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

pub async fn metrics() -> Response {
    let previous = *LAST.lock().expect("metrics lock");
    let previous = match previous {
        Some(sample) => Some(sample),
        None => {
            let first = cpu_times();
            tokio::time::sleep(Duration::from_millis(100)).await;
            first
        }
    };
    let now = cpu_times();
    *LAST.lock().expect("metrics lock") = now;
    let cpu_used_pct = match (previous, now) {
        (Some((busy0, total0)), Some((busy1, total1))) if total1 > total0 => {
            ((busy1 - busy0) as f64 / (total1 - total0) as f64 * 1000.0).round() / 10.0
        }
        _ => 0.0,
    };
    let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_total = meminfo("MemTotal:", &mem);
    // SAFETY: statvfs fills the zeroed struct for a NUL-terminated path.
    let (disk_total, disk_used) = unsafe {
        let mut fs: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c"/".as_ptr(), &mut fs) == 0 {
            let block = fs.f_frsize;
            (fs.f_blocks * block, (fs.f_blocks - fs.f_bfree) * block)
        } else {
            (0, 0)
        }
    };
    let now = std::time::SystemTime::now();
    // SAFETY: sysconf takes a plain constant.
    let cpu_count = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as u64;
    axum::Json(Metrics {
        timestamp: humantime::format_rfc3339_seconds(now).to_string(),
        timestamp_unix: now
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default(),
        cpu_count,
        cpu_used_pct,
        mem_used: mem_total.saturating_sub(meminfo("MemAvailable:", &mem)),
        mem_total,
        mem_cache: meminfo("Cached:", &mem) + meminfo("Buffers:", &mem),
        disk_used,
        disk_total,
    })
    .into_response()
}
