//! `viv console VM`: the VM's serial console in this terminal, through the server's console
//! WebSocket (`GET /vms/{id}/console`), or its log with `--log`.
//!
//! Invariants:
//! - when stdin is a terminal it is in raw mode only while attached: [`RawTerminal`] restores
//!   the saved settings when dropped, which every way out of [`attach`] does (detach, the VM
//!   stopping, an error, SIGTERM or SIGHUP, a panic's unwinding); in raw mode Ctrl-C is a byte
//!   for the guest, not a signal;
//! - the escape prefix is Ctrl-] (like telnet and virsh); `Ctrl-] .` (or `q`) detaches,
//!   `Ctrl-] b` sends a serial break, `Ctrl-] Ctrl-]` sends one Ctrl-]; after the prefix any
//!   other key is sent with the prefix, so nothing typed is lost;
//! - the API key travels in the `X-API-Key` header, never in the URL.

use anyhow::{anyhow, Context as _, Result};
use futures::{SinkExt as _, StreamExt as _};
use reqwest::Method;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

use crate::client::Client;

/// The escape prefix: Ctrl-].
const ESCAPE: u8 = 0x1d;

/// `viv console VM`.
#[derive(Debug, clap::Args)]
pub struct ConsoleArgs {
    /// The VM (id or name).
    pub vm: String,
    /// Do not replay the last output on attach: show only what comes next.
    #[arg(long)]
    pub no_replay: bool,
    /// Print the console log (kept across starts, also of a stopped VM) and exit.
    #[arg(long)]
    pub log: bool,
    /// With --log: only the last BYTES bytes.
    #[arg(long, value_name = "BYTES", requires = "log")]
    pub tail: Option<u64>,
}

/// Runs `viv console`; returns the exit code.
pub async fn run(client: &Client, args: ConsoleArgs) -> Result<i32> {
    let path = format!("/vms/{}/console", segment(&args.vm));
    if args.log {
        let mut request = client.request(Method::GET, &format!("{path}/log"));
        if let Some(tail) = args.tail {
            request = request.query(&[("tail", tail)]);
        }
        let log = client
            .send(request)
            .await?
            .bytes()
            .await
            .context("reading the console log")?;
        let mut out = tokio::io::stdout();
        out.write_all(&log).await?;
        out.flush().await?;
        return Ok(0);
    }
    attach(client, &path, &args).await
}

/// A path segment: everything but unreserved characters percent-encoded.
pub(crate) fn segment(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The WebSocket URL of `path` on the server at `base` (`http` → `ws`, `https` → `wss`).
pub(crate) fn ws_url(base: &str, path: &str) -> Result<String> {
    let rest = if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}")
    } else {
        return Err(anyhow!("the server URL {base} is neither http:// nor https://"));
    };
    Ok(format!("{}{path}", rest.trim_end_matches('/')))
}

/// A WebSocket connection to the server.
pub(crate) type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens the WebSocket at `url` (from [`ws_url`]) with the API key in the `X-API-Key` header,
/// offering `protocol`; a refused upgrade becomes an error with the server's message.
pub(crate) async fn connect(client: &Client, url: &str, protocol: &'static str) -> Result<Socket> {
    let mut request = url.into_client_request().context("building the WebSocket request")?;
    let headers = request.headers_mut();
    if let Some(key) = client.key() {
        headers.insert(
            viv_api::API_KEY_HEADER,
            HeaderValue::from_str(key).context("the API key is not a valid header value")?,
        );
    }
    headers.insert("Sec-WebSocket-Protocol", HeaderValue::from_static(protocol));
    match tokio_tungstenite::connect_async(request).await {
        Ok((socket, _)) => Ok(socket),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let status = response.status().as_u16();
            let body = response.into_body().unwrap_or_default();
            let message = serde_json::from_slice::<viv_api::ErrorBody>(&body)
                .map(|b| b.message)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
            let hint = if status == 401 {
                " (set VIV_API_KEY or --api-key; create a key with `viv keys create`)"
            } else {
                ""
            };
            Err(anyhow!("{message} (HTTP {status}){hint}"))
        }
        Err(e) => Err(anyhow!(e)).with_context(|| format!("cannot reach the Vivarium server at {}", client.base())),
    }
}

async fn attach(client: &Client, path: &str, args: &ConsoleArgs) -> Result<i32> {
    let query = if args.no_replay { "?replay=false" } else { "" };
    let url = ws_url(client.base(), &format!("{path}{query}"))?;
    let socket = connect(client, &url, "viv-console").await?;
    let terminal = RawTerminal::enter()?;
    let nl = if terminal.is_some() { "\r\n" } else { "\n" };
    eprint!(
        "[viv: attached to the serial console of VM {}; Ctrl-] . detaches, Ctrl-] b sends a break]{nl}",
        args.vm
    );
    let outcome = bridge(socket, nl).await;
    drop(terminal);
    match outcome {
        Ok(Ending::Detached) => eprintln!("\n[viv: detached]"),
        Ok(Ending::Closed(reason)) => eprintln!("\n[viv: console closed: {reason}]"),
        Err(e) => return Err(e),
    }
    Ok(0)
}

/// How a session ended.
enum Ending {
    /// The user detached (or a signal asked to stop).
    Detached,
    /// The server closed the console, saying why.
    Closed(String),
}

