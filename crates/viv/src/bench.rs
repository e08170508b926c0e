//! `viv bench`: cold boot, create from snapshot, pause / resume / fork (with the guest clock error
//! after a resume and the bytes per snapshot node), command round trip and file throughput,
//! measured side by side through the public API of a running server and printed with the
//! accelerator the server uses.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use base64::Engine as _;
use clap::Args;
use rand::RngCore as _;
use reqwest::Method;
use viv_api::{CreatedSandbox, ExecEvent, ExecRequest, NewSandbox};

use crate::bench_host::{cpu_times, free_page_reporting_kib, reporting_row, stolen_percent, stolen_row};
use crate::client::Client;
use crate::output;

/// Options of `viv bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Cold boots to time.
    #[arg(long, default_value_t = 5)]
    pub boots: usize,
    /// `true` round trips to time.
    #[arg(long, default_value_t = 100)]
    pub round_trips: usize,
    /// Size of the file written and read, MiB.
    #[arg(long, default_value_t = 64)]
    pub file_mib: usize,
    /// Pause / resume / fork cycles to time (when the server uses snapshots).
    #[arg(long, default_value_t = 5)]
    pub cycles: usize,
    /// Creates to time, each way (a restore, and a warm VM from the pool).
    #[arg(long, default_value_t = 50)]
    pub creates: usize,
    /// Sandboxes to keep idle at once, each then answering `echo`, with the host memory each
    /// costs (0 skips this part). Memory figures need the server on this host.
    #[arg(long, default_value_t = 50)]
    pub idle: usize,
    /// Terminals to open (`GET /sandboxes/{id}/terminal`, time to the shell's prompt), the
    /// last one then timing keystroke echoes (0 skips this part).
    #[arg(long, default_value_t = 10)]
    pub terminals: usize,
    /// Keystrokes whose echo is timed.
    #[arg(long, default_value_t = 100)]
    pub keystrokes: usize,
    /// Measure only the terminals.
    #[arg(long)]
    pub terminal_only: bool,
    /// gVisor side by side: alternating `runsc run` of `python3 -c 'print(6*7)'` and a pooled
    /// create + exec of the same, this many each (0 skips; skipped too without `runsc`). Its
    /// idle part holds `--idle` containers. Needs root and the image cache on this host.
    #[arg(long, default_value_t = 10)]
    pub gvisor: usize,
    /// gVisor's platform.
    #[arg(long, default_value = "systrap")]
    pub gvisor_platform: String,
    /// Measure only the gVisor comparison (with `--idle` idle sandboxes beside its containers).
    #[arg(long)]
    pub gvisor_only: bool,
    /// Measure only the memory diff figures (bytes per node, resume at chain depths 1, 10, 50).
    #[arg(long)]
    pub memory_diff_only: bool,
    /// Image cache directory (the guests' root file system, exported for gVisor).
    #[arg(long, env = "VIV_CACHE_DIR", default_value = "/var/cache/vivarium")]
    pub cache_dir: std::path::PathBuf,
}

/// What `--idle` measured.
pub(crate) struct Idle {
    n: usize,
    echo_p50: Duration,
    echo_max: Duration,
    pub(crate) pss_mib_per_sandbox: Option<f64>,
    available_mib_per_sandbox: Option<f64>,
}

/// `MemAvailable` of this host in KiB.
fn mem_available_kib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Proportional set size in KiB of the QEMU process of sandbox `id` (found by its VM name), if
/// it runs on this host.
fn sandbox_pss_kib(id: &str) -> Option<u64> {
    let name = format!("viv-{}", &id[..8.min(id.len())]);
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        // The jail starts QEMU by its full path.
        let program = cmdline.split('\0').next().unwrap_or_default();
        let program = program.rsplit('/').next().unwrap_or_default();
        if program.starts_with("qemu-system") && cmdline.split('\0').any(|arg| arg == name) {
            let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
            return rollup
                .lines()
                .find_map(|l| l.strip_prefix("Pss:"))?
                .split_whitespace()
                .next()?
                .parse()
                .ok();
        }
    }
    None
}

