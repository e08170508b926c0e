//! The table `viv top` shows, without any I/O: rows built from the API's lists and metrics,
//! sorting, selection (kept on the same sandbox or VM across refreshes), the actions a row
//! allows, and the Prometheus lines the VMs' figures come from.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use viv_api::vms::{VmInfo, VmState};
use viv_api::{SandboxInfo, SandboxState};

/// What a row is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// A sandbox.
    Sandbox,
    /// A VM of the VM manager.
    Vm,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Sandbox => "sandbox",
            Kind::Vm => "vm",
        }
    }
}

/// One sandbox's latest metrics sample (E2B's `SandboxMetric` fields `top` shows).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SandboxSample {
    pub cpu_used_pct: f64,
    pub mem_used: u64,
    pub mem_total: u64,
}

/// One VM's figures from the server's Prometheus metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct VmSample {
    /// CPU seconds of its QEMU so far.
    pub cpu_seconds: f64,
    /// Resident memory of its QEMU.
    pub rss_bytes: u64,
}

/// One line of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub kind: Kind,
    pub id: String,
    /// The VM's name, or the sandbox's template.
    pub name: String,
    pub state: String,
    /// CPU use in percent of one vCPU... of the whole guest for sandboxes (E2B's figure), of
    /// one host CPU for a VM's QEMU.
    pub cpu_pct: Option<f64>,
    /// Memory in use, and the most it may use.
    pub mem_used: Option<u64>,
    pub mem_total: Option<u64>,
    /// Since when it runs (or exists, for a VM that never started).
    pub since: Option<SystemTime>,
}

impl Row {
    /// Whether it can be paused (`Some(true)`), resumed (`Some(false)`), or neither.
    pub fn pause_action(&self) -> Option<bool> {
        match self.state.as_str() {
            "running" => Some(true),
            "paused" => Some(false),
            _ => None,
        }
    }

    /// The age column: how long since [`Row::since`], at `now`.
    pub fn age(&self, now: SystemTime) -> String {
        self.since
            .and_then(|s| now.duration_since(s).ok())
            .map_or_else(|| "-".into(), short_duration)
    }
}

/// `45s`, `12m`, `3h04m`, `2d05h`.
pub fn short_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// `512K`, `300M`, `1.5G`.
pub fn short_bytes(bytes: u64) -> String {
    const K: u64 = 1024;
    match bytes {
        0..K => format!("{bytes}B"),
        K..1_048_576 => format!("{}K", bytes / K),
        1_048_576..1_073_741_824 => format!("{}M", bytes / (K * K)),
        _ => format!("{:.1}G", bytes as f64 / (K * K * K) as f64),
    }
}

fn parse_time(text: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(text.trim_end_matches('Z')).ok()
}

/// The rows for the API's lists. `vm_cpu_pct` is each VM's CPU use since the previous refresh
/// (see [`cpu_percent`]).
pub fn rows(
    sandboxes: &[SandboxInfo],
    sandbox_samples: &HashMap<String, SandboxSample>,
    vms: &[VmInfo],
    vm_samples: &HashMap<String, VmSample>,
    vm_cpu_pct: &HashMap<String, f64>,
) -> Vec<Row> {
    let mut rows = Vec::with_capacity(sandboxes.len() + vms.len());
    for s in sandboxes {
        let sample = (s.state == SandboxState::Running)
            .then(|| sandbox_samples.get(&s.sandbox_id))
            .flatten();
        rows.push(Row {
            kind: Kind::Sandbox,
            id: s.sandbox_id.clone(),
            name: s.template_id.clone(),
            state: s.state.as_str().to_owned(),
            cpu_pct: sample.map(|m| m.cpu_used_pct),
            mem_used: sample.map(|m| m.mem_used),
            mem_total: Some(sample.map_or(u64::from(s.memory_mb) << 20, |m| m.mem_total)),
            since: parse_time(&s.started_at),
        });
    }
    for vm in vms {
        let active = matches!(vm.state, VmState::Running | VmState::Paused | VmState::Stopping);
        let sample = active.then(|| vm_samples.get(&vm.id)).flatten();
        let since = if active {
            vm.started_at.as_deref().and_then(parse_time)
        } else {
            parse_time(&vm.created_at)
        };
        rows.push(Row {
            kind: Kind::Vm,
            id: vm.id.clone(),
            name: vm.name.clone(),
            state: vm.state.as_str().to_owned(),
            cpu_pct: active.then(|| vm_cpu_pct.get(&vm.id).copied()).flatten(),
            mem_used: sample.map(|m| m.rss_bytes),
            mem_total: Some(u64::from(vm.definition.memory_mib) << 20),
            since,
        });
    }
    rows
}

