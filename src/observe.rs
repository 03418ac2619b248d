//! Watching accepted events without slowing them: the tap (a live stream for `GET /v1/tap` and
//! `voicetagd tail`) and usage totals per agent and customer (`GET /v1/usage`).
//!
//! The pipeline hands every event here once it is durably accepted and stamped. Neither part
//! can block the pipeline: the tap is a `tokio::sync::broadcast` channel, whose sender never
//! waits (a reader that falls more than [`TAP_BUFFER`] events behind loses the oldest ones and
//! is told how many), and the totals are a few atomic-free additions under a short std lock
//! per distinct (agent, customer, tags) combination.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use dashmap::DashMap;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::broadcast;

use crate::event::{Event, Kind};
use crate::filter::Filter;
use crate::tags::Tags;

/// Events buffered per tap reader before the slowest one starts losing the oldest.
pub const TAP_BUFFER: usize = 4096;

/// One accepted event as the tap carries it: its tags (for filtering) and its JSON.
#[derive(Debug, Clone)]
pub struct Tapped {
    /// The stamped tags.
    pub tags: Arc<Tags>,
    /// The event's JSON, exactly as delivered upstream.
    pub json: Bytes,
}

/// Usage totals of one group.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Totals {
    /// Events of any kind.
    pub events: u64,
    /// STT audio minutes.
    pub stt_minutes: f64,
    /// Session minutes reported by indicator events.
    pub session_minutes: f64,
    /// LLM prompt + completion tokens, and STS tokens.
    pub tokens: u64,
    /// TTS characters.
    pub characters: u64,
    /// Sum of `cost_usd`.
    pub cost_usd: f64,
}

impl Totals {
    fn add_event(&mut self, e: &Event) {
        self.events += 1;
        let n = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(0.0);
        match e.kind {
            Kind::Stt => self.stt_minutes += n(&e.usage, "audio_seconds") / 60.0,
            Kind::Llm => {
                self.tokens +=
                    (n(&e.usage, "prompt_tokens") + n(&e.usage, "completion_tokens")) as u64
            }
            Kind::Tts => self.characters += n(&e.usage, "characters") as u64,
            Kind::Sts => self.tokens += sts_tokens(&e.usage),
            Kind::Indicator => self.session_minutes += n(&e.usage, "total_duration_minutes"),
            // A V2 raw usage record, in the SDK's own field names (audioDuration in minutes).
            Kind::Usage => {
                self.tokens += (n(&e.usage, "inputTokens") + n(&e.usage, "outputTokens")) as u64;
                self.characters += n(&e.usage, "characterCount") as u64;
                self.stt_minutes += n(&e.usage, "audioDuration");
            }
            _ => {}
        }
        self.cost_usd += e.cost_usd.unwrap_or(0.0);
    }

    fn merge(&mut self, o: &Totals) {
        self.events += o.events;
        self.stt_minutes += o.stt_minutes;
        self.session_minutes += o.session_minutes;
        self.tokens += o.tokens;
        self.characters += o.characters;
        self.cost_usd += o.cost_usd;
    }
}

/// Input and output tokens of an STS usageMetadata (cached tokens are part of the input).
fn sts_tokens(u: &Value) -> u64 {
    let mut t = 0.0;
    for side in ["input", "output"] {
        if let Some(Value::Object(m)) = u.get(side) {
            for part in m.values() {
                t += part.get("tokens").and_then(Value::as_f64).unwrap_or(0.0);
            }
        }
    }
    t as u64
}

type GroupKey = (Option<String>, Option<String>, Arc<Tags>);

/// The tap and the totals.
pub struct Observer {
    tap: broadcast::Sender<Tapped>,
    /// Totals per (agent, customer, tags): a filter can then be applied to the tags later.
    /// A std `Mutex` per entry, held for a few additions.
    totals: DashMap<GroupKey, Mutex<Totals>>,
}

impl Default for Observer {
    fn default() -> Self {
        Observer::new()
    }
}

impl Observer {
    /// A new observer.
    pub fn new() -> Self {
        let (tap, _) = broadcast::channel(TAP_BUFFER);
        Observer {
            tap,
            totals: DashMap::new(),
        }
    }

