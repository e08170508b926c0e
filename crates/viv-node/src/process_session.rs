//! Interactive processes in a live sandbox over the agent channel: the primitive behind the
//! terminal WebSocket (`GET /sandboxes/{id}/terminal`) and the SSH gateway.
//!
//! [`ProcessSession::open`] starts a process through the agent's `process.Process/Start`
//! (under a PTY of a given size, or with pipes and stdin kept open) and splits into:
//! - [`SessionEvents`]: the process's output as [`SessionEvent`]s (stdout, stderr or terminal
//!   bytes), ended by exactly one [`SessionEvent::Exit`] or [`SessionEvent::Error`], after which
//!   it yields `None`;
//! - [`SessionInput`]: a cloneable handle to write input, resize the terminal, send a signal,
//!   close stdin, or kill the process.
//!
//! Invariants:
//! - input is delivered in the order it was given: writes, resizes and `close_stdin` go through
//!   one bounded queue served by one task, which merges queued writes into one `SendInput` of at
//!   most [`MAX_INPUT_CHUNK`] bytes; a writer waits when the queue is full (a process that does
//!   not read its input never makes the server buffer without limit). The first failed write
//!   stops the queue, and every later call returns that failure (a failed resize or stdin close
//!   is only returned to its caller);
//! - signals (and [`SessionInput::kill`]) bypass the queue, so a kill never waits behind input;
//! - output is read only as fast as the caller asks for it (`next`), so a slow consumer holds the
//!   agent back through HTTP/2 flow control instead of filling memory;
//! - the event stream never hangs on a sandbox that went away: it ends with an error when the
//!   channel breaks, when the sandbox's VM stops (for a [`crate::manager::LiveSandbox`] target),
//!   or when the agent sent nothing, not even its 30-second keep-alive, for [`IDLE_LIMIT`];
//! - dropping a [`SessionEvents`] before the process ended kills the process (its process group,
//!   with SIGKILL) unless [`SessionEvents::detach`] was called; calls to the agent other than
//!   input writes are bounded by [`CALL_TIMEOUT`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper::body::Incoming;
use tokio::sync::{mpsc, oneshot, watch};
use viv_proto::envelope;
use viv_proto::process::{
    CloseStdinRequest, DataEvent, Empty, ProcessConfig, ProcessEvent, ProcessInput, ProcessSelector, Pty, PtySize,
    SendInputRequest, SendSignalRequest, Signal, StartRequest, UpdateRequest,
};
use viv_vmm::VmExit;

use crate::agent_client::{next_event, AgentClient, AgentError};
use crate::manager::LiveSandbox;

/// The most input bytes sent to the agent in one call.
pub const MAX_INPUT_CHUNK: usize = 64 * 1024;
/// Input operations queued before a writer waits.
pub const INPUT_QUEUE: usize = 64;
/// How long the event stream waits for any message of the agent (it sends a keep-alive every
/// 30 seconds) before it gives up on the sandbox.
pub const IDLE_LIMIT: Duration = Duration::from_secs(90);
/// The bound on a resize, signal or stdin close call.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// Something whose agent a session talks to: a live sandbox (whose VM's stop also ends the
/// session's events) or a bare [`AgentClient`].
pub trait AgentTarget: Send + Sync + 'static {
    /// The agent client.
    fn agent(&self) -> &AgentClient;
    /// Watches the VM behind the agent stopping, when the target knows it.
    fn vm_exit(&self) -> Option<watch::Receiver<Option<VmExit>>> {
        None
    }
}

impl AgentTarget for AgentClient {
    fn agent(&self) -> &AgentClient {
        self
    }
}

impl AgentTarget for LiveSandbox {
    fn agent(&self) -> &AgentClient {
        &self.agent
    }

    fn vm_exit(&self) -> Option<watch::Receiver<Option<VmExit>>> {
        Some(self.vm.exit())
    }
}

/// What to run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessSpec {
    /// The program; looked up in `PATH` when it has no slash.
    pub cmd: String,
    /// Its arguments, not including the program name.
    pub args: Vec<String>,
    /// Environment variables added to the sandbox's defaults.
    pub envs: BTreeMap<String, String>,
    /// The working directory; the user's home (or the template's workdir) when `None`.
    pub cwd: Option<String>,
}