/// A VM's CPU use in percent of one host CPU between two samples `elapsed` apart.
pub fn cpu_percent(before: &VmSample, after: &VmSample, elapsed: Duration) -> Option<f64> {
    let secs = elapsed.as_secs_f64();
    (secs > 0.0 && after.cpu_seconds >= before.cpu_seconds)
        .then(|| (after.cpu_seconds - before.cpu_seconds) / secs * 100.0)
}

/// The VMs' figures from a Prometheus text exposition (`vivarium_vm_cpu_seconds_total` and
/// `vivarium_vm_memory_rss_bytes`, labelled `vm="ID"`); other lines are ignored.
pub fn parse_vm_metrics(text: &str) -> HashMap<String, VmSample> {
    let mut samples: HashMap<String, VmSample> = HashMap::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else { continue };
        let Some((name, labels)) = series.split_once('{') else {
            continue;
        };
        let Some(id) = label(labels, "vm") else { continue };
        match name {
            "vivarium_vm_cpu_seconds_total" => samples.entry(id).or_default().cpu_seconds = value,
            "vivarium_vm_memory_rss_bytes" => samples.entry(id).or_default().rss_bytes = value as u64,
            _ => {}
        }
    }
    samples
}

/// The value of label `key` in `a="x",b="y"}` (no escapes in ids).
fn label(labels: &str, key: &str) -> Option<String> {
    let labels = labels.strip_suffix('}').unwrap_or(labels);
    labels.split(',').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"').to_owned())
    })
}

/// Sort columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortKey {
    Kind,
    Name,
    State,
    Cpu,
    Memory,
    Age,
}

impl SortKey {
    pub fn title(self) -> &'static str {
        match self {
            SortKey::Kind => "KIND",
            SortKey::Name => "NAME",
            SortKey::State => "STATE",
            SortKey::Cpu => "CPU%",
            SortKey::Memory => "MEM",
            SortKey::Age => "AGE",
        }
    }

    /// The key a letter picks: k(ind), n(ame), s(tate), c(pu), m(emory), a(ge).
    pub fn from_key(c: char) -> Option<Self> {
        Some(match c {
            'K' => SortKey::Kind,
            'n' => SortKey::Name,
            's' => SortKey::State,
            'c' => SortKey::Cpu,
            'm' => SortKey::Memory,
            'a' => SortKey::Age,
            _ => return None,
        })
    }
}

/// The rows, their order and the selection.
#[derive(Debug)]
pub struct Table {
    rows: Vec<Row>,
    pub sort: SortKey,
    pub descending: bool,
    selected: Option<(Kind, String)>,
}

impl Default for Table {
    fn default() -> Self {
        Self {
            rows: Vec::new(),
            sort: SortKey::Cpu,
            descending: true,
            selected: None,
        }
    }
}

impl Table {
    /// Replaces the rows, keeping the selection on the same sandbox or VM if it is still there
    /// (else on the row at the same place).
    pub fn set_rows(&mut self, rows: Vec<Row>) {
        let old_index = self.selected_index();
        self.rows = rows;
        self.sort_rows();
        if self.selected_index().is_none() {
            let index = old_index.map(|i| i.min(self.rows.len().saturating_sub(1)));
            self.selected = index.and_then(|i| self.rows.get(i)).map(|r| (r.kind, r.id.clone()));
        }
        if self.selected.is_none() {
            self.selected = self.rows.first().map(|r| (r.kind, r.id.clone()));
        }
    }

    /// Sorts by `key`; the same key again reverses the order.
    pub fn sort_by(&mut self, key: SortKey) {
        if self.sort == key {
            self.descending = !self.descending;
        } else {
            self.sort = key;
            // Big numbers and old things first, names from A.
            self.descending = matches!(key, SortKey::Cpu | SortKey::Memory | SortKey::Age);
        }
        self.sort_rows();
    }

