//! LiveKit: the agent WebSocket (`GET /v1/livekit`, CONTRACT §4.2) and server webhooks
//! (`POST /webhooks/livekit`, §4.3).
//!
//! # WebSocket
//! Text frames, one JSON object each: `session.start`, `livekit` (any LiveKit object exactly
//! as `model_dump_json()` gives it), `session.end`. Frames of one session are processed one at
//! a time under that session's async mutex, so the seq check, the mapping and the durable
//! write are atomic with respect to a second connection resending the same frames. A frame's
//! events and the session's LiveKit state (last seq, counting mode, snapshot baselines) are
//! written in one durable write; only then is the frame acknowledged. A frame whose seq was
//! already queued is dropped and re-acknowledged, so a client may resend everything unacked
//! after a reconnect. Event ids derive from (session, seq, index), so a frame that is processed
//! twice anyway (its ack was lost together with the daemon's state) yields the same ids.
//!
//! While the spool refuses (full disk or `max_bytes`), the connection stops reading and
//! retries the same frame: back-pressure reaches the agent through TCP, and nothing is acked
//! that is not durable.
//!
//! # Usage accounting
//! `usage_source = "metrics"` sums per-request metrics; `"snapshots"` diffs successive
//! cumulative `session_usage_updated` records per (type, provider, model) and emits positive
//! differences (a decrease is a counter reset: the new value is the difference); `"auto"` uses
//! whichever billable kind the session sends first and ignores the other, so nothing is
//! counted twice. Records with zero usage (connection acquired) produce nothing. Every float
//! may be `null` (pydantic writes NaN/inf as `null`): read as 0.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use bytes::Bytes;
use dashmap::DashMap;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::IngestError;
use crate::config::UsageSource;
use crate::event::{Event, Kind, Source, Timestamp, count, derived_id, new_id, round9};
use crate::pipeline::{AcceptError, Pipeline};
use crate::sessions::Start;
use crate::spool::{SpoolError, StateOp};
use crate::tags;

/// Server-side ping interval: finds dead connections behind NATs and load balancers.
pub const PING_EVERY: Duration = Duration::from_secs(20);
/// How long a refused frame waits before it is retried.
pub const BACKPRESSURE_RETRY: Duration = Duration::from_millis(200);
/// LiveKit state of an ended session is kept this long (to recognise late resends).
pub const ENDED_KEEP: Duration = Duration::from_secs(3600);
/// JWT clock leeway for webhook tokens, as LiveKit's own verifier allows.
pub const JWT_LEEWAY_SECS: i64 = 60;

const STATE_PREFIX: &str = "lk/";

/// Which stream a session counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Counting {
    /// Per-request metrics.
    Metrics,
    /// Cumulative snapshots.
    Snapshots,
}

/// The durable LiveKit state of one session.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LkSession {
    /// Highest seq queued.
    #[serde(default)]
    pub last_seq: u64,
    /// The stream this session counts, once decided.
    #[serde(default)]
    pub counting: Option<Counting>,
    /// Last cumulative record per `type/provider/model`.
    #[serde(default)]
    pub baselines: BTreeMap<String, Map<String, Value>>,
    /// Unix seconds of the session start (for the indicator's minutes).
    #[serde(default)]
    pub started_unix: Option<f64>,
    /// Unix seconds of its end, once ended.
    #[serde(default)]
    pub ended_unix: Option<f64>,
    /// Unix seconds of its last frame.
    #[serde(default)]
    pub touched_unix: Option<f64>,
}

/// The LiveKit source.
pub struct Livekit {
    pipeline: Arc<Pipeline>,
    usage_source: UsageSource,
    forward_telemetry: bool,
    /// `(api_key, api_secret)` for webhooks; replaced by a reload.
    webhook_keys: crate::reload::Live<(Option<String>, Option<String>)>,
    max_message: usize,
    /// Per-session state behind an async mutex: held across the durable write on purpose, so
    /// two connections cannot interleave frames of one session.
    sessions: DashMap<String, Arc<tokio::sync::Mutex<LkSession>>>,
}

/// What to answer a frame.
enum Outcome {
    Ack(String, u64),
    Error {
        session_id: Option<String>,
        seq: Option<u64>,
        message: String,
    },
    Nothing,
}

impl Livekit {
    /// The source, with its config.
    pub fn new(
        pipeline: Arc<Pipeline>,
        cfg: &crate::config::LivekitConfig,
        api_secret: Option<String>,
        max_message: usize,
    ) -> Self {
        Livekit {
            pipeline,
            usage_source: cfg.usage_source,
            forward_telemetry: cfg.forward_telemetry,
            webhook_keys: crate::reload::Live::new((cfg.api_key.clone(), api_secret)),
            max_message,
            sessions: DashMap::new(),
        }
    }

    /// Replaces the webhook key and secret (config reload).
    pub fn reload(&self, api_key: Option<String>, api_secret: Option<String>) {
        self.webhook_keys.set((api_key, api_secret));
    }

