//! Messages of the `process.Process` service: start, observe and steer processes in the guest.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The service's path prefix.
pub const SERVICE: &str = "/process.Process";

/// What to run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ProcessConfig {
    /// The program; looked up in `PATH` when it has no slash.
    pub cmd: String,
    /// Its arguments, not including the program name.
    pub args: Vec<String>,
    /// Environment variables added to the sandbox's defaults.
    pub envs: BTreeMap<String, String>,
    /// The working directory; the user's home when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
}

/// Terminal size of a PTY.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PtySize {
    /// Columns.
    pub cols: u32,
    /// Rows.
    pub rows: u32,
}

/// A pseudo-terminal request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Pty {
    /// The initial size.
    pub size: Option<PtySize>,
}

/// `Start`: run a process and stream its events.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct StartRequest {
    /// What to run.
    pub process: ProcessConfig,
    /// Run under a pseudo-terminal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pty: Option<Pty>,
    /// A name to find the process by later.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Keep stdin open for `SendInput`; when false, stdin is `/dev/null`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stdin: Option<bool>,
}

/// Selects a process by pid or by tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ProcessSelector {
    /// The guest process id.
    Pid(u32),
    /// The tag given at start.
    Tag(String),
}

/// The process field of the selector messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelectorRequest {
    /// Which process.
    pub process: ProcessSelector,
}

/// `Connect`: attach to a running process's event stream.
pub type ConnectRequest = SelectorRequest;
/// `CloseStdin`: close a process's stdin.
pub type CloseStdinRequest = SelectorRequest;

/// Bytes for a process's stdin or PTY.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ProcessInput {
    /// Bytes for stdin.
    Stdin(#[serde(with = "crate::b64")] Vec<u8>),
    /// Bytes for the PTY.
    Pty(#[serde(with = "crate::b64")] Vec<u8>),
}

/// The input of one `StreamInput` message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputData {
    /// The bytes and where they go.
    pub input: ProcessInput,
}

/// One message of a `StreamInput` client stream: which process first, then its input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum StreamInputRequest {
    /// The process the stream feeds.
    Start(SelectorRequest),
    /// Input for it.
    Data(InputData),
    /// Sent by clients to keep the stream open.
    Keepalive(Empty),
}

/// `SendInput`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendInputRequest {
    /// Which process.
    pub process: ProcessSelector,
    /// What to send.
    pub input: ProcessInput,
}

/// Signals a client may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Signal {
    /// No signal given.
    #[serde(rename = "SIGNAL_UNSPECIFIED")]
    Unspecified,
    /// SIGTERM.
    #[serde(rename = "SIGNAL_SIGTERM")]
    Sigterm,
    /// SIGKILL.
    #[serde(rename = "SIGNAL_SIGKILL")]
    Sigkill,
}

/// `SendSignal`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendSignalRequest {
    /// Which process.
    pub process: ProcessSelector,
    /// The signal.
    pub signal: Signal,
}

/// `Update`: resize a process's PTY.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateRequest {
    /// Which process.
    pub process: ProcessSelector,
    /// The new PTY settings.
    #[serde(default)]
    pub pty: Option<Pty>,
}

/// One running process as `List` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcessInfo {
    /// What it runs.
    pub config: ProcessConfig,
    /// Its guest pid.
    pub pid: u32,
    /// Its tag.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tag: Option<String>,
}

/// `List` response.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListResponse {
    /// The processes started through the agent that are still running.
    #[serde(default)]
    pub processes: Vec<ProcessInfo>,
}

/// One message of a `Start` or `Connect` stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamResponse {
    /// The event.
    pub event: ProcessEvent,
}

/// What happened to a process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ProcessEvent {
    /// The process started.
    Start(StartEvent),
    /// The process wrote output.
    Data(DataEvent),
    /// The process ended.
    End(EndEvent),
    /// Nothing happened for a while; sent to keep idle connections open.
    Keepalive(Keepalive),
}

/// The process started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartEvent {
    /// Its guest pid.
    pub pid: u32,
}

/// Output, from one of the process's streams.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum DataEvent {
    /// Bytes written to stdout.
    Stdout(#[serde(with = "crate::b64")] Vec<u8>),
    /// Bytes written to stderr.
    Stderr(#[serde(with = "crate::b64")] Vec<u8>),
    /// Bytes written to the PTY.
    Pty(#[serde(with = "crate::b64")] Vec<u8>),
}

/// The process ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct EndEvent {
    /// Its exit code, or -1 when a signal killed it.
    pub exit_code: i32,
    /// Whether it exited by itself (rather than by a signal).
    pub exited: bool,
    /// A description such as `exit status 1` or `signal: killed`.
    pub status: String,
    /// Why it could not run, when it could not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// An empty keep-alive message.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Keepalive {}

/// An empty response body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_use_the_protobuf_json_mapping() {
        let data = StreamResponse {
            event: ProcessEvent::Data(DataEvent::Stdout(b"hi\n".to_vec())),
        };
        assert_eq!(
            serde_json::to_string(&data).unwrap(),
            r#"{"event":{"data":{"stdout":"aGkK"}}}"#
        );
        let end = StreamResponse {
            event: ProcessEvent::End(EndEvent {
                exit_code: 3,
                exited: true,
                status: "exit status 3".into(),
                error: None,
            }),
        };
        assert_eq!(
            serde_json::to_string(&end).unwrap(),
            r#"{"event":{"end":{"exitCode":3,"exited":true,"status":"exit status 3"}}}"#
        );
    }

    #[test]
    fn requests_accept_missing_fields() {
        let req: StartRequest = serde_json::from_str(r#"{"process":{"cmd":"/bin/true"}}"#).unwrap();
        assert_eq!(req.process.cmd, "/bin/true");
        assert!(req.process.args.is_empty());
        let signal: SendSignalRequest =
            serde_json::from_str(r#"{"process":{"pid":7},"signal":"SIGNAL_SIGKILL"}"#).unwrap();
        assert_eq!(signal.process, ProcessSelector::Pid(7));
        assert_eq!(signal.signal, Signal::Sigkill);
    }
}
