//! The one event model every source produces and the upstream receives (CONTRACT §6).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::tags::Tags;

/// What an event counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Speech-to-text: `usage.audio_seconds`.
    Stt,
    /// LLM tokens.
    Llm,
    /// Text-to-speech: `usage.characters`.
    Tts,
    /// Speech-to-speech (realtime): the Paygent `usageMetadata` shape.
    Sts,
    /// A raw V2 usage record.
    Usage,
    /// An external cost.
    ExternalCost,
    /// A billing indicator (session minutes).
    Indicator,
    /// A customer record.
    Customer,
    /// Non-billable telemetry.
    Telemetry,
}

impl Kind {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Stt => "stt",
            Kind::Llm => "llm",
            Kind::Tts => "tts",
            Kind::Sts => "sts",
            Kind::Usage => "usage",
            Kind::ExternalCost => "external_cost",
            Kind::Indicator => "indicator",
            Kind::Customer => "customer",
            Kind::Telemetry => "telemetry",
        }
    }
}

/// Where an event came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The LiveKit WebSocket or webhooks.
    Livekit,
    /// Vapi webhooks.
    Vapi,
    /// The Paygent-compatible HTTP API.
    Api,
}

impl Source {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Livekit => "livekit",
            Source::Vapi => "vapi",
            Source::Api => "api",
        }
    }
}

/// A wall-clock instant, written as RFC 3339 UTC with microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(pub SystemTime);

impl Timestamp {
    /// Now.
    pub fn now() -> Self {
        Timestamp(SystemTime::now())
    }

    /// From float Unix seconds (LiveKit's timestamps); `None` for NaN, negative or absurd values.
    pub fn from_unix_f64(secs: f64) -> Option<Self> {
        if !secs.is_finite() || !(0.0..=1.0e11).contains(&secs) {
            return None;
        }
        // Round to the microsecond we print: 1752321602.85 is 1752321602.849999904 as a float.
        Some(Timestamp(
            UNIX_EPOCH + Duration::from_micros((secs * 1e6).round() as u64),
        ))
    }

    /// Parses RFC 3339 (e.g. `2026-03-12T17:04:53.497Z`).
    pub fn parse(s: &str) -> Option<Self> {
        humantime::parse_rfc3339_weak(s.trim()).ok().map(Timestamp)
    }

    /// Seconds since the Unix epoch.
    pub fn unix_f64(self) -> f64 {
        self.0
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
    }
}

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", humantime::format_rfc3339_micros(self.0))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Timestamp::parse(&s).ok_or_else(|| serde::de::Error::custom("invalid RFC 3339 timestamp"))
    }
}

/// One usage event, as delivered upstream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Stable id: kept across retries and replays so the upstream can deduplicate.
    pub id: String,
    /// What it counts.
    pub kind: Kind,
    /// Where it came in.
    pub source: Source,
    /// The voice session, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// The agent (from the event, else its session).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    /// The customer (from the event, else its session).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_id: Option<String>,
    /// The billing indicator (from the event, else its session).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub indicator: Option<String>,
    /// The model provider, unchanged (e.g. `api.openai.com`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// The model name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The pricing plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    /// When the usage happened (the source's time when it gives one, else `received_at`).
    pub occurred_at: Timestamp,
    /// When the daemon accepted it.
    pub received_at: Timestamp,
    /// Before stamping, the event's own tags; after, the merged tags.
    #[serde(default)]
    pub meta_tags: Tags,
    /// The kind's usage object.
    pub usage: Value,
    /// Cost in USD, when the source reports one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
}

impl Event {
    /// A new event with a fresh id, received now.
    pub fn new(kind: Kind, source: Source, usage: Value) -> Self {
        let now = Timestamp::now();
        Event {
            id: new_id(),
            kind,
            source,
            session_id: None,
            agent_id: None,
            customer_id: None,
            indicator: None,
            provider: None,
            model: None,
            plan: None,
            occurred_at: now,
            received_at: now,
            meta_tags: Tags::new(),
            usage,
            cost_usd: None,
        }
    }
}

/// A fresh event id: a UUIDv7, so ids sort by creation time.
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// An id derived from a name, for sources whose redeliveries must map to the same event
/// (e.g. a Vapi report's call id, message type and item index).
pub fn derived_id(name: &str) -> String {
    const NS: uuid::Uuid = uuid::Uuid::from_u128(0x6f0c_1f4e_8b1d_4c5e_9a3b_7d2e_5f60_a1b2);
    uuid::Uuid::new_v5(&NS, name.as_bytes()).to_string()
}

/// A count (tokens, characters) as a JSON integer when it is whole, else as a float: sources
/// read numbers as `f64` (JSON gives no integer guarantee) but `812.0` tokens is written `812`.
pub fn count(x: f64) -> serde_json::Value {
    if x.fract() == 0.0 && x.abs() < 9.0e15 {
        serde_json::json!(x as i64)
    } else {
        serde_json::json!(x)
    }
}

/// Rounds to 9 decimal places, so that unit conversions (minutes x 60) do not leak binary
/// floating-point noise such as `6.000000000000001` into billing data.
pub fn round9(x: f64) -> f64 {
    let r = (x * 1e9).round() / 1e9;
    if r.is_finite() { r } else { x }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn serializes_contract_shape_and_omits_nulls() {
        let mut e = Event::new(Kind::Stt, Source::Api, json!({"audio_seconds": 6.0}));
        e.occurred_at = Timestamp::parse("2026-03-12T17:04:53.497Z").unwrap();
        e.received_at = e.occurred_at;
        e.session_id = Some("s1".into());
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["kind"], "stt");
        assert_eq!(v["source"], "api");
        assert_eq!(v["session_id"], "s1");
        assert_eq!(v["occurred_at"], "2026-03-12T17:04:53.497000Z");
        assert!(v.get("provider").is_none());
        assert!(v.get("cost_usd").is_none());
        let back: Event = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn derived_ids_are_stable() {
        assert_eq!(derived_id("call-1/eocr/0"), derived_id("call-1/eocr/0"));
        assert_ne!(derived_id("call-1/eocr/0"), derived_id("call-1/eocr/1"));
    }

    #[test]
    fn counts_are_integers_when_whole() {
        assert_eq!(count(812.0), json!(812));
        assert_eq!(count(1.5), json!(1.5));
    }

    #[test]
    fn rounding_removes_float_noise() {
        assert_eq!(round9(0.1 * 60.0), 6.0);
        assert_eq!(round9(1.5902 * 60.0), 95.412);
    }

    #[test]
    fn unix_float_timestamps() {
        let t = Timestamp::from_unix_f64(1752321600.25).unwrap();
        assert_eq!(t.to_string(), "2025-07-12T12:00:00.250000Z");
        assert!(Timestamp::from_unix_f64(f64::NAN).is_none());
        let t = Timestamp::from_unix_f64(1752321602.85).unwrap();
        assert_eq!(t.to_string(), "2025-07-12T12:00:02.850000Z");
    }
}
