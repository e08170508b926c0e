//! Session channels: a login shell (under a PTY when one was asked for), a command (`exec`) or
//! the `sftp` subsystem, each one process in the sandbox run as `user` (E2B's default user)
//! through [`viv_server::process_session`].
//!
//! - Setup requests (`pty-req`, `env` for `TERM`, `LANG` and `LC_*` only, `window-change`)
//!   are collected until the first start request (`shell`, `exec`, `subsystem sftp`); later
//!   ones are ignored (the handler already refused them).
//! - Commands run as sshd runs them: `$SHELL -c COMMAND` for `exec`, `$SHELL -l` for a shell,
//!   with `$SHELL` the user's login shell, which the agent sets. `sftp` runs the guest's own
//!   `sftp-server` (Debian's `openssh-sftp-server`, in the base image), so SFTP, `scp` (which
//!   speaks SFTP since OpenSSH 9) and `sshfs` get the real server's semantics and the user's
//!   permissions; a guest without one gets a message saying what to install.
//! - Input and output run in two directions at once: client data goes to the process through
//!   the session's bounded input queue (EOF closes stdin, except under a PTY), process output
//!   goes to the client only as its window allows, stderr as extended data.
//! - The end: the process's exit status (or the signal that killed it) is passed back, then EOF
//!   and close. A session that breaks (the sandbox stopped, paused or went silent) writes
//!   `vivarium: <why>` to the client and ends with status 255. A client that closes the
//!   channel or goes away kills the process (dropping the session's events does).

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use russh::server::{Handle, Msg};
use russh::{Channel, ChannelMsg, ChannelWriteHalf, Sig};
use viv_proto::process::{PtySize, Signal};
use viv_server::process_session::{ExitStatus, ProcessSession, ProcessSpec, SessionEvent};

use crate::handler::{ChannelSlot, Endpoints, Identity};
use crate::Shared;

/// The subsystem the gateway serves.
pub(crate) const SFTP: &str = "sftp";

/// The user sessions run as.
const USER: &str = "user";

/// Runs the guest's `sftp-server` from where distributions put it, or says what is missing.
const SFTP_LAUNCHER: &str = "for p in /usr/lib/openssh/sftp-server /usr/libexec/openssh/sftp-server \
     /usr/libexec/sftp-server /usr/lib/ssh/sftp-server /usr/lib/sftp-server; do \
     [ -x \"$p\" ] && exec \"$p\"; done; \
     echo 'vivarium: this sandbox has no sftp-server; install it (Debian: openssh-sftp-server)' >&2; exit 127";

/// Whether an `env` request may set `name`.
pub(crate) fn env_allowed(name: &str) -> bool {
    name == "TERM"
        || name == "LANG"
        || name
            .strip_prefix("LC_")
            .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'))
}

/// A value fit for the environment: short, printable, no NUL.
fn env_value(value: &str) -> Option<String> {
    (value.len() <= 256 && value.chars().all(|c| !c.is_control())).then(|| value.to_owned())
}

/// A terminal dimension from a client (0 or absurd values become the usual 80×24 defaults).
fn dimension(value: u32, default: u16) -> u16 {
    match u16::try_from(value) {
        Ok(v) if (1..=4096).contains(&v) => v,
        _ => default,
    }
}

/// What a session channel was asked to start.
enum Start {
    Shell,
    Exec(Vec<u8>),
    Sftp,
}

impl Start {
    fn kind(&self) -> &'static str {
        match self {
            Self::Shell => "shell",
            Self::Exec(_) => "exec",
            Self::Sftp => "sftp",
        }
    }
}

/// Everything a session channel needs besides the channel.
pub(crate) struct Context {
    pub shared: Arc<Shared>,
    pub identity: Identity,
    pub endpoints: Endpoints,
    pub handle: Handle,
    pub _slot: ChannelSlot,
}

