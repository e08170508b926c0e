//! The `process.Process` service: start processes as a user, stream their output, feed stdin,
//! signal them, and let other clients attach to them.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::mpsc;
use viv_proto::process::{
    CloseStdinRequest, ConnectRequest, DataEvent, Empty, EndEvent, ListResponse, ProcessEvent, ProcessInfo,
    ProcessInput, ProcessSelector, SendInputRequest, SendSignalRequest, Signal, StartEvent, StartRequest,
    StreamResponse, UpdateRequest,
};
use viv_proto::{envelope, ConnectError};

use crate::reaper::{self, Exit};
use crate::server::{connect_error, decode_request, stream_response, unary_ok, AgentState};

/// How often an idle event stream sends a keep-alive message.
const KEEPALIVE: Duration = Duration::from_secs(30);

/// One process started through the agent.
struct Proc {
    info: ProcessInfo,
    stdin: tokio::sync::Mutex<Option<pipe::Sender>>,
    subscribers: Mutex<Vec<mpsc::Sender<ProcessEvent>>>,
}

impl Proc {
    fn subscribe(&self) -> mpsc::Receiver<ProcessEvent> {
        let (tx, rx) = mpsc::channel(64);
        self.subscribers.lock().expect("subscribers lock").push(tx);
        rx
    }

    /// Delivers an event to every subscriber, waiting for slow ones (output is never dropped).
    async fn emit(&self, event: ProcessEvent) {
        let subscribers = self.subscribers.lock().expect("subscribers lock").clone();
        for tx in subscribers {
            let _ = tx.send(event.clone()).await;
        }
        self.subscribers
            .lock()
            .expect("subscribers lock")
            .retain(|tx| !tx.is_closed());
    }
}

/// The processes the agent started and that are still running, by pid.
#[derive(Default)]
pub struct ProcessTable {
    procs: Mutex<HashMap<u32, Arc<Proc>>>,
}

impl ProcessTable {
    fn find(&self, selector: &ProcessSelector) -> Result<Arc<Proc>, ConnectError> {
        let procs = self.procs.lock().expect("process table lock");
        let found = match selector {
            ProcessSelector::Pid(pid) => procs.get(pid).cloned(),
            ProcessSelector::Tag(tag) => procs
                .values()
                .find(|p| p.info.tag.as_deref() == Some(tag.as_str()))
                .cloned(),
        };
        found.ok_or_else(|| ConnectError::new("not_found", format!("process {selector:?} not found")))
    }
}

/// Routes of the service.
pub fn routes() -> Router<AgentState> {
    let p = viv_proto::process::SERVICE;
    Router::new()
        .route(&format!("{p}/Start"), post(start))
        .route(&format!("{p}/Connect"), post(connect))
        .route(&format!("{p}/List"), post(list))
        .route(&format!("{p}/SendInput"), post(send_input))
        .route(&format!("{p}/SendSignal"), post(send_signal))
        .route(&format!("{p}/CloseStdin"), post(close_stdin))
        .route(&format!("{p}/Update"), post(update))
}

async fn start(State(state): State<AgentState>, headers: HeaderMap, body: Bytes) -> Response {
    let result = async {
        let req: StartRequest = decode_request(&headers, &body)?;
        let user = state.request_user(&headers, None)?;
        spawn_process(&state, &user, req)
    }
    .await;
    match result {
        Ok((pid, events)) => event_stream(pid, events),
        Err(err) => stream_response(futures::stream::once(async { Err(err) })),
    }
}

