//! Sandbox metrics over time, as E2B's `GET /sandboxes/{id}/metrics?start=&end=` returns them:
//! the server samples every running sandbox's CPU, memory and disk use every
//! [`INTERVAL`] and keeps a short history per sandbox; a request takes one sample more (so a
//! new sandbox has one) and answers the samples whose time (Unix seconds) lies in
//! `[start, end]`, oldest first.
//!
//! Invariants: memory is bounded: at most [`KEEP`] samples per sandbox, and the histories of
//! sandboxes that are gone are dropped at the next sweep (a paused sandbox keeps its history:
//! its metrics are its samples up to the pause); samples carry the host's clock
//! (the guest's may drift), strictly increasing per sandbox; the sampler only reads (a failed
//! sample is skipped, never reported as the sandbox failing) and stops once the router that
//! owns the history is gone.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;

use super::{agent_body, ApiPath, ApiQuery};
use crate::agent_client::collect;
use crate::error::ApiError;
use crate::manager::LiveSandbox;
use crate::AppState;

/// How often running sandboxes are sampled.
pub(super) const INTERVAL: Duration = Duration::from_secs(5);
/// Samples kept per sandbox (ten minutes at [`INTERVAL`]).
pub(super) const KEEP: usize = 120;

/// One sample: its time (Unix milliseconds, host clock) and the `SandboxMetric` JSON.
type Sample = (u64, serde_json::Value);

/// The recent samples of every running sandbox.
#[derive(Default)]
pub(crate) struct History {
    samples: Mutex<HashMap<String, VecDeque<Sample>>>,
}

impl History {
    /// A history, with its sampler running on the current Tokio runtime (if there is one).
    pub(super) fn start(state: &AppState) -> Arc<Self> {
        let history = Arc::new(Self::default());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(sample_forever(state.clone(), Arc::downgrade(&history)));
        }
        history
    }

    /// Records a sample of `id` taken now (host clock), stamping it with that time.
    fn record(&self, id: &str, mut sample: serde_json::Value) -> Sample {
        let mut all = self.samples.lock().expect("metric history lock");
        let samples = all.entry(id.to_owned()).or_default();
        let now = now_ms().max(samples.back().map_or(0, |(t, _)| t + 1));
        if let Some(fields) = sample.as_object_mut() {
            fields.insert("timestampUnix".into(), (now / 1000).into());
            let time = UNIX_EPOCH + Duration::from_millis(now);
            fields.insert(
                "timestamp".into(),
                humantime::format_rfc3339_millis(time).to_string().into(),
            );
        }
        samples.push_back((now, sample.clone()));
        while samples.len() > KEEP {
            samples.pop_front();
        }
        (now, sample)
    }

    /// The samples of `id` whose time in whole seconds lies in `[start, end]`.
    fn range(&self, id: &str, start: u64, end: u64) -> Vec<serde_json::Value> {
        let all = self.samples.lock().expect("metric history lock");
        all.get(id)
            .map(|samples| {
                samples
                    .iter()
                    .filter(|(t, _)| (start..=end).contains(&(t / 1000)))
                    .map(|(_, s)| s.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Drops the histories of sandboxes not in `existing`.
    fn retain(&self, existing: &[String]) {
        self.samples
            .lock()
            .expect("metric history lock")
            .retain(|id, _| existing.contains(id));
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Samples every running sandbox each [`INTERVAL`] until the history is dropped.
async fn sample_forever(state: AppState, history: Weak<History>) {
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stopping = state.manager.stopping();
    while viv_node::manager::stopping::next_tick(&mut tick, &stopping).await {
        let Some(history) = history.upgrade() else { return };
        let Ok(listed) = state.manager.list(&Default::default()) else {
            continue;
        };
        // Every sandbox that still exists keeps its history (a paused one answers with it);
        // only running ones have an agent to sample.
        history.retain(&listed.iter().map(|s| s.sandbox_id.clone()).collect::<Vec<_>>());
        let running: Vec<String> = listed
            .into_iter()
            .filter(|s| s.state == viv_api::SandboxState::Running)
            .map(|s| s.sandbox_id)
            .collect();
        for id in &running {
            let Ok(live) = state.manager.live(id) else { continue };
            if let Some(sample) = read_quietly(&live).await {
                history.record(id, sample);
            }
        }
    }
}

/// One sample from a sandbox's agent, or nothing if it cannot answer now (paused meanwhile,
/// stopping): the sampler never decides a sandbox's fate.
async fn read_quietly(live: &LiveSandbox) -> Option<serde_json::Value> {
    let request = hyper::Request::get("http://agent/metrics").body(Body::empty()).ok()?;
    let response = tokio::time::timeout(INTERVAL, live.agent.send_ok(request))
        .await
        .ok()?
        .ok()?;
    let body = tokio::time::timeout(INTERVAL, collect(response)).await.ok()?.ok()?;
    serde_json::from_slice(&body).ok()
}

/// Query of `GET /sandboxes/{id}/metrics`: Unix seconds.
#[derive(Deserialize, Default)]
pub(super) struct MetricsQuery {
    start: Option<i64>,
    end: Option<i64>,
}

/// E2B's sandbox metrics: the samples in `[start, end]` (default: all kept, up to now), a
/// sample taken now among them.
pub(super) async fn sandbox_metrics(
    State(state): State<AppState>,
    Extension(history): Extension<Arc<History>>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<MetricsQuery>,
) -> Result<Response, ApiError> {
    // A range that ends before it starts holds no sample.
    let seconds = |name: &str, value: Option<i64>, default: u64| match value {
        None => Ok(default),
        Some(v) => u64::try_from(v)
            .map_err(|_| ApiError::BadRequest(format!("{name} must be Unix seconds (0 or more), got {v}"))),
    };
    let start = seconds("start", query.start, 0)?;
    let end = seconds("end", query.end, u64::MAX)?;
    let live = match state.manager.live(&id) {
        Ok(live) => live,
        // A paused (or still starting) sandbox has no agent to ask for a new sample; what was
        // recorded before is still its history.
        Err(ApiError::Conflict(_)) => return Ok(Json(history.range(&id, start, end)).into_response()),
        Err(err) => return Err(err),
    };
    let request = hyper::Request::get("http://agent/metrics")
        .body(Body::empty())
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let body = agent_body(&state, &live, request).await?;
    let sample: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::Sandbox(format!("unexpected metrics from the sandbox: {e}")))?;
    history.record(&id, sample);
    Ok(Json(history.range(&id, start, end)).into_response())
}

#[cfg(test)]
mod tests {
    use super::{History, KEEP};

    #[test]
    fn history_is_bounded_increasing_and_ranged() {
        let history = History::default();
        let mut stamps = Vec::new();
        for i in 0..KEEP + 10 {
            let (t, sample) = history.record("a", serde_json::json!({ "cpuCount": i }));
            assert_eq!(sample["timestampUnix"], t / 1000);
            stamps.push(t);
        }
        assert!(stamps.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(history.range("a", 0, u64::MAX).len(), KEEP);
        assert_eq!(history.range("a", 0, u64::MAX)[0]["cpuCount"], 10);
        assert!(history.range("a", 0, 1).is_empty());
        assert!(history.range("b", 0, u64::MAX).is_empty());
        history.retain(&["b".to_owned()]);
        assert!(history.range("a", 0, u64::MAX).is_empty());
    }
}
