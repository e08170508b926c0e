//! `GET /events` (API key): the event stream as server-sent events. `?kind=vm,sandbox` keeps
//! only those kinds. Each event is a JSON [`viv_api::events::Event`] with the SSE `event:` field
//! set to its kind and `id:` to its sequence number; a client that falls behind gets an event
//! `lagged` saying how many it missed, and the stream goes on.

use std::collections::HashSet;
use std::convert::Infallible;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use futures::Stream;
use tokio::sync::broadcast::error::RecvError;
use viv_api::events::EventKind;

use super::ApiQuery;
use crate::error::ApiError;
use crate::AppState;

/// Routes that take the API key.
pub(super) fn routes() -> Router<AppState> {
    Router::new().route("/events", get(events))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    /// Comma-separated kinds to keep.
    kind: Option<String>,
}

async fn events(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<EventsQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let kinds: Option<HashSet<EventKind>> = q
        .kind
        .map(|list| {
            list.split(',')
                .filter(|k| !k.is_empty())
                .map(|k| k.parse().map_err(ApiError::BadRequest))
                .collect()
        })
        .transpose()?;
    let rx = state.manager.events().subscribe();
    Ok(Sse::new(stream(rx, kinds)).keep_alive(KeepAlive::default()))
}

fn stream(
    rx: tokio::sync::broadcast::Receiver<viv_api::events::Event>,
    kinds: Option<HashSet<EventKind>>,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    futures::stream::unfold((rx, kinds), |(mut rx, kinds)| async move {
        loop {
            match rx.recv().await {
                Ok(event) => {
                    if kinds.as_ref().is_some_and(|k| !k.contains(&event.kind)) {
                        continue;
                    }
                    let sse = SseEvent::default()
                        .event(event.kind.as_str())
                        .id(event.seq.to_string())
                        .json_data(&event)
                        .unwrap_or_else(|_| SseEvent::default().event("error").data("unserializable event"));
                    return Some((Ok(sse), (rx, kinds)));
                }
                Err(RecvError::Lagged(missed)) => {
                    let sse = SseEvent::default()
                        .event("lagged")
                        .data(format!("{{\"missed\":{missed}}}"));
                    return Some((Ok(sse), (rx, kinds)));
                }
                Err(RecvError::Closed) => return None,
            }
        }
    })
}
