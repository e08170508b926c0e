//! `viv sandbox logs ID [-f]`: a running sandbox's console log (`GET /sandboxes/{id}/logs`),
//! or, with `-f`, the log followed as it grows (`GET /sandboxes/{id}/logs/stream`, server-sent
//! events) until the sandbox stops running.
//!
//! Invariant: an event is at most [`MAX_EVENT`] bytes; a stream that sends a longer one is an
//! error, not a growing buffer.

use anyhow::{anyhow, bail, Context as _, Result};
use futures::StreamExt as _;
use reqwest::Method;
use tokio::io::AsyncWriteExt as _;

use crate::client::Client;
use crate::console::segment;

/// The largest server-sent event this client takes.
const MAX_EVENT: usize = 1 << 20;

/// One line of the log as the API sends it.
#[derive(Debug, serde::Deserialize, serde::Serialize)]
struct LogLine {
    timestamp: String,
    line: String,
}

#[derive(Debug, serde::Deserialize)]
struct Logs {
    logs: Vec<LogLine>,
}

fn render(line: &LogLine, timestamps: bool) -> String {
    if timestamps {
        format!("{} {}\n", line.timestamp, line.line)
    } else {
        format!("{}\n", line.line)
    }
}

/// Prints the log (or follows it); `json` prints the API's JSON (NDJSON of lines when following).
pub async fn run(client: &Client, id: &str, follow: bool, timestamps: bool, json: bool) -> Result<()> {
    let path = format!("/sandboxes/{}/logs", segment(id));
    let mut out = tokio::io::stdout();
    if !follow {
        let request = client.request(Method::GET, &path).query(&[("limit", "10000")]);
        let logs: serde_json::Value = client.json(request).await?;
        if json {
            crate::output::json(&logs);
            return Ok(());
        }
        let logs: Logs =
            serde_json::from_value(logs).context("the server sent logs this client does not understand")?;
        for line in &logs.logs {
            out.write_all(render(line, timestamps).as_bytes()).await?;
        }
        out.flush().await?;
        return Ok(());
    }
    let response = client
        .send(client.request(Method::GET, &format!("{path}/stream")))
        .await?;
    let mut body = response.bytes_stream();
    let mut buffer: Vec<u8> = Vec::new();
    loop {
        while let Some((event, data)) = next_event(&mut buffer)? {
            match event.as_str() {
                "log" => {
                    let line: LogLine =
                        serde_json::from_str(&data).context("a log line this client does not understand")?;
                    let text = if json {
                        format!("{}\n", serde_json::to_string(&line)?)
                    } else {
                        render(&line, timestamps)
                    };
                    out.write_all(text.as_bytes()).await?;
                    out.flush().await?;
                }
                "end" => {
                    let message = serde_json::from_str::<serde_json::Value>(&data)
                        .ok()
                        .and_then(|v| v["message"].as_str().map(str::to_owned))
                        .unwrap_or(data);
                    eprintln!("[viv: {message}]");
                    return Ok(());
                }
                _ => {}
            }
        }
        match body.next().await {
            Some(Ok(chunk)) => {
                buffer.extend_from_slice(&chunk);
                if buffer.len() > MAX_EVENT {
                    bail!("the server sent an event of more than {MAX_EVENT} bytes");
                }
            }
            Some(Err(e)) => return Err(anyhow!(e).context("following the log")),
            None => bail!("the server ended the log stream without saying why"),
        }
    }
}

/// Takes the next complete server-sent event out of `buffer`: its `event` name (`message` when
/// unnamed) and its data lines joined; comments and keep-alives are skipped.
fn next_event(buffer: &mut Vec<u8>) -> Result<Option<(String, String)>> {
    loop {
        let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") else {
            return Ok(None);
        };
        let raw: Vec<u8> = buffer.drain(..end + 2).collect();
        let text = std::str::from_utf8(&raw).context("the server sent an event that is not UTF-8")?;
        let mut event = "message".to_owned();
        let mut data: Vec<&str> = Vec::new();
        for line in text.lines() {
            if let Some(value) = line.strip_prefix("event:") {
                event = value.trim().to_owned();
            } else if let Some(value) = line.strip_prefix("data:") {
                data.push(value.strip_prefix(' ').unwrap_or(value));
            }
        }
        if !data.is_empty() {
            return Ok(Some((event, data.join("\n"))));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_taken_whole() {
        let mut buffer = b": keep-alive\n\nevent: log\ndata: {\"a\":1}\n\nevent: end\ndata: x".to_vec();
        assert_eq!(
            next_event(&mut buffer).unwrap(),
            Some(("log".into(), "{\"a\":1}".into()))
        );
        assert_eq!(next_event(&mut buffer).unwrap(), None);
        buffer.extend_from_slice(b"\n\n");
        assert_eq!(next_event(&mut buffer).unwrap(), Some(("end".into(), "x".into())));
        assert!(buffer.is_empty());
    }

    #[test]
    fn lines_render_with_or_without_time() {
        let line = LogLine {
            timestamp: "2026-01-01T00:00:00.000Z".into(),
            line: "booted".into(),
        };
        assert_eq!(render(&line, false), "booted\n");
        assert_eq!(render(&line, true), "2026-01-01T00:00:00.000Z booted\n");
    }
}
