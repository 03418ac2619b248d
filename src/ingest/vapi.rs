//! Vapi server messages: `POST /webhooks/vapi` (CONTRACT §4.4; the wire facts are in
//! `shared/reference/vapi-wire.md`, from `vapi-server-sdk` 3.0.0).
//!
//! The request is authenticated on its raw body first ([`auth`]), then dispatched on
//! `message.type` with a catch-all: every type is counted
//! (`voicetagd_vapi_messages_total{type}`) and answered 2xx; only two make anything happen.
//!
//! * `status-update`: `scheduled`, `queued`, `ringing`, `in-progress` and `forwarding` start
//!   the session `call.id`; `ended` ends it.
//! * `end-of-call-report`: starts the session if it is unknown, emits one event per cost item
//!   and one `indicator` event, then ends the session. The events and a durable mark
//!   `vapi/<call id>/end-of-call-report` are written together, so a redelivered report adds
//!   nothing, across restarts too; event ids are derived from the call id, the message type and
//!   the item's index, so they are the same on every delivery.
//!
//! | cost item `type` | event |
//! |---|---|
//! | `transcriber` | `stt`, `usage: {audio_seconds, audio_minutes, language?}` |
//! | `model` | `llm` with prompt/completion/cached/reasoning tokens; `sts` for a realtime or live model |
//! | `voice` | `tts`, `usage: {characters}` |
//! | `analysis`, `knowledge-base`, `voicemail-detection` | `llm` with `usage.purpose` = the type |
//! | `vapi`, `transport` | `external_cost`, `usage: {name, external_cost_id: "vapi", properties}` |
//! | any other type with a cost | `external_cost` named after the type (so no money is dropped) |
//!
//! Items with no usage and no cost (the zero-minute transcriber of a realtime call) make no
//! event, as zero-usage LiveKit records make none.
//!
//! Ids and tags: `paygent_agent_id`, `paygent_customer_id`, `paygent_indicator` and
//! `paygent_meta_tags` are looked up key by key in `call.metadata`,
//! `call.assistantOverrides.metadata`, `assistant.metadata` and `call.assistant.metadata`
//! (the first that has the key wins); then the `paygent-agent-id` / `paygent-customer-id`
//! headers; then `[vapi] default_agent_id` / `default_customer_id` (counted in
//! `voicetagd_vapi_default_ids_total`).
//!
//! With `[vapi] forward_url` every authenticated message is passed on, after its usage is
//! recorded, to the application's own handler, whose answer goes back to Vapi; without it the
//! answer is `200 {}`.

pub mod auth;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use dashmap::DashMap;
use serde_json::{Map, Value, json};

use super::IngestError;
use crate::config::Loaded;
use crate::event::{Event, Kind, Source, Timestamp, count, derived_id, round9};
use crate::pipeline::Pipeline;
use crate::sessions::{Start, State as SessionState};
use crate::tags::{self, SkipReason, Skipped, Tags};

pub use auth::Auth;

/// The path Vapi posts to.
pub const PATH: &str = "/webhooks/vapi";

/// The indicator of a call whose metadata names none (the Paygent SDK's default).
pub const DEFAULT_INDICATOR: &str = "voice-session";

/// Message types of vapi-server-sdk 3.0.0, plus the two that can be subscribed to but have no
/// class there. Other types are counted as `other`, so a sender cannot grow the metric's
/// label set without bound.
const KNOWN_TYPES: &[&str] = &[
    "assistant-request",
    "conversation-update",
    "end-of-call-report",
    "handoff-destination-request",
    "hang",
    "knowledge-base-request",
    "model-output",
    "phone-call-control",
    "speech-update",
    "status-update",
    "tool-calls",
    "transfer-destination-request",
    "transfer-update",
    "transcript",
    "transcript[transcriptType=\"final\"]",
    "user-interrupted",
    "language-change-detected",
    "voice-input",
    "assistant.speechStarted",
    "voice-request",
    "call.endpointing.request",
    "chat.created",
    "chat.deleted",
    "session.created",
    "session.updated",
    "session.deleted",
    "call.deleted",
    "call.delete.failed",
    "call.artifact.upload",
    "campaign.predial",
    "function-call",
    "assistant.started",
];

/// Statuses that mean the call exists and has not ended.
const LIVE_STATUSES: &[&str] = &[
    "scheduled",
    "queued",
    "ringing",
    "in-progress",
    "forwarding",
];

/// What the handler needs besides the pipeline, built once from the config.
#[derive(Debug)]
pub struct Settings {
    /// The configured authentication methods.
    pub auth: Auth,
    /// Agent id when neither metadata nor headers name one.
    pub default_agent_id: String,
    /// Customer id when neither metadata nor headers name one.
    pub default_customer_id: String,
    /// Where messages are passed on, if anywhere.
    pub forward: Option<Forward>,
}