    fn sort_rows(&mut self) {
        let key = self.sort;
        let descending = self.descending;
        self.rows.sort_by(|a, b| {
            use std::cmp::Ordering;
            let by_key = match key {
                SortKey::Kind => a.kind.cmp(&b.kind),
                SortKey::Name => a.name.cmp(&b.name),
                SortKey::State => a.state.cmp(&b.state),
                SortKey::Cpu => a.cpu_pct.partial_cmp(&b.cpu_pct).unwrap_or(Ordering::Equal),
                SortKey::Memory => a.mem_used.cmp(&b.mem_used),
                // Older first when descending: an earlier start is a greater age.
                SortKey::Age => b.since.cmp(&a.since),
            };
            let by_key = if descending { by_key.reverse() } else { by_key };
            // Ties (and rows without figures) in a stable, readable order.
            by_key.then_with(|| a.kind.cmp(&b.kind)).then_with(|| a.id.cmp(&b.id))
        });
    }

    pub fn rows(&self) -> &[Row] {
        &self.rows
    }

    pub fn selected_index(&self) -> Option<usize> {
        let (kind, id) = self.selected.as_ref()?;
        self.rows.iter().position(|r| r.kind == *kind && &r.id == id)
    }

    pub fn selected(&self) -> Option<&Row> {
        self.selected_index().map(|i| &self.rows[i])
    }

