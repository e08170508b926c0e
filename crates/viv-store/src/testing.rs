//! Example rows for tests, here and in the crates above (feature `testing`).

use std::collections::BTreeMap;

use viv_api::SandboxState;

use super::{now_rfc3339_ms, SandboxRow};

/// A running sandbox row `id` with every field set (non-ASCII metadata, egress rules, a VM).
pub fn sandbox(id: &str) -> SandboxRow {
    SandboxRow {
        id: id.into(),
        template_id: "base".into(),
        state: SandboxState::Running,
        started_at: now_rfc3339_ms(),
        end_at_ms: 1_900_000_000_000,
        cpu_count: 2,
        memory_mb: 512,
        metadata: BTreeMap::from([("owner".to_owned(), "ünïcode ' quote".to_owned())]),
        access_token: Some("token".into()),
        vmm: Some(viv_vmm::ProcessIdentity {
            pid: 4242,
            start_time: 98_765_432_101,
        }),
        net_slot: Some(3),
        error: None,
        snapshot_id: None,
        auto_pause: true,
        network: viv_net::PolicySpec {
            internet: true,
            allow_out: vec!["10.0.0.0/8".into()],
            deny_out: vec!["0.0.0.0/0".into()],
            ..viv_net::PolicySpec::default()
        },
    }
}