    /// Restores LiveKit session state saved before a restart.
    pub fn restore(&self, state: &std::collections::HashMap<String, Vec<u8>>) {
        for (k, v) in state {
            if let Some(sid) = k.strip_prefix(STATE_PREFIX) {
                match serde_json::from_slice::<LkSession>(v) {
                    Ok(s) => {
                        self.sessions
                            .insert(sid.to_string(), Arc::new(tokio::sync::Mutex::new(s)));
                    }
                    Err(e) => {
                        tracing::warn!(session_id = %sid, error = %e, "ignoring unreadable LiveKit session state")
                    }
                }
            }
        }
    }

    /// The WebSocket route (behind the server token) and the webhook route (own auth).
    pub fn routes(self: Arc<Self>) -> (Router, Router) {
        let ws = Router::new()
            .route("/v1/livekit", get(upgrade))
            .with_state(Arc::clone(&self));
        let hook = Router::new()
            .route("/webhooks/livekit", post(webhook))
            .with_state(self);
        (ws, hook)
    }

    fn session(&self, sid: &str) -> Arc<tokio::sync::Mutex<LkSession>> {
        Arc::clone(self.sessions.entry(sid.to_string()).or_default().value())
    }

    /// Forgets old LiveKit session state once a minute; runs until shutdown.
    pub async fn run_sweep(self: Arc<Self>, mut shutdown: tokio::sync::broadcast::Receiver<()>) {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.recv() => return,
            }
            self.sweep(Timestamp::now().unix_f64()).await;
        }
    }

    /// Forgets (durably) the state of sessions ended more than [`ENDED_KEEP`] ago, and of
    /// sessions that never ended (the agent died without `close`) once the registry forgot
    /// them and no frame came for as long. Returns how many were forgotten.
    pub async fn sweep(&self, now: f64) -> usize {
        let keep = ENDED_KEEP.as_secs_f64();
        let old: Vec<String> = self
            .sessions
            .iter()
            .filter_map(|e| {
                // A session busy with a frame is not old.
                let s = e.value().try_lock().ok()?;
                let ended_long_ago = s.ended_unix.is_some_and(|t| now - t > keep);
                let abandoned = !self.pipeline.sessions().contains(e.key())
                    && s.touched_unix.is_none_or(|t| now - t > keep);
                (ended_long_ago || abandoned).then(|| e.key().clone())
            })
            .collect();
        if old.is_empty() {
            return 0;
        }
        let ops = old
            .iter()
            .map(|sid| StateOp::Delete(format!("{STATE_PREFIX}{sid}")))
            .collect();
        if self
            .pipeline
            .accept_with_state(Vec::new(), ops)
            .await
            .is_err()
        {
            return 0;
        }
        for sid in &old {
            self.sessions.remove(sid);
        }
        old.len()
    }

    async fn serve(self: Arc<Self>, mut socket: WebSocket) {
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        loop {
            let msg = tokio::select! {
                m = socket.recv() => m,
                _ = ping.tick() => {
                    if socket.send(Message::Ping(Bytes::new())).await.is_err() {
                        return;
                    }
                    continue;
                }
            };
            let text = match msg {
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(Message::Binary(_))) => {
                    let reply = error_frame(
                        None,
                        None,
                        "binary frames are not supported; send JSON text frames",
                    );
                    if socket.send(Message::Text(reply.into())).await.is_err() {
                        return;
                    }
                    continue;
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => continue,
            };
            // Retry the same frame while the spool refuses it: no new frame is read meanwhile.
            let outcome = loop {
                match self.frame(text.as_str()).await {
                    Err(e) => {
                        self.pipeline
                            .metrics()
                            .inc("voicetagd_livekit_backpressure_total", &[]);
                        tracing::warn!(error = %e, "spool refuses LiveKit frames; pausing this connection");
                        tokio::time::sleep(BACKPRESSURE_RETRY).await;
                    }
                    Ok(o) => break o,
                }
            };
            let reply = match outcome {
                Outcome::Ack(sid, seq) => {
                    json!({"type": "ack", "session_id": sid, "seq": seq}).to_string()
                }
                Outcome::Error {
                    session_id,
                    seq,
                    message,
                } => error_frame(session_id.as_deref(), seq, &message),
                Outcome::Nothing => continue,
            };
            if socket.send(Message::Text(reply.into())).await.is_err() {
                return;
            }
        }
    }

    /// Handles one frame. `Err` means the spool refused it for now (retry the same frame).
    async fn frame(&self, text: &str) -> Result<Outcome, AcceptError> {
        let v: Value = match serde_json::from_str(text) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) => return Ok(bad(None, None, "a frame must be a JSON object")),
            Err(e) => return Ok(bad(None, None, &format!("invalid JSON: {e}"))),
        };
        let seq = match v.get("seq") {
            None | Some(Value::Null) => None,
            Some(s) => match s.as_u64() {
                Some(n) => Some(n),
                None => return Ok(bad(None, None, "seq must be a non-negative integer")),
            },
        };
        let sid = match v.get("session_id").and_then(Value::as_str).map(str::trim) {
            Some(s) if !s.is_empty() => s.to_string(),
            _ => return Ok(bad(None, seq, "session_id is required")),
        };
        let ftype = v
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let lock = self.session(&sid);
        let mut st = lock.lock().await;
        if let Some(n) = seq
            && n <= st.last_seq
        {
            // Already queued: a resend after a reconnect. Drop it, acknowledge again.
            return Ok(Outcome::Ack(sid, st.last_seq));
        }
        let mut next = st.clone();
        next.touched_unix = Some(Timestamp::now().unix_f64());
        if let Some(n) = seq {
            next.last_seq = n;
        }
        let ids = IdGen {
            sid: &sid,
            seq,
            n: 0,
        };
        let result = match ftype.as_str() {
            "session.start" => self.start(&sid, &v, &mut next).await,
            "session.end" => self.end(&sid, None, &mut next, ids).await,
            "livekit" => match v.get("event") {
                Some(ev @ Value::Object(_)) => self.livekit(&sid, ev, &mut next, ids).await,
                _ => return Ok(bad(Some(sid), seq, "a livekit frame needs an event object")),
            },
            other => {
                return Ok(bad(
                    Some(sid),
                    seq,
                    &format!("unknown frame type {other:?}"),
                ));
            }
        };
        match result {
            Ok(()) => {
                *st = next;
                Ok(match seq {
                    Some(n) => Outcome::Ack(sid, n),
                    None => Outcome::Nothing,
                })
            }
            Err(
                e @ (AcceptError::Spool(SpoolError::Full { .. } | SpoolError::Io(_))
                | AcceptError::TooManyParked(_)),
            ) => Err(e),
            Err(e) => Ok(Outcome::Error {
                session_id: Some(sid),
                seq,
                message: e.to_string(),
            }),
        }
    }
}

