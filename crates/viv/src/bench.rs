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
}

/// Timings of one pause / resume / fork cycle.
struct Cycle {
    pause: Duration,
    resume: Duration,
    resume_first: Duration,
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

/// Runs a command and returns its stdout.
async fn output(client: &Client, id: &str, argv: &[&str]) -> Result<String> {
    Ok(run_command(client, id, argv).await?.1)
}

/// Creates a sandbox, pauses it, resumes it (reading the guest clock right away), forks it.
async fn cycle(client: &Client) -> Result<Cycle> {
    let id = create(client, false).await?;
    let result = async {
        ensure!(
            exec(client, &id, &["sh", "-c", "echo data > /tmp/state"]).await? == 0,
            "setup failed"
        );
        let start = Instant::now();
        client
            .send(client.request(Method::POST, &format!("/sandboxes/{id}/pause")))
            .await?;
        let pause = start.elapsed();
        let start = Instant::now();
        let body = viv_api::ConnectSandbox { timeout: Some(300) };
        client
            .send(
                client
                    .request(Method::POST, &format!("/sandboxes/{id}/connect"))
                    .json(&body),
            )
            .await?;
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

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 100.0
}

async fn create(client: &Client, cold_boot: bool) -> Result<String> {
    let req = NewSandbox {
        timeout: Some(600),
        cold_boot: cold_boot.then_some(true),
        ..Default::default()
    };
    let created: CreatedSandbox = client
        .json(client.request(Method::POST, "/sandboxes").json(&req))
        .await?;
    Ok(created.sandbox_id)
}

async fn kill(client: &Client, id: &str) -> Result<()> {
    client
        .send(client.request(Method::DELETE, &format!("/sandboxes/{id}")))
        .await
        .map(|_| ())
}

/// Runs `argv` and returns its exit code.
async fn exec(client: &Client, id: &str, argv: &[&str]) -> Result<i32> {
    Ok(run_command(client, id, argv).await?.0)
}

/// Runs a command through the exec route; returns its exit code and stdout.
async fn run_command(client: &Client, id: &str, argv: &[&str]) -> Result<(i32, String)> {
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

    let mut boots = Vec::new();
    for i in 0..args.boots {
        let start = Instant::now();
        let id = create(client, true).await.context("creating a sandbox")?;
        boots.push(start.elapsed());
        eprintln!("  cold boot {}/{}: {:.0} ms", i + 1, args.boots, ms(boots[i]));
        kill(client, &id).await?;
    }
    boots.sort();

    // Creates the server's default way (a snapshot restore when it runs with --snapshots),
    // measured in the same run as the cold boots. The first builds the template snapshot.
    let snapshots = health["snapshots"].as_bool().unwrap_or(false);
    let mut creates = Vec::new();
    if snapshots {
        kill(
            client,
            &create(client, false).await.context("building the template snapshot")?,
        )
        .await?;
        for i in 0..args.boots * 4 {
            let start = Instant::now();
            let id = create(client, false).await.context("creating a sandbox")?;
            let took = start.elapsed();
            let first = exec(client, &id, &["true"]).await;
            creates.push((took, start.elapsed()));
            kill(client, &id).await?;
            ensure!(first? == 0, "`true` failed in a restored sandbox");
            eprintln!(
                "  restore {}/{}: {:.0} ms to created, {:.0} ms to first result",
                i + 1,
                args.boots * 4,
                ms(took),
                ms(creates[i].1)
            );
        }
    }
    let restore = if creates.is_empty() {
        serde_json::Value::Null
    } else {
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

    let mut cycles = Vec::new();
    if snapshots {
        for i in 0..args.cycles {
            let c = cycle(client).await.context("pause / resume / fork cycle")?;
            eprintln!(
                "  cycle {}/{}: pause {:.0} ms, resume {:.0} ms (first result {:.0} ms, clock error {:+.1} ms), fork to first result {:.0} ms",
                i + 1,
                args.cycles,
                ms(c.pause),
                ms(c.resume),
                ms(c.resume_first),
                c.clock_error_ms,
                ms(c.fork_first)
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
            "forkFirstResultMsP50": p50(&|c| c.fork_first),
            "clockErrorMsMaxAbs": (max_clock * 10.0).round() / 10.0,
            "pauseNodeMiB": mib(cycles.iter().map(|c| c.pause_node_bytes).max().unwrap_or(0)),
            "forkNodeMiB": mib(cycles.iter().map(|c| c.fork_node_bytes).max().unwrap_or(0)),
        })
    };

    let id = create(client, false).await?;
    let memory_mb = client
        .json::<viv_api::SandboxInfo>(client.request(Method::GET, &format!("/sandboxes/{id}")))
        .await
        .map(|i| i.memory_mb)
        .unwrap_or_default();
    let result = async {
        let mut trips = Vec::new();
        for _ in 0..args.round_trips {
            let start = Instant::now();
            ensure!(exec(client, &id, &["true"]).await? == 0, "`true` failed");
            trips.push(start.elapsed());
        }
        trips.sort();

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
        Ok((trips, write, read))
    }
    .await;
    kill(client, &id).await?;
    let (trips, write, read) = result?;
    let mib = args.file_mib as f64;
    let report = serde_json::json!({
        "accel": accel,
        "coldBootMs": { "p50": ms(percentile(&boots, 0.5)), "min": ms(boots[0]), "max": ms(boots[boots.len() - 1]), "n": boots.len() },
        "roundTripTrueMs": { "p50": ms(percentile(&trips, 0.5)), "p95": ms(percentile(&trips, 0.95)), "n": trips.len() },
        "restore": restore,
        "snapshotTree": tree,
        "guestMemoryMiB": memory_mb,
        "fileMiB": args.file_mib,
        "writeMiBps": (mib / write.as_secs_f64() * 10.0).round() / 10.0,
        "readMiBps": (mib / read.as_secs_f64() * 10.0).round() / 10.0,
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
                    "create from snapshot to first `true` result, p50 / p95".into(),
                    match report["restore"]["firstResultMs"].as_object() {
                        Some(r) => format!(
                            "{} / {} ms ({}x cold boot)",
                            r["p50"], r["p95"], report["restore"]["ratioToColdBoot"]
                        ),
                        None => "server runs without --snapshots".into(),
                    },
                    accel.clone(),
                ],
                vec![
                    format!("pause / resume (to created) p50, {memory_mb} MiB guest"),
                    match tree.as_object() {
                        Some(t) => format!("{} / {} ms", t["pauseMsP50"], t["resumeMsP50"]),
                        None => "server runs without snapshots".into(),
                    },
                    accel.clone(),
                ],
                vec![
                    "resume to first result p50; guest clock error after resume, max".into(),
                    match tree.as_object() {
                        Some(t) => format!("{} ms; {} ms", t["resumeFirstResultMsP50"], t["clockErrorMsMaxAbs"]),
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
                    format!("file write {} MiB", args.file_mib),
                    format!("{} MiB/s", report["writeMiBps"]),
                    accel.clone(),
                ],
                vec![
                    format!("file read {} MiB", args.file_mib),
                    format!("{} MiB/s", report["readMiBps"]),
                    accel,
                ],
            ],
        );
    }
    Ok(())
}