fn spawn_process(
    state: &AgentState,
    user: &crate::users::User,
    req: StartRequest,
) -> Result<(u32, mpsc::Receiver<ProcessEvent>), ConnectError> {
    if req.pty.is_some() {
        return Err(ConnectError::new(
            "unimplemented",
            "PTY processes are not supported yet",
        ));
    }
    let config = req.process.clone();
    if config.cmd.is_empty() {
        return Err(ConnectError::new("invalid_argument", "process.cmd is empty"));
    }
    let cwd = match &config.cwd {
        Some(dir) if !dir.is_empty() => crate::files::resolve_path(user, dir),
        _ => user.home.clone().into(),
    };
    if !cwd.is_dir() {
        return Err(ConnectError::new(
            "invalid_argument",
            format!("working directory {} does not exist", cwd.display()),
        ));
    }
    let mut command = Command::new(&config.cmd);
    command
        .args(&config.args)
        .env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", &user.home)
        .env("USER", &user.name)
        .env("LOGNAME", &user.name)
        .env("SHELL", &user.shell)
        .envs(state.env_vars())
        .envs(&config.envs)
        .current_dir(&cwd)
        .stdin(if req.stdin.unwrap_or(false) {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (uid, gid, groups) = (user.uid, user.gid, user.groups.clone());
    // SAFETY: the closure runs in the child between fork and exec and only makes async-signal-safe
    // system calls on memory captured before the fork. std runs pre_exec closures after its own
    // uid/gid handling, so the identity switch happens here, groups first, uid last.
    unsafe {
        command.pre_exec(move || {
            let fail = || Err(std::io::Error::last_os_error());
            if libc::setsid() < 0 || libc::setgroups(groups.len(), groups.as_ptr()) < 0 {
                return fail();
            }
            if libc::setgid(gid) < 0 || libc::setuid(uid) < 0 {
                return fail();
            }
            Ok(())
        });
    }
    let (mut child, exit_rx) = reaper::spawn(&mut command).map_err(|err| {
        let code = if err.kind() == std::io::ErrorKind::NotFound {
            "not_found"
        } else {
            "internal"
        };
        ConnectError::new(code, format!("cannot start '{}': {err}", config.cmd))
    })?;
    let pid = child.id();
    let to_pipe = |fd: Option<OwnedFd>| fd.and_then(|fd| pipe::Receiver::from_owned_fd(fd).ok());
    let stdout = to_pipe(child.stdout.take().map(Into::into));
    let stderr = to_pipe(child.stderr.take().map(Into::into));
    let stdin = child
        .stdin
        .take()
        .and_then(|s| pipe::Sender::from_owned_fd(s.into()).ok());
    let proc = Arc::new(Proc {
        info: ProcessInfo {
            config,
            pid,
            tag: req.tag,
        },
        stdin: tokio::sync::Mutex::new(stdin),
        subscribers: Mutex::new(Vec::new()),
    });
    let events = proc.subscribe();
    state
        .processes()
        .procs
        .lock()
        .expect("process table lock")
        .insert(pid, proc.clone());
    let table = state.clone();
    tokio::spawn(async move {
        let out = tokio::spawn(pump(proc.clone(), stdout, false));
        let err = tokio::spawn(pump(proc.clone(), stderr, true));
        let _ = out.await;
        let _ = err.await;
        let exit = exit_rx.await.unwrap_or(Exit::Signal(libc::SIGKILL));
        table.processes().procs.lock().expect("process table lock").remove(&pid);
        proc.emit(ProcessEvent::End(end_event(exit))).await;
    });
    Ok((pid, events))
}

fn end_event(exit: Exit) -> EndEvent {
    match exit {
        Exit::Code(code) => EndEvent {
            exit_code: code,
            exited: true,
            status: format!("exit status {code}"),
            error: None,
        },
        Exit::Signal(sig) => EndEvent {
            exit_code: -1,
            exited: false,
            status: format!("signal: {}", signal_name(sig)),
            error: None,
        },
    }
}

fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGKILL => "killed".into(),
        libc::SIGTERM => "terminated".into(),
        libc::SIGINT => "interrupt".into(),
        libc::SIGHUP => "hangup".into(),
        libc::SIGPIPE => "broken pipe".into(),
        libc::SIGSEGV => "segmentation fault".into(),
        libc::SIGABRT => "aborted".into(),
        other => format!("signal {other}"),
    }
}

/// Copies one output pipe into data events until it closes.
async fn pump(proc: Arc<Proc>, pipe: Option<pipe::Receiver>, is_stderr: bool) {
    let Some(mut pipe) = pipe else { return };
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let data = buf[..n].to_vec();
                let event = if is_stderr {
                    DataEvent::Stderr(data)
                } else {
                    DataEvent::Stdout(data)
                };
                proc.emit(ProcessEvent::Data(event)).await;
            }
        }
    }
}

