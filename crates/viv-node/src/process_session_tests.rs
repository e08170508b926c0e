//! Unit tests of [`super`] against a scripted agent on a Unix socket: the reset handshake and
//! HTTP/2 as the real agent speaks them, the process service's calls recorded for inspection.
//! (The path through a real guest agent is tested end to end by the terminal WebSocket tests.)

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixListener;
use viv_proto::process::{EndEvent, StartEvent, StreamResponse};

use super::*;

/// A call the scripted agent received.
#[derive(Debug)]
struct Call {
    path: String,
    headers: hyper::HeaderMap,
    body: serde_json::Value,
}

/// How the scripted agent answers.
#[derive(Clone, Default)]
struct Script {
    /// `Start` fails with this status and Connect error body.
    start_error: Option<(u16, &'static str)>,
    /// `SendInput` fails.
    fail_input: bool,
}

struct FakeAgent {
    _dir: tempfile::TempDir,
    client: Arc<AgentClient>,
    calls: mpsc::UnboundedReceiver<Call>,
    /// Frames of the `Start` stream after its start event.
    stream: mpsc::Receiver<mpsc::Sender<Bytes>>,
    /// Cuts the connection when sent (or dropped).
    cut: Option<oneshot::Sender<()>>,
}

impl FakeAgent {
    async fn start(script: Script) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let (calls_tx, calls) = mpsc::unbounded_channel();
        let (streams_tx, stream) = mpsc::channel(4);
        let (cut, cut_rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            // The reset marker with the empty key: prefix, key, NUL, nonce, NUL.
            let mut marker = vec![0u8; viv_proto::channel::RESET_PREFIX.len() + 1 + viv_proto::channel::NONCE_LEN + 1];
            conn.read_exact(&mut marker).await.unwrap();
            let nonce = &marker[marker.len() - 1 - viv_proto::channel::NONCE_LEN..marker.len() - 1];
            conn.write_all(&viv_proto::channel::ready_marker(nonce)).await.unwrap();
            // As the agent does, speak HTTP/2 only once the host's preface arrived (the host
            // takes any byte after the channel answer for a broken channel).
            let mut preface = vec![0u8; 24];
            conn.read_exact(&mut preface).await.unwrap();
            let (reader, writer) = conn.into_split();
            let conn = tokio::io::join(std::io::Cursor::new(preface).chain(reader), writer);
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let calls = calls_tx.clone();
                let streams = streams_tx.clone();
                let script = script.clone();
                async move { Ok::<_, Infallible>(answer(request, calls, streams, script).await) }
            });
            let serve = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(conn), service);
            tokio::select! {
                _ = serve => {}
                _ = cut_rx => {}
            }
        });
        Self {
            _dir: dir,
            client: Arc::new(AgentClient::new(socket)),
            calls,
            stream,
            cut: Some(cut),
        }
    }

    /// The next call the agent received, other than `Start`.
    async fn call(&mut self) -> Call {
        tokio::time::timeout(Duration::from_secs(10), self.calls.recv())
            .await
            .expect("a call within 10 s")
            .expect("the agent runs")
    }

    /// The sender of the open `Start` stream's frames.
    async fn started(&mut self) -> mpsc::Sender<Bytes> {
        self.stream.recv().await.expect("a Start stream")
    }
}

async fn answer(
    request: Request<Incoming>,
    calls: mpsc::UnboundedSender<Call>,
    streams: mpsc::Sender<mpsc::Sender<Bytes>>,
    script: Script,
) -> Response<Body> {
    use http_body_util::BodyExt as _;
    let path = request.uri().path().to_owned();
    let headers = request.headers().clone();
    let raw = request.into_body().collect().await.unwrap().to_bytes();
    if path == "/process.Process/Start" {
        let mut decoder = envelope::Decoder::default();
        decoder.push(&raw);
        let frame = decoder.next_frame().unwrap().unwrap();
        let body = serde_json::from_slice(&frame.data).unwrap();
        calls.send(Call { path, headers, body }).unwrap();
        if let Some((status, error)) = script.start_error {
            return Response::builder().status(status).body(Body::from(error)).unwrap();
        }
        let (tx, rx) = mpsc::channel::<Bytes>(16);
        let start = StreamResponse {
            event: ProcessEvent::Start(StartEvent { pid: 42 }),
        };
        tx.send(envelope::encode_json(&start)).await.unwrap();
        streams.send(tx).await.unwrap();
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        return Response::new(Body::from_stream(futures::StreamExt::map(stream, Ok::<_, Infallible>)));
    }
    let body = serde_json::from_slice(&raw).unwrap_or_default();
    calls
        .send(Call {
            path: path.clone(),
            headers,
            body,
        })
        .unwrap();
    if script.fail_input && path == "/process.Process/SendInput" {
        let error = r#"{"code":"not_found","message":"process Pid(42) not found"}"#;
        return Response::builder().status(404).body(Body::from(error)).unwrap();
    }
    Response::new(Body::from("{}"))
}

