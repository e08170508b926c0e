//! `viv shell ID [-u USER] [-- CMD...]`: a terminal in a sandbox through the server's terminal
//! WebSocket (`GET /sandboxes/{id}/terminal`, subprotocol `viv-terminal.v1`).
//!
//! Invariants:
//! - when stdin is a terminal, it is in raw mode only while the shell runs: [`RawMode`] restores
//!   it when dropped, which every way out of [`run`] does (the process's exit, the sandbox
//!   stopping, an error, SIGTERM or SIGHUP, a panic's unwinding); the remote terminal gets this
//!   terminal's size at start and at every SIGWINCH;
//! - when stdin is not a terminal (a pipe, a file), the process runs without a terminal
//!   (`pty=false`): its input is stdin, closed at stdin's end, and its output stdout and stderr,
//!   merged — so scripts can be piped in without echo or prompts;
//! - the exit code is the remote process's (255 when a signal ended it); a shell that ends any
//!   other way (the sandbox killed or paused, the connection lost) is an error with the
//!   server's words;
//! - the API key travels in the `X-API-Key` header, never in the URL.

use std::io::IsTerminal as _;

use anyhow::{anyhow, Context as _, Result};
use futures::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_tungstenite::tungstenite::Message;

use crate::client::Client;
use crate::console::{connect, segment, ws_url, Socket};

/// The terminal WebSocket's subprotocol.
const SUBPROTOCOL: &str = "viv-terminal.v1";

/// `viv shell`.
#[derive(Debug, clap::Args)]
pub struct ShellArgs {
    /// Sandbox id.
    pub id: String,
    /// Run as this user (the sandbox's default user when absent).
    #[arg(long, short)]
    pub user: Option<String>,
    /// A command line for the user's login shell instead of an interactive shell (the words
    /// are joined with spaces, as ssh does).
    #[arg(last = true)]
    pub command: Vec<String>,
}

/// Runs `viv shell`; returns the remote process's exit code.
pub async fn run(client: &Client, args: ShellArgs) -> Result<i32> {
    let tty = std::io::stdin().is_terminal();
    let (cols, rows) = if tty { terminal_size() } else { (80, 24) };
    let url = terminal_url(client.base(), &args, tty, (cols, rows))?;
    let socket = connect(client, &url, SUBPROTOCOL).await?;
    let raw = if tty { Some(RawMode::enter()?) } else { None };
    let ending = bridge(socket, tty).await;
    drop(raw);
    match ending? {
        Ending::Exit(code) => Ok(if (0..=255).contains(&code) { code } else { 255 }),
        Ending::Error(message) => Err(anyhow!("the shell ended: {message}")),
        Ending::Closed(reason) => Err(anyhow!("the connection to the server ended: {reason}")),
        Ending::Signal => Ok(129),
    }
}

/// This terminal's size; 80×24 when it does not say (a size of zero, as a new pseudo-terminal
/// has).
fn terminal_size() -> (u16, u16) {
    match crossterm::terminal::size() {
        Ok((cols, rows)) if cols > 0 && rows > 0 => (cols, rows),
        _ => (80, 24),
    }
}

/// The terminal WebSocket URL for `args`.
fn terminal_url(base: &str, args: &ShellArgs, tty: bool, (cols, rows): (u16, u16)) -> Result<String> {
    let url = ws_url(base, &format!("/sandboxes/{}/terminal", segment(&args.id)))?;
    let mut url = reqwest::Url::parse(&url).with_context(|| format!("the server URL {base} is not valid"))?;
    {
        let mut query = url.query_pairs_mut();
        query
            .append_pair("cols", &cols.max(1).to_string())
            .append_pair("rows", &rows.max(1).to_string());
        if let Some(user) = &args.user {
            query.append_pair("user", user);
        }
        if !args.command.is_empty() {
            query.append_pair("cmd", &args.command.join(" "));
        }
        if !tty {
            query.append_pair("pty", "false");
        }
    }
    Ok(url.into())
}

/// How a shell ended.
#[derive(Debug, PartialEq, Eq)]
enum Ending {
    /// The process exited with this code.
    Exit(i32),
    /// The server reported a failure.
    Error(String),
    /// The connection closed without either.
    Closed(String),
    /// SIGTERM or SIGHUP here.
    Signal,
}

/// A message of the server, as far as the client acts on it.
#[derive(Debug, PartialEq, Eq)]
enum ServerSays {
    /// Output.
    Output(Vec<u8>),
    /// The end (exit or error).
    End(Ending),
    /// Nothing to act on (`started`, pings, unknown text).
    Nothing,
}

