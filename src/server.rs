//! The one HTTP listener: ingest APIs, health, readiness and metrics.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::ingest::livekit::Livekit;
use crate::ingest::{Ingest, IngestError, paygent, vapi};
use crate::pipeline::Pipeline;
use crate::reload::Live;

/// Lifecycle phase, for `/readyz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Recovering state, not yet listening.
    Starting = 0,
    /// Serving.
    Ready = 1,
    /// Shutting down: draining the queue.
    Draining = 2,
}

/// A readiness latch (as in linkerd2-proxy): flips to ready once every component started and
/// to draining at shutdown; never back.
#[derive(Debug, Default)]
pub struct Readiness(AtomicU8);

impl Readiness {
    /// Sets the phase.
    pub fn set(&self, p: Phase) {
        self.0.store(p as u8, Ordering::SeqCst);
    }

    /// The phase.
    pub fn get(&self) -> Phase {
        match self.0.load(Ordering::SeqCst) {
            1 => Phase::Ready,
            2 => Phase::Draining,
            _ => Phase::Starting,
        }
    }
}

/// Everything the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// Stamping and queueing.
    pub pipeline: Arc<Pipeline>,
    /// Lifecycle phase.
    pub readiness: Arc<Readiness>,
    /// `[server] token`, if set (reloadable).
    pub token: Arc<Live<Option<String>>>,
    /// `[vapi]`: authentication, default ids, forwarding (reloadable).
    pub vapi: Arc<Live<vapi::Settings>>,
}

/// Builds the router.
pub fn router(state: AppState, livekit: Arc<Livekit>, max_body_bytes: usize) -> Router {
    let state_for_count = Arc::clone(&state.pipeline);
    let ingest = Ingest {
        pipeline: Arc::clone(&state.pipeline),
    };
    let (livekit_ws, livekit_webhook) = livekit.routes();
    // The local API and the agent WebSocket need the server token; webhooks carry their own
    // authentication (signatures), checked by their handlers.
    let api = paygent::routes()
        .with_state(ingest)
        .merge(livekit_ws)
        .merge(crate::ops::routes(Arc::clone(&state.pipeline)))
        .layer(middleware::from_fn_with_state(state.clone(), require_token));
    // Vapi cannot send the local token; the route checks Vapi's own authentication instead.
    let webhooks = vapi::routes().with_state(vapi::VapiState::new(
        Arc::clone(&state.pipeline),
        Arc::clone(&state.vapi),
    ));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
        .merge(api)
        .merge(livekit_webhook)
        .merge(webhooks)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            Arc::clone(&state_for_count),
            count_rejections,
        ))
        .layer(DefaultBodyLimit::max(max_body_bytes))
}

/// Counts requests the daemon refused, by reason, for `voicetagd_ingest_rejected_total`.
async fn count_rejections(State(p): State<Arc<Pipeline>>, req: Request, next: Next) -> Response {
    // Probes answer 503 by design while starting or draining; they are not refused ingest.
    if matches!(req.uri().path(), "/readyz" | "/healthz" | "/metrics") {
        return next.run(req).await;
    }
    let resp = next.run(req).await;
    let reason = match resp.status() {
        StatusCode::BAD_REQUEST => Some("bad_request"),
        StatusCode::UNAUTHORIZED => Some("unauthorized"),
        StatusCode::PAYLOAD_TOO_LARGE => Some("too_large"),
        StatusCode::SERVICE_UNAVAILABLE => Some("unavailable"),
        StatusCode::NOT_FOUND => Some("not_found"),
        _ => None,
    };
    if let Some(r) = reason {
        p.metrics()
            .inc("voicetagd_ingest_rejected_total", &[("reason", r)]);
    }
    resp
}

/// Compares in constant time, so the token cannot be guessed byte by byte from timings.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Accepts `Authorization: Bearer <token>` or `paygent-api-key: <token>` when a token is set.
async fn require_token(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let token = state.token.get();
    let Some(token) = token.as_deref() else {
        return next.run(req).await;
    };
    let h = req.headers();
    let bearer = h
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        });
    let key = h.get("paygent-api-key").and_then(|v| v.to_str().ok());
    let ok = [bearer, key]
        .into_iter()
        .flatten()
        .any(|given| constant_time_eq(given.trim().as_bytes(), token.as_bytes()));
    if ok {
        next.run(req).await
    } else {
        IngestError::Unauthorized(
            "missing or wrong token: send Authorization: Bearer <token> or paygent-api-key".into(),
        )
        .into_response()
    }
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn readyz(State(state): State<AppState>) -> Response {
    let phase = state.readiness.get();
    let full = state.pipeline.spool().is_full();
    let (status, why) = match (phase, full) {
        (Phase::Starting, _) => (StatusCode::SERVICE_UNAVAILABLE, "starting"),
        (Phase::Draining, _) => (StatusCode::SERVICE_UNAVAILABLE, "draining"),
        (Phase::Ready, true) => (StatusCode::SERVICE_UNAVAILABLE, "spool full"),
        (Phase::Ready, false) => (StatusCode::OK, "ready"),
    };
    (status, Json(json!({ "status": why }))).into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    let p = &state.pipeline;
    let depth = p.spool().depth();
    let text = p.metrics().render(&[
        (
            "voicetagd_sessions_active",
            "Active sessions.",
            p.sessions().active_count() as f64,
        ),
        (
            "voicetagd_spool_events",
            "Accepted events not yet delivered.",
            depth.events as f64,
        ),
        (
            "voicetagd_spool_bytes",
            "Bytes of accepted events not yet delivered.",
            depth.bytes as f64,
        ),
        (
            "voicetagd_spool_oldest_age_seconds",
            "Age of the oldest undelivered event (to within a second).",
            p.spool().oldest_age().as_secs_f64(),
        ),
        (
            "voicetagd_spool_corrupt_read",
            "Damaged spool records skipped while reading, since start.",
            p.spool().corrupt_read() as f64,
        ),
        (
            "voicetagd_parked_events",
            "Events waiting for their session to start.",
            p.parked_count() as f64,
        ),
        (
            "voicetagd_ready",
            "1 when /readyz answers 200.",
            (state.readiness.get() == Phase::Ready) as u8 as f64,
        ),
    ]);
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        text,
    )
        .into_response()
}

async fn not_found(req: Request) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(
            json!({ "error": format!("no such endpoint: {} {}", req.method(), req.uri().path()) }),
        ),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
