//! Operator endpoints (CONTRACT §7): the tap, the sessions API and usage totals.
//!
//! | route | answer |
//! |---|---|
//! | `GET /v1/tap[?filter=]` | NDJSON stream of accepted events (section-6 Event objects) whose tags match |
//! | `GET /v1/sessions[?filter=]` | `{"sessions":[Session,...]}`, active sessions whose tags match |
//! | `GET /v1/sessions/{id}` | the Session, or 404 |
//! | `DELETE /v1/sessions/{id}` | ends it; the Session as it ended, or 404 |
//! | `GET /v1/usage?filter=&group_by=agent\|customer` | totals since start per agent or customer |
//!
//! Several `filter` parameters are ANDed, like several chips.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;

use crate::filter::Filter;
use crate::ingest::IngestError;
use crate::pipeline::Pipeline;

/// The routes (mounted behind the server token).
pub fn routes(pipeline: Arc<Pipeline>) -> Router {
    Router::new()
        .route("/v1/tap", get(tap))
        .route("/v1/sessions", get(sessions))
        .route("/v1/sessions/{id}", get(session).delete(end_session))
        .route("/v1/usage", get(usage))
        .with_state(pipeline)
}

/// The values of one query parameter, in order.
fn params(query: &Option<String>, name: &str) -> Vec<String> {
    form_urlencoded::parse(query.as_deref().unwrap_or_default().as_bytes())
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
        .collect()
}

fn filter_of(query: &Option<String>) -> Filter {
    let f = params(query, "filter");
    Filter::parse_all(f.iter().map(String::as_str))
}

async fn tap(State(p): State<Arc<Pipeline>>, RawQuery(query): RawQuery) -> Response {
    let filter = filter_of(&query);
    let rx = p.observer().subscribe();
    let metrics = Arc::clone(&p);
    // A lagging reader loses the oldest events (the pipeline never waits for it); it is told
    // with a `{"dropped":N}` line, which no event looks like (events always have an `id`).
    let stream =
        futures_util::stream::unfold((rx, filter, metrics), |(mut rx, filter, p)| async move {
            loop {
                match rx.recv().await {
                    Ok(t) => {
                        if !filter.matches(&t.tags) {
                            continue;
                        }
                        let mut line = Vec::with_capacity(t.json.len() + 1);
                        line.extend_from_slice(&t.json);
                        line.push(b'\n');
                        return Some((
                            Ok::<Bytes, std::io::Error>(Bytes::from(line)),
                            (rx, filter, p),
                        ));
                    }
                    Err(RecvError::Lagged(n)) => {
                        p.metrics().add("voicetagd_tap_dropped_total", &[], n);
                        let line = Bytes::from(format!("{{\"dropped\":{n}}}\n"));
                        return Some((Ok(line), (rx, filter, p)));
                    }
                    Err(RecvError::Closed) => return None,
                }
            }
        });
    (
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

async fn sessions(State(p): State<Arc<Pipeline>>, RawQuery(query): RawQuery) -> Response {
    let filter = filter_of(&query);
    let list: Vec<_> = p
        .sessions()
        .active()
        .into_iter()
        .filter(|s| filter.matches(&s.meta_tags))
        .collect();
    Json(json!({ "sessions": list })).into_response()
}

fn no_session(id: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({ "error": format!("no session {id:?}") })),
    )
        .into_response()
}

async fn session(State(p): State<Arc<Pipeline>>, Path(id): Path<String>) -> Response {
    match p.sessions().get(&id) {
        Some(s) => Json(s).into_response(),
        None => no_session(&id),
    }
}

async fn end_session(State(p): State<Arc<Pipeline>>, Path(id): Path<String>) -> Response {
    match p.end_session(&id).await {
        Ok(Some(_)) => match p.sessions().get(&id) {
            Some(s) => Json(s).into_response(),
            None => no_session(&id),
        },
        Ok(None) => match p.sessions().get(&id) {
            // Already ended: answer with it, as ending is idempotent.
            Some(s) => Json(s).into_response(),
            None => no_session(&id),
        },
        Err(e) => IngestError::from(e).into_response(),
    }
}

async fn usage(State(p): State<Arc<Pipeline>>, RawQuery(query): RawQuery) -> Response {
    let filter = filter_of(&query);
    let by = params(&query, "group_by")
        .pop()
        .unwrap_or_else(|| "agent".to_string());
    let by_customer = match by.as_str() {
        "agent" => false,
        "customer" => true,
        other => {
            return IngestError::BadRequest(format!(
                "group_by must be agent or customer, not {other:?}"
            ))
            .into_response();
        }
    };
    let totals = p.observer().usage(&filter, by_customer);
    let rows: Vec<_> = totals
        .into_iter()
        .map(|(k, t)| {
            let mut v = serde_json::to_value(t).unwrap_or_default();
            if let Some(o) = v.as_object_mut() {
                o.insert(by.clone(), json!(k));
            }
            v
        })
        .collect();
    Json(json!({ "group_by": by, "usage": rows })).into_response()
}
