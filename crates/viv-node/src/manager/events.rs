//! The event bus behind `GET /events`: state changes of VMs, sandboxes and operations,
//! broadcast to every subscriber.
//!
//! On a server of a cluster the bus is linked to the others' (`crate::cluster::events`): what
//! happens here is also sent to them, and what happens there is published here, so a client of
//! any server follows the whole cluster.
//!
//! Invariants: publishing never blocks or fails (a subscriber that falls more than
//! [`CAPACITY`] events behind is told it lagged and goes on from the newest; the link to the
//! other servers is a queue that its own thread empties); sequence numbers increase by one per
//! event this server publishes, its own and those relayed from other nodes alike.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::broadcast;
use viv_api::events::{Event, EventKind};

/// Events kept for subscribers that have not read them yet.
pub const CAPACITY: usize = 4096;

/// Broadcasts events.
pub struct EventBus {
    sender: broadcast::Sender<Event>,
    seq: AtomicU64,
    /// This node's name and the queue to the other servers, once linked.
    link: std::sync::OnceLock<(String, std::sync::mpsc::Sender<Event>)>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self {
            sender: broadcast::channel(CAPACITY).0,
            seq: AtomicU64::new(1),
            link: std::sync::OnceLock::new(),
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
    /// Sends `change` to every subscriber, and to the other servers of the cluster.
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
            node: self.link.get().map(|(node, _)| node.clone()),
        };
        tracing::debug!(kind = event.kind.as_str(), id = %event.id, state = %event.state, "event");
        if let Some((_, relay)) = self.link.get() {
            // A relay that stopped loses the cluster's view of this event, not the event.
            let _ = relay.send(event.clone());
        }
        // No subscriber is not an error.
        let _ = self.sender.send(event);
    }

    /// Publishes an event that happened on another node (numbered here, not sent on).
    pub fn publish_relayed(&self, mut event: Event) {
        event.seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let _ = self.sender.send(event);
    }

    /// Sends this bus's events, named by node `node`, to `relay` from now on (set once).
    pub fn link(&self, node: String, relay: std::sync::mpsc::Sender<Event>) {
        let _ = self.link.set((node, relay));
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

    /// Publishes a node's new state (`up`, `draining`, `down`).
    pub fn publish_node(&self, id: &str, name: &str, state: &str, message: Option<String>) {
        self.events.publish(Change {
            kind: EventKind::Node,
            id: id.to_owned(),
            name: Some(name.to_owned()),
            state: state.to_owned(),
            previous: None,
            message,
        });
    }

    /// Publishes a sandbox's new state (`running`, `paused`, `failed`, `killed`).
    pub fn publish_sandbox(&self, id: &str, state: &str, message: Option<String>) {
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
