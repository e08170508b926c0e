//! Events between the servers of a cluster, over PostgreSQL's `LISTEN`/`NOTIFY` on the channel
//! [`CHANNEL`]: each server sends the events that happen on it (its bus's link, drained by a
//! thread of its own with a connection of its own) and publishes those of the others on its
//! bus, so `GET /events` on any server shows the whole cluster. A store on SQLite has one server
//! and no link.
//!
//! Invariants: a server never republishes its own events (each notification names its origin
//! node); a lost connection is made again, and events sent while it was down are lost for the
//! other servers, never for this one's clients; payloads stay under PostgreSQL's 8000-byte
//! limit (long messages are cut).

use std::sync::{Arc, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use viv_api::events::Event;

use crate::manager::Manager;
use crate::store::db;

/// The notification channel.
pub const CHANNEL: &str = "viv_events";

/// Longest message an event carries to other servers, in bytes.
const MAX_MESSAGE: usize = 4000;

/// How long the listener waits before trying a lost connection again.
const RETRY: Duration = Duration::from_secs(1);

#[derive(Serialize, Deserialize)]
struct Notice {
    origin: String,
    event: Event,
}

/// Links `manager`'s event bus to the other servers on the database at `url`.
pub fn link(url: &str, node_id: &str, node_name: &str, manager: &Arc<Manager>) {
    let (relay, queue) = std::sync::mpsc::channel::<Event>();
    manager.events().link(node_name.to_owned(), relay);
    let (url_out, origin) = (url.to_owned(), node_id.to_owned());
    std::thread::Builder::new()
        .name("viv-events-out".into())
        .spawn(move || send_all(&url_out, &origin, queue))
        .expect("spawning the event relay");
    let (url_in, me, manager) = (url.to_owned(), node_id.to_owned(), Arc::downgrade(manager));
    std::thread::Builder::new()
        .name("viv-events-in".into())
        .spawn(move || listen(&url_in, &me, &manager))
        .expect("spawning the event listener");
}

fn payload(origin: &str, mut event: Event) -> String {
    if let Some(message) = &mut event.message {
        if message.len() > MAX_MESSAGE {
            let mut cut = MAX_MESSAGE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
    }
    serde_json::to_string(&Notice {
        origin: origin.to_owned(),
        event,
    })
    .expect("events serialize")
}

/// Sends every event of the queue, until the bus is gone.
fn send_all(url: &str, origin: &str, queue: std::sync::mpsc::Receiver<Event>) {
    let mut client: Option<postgres::Client> = None;
    for event in queue {
        let text = payload(origin, event);
        for attempt in 0..2 {
            if client.is_none() {
                client = db::connect(url)
                    .map_err(|err| tracing::warn!(error = %err, "connecting to send events to the cluster"))
                    .ok();
            }
            let Some(c) = client.as_mut() else { break };
            match c.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &text]) {
                Ok(_) => break,
                Err(err) => {
                    client = None;
                    if attempt == 1 {
                        tracing::warn!(error = %err, "an event did not reach the cluster's other servers");
                    }
                }
            }
        }
    }
}

/// Publishes the other servers' events on this server's bus, for as long as the manager lives.
fn listen(url: &str, me: &str, manager: &Weak<Manager>) {
    while manager.strong_count() > 0 {
        let mut client = match db::connect(url).and_then(|mut c| {
            c.batch_execute(&format!("LISTEN {CHANNEL}"))?;
            Ok(c)
        }) {
            Ok(client) => client,
            Err(err) => {
                tracing::warn!(error = %err, "listening for the cluster's events; trying again");
                std::thread::sleep(RETRY);
                continue;
            }
        };
        tracing::info!(
            channel = CHANNEL,
            "listening for the events of the cluster's other servers"
        );
        loop {
            // A fresh wait each time: an iterator's timer is spent once it expired.
            let mut notifications = client.notifications();
            let mut wait = notifications.timeout_iter(Duration::from_secs(5));
            match postgres::fallible_iterator::FallibleIterator::next(&mut wait) {
                Ok(Some(note)) => {
                    let Ok(notice) = serde_json::from_str::<Notice>(note.payload()) else {
                        tracing::warn!("an unreadable event notification");
                        continue;
                    };
                    if notice.origin == me {
                        continue;
                    }
                    let Some(manager) = manager.upgrade() else { return };
                    manager.events().publish_relayed(notice.event);
                }
                Ok(None) => {
                    if manager.strong_count() == 0 {
                        return;
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "the cluster's event connection broke; connecting again");
                    std::thread::sleep(RETRY);
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use viv_api::events::EventKind;

    use super::*;

    #[test]
    fn payloads_stay_under_postgres_limit() {
        let event = Event {
            seq: 1,
            at: "2026-12-02T00:00:00.000Z".into(),
            kind: EventKind::Sandbox,
            id: "s".repeat(20),
            name: None,
            state: "failed".into(),
            previous: None,
            message: Some("é".repeat(10_000)),
            node: Some("n".into()),
        };
        let text = payload("node", event);
        assert!(text.len() < 8000, "{}", text.len());
        let back: Notice = serde_json::from_str(&text).unwrap();
        assert_eq!(back.origin, "node");
        assert!(back.event.message.unwrap().ends_with('…'));
    }
}

#[cfg(test)]
mod relay_tests {
    use std::time::Duration;

    use viv_api::events::{Event, EventKind};

    #[test]
    fn sent_events_reach_a_listening_connection() {
        let url = viv_test_postgres::fresh_database();
        let mut listener = crate::store::db::connect(&url).unwrap();
        listener.batch_execute(&format!("LISTEN {}", super::CHANNEL)).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let sender_url = url.clone();
        std::thread::spawn(move || super::send_all(&sender_url, "n1", rx));
        tx.send(Event {
            seq: 1,
            at: "2026-12-02T00:00:00.000Z".into(),
            kind: EventKind::Sandbox,
            id: "s1".into(),
            name: None,
            state: "running".into(),
            previous: None,
            message: None,
            node: Some("one".into()),
        })
        .unwrap();
        let mut notifications = listener.notifications();
        let mut iter = notifications.timeout_iter(Duration::from_secs(10));
        let note = postgres::fallible_iterator::FallibleIterator::next(&mut iter)
            .unwrap()
            .expect("a notification");
        let notice: super::Notice = serde_json::from_str(note.payload()).unwrap();
        assert_eq!((notice.origin.as_str(), notice.event.id.as_str()), ("n1", "s1"));
    }
}