impl ProcessSpec {
    /// The user's login shell (`$SHELL -l`, `/bin/sh` when the user has none), interactive, or
    /// running `command` with `-c`.
    pub fn login_shell(command: Option<&str>) -> Self {
        let mut args = vec!["-c".to_owned()];
        match command {
            None => args.push(r#"exec "${SHELL:-/bin/sh}" -l"#.to_owned()),
            Some(command) => args.extend([
                r#"exec "${SHELL:-/bin/sh}" -l -c "$1""#.to_owned(),
                "sh".to_owned(),
                command.to_owned(),
            ]),
        }
        Self {
            cmd: "/bin/sh".into(),
            args,
            ..Self::default()
        }
    }
}

/// Why a session could not start or stopped working.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The agent refused or failed a call (the process could not start, an input call failed).
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The sandbox's VM stopped.
    #[error("the sandbox stopped: {0}")]
    SandboxStopped(String),
    /// The agent sent nothing for too long.
    #[error("the sandbox's agent sent nothing for {0:?}")]
    Idle(Duration),
    /// The process's input is closed: an earlier input call failed (its message), or the
    /// session's input task is gone.
    #[error("the process's input is closed: {0}")]
    InputClosed(String),
    /// A resize of a process started without a terminal.
    #[error("the process was not started with a terminal")]
    NoTerminal,
}

/// How the process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitStatus {
    /// Its exit code, or -1 when a signal killed it.
    pub code: i32,
    /// Whether it exited by itself (rather than by a signal).
    pub exited: bool,
    /// A description such as `exit status 1` or `signal: killed`.
    pub status: String,
}

/// One event of a session's output.
#[derive(Debug)]
pub enum SessionEvent {
    /// Bytes the process wrote to stdout.
    Stdout(Bytes),
    /// Bytes the process wrote to stderr.
    Stderr(Bytes),
    /// Bytes the process wrote to its terminal.
    Pty(Bytes),
    /// The process ended (the last event).
    Exit(ExitStatus),
    /// The session broke before the process's end was seen (the last event).
    Error(SessionError),
}

/// A process started in a sandbox: its pid, its output events and its input handle.
pub struct ProcessSession {
    pid: u32,
    events: SessionEvents,
    input: SessionInput,
}

impl std::fmt::Debug for ProcessSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessSession").field("pid", &self.pid).finish()
    }
}

impl ProcessSession {
    /// Starts `spec` as `user` (the sandbox's default user when `None`) in the sandbox behind
    /// `target`: under a terminal of `pty` size, or, without one, with stdout and stderr piped
    /// and stdin open for [`SessionInput::write`] until [`SessionInput::close_stdin`].
    pub async fn open<T: AgentTarget>(
        target: Arc<T>,
        user: Option<&str>,
        spec: ProcessSpec,
        pty: Option<PtySize>,
    ) -> Result<Self, SessionError> {
        let target: Arc<dyn AgentTarget> = target;
        let start = StartRequest {
            process: ProcessConfig {
                cmd: spec.cmd,
                args: spec.args,
                envs: spec.envs,
                cwd: spec.cwd,
            },
            pty: pty.map(|size| Pty { size: Some(size) }),
            tag: None,
            stdin: Some(true),
        };
        let mut vm_exit = target.vm_exit();
        let started = target.agent().start_process(&start, user);
        let (pid, body, decoder) = match vm_exit.as_mut() {
            Some(exit) => tokio::select! {
                started = started => started?,
                reason = stopped(exit) => return Err(SessionError::SandboxStopped(reason)),
            },
            None => started.await?,
        };
        let input = SessionInput::start(target.clone(), pid, pty.is_some());
        let events = SessionEvents {
            pid,
            body,
            decoder,
            vm_exit,
            done: false,
            kill_on_drop: Some(input.clone()),
            idle_limit: IDLE_LIMIT,
        };
        Ok(Self { pid, events, input })
    }

    /// The process's pid in the guest.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// A handle to the process's input (cloneable).
    pub fn input(&self) -> SessionInput {
        self.input.clone()
    }

    /// The next output event (see [`SessionEvents::next`]).
    pub async fn next(&mut self) -> Option<SessionEvent> {
        self.events.next().await
    }

    /// Kills the process (see [`SessionInput::kill`]).
    pub async fn kill(&self) -> Result<(), SessionError> {
        self.input.kill().await
    }

    /// The input handle and the event stream, to be driven from different tasks.
    pub fn into_parts(self) -> (SessionInput, SessionEvents) {
        (self.input, self.events)
    }
}

/// A session's output events. Dropping it before the process ended kills the process, unless
/// [`SessionEvents::detach`] was called.
pub struct SessionEvents {
    pid: u32,
    body: Incoming,
    decoder: envelope::Decoder,
    vm_exit: Option<watch::Receiver<Option<VmExit>>>,
    done: bool,
    kill_on_drop: Option<SessionInput>,
    idle_limit: Duration,
}

impl std::fmt::Debug for SessionEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionEvents")
            .field("pid", &self.pid)
            .field("done", &self.done)
            .finish()
    }
}

