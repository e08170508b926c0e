//! Binary protobuf for Connect clients: requests with `application/proto` (unary) or
//! `application/connect+proto` (streams) are converted to the JSON mapping before the handlers see
//! them, and the answers back to binary. Error bodies and end-of-stream messages stay JSON, as the
//! Connect protocol has them for every codec. Other requests pass untouched.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use futures::{Stream, StreamExt as _};
use prost_reflect::MessageDescriptor;
use viv_proto::envelope;
use viv_proto::protobuf::{binary_to_json, json_to_binary, method_types, CodecError};
use viv_proto::ConnectError;

use crate::server::connect_error;

type Convert = fn(&MessageDescriptor, &[u8]) -> Result<Vec<u8>, CodecError>;

/// Middleware converting binary protobuf Connect traffic to and from JSON.
pub async fn protobuf(request: Request, next: Next) -> Response {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or_default().trim().to_ascii_lowercase());
    let streaming = match content_type.as_deref() {
        Some("application/proto") => false,
        Some("application/connect+proto") => true,
        _ => return next.run(request).await,
    };
    let Some((input, output)) = method_types(request.uri().path()) else {
        return next.run(request).await;
    };
    let (mut parts, body) = request.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    let body = if streaming {
        parts.headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/connect+json"),
        );
        Body::from_stream(convert_frames(body.into_data_stream(), input, binary_to_json))
    } else {
        parts
            .headers
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let binary = match axum::body::to_bytes(body, envelope::MAX_FRAME).await {
            Ok(binary) => binary,
            Err(err) => return connect_error(ConnectError::new("invalid_argument", err.to_string())),
        };
        match binary_to_json(&input, &binary) {
            Ok(json) => Body::from(json),
            Err(err) => return connect_error(ConnectError::new("invalid_argument", err.to_string())),
        }
    };
    let response = next.run(Request::from_parts(parts, body)).await;
    let (mut parts, body) = response.into_parts();
    // An error before any message (a wrong token, an unknown method) is a JSON body, not a stream.
    if parts.status != StatusCode::OK {
        return Response::from_parts(parts, body);
    }
    if streaming {
        parts.headers.remove(header::CONTENT_LENGTH);
        parts.headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/connect+proto"),
        );
        let body = Body::from_stream(convert_frames(body.into_data_stream(), output, json_to_binary));
        return Response::from_parts(parts, body);
    }
    let json = match axum::body::to_bytes(body, envelope::MAX_FRAME).await {
        Ok(json) => json,
        Err(err) => return connect_error(ConnectError::new("internal", err.to_string())),
    };
    match json_to_binary(&output, &json) {
        Ok(binary) => {
            parts.headers.remove(header::CONTENT_LENGTH);
            parts
                .headers
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/proto"));
            Response::from_parts(parts, Body::from(binary))
        }
        Err(err) => connect_error(ConnectError::new("internal", err.to_string())),
    }
}

/// Re-encodes the message frames of an envelope stream with `convert`; the end-of-stream frame
/// passes as it is. A frame that cannot be converted ends the stream with an error.
fn convert_frames<S, E>(
    chunks: S,
    descriptor: MessageDescriptor,
    convert: Convert,
) -> impl Stream<Item = Result<Bytes, std::io::Error>>
where
    S: Stream<Item = Result<Bytes, E>> + Send + Unpin + 'static,
    E: std::fmt::Display,
{
    let state = (chunks, envelope::Decoder::default(), false);
    futures::stream::unfold(state, move |(mut chunks, mut decoder, mut done)| {
        let descriptor = descriptor.clone();
        async move {
            if done {
                return None;
            }
            loop {
                match decoder.next_frame() {
                    Ok(Some(frame)) if frame.is_end() => {
                        done = true;
                        let out = envelope::encode(frame.flags, &frame.data);
                        return Some((Ok(out), (chunks, decoder, done)));
                    }
                    Ok(Some(frame)) => {
                        let out = match convert(&descriptor, &frame.data) {
                            Ok(data) => envelope::encode(frame.flags & !envelope::FLAG_COMPRESSED, &data),
                            Err(err) => {
                                done = true;
                                envelope::encode_end(Some(&ConnectError::new("invalid_argument", err.to_string())))
                            }
                        };
                        return Some((Ok(out), (chunks, decoder, done)));
                    }
                    Ok(None) => {}
                    Err(err) => {
                        done = true;
                        let end = envelope::encode_end(Some(&ConnectError::new("invalid_argument", err.to_string())));
                        return Some((Ok(end), (chunks, decoder, done)));
                    }
                }
                match chunks.next().await {
                    Some(Ok(chunk)) => decoder.push(&chunk),
                    Some(Err(err)) => {
                        return Some((Err(std::io::Error::other(err.to_string())), (chunks, decoder, true)))
                    }
                    None => return None,
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use axum::routing::post;
    use axum::Router;
    use tower::ServiceExt as _;

    use super::*;

    /// Found by the `agent_codec` fuzz target: the answer to a binary stream request was converted
    /// as a stream of frames even when it was an error (a wrong token, say), so the client got an
    /// unrelated "compressed frames" error in place of the JSON error body.
    #[tokio::test]
    async fn an_error_answer_to_a_binary_stream_passes_unchanged() {
        let app = Router::new()
            .route(
                "/process.Process/Start",
                post(|| async { crate::server::json_error(StatusCode::UNAUTHORIZED, "wrong token") }),
            )
            .layer(axum::middleware::from_fn(protobuf));
        let request = Request::post("/process.Process/Start")
            .header(header::CONTENT_TYPE, "application/connect+proto")
            .body(Body::from(envelope::encode(0, b"")))
            .unwrap();
        let response = app.oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(error["message"], "wrong token");
    }
}
