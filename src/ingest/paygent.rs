//! The Paygent-compatible HTTP API (CONTRACT §4.1): a drop-in `base_url` for the official
//! Python SDK (`paygent-sdk` 4.9.7). Bodies are camelCase JSON as the SDK sends them; unknown
//! fields are ignored (the SDK adds fields between releases).
//!
//! | path | event |
//! |---|---|
//! | `/api/v1/voice/session` | starts the session (no event) |
//! | `/api/v1/voice/stt` | `stt`, `audioMinutes` x 60 -> `usage.audio_seconds` |
//! | `/api/v1/voice/llm` | `llm` with prompt/completion/cached/reasoning tokens |
//! | `/api/v1/voice/tts` | `tts` with `characters` |
//! | `/api/v1/voice/speech-to-speech` | `sts`, `usageMetadata` kept in its shape |
//! | `/api/v1/voice/indicator` | `indicator`, and sets the session's indicator |
//! | `/api/v1/voice/additional-indicators` | `indicator` with several indicators |
//! | `/api/v2/usage` | `usage`, `rawUsage` kept |
//! | `/api/v2/revenue` | `indicator` (a revenue-only indicator, no duration) |
//! | `/api/v1/external-billing` | `external_cost` |
//! | `/api/v1/customers/create-or-get` | answered locally; `customer` event |
//!
//! Every body may carry `metaTags`: the event's own tags, above the session's.

use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use super::{Ingest, IngestError};
use crate::event::{Event, Kind, Source, count, round9};
use crate::sessions::Start;
use crate::tags;

/// The routes of this API.
pub fn routes() -> Router<Ingest> {
    Router::new()
        .route("/api/v1/voice/session", post(session))
        .route("/api/v1/voice/stt", post(stt))
        .route("/api/v1/voice/llm", post(llm))
        .route("/api/v1/voice/tts", post(tts))
        .route("/api/v1/voice/speech-to-speech", post(sts))
        .route("/api/v1/voice/indicator", post(indicator))
        .route(
            "/api/v1/voice/additional-indicators",
            post(additional_indicators),
        )
        .route("/api/v2/usage", post(usage_v2))
        .route("/api/v2/revenue", post(revenue))
        .route("/api/v1/external-billing", post(external_billing))
        .route("/api/v1/customers/create-or-get", post(customer))
}

type Reply = Result<Json<Value>, IngestError>;