fn bad(session_id: Option<String>, seq: Option<u64>, message: &str) -> Outcome {
    Outcome::Error {
        session_id,
        seq,
        message: message.to_string(),
    }
}

fn error_frame(session_id: Option<&str>, seq: Option<u64>, message: &str) -> String {
    let mut m = Map::new();
    m.insert("type".into(), json!("error"));
    if let Some(s) = session_id {
        m.insert("session_id".into(), json!(s));
    }
    if let Some(n) = seq {
        m.insert("seq".into(), json!(n));
    }
    m.insert("message".into(), json!(message));
    Value::Object(m).to_string()
}

/// Event ids of one frame: derived from (session, seq, index) when the frame has a seq.
struct IdGen<'a> {
    sid: &'a str,
    seq: Option<u64>,
    n: u32,
}

impl IdGen<'_> {
    fn next(&mut self) -> String {
        self.n += 1;
        match self.seq {
            Some(seq) => derived_id(&format!("livekit/{}/{seq}/{}", self.sid, self.n)),
            None => new_id(),
        }
    }
}

/// A number from a JSON object; missing, `null` or non-numeric is 0.
fn num(v: &Value, key: &str) -> f64 {
    v.get(key)
        .and_then(Value::as_f64)
        .filter(|x| x.is_finite())
        .unwrap_or(0.0)
}

