//! Counters in Prometheus text format (`GET /metrics`, names prefixed `voicetagd_`).
//!
//! A `DashMap` from (name, labels) to an atomic counter: the hot path pays one shard lookup
//! and an atomic add; rendering sorts the series so the output is stable.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;

/// The process-wide counters.
#[derive(Default)]
pub struct Metrics {
    counters: DashMap<(&'static str, String), AtomicU64>,
    help: DashMap<&'static str, &'static str>,
}

/// Counter names and their help texts, so every series is documented in the output.
pub const HELP: &[(&str, &str)] = &[
    (
        "voicetagd_events_received_total",
        "Events accepted from sources, by source and kind.",
    ),
    (
        "voicetagd_events_delivered_total",
        "Events delivered upstream with a 2xx answer.",
    ),
    (
        "voicetagd_events_dead_lettered_total",
        "Events written to dead-letter/ after a non-retryable answer.",
    ),
    (
        "voicetagd_tags_skipped_total",
        "Invalid or excess tags skipped, by reason.",
    ),
    (
        "voicetagd_unknown_session_events_total",
        "Events stamped with static tags only because their session never started within unknown_session_wait.",
    ),
    (
        "voicetagd_ingest_rejected_total",
        "Ingest requests refused, by reason.",
    ),
    (
        "voicetagd_upstream_requests_total",
        "Upstream requests, by status (or error).",
    ),
    (
        "voicetagd_upstream_retries_total",
        "Upstream attempts that will be retried.",
    ),
    (
        "voicetagd_batches_delivered_total",
        "Batches delivered upstream.",
    ),
    (
        "voicetagd_vapi_messages_total",
        "Authenticated Vapi server messages, by type (types unknown to vapi-server-sdk 3.0.0 as \"other\").",
    ),
    (
        "voicetagd_vapi_auth_failures_total",
        "Vapi webhooks refused with 401.",
    ),
    (
        "voicetagd_vapi_duplicate_reports_total",
        "Repeated Vapi end-of-call-reports that added nothing.",
    ),
    (
        "voicetagd_vapi_default_ids_total",
        "Vapi call sessions started with [vapi] default_agent_id / default_customer_id, by field.",
    ),
];

impl Metrics {
    /// Empty counters.
    pub fn new() -> Self {
        let m = Metrics::default();
        for (name, help) in HELP {
            m.help.insert(name, help);
        }
        m
    }

    /// Adds `n` to the series `name{labels}`.
    pub fn add(&self, name: &'static str, labels: &[(&str, &str)], n: u64) {
        let mut key = String::new();
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                key.push(',');
            }
            let _ = write!(key, "{k}=\"{}\"", escape(v));
        }
        if let Some(c) = self.counters.get(&(name, key.clone())) {
            c.fetch_add(n, Ordering::Relaxed);
            return;
        }
        self.counters
            .entry((name, key))
            .or_default()
            .fetch_add(n, Ordering::Relaxed);
    }

    /// Adds one.
    pub fn inc(&self, name: &'static str, labels: &[(&str, &str)]) {
        self.add(name, labels, 1);
    }

    /// The value of one series (for tests and status lines).
    pub fn get(&self, name: &'static str, labels: &[(&str, &str)]) -> u64 {
        let key = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
            .collect::<Vec<_>>()
            .join(",");
        self.counters
            .get(&(name, key))
            .map(|c| c.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// Renders every counter, then the given gauges, in Prometheus text format.
    pub fn render(&self, gauges: &[(&str, &str, f64)]) -> String {
        let mut series: Vec<(&'static str, String, u64)> = self
            .counters
            .iter()
            .map(|e| {
                (
                    e.key().0,
                    e.key().1.clone(),
                    e.value().load(Ordering::Relaxed),
                )
            })
            .collect();
        series.sort();
        let mut out = String::new();
        let mut last = "";
        for (name, labels, value) in &series {
            if *name != last {
                let help = self.help.get(name).map(|h| *h).unwrap_or("");
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
                last = name;
            }
            if labels.is_empty() {
                let _ = writeln!(out, "{name} {value}");
            } else {
                let _ = writeln!(out, "{name}{{{labels}}} {value}");
            }
        }
        for (name, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        out
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_sorted_series_with_labels() {
        let m = Metrics::new();
        m.inc(
            "voicetagd_events_received_total",
            &[("source", "api"), ("kind", "stt")],
        );
        m.add(
            "voicetagd_events_received_total",
            &[("source", "api"), ("kind", "stt")],
            2,
        );
        m.inc("voicetagd_tags_skipped_total", &[("reason", "key_charset")]);
        assert_eq!(
            m.get(
                "voicetagd_events_received_total",
                &[("source", "api"), ("kind", "stt")]
            ),
            3
        );
        let text = m.render(&[("voicetagd_sessions_active", "Active sessions.", 2.0)]);
        assert!(text.contains("voicetagd_events_received_total{source=\"api\",kind=\"stt\"} 3\n"));
        assert!(text.contains("# TYPE voicetagd_tags_skipped_total counter\n"));
        assert!(text.contains("voicetagd_sessions_active 2\n"));
    }
}
