//! `POST /tunnel?port=N`: a byte stream to a TCP port inside the guest. The request body is
//! written to the connection and the connection's output is the response body, both streaming
//! (HTTP/2 carries them at once), so the host can reach services in a sandbox without guest
//! networking.

use axum::body::Body;
use axum::extract::Query;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures::StreamExt as _;
use serde::Deserialize;
use tokio::io::AsyncWriteExt as _;

use crate::server::json_error;

#[derive(Debug, Deserialize)]
pub struct TunnelQuery {
    port: u16,
}

pub async fn tunnel(Query(q): Query<TunnelQuery>, body: Body) -> Response {
    let stream = match tokio::net::TcpStream::connect(("127.0.0.1", q.port)).await {
        Ok(stream) => stream,
        Err(err) => {
            return json_error(
                StatusCode::BAD_GATEWAY,
                format!("nothing accepts connections on port {} in the sandbox: {err}", q.port),
            )
        }
    };
    let _ = stream.set_nodelay(true);
    let (read, mut write) = stream.into_split();
    tokio::spawn(async move {
        let mut input = body.into_data_stream();
        while let Some(Ok(chunk)) = input.next().await {
            if write.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = write.shutdown().await;
    });
    Body::from_stream(tokio_util::io::ReaderStream::new(read)).into_response()
}
