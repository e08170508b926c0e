//! The `process.Process` service: start processes as a user, stream their output, feed stdin,
//! signal them, and let other clients attach to them.

use std::collections::HashMap;
use std::os::fd::{AsFd as _, OwnedFd};
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
    ProcessInput, ProcessSelector, PtySize, SendInputRequest, SendSignalRequest, Signal, StartEvent, StartRequest,
    StreamInputRequest, StreamResponse, UpdateRequest,
};
use viv_proto::{envelope, ConnectError};

use crate::reaper::{self, Exit};
use crate::server::{connect_error, decode_request, stream_response, unary_ok, AgentState};

/// How often an idle event stream sends a keep-alive message.
const KEEPALIVE: Duration = Duration::from_secs(30);

/// Where a process's input goes.
enum Input {
    /// Its stdin pipe.
    Pipe(pipe::Sender),
    /// The master side of its terminal (input and output; resized with `Update`).
    Pty(Arc<std::fs::File>),
}

impl Input {
    async fn write_all(&mut self, data: Vec<u8>) -> std::io::Result<()> {
        match self {
            Input::Pipe(pipe) => pipe.write_all(&data).await,
            Input::Pty(master) => {
                let master = master.clone();
                tokio::task::spawn_blocking(move || std::io::Write::write_all(&mut &*master, &data))
                    .await
                    .map_err(std::io::Error::other)?
            }
        }
    }
}

/// One process started through the agent.
struct Proc {
    info: ProcessInfo,
    stdin: tokio::sync::Mutex<Option<Input>>,
    /// The terminal's master side, for processes started with a PTY.
    pty: Option<Arc<std::fs::File>>,
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
        .route(&format!("{p}/StreamInput"), post(stream_input))
        .route(&format!("{p}/SendSignal"), post(send_signal))
        .route(&format!("{p}/CloseStdin"), post(close_stdin))
        .route(&format!("{p}/Update"), post(update))
}

async fn start(State(state): State<AgentState>, headers: HeaderMap, body: Bytes) -> Response {
    let result = async {
        let deadline = crate::deadline::from_headers(&headers)?;
        let req: StartRequest = decode_request(&headers, &body)?;
        let user = state.request_user(&headers, None)?;
        let (pid, events) = spawn_process(&state, &user, req)?;
        if let Some(deadline) = deadline {
            tokio::spawn(kill_at(state.clone(), pid, deadline));
        }
        Ok((pid, events, deadline))
    }
    .await;
    match result {
        Ok((pid, events, deadline)) => event_stream(pid, events, deadline),
        Err(err) => stream_response(futures::stream::once(async { Err(err) })),
    }
}

/// Kills a process started with a deadline (its whole group, as envd's process context does
/// to its process) once the deadline passes, if it still runs.
async fn kill_at(state: AgentState, pid: u32, deadline: tokio::time::Instant) {
    let Ok(proc) = state.processes().find(&ProcessSelector::Pid(pid)) else {
        return;
    };
    tokio::time::sleep_until(deadline).await;
    // The table still holding this very process means it has not been reaped, so its pid is
    // still its own.
    let running = state
        .processes()
        .find(&ProcessSelector::Pid(pid))
        .is_ok_and(|now| Arc::ptr_eq(&now, &proc));
    if running {
        signal_group(pid, libc::SIGKILL);
    }
}

/// Sends `sig` to the group a process leads (setsid at spawn), or to the process alone.
fn signal_group(pid: u32, sig: libc::c_int) {
    let pid = pid as libc::pid_t;
    // SAFETY: kill takes plain integers. The process leads its own group (setsid at spawn), so
    // the negative pid reaches its children too; fall back to the pid alone.
    unsafe {
        if libc::kill(-pid, sig) < 0 {
            libc::kill(pid, sig);
        }
    }
}