    /// Records accepted, stamped events (`records[i]` is `events[i]` serialized).
    pub fn accepted(&self, events: &[Event], records: &[Bytes]) {
        let tapping = self.tap.receiver_count() > 0;
        for (e, r) in events.iter().zip(records) {
            let tags = Arc::new(e.meta_tags.clone());
            if tapping {
                // Never waits; fails only when nobody listens.
                let _ = self.tap.send(Tapped {
                    tags: Arc::clone(&tags),
                    json: r.clone(),
                });
            }
            let key = (e.agent_id.clone(), e.customer_id.clone(), tags);
            let entry = self.totals.entry(key).or_default();
            entry.lock().unwrap_or_else(|p| p.into_inner()).add_event(e);
        }
    }

    /// A new tap reader.
    pub fn subscribe(&self) -> broadcast::Receiver<Tapped> {
        self.tap.subscribe()
    }

    /// Totals grouped by agent or customer, over events whose tags match the filter.
    pub fn usage(&self, filter: &Filter, by_customer: bool) -> BTreeMap<String, Totals> {
        let mut out: BTreeMap<String, Totals> = BTreeMap::new();
        for e in self.totals.iter() {
            let (agent, customer, tags) = e.key();
            if !filter.matches(tags) {
                continue;
            }
            let group = if by_customer { customer } else { agent };
            let t = e.value().lock().unwrap_or_else(|p| p.into_inner()).clone();
            out.entry(group.clone().unwrap_or_default())
                .or_default()
                .merge(&t);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Source;
    use serde_json::json;

    fn ev(kind: Kind, agent: &str, customer: &str, tags: &[(&str, &str)], usage: Value) -> Event {
        let mut e = Event::new(kind, Source::Api, usage);
        e.agent_id = Some(agent.into());
        e.customer_id = Some(customer.into());
        e.meta_tags = tags
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        e
    }

    #[test]
    fn totals_group_and_filter() {
        let o = Observer::new();
        let mut cost = ev(
            Kind::ExternalCost,
            "a1",
            "c1",
            &[("env", "prod")],
            json!({}),
        );
        cost.cost_usd = Some(0.25);
        let events = vec![
            ev(
                Kind::Stt,
                "a1",
                "c1",
                &[("env", "prod")],
                json!({"audio_seconds": 90.0}),
            ),
            ev(
                Kind::Llm,
                "a1",
                "c2",
                &[("env", "staging")],
                json!({"prompt_tokens": 100, "completion_tokens": 20}),
            ),
            ev(
                Kind::Tts,
                "a2",
                "c1",
                &[("env", "prod")],
                json!({"characters": 143}),
            ),
            ev(
                Kind::Usage,
                "a2",
                "c1",
                &[("env", "staging")],
                json!({"inputTokens": 100, "outputTokens": 50}),
            ),
            ev(
                Kind::Sts,
                "a2",
                "c1",
                &[("env", "prod")],
                json!({"input": {"audio": {"tokens": 10}}, "output": {"text": {"tokens": 5}}}),
            ),
            cost,
        ];
        let records: Vec<Bytes> = events
            .iter()
            .map(|e| Bytes::from(serde_json::to_vec(e).unwrap()))
            .collect();
        o.accepted(&events, &records);
        let by_agent = o.usage(&Filter::default(), false);
        assert_eq!(by_agent["a1"].events, 3);
        assert_eq!(by_agent["a1"].stt_minutes, 1.5);
        assert_eq!(by_agent["a1"].tokens, 120);
        assert_eq!(by_agent["a1"].cost_usd, 0.25);
        assert_eq!(by_agent["a2"].tokens, 165);
        assert_eq!(by_agent["a2"].characters, 143);
        let prod_by_customer = o.usage(&Filter::parse("env:prod"), true);
        assert_eq!(prod_by_customer.keys().collect::<Vec<_>>(), vec!["c1"]);
        assert_eq!(prod_by_customer["c1"].events, 4);
    }

    #[tokio::test]
    async fn a_lagging_tap_reader_loses_the_oldest_and_is_told() {
        let o = Observer::new();
        let mut rx = o.subscribe();
        let e = ev(Kind::Tts, "a", "c", &[], json!({"characters": 1}));
        let r = Bytes::from_static(b"{}");
        for _ in 0..TAP_BUFFER + 10 {
            o.accepted(std::slice::from_ref(&e), std::slice::from_ref(&r));
        }
        assert!(matches!(
            rx.recv().await,
            Err(broadcast::error::RecvError::Lagged(10))
        ));
        assert!(rx.recv().await.is_ok());
    }
}