/// Starts `n` sandboxes, lets them idle, then has each answer `echo` and measures what they
/// cost in host memory.
pub(crate) async fn idle_sandboxes(client: &Client, n: usize) -> Result<Idle> {
    let available_before = mem_available_kib();
    let mut ids = Vec::new();
    let result = async {
        for i in 0..n {
            ids.push(
                create(client, Start::Restore)
                    .await
                    .context("creating an idle sandbox")?,
            );
            if (i + 1) % 10 == 0 {
                eprintln!("  idle sandboxes: {}/{n} created", i + 1);
            }
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        let mut echoes = Vec::new();
        for id in &ids {
            let start = Instant::now();
            let (code, out) = run_command(client, id, &["echo", "hi"]).await?;
            echoes.push(start.elapsed());
            ensure!(code == 0 && out == "hi\n", "`echo hi` in {id} gave {code}: {out:?}");
        }
        echoes.sort();
        let pss: Option<Vec<u64>> = ids.iter().map(|id| sandbox_pss_kib(id)).collect();
        let available_after = mem_available_kib();
        let per = |kib: f64| (kib / 1024.0 / n as f64 * 10.0).round() / 10.0;
        Ok(Idle {
            n,
            echo_p50: percentile(&echoes, 0.5),
            echo_max: echoes[echoes.len() - 1],
            pss_mib_per_sandbox: pss.map(|p| per(p.iter().sum::<u64>() as f64)),
            available_mib_per_sandbox: available_before
                .zip(available_after)
                .map(|(before, after)| per(before.saturating_sub(after) as f64)),
        })
    }
    .await;
    // Every sandbox goes, even when one is gone already (timed out on a slow host).
    let mut killed = Ok(());
    for id in &ids {
        if let Err(err) = kill(client, id).await {
            killed = Err(err);
        }
    }
    let idle = result?;
    killed.map(|()| idle)
}

/// How a benchmark creates a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Start {
    /// Boot the kernel.
    ColdBoot,
    /// Restore the template snapshot into a new VM (the pool bypassed).
    Restore,
    /// The server's default: a warm VM from the pool when one is ready.
    Pooled,
}

/// Timings of one pause / resume / fork cycle.
struct Cycle {
    /// Pause, the VM parked (the server's default `--pause-keep-warm`).
    pause: Duration,
    /// Resume right after: the parked VM continues.
    resume: Duration,
    resume_first: Duration,
    /// Pause that frees the VM (`keepWarm: false`) and the resume after it, which restores the
    /// node.
    pause_released: Duration,
    resume_restored: Duration,
    resume_restored_first: Duration,
    fork_first: Duration,
    clock_error_ms: f64,
    pause_node_bytes: u64,
    fork_node_bytes: u64,
}

fn now_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1000.0)
        .unwrap_or_default()
}

/// The body of a pause that frees the VM at once (not parked), so the next resume restores.
pub(crate) fn released_pause() -> viv_api::PauseRequest {
    viv_api::PauseRequest {
        keep_warm: Some(false),
        ..Default::default()
    }
}

/// Runs a command and returns its stdout.
async fn output(client: &Client, id: &str, argv: &[&str]) -> Result<String> {
    Ok(run_command(client, id, argv).await?.1)
}

