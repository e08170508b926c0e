//! Spare slots: a few slots made ahead with the open policy, so that a sandbox's start (a
//! restore, a resume, a fork) takes a ready namespace instead of waiting ~20 ms for `ip` and
//! `nft`.
//!
//! Invariants:
//! - at most one task makes spares at a time; it stops at the target count, once the network
//!   is closed, or at the first failure (every index taken, or a command failing), and the
//!   next start tries again; a start takes a spare before it makes a slot, so spares never
//!   keep a sandbox from starting;
//! - a spare made after [`Spares::close`] is dropped at once (which removes it), so none
//!   outlives the server's network;
//! - a spare holds the open policy ([`Policy::default`]); its rules are in force and its egress
//!   proxy listens, exactly as a slot made for a sandbox with that policy.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::slot::make_slot;
use crate::{NetError, Policy, Shared, Slot};

/// How long a start that took a spare leaves the CPU to its VM before the spare is made up
/// again: the `ip` and `nft` runs would compete with its QEMU's start and the guest's first
/// steps on a small host.
pub(crate) const REFILL_AFTER_TAKE: Duration = Duration::from_millis(250);

/// The spare slots of one server's network.
pub(crate) struct Spares {
    target: usize,
    slots: Mutex<Vec<Slot>>,
    /// A task is making spares.
    filling: AtomicBool,
    closed: AtomicBool,
}

impl Spares {
    pub(crate) fn new(target: usize) -> Self {
        Self {
            target,
            slots: Mutex::new(Vec::new()),
            filling: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        }
    }

    /// A ready spare, if there is one.
    pub(crate) fn take(&self) -> Option<Slot> {
        self.slots.lock().expect("spares lock").pop()
    }

    /// Spares ready now.
    pub(crate) fn len(&self) -> usize {
        self.slots.lock().expect("spares lock").len()
    }

    fn wanted(&self) -> bool {
        !self.closed.load(Ordering::SeqCst) && self.len() < self.target
    }

    /// Starts making spares in the background, after `delay`, unless a task already does, or
    /// none is wanted. Needs a Tokio runtime.
    pub(crate) fn refill(self: &Arc<Self>, shared: &Arc<Shared>, delay: Duration) {
        if !self.wanted() || self.filling.swap(true, Ordering::SeqCst) {
            return;
        }
        let (spares, shared) = (self.clone(), shared.clone());
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            loop {
                let failed = loop {
                    if !spares.wanted() {
                        break false;
                    }
                    match make_slot(&shared, Policy::default()).await {
                        Ok(slot) if spares.closed.load(Ordering::SeqCst) => drop(slot),
                        Ok(slot) => spares.slots.lock().expect("spares lock").push(slot),
                        // Every index is taken: the next start tries again.
                        Err(NetError::Exhausted(_)) => break true,
                        Err(err) => {
                            tracing::warn!(%err, "making a spare network slot");
                            break true;
                        }
                    }
                };
                spares.filling.store(false, Ordering::SeqCst);
                // A start may have taken a spare after the last check and seen this task still
                // filling: look once more.
                if failed || !spares.wanted() || spares.filling.swap(true, Ordering::SeqCst) {
                    return;
                }
            }
        });
    }

    /// Drops every spare (removing it) and makes no more.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let spares = std::mem::take(&mut *self.slots.lock().expect("spares lock"));
        drop(spares);
    }
}
