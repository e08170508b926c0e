//! `direct-tcpip` channels (`ssh -L`, VS Code's port forwarding): a byte stream to a port on the
//! sandbox's loopback through the agent's `/tunnel` (the same tunnel the HTTP proxy uses for
//! sandbox ports), so no guest networking is involved and a sandbox cut off from every network
//! still forwards.
//!
//! The tunnel is opened before the channel is confirmed, so a port nothing listens on is a
//! refused open ("connect failed"), as OpenSSH reports it. The client's EOF ends the tunnel's
//! request body (the agent then shuts the guest socket's write side); the end of the guest's
//! output, a broken tunnel or the VM stopping send EOF and close the channel.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use futures::StreamExt as _;
use http_body_util::BodyExt as _;
use russh::server::{ChannelOpenHandle, Msg};
use russh::{Channel, ChannelMsg, ChannelOpenFailure};

use viv_server::process_session::AgentTarget as _;

use crate::handler::{ChannelSlot, Identity};
use crate::Shared;

/// How long opening the tunnel (the guest's connect) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Chunks of client input in flight towards the guest.
const INPUT_QUEUE: usize = 16;

/// Whether a forward to `host` means the sandbox itself (the agent connects to `127.0.0.1`).
pub(crate) fn host_allowed(host: &str) -> bool {
    matches!(host, "localhost" | "127.0.0.1" | "::1" | "[::1]")
}

pub(crate) async fn run(
    channel: Channel<Msg>,
    reply: ChannelOpenHandle,
    shared: Arc<Shared>,
    identity: Identity,
    port: u16,
    _slot: ChannelSlot,
) {
    let sandbox = identity.sandbox.as_str();
    let reached = match crate::reach::reach(&shared.state, sandbox).await {
        Ok(reached) => reached,
        Err(err) => {
            tracing::info!(sandbox, port, error = %err, "SSH forward refused: the sandbox is not running");
            shared.state.metrics.ssh.channel("refused");
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            return;
        }
    };
    let (to_guest, guest_input) = tokio::sync::mpsc::channel::<Bytes>(INPUT_QUEUE);
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(guest_input).map(Ok::<_, Infallible>));
    let request = match hyper::Request::post(format!("http://agent/tunnel?port={port}")).body(body) {
        Ok(request) => request,
        Err(_) => {
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            return;
        }
    };
    let response = match tokio::time::timeout(CONNECT_TIMEOUT, reached.agent().send_ok(request)).await {
        Ok(Ok(response)) => response,
        Ok(Err(err)) => {
            tracing::info!(sandbox, port, error = %err, "SSH forward refused: cannot connect in the sandbox");
            shared.state.metrics.ssh.channel("refused");
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            return;
        }
        Err(_) => {
            tracing::info!(
                sandbox,
                port,
                "SSH forward refused: the sandbox did not connect in time"
            );
            shared.state.metrics.ssh.channel("refused");
            reply.reject(ChannelOpenFailure::ConnectFailed).await;
            return;
        }
    };
    reply.accept().await;
    shared.state.metrics.ssh.channel("direct-tcpip");
    tracing::debug!(sandbox, port, "SSH forward open");
    let (mut read, write) = channel.split();
    let mut output = response.into_body();
    // A sandbox on another node has no VM here to watch: its node ends the tunnel's answer.
    let mut vm_exit = reached.vm_exit();
    let mut to_guest = Some(to_guest);
    let ended = loop {
        tokio::select! {
            msg = read.wait() => match msg {
                Some(ChannelMsg::Data { data }) => {
                    if let Some(tx) = &to_guest {
                        if tx.send(data).await.is_err() {
                            to_guest = None;
                        }
                    }
                }
                // The client sends no more: the guest socket's write side is shut.
                Some(ChannelMsg::Eof) => to_guest = None,
                Some(ChannelMsg::Close) | None => break "the client closed it",
                Some(_) => {}
            },
            frame = output.frame() => match frame {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        if write.data_bytes(data).await.is_err() {
                            break "the client went away";
                        }
                    }
                }
                Some(Err(_)) => break "the tunnel broke",
                None => break "the guest closed the connection",
            },
            stopped = vm_stopped(&mut vm_exit) => if stopped {
                break "the sandbox stopped";
            }
        }
    };
    tracing::debug!(sandbox, port, ended, "SSH forward closed");
    let _ = write.eof().await;
    let _ = write.close().await;
}

/// Waits for the watched VM to stop (`true`), or forever without a VM to watch; `false` when
/// the watch changed but the VM still runs.
async fn vm_stopped(vm_exit: &mut Option<tokio::sync::watch::Receiver<Option<viv_vmm::VmExit>>>) -> bool {
    match vm_exit {
        Some(exit) => exit.changed().await.is_err() || exit.borrow().is_some(),
        None => std::future::pending().await,
    }
}