/// Creates a sandbox, pauses it, resumes it (reading the guest clock right away), forks it.
/// With `pool`, waits until the pool has refilled before timing, so that the refill does not
/// compete for the CPU.
async fn cycle(client: &Client, pool: bool) -> Result<Cycle> {
    let id = create(client, Start::Pooled).await?;
    let result = async {
        ensure!(
            exec(client, &id, &["sh", "-c", "echo data > /tmp/state"]).await? == 0,
            "setup failed"
        );
        if pool {
            pool_ready(client).await?;
        }
        let start = Instant::now();
        client
            .send(client.request(Method::POST, &format!("/sandboxes/{id}/pause")))
            .await?;
        let pause = start.elapsed();
        let start = Instant::now();
        connect(client, &id, 300).await?;
        let resume = start.elapsed();
        let sent = now_ms();
        let guest = output(client, &id, &["date", "+%s%N"]).await?;
        let resume_first = start.elapsed();
        let received = now_ms();
        let guest_ms = guest.trim().parse::<f64>().context("reading the guest clock")? / 1e6;
        // The guest read its clock somewhere between send and receive; count the midpoint.
        let clock_error_ms = guest_ms - (sent + received) / 2.0;
        let start = Instant::now();
        let fork = viv_api::ForkRequest {
            timeout: Some(60),
            count: Some(1),
        };
        let forks: Vec<viv_api::ForkResult> = client
            .json(
                client
                    .request(Method::POST, &format!("/sandboxes/{id}/fork"))
                    .json(&fork),
            )
            .await?;
        let child = forks
            .first()
            .and_then(|f| f.sandbox.as_ref())
            .map(|s| s.sandbox_id.clone())
            .context("the fork failed")?;
        let first = exec(client, &child, &["cat", "/tmp/state"]).await;
        let fork_first = start.elapsed();
        let start = Instant::now();
        client
            .send(
                client
                    .request(Method::POST, &format!("/sandboxes/{id}/pause"))
                    .json(&released_pause()),
            )
            .await?;
        let pause_released = start.elapsed();
        let start = Instant::now();
        connect(client, &id, 300).await?;
        let resume_restored = start.elapsed();
        ensure!(
            exec(client, &id, &["cat", "/tmp/state"]).await? == 0,
            "the restored sandbox lacks its file"
        );
        let resume_restored_first = start.elapsed();
        let nodes: Vec<viv_api::SnapshotInfo> = client
            .json(client.request(Method::GET, "/snapshots").query(&[("sandboxID", &id)]))
            .await?;
        let size = |kind: &str| {
            nodes
                .iter()
                .filter(|n| n.kind == kind)
                .map(|n| n.size_bytes)
                .max()
                .unwrap_or(0)
        };
        kill(client, &child).await?;
        ensure!(first? == 0, "the fork lacks its parent's file");
        Ok(Cycle {
            pause,
            resume,
            resume_first,
            pause_released,
            resume_restored,
            resume_restored_first,
            fork_first,
            clock_error_ms,
            pause_node_bytes: size("pause"),
            fork_node_bytes: size("fork"),
        })
    }
    .await;
    kill(client, &id).await?;
    result
}

fn creates_cell(summary: &serde_json::Value) -> String {
    match summary["firstResultMs"].as_object() {
        Some(r) => format!(
            "{} / {} ms ({}x cold boot; created {} ms p50)",
            r["p50"], r["p95"], summary["ratioToColdBoot"], summary["createdMs"]["p50"]
        ),
        None => "not measured (server without snapshots or pool)".into(),
    }
}

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

pub(crate) fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 100.0
}

pub(crate) async fn create(client: &Client, start: Start) -> Result<String> {
    let req = NewSandbox {
        timeout: Some(600),
        cold_boot: (start == Start::ColdBoot).then_some(true),
        pooled: (start == Start::Restore).then_some(false),
        ..Default::default()
    };
    let created: CreatedSandbox = client
        .json(client.request(Method::POST, "/sandboxes").json(&req))
        .await?;
    Ok(created.sandbox_id)
}

/// Creates a sandbox and runs `true` in it; returns the time to created and to the result.
async fn create_and_run(client: &Client, mode: Start) -> Result<(Duration, Duration)> {
    let start = Instant::now();
    let id = create(client, mode).await.context("creating a sandbox")?;
    let created = start.elapsed();
    let first = exec(client, &id, &["true"]).await;
    let first_result = start.elapsed();
    kill(client, &id).await?;
    ensure!(first? == 0, "`true` failed in a new sandbox");
    Ok((created, first_result))
}