fn parse<T: DeserializeOwned>(
    path: &str,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, IngestError> {
    let body = body?;
    serde_json::from_slice(&body)
        .map_err(|e| IngestError::BadRequest(format!("invalid body for {path}: {e}")))
}

fn required(path: &str, field: &str, v: Option<String>) -> Result<String, IngestError> {
    match v.map(|s| s.trim().to_string()) {
        Some(s) if !s.is_empty() => Ok(s),
        _ => Err(IngestError::BadRequest(format!(
            "{path}: {field} is required"
        ))),
    }
}

/// Empty strings (the SDK sends `""` for unset provider/model/plan) mean "not given".
fn opt(v: Option<String>) -> Option<String> {
    v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

fn amount(path: &str, field: &str, v: Option<f64>) -> Result<f64, IngestError> {
    match v {
        Some(x) if x.is_finite() && x >= 0.0 => Ok(x),
        Some(_) => Err(IngestError::BadRequest(format!(
            "{path}: {field} must be a non-negative number"
        ))),
        None => Err(IngestError::BadRequest(format!(
            "{path}: {field} is required and must be a number"
        ))),
    }
}

fn opt_amount(path: &str, field: &str, v: Option<f64>) -> Result<f64, IngestError> {
    match v {
        None => Ok(0.0),
        some => amount(path, field, some),
    }
}

/// The event's own tags, with skipped ones logged and counted.
fn own_tags(ing: &Ingest, raw: Option<&Value>, session: Option<&str>) -> tags::Tags {
    let (t, skipped) = tags::normalize_value(raw);
    ing.pipeline
        .report_skipped(&skipped, session, "event metaTags");
    t
}

async fn accept_one(ing: &Ingest, e: Event) -> Reply {
    let id = e.id.clone();
    ing.pipeline.accept(vec![e]).await?;
    Ok(Json(json!({ "ok": true, "id": id })))
}

/// Provider, model and plan as the SDK sends them.
struct Model {
    provider: Option<String>,
    model: Option<String>,
    plan: Option<String>,
}

fn voice_event(
    ing: &Ingest,
    kind: Kind,
    session_id: String,
    m: Model,
    usage: Value,
    meta: Option<&Value>,
) -> Event {
    let mut e = Event::new(kind, Source::Api, usage);
    e.meta_tags = own_tags(ing, meta, Some(&session_id));
    e.session_id = Some(session_id);
    e.provider = opt(m.provider);
    e.model = opt(m.model);
    e.plan = opt(m.plan);
    e
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SessionBody {
    session_id: Option<String>,
    agent_id: Option<String>,
    customer_id: Option<String>,
    indicator: Option<String>,
    meta_tags: Option<Value>,
}

async fn session(State(ing): State<Ingest>, body: Result<Bytes, BytesRejection>) -> Reply {
    const P: &str = "/api/v1/voice/session";
    let b: SessionBody = parse(P, body)?;
    let sid = required(P, "sessionId", b.session_id)?;
    let (tags, skipped) = tags::normalize_value(b.meta_tags.as_ref());
    ing.pipeline
        .report_skipped(&skipped, Some(&sid), "session metaTags");
    let start = Start {
        agent_id: opt(b.agent_id),
        customer_id: opt(b.customer_id),
        indicator: opt(b.indicator),
        tags,
    };
    ing.pipeline.start_session(&sid, start, Source::Api).await?;
    tracing::info!(session_id = %sid, "voice session started");
    Ok(Json(json!({ "ok": true, "sessionId": sid })))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SttBody {
    session_id: Option<String>,
    audio_minutes: Option<f64>,
    provider: Option<String>,
    model: Option<String>,
    plan: Option<String>,
    language: Option<String>,
    meta_tags: Option<Value>,
}

async fn stt(State(ing): State<Ingest>, body: Result<Bytes, BytesRejection>) -> Reply {
    const P: &str = "/api/v1/voice/stt";
    let b: SttBody = parse(P, body)?;
    let sid = required(P, "sessionId", b.session_id)?;
    let minutes = amount(P, "audioMinutes", b.audio_minutes)?;
    let mut usage = Map::new();
    usage.insert("audio_seconds".into(), json!(round9(minutes * 60.0)));
    usage.insert("audio_minutes".into(), json!(minutes));
    if let Some(l) = opt(b.language) {
        usage.insert("language".into(), json!(l));
    }
    let e = voice_event(
        &ing,
        Kind::Stt,
        sid,
        Model {
            provider: b.provider,
            model: b.model,
            plan: b.plan,
        },
        Value::Object(usage),
        b.meta_tags.as_ref(),
    );
    accept_one(&ing, e).await
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LlmBody {
    session_id: Option<String>,
    provider: Option<String>,
    model: Option<String>,
    plan: Option<String>,
    prompt_tokens: Option<f64>,
    completion_tokens: Option<f64>,
    cached_tokens: Option<f64>,
    reasoning_tokens: Option<f64>,
    meta_tags: Option<Value>,
}

async fn llm(State(ing): State<Ingest>, body: Result<Bytes, BytesRejection>) -> Reply {
    const P: &str = "/api/v1/voice/llm";
    let b: LlmBody = parse(P, body)?;
    let sid = required(P, "sessionId", b.session_id)?;
    let usage = json!({
        "prompt_tokens": count(amount(P, "promptTokens", b.prompt_tokens)?),
        "completion_tokens": count(amount(P, "completionTokens", b.completion_tokens)?),
        "cached_tokens": count(opt_amount(P, "cachedTokens", b.cached_tokens)?),
        "reasoning_tokens": count(opt_amount(P, "reasoningTokens", b.reasoning_tokens)?),
    });
    let e = voice_event(
        &ing,
        Kind::Llm,
        sid,
        Model {
            provider: b.provider,
            model: b.model,
            plan: b.plan,
        },
        usage,
        b.meta_tags.as_ref(),
    );
    accept_one(&ing, e).await
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TtsBody {
    session_id: Option<String>,
    provider: Option<String>,
    model: Option<String>,
    plan: Option<String>,
    characters: Option<f64>,
    meta_tags: Option<Value>,
}

async fn tts(State(ing): State<Ingest>, body: Result<Bytes, BytesRejection>) -> Reply {
    const P: &str = "/api/v1/voice/tts";
    let b: TtsBody = parse(P, body)?;
    let sid = required(P, "sessionId", b.session_id)?;
    let usage = json!({ "characters": count(amount(P, "characters", b.characters)?) });
    let e = voice_event(
        &ing,
        Kind::Tts,
        sid,
        Model {
            provider: b.provider,
            model: b.model,
            plan: b.plan,
        },
        usage,
        b.meta_tags.as_ref(),
    );
    accept_one(&ing, e).await
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct StsBody {
    session_id: Option<String>,
    provider: Option<String>,
    model: Option<String>,
    plan: Option<String>,
    usage_metadata: Option<Value>,
    meta_tags: Option<Value>,
}

async fn sts(State(ing): State<Ingest>, body: Result<Bytes, BytesRejection>) -> Reply {
    const P: &str = "/api/v1/voice/speech-to-speech";
    let b: StsBody = parse(P, body)?;
    let sid = required(P, "sessionId", b.session_id)?;
    let usage = match b.usage_metadata {
        Some(Value::Object(m)) => Value::Object(m),
        _ => {
            return Err(IngestError::BadRequest(format!(
                "{P}: usageMetadata is required and must be an object"
            )));
        }
    };
    let e = voice_event(
        &ing,
        Kind::Sts,
        sid,
        Model {
            provider: b.provider,
            model: b.model,
            plan: b.plan,
        },
        usage,
        b.meta_tags.as_ref(),
    );
    accept_one(&ing, e).await
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct IndicatorBody {
    session_id: Option<String>,
    indicator: Option<String>,
    indicators: Option<Vec<Value>>,
    total_duration: Option<f64>,
    meta_tags: Option<Value>,
}

async fn indicator(State(ing): State<Ingest>, body: Result<Bytes, BytesRejection>) -> Reply {
    const P: &str = "/api/v1/voice/indicator";
    let b: IndicatorBody = parse(P, body)?;
    let sid = required(P, "sessionId", b.session_id)?;
    let ind = required(P, "indicator", b.indicator)?;
    let minutes = amount(P, "totalDuration", b.total_duration)?;
    ing.pipeline.set_indicator(&sid, &ind).await?;
    let usage = json!({ "indicators": [ind.clone()], "total_duration_minutes": minutes });
    let mut e = voice_event(
        &ing,
        Kind::Indicator,
        sid,
        Model {
            provider: None,
            model: None,
            plan: None,
        },
        usage,
        b.meta_tags.as_ref(),
    );
    e.indicator = Some(ind);
    accept_one(&ing, e).await
}

async fn additional_indicators(
    State(ing): State<Ingest>,
    body: Result<Bytes, BytesRejection>,
) -> Reply {
    const P: &str = "/api/v1/voice/additional-indicators";
    let b: IndicatorBody = parse(P, body)?;
    let sid = required(P, "sessionId", b.session_id)?;
    let list: Vec<String> = match b.indicators {
        Some(v) => v
            .into_iter()
            .map(|x| match x {
                Value::String(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
                _ => Err(IngestError::BadRequest(format!(
                    "{P}: indicators must be non-empty strings"
                ))),
            })
            .collect::<Result<_, _>>()?,
        None => {
            return Err(IngestError::BadRequest(format!(
                "{P}: indicators is required"
            )));
        }
    };
    if list.is_empty() {
        return Err(IngestError::BadRequest(format!(
            "{P}: indicators must not be empty"
        )));
    }
    let minutes = amount(P, "totalDuration", b.total_duration)?;
    let usage = json!({ "indicators": list, "total_duration_minutes": minutes });
    let e = voice_event(
        &ing,
        Kind::Indicator,
        sid,
        Model {
            provider: None,
            model: None,
            plan: None,
        },
        usage,
        b.meta_tags.as_ref(),
    );
    accept_one(&ing, e).await
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UsageBody {
    agent_id: Option<String>,
    customer_id: Option<String>,
    indicator: Option<String>,
    raw_usage: Option<Value>,
    meta_tags: Option<Value>,
}

async fn usage_v2(State(ing): State<Ingest>, body: Result<Bytes, BytesRejection>) -> Reply {
    const P: &str = "/api/v2/usage";
    let b: UsageBody = parse(P, body)?;
    let agent = required(P, "agentId", b.agent_id)?;
    let customer = required(P, "customerId", b.customer_id)?;
    let raw = match b.raw_usage {
        Some(Value::Object(m)) => m,
        _ => {
            return Err(IngestError::BadRequest(format!(
                "{P}: rawUsage is required and must be an object"
            )));
        }
    };
    let s = |k: &str| raw.get(k).and_then(Value::as_str).map(str::to_string);
    let mut e = Event::new(Kind::Usage, Source::Api, Value::Null);
    e.provider = opt(s("provider"));
    e.model = opt(s("model"));
    e.plan = opt(s("plan"));
    e.usage = Value::Object(raw);
    e.agent_id = Some(agent);
    e.customer_id = Some(customer);
    e.indicator = opt(b.indicator);
    e.meta_tags = own_tags(&ing, b.meta_tags.as_ref(), None);
    accept_one(&ing, e).await
}

async fn revenue(State(ing): State<Ingest>, body: Result<Bytes, BytesRejection>) -> Reply {
    const P: &str = "/api/v2/revenue";
    let b: UsageBody = parse(P, body)?;
    let agent = required(P, "agentId", b.agent_id)?;
    let customer = required(P, "customerId", b.customer_id)?;
    let ind = required(P, "indicator", b.indicator)?;
    let mut e = Event::new(
        Kind::Indicator,
        Source::Api,
        json!({ "indicators": [ind.clone()] }),
    );
    e.agent_id = Some(agent);
    e.customer_id = Some(customer);
    e.indicator = Some(ind);
    e.meta_tags = own_tags(&ing, b.meta_tags.as_ref(), None);
    accept_one(&ing, e).await
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ExternalBody {
    agent_id: Option<String>,
    customer_id: Option<String>,
    indicator: Option<String>,
    name: Option<String>,
    external_cost_id: Option<String>,
    properties: Option<Value>,
    meta_tags: Option<Value>,
}

async fn external_billing(State(ing): State<Ingest>, body: Result<Bytes, BytesRejection>) -> Reply {
    const P: &str = "/api/v1/external-billing";
    let b: ExternalBody = parse(P, body)?;
    let agent = required(P, "agentId", b.agent_id)?;
    let customer = required(P, "customerId", b.customer_id)?;
    let name = required(P, "name", b.name)?;
    let cost_id = required(P, "externalCostId", b.external_cost_id)?;
    let properties = match b.properties {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(Value::Object(m)) => Value::Object(m),
        Some(_) => {
            return Err(IngestError::BadRequest(format!(
                "{P}: properties must be an object"
            )));
        }
    };
    let usage = json!({ "name": name, "external_cost_id": cost_id, "properties": properties });
    let mut e = Event::new(Kind::ExternalCost, Source::Api, usage);
    e.agent_id = Some(agent);
    e.customer_id = Some(customer);
    e.indicator = opt(b.indicator);
    e.meta_tags = own_tags(&ing, b.meta_tags.as_ref(), None);
    accept_one(&ing, e).await
}

async fn customer(State(ing): State<Ingest>, body: Result<Bytes, BytesRejection>) -> Reply {
    const P: &str = "/api/v1/customers/create-or-get";
    let b: Map<String, Value> = parse(P, body)?;
    let ext = required(
        P,
        "externalId",
        b.get("externalId")
            .and_then(Value::as_str)
            .map(str::to_string),
    )?;
    let name = b
        .get("name")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .unwrap_or(&ext)
        .to_string();
    let meta = b.get("metaTags").cloned();
    let mut usage = b;
    usage.remove("metaTags");
    let mut e = Event::new(Kind::Customer, Source::Api, Value::Object(usage));
    e.customer_id = Some(ext.clone());
    e.meta_tags = own_tags(&ing, meta.as_ref(), None);
    ing.pipeline.accept(vec![e]).await?;
    Ok(Json(json!({ "id": ext, "externalId": ext, "name": name })))
}