fn spawn_process(
    state: &AgentState,
    user: &crate::users::User,
    req: StartRequest,
) -> Result<(u32, mpsc::Receiver<ProcessEvent>), ConnectError> {
    let config = req.process.clone();
    if config.cmd.is_empty() {
        return Err(ConnectError::new("invalid_argument", "process.cmd is empty"));
    }
    let cwd = match &config.cwd {
        Some(dir) if !dir.is_empty() => crate::files::resolve_path(user, dir),
        _ => state
            .default_workdir()
            .map(std::path::PathBuf::from)
            .filter(|dir| dir.is_dir())
            .unwrap_or_else(|| user.home.clone().into()),
    };
    if !cwd.is_dir() {
        return Err(ConnectError::new(
            "invalid_argument",
            format!("working directory {} does not exist", cwd.display()),
        ));
    }
    let mut env: Vec<(String, String)> = vec![
        (
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ),
        ("HOME".into(), user.home.clone()),
        ("USER".into(), user.name.clone()),
        ("LOGNAME".into(), user.name.clone()),
        ("SHELL".into(), user.shell.clone()),
    ];
    env.extend(state.env_vars());
    env.extend(config.envs.iter().map(|(k, v)| (k.clone(), v.clone())));
    let internal = |e: std::io::Error| ConnectError::new("internal", format!("starting '{}': {e}", config.cmd));
    // The parent's ends (kept) and the child's (dropped once it started), all close-on-exec.
    let (terminal, stdin_ours, stdout_ours, stderr_ours, child_stdio) = match &req.pty {
        Some(pty) => {
            let size = pty.size.unwrap_or(PtySize { cols: 80, rows: 24 });
            let (master, slave) =
                open_pty(size).map_err(|e| ConnectError::new("internal", format!("opening a terminal: {e}")))?;
            if !config.envs.contains_key("TERM") {
                env.push(("TERM".into(), "xterm-256color".into()));
            }
            let theirs = [
                slave.try_clone().map_err(internal)?,
                slave.try_clone().map_err(internal)?,
                slave,
            ];
            (Some(Arc::new(std::fs::File::from(master))), None, None, None, theirs)
        }
        None => {
            let (stdin_theirs, stdin_ours) = if req.stdin.unwrap_or(false) {
                let (read, write) = crate::spawn::cloexec_pipe().map_err(internal)?;
                (read, Some(write))
            } else {
                (std::fs::File::open("/dev/null").map_err(internal)?.into(), None)
            };
            let (stdout_ours, stdout_theirs) = crate::spawn::cloexec_pipe().map_err(internal)?;
            let (stderr_ours, stderr_theirs) = crate::spawn::cloexec_pipe().map_err(internal)?;
            (
                None,
                stdin_ours,
                Some(stdout_ours),
                Some(stderr_ours),
                [stdin_theirs, stdout_theirs, stderr_theirs],
            )
        }
    };
    let started = reaper::spawn_registered(|| {
        crate::spawn::spawn(crate::spawn::Spawn {
            program: &config.cmd,
            args: &config.args,
            env,
            cwd: &cwd,
            stdio: [child_stdio[0].as_fd(), child_stdio[1].as_fd(), child_stdio[2].as_fd()],
            uid: user.uid,
            gid: user.gid,
            groups: &user.groups,
            controlling_terminal: terminal.is_some(),
        })
    });
    // The child holds its ends (the terminal's slave side among them) now.
    drop(child_stdio);
    let (pid, exit_rx) = started.map_err(|err| {
        let code = if err.kind() == std::io::ErrorKind::NotFound {
            "not_found"
        } else {
            "internal"
        };
        ConnectError::new(code, format!("cannot start '{}': {err}", config.cmd))
    })?;
    let to_pipe = |fd: Option<OwnedFd>| fd.and_then(|fd| pipe::Receiver::from_owned_fd(fd).ok());
    let stdout = to_pipe(stdout_ours);
    let stderr = to_pipe(stderr_ours);
    let stdin = match &terminal {
        Some(master) => Some(Input::Pty(master.clone())),
        None => stdin_ours
            .and_then(|fd| pipe::Sender::from_owned_fd(fd).ok())
            .map(Input::Pipe),
    };
    let proc = Arc::new(Proc {
        info: ProcessInfo {
            config,
            pid,
            tag: req.tag,
        },
        stdin: tokio::sync::Mutex::new(stdin),
        pty: terminal.clone(),
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
        let term = tokio::spawn(pump_terminal(proc.clone(), terminal));
        let _ = out.await;
        let _ = err.await;
        let _ = term.await;
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

/// Copies a terminal's output into `pty` data events until the process side closes.
async fn pump_terminal(proc: Arc<Proc>, master: Option<Arc<std::fs::File>>) {
    let Some(master) = master else { return };
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(16);
    // Reads block; a thread per terminal keeps them off the runtime.
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match std::io::Read::read(&mut &*master, &mut buf) {
                // EIO: every process holding the terminal has exited.
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    while let Some(data) = rx.recv().await {
        proc.emit(ProcessEvent::Data(DataEvent::Pty(data))).await;
    }
}

/// Opens a pseudo-terminal of `size`: (master, slave).
fn open_pty(size: PtySize) -> std::io::Result<(OwnedFd, OwnedFd)> {
    use std::os::fd::FromRawFd as _;
    let mut master: libc::c_int = -1;
    let mut slave: libc::c_int = -1;
    let winsize = window_size(size);
    // SAFETY: openpty writes two descriptors into the given integers and reads the winsize;
    // the name and termios pointers may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &winsize,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: openpty succeeded, so both descriptors are open and owned by nobody else.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    for fd in [&master, &slave] {
        use std::os::fd::AsRawFd as _;
        // SAFETY: fcntl on a descriptor we own; FD_CLOEXEC keeps it out of other children.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok((master, slave))
}

fn window_size(size: PtySize) -> libc::winsize {
    libc::winsize {
        ws_row: size.rows.clamp(1, u16::MAX.into()) as u16,
        ws_col: size.cols.clamp(1, u16::MAX.into()) as u16,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// Streams a process's events: its start, then output and end as they happen; at `deadline`
/// (the request's `Connect-Timeout-Ms`) the stream ends with `deadline_exceeded`.
fn event_stream(
    pid: u32,
    mut events: mpsc::Receiver<ProcessEvent>,
    deadline: Option<tokio::time::Instant>,
) -> Response {
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
                () = until(deadline) => {
                    let _ = tx.send(Err(crate::deadline::exceeded(&format!("process {pid}")))).await;
                    return;
                }
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

/// Waits until `deadline`, or forever without one.
async fn until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
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
    let result = crate::deadline::from_headers(&headers).and_then(|deadline| {
        let req = decode_request::<ConnectRequest>(&headers, &body)?;
        Ok((state.processes().find(&req.process)?, deadline))
    });
    match result {
        Ok((proc, deadline)) => event_stream(proc.info.pid, proc.subscribe(), deadline),
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
        write_input(&proc, req.input).await?;
        Ok(Empty {})
    }
    .await;
    unary_result(result)
}

/// `StreamInput`: a client stream naming a process, then carrying its input in order. The
/// answer (one empty message) comes once the client ends the stream.
async fn stream_input(State(state): State<AgentState>, body: axum::body::Body) -> Response {
    use futures::StreamExt as _;
    let result = async {
        let mut chunks = body.into_data_stream();
        let mut decoder = envelope::Decoder::default();
        let mut target: Option<Arc<Proc>> = None;
        loop {
            while let Some(frame) = decoder
                .next_frame()
                .map_err(|e| ConnectError::new("invalid_argument", e.to_string()))?
            {
                if frame.is_end() {
                    return Ok(());
                }
                let message: StreamInputRequest = serde_json::from_slice(&frame.data)
                    .map_err(|e| ConnectError::new("invalid_argument", format!("malformed request: {e}")))?;
                match message {
                    StreamInputRequest::Start(selector) => target = Some(state.processes().find(&selector.process)?),
                    StreamInputRequest::Data(data) => {
                        let proc = target.as_ref().ok_or_else(|| {
                            ConnectError::new("invalid_argument", "the stream must name its process first (start)")
                        })?;
                        write_input(proc, data.input).await?;
                    }
                    StreamInputRequest::Keepalive(_) => {}
                }
            }
            match chunks.next().await {
                Some(Ok(chunk)) => decoder.push(&chunk),
                Some(Err(err)) => return Err(ConnectError::new("canceled", format!("the input stream broke: {err}"))),
                None => return Ok(()),
            }
        }
    }
    .await;
    stream_response(futures::stream::once(async move {
        result.map(|()| envelope::encode_json(&Empty {}))
    }))
}

/// Writes input bytes to a process's stdin or terminal.
async fn write_input(proc: &Proc, input: ProcessInput) -> Result<(), ConnectError> {
    let data = match input {
        ProcessInput::Stdin(data) | ProcessInput::Pty(data) => data,
    };
    let mut stdin = proc.stdin.lock().await;
    let pipe = stdin.as_mut().ok_or_else(|| {
        ConnectError::new(
            "failed_precondition",
            "the process's stdin is not open (start it with stdin: true)",
        )
    })?;
    pipe.write_all(data)
        .await
        .map_err(|e| ConnectError::new("failed_precondition", format!("writing to stdin: {e}")))
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
        signal_group(proc.info.pid, sig);
        Ok(Empty {})
    })();
    unary_result(result)
}

/// `Update`: resizes a process's terminal.
async fn update(State(state): State<AgentState>, headers: HeaderMap, body: Bytes) -> Response {
    let result = (|| {
        let req: UpdateRequest = decode_request(&headers, &body)?;
        let proc = state.processes().find(&req.process)?;
        let Some(size) = req.pty.and_then(|p| p.size) else {
            return Ok(Empty {});
        };
        let master = proc
            .pty
            .as_ref()
            .ok_or_else(|| ConnectError::new("failed_precondition", "the process was not started with a terminal"))?;
        use std::os::fd::AsRawFd as _;
        let winsize = window_size(size);
        // SAFETY: TIOCSWINSZ reads a winsize from a valid pointer; the descriptor is the open
        // master side of the process's terminal.
        if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &winsize) } < 0 {
            return Err(ConnectError::new(
                "internal",
                format!("resizing the terminal: {}", std::io::Error::last_os_error()),
            ));
        }
        Ok(Empty {})
    })();
    unary_result(result)
}

fn unary_result<T: serde::Serialize>(result: Result<T, ConnectError>) -> Response {
    match result {
        Ok(message) => unary_ok(&message),
        Err(err) => connect_error(err),
    }
}
