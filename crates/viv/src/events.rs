//! `viv events`: follows the server's event stream (`GET /events`, server-sent events) and
//! prints one line per state change (or one JSON object per line with `--json`) until
//! interrupted.

use anyhow::{Context as _, Result};
use clap::Args;
use futures::StreamExt as _;
use reqwest::Method;
use viv_api::events::Event;

use crate::client::Client;

/// `viv events`
#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Kinds to show, comma-separated: vm, sandbox, operation, node (all by default).
    #[arg(long)]
    kind: Option<String>,
}

/// Prints events as they come.
pub async fn run(client: &Client, args: EventsArgs, json: bool) -> Result<i32> {
    let path = match &args.kind {
        Some(kind) => format!("/events?kind={kind}"),
        None => "/events".to_owned(),
    };
    let response = client.send(client.request(Method::GET, &path)).await?;
    let mut body = response.bytes_stream();
    let mut buffer = Vec::new();
    while let Some(chunk) = body.next().await {
        buffer.extend_from_slice(&chunk.context("reading the event stream")?);
        while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
            let block: Vec<u8> = buffer.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&block);
            let data: String = text
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(str::trim_start)
                .collect::<Vec<_>>()
                .join("\n");
            if data.is_empty() {
                continue;
            }
            match serde_json::from_str::<Event>(&data) {
                Ok(event) if json => println!("{}", serde_json::to_string(&event)?),
                Ok(event) => println!("{}", line(&event)),
                // `lagged` and other notices.
                Err(_) => eprintln!("{data}"),
            }
        }
    }
    Ok(0)
}

fn line(e: &Event) -> String {
    let mut what = match &e.name {
        Some(name) => format!("{} {} ({name})", e.kind.as_str(), e.id),
        None => format!("{} {}", e.kind.as_str(), e.id),
    };
    if let Some(node) = &e.node {
        what = format!("[{node}] {what}");
    }
    let change = match &e.previous {
        Some(previous) => format!("{previous} → {}", e.state),
        None => e.state.clone(),
    };
    match &e.message {
        Some(message) => format!("{}  {what}  {change}: {message}", e.at),
        None => format!("{}  {what}  {change}", e.at),
    }
}