/// The application's own webhook handler.
#[derive(Debug)]
pub struct Forward {
    url: reqwest::Url,
    client: reqwest::Client,
}

impl Settings {
    /// Builds the settings from a loaded config.
    pub fn from_loaded(loaded: &Loaded) -> Result<Settings, String> {
        let cfg = &loaded.config.vapi;
        let forward = match &cfg.forward_url {
            None => None,
            Some(u) => {
                let url = reqwest::Url::parse(u.get_ref())
                    .map_err(|e| format!("vapi.forward_url: {e}"))?;
                // Redirects are passed back to Vapi rather than followed: following a 303
                // would turn the POST into a GET and lose the body.
                let client = reqwest::Client::builder()
                    .timeout(cfg.forward_timeout.get())
                    .redirect(reqwest::redirect::Policy::none())
                    .build()
                    .map_err(|e| format!("vapi.forward_url: cannot build the HTTP client: {e}"))?;
                Some(Forward { url, client })
            }
        };
        Ok(Settings {
            auth: Auth::from_config(cfg, &loaded.secrets)?,
            default_agent_id: cfg.default_agent_id.trim().to_string(),
            default_customer_id: cfg.default_customer_id.trim().to_string(),
            forward,
        })
    }
}

/// Shared state of the Vapi handler.
#[derive(Clone)]
pub struct VapiState {
    /// Stamping and queueing.
    pub pipeline: Arc<Pipeline>,
    /// Authentication, defaults, forwarding; replaced by a reload.
    pub settings: Arc<crate::reload::Live<Settings>>,
    /// Serializes the handling of one call's reports, so that two concurrent deliveries of
    /// the same report cannot both pass the duplicate check.
    locks: Arc<CallLocks>,
}

impl VapiState {
    /// The state for the given pipeline and settings.
    pub fn new(pipeline: Arc<Pipeline>, settings: Arc<crate::reload::Live<Settings>>) -> Self {
        VapiState {
            pipeline,
            settings,
            locks: Arc::new(CallLocks::default()),
        }
    }
}

/// The route. It authenticates by itself (Vapi cannot send the `[server] token`), so it must
/// not be layered behind the local API's token check.
pub fn routes() -> Router<VapiState> {
    Router::new().route(PATH, post(webhook))
}

