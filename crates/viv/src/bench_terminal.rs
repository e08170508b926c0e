//! The terminal part of `viv bench`: what `viv shell` costs, measured through the terminal
//! WebSocket (`GET /sandboxes/{id}/terminal`) the way `viv shell` and the web console use it —
//! time from opening the socket to the login shell's prompt, and keystroke echo latency (one
//! byte sent, until the terminal echoes it back).

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use futures::{SinkExt as _, StreamExt as _};
use tokio_tungstenite::tungstenite::Message;

use crate::client::Client;
use crate::console::{connect, segment, ws_url, Socket};

/// What one socket waits for at most before the benchmark gives up.
const LIMIT: Duration = Duration::from_secs(60);

/// Reads output until it contains `needle` (after `from` bytes of `seen`).
async fn until(socket: &mut Socket, seen: &mut Vec<u8>, from: usize, needle: &[u8]) -> Result<()> {
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !seen[from.min(seen.len())..].windows(needle.len()).any(|w| w == needle) {
        let message = tokio::time::timeout_at(deadline, socket.next())
            .await
            .with_context(|| format!("no {:?} within {LIMIT:?}", String::from_utf8_lossy(needle)))?;
        match message {
            Some(Ok(Message::Binary(bytes))) => seen.extend_from_slice(&bytes),
            Some(Ok(Message::Text(text))) if text.contains("\"error\"") => bail!("the terminal failed: {text}"),
            Some(Ok(Message::Close(_))) | None => bail!("the terminal closed early"),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e).context("the terminal WebSocket"),
        }
    }
    Ok(())
}

/// Opens `opens` terminals in sandbox `id` one after another (time to prompt each) and sends
/// `keystrokes` single bytes through the last (echo latency each). JSON with p50/p95.
pub async fn measure(client: &Client, id: &str, opens: usize, keystrokes: usize) -> Result<serde_json::Value> {
    let url = ws_url(
        client.base(),
        &format!("/sandboxes/{}/terminal?cols=80&rows=24", segment(id)),
    )?;
    let mut prompts = Vec::new();
    let mut echoes = Vec::new();
    for i in 0..opens {
        let start = Instant::now();
        let mut socket = connect(client, &url, "viv-terminal.v1").await?;
        let mut seen = Vec::new();
        until(&mut socket, &mut seen, 0, b"$ ")
            .await
            .context("waiting for the prompt")?;
        prompts.push(start.elapsed());
        if i + 1 == opens {
            for k in 0..keystrokes {
                let key = b'a' + (k % 26) as u8;
                let from = seen.len();
                let start = Instant::now();
                socket.send(Message::Binary(vec![key].into())).await?;
                until(&mut socket, &mut seen, from, &[key])
                    .await
                    .context("waiting for an echo")?;
                echoes.push(start.elapsed());
            }
        }
        // Ctrl-U drops the typed line; the shell exits and the socket closes.
        socket.send(Message::Binary(b"\x15exit\r".to_vec().into())).await?;
        while let Some(Ok(message)) = socket.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    }
    prompts.sort();
    echoes.sort();
    let summary = |v: &[Duration]| {
        if v.is_empty() {
            return serde_json::Value::Null;
        }
        let at = |p: f64| {
            let d = v[(((v.len() - 1) as f64) * p).round() as usize];
            (d.as_secs_f64() * 1e5).round() / 100.0
        };
        serde_json::json!({ "p50": at(0.5), "p95": at(0.95), "n": v.len() })
    };
    Ok(serde_json::json!({
        "openToPromptMs": summary(&prompts),
        "keystrokeEchoMs": summary(&echoes),
    }))
}
