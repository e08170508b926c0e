//! `viv bench --gvisor N`: gVisor (`runsc`, the sandbox people pick when they have no KVM) side
//! by side with Vivarium on the same work, in one run on this host:
//! - a fresh isolated environment from the same Debian root file system the guests boot, running
//!   `python3 -c 'print(6*7)'` to its result: `runsc run` of a one-off container versus a create
//!   from Vivarium's warm pool plus an exec of the same command, alternating the two N times (so
//!   that the machine's load falls on both alike); a second run of the command in the same
//!   sandbox is timed too (what a warm interpreter costs);
//! - K idle environments at once (`sleep` in each) and the host memory each costs (PSS of all
//!   of its host processes), which `viv bench` puts beside its own idle sandboxes' figure.
//!
//! The root file system is the guests' base layer (a qcow2 holding an ext4 file system), exported
//! once to a directory under `$VIV_CACHE_DIR/gvisor/` (qemu-img to a raw image, mounted read-only
//! through a loop device, copied out; a marker file says the copy is complete, so an interrupted
//! export is redone). gVisor's containers see it read-only with a writable overlay in memory.
//! Every container of a run lives under one scratch `--root` state directory, and every one is
//! killed and deleted before the function returns, whatever happened.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

use crate::bench::{create, kill, ms, percentile, pool_ready, run_command, Start};
use crate::client::Client;

/// The command both sides run.
const PYTHON: [&str; 3] = ["python3", "-c", "print(6*7)"];

/// What one gVisor comparison run measures.
pub struct Options<'a> {
    /// Alternating `python3` runs on each side.
    pub runs: usize,
    /// Idle environments to hold at once on each side (0 skips this part).
    pub idle: usize,
    /// gVisor's platform (`systrap`, `ptrace`).
    pub platform: &'a str,
    /// The image cache (where the guests' root file system is, and its export goes).
    pub cache_dir: &'a Path,
}

/// Runs the comparison; `Null` (with a note on stderr) when `runsc` is not installed.
pub async fn measure(client: &Client, opts: &Options<'_>) -> Result<serde_json::Value> {
    if which("runsc").is_none() {
        eprintln!("  gVisor: runsc is not installed (scripts/install-deps installs it); skipping");
        return Ok(serde_json::Value::Null);
    }
    let rootfs = export_rootfs(opts.cache_dir).await?;
    let scratch = tempdir()?;
    let runsc = Runsc {
        state: scratch.join("state"),
        platform: opts.platform.to_owned(),
    };
    let result = async {
        let python = bundle(&scratch.join("python"), &rootfs, &PYTHON).await?;
        let idle_bundle = bundle(&scratch.join("idle"), &rootfs, &["sleep", "3600"]).await?;
        let (gvisor, vivarium, second) = alternate(client, &runsc, &python, opts.runs).await?;
        let idle = if opts.idle > 0 {
            Some(idle_memory(&runsc, &idle_bundle, opts.idle).await?)
        } else {
            None
        };
        Ok::<_, anyhow::Error>((gvisor, vivarium, second, idle))
    }
    .await;
    runsc.remove_all().await;
    let _ = std::fs::remove_dir_all(&scratch);
    let (gvisor, vivarium, second, idle) = result?;
    let stats = |v: &[Duration]| serde_json::json!({ "p50": ms(percentile(v, 0.5)), "min": ms(v[0]), "max": ms(v[v.len() - 1]), "n": v.len() });
    let ratio = percentile(&vivarium, 0.5).as_secs_f64() / percentile(&gvisor, 0.5).as_secs_f64();
    let mut report = serde_json::json!({
        "platform": opts.platform,
        "command": PYTHON.join(" "),
        "gvisorRunMs": stats(&gvisor),
        "vivariumPoolCreateExecMs": stats(&vivarium),
        "vivariumSecondRunMs": stats(&second),
        "ratioVivariumToGvisor": (ratio * 100.0).round() / 100.0,
    });
    if let Some(gvisor_pss) = idle {
        // The caller adds `vivariumPssMiBPerSandbox` from its own idle sandboxes.
        report["idle"] = serde_json::json!({ "n": opts.idle, "gvisorPssMiBPerEnv": gvisor_pss });
    }
    Ok(report)
}