/// Waits (up to 5 minutes: a loaded host warms slowly) until the server has a warm VM and
/// warms no more (so that warming does not compete with what is timed next); false if it keeps
/// none by then.
pub(crate) async fn pool_ready(client: &Client) -> Result<bool> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(300) {
        let health: serde_json::Value = client.json(client.request(Method::GET, "/health")).await?;
        if health["pooled"].as_u64().unwrap_or(0) > 0 && health["poolWarming"].as_u64().unwrap_or(0) == 0 {
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(false)
}

pub(crate) async fn kill(client: &Client, id: &str) -> Result<()> {
    client
        .send(client.request(Method::DELETE, &format!("/sandboxes/{id}")))
        .await
        .map(|_| ())
}

/// Runs `argv` and returns its exit code.
async fn exec(client: &Client, id: &str, argv: &[&str]) -> Result<i32> {
    Ok(run_command(client, id, argv).await?.0)
}

/// Resumes sandbox `id` (`POST /sandboxes/{id}/connect`) with `timeout` seconds to live.
pub(crate) async fn connect(client: &Client, id: &str, timeout: u64) -> Result<()> {
    let body = viv_api::ConnectSandbox {
        timeout: Some(timeout),
        ..Default::default()
    };
    client
        .send(
            client
                .request(Method::POST, &format!("/sandboxes/{id}/connect"))
                .json(&body),
        )
        .await?;
    Ok(())
}

/// Runs a command through the exec route; returns its exit code and stdout.
pub(crate) async fn run_command(client: &Client, id: &str, argv: &[&str]) -> Result<(i32, String)> {
    let req = ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let text = client
        .send(
            client
                .request(Method::POST, &format!("/sandboxes/{id}/exec"))
                .json(&req),
        )
        .await?
        .text()
        .await?;
    let mut out = Vec::new();
    for line in text.lines() {
        match serde_json::from_str::<ExecEvent>(line)? {
            ExecEvent::Stdout { data } => out.extend(base64::engine::general_purpose::STANDARD.decode(data)?),
            ExecEvent::End { exit_code, .. } => return Ok((exit_code, String::from_utf8_lossy(&out).into_owned())),
            ExecEvent::Error { message } => anyhow::bail!(message),
            _ => {}
        }
    }
    anyhow::bail!("no exit status")
}

/// Runs the benchmark.
pub async fn run(client: &Client, args: BenchArgs, json: bool) -> Result<()> {
    ensure!(
        args.boots > 0 && args.round_trips > 0 && args.file_mib > 0,
        "counts must be positive"
    );
    let health: serde_json::Value = client.json(client.request(Method::GET, "/health")).await?;
    let accel = health["accel"].as_str().unwrap_or("unknown").to_owned();
    eprintln!("benchmarking {} (accel {accel})", health["vmm"].as_str().unwrap_or("?"));
    let cpu_at_start = cpu_times();
    if args.terminal_only {
        let terminal = terminals(client, &args).await?;
        if json {
            output::json(&serde_json::json!({ "accel": accel, "terminal": terminal }));
        } else {
            output::table(&["METRIC", "VALUE", "ACCEL"], &terminal_rows(&terminal, &accel));
        }
        return Ok(());
    }
    if args.memory_diff_only {
        let diff = crate::bench_snapshots::memory_diff(client).await?;
        let stolen = stolen_percent(cpu_at_start, cpu_times());
        if json {
            output::json(&serde_json::json!({ "accel": accel, "memoryDiff": diff, "hostCpuStolenPercent": stolen }));
        } else {
            let mut rows = crate::bench_snapshots::rows(&diff, &accel);
            rows.push(stolen_row(stolen));
            output::table(&["METRIC", "VALUE", "ACCEL"], &rows);
        }
        return Ok(());
    }
    if args.gvisor_only {
        let mut gvisor = gvisor(client, &args).await?;
        if args.idle > 0 && !gvisor.is_null() {
            let idle = idle_sandboxes(client, args.idle).await.context("idle sandboxes")?;
            gvisor["idle"]["vivariumPssMiBPerSandbox"] = idle.pss_mib_per_sandbox.into();
        }
        if json {
            output::json(&serde_json::json!({ "accel": accel, "gvisor": gvisor }));
        } else {
            output::table(
                &["METRIC", "VALUE", "ACCEL"],
                &crate::bench_gvisor::rows(&gvisor, &accel),
            );
        }
        return Ok(());
    }

    let mut boots = Vec::new();
    for i in 0..args.boots {
        let start = Instant::now();
        let id = create(client, Start::ColdBoot).await.context("creating a sandbox")?;
        boots.push(start.elapsed());
        eprintln!("  cold boot {}/{}: {:.0} ms", i + 1, args.boots, ms(boots[i]));
        kill(client, &id).await?;
    }
    boots.sort();

    // Creates from the template snapshot, measured in the same run as the cold boots: restores
    // into a new VM (the pool bypassed), then warm VMs taken from the pool (waiting for the pool
    // to refill before each). The first create builds the template snapshot.
    let snapshots = health["snapshots"].as_bool().unwrap_or(false);
    let mut restores = Vec::new();
    let mut pooled = Vec::new();
    if snapshots {
        kill(
            client,
            &create(client, Start::Restore)
                .await
                .context("building the template snapshot")?,
        )
        .await?;
        for (mode, label, timings) in [
            (Start::Restore, "restore", &mut restores),
            (Start::Pooled, "from the pool", &mut pooled),
        ] {
            for i in 0..args.creates {
                if mode == Start::Pooled && !pool_ready(client).await? {
                    eprintln!("  the server keeps no warm VMs (--pool-size 0); skipping pooled creates");
                    break;
                }
                timings.push(create_and_run(client, mode).await?);
                eprintln!(
                    "  create {label} {}/{}: {:.0} ms to created, {:.0} ms to first result",
                    i + 1,
                    args.creates,
                    ms(timings[i].0),
                    ms(timings[i].1)
                );
            }
        }
    }
    let summary = |creates: &[(Duration, Duration)]| {
        if creates.is_empty() {
            return serde_json::Value::Null;
        }
        let mut created: Vec<Duration> = creates.iter().map(|c| c.0).collect();
        let mut first: Vec<Duration> = creates.iter().map(|c| c.1).collect();
        created.sort();
        first.sort();
        let ratio = percentile(&first, 0.5).as_secs_f64() / percentile(&boots, 0.5).as_secs_f64();
        serde_json::json!({
            "createdMs": { "p50": ms(percentile(&created, 0.5)), "p95": ms(percentile(&created, 0.95)) },
            "firstResultMs": { "p50": ms(percentile(&first, 0.5)), "p95": ms(percentile(&first, 0.95)) },
            "n": creates.len(),
            "ratioToColdBoot": (ratio * 1000.0).round() / 1000.0,
        })
    };
    let restore = summary(&restores);
    let from_pool = summary(&pooled);

    let mut cycles = Vec::new();
    if snapshots {
        for i in 0..args.cycles {
            let c = cycle(client, !pooled.is_empty())
                .await
                .context("pause / resume / fork cycle")?;
            eprintln!(
                "  cycle {}/{}: pause {:.0} ms, resume {:.0} ms (first result {:.0} ms, clock error {:+.1} ms), fork to first result {:.0} ms; released pause {:.0} ms, restoring resume {:.0} ms (first result {:.0} ms)",
                i + 1,
                args.cycles,
                ms(c.pause),
                ms(c.resume),
                ms(c.resume_first),
                c.clock_error_ms,
                ms(c.fork_first),
                ms(c.pause_released),
                ms(c.resume_restored),
                ms(c.resume_restored_first)
            );
            cycles.push(c);
        }
    }
    let tree = if cycles.is_empty() {
        serde_json::Value::Null
    } else {
        let p50 = |f: &dyn Fn(&Cycle) -> Duration| {
            let mut v: Vec<Duration> = cycles.iter().map(f).collect();
            v.sort();
            ms(percentile(&v, 0.5))
        };
        let max_clock = cycles.iter().map(|c| c.clock_error_ms.abs()).fold(0.0, f64::max);
        let mib = |b: u64| (b as f64 / (1 << 20) as f64 * 10.0).round() / 10.0;
        serde_json::json!({
            "n": cycles.len(),
            "pauseMsP50": p50(&|c| c.pause),
            "resumeMsP50": p50(&|c| c.resume),
            "resumeFirstResultMsP50": p50(&|c| c.resume_first),
            "pauseReleasedMsP50": p50(&|c| c.pause_released),
            "resumeRestoredMsP50": p50(&|c| c.resume_restored),
            "resumeRestoredFirstResultMsP50": p50(&|c| c.resume_restored_first),
            "forkFirstResultMsP50": p50(&|c| c.fork_first),
            "clockErrorMsMaxAbs": (max_clock * 10.0).round() / 10.0,
            "pauseNodeMiB": mib(cycles.iter().map(|c| c.pause_node_bytes).max().unwrap_or(0)),
            "forkNodeMiB": mib(cycles.iter().map(|c| c.fork_node_bytes).max().unwrap_or(0)),
        })
    };

    let idle = if snapshots && args.idle > 0 {
        let idle = idle_sandboxes(client, args.idle).await.context("idle sandboxes")?;
        let mib = |v: Option<f64>| v.map_or(serde_json::Value::Null, serde_json::Value::from);
        serde_json::json!({
            "n": idle.n,
            "echoMsP50": ms(idle.echo_p50),
            "echoMsMax": ms(idle.echo_max),
            "allAnsweredWithin1s": idle.echo_max < Duration::from_secs(1),
            "pssMiBPerSandbox": mib(idle.pss_mib_per_sandbox),
            "memAvailableDropMiBPerSandbox": mib(idle.available_mib_per_sandbox),
        })
    } else {
        serde_json::Value::Null
    };

    let id = create(client, Start::Pooled).await?;
    let memory_mb = client.sandbox(&id).await.map(|i| i.memory_mb).unwrap_or_default();
    let result = async {
        let mut trips = Vec::new();
        for _ in 0..args.round_trips {
            let start = Instant::now();
            ensure!(exec(client, &id, &["true"]).await? == 0, "`true` failed");
            trips.push(start.elapsed());
        }
        trips.sort();
        // As E2B's SDKs (and `command` here) run every command: in a login shell.
        let mut shell_trips = Vec::new();
        for _ in 0..args.round_trips {
            let start = Instant::now();
            ensure!(
                exec(client, &id, &["/bin/bash", "-l", "-c", "true"]).await? == 0,
                "`bash -l -c true` failed"
            );
            shell_trips.push(start.elapsed());
        }
        shell_trips.sort();

        let mut data = vec![0u8; args.file_mib << 20];
        rand::thread_rng().fill_bytes(&mut data);
        let path = [("path", "/tmp/bench.bin")];
        let start = Instant::now();
        client
            .send(
                client
                    .request(Method::PUT, &format!("/sandboxes/{id}/files"))
                    .query(&path)
                    .body(data.clone()),
            )
            .await?;
        let write = start.elapsed();
        let start = Instant::now();
        let read_back = client
            .send(
                client
                    .request(Method::GET, &format!("/sandboxes/{id}/files"))
                    .query(&path),
            )
            .await?
            .bytes()
            .await?;
        let read = start.elapsed();
        ensure!(
            read_back.as_ref() == data.as_slice(),
            "the file read back differs from the one written"
        );
        Ok((trips, shell_trips, write, read))
    }
    .await;
    kill(client, &id).await?;
    let (trips, shell_trips, write, read) = result?;
    let terminal = if args.terminals > 0 {
        terminals(client, &args).await?
    } else {
        serde_json::Value::Null
    };
    let mut gvisor = gvisor(client, &args).await?;
    if !gvisor["idle"].is_null() {
        gvisor["idle"]["vivariumPssMiBPerSandbox"] = idle["pssMiBPerSandbox"].clone();
    }
    let mib = args.file_mib as f64;
    let stolen = stolen_percent(cpu_at_start, cpu_times());
    let reporting_kib = free_page_reporting_kib();
    let report = serde_json::json!({
        "accel": accel,
        "hostCpuStolenPercent": stolen,
        "hostFreePageReportingKiB": reporting_kib,
        "coldBootMs": { "p50": ms(percentile(&boots, 0.5)), "min": ms(boots[0]), "max": ms(boots[boots.len() - 1]), "n": boots.len() },
        "roundTripTrueMs": { "p50": ms(percentile(&trips, 0.5)), "p95": ms(percentile(&trips, 0.95)), "n": trips.len() },
        "roundTripLoginShellMs": { "p50": ms(percentile(&shell_trips, 0.5)), "p95": ms(percentile(&shell_trips, 0.95)), "n": shell_trips.len() },
        "restore": restore,
        "createFromPool": from_pool,
        "snapshotTree": tree,
        "memoryDiff": if tree.is_null() { serde_json::Value::Null } else { crate::bench_snapshots::memory_diff(client).await.context("memory diff figures")? },
        "idleSandboxes": idle,
        "guestMemoryMiB": memory_mb,
        "fileMiB": args.file_mib,
        "writeMiBps": (mib / write.as_secs_f64() * 10.0).round() / 10.0,
        "readMiBps": (mib / read.as_secs_f64() * 10.0).round() / 10.0,
        "terminal": terminal,
        "gvisor": gvisor,
    });
    if json {
        output::json(&report);
    } else {
        output::table(
            &["METRIC", "VALUE", "ACCEL"],
            &[
                vec![
                    format!("cold boot to agent ready, p50 of {}", boots.len()),
                    format!("{:.0} ms", ms(percentile(&boots, 0.5))),
                    accel.clone(),
                ],
                vec![
                    format!("exec `true` round trip, p50 of {}", trips.len()),
                    format!("{:.1} ms", ms(percentile(&trips, 0.5))),
                    accel.clone(),
                ],
                vec![
                    format!("exec `true` round trip, p95 of {}", trips.len()),
                    format!("{:.1} ms", ms(percentile(&trips, 0.95))),
                    accel.clone(),
                ],
                vec![
                    format!(
                        "command `true` in a login shell (`bash -l -c`, as E2B's SDKs run commands), p50 / p95 of {}",
                        shell_trips.len()
                    ),
                    format!(
                        "{:.1} / {:.1} ms",
                        ms(percentile(&shell_trips, 0.5)),
                        ms(percentile(&shell_trips, 0.95))
                    ),
                    accel.clone(),
                ],
                vec![
                    "create (snapshot restore) to first `true` result, p50 / p95".into(),
                    creates_cell(&report["restore"]),
                    accel.clone(),
                ],
                vec![
                    "create (warm VM from the pool) to first `true` result, p50 / p95".into(),
                    creates_cell(&report["createFromPool"]),
                    accel.clone(),
                ],
                vec![
                    format!("pause / resume (to created) p50, {memory_mb} MiB guest, VM parked"),
                    match tree.as_object() {
                        Some(t) => format!("{} / {} ms", t["pauseMsP50"], t["resumeMsP50"]),
                        None => "server runs without snapshots".into(),
                    },
                    accel.clone(),
                ],
                vec![
                    "resume to first result p50 (VM parked); guest clock error after resume, max".into(),
                    match tree.as_object() {
                        Some(t) => format!("{} ms; {} ms", t["resumeFirstResultMsP50"], t["clockErrorMsMaxAbs"]),
                        None => "-".into(),
                    },
                    accel.clone(),
                ],
                vec![
                    "pause / resume (to created) / resume to first result p50, VM released (restore)".into(),
                    match tree.as_object() {
                        Some(t) => format!(
                            "{} / {} / {} ms",
                            t["pauseReleasedMsP50"], t["resumeRestoredMsP50"], t["resumeRestoredFirstResultMsP50"]
                        ),
                        None => "-".into(),
                    },
                    accel.clone(),
                ],
                vec![
                    "fork of a running sandbox to first result in the child, p50".into(),
                    match tree.as_object() {
                        Some(t) => format!("{} ms", t["forkFirstResultMsP50"]),
                        None => "-".into(),
                    },
                    accel.clone(),
                ],
                vec![
                    "bytes on disk per pause node / fork node (max)".into(),
                    match tree.as_object() {
                        Some(t) => format!("{} / {} MiB", t["pauseNodeMiB"], t["forkNodeMiB"]),
                        None => "-".into(),
                    },
                    accel.clone(),
                ],
                vec![
                    "idle sandboxes at once: `echo` p50 / max; host memory per sandbox (PSS / MemAvailable drop)"
                        .into(),
                    match idle.as_object() {
                        Some(i) => format!(
                            "{} sandboxes: {} / {} ms; {} / {} MiB",
                            i["n"],
                            i["echoMsP50"],
                            i["echoMsMax"],
                            i["pssMiBPerSandbox"],
                            i["memAvailableDropMiBPerSandbox"]
                        ),
                        None => "-".into(),
                    },
                    accel.clone(),
                ],
                vec![
                    format!("file write {} MiB", args.file_mib),
                    format!("{} MiB/s", report["writeMiBps"]),
                    accel.clone(),
                ],
                vec![
                    format!("file read {} MiB", args.file_mib),
                    format!("{} MiB/s", report["readMiBps"]),
                    accel.clone(),
                ],
                stolen_row(stolen),
                reporting_row(reporting_kib),
            ]
            .into_iter()
            .chain(crate::bench_snapshots::rows(&report["memoryDiff"], &accel))
            .chain(terminal_rows(&terminal, &accel))
            .chain(crate::bench_gvisor::rows(&gvisor, &accel))
            .collect::<Vec<_>>(),
        );
    }
    Ok(())
}

/// The gVisor comparison (see [`crate::bench_gvisor`]); `Null` when skipped.
async fn gvisor(client: &Client, args: &BenchArgs) -> Result<serde_json::Value> {
    if args.gvisor == 0 {
        return Ok(serde_json::Value::Null);
    }
    let opts = crate::bench_gvisor::Options {
        runs: args.gvisor,
        idle: args.idle,
        platform: &args.gvisor_platform,
        cache_dir: &args.cache_dir,
    };
    crate::bench_gvisor::measure(client, &opts)
        .await
        .context("gVisor comparison")
}

/// The terminal figures in a sandbox of its own (see [`crate::bench_terminal`]).
async fn terminals(client: &Client, args: &BenchArgs) -> Result<serde_json::Value> {
    ensure!(args.terminals > 0, "--terminals must be positive to measure terminals");
    let id = create(client, Start::Pooled).await?;
    let result = crate::bench_terminal::measure(client, &id, args.terminals, args.keystrokes).await;
    kill(client, &id).await?;
    let figures = result.context("terminals")?;
    eprintln!("  terminals: {figures}");
    Ok(figures)
}

fn terminal_rows(terminal: &serde_json::Value, accel: &str) -> Vec<Vec<String>> {
    let cell = |v: &serde_json::Value| match v.as_object() {
        Some(v) => format!("{} / {} ms (n={})", v["p50"], v["p95"], v["n"]),
        None => "-".into(),
    };
    if terminal.is_null() {
        return Vec::new();
    }
    vec![
        vec![
            "terminal WebSocket open to shell prompt, p50 / p95".into(),
            cell(&terminal["openToPromptMs"]),
            accel.to_owned(),
        ],
        vec![
            "keystroke echo through the terminal WebSocket, p50 / p95".into(),
            cell(&terminal["keystrokeEchoMs"]),
            accel.to_owned(),
        ],
    ]
}
