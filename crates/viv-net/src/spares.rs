//! Spare slots: a few slots made ahead with the open policy, so that a sandbox's start (a
//! restore, a resume, a fork) takes a ready namespace instead of waiting ~20 ms for `ip` and
//! `nft`.
//!
//! Invariants:
//! - at most one task makes spares at a time; it stops at the target count, once the network
//!   is closed, or at the first failure (every index taken, or a command failing), and the
//!   next start tries again; a start takes a spare before it makes a slot, so spares never
//!   keep a sandbox from starting;
//! - a spare counts as one from the moment its making starts, before its index is taken, until
//!   a start takes it ([`Spares::held`]), so a slot being made ahead is never counted as a
//!   sandbox's;
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
    held: Mutex<Held>,
    /// A task is making spares.
    filling: AtomicBool,
    closed: AtomicBool,
}

/// The spares ready, and those being made (their index is taken already), under one lock so
/// that [`Spares::held`] never misses one between the two.
#[derive(Default)]
struct Held {
    ready: Vec<Slot>,
    making: usize,
}

impl Spares {
    pub(crate) fn new(target: usize) -> Self {
        Self {
            target,
            held: Mutex::new(Held::default()),
            filling: AtomicBool::new(false),
            closed: AtomicBool::new(false),
        }
    }

    /// A ready spare, if there is one.
    pub(crate) fn take(&self) -> Option<Slot> {
        self.held.lock().expect("spares lock").ready.pop()
    }

    /// Spares ready or being made: the slots in use that no sandbox holds.
    pub(crate) fn held(&self) -> usize {
        let held = self.held.lock().expect("spares lock");
        held.ready.len() + held.making
    }

    /// Whether the network is open and fewer spares than the target are ready or being made.
    fn wanted(&self) -> bool {
        !self.closed.load(Ordering::SeqCst) && self.held() < self.target
    }

    /// Counts one more spare as being made, if one is wanted (checked under the same lock).
    fn start_one(&self) -> bool {
        let mut held = self.held.lock().expect("spares lock");
        let wanted = !self.closed.load(Ordering::SeqCst) && held.ready.len() + held.making < self.target;
        if wanted {
            held.making += 1;
        }
        wanted
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
                    if !spares.start_one() {
                        break false;
                    }
                    let made = make_slot(&shared, Policy::default()).await;
                    let mut held = spares.held.lock().expect("spares lock");
                    held.making -= 1;
                    match made {
                        Ok(slot) if spares.closed.load(Ordering::SeqCst) => {
                            drop(held);
                            drop(slot);
                        }
                        Ok(slot) => held.ready.push(slot),
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
        let ready = std::mem::take(&mut self.held.lock().expect("spares lock").ready);
        drop(ready);
    }
}