pub(crate) async fn run(channel: Channel<Msg>, ctx: Context) {
    let id = channel.id();
    let (mut read, write) = channel.split();
    let mut pty: Option<PtySize> = None;
    let mut env = BTreeMap::new();
    let start = loop {
        match read.wait().await {
            None | Some(ChannelMsg::Close) => return,
            Some(ChannelMsg::RequestPty {
                term,
                col_width,
                row_height,
                ..
            }) => {
                pty = Some(PtySize {
                    cols: u32::from(dimension(col_width, 80)),
                    rows: u32::from(dimension(row_height, 24)),
                });
                if let Some(term) = env_value(&term).filter(|t| !t.is_empty()) {
                    env.insert("TERM".to_owned(), term);
                }
            }
            Some(ChannelMsg::SetEnv {
                variable_name,
                variable_value,
                ..
            }) => {
                if let Some(value) = env_value(&variable_value).filter(|_| env_allowed(&variable_name)) {
                    env.insert(variable_name, value);
                }
            }
            Some(ChannelMsg::WindowChange {
                col_width, row_height, ..
            }) => {
                if let Some(size) = pty.as_mut() {
                    size.cols = u32::from(dimension(col_width, 80));
                    size.rows = u32::from(dimension(row_height, 24));
                }
            }
            Some(ChannelMsg::RequestShell { .. }) => break Start::Shell,
            Some(ChannelMsg::Exec { command, .. }) => break Start::Exec(command),
            Some(ChannelMsg::RequestSubsystem { name, .. }) if name == SFTP => break Start::Sftp,
            // Data before a start request has nowhere to go.
            Some(_) => {}
        }
    };
    let kind = start.kind();
    ctx.shared.state.metrics.ssh.channel(kind);
    let sandbox = ctx.identity.sandbox.clone();
    let pty = if matches!(start, Start::Sftp) { None } else { pty };
    let started_at = std::time::Instant::now();
    let spec = match spec(start, env, &ctx.endpoints) {
        Ok(spec) => spec,
        Err(message) => return fail(&write, pty.is_some(), &message).await,
    };
    let reached = match crate::reach::reach(&ctx.shared.state, &sandbox).await {
        Ok(reached) => Arc::new(reached),
        Err(message) => return fail(&write, pty.is_some(), &message).await,
    };
    let session = match ProcessSession::open(reached.clone(), Some(USER), spec, pty).await {
        Ok(session) => session,
        Err(err) => return fail(&write, pty.is_some(), &format!("cannot start: {err}")).await,
    };
    tracing::info!(%sandbox, kind, pid = session.pid(), pty = pty.is_some(), "SSH session started");
    let (input, mut events) = session.into_parts();
    let has_pty = pty.is_some();
    let to_process = async {
        let mut writable = true;
        loop {
            match read.wait().await {
                Some(ChannelMsg::Data { data }) => {
                    if writable && input.write(data).await.is_err() {
                        writable = false;
                    }
                }
                Some(ChannelMsg::Eof) => {
                    if !has_pty && writable {
                        writable = false;
                        let _ = input.close_stdin().await;
                    }
                }
                Some(ChannelMsg::WindowChange {
                    col_width, row_height, ..
                }) => {
                    if has_pty {
                        let _ = input.resize(dimension(col_width, 80), dimension(row_height, 24)).await;
                    }
                }
                Some(ChannelMsg::Signal { signal }) => {
                    let signal = match signal {
                        Sig::KILL => Signal::Sigkill,
                        _ => Signal::Sigterm,
                    };
                    let _ = input.signal(signal).await;
                }
                Some(ChannelMsg::Close) | None => return,
                Some(_) => {}
            }
        }
    };
    let from_process = async {
        loop {
            let sent = match events.next().await {
                Some(SessionEvent::Stdout(data) | SessionEvent::Pty(data)) => write.data_bytes(data).await,
                Some(SessionEvent::Stderr(data)) => write.extended_data_bytes(1, data).await,
                Some(SessionEvent::Exit(status)) => return Ok(status),
                Some(SessionEvent::Error(err)) => return Err(err.to_string()),
                None => return Err("the session ended without an exit status".to_owned()),
            };
            if sent.is_err() {
                return Err("the client went away".to_owned());
            }
        }
    };
    let ended = tokio::select! {
        () = to_process => None,
        ended = from_process => Some(ended),
    };
    match ended {
        // The client closed the channel: dropping the events kills the process.
        None => {
            tracing::info!(%sandbox, kind, secs = started_at.elapsed().as_secs(), "SSH session closed by the client")
        }
        Some(Ok(status)) => {
            tracing::info!(%sandbox, kind, status = %status.status, secs = started_at.elapsed().as_secs(), "SSH session ended");
            let _ = write.eof().await;
            send_exit(&ctx.handle, id, &write, &status).await;
            let _ = write.close().await;
        }
        Some(Err(message)) => {
            // A broken channel is most often a sandbox that was killed, paused or stopped.
            let message = crate::reach::why_broken(&ctx.shared.state, &sandbox, &reached, message).await;
            tracing::info!(%sandbox, kind, error = %message, "SSH session broke");
            fail(&write, has_pty, &message).await;
        }
    }
}