impl SessionEvents {
    /// The next event: output, then one [`SessionEvent::Exit`] or [`SessionEvent::Error`];
    /// `None` after that. Cancel-safe: dropping the future loses no output.
    pub async fn next(&mut self) -> Option<SessionEvent> {
        if self.done {
            return None;
        }
        let event = self.read().await;
        if matches!(event, SessionEvent::Exit(_) | SessionEvent::Error(_)) {
            self.done = true;
        }
        Some(event)
    }

    /// Leaves the process running when this stream is dropped before its end.
    pub fn detach(&mut self) {
        self.kill_on_drop = None;
    }

    /// The process's pid in the guest.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    async fn read(&mut self) -> SessionEvent {
        loop {
            let next = tokio::time::timeout(self.idle_limit, next_event(&mut self.body, &mut self.decoder));
            let next = match self.vm_exit.as_mut() {
                Some(exit) => tokio::select! {
                    biased;
                    next = next => next,
                    reason = stopped(exit) => return SessionEvent::Error(SessionError::SandboxStopped(reason)),
                },
                None => next.await,
            };
            let event = match next {
                Err(_) => return SessionEvent::Error(SessionError::Idle(self.idle_limit)),
                Ok(Err(err)) => return SessionEvent::Error(err.into()),
                Ok(Ok(None)) => {
                    return SessionEvent::Error(SessionError::Agent(AgentError::Decode(
                        "the process stream ended without an exit status".into(),
                    )))
                }
                Ok(Ok(Some(event))) => event,
            };
            return match event {
                ProcessEvent::Data(DataEvent::Stdout(data)) => SessionEvent::Stdout(data.into()),
                ProcessEvent::Data(DataEvent::Stderr(data)) => SessionEvent::Stderr(data.into()),
                ProcessEvent::Data(DataEvent::Pty(data)) => SessionEvent::Pty(data.into()),
                ProcessEvent::End(end) => match end.error {
                    Some(error) => SessionEvent::Error(SessionError::Agent(AgentError::Rpc {
                        status: 500,
                        code: "unknown".into(),
                        message: error,
                    })),
                    None => SessionEvent::Exit(ExitStatus {
                        code: end.exit_code,
                        exited: end.exited,
                        status: end.status,
                    }),
                },
                ProcessEvent::Start(_) | ProcessEvent::Keepalive(_) => continue,
            };
        }
    }
}

impl Drop for SessionEvents {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let Some(input) = self.kill_on_drop.take() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(err) = input.kill().await {
                    tracing::debug!(pid = input.pid(), error = %err, "killing a session's process");
                }
            });
        }
    }
}

/// Waits until the VM has stopped; its reason. Never returns if the watch is gone.
async fn stopped(exit: &mut watch::Receiver<Option<VmExit>>) -> String {
    let reason = match exit.wait_for(Option::is_some).await {
        Ok(exit) => Some(exit.as_ref().map(|e| e.reason.clone()).unwrap_or_default()),
        Err(_) => None,
    };
    match reason {
        Some(reason) => reason,
        None => std::future::pending().await,
    }
}

/// An input operation, in order.
enum Op {
    Data(Bytes),
    Resize(PtySize, oneshot::Sender<Result<(), SessionError>>),
    CloseStdin(oneshot::Sender<Result<(), SessionError>>),
}

/// The input side of a session (cheap to clone; every clone feeds the same ordered queue).
#[derive(Clone)]
pub struct SessionInput {
    shared: Arc<InputShared>,
}

struct InputShared {
    target: Arc<dyn AgentTarget>,
    pid: u32,
    pty: bool,
    queue: mpsc::Sender<Op>,
    /// Why the queue stopped, once an input call failed.
    failed: Arc<Mutex<Option<String>>>,
}

impl std::fmt::Debug for SessionInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionInput")
            .field("pid", &self.shared.pid)
            .field("pty", &self.shared.pty)
            .finish()
    }
}

impl SessionInput {
    fn start(target: Arc<dyn AgentTarget>, pid: u32, pty: bool) -> Self {
        let (queue, ops) = mpsc::channel(INPUT_QUEUE);
        let failed = Arc::new(Mutex::new(None));
        tokio::spawn(serve_input(target.clone(), pid, pty, ops, failed.clone()));
        Self {
            shared: Arc::new(InputShared {
                target,
                pid,
                pty,
                queue,
                failed,
            }),
        }
    }

    /// The process's pid in the guest.
    pub fn pid(&self) -> u32 {
        self.shared.pid
    }

    /// Whether the process runs under a terminal.
    pub fn has_pty(&self) -> bool {
        self.shared.pty
    }

    /// Queues bytes for the process's terminal (or stdin); waits while the queue is full. An
    /// error means the input is closed (an earlier call failed, with its reason).
    pub async fn write(&self, data: Bytes) -> Result<(), SessionError> {
        if data.is_empty() {
            return Ok(());
        }
        self.enqueue(Op::Data(data)).await
    }

