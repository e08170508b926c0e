//! `viv-agent`: the sandbox's guest agent.
//!
//! Started by the kernel as PID 1 of the initramfs the host supplies, it prepares the guest
//! ([`init`]), then serves the envd-compatible services ([`server`]) over HTTP/2 on the
//! virtio-serial port named `vivarium.agent` ([`channel`]). Outside a VM it can serve on a Unix
//! socket instead (`viv-agent --listen PATH`), which is how its handlers are exercised on a host.

use viv_agent::{channel, data_path, init, reaper, server};

use std::path::PathBuf;

/// The virtio-serial port name the host attaches the agent channel to.
const PORT_NAME: &str = "vivarium.agent";

fn main() {
    let is_pid1 = std::process::id() == 1;
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("VIV_AGENT_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .init();
    if is_pid1 {
        if let Err(err) = init::boot() {
            // PID 1 must never exit: that would panic the kernel with a useless message.
            eprintln!("viv-agent: guest init failed: {err:#}");
            init::halt();
        }
    }
    let listen = std::env::args()
        .skip_while(|a| a != "--listen")
        .nth(1)
        .map(PathBuf::from);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async move {
        let state = server::AgentState::new();
        reaper::start();
        let app = server::router(state);
        if let Some(gateway) = data_path::gateway() {
            let app = app.clone();
            tokio::spawn(async move {
                if let Err(err) = data_path::serve(gateway, app).await {
                    // The channel still carries everything.
                    tracing::warn!(error = %err, "no data path");
                }
            });
        }
        match listen {
            Some(path) => channel::serve_unix(&path, app).await,
            None => channel::serve_port(PORT_NAME, app).await,
        }
    });
    if let Err(err) = result {
        eprintln!("viv-agent: {err:#}");
        if is_pid1 {
            init::halt();
        }
        std::process::exit(1);
    }
}