async fn bridge(socket: Socket, nl: &str) -> Result<Ending> {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut tx, mut rx) = socket.split();
    let mut stdin = tokio::io::stdin();
    let mut stdout = tokio::io::stdout();
    let mut term = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let mut escape = Escape::default();
    let mut buf = vec![0u8; 4096];
    let mut stdin_open = true;
    loop {
        tokio::select! {
            message = rx.next() => match message {
                Some(Ok(Message::Binary(bytes))) => {
                    stdout.write_all(&bytes).await?;
                    stdout.flush().await?;
                }
                Some(Ok(Message::Text(text))) => {
                    let message = serde_json::from_str::<serde_json::Value>(&text)
                        .ok()
                        .and_then(|v| v["message"].as_str().map(str::to_owned))
                        .unwrap_or_else(|| text.to_string());
                    eprint!("{nl}[viv: the server says: {message}]{nl}");
                }
                Some(Ok(Message::Close(frame))) => {
                    let reason = frame.map(|f| f.reason.to_string()).filter(|r| !r.is_empty());
                    return Ok(Ending::Closed(reason.unwrap_or_else(|| "the server closed it".into())));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(anyhow!(e).context("the console connection failed")),
                None => return Ok(Ending::Closed("the connection ended".into())),
            },
            read = stdin.read(&mut buf), if stdin_open => {
                let n = read.context("reading the terminal")?;
                if n == 0 {
                    // Input ended (a pipe): keep showing output until detached or closed.
                    stdin_open = false;
                    continue;
                }
                for action in escape.feed(&buf[..n]) {
                    let message = match action {
                        Action::Send(bytes) => Message::Binary(bytes.into()),
                        Action::Break => Message::Text(r#"{"type":"break"}"#.into()),
                        Action::Detach => {
                            let _ = tx.send(Message::Close(None)).await;
                            return Ok(Ending::Detached);
                        }
                    };
                    tx.send(message).await.context("sending to the console")?;
                }
            }
            _ = term.recv() => return Ok(Ending::Detached),
            _ = hangup.recv() => return Ok(Ending::Detached),
        }
    }
}

/// What typed bytes mean.
#[derive(Debug, PartialEq, Eq)]
enum Action {
    /// Bytes for the guest.
    Send(Vec<u8>),
    /// A serial break.
    Break,
    /// Leave.
    Detach,
}

/// The escape sequence reader (see the module's invariants); a prefix may end one read and its
/// key start the next.
#[derive(Debug, Default)]
struct Escape {
    pending: bool,
}

impl Escape {
    fn feed(&mut self, input: &[u8]) -> Vec<Action> {
        let mut actions = Vec::new();
        let mut data = Vec::new();
        for &b in input {
            if std::mem::take(&mut self.pending) {
                match b {
                    b'.' | b'q' => {
                        flush(&mut actions, &mut data);
                        actions.push(Action::Detach);
                        return actions;
                    }
                    b'b' | b'B' => {
                        flush(&mut actions, &mut data);
                        actions.push(Action::Break);
                    }
                    ESCAPE => data.push(ESCAPE),
                    other => data.extend([ESCAPE, other]),
                }
            } else if b == ESCAPE {
                self.pending = true;
            } else {
                data.push(b);
            }
        }
        flush(&mut actions, &mut data);
        actions
    }
}

fn flush(actions: &mut Vec<Action>, data: &mut Vec<u8>) {
    if !data.is_empty() {
        actions.push(Action::Send(std::mem::take(data)));
    }
}

/// A terminal in raw mode; its settings are restored when dropped.
struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    /// Raw mode on stdin if it is a terminal (`None` when it is not: a pipe, a file).
    fn enter() -> Result<Option<Self>> {
        // SAFETY: isatty only inspects the descriptor number.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return Ok(None);
        }
        // SAFETY: termios is plain old data; all zeroes is a valid value, overwritten by
        // tcgetattr before use.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid, writable termios for tcgetattr to fill.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut saved) } != 0 {
            return Err(std::io::Error::last_os_error()).context("reading the terminal's settings");
        }
        let mut raw = saved;
        // SAFETY: `raw` is a valid termios; cfmakeraw only changes its flags.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: `raw` is a valid termios read by tcsetattr.
        if unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) } != 0 {
            return Err(std::io::Error::last_os_error()).context("putting the terminal in raw mode");
        }
        Ok(Some(Self { saved }))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: `saved` is the valid termios tcgetattr returned.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.saved) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_escape_prefix_detaches_breaks_and_passes_the_rest() {
        let mut escape = Escape::default();
        assert_eq!(escape.feed(b"ls\r"), [Action::Send(b"ls\r".to_vec())]);
        assert_eq!(
            escape.feed(b"a\x1db\x1d\x1dc\x1dx"),
            [
                Action::Send(b"a".to_vec()),
                Action::Break,
                Action::Send(b"\x1dc\x1dx".to_vec())
            ]
        );
        // The prefix at the end of one read, its key in the next.
        assert_eq!(escape.feed(b"z\x1d"), [Action::Send(b"z".to_vec())]);
        assert_eq!(escape.feed(b".ignored"), [Action::Detach]);
        assert_eq!(Escape::default().feed(b"\x1dq"), [Action::Detach]);
    }

    #[test]
    fn urls_and_segments() {
        assert_eq!(
            ws_url("http://h:3000/", "/vms/a/console").unwrap(),
            "ws://h:3000/vms/a/console"
        );
        assert_eq!(ws_url("https://h", "/x").unwrap(), "wss://h/x");
        assert!(ws_url("ftp://h", "/x").is_err());
        assert_eq!(segment("web-1.a_b"), "web-1.a_b");
        assert_eq!(segment("a/b?c"), "a%2Fb%3Fc");
    }
}