/// Table rows for the report of [`measure`].
pub fn rows(report: &serde_json::Value, accel: &str) -> Vec<Vec<String>> {
    if report.is_null() {
        return Vec::new();
    }
    let cell = |v: &serde_json::Value| format!("{} ms p50 ({}–{}, n={})", v["p50"], v["min"], v["max"], v["n"]);
    let mut rows = vec![
        vec![
            format!(
                "gVisor ({}) `runsc run` of `{}`",
                report["platform"].as_str().unwrap_or("?"),
                PYTHON.join(" ")
            ),
            cell(&report["gvisorRunMs"]),
            "-".into(),
        ],
        vec![
            "Vivarium: create from the pool + exec of the same, alternating".into(),
            format!(
                "{} ({}x gVisor)",
                cell(&report["vivariumPoolCreateExecMs"]),
                report["ratioVivariumToGvisor"]
            ),
            accel.to_owned(),
        ],
        vec![
            "Vivarium: the same command again in that sandbox".into(),
            cell(&report["vivariumSecondRunMs"]),
            accel.to_owned(),
        ],
    ];
    if let Some(idle) = report["idle"].as_object() {
        rows.push(vec![
            format!(
                "{} idle environments: host memory each (PSS), gVisor / Vivarium",
                idle["n"]
            ),
            format!(
                "{} / {} MiB",
                idle["gvisorPssMiBPerEnv"], idle["vivariumPssMiBPerSandbox"]
            ),
            accel.to_owned(),
        ]);
    }
    rows
}

/// `runsc` with this run's state directory and platform.
struct Runsc {
    state: PathBuf,
    platform: String,
}

impl Runsc {
    fn command(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("runsc");
        cmd.arg(format!("--root={}", self.state.display()))
            .arg("--network=none")
            .arg(format!("--platform={}", self.platform));
        cmd.stdin(Stdio::null()).kill_on_drop(true);
        cmd
    }