fn interpret(message: Message) -> ServerSays {
    match message {
        Message::Binary(bytes) => ServerSays::Output(bytes.to_vec()),
        Message::Text(text) => {
            let value: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            match value["type"].as_str() {
                Some("exit") => {
                    let code = value["exitCode"].as_i64().unwrap_or(-1);
                    ServerSays::End(Ending::Exit(i32::try_from(code).unwrap_or(-1)))
                }
                Some("error") => ServerSays::End(Ending::Error(
                    value["message"].as_str().unwrap_or("unknown error").to_owned(),
                )),
                _ => ServerSays::Nothing,
            }
        }
        Message::Close(frame) => {
            let reason = frame
                .map(|f| format!("{} {}", u16::from(f.code), f.reason))
                .unwrap_or_else(|| "no reason given".into());
            ServerSays::End(Ending::Closed(reason.trim().to_owned()))
        }
        _ => ServerSays::Nothing,
    }
}

async fn bridge(socket: Socket, tty: bool) -> Result<Ending> {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut tx, mut rx) = socket.split();
    let mut stdin = tokio::io::stdin();
    let mut stdout = tokio::io::stdout();
    let mut term = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let mut winch = signal(SignalKind::window_change())?;
    let mut buf = vec![0u8; 16 * 1024];
    let mut stdin_open = true;
    loop {
        tokio::select! {
            message = rx.next() => match message {
                Some(Ok(message)) => match interpret(message) {
                    ServerSays::Output(bytes) => {
                        stdout.write_all(&bytes).await.context("writing to the terminal")?;
                        stdout.flush().await.context("writing to the terminal")?;
                    }
                    ServerSays::End(ending) => return Ok(ending),
                    ServerSays::Nothing => {}
                },
                Some(Err(e)) => return Ok(Ending::Closed(e.to_string())),
                None => return Ok(Ending::Closed("the server closed the connection".into())),
            },
            read = stdin.read(&mut buf), if stdin_open => {
                let n = read.context("reading stdin")?;
                let message = if n == 0 {
                    stdin_open = false;
                    // A terminal's end of input is its EOF character; a pipe's closes stdin.
                    if tty { Message::Binary(vec![4u8].into()) } else { Message::Text(r#"{"type":"eof"}"#.into()) }
                } else {
                    Message::Binary(buf[..n].to_vec().into())
                };
                if tx.send(message).await.is_err() {
                    // The server went away: its close (or error) is still to be read.
                    stdin_open = false;
                }
            }
            _ = winch.recv(), if tty => {
                let (cols, rows) = terminal_size();
                let resize = serde_json::json!({"type": "resize", "cols": cols, "rows": rows});
                let _ = tx.send(Message::Text(resize.to_string().into())).await;
            }
            _ = term.recv() => return Ok(Ending::Signal),
            _ = hangup.recv() => return Ok(Ending::Signal),
        }
    }
}

/// Stdin in raw mode (crossterm), restored when dropped.
struct RawMode;

impl RawMode {
    fn enter() -> Result<Self> {
        crossterm::terminal::enable_raw_mode().context("putting the terminal in raw mode")?;
        Ok(Self)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = crossterm::terminal::disable_raw_mode();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(id: &str, user: Option<&str>, command: &[&str]) -> ShellArgs {
        ShellArgs {
            id: id.into(),
            user: user.map(Into::into),
            command: command.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn urls_carry_size_user_and_command() {
        let url = terminal_url("http://h:3000", &args("sb1", None, &[]), true, (120, 40)).unwrap();
        assert_eq!(url, "ws://h:3000/sandboxes/sb1/terminal?cols=120&rows=40");
        let url = terminal_url(
            "https://h/",
            &args("a/b", Some("root"), &["echo", "a&b c"]),
            false,
            (0, 0),
        )
        .unwrap();
        assert_eq!(
            url,
            "wss://h/sandboxes/a%2Fb/terminal?cols=1&rows=1&user=root&cmd=echo+a%26b+c&pty=false"
        );
    }

    #[test]
    fn server_messages() {
        assert_eq!(
            interpret(Message::Binary(b"hi".to_vec().into())),
            ServerSays::Output(b"hi".to_vec())
        );
        assert_eq!(
            interpret(Message::Text(r#"{"type":"started","pid":7}"#.into())),
            ServerSays::Nothing
        );
        assert_eq!(
            interpret(Message::Text(r#"{"type":"exit","exitCode":3}"#.into())),
            ServerSays::End(Ending::Exit(3))
        );
        assert_eq!(
            interpret(Message::Text(r#"{"type":"error","message":"gone"}"#.into())),
            ServerSays::End(Ending::Error("gone".into()))
        );
        assert_eq!(interpret(Message::Text("garbage".into())), ServerSays::Nothing);
        assert!(matches!(
            interpret(Message::Close(None)),
            ServerSays::End(Ending::Closed(_))
        ));
    }
}
