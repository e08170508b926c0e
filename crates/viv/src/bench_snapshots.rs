//! `viv bench`'s memory diff figures: bytes on disk per pause node of an idle sandbox and after
//! writing 50 MiB in the guest, and the time to resume at chain depths 1, 10 and 50 (a chain
//! grows by one diff per pause; the server must allow 50, `--memory-diff-chain`).

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use reqwest::Method;

use crate::client::Client;

/// Chain depths whose resume is timed.
const DEPTHS: [usize; 3] = [1, 10, 50];

/// Pauses sandbox `id` and returns its new node's size once the server has rewritten it as a
/// diff (in the background, after the pause returned). The VM is not parked: the resumes timed
/// here restore the chain.
async fn pause(client: &Client, id: &str) -> Result<u64> {
    client
        .send(
            client
                .request(Method::POST, &format!("/sandboxes/{id}/pause"))
                .json(&super::bench::released_pause()),
        )
        .await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut node_id = None;
    loop {
        let nodes: Vec<viv_api::SnapshotInfo> = client
            .json(client.request(Method::GET, "/snapshots").query(&[("sandboxID", id)]))
            .await?;
        let node = match &node_id {
            None => nodes.iter().rfind(|n| n.kind == "pause"),
            Some(wanted) => nodes.iter().find(|n| &n.snapshot_id == wanted),
        }
        .context("no pause node")?;
        node_id = Some(node.snapshot_id.clone());
        if node.memory == "diff" {
            return Ok(node.size_bytes);
        }
        ensure!(
            Instant::now() < deadline,
            "node {} was not rewritten as a diff within 300 s (is the server's --memory-diff-chain 0?)",
            node.snapshot_id
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn resume(client: &Client, id: &str) -> Result<Duration> {
    let start = Instant::now();
    crate::bench::connect(client, id, 600).await?;
    ensure!(
        exec(client, id, &["true"]).await? == 0,
        "a command failed after the resume"
    );
    Ok(start.elapsed())
}

/// Runs `argv` in sandbox `id` and returns its exit code.
async fn exec(client: &Client, id: &str, argv: &[&str]) -> Result<i32> {
    Ok(crate::bench::run_command(client, id, argv).await?.0)
}

/// Measures the memory diff figures in a sandbox of its own (killed at the end).
pub async fn memory_diff(client: &Client) -> Result<serde_json::Value> {
    let created: viv_api::CreatedSandbox = client
        .json(client.request(Method::POST, "/sandboxes").json(&viv_api::NewSandbox {
            timeout: Some(3600),
            ..Default::default()
        }))
        .await?;
    let id = created.sandbox_id;
    let result = async {
        let idle_bytes = pause(client, &id).await?;
        resume(client, &id).await?;
        let written = exec(client, &id, &["sh", "-c", "head -c 50M /dev/urandom > /dev/shm/bench"]).await?;
        ensure!(written == 0, "writing 50 MiB in the guest failed");
        let written_bytes = pause(client, &id).await?;
        let mut depth = 2;
        let mut resumes = serde_json::Map::new();
        for target in DEPTHS {
            while depth < target {
                resume(client, &id).await?;
                pause(client, &id).await?;
                depth += 1;
            }
            if target == 1 {
                continue;
            }
            let took = resume(client, &id).await?;
            eprintln!(
                "  memory diff: resume at chain depth {target}: {:.0} ms",
                took.as_secs_f64() * 1e3
            );
            resumes.insert(
                target.to_string(),
                serde_json::json!((took.as_secs_f64() * 1e4).round() / 10.0),
            );
            pause(client, &id).await?;
            depth += 1;
        }
        Ok::<_, anyhow::Error>((idle_bytes, written_bytes, resumes))
    }
    .await;
    // A fresh sandbox's first pause is depth 1: timed apart.
    let depth_one = async {
        let created: viv_api::CreatedSandbox = client
            .json(client.request(Method::POST, "/sandboxes").json(&viv_api::NewSandbox {
                timeout: Some(600),
                ..Default::default()
            }))
            .await?;
        pause(client, &created.sandbox_id).await?;
        let took = resume(client, &created.sandbox_id).await;
        let _ = client
            .send(client.request(Method::DELETE, &format!("/sandboxes/{}", created.sandbox_id)))
            .await;
        took
    }
    .await;
    let _ = client
        .send(client.request(Method::DELETE, &format!("/sandboxes/{id}")))
        .await;
    let (idle_bytes, written_bytes, mut resumes) = result?;
    resumes.insert(
        "1".into(),
        serde_json::json!((depth_one?.as_secs_f64() * 1e4).round() / 10.0),
    );
    let mib = |b: u64| (b as f64 / 1048576.0 * 10.0).round() / 10.0;
    eprintln!(
        "  memory diff: node of an idle sandbox {} MiB, after writing 50 MiB {} MiB, resume at depth 1: {} ms",
        mib(idle_bytes),
        mib(written_bytes),
        resumes["1"]
    );
    Ok(serde_json::json!({
        "idleNodeMiB": mib(idle_bytes),
        "nodeAfter50MiBWriteMiB": mib(written_bytes),
        "resumeMsByChainDepth": resumes,
    }))
}

/// The table rows of [`memory_diff`]'s figures (none when it was not measured).
pub fn rows(diff: &serde_json::Value, accel: &str) -> Vec<Vec<String>> {
    if diff.is_null() {
        return Vec::new();
    }
    let by_depth = &diff["resumeMsByChainDepth"];
    vec![
        vec![
            "memory diff node: idle sandbox / after writing 50 MiB in the guest".into(),
            format!("{} / {} MiB", diff["idleNodeMiB"], diff["nodeAfter50MiBWriteMiB"]),
            accel.to_owned(),
        ],
        vec![
            "resume to first result at memory chain depth 1 / 10 / 50".into(),
            format!("{} / {} / {} ms", by_depth["1"], by_depth["10"], by_depth["50"]),
            accel.to_owned(),
        ],
    ]
}
