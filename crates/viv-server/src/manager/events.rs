//! The event bus behind `GET /events`: state changes of VMs, sandboxes and operations,
//! broadcast to every subscriber.
//!
//! Invariants: publishing never blocks or fails (a subscriber that falls more than
//! [`CAPACITY`] events behind is told it lagged and goes on from the newest); sequence numbers
//! increase by one per event.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::broadcast;
use viv_api::events::{Event, EventKind};

/// Events kept for subscribers that have not read them yet.
pub const CAPACITY: usize = 4096;

/// Broadcasts events.
pub struct EventBus {
    sender: broadcast::Sender<Event>,
    seq: AtomicU64,
}

impl Default for EventBus {
    fn default() -> Self {
        Self {
            sender: broadcast::channel(CAPACITY).0,
            seq: AtomicU64::new(1),
        }
    }
}

/// What changed, before it gets a sequence number and a time.
#[derive(Debug, Clone)]
pub struct Change {
    /// What it is about.
    pub kind: EventKind,
    /// Its id.
    pub id: String,
    /// Its name, if any.
    pub name: Option<String>,
    /// Its new state.
    pub state: String,
    /// Its state before.
    pub previous: Option<String>,
    /// Why.
    pub message: Option<String>,
}

impl EventBus {
    /// Sends `change` to every subscriber.
    pub fn publish(&self, change: Change) {
        let event = Event {
            seq: self.seq.fetch_add(1, Ordering::Relaxed),
            at: crate::store::now_rfc3339_ms(),
            kind: change.kind,
            id: change.id,
            name: change.name,
            state: change.state,
            previous: change.previous,
            message: change.message,
        };
        tracing::debug!(kind = event.kind.as_str(), id = %event.id, state = %event.state, "event");
        // No subscriber is not an error.
        let _ = self.sender.send(event);
    }

    /// A receiver of every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.sender.subscribe()
    }
}

impl super::Manager {
    /// The event bus.
    pub fn events(&self) -> &EventBus {
        &self.events
    }

    /// Publishes a sandbox's new state (`running`, `paused`, `failed`, `killed`).
    pub(super) fn publish_sandbox(&self, id: &str, state: &str, message: Option<String>) {
        self.events.publish(Change {
            kind: EventKind::Sandbox,
            id: id.to_owned(),
            name: None,
            state: state.to_owned(),
            previous: None,
            message,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn subscribers_get_events_in_order_with_rising_numbers() {
        let bus = EventBus::default();
        let mut rx = bus.subscribe();
        for state in ["starting", "running"] {
            bus.publish(Change {
                kind: EventKind::Vm,
                id: "vm-1".into(),
                name: Some("web".into()),
                state: state.into(),
                previous: None,
                message: None,
            });
        }
        let (a, b) = (rx.recv().await.unwrap(), rx.recv().await.unwrap());
        assert_eq!((a.state.as_str(), b.state.as_str()), ("starting", "running"));
        assert_eq!(b.seq, a.seq + 1);
    }
}