    /// Moves the selection by `delta` rows, staying within the table.
    pub fn move_selection(&mut self, delta: isize) {
        if self.rows.is_empty() {
            return;
        }
        let current = self.selected_index().unwrap_or(0) as isize;
        let next = (current + delta).clamp(0, self.rows.len() as isize - 1) as usize;
        self.selected = Some((self.rows[next].kind, self.rows[next].id.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(id: &str, state: &str, started: &str) -> SandboxInfo {
        serde_json::from_value(serde_json::json!({
            "sandboxID": id, "templateID": "base", "clientID": "c", "startedAt": started,
            "endAt": started, "cpuCount": 1, "memoryMB": 256, "state": state, "envdVersion": "0.6.2",
        }))
        .unwrap()
    }

    fn vm(id: &str, state: &str) -> VmInfo {
        serde_json::from_value(serde_json::json!({
            "id": id, "name": format!("name-{id}"), "state": state,
            "definition": {"memoryMib": 1024},
            "createdAt": "2025-12-31T00:00:00Z", "stateChangedAt": "2026-01-01T00:00:00Z",
            "startedAt": "2026-01-01T01:00:00Z",
        }))
        .unwrap_or_else(|e| panic!("VmInfo: {e}"))
    }

    fn table() -> Table {
        let sandboxes = [
            sandbox("a", "running", "2026-01-01T00:00:00.000Z"),
            sandbox("b", "paused", "2026-01-01T00:30:00.000Z"),
            sandbox("c", "running", "2026-01-01T00:10:00.000Z"),
        ];
        let samples = HashMap::from([
            (
                "a".to_owned(),
                SandboxSample {
                    cpu_used_pct: 5.0,
                    mem_used: 100 << 20,
                    mem_total: 200 << 20,
                },
            ),
            (
                "b".to_owned(),
                SandboxSample {
                    cpu_used_pct: 99.0,
                    mem_used: 1,
                    mem_total: 1,
                },
            ),
            (
                "c".to_owned(),
                SandboxSample {
                    cpu_used_pct: 50.0,
                    mem_used: 10 << 20,
                    mem_total: 200 << 20,
                },
            ),
        ]);
        let vms = [vm("v1", "running"), vm("v2", "stopped")];
        let vm_samples = HashMap::from([(
            "v1".to_owned(),
            VmSample {
                cpu_seconds: 3.0,
                rss_bytes: 300 << 20,
            },
        )]);
        let vm_cpu = HashMap::from([("v1".to_owned(), 20.0)]);
        let mut table = Table::default();
        table.set_rows(rows(&sandboxes, &samples, &vms, &vm_samples, &vm_cpu));
        table
    }

    fn order(table: &Table) -> Vec<&str> {
        table.rows().iter().map(|r| r.id.as_str()).collect()
    }

    #[test]
    fn rows_come_from_lists_and_metrics() {
        let table = table();
        let a = table.rows().iter().find(|r| r.id == "a").unwrap();
        assert_eq!(
            (a.kind, a.cpu_pct, a.mem_used),
            (Kind::Sandbox, Some(5.0), Some(100 << 20))
        );
        // A paused sandbox shows no figures, whatever a stale sample said.
        let b = table.rows().iter().find(|r| r.id == "b").unwrap();
        assert_eq!((b.cpu_pct, b.mem_used, b.mem_total), (None, None, Some(256 << 20)));
        assert_eq!(b.pause_action(), Some(false));
        let v1 = table.rows().iter().find(|r| r.id == "v1").unwrap();
        assert_eq!(
            (v1.kind, v1.name.as_str(), v1.cpu_pct),
            (Kind::Vm, "name-v1", Some(20.0))
        );
        assert_eq!((v1.mem_used, v1.mem_total), (Some(300 << 20), Some(1 << 30)));
        let v2 = table.rows().iter().find(|r| r.id == "v2").unwrap();
        assert_eq!((v2.cpu_pct, v2.pause_action()), (None, None));
        let now = parse_time("2026-01-01T02:05:00Z").unwrap();
        assert_eq!(a.age(now), "2h05m");
        assert_eq!(v1.age(now), "1h05m");
    }

    #[test]
    fn sorting_and_selection() {
        let mut table = table();
        // CPU, highest first; rows without figures last.
        assert_eq!(order(&table), ["c", "v1", "a", "b", "v2"]);
        assert_eq!(table.selected().unwrap().id, "c");
        table.move_selection(2);
        assert_eq!(table.selected().unwrap().id, "a");
        table.sort_by(SortKey::Memory);
        assert_eq!(order(&table), ["v1", "a", "c", "b", "v2"]);
        assert_eq!(table.selected().unwrap().id, "a", "the selection follows its row");
        table.sort_by(SortKey::Memory);
        assert_eq!(order(&table)[0], "b", "the same key again reverses");
        table.sort_by(SortKey::Age);
        assert_eq!(order(&table), ["v2", "a", "c", "b", "v1"]);
        table.sort_by(SortKey::Name);
        assert_eq!(order(&table), ["a", "b", "c", "v1", "v2"]);
        table.move_selection(-10);
        assert_eq!(table.selected().unwrap().id, "a");
        table.move_selection(10);
        assert_eq!(table.selected().unwrap().id, "v2");
        // A refresh without the selected row keeps the selection at its place.
        let rows: Vec<Row> = table.rows().iter().filter(|r| r.id != "v2").cloned().collect();
        table.set_rows(rows);
        assert_eq!(table.selected().unwrap().id, "v1");
        table.set_rows(Vec::new());
        assert!(table.selected().is_none());
        table.move_selection(1);
    }

    #[test]
    fn vm_figures_from_prometheus_text() {
        let text = "# HELP x\nvivarium_vm_cpu_seconds_total{vm=\"v1\",name=\"web\"} 12.5\n\
                    vivarium_vm_memory_rss_bytes{vm=\"v1\",name=\"web\"} 1048576\n\
                    vivarium_vm_state{vm=\"v2\",state=\"running\"} 1\nvivarium_sandboxes 3\ngarbage\n";
        let samples = parse_vm_metrics(text);
        assert_eq!(samples.len(), 1);
        assert_eq!(
            samples["v1"],
            VmSample {
                cpu_seconds: 12.5,
                rss_bytes: 1 << 20
            }
        );
        let before = VmSample {
            cpu_seconds: 10.0,
            rss_bytes: 0,
        };
        assert_eq!(cpu_percent(&before, &samples["v1"], Duration::from_secs(5)), Some(50.0));
        assert_eq!(cpu_percent(&samples["v1"], &before, Duration::from_secs(5)), None);
    }

    #[test]
    fn short_units() {
        assert_eq!(short_duration(Duration::from_secs(59)), "59s");
        assert_eq!(short_duration(Duration::from_secs(61)), "1m");
        assert_eq!(short_duration(Duration::from_secs(2 * 86_400 + 5 * 3600)), "2d05h");
        assert_eq!(short_bytes(512), "512B");
        assert_eq!(short_bytes(300 << 20), "300M");
        assert_eq!(short_bytes(3 << 29), "1.5G");
    }
}
