//! The agent's binary protobuf edge (`viv-agent`'s `codec::protobuf` middleware): requests with
//! `application/proto` or `application/connect+proto` bodies from clients are converted to the
//! JSON mapping before a handler sees them, and the handler's answers back to binary.
//!
//! The middleware runs in front of a router with every envd RPC path, whose handler records what
//! it received and answers with fuzzed bytes. Request and answer bodies arrive in pieces of a
//! fuzzed size. Checks, besides never panicking:
//! - other content types and paths pass untouched, both ways;
//! - unary: a request that is not a message of the method's input type is refused with
//!   `invalid_argument` before any handler runs; otherwise the handler gets exactly its JSON
//!   mapping; a 200 answer arrives as the binary form of the handler's JSON, or as an `internal`
//!   error when that is no message of the output type; any other answer passes unchanged;
//! - streams: the handler gets, frame by frame, the JSON mapping of every message frame up to the
//!   end-of-stream frame (passed as it is); a frame that does not convert, or a broken envelope,
//!   ends the stream with an `invalid_argument` end-of-stream frame; answers are converted the
//!   same way to binary; a non-200 answer (an error before the stream started) passes unchanged.
#![no_main]

use std::convert::Infallible;
use std::sync::{Mutex, OnceLock};

use arbitrary::Arbitrary;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::response::Response;
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use prost_reflect::MessageDescriptor;
use tower::ServiceExt as _;
use viv_proto::envelope;
use viv_proto::protobuf::{binary_to_json, json_to_binary, pool, CodecError};
use viv_proto::ConnectError;

#[derive(Debug, Arbitrary)]
struct Input {
    /// The RPC (modulo the number of methods; one more for a path that is none).
    method: u8,
    /// The request's content type (an index into `CONTENT_TYPES`).
    content_type: u8,
    request_piece: u8,
    /// Whether the handler answers 200 (else 401).
    answer_ok: bool,
    answer_piece: u8,
    request: Vec<u8>,
    answer: Vec<u8>,
}

/// Request content types: (header, is binary protobuf, is a stream).
const CONTENT_TYPES: &[(Option<&str>, bool, bool)] = &[
    (Some("application/proto"), true, false),
    (Some("application/connect+proto"), true, true),
    (Some("Application/Proto; charset=utf-8"), true, false),
    (Some("application/connect+proto ;x=y"), true, true),
    (Some("application/json"), false, false),
    (Some("application/connect+json"), false, true),
    (Some("multipart/form-data; boundary=x"), false, false),
    (None, false, false),
];

/// What the handler saw, and what it answers.
#[derive(Default)]
struct Exchange {
    seen: Option<(Option<String>, Bytes)>,
    answer: (StatusCode, &'static str, Vec<Bytes>),
}

static EXCHANGE: Mutex<Option<Exchange>> = Mutex::new(None);

async fn handler(request: Request) -> Response {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().expect("ASCII").to_owned());
    let body = axum::body::to_bytes(request.into_body(), usize::MAX)
        .await
        .expect("a converted request body reads to its end");
    let (status, answer_type, chunks) = {
        let mut guard = EXCHANGE.lock().expect("one exchange at a time");
        let exchange = guard.as_mut().expect("an exchange is set up");
        exchange.seen = Some((content_type, body));
        exchange.answer.clone()
    };
    let stream = futures::stream::iter(chunks.into_iter().map(Ok::<_, Infallible>));
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, answer_type)
        .body(Body::from_stream(stream))
        .expect("valid response")
}

struct Fixture {
    runtime: tokio::runtime::Runtime,
    app: Router,
    methods: Vec<(String, MessageDescriptor, MessageDescriptor)>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let mut methods = Vec::new();
        let mut app = Router::new();
        for service in pool().services() {
            for method in service.methods() {
                let path = format!("/{}/{}", service.full_name(), method.name());
                app = app.route(&path, post(handler));
                methods.push((path, method.input(), method.output()));
            }
        }
        let app = app
            .route("/files", post(handler))
            .layer(axum::middleware::from_fn(viv_agent::fuzzing::protobuf));
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        Fixture { runtime, app, methods }
    })
}

fn pieces(bytes: &[u8], size: u8) -> Vec<Bytes> {
    bytes
        .chunks(usize::from(size) + 1)
        .map(Bytes::copy_from_slice)
        .collect()
}