fn text(v: &Value, key: &str) -> Option<String> {
    v.get(key)
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// Provider and model of a metrics object: `metadata` first, else the label as the model.
fn provider_model(m: &Value) -> (Option<String>, Option<String>) {
    let meta = m.get("metadata").unwrap_or(&Value::Null);
    let provider = text(meta, "model_provider");
    let model = text(meta, "model_name").or_else(|| text(m, "label"));
    (provider, model)
}

/// The Paygent STS `usageMetadata` (schemaVersion 1) for realtime token counts; zero parts are
/// left out. `None` when everything is zero.
#[allow(clippy::too_many_arguments)]
fn sts_usage(
    in_text: f64,
    in_audio: f64,
    in_image: f64,
    out_text: f64,
    out_audio: f64,
    cached_split: Option<(f64, f64, f64)>,
    cached_total: f64,
) -> Option<Value> {
    let side = |parts: &[(&str, f64)]| {
        let mut m = Map::new();
        for (k, v) in parts {
            if *v > 0.0 {
                m.insert(k.to_string(), json!({"tokens": count(*v)}));
            }
        }
        (!m.is_empty()).then_some(Value::Object(m))
    };
    let mut out = Map::new();
    out.insert("schemaVersion".into(), json!(1));
    if let Some(i) = side(&[("text", in_text), ("audio", in_audio), ("image", in_image)]) {
        out.insert("input".into(), i);
    }
    if let Some(o) = side(&[("text", out_text), ("audio", out_audio)]) {
        out.insert("output".into(), o);
    }
    let cached = match cached_split {
        Some((t, a, i)) if t + a + i > 0.0 => side(&[("text", t), ("audio", a), ("image", i)]),
        _ if cached_total > 0.0 => Some(json!({"tokens": count(cached_total)})),
        _ => None,
    };
    if let Some(c) = cached {
        out.insert("cached".into(), c);
    }
    (out.len() > 1).then_some(Value::Object(out))
}

/// What one LiveKit object means for usage.
enum Mapped {
    /// A billable per-request metric: its event.
    Metric(Box<Event>),
    /// A billable metric with zero usage (connection acquired): nothing.
    Zero,
    /// Non-billable: telemetry.
    Telemetry,
}

/// Maps a per-request metrics object (`stt_metrics`, ...).
fn map_metric(m: &Value, ids: &mut IdGen<'_>) -> Mapped {
    let mtype = m.get("type").and_then(Value::as_str).unwrap_or_default();
    let (provider, model) = provider_model(m);
    let (kind, usage) = match mtype {
        "stt_metrics" => {
            let secs = num(m, "audio_duration");
            let (i, o) = (num(m, "input_tokens"), num(m, "output_tokens"));
            if secs <= 0.0 && i <= 0.0 && o <= 0.0 {
                return Mapped::Zero;
            }
            let mut u = Map::new();
            u.insert("audio_seconds".into(), json!(round9(secs)));
            if i > 0.0 {
                u.insert("input_tokens".into(), count(i));
            }
            if o > 0.0 {
                u.insert("output_tokens".into(), count(o));
            }
            (Kind::Stt, Value::Object(u))
        }
        "llm_metrics" => {
            let (p, c) = (num(m, "prompt_tokens"), num(m, "completion_tokens"));
            if p <= 0.0 && c <= 0.0 {
                return Mapped::Zero;
            }
            let mut u = Map::new();
            u.insert("prompt_tokens".into(), count(p));
            u.insert("completion_tokens".into(), count(c));
            u.insert(
                "cached_tokens".into(),
                count(num(m, "prompt_cached_tokens")),
            );
            u.insert("reasoning_tokens".into(), count(num(m, "reasoning_tokens")));
            let creation = num(m, "cache_creation_tokens");
            if creation > 0.0 {
                u.insert("cache_creation_tokens".into(), count(creation));
            }
            (Kind::Llm, Value::Object(u))
        }
        "tts_metrics" => {
            let (chars, secs) = (num(m, "characters_count"), num(m, "audio_duration"));
            if chars <= 0.0 && secs <= 0.0 {
                return Mapped::Zero;
            }
            (
                Kind::Tts,
                json!({"characters": count(chars), "audio_seconds": round9(secs)}),
            )
        }
        "realtime_model_metrics" => {
            let empty = Value::Null;
            let i = m.get("input_token_details").unwrap_or(&empty);
            let o = m.get("output_token_details").unwrap_or(&empty);
            let split = i
                .get("cached_tokens_details")
                .filter(|d| d.is_object())
                .map(|d| {
                    (
                        num(d, "text_tokens"),
                        num(d, "audio_tokens"),
                        num(d, "image_tokens"),
                    )
                });
            let (mut it, ia, ii) = (
                num(i, "text_tokens"),
                num(i, "audio_tokens"),
                num(i, "image_tokens"),
            );
            let (mut ot, oa) = (num(o, "text_tokens"), num(o, "audio_tokens"));
            // A provider that reports only totals: count them as text rather than drop them.
            if it + ia + ii <= 0.0 {
                it = num(m, "input_tokens");
            }
            if ot + oa <= 0.0 {
                ot = num(m, "output_tokens");
            }
            match sts_usage(it, ia, ii, ot, oa, split, num(i, "cached_tokens")) {
                Some(u) => (Kind::Sts, u),
                None => return Mapped::Zero,
            }
        }
        _ => return Mapped::Telemetry,
    };
    let mut e = Event::new(kind, Source::Livekit, usage);
    e.id = ids.next();
    e.provider = provider;
    e.model = model;
    if let Some(t) = m
        .get("timestamp")
        .and_then(Value::as_f64)
        .and_then(Timestamp::from_unix_f64)
    {
        e.occurred_at = t;
    }
    Mapped::Metric(Box::new(e))
}

/// The numeric fields of a cumulative record.
fn numbers(r: &Map<String, Value>) -> BTreeMap<String, f64> {
    r.iter()
        .filter_map(|(k, v)| v.as_f64().filter(|x| x.is_finite()).map(|x| (k.clone(), x)))
        .collect()
}

/// The event for one cumulative usage record's increase (`delta`), if billable and non-zero.
fn map_usage_delta(
    rtype: &str,
    provider: Option<String>,
    model: Option<String>,
    d: &BTreeMap<String, f64>,
    ids: &mut IdGen<'_>,
) -> Option<Event> {
    let g = |k: &str| d.get(k).copied().unwrap_or(0.0);
    let (kind, usage) = match rtype {
        "llm_usage" => {
            let split = g("input_audio_tokens")
                + g("input_text_tokens")
                + g("output_audio_tokens")
                + g("output_text_tokens");
            if split > 0.0 {
                let cached = (
                    g("input_cached_text_tokens"),
                    g("input_cached_audio_tokens"),
                    g("input_cached_image_tokens"),
                );
                let u = sts_usage(
                    g("input_text_tokens"),
                    g("input_audio_tokens"),
                    g("input_image_tokens"),
                    g("output_text_tokens"),
                    g("output_audio_tokens"),
                    Some(cached),
                    g("input_cached_tokens"),
                )?;
                (Kind::Sts, u)
            } else {
                if g("input_tokens") <= 0.0 && g("output_tokens") <= 0.0 {
                    return None;
                }
                let mut u = Map::new();
                u.insert("prompt_tokens".into(), count(g("input_tokens")));
                u.insert("completion_tokens".into(), count(g("output_tokens")));
                u.insert("cached_tokens".into(), count(g("input_cached_tokens")));
                u.insert(
                    "reasoning_tokens".into(),
                    count(g("output_reasoning_tokens")),
                );
                if g("input_cache_creation_tokens") > 0.0 {
                    u.insert(
                        "cache_creation_tokens".into(),
                        count(g("input_cache_creation_tokens")),
                    );
                }
                (Kind::Llm, Value::Object(u))
            }
        }
        "stt_usage" => {
            if g("audio_duration") <= 0.0 && g("input_tokens") <= 0.0 && g("output_tokens") <= 0.0 {
                return None;
            }
            let mut u = Map::new();
            u.insert("audio_seconds".into(), json!(round9(g("audio_duration"))));
            for k in ["input_tokens", "output_tokens"] {
                if g(k) > 0.0 {
                    u.insert(k.into(), count(g(k)));
                }
            }
            (Kind::Stt, Value::Object(u))
        }
        "tts_usage" => {
            if g("characters_count") <= 0.0 && g("audio_duration") <= 0.0 {
                return None;
            }
            (
                Kind::Tts,
                json!({"characters": count(g("characters_count")), "audio_seconds": round9(g("audio_duration"))}),
            )
        }
        _ => return None,
    };
    let mut e = Event::new(kind, Source::Livekit, usage);
    e.id = ids.next();
    e.provider = provider;
    e.model = model;
    Some(e)
}

fn is_billable_record(rtype: &str) -> bool {
    matches!(rtype, "llm_usage" | "stt_usage" | "tts_usage")
}

impl Livekit {
    fn may_count(&self, st: &mut LkSession, kind: Counting) -> bool {
        match self.usage_source {
            UsageSource::Metrics => kind == Counting::Metrics,
            UsageSource::Snapshots => kind == Counting::Snapshots,
            UsageSource::Auto => match st.counting {
                Some(c) => c == kind,
                None => {
                    st.counting = Some(kind);
                    true
                }
            },
        }
    }

    fn telemetry(&self, obj: &Value, ids: &mut IdGen<'_>) -> Option<Event> {
        if !self.forward_telemetry {
            return None;
        }
        let mut e = Event::new(Kind::Telemetry, Source::Livekit, obj.clone());
        e.id = ids.next();
        let (provider, model) = provider_model(obj);
        e.provider = provider;
        e.model = model;
        if let Some(t) = obj
            .get("timestamp")
            .and_then(Value::as_f64)
            .and_then(Timestamp::from_unix_f64)
        {
            e.occurred_at = t;
        }
        Some(e)
    }

    fn state_op(sid: &str, st: &LkSession) -> Vec<StateOp> {
        match serde_json::to_vec(st) {
            Ok(v) => vec![StateOp::Put(format!("{STATE_PREFIX}{sid}"), v)],
            Err(_) => Vec::new(),
        }
    }

    async fn start(&self, sid: &str, v: &Value, st: &mut LkSession) -> Result<(), AcceptError> {
        let (tags, skipped) = tags::normalize_value(v.get("meta_tags"));
        self.pipeline
            .report_skipped(&skipped, Some(sid), "session meta_tags");
        let start = Start {
            agent_id: text(v, "agent_id"),
            customer_id: text(v, "customer_id"),
            indicator: text(v, "indicator"),
            tags,
        };
        if st.started_unix.is_none() || st.ended_unix.is_some() {
            st.started_unix = Some(Timestamp::now().unix_f64());
            st.ended_unix = None;
        }
        self.pipeline
            .start_session(sid, start, Source::Livekit)
            .await?;
        tracing::info!(session_id = %sid, "LiveKit session started");
        self.pipeline
            .accept_with_state(Vec::new(), Self::state_op(sid, st))
            .await
    }

    /// Ends the session: an `indicator` event with its minutes when it has an indicator.
    async fn end(
        &self,
        sid: &str,
        at: Option<f64>,
        st: &mut LkSession,
        mut ids: IdGen<'_>,
    ) -> Result<(), AcceptError> {
        let mut events = Vec::new();
        if st.ended_unix.is_none() {
            let end = at.unwrap_or_else(|| Timestamp::now().unix_f64());
            st.ended_unix = Some(end);
            let session = self.pipeline.sessions().get(sid);
            if let Some(ind) = session.as_ref().and_then(|s| s.indicator.clone()) {
                let start = st
                    .started_unix
                    .or_else(|| session.as_ref().map(|s| s.started_at.unix_f64()))
                    .unwrap_or(end);
                let minutes = round9(((end - start) / 60.0).max(0.0));
                let mut e = Event::new(
                    Kind::Indicator,
                    Source::Livekit,
                    json!({"indicators": [ind.clone()], "total_duration_minutes": minutes}),
                );
                e.id = ids.next();
                e.indicator = Some(ind);
                e.session_id = Some(sid.to_string());
                if let Some(t) = Timestamp::from_unix_f64(end) {
                    e.occurred_at = t;
                }
                events.push(e);
            }
        }
        self.pipeline
            .accept_with_state(events, Self::state_op(sid, st))
            .await?;
        self.pipeline.end_session(sid).await?;
        tracing::info!(session_id = %sid, "LiveKit session ended");
        Ok(())
    }

    async fn livekit(
        &self,
        sid: &str,
        ev: &Value,
        st: &mut LkSession,
        mut ids: IdGen<'_>,
    ) -> Result<(), AcceptError> {
        let etype = ev.get("type").and_then(Value::as_str).unwrap_or_default();
        let mut events = Vec::new();
        match etype {
            "close" => {
                let at = ev.get("created_at").and_then(Value::as_f64);
                return self.end(sid, at, st, ids).await;
            }
            "metrics_collected" => {
                let inner = ev.get("metrics").unwrap_or(&Value::Null);
                self.metric(inner, st, &mut ids, &mut events);
            }
            "session_usage_updated" => {
                let created = ev
                    .get("created_at")
                    .and_then(Value::as_f64)
                    .and_then(Timestamp::from_unix_f64);
                let records = ev
                    .pointer("/usage/model_usage")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                let billable = records.iter().any(|r| {
                    r.get("type")
                        .and_then(Value::as_str)
                        .is_some_and(is_billable_record)
                });
                let count_it = billable && self.may_count(st, Counting::Snapshots);
                for r in records {
                    let Value::Object(r) = r else { continue };
                    let rtype = r
                        .get("type")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string();
                    let provider = r
                        .get("provider")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                        .filter(|s| !s.is_empty());
                    let model = r
                        .get("model")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                        .filter(|s| !s.is_empty());
                    let key = format!(
                        "{rtype}/{}/{}",
                        provider.as_deref().unwrap_or(""),
                        model.as_deref().unwrap_or("")
                    );
                    let now = numbers(&r);
                    let before = st.baselines.get(&key).map(numbers).unwrap_or_default();
                    let reset = now
                        .iter()
                        .any(|(k, v)| before.get(k).is_some_and(|b| v < b));
                    let delta: BTreeMap<String, f64> = if reset {
                        now.clone()
                    } else {
                        now.iter()
                            .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
                            .collect()
                    };
                    if reset {
                        tracing::info!(session_id = %sid, record = %key, "cumulative usage went down: counter reset");
                    }
                    st.baselines.insert(key, r);
                    if count_it
                        && let Some(mut e) =
                            map_usage_delta(&rtype, provider, model, &delta, &mut ids)
                    {
                        if let Some(t) = created {
                            e.occurred_at = t;
                        }
                        events.push(e);
                    }
                }
            }
            _ => self.metric(ev, st, &mut ids, &mut events),
        }
        for e in &mut events {
            e.session_id = Some(sid.to_string());
        }
        self.pipeline
            .accept_with_state(events, Self::state_op(sid, st))
            .await
    }

    fn metric(&self, m: &Value, st: &mut LkSession, ids: &mut IdGen<'_>, out: &mut Vec<Event>) {
        match map_metric(m, ids) {
            Mapped::Metric(e) => {
                if self.may_count(st, Counting::Metrics) {
                    out.push(*e);
                }
            }
            Mapped::Zero => {}
            Mapped::Telemetry => {
                let mtype = m.get("type").and_then(Value::as_str).unwrap_or("unknown");
                self.pipeline
                    .metrics()
                    .inc("voicetagd_livekit_telemetry_total", &[("type", mtype)]);
                if let Some(e) = self.telemetry(m, ids) {
                    out.push(e);
                }
            }
        }
    }
}

async fn upgrade(State(lk): State<Arc<Livekit>>, ws: WebSocketUpgrade) -> Response {
    let max = lk.max_message;
    ws.max_message_size(max)
        .on_upgrade(move |socket| lk.serve(socket))
}

/// Why a webhook token is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WebhookError {
    /// No key/secret configured.
    #[error("LiveKit webhooks are not configured ([livekit] api_key and api_secret)")]
    NotConfigured,
    /// Missing or malformed token.
    #[error("malformed Authorization token: {0}")]
    Malformed(&'static str),
    /// Wrong signature (wrong secret or tampered token).
    #[error("token signature does not verify")]
    Signature,
    /// Wrong issuer (api key).
    #[error("token issuer is not the configured api_key")]
    Issuer,
    /// Expired or not yet valid.
    #[error("token expired or not yet valid")]
    Time,
    /// The body does not match the token's sha256 claim.
    #[error("body hash does not match the token's sha256 claim")]
    BodyHash,
}

/// Verifies a LiveKit webhook the way LiveKit's own receivers do: HS256 JWT in
/// `Authorization` (raw, or after `Bearer `), `iss` = api key, `exp`/`nbf` with 60 s leeway,
/// and the `sha256` claim = standard base64 of SHA-256 over the raw body.
pub fn verify_webhook(
    auth: &str,
    body: &[u8],
    api_key: &str,
    secret: &str,
    now_unix: i64,
) -> Result<(), WebhookError> {
    let token = auth.trim();
    let token = token.strip_prefix("Bearer ").unwrap_or(token);
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(WebhookError::Malformed(
            "expected three dot-separated parts",
        ));
    };
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header: Value = b64
        .decode(h)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(WebhookError::Malformed("header is not base64url JSON"))?;
    if header.get("alg").and_then(Value::as_str) != Some("HS256") {
        return Err(WebhookError::Malformed("alg must be HS256"));
    }
    let sig = b64
        .decode(sig)
        .map_err(|_| WebhookError::Malformed("signature is not base64url"))?;
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).map_err(|_| WebhookError::Signature)?;
    mac.update(h.as_bytes());
    mac.update(b".");
    mac.update(p.as_bytes());
    // verify_slice compares in constant time.
    mac.verify_slice(&sig)
        .map_err(|_| WebhookError::Signature)?;
    let claims: Value = b64
        .decode(p)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(WebhookError::Malformed("claims are not base64url JSON"))?;
    if claims.get("iss").and_then(Value::as_str) != Some(api_key) {
        return Err(WebhookError::Issuer);
    }
    let exp = claims
        .get("exp")
        .and_then(Value::as_i64)
        .ok_or(WebhookError::Malformed("exp is required"))?;
    if now_unix > exp + JWT_LEEWAY_SECS {
        return Err(WebhookError::Time);
    }
    if let Some(nbf) = claims.get("nbf").and_then(Value::as_i64)
        && now_unix + JWT_LEEWAY_SECS < nbf
    {
        return Err(WebhookError::Time);
    }
    let claimed = claims
        .get("sha256")
        .and_then(Value::as_str)
        .ok_or(WebhookError::BodyHash)?;
    let claimed = base64::engine::general_purpose::STANDARD
        .decode(claimed)
        .map_err(|_| WebhookError::BodyHash)?;
    let actual = Sha256::digest(body);
    if !crate::server::constant_time_eq(&claimed, actual.as_slice()) {
        return Err(WebhookError::BodyHash);
    }
    Ok(())
}

