//! A VM's serial console, shared: one connection to QEMU's serial socket, fanned out to any
//! number of clients, every byte kept in a size-capped log, the last bytes replayed to a client
//! that attaches late.
//!
//! (Skeleton: the fan-out is being built; see `ConsoleHub::start`.)

use std::path::PathBuf;
use std::sync::Arc;

/// Bytes of the console log kept per VM before the oldest half is dropped.
#[allow(dead_code)]
pub const CONSOLE_LOG_CAP: u64 = 4 << 20;

/// The shared serial console of one running VM.
#[derive(Debug)]
pub struct ConsoleHub {
    socket: PathBuf,
    log: PathBuf,
}

impl ConsoleHub {
    /// Starts reading `socket` (QEMU's serial chardev, a Unix socket server) into `log`.
    pub fn start(socket: PathBuf, log: PathBuf) -> Arc<Self> {
        Arc::new(Self { socket, log })
    }

    /// Stops reading (the VM has stopped); clients see their stream end.
    pub fn close(&self) {
        let _ = (&self.socket, &self.log);
    }
}
