//! The end of the server's periodic tasks (the deadline enforcer, the console log cap, the pool
//! sweeper, the cluster heartbeat, the metric history).
//!
//! Invariant: once [`Manager::shutdown`] has returned, no periodic task waits on a timer again.
//! Tokio tears its timer down while the runtime shuts down, and a task polling a timer at that
//! moment panics ("A Tokio 1.x context was found, but it is being shutdown"); the tasks therefore
//! end on the manager's stopping token before the runtime does. The token is cancelled at the
//! end of the shutdown, not its start: the cluster heartbeat goes on while sandboxes are paused,
//! so other nodes do not take this one for dead.

use tokio_util::sync::CancellationToken;

use super::*;

impl Manager {
    /// A token cancelled when the server starts shutting down, for tasks that tick for as long
    /// as the manager runs.
    pub fn stopping(&self) -> CancellationToken {
        self.stopping.clone()
    }
}

/// Waits for `tick`'s next tick; `false` once `stopping` is cancelled, and the loop should end.
pub async fn next_tick(tick: &mut tokio::time::Interval, stopping: &CancellationToken) -> bool {
    tokio::select! {
        biased;
        _ = stopping.cancelled() => false,
        _ = tick.tick() => true,
    }
}