fn frame(event: ProcessEvent) -> Bytes {
    envelope::encode_json(&StreamResponse { event })
}

fn input_bytes(call: &Call) -> Vec<u8> {
    use base64::Engine as _;
    let input = &call.body["input"];
    let data = input["pty"].as_str().or(input["stdin"].as_str()).unwrap();
    base64::engine::general_purpose::STANDARD.decode(data).unwrap()
}

async fn within<T>(what: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), what)
        .await
        .expect("no answer within 10 s")
}

#[tokio::test]
async fn a_terminal_session_streams_output_then_its_exit() {
    let mut agent = FakeAgent::start(Script::default()).await;
    let spec = ProcessSpec::login_shell(None);
    let mut session = ProcessSession::open(
        agent.client.clone(),
        Some("user"),
        spec,
        Some(PtySize { cols: 100, rows: 30 }),
    )
    .await
    .unwrap();
    assert_eq!(session.pid(), 42);
    let start = agent.call().await;
    assert_eq!(start.path, "/process.Process/Start");
    assert_eq!(start.body["process"]["cmd"], "/bin/sh");
    assert_eq!(
        start.body["process"]["args"],
        serde_json::json!(["-c", r#"exec "${SHELL:-/bin/sh}" -l"#])
    );
    assert_eq!(start.body["pty"]["size"], serde_json::json!({"cols": 100, "rows": 30}));
    assert_eq!(start.body["stdin"], true);
    // `user:` in Basic auth is how envd takes the user.
    assert_eq!(start.headers["authorization"], "Basic dXNlcjo=");

    let stream = agent.started().await;
    stream
        .send(frame(ProcessEvent::Keepalive(Default::default())))
        .await
        .unwrap();
    stream
        .send(frame(ProcessEvent::Data(DataEvent::Pty(b"$ ".to_vec()))))
        .await
        .unwrap();
    stream
        .send(frame(ProcessEvent::End(EndEvent {
            exit_code: 3,
            exited: true,
            status: "exit status 3".into(),
            error: None,
        })))
        .await
        .unwrap();
    assert!(matches!(within(session.next()).await, Some(SessionEvent::Pty(b)) if b.as_ref() == b"$ "));
    match within(session.next()).await {
        Some(SessionEvent::Exit(exit)) => assert_eq!((exit.code, exit.exited), (3, true)),
        other => panic!("expected the exit, got {other:?}"),
    }
    assert!(session.next().await.is_none());
}

#[tokio::test]
async fn input_keeps_its_order_and_resizes_and_stdin_close_follow_it() {
    let mut agent = FakeAgent::start(Script::default()).await;
    let spec = ProcessSpec {
        cmd: "cat".into(),
        ..ProcessSpec::default()
    };
    let session = ProcessSession::open(agent.client.clone(), None, spec, None)
        .await
        .unwrap();
    let start = agent.call().await;
    assert!(start.body.get("pty").is_none(), "{}", start.body);
    assert!(start.headers.get("authorization").is_none());
    let input = session.input();
    assert!(matches!(input.resize(80, 24).await, Err(SessionError::NoTerminal)));
    let chunks: Vec<Vec<u8>> = (0..200u32).map(|i| format!("{i},").into_bytes()).collect();
    let writer = input.clone();
    let sent = chunks.clone();
    within(async move {
        for chunk in sent {
            writer.write(chunk.into()).await.unwrap();
        }
        writer.close_stdin().await.unwrap();
    })
    .await;
    let mut received = Vec::new();
    loop {
        let call = agent.call().await;
        match call.path.as_str() {
            "/process.Process/SendInput" => {
                assert_eq!(call.body["process"]["pid"], 42);
                assert!(call.body["input"]["stdin"].is_string(), "{}", call.body);
                received.extend(input_bytes(&call));
            }
            "/process.Process/CloseStdin" => break,
            other => panic!("unexpected call {other}"),
        }
    }
    assert_eq!(received, chunks.concat(), "every byte, in order, before the close");
}

#[tokio::test]
async fn a_terminal_is_resized_after_the_input_before_it() {
    let mut agent = FakeAgent::start(Script::default()).await;
    let session = ProcessSession::open(
        agent.client.clone(),
        None,
        ProcessSpec::login_shell(None),
        Some(PtySize { cols: 80, rows: 24 }),
    )
    .await
    .unwrap();
    agent.call().await;
    let input = session.input();
    input.write(Bytes::from_static(b"ls\r")).await.unwrap();
    within(input.resize(132, 43)).await.unwrap();
    let write = agent.call().await;
    assert_eq!(write.path, "/process.Process/SendInput");
    assert_eq!(input_bytes(&write), b"ls\r");
    let resize = agent.call().await;
    assert_eq!(resize.path, "/process.Process/Update");
    assert_eq!(resize.body["pty"]["size"], serde_json::json!({"cols": 132, "rows": 43}));
    within(input.signal(Signal::Sigterm)).await.unwrap();
    let signal = agent.call().await;
    assert_eq!(
        signal.body,
        serde_json::json!({"process": {"pid": 42}, "signal": "SIGNAL_SIGTERM"})
    );
}

#[tokio::test]
async fn dropping_the_events_before_the_end_kills_the_process() {
    let mut agent = FakeAgent::start(Script::default()).await;
    let session = ProcessSession::open(agent.client.clone(), None, ProcessSpec::login_shell(None), None)
        .await
        .unwrap();
    agent.call().await;
    let (input, events) = session.into_parts();
    drop(events);
    let kill = agent.call().await;
    assert_eq!(kill.path, "/process.Process/SendSignal");
    assert_eq!(
        kill.body,
        serde_json::json!({"process": {"pid": 42}, "signal": "SIGNAL_SIGKILL"})
    );
    drop(input);
}

#[tokio::test]
async fn a_cut_channel_ends_the_events_with_an_error() {
    let mut agent = FakeAgent::start(Script::default()).await;
    let mut session = ProcessSession::open(agent.client.clone(), None, ProcessSpec::login_shell(None), None)
        .await
        .unwrap();
    let stream = agent.started().await;
    stream
        .send(frame(ProcessEvent::Data(DataEvent::Stdout(b"out".to_vec()))))
        .await
        .unwrap();
    assert!(matches!(within(session.next()).await, Some(SessionEvent::Stdout(b)) if b.as_ref() == b"out"));
    agent.cut.take().unwrap().send(()).unwrap();
    match within(session.next()).await {
        Some(SessionEvent::Error(SessionError::Agent(AgentError::Channel(_)))) => {}
        other => panic!("expected a channel error, got {other:?}"),
    }
    assert!(session.next().await.is_none());
    // Input after the channel broke fails instead of waiting.
    let input = session.input();
    let failed = within(async {
        loop {
            if let Err(err) = input.write(Bytes::from_static(b"x")).await {
                return err;
            }
        }
    })
    .await;
    assert!(matches!(failed, SessionError::InputClosed(_)), "{failed}");
}

#[tokio::test]
async fn a_silent_agent_ends_the_events_with_an_error() {
    let agent = FakeAgent::start(Script::default()).await;
    let session = ProcessSession::open(agent.client.clone(), None, ProcessSpec::login_shell(None), None)
        .await
        .unwrap();
    let (_input, mut events) = session.into_parts();
    events.idle_limit = Duration::from_millis(200);
    events.detach();
    assert!(matches!(
        within(events.next()).await,
        Some(SessionEvent::Error(SessionError::Idle(_)))
    ));
}

#[tokio::test]
async fn a_process_that_cannot_start_is_an_error_from_open() {
    let agent = FakeAgent::start(Script {
        start_error: Some((
            404,
            r#"{"code":"not_found","message":"cannot start 'nope': No such file"}"#,
        )),
        ..Script::default()
    })
    .await;
    let spec = ProcessSpec {
        cmd: "nope".into(),
        ..ProcessSpec::default()
    };
    match ProcessSession::open(agent.client.clone(), None, spec, None).await {
        Err(SessionError::Agent(AgentError::Rpc { status, message, .. })) => {
            assert_eq!(status, 404);
            assert!(message.contains("cannot start"), "{message}");
        }
        other => panic!("expected the agent's error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_failed_write_closes_the_input_with_its_reason() {
    let agent = FakeAgent::start(Script {
        fail_input: true,
        ..Script::default()
    })
    .await;
    let session = ProcessSession::open(agent.client.clone(), None, ProcessSpec::login_shell(None), None)
        .await
        .unwrap();
    let input = session.input();
    let failed = within(async {
        loop {
            if let Err(err) = input.write(Bytes::from_static(b"x")).await {
                return err;
            }
        }
    })
    .await;
    match failed {
        SessionError::InputClosed(why) => assert!(why.contains("not found"), "{why}"),
        other => panic!("expected a closed input, got {other:?}"),
    }
    assert!(matches!(input.close_stdin().await, Err(SessionError::InputClosed(_))));
}
