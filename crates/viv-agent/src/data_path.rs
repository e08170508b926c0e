//! The data path: file uploads over the guest's network card, beside the channel.
//!
//! The channel (a virtio-serial port) hands the guest one 4 KiB buffer per wake-up, which under
//! TCG caps an upload at tens of MiB/s of guest CPU. A sandbox with its own network (the host's
//! end is the guest's gateway, in a namespace only the host enters) also gets `/files` over
//! TCP: the agent listens on envd's port, and the host connects from the sandbox's namespace
//! for each upload, falling back to the channel when it cannot. (Downloads stay on the channel,
//! where the guest writes 32 KiB at a time: they were no faster over TCP.)
//!
//! Invariants:
//! - a connection is served only when it comes from the gateway address the host set at boot
//!   (`viv.net=`): a process in the guest connecting to the guest's own address, or anything the
//!   guest's routes could bring in, is closed before a byte is read;
//! - only `/files` is served, through the same router (and so the same access-token check) as
//!   the channel: a request needs there what it needs on the channel.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::OnceLock;
use std::time::Duration;

use axum::response::IntoResponse as _;
use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;

/// The host's end of the sandbox network, once `viv.net=` configured the card.
static GATEWAY: OnceLock<Ipv4Addr> = OnceLock::new();

/// Records the gateway whose connections the data path serves.
pub(crate) fn set_gateway(gateway: Ipv4Addr) {
    let _ = GATEWAY.set(gateway);
}

/// The gateway, when the guest has a configured network card.
pub fn gateway() -> Option<Ipv4Addr> {
    GATEWAY.get().copied()
}

/// Whether `path` may be served on the data path.
fn allowed(path: &str) -> bool {
    path == "/files"
}

/// Serves `/files` of `app` on envd's port to connections from `gateway`, until the agent
/// stops.
pub async fn serve(gateway: Ipv4Addr, app: Router) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, viv_proto::ENVD_PORT)).await?;
    let app = app.layer(axum::middleware::from_fn(
        |request: axum::extract::Request, next: axum::middleware::Next| async move {
            if allowed(request.uri().path()) {
                next.run(request).await
            } else {
                axum::http::StatusCode::NOT_FOUND.into_response()
            }
        },
    ));
    tracing::info!(port = viv_proto::ENVD_PORT, %gateway, "data path open");
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of descriptors, say: try again shortly rather than spin.
                tracing::debug!(error = %err, "data path accept");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if peer.ip() != IpAddr::V4(gateway) {
            tracing::debug!(%peer, "data path connection refused: not the host");
            continue;
        }
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let _ = crate::channel::http2_builder()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_file_transfers_go_over_the_network() {
        assert!(allowed("/files"));
        for path in [
            "/",
            "/init",
            "/files/",
            "/filesx",
            "/process.Process/Start",
            "/tunnel",
            "/health",
        ] {
            assert!(!allowed(path), "{path}");
        }
    }
}
