//! Sandbox lifetimes: setting and extending a sandbox's deadline, and the task that ends (or,
//! with auto-pause, pauses) sandboxes whose deadline passed.
//!
//! Invariants: a deadline is at most `MAX_TIMEOUT_SECS` away when set; the enforcer holds only a
//! weak reference, and ends when the manager starts shutting down or is dropped.

use super::*;

impl Manager {
    /// Changes a sandbox's remaining lifetime.
    pub fn set_timeout(&self, id: &str, seconds: u64) -> Result<(), ApiError> {
        if seconds > viv_api::MAX_TIMEOUT_SECS {
            return Err(ApiError::BadRequest(format!(
                "timeout must be at most {} seconds",
                viv_api::MAX_TIMEOUT_SECS
            )));
        }
        self.live(id)?;
        self.store.set_end(id, now_ms() + seconds as i64 * 1000)?;
        Ok(())
    }

    /// Extends a sandbox's lifetime to at least `seconds` from now (E2B's refresh).
    pub fn refresh(&self, id: &str, seconds: u64) -> Result<(), ApiError> {
        if seconds > viv_api::MAX_TIMEOUT_SECS {
            return Err(ApiError::BadRequest(format!(
                "duration must be at most {} seconds",
                viv_api::MAX_TIMEOUT_SECS
            )));
        }
        self.live(id)?;
        let row = self.store.sandbox(id)?.ok_or_else(|| ApiError::sandbox_not_found(id))?;
        self.store
            .set_end(id, row.end_at_ms.max(now_ms() + seconds as i64 * 1000))?;
        Ok(())
    }

    /// Kills sandboxes whose deadline has passed, every second, until the manager stops.
    pub fn start_deadline_enforcer(self: &Arc<Self>) {
        let manager = Arc::downgrade(self);
        let stopping = self.stopping();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            while super::stopping::next_tick(&mut tick, &stopping).await {
                let Some(manager) = manager.upgrade() else { return };
                let Ok(rows) = manager.store.local_sandboxes() else {
                    continue;
                };
                let expired = rows.into_iter().filter(|r| {
                    matches!(r.state, SandboxState::Running | SandboxState::Failed) && r.end_at_ms <= now_ms()
                });
                for row in expired {
                    manager.metrics.sandboxes_timed_out.inc();
                    if row.auto_pause && row.state == SandboxState::Running {
                        tracing::info!(sandbox = %row.id, "sandbox timed out; pausing it");
                        match manager.pause_at_timeout(&row.id).await {
                            Ok(_) => continue,
                            Err(err) => tracing::warn!(sandbox = %row.id, error = %err, "auto-pause failed; killing"),
                        }
                    } else {
                        tracing::info!(sandbox = %row.id, "sandbox timed out");
                    }
                    let _ = manager.kill(&row.id).await;
                }
            }
        });
    }
}