/// What the middleware should make of an envelope stream: every message frame converted, the
/// end-of-stream frame as it is, and nothing after it; a frame that does not convert or a broken
/// envelope ends the stream with an error. A partial frame at the end is dropped, as the JSON
/// handlers do.
fn convert_stream(
    bytes: &[u8],
    descriptor: &MessageDescriptor,
    convert: fn(&MessageDescriptor, &[u8]) -> Result<Vec<u8>, CodecError>,
) -> Vec<u8> {
    let mut decoder = envelope::Decoder::default();
    decoder.push(bytes);
    let mut out = Vec::new();
    loop {
        match decoder.next_frame() {
            Ok(Some(frame)) if frame.is_end() => {
                out.extend_from_slice(&envelope::encode(frame.flags, &frame.data));
                return out;
            }
            Ok(Some(frame)) => match convert(descriptor, &frame.data) {
                Ok(data) => out.extend_from_slice(&envelope::encode(frame.flags, &data)),
                Err(err) => {
                    let err = ConnectError::new("invalid_argument", err.to_string());
                    out.extend_from_slice(&envelope::encode_end(Some(&err)));
                    return out;
                }
            },
            Ok(None) => return out,
            Err(err) => {
                let err = ConnectError::new("invalid_argument", err.to_string());
                out.extend_from_slice(&envelope::encode_end(Some(&err)));
                return out;
            }
        }
    }
}

fn error_code(body: &[u8]) -> String {
    let error: ConnectError = serde_json::from_slice(body).expect("a Connect error body");
    error.code
}

fuzz_target!(|input: Input| {
    let fixture = fixture();
    let rpc = fixture
        .methods
        .get(usize::from(input.method) % (fixture.methods.len() + 1));
    let path = rpc.map_or("/files", |(path, _, _)| path.as_str());
    let (content_type, binary, streaming) = CONTENT_TYPES[usize::from(input.content_type) % CONTENT_TYPES.len()];
    let converted = binary && rpc.is_some();
    let status = if input.answer_ok {
        StatusCode::OK
    } else {
        StatusCode::UNAUTHORIZED
    };
    let answer_type = if streaming {
        "application/connect+json"
    } else {
        "application/json"
    };
    *EXCHANGE.lock().unwrap() = Some(Exchange {
        seen: None,
        answer: (status, answer_type, pieces(&input.answer, input.answer_piece)),
    });

    let mut request = Request::post(path);
    if let Some(content_type) = content_type {
        request = request.header(header::CONTENT_TYPE, content_type);
    }
    let chunks = pieces(&input.request, input.request_piece);
    let body = Body::from_stream(futures::stream::iter(chunks.into_iter().map(Ok::<_, Infallible>)));
    let request = request.body(body).expect("valid request");
    let (parts, body) = fixture.runtime.block_on(async {
        let response = fixture.app.clone().oneshot(request).await.expect("infallible");
        let (parts, body) = response.into_parts();
        (
            parts,
            axum::body::to_bytes(body, usize::MAX).await.expect("the answer reads"),
        )
    });
    let seen = EXCHANGE.lock().unwrap().take().and_then(|e| e.seen);
    let answer_type_seen = parts
        .headers
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap().to_owned());

    if !converted {
        let (seen_type, seen_body) = seen.expect("the handler ran");
        assert_eq!(seen_type.as_deref(), content_type);
        assert_eq!(seen_body, input.request, "the request changed on its way");
        assert_eq!(parts.status, status);
        assert_eq!(body, input.answer, "the answer changed on its way");
        return;
    }
    let (_, request_type, answer_type_descriptor) = rpc.expect("an RPC");
    if !streaming {
        let json = match binary_to_json(request_type, &input.request) {
            Ok(json) => json,
            Err(_) => {
                assert!(seen.is_none(), "a handler got a request that is no message");
                assert_eq!(parts.status, StatusCode::BAD_REQUEST);
                assert_eq!(error_code(&body), "invalid_argument");
                return;
            }
        };
        let (seen_type, seen_body) = seen.expect("the handler ran");
        assert_eq!(seen_type.as_deref(), Some("application/json"));
        assert_eq!(seen_body, json, "the handler got another message");
        if status != StatusCode::OK {
            assert_eq!(parts.status, status);
            assert_eq!(body, input.answer, "an error answer changed on its way");
            return;
        }
        match json_to_binary(answer_type_descriptor, &input.answer) {
            Ok(binary) => {
                assert_eq!(parts.status, StatusCode::OK);
                assert_eq!(answer_type_seen.as_deref(), Some("application/proto"));
                assert_eq!(body, binary);
            }
            Err(_) => {
                assert_eq!(parts.status, StatusCode::INTERNAL_SERVER_ERROR);
                assert_eq!(error_code(&body), "internal");
            }
        }
        return;
    }
    let (seen_type, seen_body) = seen.expect("the handler ran");
    assert_eq!(seen_type.as_deref(), Some("application/connect+json"));
    assert_eq!(
        seen_body,
        convert_stream(&input.request, request_type, binary_to_json),
        "the handler got another stream"
    );
    assert_eq!(parts.status, status);
    if status != StatusCode::OK {
        assert_eq!(body, input.answer, "an error answer changed on its way");
        return;
    }
    assert_eq!(answer_type_seen.as_deref(), Some("application/connect+proto"));
    assert_eq!(
        body,
        convert_stream(&input.answer, answer_type_descriptor, json_to_binary)
    );
});