async fn webhook(
    State(st): State<VapiState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    match handle(&st, &headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn handle(
    st: &VapiState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, IngestError> {
    let body = body?;
    // One settings snapshot per request, so a reload in the middle changes nothing half-way.
    let settings = st.settings.get();
    if let Err(why) = settings.auth.check(headers, &body, SystemTime::now()) {
        tracing::warn!(reason = %why, "vapi webhook refused");
        st.pipeline
            .metrics()
            .inc("voicetagd_vapi_auth_failures_total", &[]);
        return Err(IngestError::Unauthorized(
            "vapi webhook authentication failed".into(),
        ));
    }
    let v: Value = serde_json::from_slice(&body)
        .map_err(|e| IngestError::BadRequest(format!("{PATH}: body is not JSON: {e}")))?;
    let msg = v.get("message").and_then(Value::as_object).ok_or_else(|| {
        IngestError::BadRequest(format!("{PATH}: message is required and must be an object"))
    })?;
    let ty = message_type(msg).ok_or_else(|| {
        IngestError::BadRequest(format!(
            "{PATH}: message.type is required and must be a string"
        ))
    })?;
    let label = if KNOWN_TYPES.contains(&ty) {
        ty
    } else {
        "other"
    };
    st.pipeline
        .metrics()
        .inc("voicetagd_vapi_messages_total", &[("type", label)]);
    match ty {
        "status-update" => status_update(st, msg, headers).await?,
        "end-of-call-report" => report(st, msg, headers).await?,
        _ => tracing::debug!(r#type = ty, "vapi message makes no event"),
    }
    match &settings.forward {
        Some(f) => f.send(headers, body).await,
        None => Ok((StatusCode::OK, Json(json!({}))).into_response()),
    }
}

/// `message.type`. `tool-calls` is the one class whose `type` is optional in the SDK; such a
/// message is recognised by its required `toolCallList`.
fn message_type(msg: &Map<String, Value>) -> Option<&str> {
    match msg.get("type") {
        Some(Value::String(s)) => Some(s.as_str()),
        None if msg.contains_key("toolCallList") => Some("tool-calls"),
        _ => None,
    }
}

fn call_id(msg: &Map<String, Value>) -> Result<String, IngestError> {
    msg.get("call")
        .and_then(|c| c.get("id"))
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .ok_or_else(|| {
            IngestError::BadRequest(format!(
                "{PATH}: message.call.id is required for {}",
                msg.get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("this type")
            ))
        })
}

async fn status_update(
    st: &VapiState,
    msg: &Map<String, Value>,
    headers: &HeaderMap,
) -> Result<(), IngestError> {
    let id = call_id(msg)?;
    let status = msg.get("status").and_then(Value::as_str).unwrap_or("");
    if status == "ended" {
        st.pipeline.end_session(&id).await?;
        tracing::info!(session_id = %id, "vapi call ended");
        return Ok(());
    }
    if !LIVE_STATUSES.contains(&status) {
        return Ok(());
    }
    let known = st.pipeline.sessions().get(&id);
    // A call id is never reused, so a late `in-progress` must not revive an ended call.
    if known
        .as_ref()
        .is_some_and(|s| s.state == SessionState::Ended)
    {
        tracing::debug!(session_id = %id, status, "status-update for an ended vapi call ignored");
        return Ok(());
    }
    let ids = CallIds::resolve(msg, headers);
    // Re-starting an active session with nothing new would replace its tags by defaults.
    if known.is_none() || ids.from_message {
        start(st, &id, &ids).await?;
        tracing::info!(session_id = %id, status, "vapi call started");
    }
    Ok(())
}

async fn report(
    st: &VapiState,
    msg: &Map<String, Value>,
    headers: &HeaderMap,
) -> Result<(), IngestError> {
    let id = call_id(msg)?;
    let mark = format!("vapi/{id}/end-of-call-report");
    let _guard = st.locks.lock(&mark).await;
    if st.pipeline.is_marked(&mark) {
        tracing::info!(session_id = %id, "repeated end-of-call-report ignored");
        st.pipeline
            .metrics()
            .inc("voicetagd_vapi_duplicate_reports_total", &[]);
        return Ok(());
    }
    let ids = CallIds::resolve(msg, headers);
    // A report without a prior status-update starts the session, so its events get the tags.
    if !st.pipeline.sessions().contains(&id) || ids.from_message {
        start(st, &id, &ids).await?;
    }
    let events = report_events(msg, &id, &ids);
    let n = events.len();
    st.pipeline.accept_marked(events, &mark).await?;
    // The usage is safely recorded; failing the request now would only make Vapi redeliver a
    // report that is then ignored as a duplicate. The session ends by idle_ttl instead.
    if let Err(e) = st.pipeline.end_session(&id).await {
        tracing::warn!(session_id = %id, error = %e, "cannot record the end of the vapi call");
    }
    tracing::info!(session_id = %id, events = n, "vapi end-of-call-report recorded");
    Ok(())
}

async fn start(st: &VapiState, id: &str, ids: &CallIds) -> Result<(), IngestError> {
    st.pipeline
        .report_skipped(&ids.skipped, Some(id), "vapi paygent_meta_tags");
    let metrics = st.pipeline.metrics();
    let agent = ids.agent_id.clone().unwrap_or_else(|| {
        metrics.inc("voicetagd_vapi_default_ids_total", &[("field", "agent_id")]);
        st.settings.get().default_agent_id.clone()
    });
    let customer = ids.customer_id.clone().unwrap_or_else(|| {
        metrics.inc(
            "voicetagd_vapi_default_ids_total",
            &[("field", "customer_id")],
        );
        st.settings.get().default_customer_id.clone()
    });
    let s = Start {
        agent_id: Some(agent),
        customer_id: Some(customer),
        indicator: Some(ids.indicator.clone()),
        tags: ids.tags.clone(),
    };
    st.pipeline.start_session(id, s, Source::Vapi).await?;
    Ok(())
}

/// What a message says about its call's ids and tags.
#[derive(Debug, Default)]
struct CallIds {
    agent_id: Option<String>,
    customer_id: Option<String>,
    indicator: String,
    tags: Tags,
    skipped: Vec<Skipped>,
    /// The message or its headers named ids, an indicator or tags.
    from_message: bool,
    /// `paygent_{stt,llm,tts,sts}_{provider,model,plan}`, kept by their key.
    overrides: Map<String, Value>,
}

impl CallIds {
    fn resolve(msg: &Map<String, Value>, headers: &HeaderMap) -> CallIds {
        let sources = metadata_sources(msg);
        let get = |key: &str| sources.iter().find_map(|m| m.get(key));
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        let agent_id = get("paygent_agent_id")
            .and_then(text)
            .or_else(|| header("paygent-agent-id"));
        let customer_id = get("paygent_customer_id")
            .and_then(text)
            .or_else(|| header("paygent-customer-id"));
        let indicator = get("paygent_indicator").and_then(text);
        let raw_tags = get("paygent_meta_tags");
        let (tags, skipped) = meta_tags(raw_tags);
        let mut overrides = Map::new();
        for kind in ["stt", "llm", "tts", "sts"] {
            for field in ["provider", "model", "plan"] {
                let key = format!("paygent_{kind}_{field}");
                if let Some(v) = get(&key).and_then(text) {
                    overrides.insert(key, Value::String(v));
                }
            }
        }
        CallIds {
            from_message: agent_id.is_some()
                || customer_id.is_some()
                || indicator.is_some()
                || raw_tags.is_some(),
            agent_id,
            customer_id,
            indicator: indicator.unwrap_or_else(|| DEFAULT_INDICATOR.to_string()),
            tags,
            skipped,
            overrides,
        }
    }

    fn override_of(&self, kind: &str, field: &str) -> Option<String> {
        self.overrides
            .get(&format!("paygent_{kind}_{field}"))
            .and_then(Value::as_str)
            .map(str::to_string)
    }
}

/// The metadata objects a message may carry, in lookup order. `call.metadata` is not in
/// Vapi's schema but is what `POST /call` with a top-level `metadata` echoes back (the Paygent
/// SDK sets it); `call.assistantOverrides.metadata` is the documented place.
fn metadata_sources(msg: &Map<String, Value>) -> Vec<&Map<String, Value>> {
    let call = msg.get("call");
    let paths: [Option<&Value>; 4] = [
        call.and_then(|c| c.get("metadata")),
        call.and_then(|c| c.get("assistantOverrides"))
            .and_then(|o| o.get("metadata")),
        msg.get("assistant").and_then(|a| a.get("metadata")),
        call.and_then(|c| c.get("assistant"))
            .and_then(|a| a.get("metadata")),
    ];
    paths
        .into_iter()
        .flatten()
        .filter_map(Value::as_object)
        .collect()
}

/// A non-empty string (numbers given as ids are taken as their JSON text).
fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.trim().to_string()).filter(|s| !s.is_empty()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// `paygent_meta_tags`: an object, or a JSON-encoded object (the Paygent SDK sends
/// `json.dumps(...)`, with spaces after the separators).
fn meta_tags(raw: Option<&Value>) -> (Tags, Vec<Skipped>) {
    let not_an_object = || {
        (
            Tags::new(),
            vec![Skipped {
                key: "paygent_meta_tags".into(),
                reason: SkipReason::NotAnObject,
            }],
        )
    };
    match raw {
        None | Some(Value::Null) => (Tags::new(), Vec::new()),
        Some(Value::Object(m)) => tags::normalize_map(m),
        Some(Value::String(s)) if s.trim().is_empty() => (Tags::new(), Vec::new()),
        Some(Value::String(s)) => match serde_json::from_str::<Value>(s) {
            Ok(Value::Object(m)) => tags::normalize_map(&m),
            Ok(Value::Null) => (Tags::new(), Vec::new()),
            _ => not_an_object(),
        },
        Some(_) => not_an_object(),
    }
}

fn num(o: &Map<String, Value>, key: &str) -> f64 {
    o.get(key)
        .and_then(Value::as_f64)
        .filter(|x| x.is_finite())
        .unwrap_or(0.0)
}

fn opt_num(o: &Map<String, Value>, key: &str) -> Option<f64> {
    o.get(key).and_then(Value::as_f64).filter(|x| x.is_finite())
}

fn field_str(o: Option<&Value>, key: &str) -> Option<String> {
    o.and_then(|v| v.get(key)).and_then(text)
}

/// When the call's usage happened: its end, else the message's `timestamp` (epoch ms, or s).
fn occurred_at(msg: &Map<String, Value>) -> Timestamp {
    let call = msg.get("call");
    [msg.get("endedAt"), call.and_then(|c| c.get("endedAt"))]
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .find_map(Timestamp::parse)
        .or_else(|| {
            msg.get("timestamp")
                .and_then(Value::as_f64)
                .and_then(from_epoch)
        })
        .unwrap_or_else(Timestamp::now)
}

/// Epoch milliseconds (above 1e11) or seconds.
fn from_epoch(t: f64) -> Option<Timestamp> {
    Timestamp::from_unix_f64(if t > 1.0e11 { t / 1e3 } else { t })
}

/// The call's length in minutes: `endedAt - startedAt` of the message, else of the call, else
/// the legacy top-level `durationMinutes`, `durationSeconds`, `durationMs`; else 0.
fn call_minutes(msg: &Map<String, Value>) -> f64 {
    let call = msg.get("call").and_then(Value::as_object);
    let span = |o: &Map<String, Value>| -> Option<f64> {
        let s = Timestamp::parse(o.get("startedAt")?.as_str()?)?;
        let e = Timestamp::parse(o.get("endedAt")?.as_str()?)?;
        e.0.duration_since(s.0)
            .ok()
            .map(|d: Duration| d.as_secs_f64() / 60.0)
    };
    let legacy = [
        ("durationMinutes", 1.0),
        ("durationSeconds", 60.0),
        ("durationMs", 60_000.0),
    ];
    span(msg)
        .or_else(|| call.and_then(span))
        .or_else(|| {
            legacy
                .iter()
                .find_map(|(k, div)| opt_num(msg, k).filter(|x| *x >= 0.0).map(|x| x / div))
        })
        .map(round9)
        .unwrap_or(0.0)
}

/// The events of one report: one per cost item with usage or cost, then the indicator.
fn report_events(msg: &Map<String, Value>, call_id: &str, ids: &CallIds) -> Vec<Event> {
    const TYPE: &str = "end-of-call-report";
    let at = occurred_at(msg);
    // `message.costs` is the declared field; `call.costs` has the same items.
    let costs = msg
        .get("costs")
        .and_then(Value::as_array)
        .or_else(|| {
            msg.get("call")
                .and_then(|c| c.get("costs"))
                .and_then(Value::as_array)
        })
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut out = Vec::with_capacity(costs.len() + 1);
    for (i, item) in costs.iter().enumerate() {
        let Some(o) = item.as_object() else {
            tracing::warn!(session_id = %call_id, index = i, "vapi cost item is not an object; skipped");
            continue;
        };
        let Some(mut e) = item_event(o, ids) else {
            continue;
        };
        e.id = derived_id(&format!("{call_id}/{TYPE}/{i}"));
        e.session_id = Some(call_id.to_string());
        e.occurred_at = at;
        out.push(e);
    }
    let usage = json!({
        "indicators": [ids.indicator.clone()],
        "total_duration_minutes": call_minutes(msg),
    });
    let mut e = Event::new(Kind::Indicator, Source::Vapi, usage);
    e.id = derived_id(&format!("{call_id}/{TYPE}/indicator"));
    e.session_id = Some(call_id.to_string());
    e.indicator = Some(ids.indicator.clone());
    e.occurred_at = at;
    out.push(e);
    out
}

/// Realtime and live models are billed as speech-to-speech.
fn is_realtime(o: &Map<String, Value>, model: Option<&str>) -> bool {
    o.get("seconds").is_some_and(|v| !v.is_null())
        || model.is_some_and(|m| {
            let m = m.to_ascii_lowercase();
            m.contains("realtime") || m.contains("live")
        })
}

/// One cost item's event (id, session and time are set by the caller); `None` for an item
/// with neither usage nor cost, or without a type.
fn item_event(o: &Map<String, Value>, ids: &CallIds) -> Option<Event> {
    let ty = o.get("type").and_then(Value::as_str)?;
    let cost = opt_num(o, "cost");
    let has_cost = cost.is_some_and(|c| c != 0.0);
    let model_obj = o.get("model");
    let llm_usage = |purpose: Option<&str>| {
        let mut u = Map::new();
        u.insert("prompt_tokens".into(), count(num(o, "promptTokens")));
        u.insert(
            "completion_tokens".into(),
            count(num(o, "completionTokens")),
        );
        u.insert("cached_tokens".into(), count(num(o, "cachedPromptTokens")));
        u.insert("reasoning_tokens".into(), count(num(o, "reasoningTokens")));
        if let Some(p) = purpose {
            u.insert("purpose".into(), json!(p));
        }
        u
    };
    let (kind, provider, model, quantity, usage) = match ty {
        "transcriber" => {
            let t = o.get("transcriber");
            let minutes = num(o, "minutes");
            let mut u = Map::new();
            u.insert("audio_seconds".into(), json!(round9(minutes * 60.0)));
            u.insert("audio_minutes".into(), json!(minutes));
            if let Some(l) = field_str(t, "language") {
                u.insert("language".into(), json!(l));
            }
            (
                Kind::Stt,
                field_str(t, "provider"),
                field_str(t, "model"),
                minutes,
                Value::Object(u),
            )
        }
        "model" => {
            let model = field_str(model_obj, "model");
            let provider = field_str(model_obj, "provider");
            let prompt = num(o, "promptTokens");
            let completion = num(o, "completionTokens");
            let seconds = num(o, "seconds");
            let quantity = prompt + completion + seconds;
            if is_realtime(o, model.as_deref()) {
                (
                    Kind::Sts,
                    provider,
                    model,
                    quantity,
                    sts_usage(prompt, completion, num(o, "cachedPromptTokens"), seconds),
                )
            } else {
                let mut u = llm_usage(None);
                if let Some(c) = o.get("usageComplete").and_then(Value::as_bool) {
                    u.insert("usage_complete".into(), json!(c));
                }
                (Kind::Llm, provider, model, quantity, Value::Object(u))
            }
        }
        "voice" => {
            let v = o.get("voice");
            let chars = num(o, "characters");
            (
                Kind::Tts,
                field_str(v, "provider"),
                field_str(v, "model"),
                chars,
                json!({ "characters": count(chars) }),
            )
        }
        "analysis" | "knowledge-base" => {
            let mut u = llm_usage(Some(ty));
            if let Some(a) = o.get("analysisType").and_then(text) {
                u.insert("analysis_type".into(), json!(a));
            }
            (
                Kind::Llm,
                field_str(model_obj, "provider"),
                field_str(model_obj, "model"),
                num(o, "promptTokens") + num(o, "completionTokens"),
                Value::Object(u),
            )
        }
        "voicemail-detection" => {
            let (pt, pa) = (num(o, "promptTextTokens"), num(o, "promptAudioTokens"));
            let (ct, ca) = (
                num(o, "completionTextTokens"),
                num(o, "completionAudioTokens"),
            );
            let mut u = Map::new();
            u.insert("prompt_tokens".into(), count(pt + pa));
            u.insert("completion_tokens".into(), count(ct + ca));
            u.insert("cached_tokens".into(), count(0.0));
            u.insert("reasoning_tokens".into(), count(0.0));
            u.insert("purpose".into(), json!(ty));
            u.insert("prompt_text_tokens".into(), count(pt));
            u.insert("prompt_audio_tokens".into(), count(pa));
            u.insert("completion_text_tokens".into(), count(ct));
            u.insert("completion_audio_tokens".into(), count(ca));
            let detector = o.get("provider").and_then(text);
            if let Some(d) = &detector {
                u.insert("detection_provider".into(), json!(d));
            }
            (
                Kind::Llm,
                field_str(model_obj, "provider").or(detector),
                field_str(model_obj, "model"),
                pt + pa + ct + ca,
                Value::Object(u),
            )
        }
        other => {
            // `vapi`, `transport`, and types newer than SDK 3.0.0: a cost with its facts.
            let props: Map<String, Value> = o
                .iter()
                .filter(|(k, _)| k.as_str() != "type" && k.as_str() != "cost")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            if !matches!(other, "vapi" | "transport") {
                tracing::warn!(
                    r#type = other,
                    "unknown vapi cost item type; sent as external_cost"
                );
            }
            let quantity = num(o, "minutes");
            let usage = json!({ "name": other, "external_cost_id": "vapi", "properties": props });
            (Kind::ExternalCost, None, None, quantity, usage)
        }
    };
    if quantity == 0.0 && !has_cost {
        return None;
    }
    let mut e = Event::new(kind, Source::Vapi, usage);
    // The Paygent SDK's per-kind overrides fill what the item leaves out; the item wins.
    let main = matches!(ty, "transcriber" | "model" | "voice");
    let k = kind.as_str();
    e.provider = provider.or_else(|| main.then(|| ids.override_of(k, "provider")).flatten());
    e.model = model.or_else(|| main.then(|| ids.override_of(k, "model")).flatten());
    e.plan = main.then(|| ids.override_of(k, "plan")).flatten();
    e.cost_usd = cost;
    Some(e)
}

/// The Paygent `usageMetadata` shape (schemaVersion 1) as far as a Vapi model item fills it:
/// Vapi splits tokens by direction but not by modality, so they are reported as text; the
/// provider-reported `seconds` become `connection.minutes`. Zero parts are left out.
fn sts_usage(prompt: f64, completion: f64, cached: f64, seconds: f64) -> Value {
    let mut u = Map::new();
    u.insert("schemaVersion".into(), json!(1));
    if prompt > 0.0 {
        u.insert(
            "input".into(),
            json!({ "text": { "tokens": count(prompt) } }),
        );
    }
    if completion > 0.0 {
        u.insert(
            "output".into(),
            json!({ "text": { "tokens": count(completion) } }),
        );
    }
    if cached > 0.0 {
        u.insert("cached".into(), json!({ "tokens": count(cached) }));
    }
    if seconds > 0.0 {
        u.insert(
            "connection".into(),
            json!({ "minutes": round9(seconds / 60.0) }),
        );
    }
    Value::Object(u)
}

/// Headers that belong to one connection (RFC 9110 §7.6.1) or that the client recomputes.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
            // Dropped so the handler answers uncompressed and the answer passes on as is.
            | "accept-encoding"
    )
}

impl Forward {
    /// Passes the message on with its headers (so the handler can check Vapi's
    /// authentication itself) and returns the handler's status, content type and body.
    async fn send(&self, headers: &HeaderMap, body: Bytes) -> Result<Response, IngestError> {
        let mut fwd = HeaderMap::new();
        for (k, v) in headers {
            if !hop_by_hop(k) {
                fwd.append(k.clone(), v.clone());
            }
        }
        let resp = self
            .client
            .post(self.url.clone())
            .headers(fwd)
            .body(body)
            .send()
            .await
            .map_err(|e| self.failed(&e))?;
        let status = resp.status();
        let ct: Option<HeaderValue> = resp.headers().get(header::CONTENT_TYPE).cloned();
        let bytes = resp.bytes().await.map_err(|e| self.failed(&e))?;
        let mut out = (status, bytes).into_response();
        match ct {
            Some(ct) => {
                out.headers_mut().insert(header::CONTENT_TYPE, ct);
            }
            None => {
                out.headers_mut().remove(header::CONTENT_TYPE);
            }
        }
        Ok(out)
    }

    fn failed(&self, e: &reqwest::Error) -> IngestError {
        let what = if e.is_timeout() {
            "timed out"
        } else {
            "failed"
        };
        tracing::warn!(url = %self.url, error = %e, "vapi forward_url {what}");
        IngestError::BadGateway(format!("forwarding to the application's handler {what}"))
    }
}

/// One async lock per key, removed when nobody holds or waits for it.
#[derive(Default)]
struct CallLocks(DashMap<String, Arc<tokio::sync::Mutex<()>>>);

struct CallGuard<'a> {
    locks: &'a CallLocks,
    key: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl CallLocks {
    async fn lock(&self, key: &str) -> CallGuard<'_> {
        let m = Arc::clone(self.0.entry(key.to_string()).or_default().value());
        let guard = m.lock_owned().await;
        CallGuard {
            locks: self,
            key: key.to_string(),
            guard: Some(guard),
        }
    }
}

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        // Two references left (the map's and this guard's) means no one else waits; the check
        // and the removal happen under the map's shard lock, so no one can join in between.
        self.locks
            .0
            .remove_if(&self.key, |_, m| Arc::strong_count(m) == 2);
        self.guard.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap()
    }

    #[test]
    fn meta_tags_as_compact_or_spaced_json_or_object() {
        for raw in [
            json!("{\"env\":\"staging\",\"n\":1}"),
            json!("{\"env\": \"staging\", \"n\": 1}"),
            json!({"env": "staging", "n": 1}),
        ] {
            let (t, skipped) = meta_tags(Some(&raw));
            assert_eq!(t.get("env").map(String::as_str), Some("staging"));
            assert_eq!(t.get("n").map(String::as_str), Some("1"));
            assert!(skipped.is_empty());
        }
        let (t, skipped) = meta_tags(Some(&json!("not json")));
        assert!(t.is_empty());
        assert_eq!(skipped[0].reason, SkipReason::NotAnObject);
        let (t, skipped) = meta_tags(Some(&json!({"bad key": "x", "ok": "y"})));
        assert_eq!(t.len(), 1);
        assert_eq!(skipped[0].reason, SkipReason::KeyCharset);
    }

    #[test]
    fn ids_are_looked_up_key_by_key_in_order() {
        let m = msg(json!({
            "assistant": {"metadata": {"paygent_agent_id": "from-assistant", "paygent_indicator": "ivr"}},
            "call": {"id": "c1",
                     "metadata": {"unrelated": 1, "paygent_customer_id": "from-call"},
                     "assistantOverrides": {"metadata": {"paygent_agent_id": "from-overrides"}}}
        }));
        let ids = CallIds::resolve(&m, &HeaderMap::new());
        assert_eq!(ids.agent_id.as_deref(), Some("from-overrides"));
        assert_eq!(ids.customer_id.as_deref(), Some("from-call"));
        assert_eq!(ids.indicator, "ivr");
        assert!(ids.from_message);

        let mut h = HeaderMap::new();
        h.insert("paygent-agent-id", HeaderValue::from_static("hdr-agent"));
        let ids = CallIds::resolve(&msg(json!({"call": {"id": "c1"}})), &h);
        assert_eq!(ids.agent_id.as_deref(), Some("hdr-agent"));
        assert_eq!(ids.customer_id, None);
        assert_eq!(ids.indicator, DEFAULT_INDICATOR);
    }

    #[test]
    fn duration_falls_back_to_call_then_legacy_fields() {
        let at = |s: &str, e: &str| json!({"startedAt": s, "endedAt": e});
        let m = msg(at("2026-03-12T17:04:53.497Z", "2026-03-12T17:06:28.909Z"));
        assert_eq!(call_minutes(&m), 1.5902);
        let m = msg(json!({"call": at("2026-03-12T17:00:00Z", "2026-03-12T17:01:30Z")}));
        assert_eq!(call_minutes(&m), 1.5);
        assert_eq!(
            call_minutes(&msg(json!({"durationSeconds": 95.412}))),
            1.5902
        );
        assert_eq!(call_minutes(&msg(json!({"durationMs": 90000}))), 1.5);
        assert_eq!(call_minutes(&msg(json!({"durationMinutes": 2.25}))), 2.25);
        // An end before the start is no duration; the next source is used.
        let m = msg(
            json!({"startedAt": "2026-03-12T17:10:00Z", "endedAt": "2026-03-12T17:00:00Z",
                           "durationSeconds": 30}),
        );
        assert_eq!(call_minutes(&m), 0.5);
        assert_eq!(call_minutes(&msg(json!({}))), 0.0);
    }

    #[test]
    fn occurred_at_from_end_or_millisecond_timestamp() {
        let m = msg(json!({"endedAt": "2026-03-12T17:06:28.909Z", "timestamp": 1}));
        assert_eq!(occurred_at(&m).to_string(), "2026-03-12T17:06:28.909000Z");
        let m = msg(json!({"timestamp": 1773335188909u64}));
        assert_eq!(occurred_at(&m).to_string(), "2026-03-12T17:06:28.909000Z");
    }

    #[test]
    fn realtime_models_become_sts() {
        let ids = CallIds {
            indicator: DEFAULT_INDICATOR.into(),
            ..CallIds::default()
        };
        let item = |v: Value| item_event(&msg(v), &ids).unwrap();
        let e = item(
            json!({"type": "model", "model": {"provider": "openai", "model": "gpt-live"},
                            "promptTokens": 100, "completionTokens": 20, "cachedPromptTokens": 10,
                            "seconds": 90, "cost": 0.5}),
        );
        assert_eq!(e.kind, Kind::Sts);
        assert_eq!(
            e.usage,
            json!({"schemaVersion": 1, "input": {"text": {"tokens": 100}},
                   "output": {"text": {"tokens": 20}}, "cached": {"tokens": 10},
                   "connection": {"minutes": 1.5}})
        );
        let e = item(
            json!({"type": "model", "model": {"provider": "google", "model": "gemini-2.0-flash-LIVE-001"},
                            "promptTokens": 5, "completionTokens": 0, "cost": 0.01}),
        );
        assert_eq!(e.kind, Kind::Sts);
        let e = item(
            json!({"type": "model", "model": {"provider": "openai", "model": "gpt-4o"},
                            "promptTokens": 5, "completionTokens": 1, "reasoningTokens": 1,
                            "usageComplete": false, "cost": 0.01}),
        );
        assert_eq!(e.kind, Kind::Llm);
        assert_eq!(
            e.usage,
            json!({"prompt_tokens": 5, "completion_tokens": 1, "cached_tokens": 0,
                   "reasoning_tokens": 1, "usage_complete": false})
        );
    }

    #[test]
    fn zero_items_are_skipped_but_costed_ones_kept() {
        let ids = CallIds::default();
        let item = |v: Value| item_event(&msg(v), &ids);
        assert!(
            item(json!({"type": "transcriber", "transcriber": {"provider": "openai"}, "minutes": 0, "cost": 0}))
                .is_none()
        );
        let e =
            item(json!({"type": "transport", "provider": "twilio", "minutes": 0, "cost": 0.01}))
                .unwrap();
        assert_eq!(e.kind, Kind::ExternalCost);
        assert_eq!(e.cost_usd, Some(0.01));
        assert!(item(json!({"minutes": 3, "cost": 1})).is_none());
    }

    #[test]
    fn voicemail_detection_keeps_the_modality_split() {
        let ids = CallIds::default();
        let e = item_event(
            &msg(json!({"type": "voicemail-detection", "provider": "openai",
                        "model": {"provider": "openai", "model": "gpt-4o-audio-preview"},
                        "promptTextTokens": 30, "promptAudioTokens": 200,
                        "completionTextTokens": 2, "completionAudioTokens": 0, "cost": 0.002})),
            &ids,
        )
        .unwrap();
        assert_eq!(e.kind, Kind::Llm);
        assert_eq!(e.provider.as_deref(), Some("openai"));
        assert_eq!(
            e.usage,
            json!({"prompt_tokens": 230, "completion_tokens": 2, "cached_tokens": 0,
                   "reasoning_tokens": 0, "purpose": "voicemail-detection",
                   "prompt_text_tokens": 30, "prompt_audio_tokens": 200,
                   "completion_text_tokens": 2, "completion_audio_tokens": 0,
                   "detection_provider": "openai"})
        );
    }

    #[test]
    fn tool_calls_without_type_are_recognised() {
        assert_eq!(
            message_type(&msg(json!({"toolCallList": []}))),
            Some("tool-calls")
        );
        assert_eq!(message_type(&msg(json!({"type": 5}))), None);
        assert_eq!(message_type(&msg(json!({}))), None);
    }

    #[tokio::test]
    async fn call_locks_are_removed_when_released() {
        let locks = CallLocks::default();
        {
            let _a = locks.lock("k").await;
            assert_eq!(locks.0.len(), 1);
        }
        assert_eq!(locks.0.len(), 0);
    }
}