/// Streams a process's events: its start, then output and end as they happen.
fn event_stream(pid: u32, mut events: mpsc::Receiver<ProcessEvent>) -> Response {
    let stream = async_stream(move |tx| async move {
        let start = StreamResponse {
            event: ProcessEvent::Start(StartEvent { pid }),
        };
        if tx.send(Ok(envelope::encode_json(&start))).await.is_err() {
            return;
        }
        loop {
            let event = tokio::select! {
                event = events.recv() => match event {
                    Some(event) => event,
                    None => return,
                },
                () = tokio::time::sleep(KEEPALIVE) => ProcessEvent::Keepalive(Default::default()),
            };
            let done = matches!(event, ProcessEvent::End(_));
            if tx
                .send(Ok(envelope::encode_json(&StreamResponse { event })))
                .await
                .is_err()
                || done
            {
                return;
            }
        }
    });
    stream_response(stream)
}

/// A stream fed by a task through a channel.
fn async_stream<F, Fut>(body: F) -> impl futures::Stream<Item = Result<Bytes, ConnectError>>
where
    F: FnOnce(mpsc::Sender<Result<Bytes, ConnectError>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(body(tx));
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

async fn connect(State(state): State<AgentState>, headers: HeaderMap, body: Bytes) -> Response {
    let result = decode_request::<ConnectRequest>(&headers, &body).and_then(|req| state.processes().find(&req.process));
    match result {
        Ok(proc) => event_stream(proc.info.pid, proc.subscribe()),
        Err(err) => stream_response(futures::stream::once(async { Err(err) })),
    }
}

async fn list(State(state): State<AgentState>) -> Response {
    let mut processes: Vec<ProcessInfo> = state
        .processes()
        .procs
        .lock()
        .expect("process table lock")
        .values()
        .map(|p| p.info.clone())
        .collect();
    processes.sort_by_key(|p| p.pid);
    unary_ok(&ListResponse { processes })
}

async fn send_input(State(state): State<AgentState>, headers: HeaderMap, body: Bytes) -> Response {
    let result = async {
        let req: SendInputRequest = decode_request(&headers, &body)?;
        let proc = state.processes().find(&req.process)?;
        let data = match req.input {
            ProcessInput::Stdin(data) | ProcessInput::Pty(data) => data,
        };
        let mut stdin = proc.stdin.lock().await;
        let pipe = stdin.as_mut().ok_or_else(|| {
            ConnectError::new(
                "failed_precondition",
                "the process's stdin is not open (start it with stdin: true)",
            )
        })?;
        pipe.write_all(&data)
            .await
            .map_err(|e| ConnectError::new("failed_precondition", format!("writing to stdin: {e}")))?;
        Ok(Empty {})
    }
    .await;
    unary_result(result)
}

async fn close_stdin(State(state): State<AgentState>, headers: HeaderMap, body: Bytes) -> Response {
    let result = async {
        let req: CloseStdinRequest = decode_request(&headers, &body)?;
        let proc = state.processes().find(&req.process)?;
        proc.stdin.lock().await.take();
        Ok(Empty {})
    }
    .await;
    unary_result(result)
}

async fn send_signal(State(state): State<AgentState>, headers: HeaderMap, body: Bytes) -> Response {
    let result = (|| {
        let req: SendSignalRequest = decode_request(&headers, &body)?;
        let proc = state.processes().find(&req.process)?;
        let sig = match req.signal {
            Signal::Sigkill => libc::SIGKILL,
            Signal::Sigterm => libc::SIGTERM,
            Signal::Unspecified => {
                return Err(ConnectError::new("invalid_argument", "no signal given"));
            }
        };
        let pid = proc.info.pid as libc::pid_t;
        // SAFETY: kill takes plain integers. The process leads its own group (setsid at spawn), so
        // the negative pid reaches its children too; fall back to the pid alone.
        unsafe {
            if libc::kill(-pid, sig) < 0 {
                libc::kill(pid, sig);
            }
        }
        Ok(Empty {})
    })();
    unary_result(result)
}

async fn update(State(state): State<AgentState>, headers: HeaderMap, body: Bytes) -> Response {
    let result = decode_request::<UpdateRequest>(&headers, &body)
        .and_then(|req| state.processes().find(&req.process))
        .and_then(|_| Err(ConnectError::new("unimplemented", "PTY resize is not supported yet")));
    unary_result::<Empty>(result)
}

fn unary_result<T: serde::Serialize>(result: Result<T, ConnectError>) -> Response {
    match result {
        Ok(message) => unary_ok(&message),
        Err(err) => connect_error(err),
    }
}