async fn webhook(
    State(lk): State<Arc<Livekit>>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(r) => return IngestError::from(r).into_response(),
    };
    let keys = lk.webhook_keys.get();
    let (Some(key), Some(secret)) = (keys.0.as_deref(), keys.1.as_deref()) else {
        return IngestError::Unauthorized(WebhookError::NotConfigured.to_string()).into_response();
    };
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    if let Err(e) = verify_webhook(auth, &body, key, secret, now) {
        tracing::warn!(error = %e, "LiveKit webhook refused");
        return IngestError::Unauthorized(format!("LiveKit webhook refused: {e}")).into_response();
    }
    let v: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return IngestError::BadRequest(format!("invalid webhook body: {e}")).into_response();
        }
    };
    let event = v.get("event").and_then(Value::as_str).unwrap_or_default();
    lk.pipeline
        .metrics()
        .inc("voicetagd_livekit_webhooks_total", &[("event", event)]);
    if event == "room_finished" {
        let candidates = [v.pointer("/room/name"), v.pointer("/room/sid")];
        for id in candidates.into_iter().flatten().filter_map(Value::as_str) {
            if lk.pipeline.sessions().contains(id) {
                let lock = lk.session(id);
                let mut st = lock.lock().await;
                let mut next = st.clone();
                let at = v.get("createdAt").and_then(|c| {
                    c.as_str()
                        .and_then(|s| s.parse::<f64>().ok())
                        .or_else(|| c.as_f64())
                });
                // A fixed pseudo-seq: a redelivered webhook derives the same indicator id.
                let ids = IdGen {
                    sid: id,
                    seq: Some(u64::MAX),
                    n: 0,
                };
                match lk.end(id, at, &mut next, ids).await {
                    Ok(()) => *st = next,
                    Err(e) => return IngestError::from(e).into_response(),
                }
                tracing::info!(session_id = %id, "room_finished webhook ended the session");
            }
        }
    }
    (StatusCode::OK, Json(json!({}))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &[u8] = include_bytes!("../../tests/data/livekit/webhook_room_finished.json");
    const AUTH: &str = include_str!("../../tests/data/livekit/webhook_room_finished.auth");
    const SECRET: &str = "secret-with-at-least-32-characters-long";
    const NOW: i64 = 1_796_412_100;

    fn sign(claims: Value, secret: &str) -> String {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let h = b64.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let p = b64.encode(claims.to_string());
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{h}.{p}").as_bytes());
        format!("{h}.{p}.{}", b64.encode(mac.finalize().into_bytes()))
    }

    fn body_hash(body: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(Sha256::digest(body))
    }

    #[test]
    fn sample_webhook_verifies_and_bad_ones_do_not() {
        assert_eq!(verify_webhook(AUTH, BODY, "devkey", SECRET, NOW), Ok(()));
        assert_eq!(
            verify_webhook(&format!("Bearer {AUTH}"), BODY, "devkey", SECRET, NOW),
            Ok(())
        );
        let mut tampered = BODY.to_vec();
        tampered[10] ^= 1;
        assert_eq!(
            verify_webhook(AUTH, &tampered, "devkey", SECRET, NOW),
            Err(WebhookError::BodyHash)
        );
        assert_eq!(
            verify_webhook(
                AUTH,
                BODY,
                "devkey",
                "another-secret-with-at-least-32-chars",
                NOW
            ),
            Err(WebhookError::Signature)
        );
        assert_eq!(
            verify_webhook(AUTH, BODY, "otherkey", SECRET, NOW),
            Err(WebhookError::Issuer)
        );
        assert!(matches!(
            verify_webhook("nonsense", BODY, "devkey", SECRET, NOW),
            Err(WebhookError::Malformed(_))
        ));
        let expired = sign(
            json!({"iss": "devkey", "nbf": NOW - 600, "exp": NOW - 61, "sha256": body_hash(BODY)}),
            SECRET,
        );
        assert_eq!(
            verify_webhook(&expired, BODY, "devkey", SECRET, NOW),
            Err(WebhookError::Time)
        );
        let leeway = sign(
            json!({"iss": "devkey", "nbf": NOW - 600, "exp": NOW - 59, "sha256": body_hash(BODY)}),
            SECRET,
        );
        assert_eq!(verify_webhook(&leeway, BODY, "devkey", SECRET, NOW), Ok(()));
        let future = sign(
            json!({"iss": "devkey", "nbf": NOW + 120, "exp": NOW + 400, "sha256": body_hash(BODY)}),
            SECRET,
        );
        assert_eq!(
            verify_webhook(&future, BODY, "devkey", SECRET, NOW),
            Err(WebhookError::Time)
        );
        let no_hash = sign(json!({"iss": "devkey", "exp": NOW + 400}), SECRET);
        assert_eq!(
            verify_webhook(&no_hash, BODY, "devkey", SECRET, NOW),
            Err(WebhookError::BodyHash)
        );
        let none_alg = {
            let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
            format!(
                "{}.{}.",
                b64.encode(br#"{"alg":"none"}"#),
                b64.encode(b"{}")
            )
        };
        assert!(matches!(
            verify_webhook(&none_alg, BODY, "devkey", SECRET, NOW),
            Err(WebhookError::Malformed(_))
        ));
    }

    #[test]
    fn null_floats_and_zero_usage() {
        let mut ids = IdGen {
            sid: "s",
            seq: Some(1),
            n: 0,
        };
        let m = json!({"type": "llm_metrics", "prompt_tokens": 10, "completion_tokens": 2, "tokens_per_second": null, "ttft": null, "metadata": null, "label": "x.LLM"});
        let Mapped::Metric(e) = map_metric(&m, &mut ids) else {
            panic!("expected an event")
        };
        assert_eq!(
            e.usage,
            json!({"prompt_tokens": 10, "completion_tokens": 2, "cached_tokens": 0, "reasoning_tokens": 0})
        );
        assert_eq!(e.model.as_deref(), Some("x.LLM"));
        assert!(e.provider.is_none());
        let zero = json!({"type": "stt_metrics", "audio_duration": null, "request_id": ""});
        assert!(matches!(map_metric(&zero, &mut ids), Mapped::Zero));
        assert!(matches!(
            map_metric(&json!({"type": "brand_new_metrics"}), &mut ids),
            Mapped::Telemetry
        ));
    }

    #[tokio::test]
    async fn sweep_forgets_ended_and_abandoned_sessions_only() {
        use crate::metrics::Metrics;
        use crate::sessions::Registry;
        let dir = tempfile::tempdir().unwrap();
        let reg = Arc::new(Registry::new(
            Duration::from_secs(60),
            Duration::from_secs(60),
        ));
        let (spool, _) =
            crate::spool::Spool::open(dir.path(), 1 << 20, crate::config::FsyncPolicy::Never)
                .unwrap();
        let p = Arc::new(Pipeline::new(
            Arc::clone(&reg),
            Arc::new(spool),
            Arc::new(Metrics::new()),
            tags::Tags::new(),
            Duration::from_secs(1),
        ));
        let lk = Livekit::new(
            Arc::clone(&p),
            &crate::config::LivekitConfig::default(),
            None,
            1 << 20,
        );
        let now = 1_000_000.0;
        let old = now - ENDED_KEEP.as_secs_f64() - 1.0;
        let put = |sid: &str, s: LkSession| {
            lk.sessions
                .insert(sid.to_string(), Arc::new(tokio::sync::Mutex::new(s)));
        };
        put(
            "ended-long-ago",
            LkSession {
                ended_unix: Some(old),
                touched_unix: Some(old),
                ..Default::default()
            },
        );
        put(
            "ended-recently",
            LkSession {
                ended_unix: Some(now - 5.0),
                touched_unix: Some(now - 5.0),
                ..Default::default()
            },
        );
        put(
            "abandoned",
            LkSession {
                touched_unix: Some(old),
                ..Default::default()
            },
        );
        put(
            "quiet-but-active",
            LkSession {
                touched_unix: Some(old),
                ..Default::default()
            },
        );
        reg.start(
            "quiet-but-active",
            crate::sessions::Start::default(),
            Source::Livekit,
        );
        assert_eq!(lk.sweep(now).await, 2);
        let mut left: Vec<String> = lk.sessions.iter().map(|e| e.key().clone()).collect();
        left.sort();
        assert_eq!(left, vec!["ended-recently", "quiet-but-active"]);
    }
}