    /// Runs the container of `bundle` to its end; returns its stdout.
    async fn run(&self, bundle: &Path, id: &str) -> Result<String> {
        let out = self
            .command()
            .arg("run")
            .arg(format!("--bundle={}", bundle.display()))
            .arg(id)
            .output()
            .await
            .context("running runsc")?;
        ensure!(
            out.status.success(),
            "runsc run failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts the container of `bundle` in the background. Its sandbox and gofer inherit
    /// runsc's output, so that goes to a file (a pipe would stay open while they run).
    async fn start_detached(&self, bundle: &Path, id: &str) -> Result<()> {
        let log_path = self.state.with_file_name(format!("{id}.log"));
        let log = std::fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let status = self
            .command()
            .arg("run")
            .arg("--detach")
            .arg(format!("--bundle={}", bundle.display()))
            .arg(id)
            .stdout(Stdio::null())
            .stderr(log)
            .status()
            .await
            .context("running runsc")?;
        ensure!(
            status.success(),
            "runsc run --detach failed ({status}): {}",
            std::fs::read_to_string(&log_path).unwrap_or_default().trim()
        );
        Ok(())
    }

    /// Kills and deletes every container of this state directory (as `runsc list` names them),
    /// then kills whatever process of it is left (by pid, found by its `--root`).
    async fn remove_all(&self) {
        if let Ok(out) = self.command().args(["list", "--quiet"]).output().await {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = self.command().args(["delete", "--force", id]).output().await;
            }
        }
        for pid in runsc_processes(&self.state) {
            // SAFETY: kill takes plain integers; the pid is a runsc process of our own --root.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}

/// Times `runs` alternating pairs: gVisor's `runsc run`, then a pooled create + exec (the pool
/// refilled first, untimed) and a second exec in that sandbox.
async fn alternate(
    client: &Client,
    runsc: &Runsc,
    bundle: &Path,
    runs: usize,
) -> Result<(Vec<Duration>, Vec<Duration>, Vec<Duration>)> {
    let (mut gvisor, mut vivarium, mut second) = (Vec::new(), Vec::new(), Vec::new());
    // A first create builds the template snapshot if needed and starts the pool's filling.
    let first = create(client, Start::Pooled)
        .await
        .context("building the template snapshot")?;
    kill(client, &first).await?;
    for i in 0..runs {
        let start = Instant::now();
        let out = runsc.run(bundle, &format!("py{i}")).await?;
        gvisor.push(start.elapsed());
        ensure!(out == "42\n", "gVisor's python3 printed {out:?}");
        // `runsc run` deletes its container when it ends.

        if !pool_ready(client).await? {
            bail!("the server had no warm VM within 5 minutes (--pool-size 0, or a host too loaded to warm one)");
        }
        let start = Instant::now();
        let id = create(client, Start::Pooled).await?;
        let first = run_command(client, &id, &PYTHON).await;
        vivarium.push(start.elapsed());
        let start = Instant::now();
        let again = run_command(client, &id, &PYTHON).await;
        second.push(start.elapsed());
        kill(client, &id).await?;
        for (code, out) in [first?, again?] {
            ensure!(code == 0 && out == "42\n", "python3 in a sandbox gave {code}: {out:?}");
        }
        eprintln!(
            "  gVisor vs Vivarium {}/{runs}: {:.0} ms / {:.0} ms (again in the sandbox: {:.0} ms)",
            i + 1,
            ms(gvisor[i]),
            ms(vivarium[i]),
            ms(second[i])
        );
    }
    gvisor.sort();
    vivarium.sort();
    second.sort();
    Ok((gvisor, vivarium, second))
}

/// Holds `n` idle gVisor containers; returns the PSS in MiB of each.
async fn idle_memory(runsc: &Runsc, bundle: &Path, n: usize) -> Result<f64> {
    for i in 0..n {
        runsc.start_detached(bundle, &format!("idle{i}")).await?;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let kib = runsc_pss_kib(&runsc.state);
    runsc.remove_all().await;
    let gvisor = (kib as f64 / 1024.0 / n as f64 * 10.0).round() / 10.0;
    eprintln!("  gVisor: {n} idle containers, {gvisor} MiB PSS each");
    Ok(gvisor)
}

/// The PSS in KiB of every host process of the containers under `state` (see
/// [`runsc_processes`]).
fn runsc_pss_kib(state: &Path) -> u64 {
    runsc_processes(state)
        .iter()
        .filter_map(|pid| {
            let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
            rollup
                .lines()
                .find_map(|l| l.strip_prefix("Pss:"))?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// The host processes of the containers under `state`: the sandbox and gofer processes (found
/// by their `--root`) and all their descendants (the platform's stubs).
fn runsc_processes(state: &Path) -> Vec<u32> {
    let root_flag = format!("--root={}", state.display());
    let mut procs: Vec<(u32, u32, String)> = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // The parent pid follows the command name in parentheses and the state letter.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0);
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        procs.push((pid, ppid, String::from_utf8_lossy(&cmdline).replace('\0', " ")));
    }
    let mut ours: Vec<u32> = procs
        .iter()
        .filter(|(_, _, cmd)| {
            (cmd.starts_with("runsc-sandbox") || cmd.starts_with("runsc-gofer"))
                && cmd.split(' ').any(|a| a == root_flag)
        })
        .map(|p| p.0)
        .collect();
    let mut i = 0;
    while i < ours.len() {
        let parent = ours[i];
        for (pid, ppid, _) in &procs {
            if *ppid == parent && !ours.contains(pid) {
                ours.push(*pid);
            }
        }
        i += 1;
    }
    ours
}

/// Writes an OCI bundle at `dir` running `argv` on `rootfs` (read-only), from `runsc spec`'s
/// default with no terminal.
async fn bundle(dir: &Path, rootfs: &Path, argv: &[&str]) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let out = tokio::process::Command::new("runsc")
        .arg("spec")
        .arg(format!("--bundle={}", dir.display()))
        .arg("--")
        .args(argv)
        .output()
        .await
        .context("running runsc spec")?;
    ensure!(
        out.status.success(),
        "runsc spec failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let path = dir.join("config.json");
    let mut spec: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).context("reading the OCI spec")?)
        .context("parsing the OCI spec")?;
    spec["process"]["terminal"] = false.into();
    spec["root"] = serde_json::json!({ "path": rootfs, "readonly": true });
    std::fs::write(&path, serde_json::to_vec_pretty(&spec)?).context("writing the OCI spec")?;
    Ok(dir.to_owned())
}

/// The guests' base root file system as a directory (exported on first use, see the module doc).
async fn export_rootfs(cache_dir: &Path) -> Result<PathBuf> {
    let images = viv_image::ImageStore::open(cache_dir)?;
    let progress = crate::output::TerminalProgress::new();
    let qcow2 = images.debian_rootfs(&viv_image::rootfs::DebianRecipe::default(), &progress)?;
    drop(progress);
    let stem = qcow2
        .file_stem()
        .and_then(|s| s.to_str())
        .context("rootfs name")?
        .to_owned();
    let base = cache_dir.join("gvisor").join(&stem);
    let tree = base.join("rootfs");
    let done = base.join("complete");
    if done.is_file() {
        return Ok(tree);
    }
    eprintln!("  gVisor: exporting {} to {} (once)", qcow2.display(), tree.display());
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&tree).with_context(|| format!("creating {}", tree.display()))?;
    let raw = base.join("rootfs.raw");
    let mount = base.join("mnt");
    std::fs::create_dir_all(&mount)?;
    let result = async {
        sh("qemu-img", &["convert", "-O", "raw", path(&qcow2)?, path(&raw)?]).await?;
        sh("mount", &["-o", "loop,ro", path(&raw)?, path(&mount)?]).await?;
        let copied = sh("cp", &["-a", &format!("{}/.", path(&mount)?), path(&tree)?]).await;
        sh("umount", &[path(&mount)?]).await?;
        copied
    }
    .await;
    let _ = std::fs::remove_file(&raw);
    let _ = std::fs::remove_dir(&mount);
    result.context("exporting the root file system for gVisor (needs root for the loop mount)")?;
    std::fs::write(&done, b"")?;
    Ok(tree)
}

fn path(p: &Path) -> Result<&str> {
    p.to_str().with_context(|| format!("{} is not UTF-8", p.display()))
}

async fn sh(program: &str, args: &[&str]) -> Result<()> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {program}"))?;
    ensure!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

fn tempdir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("viv-bench-gvisor-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}
