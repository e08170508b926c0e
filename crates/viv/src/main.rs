//! `viv`: the Vivarium server (`viv serve`) and command-line client in one binary.

mod bench;
mod bench_gvisor;
mod bench_host;
mod bench_snapshots;
mod bench_terminal;
mod client;
mod commands;
mod console;
mod disk;
mod events;
mod files;
mod iso;
mod logs;
mod node;
mod output;
mod push;
mod serve;
mod shell;
mod ssh_keys;
mod switch;
mod template;
mod tls;
mod top;
mod transfer;
mod vm;
mod vm_backup;
mod vm_hotplug;
mod vm_nic;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Self-hosted sandboxes (small Linux VMs with an E2B-compatible API) and long-lived VMs.
#[derive(Debug, Parser)]
#[command(name = "viv", version, about)]
pub struct Cli {
    /// Server URL for client commands.
    #[arg(long, global = true, env = "VIV_API_URL", default_value = "http://127.0.0.1:3000")]
    pub api_url: String,
    /// API key for client commands (falls back to E2B_API_KEY).
    #[arg(long, global = true, env = "VIV_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// The node (name or id) that node-local work goes to when the server is an API server
    /// of a cluster: VMs created, disks, ISOs, switches, template builds. Default: the first
    /// node up by name.
    #[arg(long = "node", global = true, env = "VIV_NODE", value_name = "NODE")]
    pub on_node: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

/// Where the server keeps its state and cache.
#[derive(Debug, Clone, clap::Args)]
pub struct Dirs {
    /// State directory: database and sandbox run directories.
    #[arg(long, env = "VIV_DATA_DIR", default_value = "/var/lib/vivarium")]
    pub data_dir: PathBuf,
    /// Image cache directory (kernel, initramfs, root file systems).
    #[arg(long, env = "VIV_CACHE_DIR", default_value = "/var/cache/vivarium")]
    pub cache_dir: PathBuf,
    /// Where the state lives: unset, in SQLite at DATA_DIR/vivarium.db; `postgres://USER@HOST/DB`
    /// (or `host=… dbname=…`), in PostgreSQL, migrated at start.
    #[arg(long, env = "VIV_DATABASE", hide_env_values = true)]
    pub database: Option<String>,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (control plane and node).
    Serve(Box<serve::ServeArgs>),
    /// Build or import guest images.
    #[command(subcommand)]
    Image(commands::ImageCommand),
    /// Manage API keys (works on the server's database directly).
    #[command(subcommand)]
    Keys(commands::KeysCommand),
    /// Create, list, inspect and kill sandboxes.
    #[command(subcommand, alias = "sb")]
    Sandbox(commands::SandboxCommand),
    /// Run a command in a sandbox, streaming its output; exits with the command's exit code.
    Exec(commands::ExecArgs),
    /// An interactive shell (a terminal) in a sandbox, or a command under one; exits with its
    /// exit code. Without a terminal on stdin, runs what is piped in.
    Shell(shell::ShellArgs),
    /// Copy files into and out of a sandbox, list directories.
    #[command(subcommand)]
    Files(files::FilesCommand),
    /// List and delete snapshot nodes (pause, fork and named snapshots).
    #[command(subcommand, alias = "snap")]
    Snapshot(commands::SnapshotCommand),
    /// Build templates from specs (a Dockerfile subset); list and delete them.
    #[command(subcommand)]
    Template(template::TemplateCommand),
    /// Build the template a directory's vivarium.toml describes (only what changed) and record
    /// the new version's id in that file.
    Push(push::PushArgs),
    /// Define, start, stop, edit and delete long-lived VMs (the VM manager).
    #[command(subcommand)]
    Vm(vm::VmCommand),
    /// Create, list, edit and delete VM switches (bridges VM NICs attach to).
    #[command(subcommand)]
    Switch(switch::SwitchCommand),
    /// List, show, drain and remove the cluster's nodes (servers sharing one database).
    #[command(subcommand)]
    Node(node::NodeCommand),
    /// Follow state changes of VMs, sandboxes and operations as they happen.
    Events(events::EventsArgs),
    /// A live table of sandboxes and VMs (CPU, memory, state, age); sort, kill, pause, resume.
    Top(top::TopArgs),
    /// Attach to a running VM's serial console (Ctrl-] . detaches), or print its log.
    Console(console::ConsoleArgs),
    /// Disks of the storage pool: create, import, upload, download, resize, clone, wipe.
    #[command(subcommand)]
    Disk(disk::DiskCommand),
    /// The ISO library: add, list, delete.
    #[command(subcommand)]
    Iso(iso::IsoCommand),
    /// Measure boots, snapshot restores, pause/resume/fork, round trips and file throughput.
    Bench(bench::BenchArgs),
}

fn main() {
    // `viv __jail SPEC` is the jailer the server starts each QEMU through: it must run before
    // any other thread exists (it unshares namespaces), so before clap and the runtime.
    let mut args = std::env::args_os();
    if args.nth(1).is_some_and(|a| a == viv_jail::JAILER_ARG) {
        let spec = args.next().and_then(|s| s.into_string().ok()).unwrap_or_default();
        viv_jail::run_jailer(&spec);
    }
    let cli = Cli::parse();
    let is_serve = matches!(cli.command, Command::Serve(_));
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("VIV_LOG").unwrap_or_else(|_| {
                if is_serve {
                    "info".into()
                } else {
                    "warn".into()
                }
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = match runtime.block_on(commands::run(cli)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            1
        }
    };
    // A server's tasks still in flight (a VM being started, a build) are dropped now, so that
    // what they hold is released (a VM handle nobody detached kills its QEMU) before the process
    // ends. Other commands exit at once (a terminal's stdin reader may block for ever).
    if is_serve {
        runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    }
    std::process::exit(code);
}