    /// Resizes the process's terminal, after the input queued before; returns once the agent
    /// answered.
    pub async fn resize(&self, cols: u16, rows: u16) -> Result<(), SessionError> {
        if !self.shared.pty {
            return Err(SessionError::NoTerminal);
        }
        let size = PtySize {
            cols: cols.max(1).into(),
            rows: rows.max(1).into(),
        };
        let (tx, rx) = oneshot::channel();
        self.enqueue(Op::Resize(size, tx)).await?;
        self.answer(rx).await
    }

    /// Closes the process's stdin (end of input) once the input queued before is delivered;
    /// returns once the agent answered.
    pub async fn close_stdin(&self) -> Result<(), SessionError> {
        let (tx, rx) = oneshot::channel();
        self.enqueue(Op::CloseStdin(tx)).await?;
        self.answer(rx).await
    }

    /// Sends `signal` to the process's group now, ahead of queued input.
    pub async fn signal(&self, signal: Signal) -> Result<(), SessionError> {
        let request = SendSignalRequest {
            process: ProcessSelector::Pid(self.shared.pid),
            signal,
        };
        bounded(
            self.shared
                .target
                .agent()
                .call::<_, Empty>("/process.Process/SendSignal", &request),
        )
        .await
    }

    /// Kills the process's group (SIGKILL) now.
    pub async fn kill(&self) -> Result<(), SessionError> {
        self.signal(Signal::Sigkill).await
    }

    async fn enqueue(&self, op: Op) -> Result<(), SessionError> {
        if self.shared.queue.send(op).await.is_ok() {
            return Ok(());
        }
        Err(self.closed())
    }

    async fn answer(&self, rx: oneshot::Receiver<Result<(), SessionError>>) -> Result<(), SessionError> {
        match rx.await {
            Ok(result) => result,
            Err(_) => Err(self.closed()),
        }
    }

    fn closed(&self) -> SessionError {
        let why = self.shared.failed.lock().expect("failure lock").clone();
        SessionError::InputClosed(why.unwrap_or_else(|| "the session ended".into()))
    }
}

/// Bounds a unary agent call by [`CALL_TIMEOUT`].
async fn bounded<F>(call: F) -> Result<(), SessionError>
where
    F: std::future::Future<Output = Result<Empty, AgentError>>,
{
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(Empty {})) => Ok(()),
        Ok(Err(err)) => Err(err.into()),
        Err(_) => Err(AgentError::Timeout(CALL_TIMEOUT).into()),
    }
}

/// Serves a session's input queue in order (see the module's invariants) until every handle is
/// gone or a call fails.
async fn serve_input(
    target: Arc<dyn AgentTarget>,
    pid: u32,
    pty: bool,
    mut ops: mpsc::Receiver<Op>,
    failed: Arc<Mutex<Option<String>>>,
) {
    let agent = || target.agent();
    let process = ProcessSelector::Pid(pid);
    let mut held: Option<Op> = None;
    loop {
        let op = match held.take() {
            Some(op) => op,
            None => match ops.recv().await {
                Some(op) => op,
                None => return,
            },
        };
        let result = match op {
            Op::Data(first) => {
                let mut data = BytesMut::from(first.as_ref());
                // Merge what else is queued already: fewer round trips through the channel.
                while data.len() < MAX_INPUT_CHUNK {
                    match ops.try_recv() {
                        Ok(Op::Data(more)) => data.extend_from_slice(&more),
                        Ok(other) => {
                            held = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                let data = data.to_vec();
                let input = if pty {
                    ProcessInput::Pty(data)
                } else {
                    ProcessInput::Stdin(data)
                };
                let request = SendInputRequest {
                    process: process.clone(),
                    input,
                };
                agent()
                    .call::<_, Empty>("/process.Process/SendInput", &request)
                    .await
                    .map(|Empty {}| ())
                    .map_err(SessionError::from)
            }
            Op::Resize(size, answer) => {
                let request = UpdateRequest {
                    process: process.clone(),
                    pty: Some(Pty { size: Some(size) }),
                };
                // A failed resize is the caller's to handle; it does not close the input.
                let _ = answer.send(bounded(agent().call::<_, Empty>("/process.Process/Update", &request)).await);
                Ok(())
            }
            Op::CloseStdin(answer) => {
                let request = CloseStdinRequest {
                    process: process.clone(),
                };
                let _ = answer.send(bounded(agent().call::<_, Empty>("/process.Process/CloseStdin", &request)).await);
                Ok(())
            }
        };
        if let Err(err) = result {
            *failed.lock().expect("failure lock") = Some(err.to_string());
            // Pending operations fail with the recorded reason.
            ops.close();
            while let Ok(op) = ops.try_recv() {
                drop(op);
            }
            return;
        }
    }
}

#[cfg(test)]
#[path = "process_session_tests.rs"]
mod tests;
