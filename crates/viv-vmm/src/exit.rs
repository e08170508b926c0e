//! Why a VM's QEMU stopped, for a program: from whether the host asked, the last QMP event
//! that explains a stop (`SHUTDOWN`, `RESET`, `GUEST_PANICKED`) and the process's exit status.
//!
//! Invariants: a host request wins over everything; a signal in the exit status wins over an
//! event (QEMU emits `SHUTDOWN` before an orderly exit, never before being killed); a guest
//! panic, once reported, stays the cause whatever events follow it.

use crate::ExitCause;

/// The last QMP event that tells why QEMU is stopping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LastEvent {
    /// `NAME reason`, for a person.
    pub(crate) text: String,
    /// What it means.
    pub(crate) cause: ExitCause,
}

impl LastEvent {
    /// What a QMP event says about a stop, if anything.
    pub(crate) fn of(event: &serde_json::Value) -> Option<Self> {
        let name = event["event"].as_str()?;
        if !matches!(name, "SHUTDOWN" | "RESET" | "GUEST_PANICKED") {
            return None;
        }
        let reason = event["data"]["reason"].as_str().unwrap_or_default();
        let cause = match (name, reason) {
            ("GUEST_PANICKED", _) | ("SHUTDOWN", "guest-panic") => ExitCause::GuestPanic,
            ("SHUTDOWN", "guest-shutdown") => ExitCause::GuestShutdown,
            ("SHUTDOWN", "guest-reset") => ExitCause::GuestReset,
            // SIGINT, SIGHUP or SIGTERM, which QEMU handles by exiting.
            ("SHUTDOWN", "host-signal") => ExitCause::Signal(libc::SIGTERM),
            ("SHUTDOWN", r) if r.starts_with("host-") => ExitCause::Host,
            _ => ExitCause::Other,
        };
        Some(Self {
            text: format!("{name} {reason}").trim().to_owned(),
            cause,
        })
    }
}

/// Why QEMU stopped: asked by the host, else a signal it died of, else what its last event
/// said (`status` is `VmProcess::exited`'s description, such as `signal: 9 (SIGKILL)`).
pub(crate) fn exit_cause(requested: bool, status: Option<&str>, last: Option<&LastEvent>) -> ExitCause {
    if requested {
        return ExitCause::Host;
    }
    let signal = status
        .and_then(|s| s.strip_prefix("signal: "))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok());
    match (last.map(|e| e.cause), signal) {
        (_, Some(signal)) => ExitCause::Signal(signal),
        (Some(cause), None) => cause,
        (None, None) => ExitCause::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(name: &str, reason: &str) -> Option<LastEvent> {
        LastEvent::of(&json!({ "event": name, "data": { "guest": true, "reason": reason } }))
    }

    #[test]
    fn events_and_exit_statuses_name_the_cause() {
        let shutdown = event("SHUTDOWN", "guest-shutdown");
        assert_eq!(shutdown.as_ref().unwrap().text, "SHUTDOWN guest-shutdown");
        let cause = |requested, status, last: &Option<LastEvent>| exit_cause(requested, status, last.as_ref());
        let exited = Some("exit status: 0");
        assert_eq!(cause(false, exited, &shutdown), ExitCause::GuestShutdown);
        assert_eq!(cause(true, exited, &shutdown), ExitCause::Host);
        assert_eq!(
            cause(false, exited, &event("SHUTDOWN", "guest-reset")),
            ExitCause::GuestReset
        );
        assert_eq!(
            cause(false, Some("exit status: 1"), &event("GUEST_PANICKED", "")),
            ExitCause::GuestPanic
        );
        assert_eq!(
            cause(false, exited, &event("SHUTDOWN", "host-qmp-quit")),
            ExitCause::Host
        );
        assert_eq!(
            cause(false, exited, &event("SHUTDOWN", "host-signal")),
            ExitCause::Signal(libc::SIGTERM)
        );
        assert_eq!(
            cause(false, Some("signal: 9 (SIGKILL)"), &event("RESET", "guest-reset")),
            ExitCause::Signal(9)
        );
        assert_eq!(cause(false, None, &None), ExitCause::Other);
        assert_eq!(event("STOP", ""), None);
        assert!(ExitCause::GuestPanic.is_crash() && !ExitCause::GuestShutdown.is_crash());
    }
}