/// The process a start request runs.
fn spec(start: Start, mut env: BTreeMap<String, String>, endpoints: &Endpoints) -> Result<ProcessSpec, String> {
    let peer = endpoints.peer;
    if let Some(local) = endpoints.local {
        env.insert(
            "SSH_CONNECTION".into(),
            format!("{} {} {} {}", peer.ip(), peer.port(), local.ip(), local.port()),
        );
        env.insert(
            "SSH_CLIENT".into(),
            format!("{} {} {}", peer.ip(), peer.port(), local.port()),
        );
    }
    let script = |args: &[&str]| args.iter().map(|a| (*a).to_owned()).collect::<Vec<_>>();
    let args = match start {
        Start::Shell => script(&["-c", "exec \"${SHELL:-/bin/sh}\" -l"]),
        Start::Exec(command) => {
            let command = String::from_utf8(command).map_err(|_| "the command is not valid UTF-8".to_owned())?;
            if command.contains('\0') {
                return Err("the command contains a NUL byte".into());
            }
            let mut args = script(&["-c", "exec \"${SHELL:-/bin/sh}\" -c \"$1\"", "sh"]);
            args.push(command);
            args
        }
        Start::Sftp => script(&["-c", SFTP_LAUNCHER]),
    };
    Ok(ProcessSpec {
        cmd: "/bin/sh".into(),
        args,
        envs: env,
        cwd: None,
    })
}

/// Passes the process's end back: its exit status, or the signal that killed it.
async fn send_exit(handle: &Handle, id: russh::ChannelId, write: &ChannelWriteHalf<Msg>, status: &ExitStatus) {
    if status.exited {
        let _ = write.exit_status(u32::try_from(status.code).unwrap_or(255)).await;
        return;
    }
    // The agent words signals as Go does (`signal: killed`).
    let signal = match status.status.strip_prefix("signal: ").unwrap_or_default() {
        "killed" => Sig::KILL,
        "terminated" => Sig::TERM,
        "interrupt" => Sig::INT,
        "hangup" => Sig::HUP,
        "broken pipe" => Sig::PIPE,
        "segmentation fault" => Sig::SEGV,
        "aborted" => Sig::ABRT,
        _ => {
            let _ = write.exit_status(255).await;
            return;
        }
    };
    let _ = handle
        .exit_signal_request(id, signal, false, status.status.clone(), String::new())
        .await;
}

/// Tells the client why its session cannot go on, then ends it with status 255.
async fn fail(write: &ChannelWriteHalf<Msg>, pty: bool, message: &str) {
    let _ = if pty {
        write
            .data_bytes(Bytes::from(format!("\r\nvivarium: {message}\r\n")))
            .await
    } else {
        write
            .extended_data_bytes(1, Bytes::from(format!("vivarium: {message}\n")))
            .await
    };
    let _ = write.eof().await;
    let _ = write.exit_status(255).await;
    let _ = write.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_locale_and_terminal_variables_pass() {
        for ok in ["TERM", "LANG", "LC_ALL", "LC_CTYPE", "LC_MEASUREMENT"] {
            assert!(env_allowed(ok), "{ok}");
        }
        for refused in ["PATH", "LD_PRELOAD", "LC_", "LC_all", "LANGUAGE", "BASH_ENV", "term"] {
            assert!(!env_allowed(refused), "{refused}");
        }
        assert_eq!(env_value("en_US.UTF-8").as_deref(), Some("en_US.UTF-8"));
        assert_eq!(env_value("a\nb"), None);
        assert_eq!(env_value(&"x".repeat(300)), None);
    }

    #[test]
    fn dimensions_are_bounded() {
        assert_eq!(dimension(120, 80), 120);
        assert_eq!(dimension(0, 80), 80);
        assert_eq!(dimension(70_000, 24), 24);
    }

    #[test]
    fn commands_run_in_the_login_shell_of_the_user() {
        let endpoints = Endpoints {
            peer: "10.1.2.3:5555".parse().unwrap(),
            local: Some("127.0.0.1:2222".parse().unwrap()),
        };
        let exec = spec(
            Start::Exec(b"echo 'hi there'; exit 3".to_vec()),
            BTreeMap::new(),
            &endpoints,
        )
        .unwrap();
        assert_eq!(exec.cmd, "/bin/sh");
        assert_eq!(exec.args.last().unwrap(), "echo 'hi there'; exit 3");
        assert_eq!(exec.envs["SSH_CONNECTION"], "10.1.2.3 5555 127.0.0.1 2222");
        assert!(spec(Start::Exec(vec![0xff, 0xfe]), BTreeMap::new(), &endpoints).is_err());
        assert!(spec(Start::Exec(b"a\0b".to_vec()), BTreeMap::new(), &endpoints).is_err());
    }
}
