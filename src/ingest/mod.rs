//! Sources: each turns one wire format into [`Event`](crate::event::Event)s and hands them to
//! the [`Pipeline`]. Nothing after the pipeline knows where an event came from except its
//! `source` field.
//!
//! [`IngestError`] is the one place where a failure becomes an HTTP status and a JSON body
//! `{"error": "..."}`.

pub mod livekit;
pub mod paygent;
pub mod vapi;

use std::sync::Arc;

use axum::Json;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::pipeline::{AcceptError, Pipeline};
use crate::spool::SpoolError;

/// Seconds a client is asked to wait when the queue is full.
pub const RETRY_AFTER_FULL_SECS: u64 = 1;

/// Shared state of the ingest handlers.
#[derive(Clone)]
pub struct Ingest {
    /// Stamping and queueing.
    pub pipeline: Arc<Pipeline>,
}

/// Why an ingest request failed, in the caller's terms.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The body is malformed or misses a required field.
    #[error("{0}")]
    BadRequest(String),
    /// The body is larger than `server.max_body_bytes`.
    #[error("{0}")]
    TooLarge(String),
    /// Missing or wrong credentials.
    #[error("{0}")]
    Unauthorized(String),
    /// The queue is full (or too many events wait for their sessions).
    #[error("{0}")]
    Full(String),
    /// The daemon is shutting down.
    #[error("{0}")]
    Unavailable(String),
    /// A handler the daemon passes requests on to (Vapi `forward_url`) failed or timed out.
    #[error("{0}")]
    BadGateway(String),
    /// A bug; the details are logged.
    #[error("internal error")]
    Internal,
}

impl From<AcceptError> for IngestError {
    fn from(e: AcceptError) -> Self {
        match e {
            AcceptError::Spool(SpoolError::Full { .. } | SpoolError::Io(_))
            | AcceptError::TooManyParked(_) => IngestError::Full(e.to_string()),
            AcceptError::Spool(SpoolError::Closed) => IngestError::Unavailable(e.to_string()),
            AcceptError::Encode(err) => {
                tracing::error!(error = %err, "event could not be encoded");
                IngestError::Internal
            }
        }
    }
}

impl From<axum::extract::rejection::BytesRejection> for IngestError {
    fn from(r: axum::extract::rejection::BytesRejection) -> Self {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            IngestError::TooLarge(format!("request body too large: {}", r.body_text()))
        } else {
            IngestError::BadRequest(format!("cannot read request body: {}", r.body_text()))
        }
    }
}

impl IntoResponse for IngestError {
    fn into_response(self) -> Response {
        let status = match &self {
            IngestError::BadRequest(_) => StatusCode::BAD_REQUEST,
            IngestError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            IngestError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            IngestError::Full(_) | IngestError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            IngestError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            IngestError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let mut resp = (status, Json(json!({ "error": self.to_string() }))).into_response();
        if matches!(self, IngestError::Full(_) | IngestError::Unavailable(_)) {
            resp.headers_mut()
                .insert("retry-after", HeaderValue::from(RETRY_AFTER_FULL_SECS));
        }
        resp
    }
}
