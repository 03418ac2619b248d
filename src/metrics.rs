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
    /// Histograms by name; a std `Mutex` each, held for one bucket increment.
    histograms: DashMap<&'static str, std::sync::Mutex<Histogram>>,
}

/// Bucket bounds of the histograms, chosen for their units.
pub const HISTOGRAMS: &[(&str, &str, &[f64])] = &[
    (
        "voicetagd_upstream_request_seconds",
        "Upstream request latency in seconds, per attempt.",
        &[
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ],
    ),
    (
        "voicetagd_batch_events",
        "Events per batch sent upstream.",
        &[1.0, 5.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0],
    ),
];

/// A cumulative-bucket histogram.
#[derive(Debug, Default, Clone)]
struct Histogram {
    bounds: Vec<f64>,
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

/// Counter names and their help texts, so every series is documented in the output.
pub const HELP: &[(&str, &str)] = &[
    (
        "voicetagd_events_received_total",
        "Events accepted from sources, by source and kind.",
    ),
    (
        "voicetagd_events_stamped_total",
        "Events stamped and queued for delivery, by source and kind (an event waiting for its session counts once stamped).",
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

    /// Records one observation in a histogram of [`HISTOGRAMS`] (unknown names are ignored).
    pub fn observe(&self, name: &'static str, value: f64) {
        let Some((_, _, bounds)) = HISTOGRAMS.iter().find(|(n, _, _)| *n == name) else {
            return;
        };
        let entry = self.histograms.entry(name).or_insert_with(|| {
            std::sync::Mutex::new(Histogram {
                bounds: bounds.to_vec(),
                counts: vec![0; bounds.len()],
                sum: 0.0,
                count: 0,
            })
        });
        let mut h = entry.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = h.bounds.iter().position(|b| value <= *b) {
            h.counts[i] += 1;
        }
        h.sum += value;
        h.count += 1;
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
        let mut hs: Vec<(&'static str, Histogram)> = self
            .histograms
            .iter()
            .map(|e| {
                (
                    *e.key(),
                    e.value().lock().unwrap_or_else(|p| p.into_inner()).clone(),
                )
            })
            .collect();
        hs.sort_by_key(|(n, _)| *n);
        for (name, h) in hs {
            let help = HISTOGRAMS
                .iter()
                .find(|(n, _, _)| *n == name)
                .map(|(_, h, _)| *h)
                .unwrap_or("");
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
            let mut cumulative = 0;
            for (b, c) in h.bounds.iter().zip(&h.counts) {
                cumulative += c;
                let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
            }
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}",
                h.count, h.sum, h.count
            );
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
        m.observe("voicetagd_batch_events", 7.0);
        m.observe("voicetagd_batch_events", 700.0);
        let text = m.render(&[("voicetagd_sessions_active", "Active sessions.", 2.0)]);
        assert!(text.contains("voicetagd_batch_events_bucket{le=\"10\"} 1\n"));
        assert!(text.contains("voicetagd_batch_events_bucket{le=\"1000\"} 2\n"));
        assert!(text.contains("voicetagd_batch_events_count 2\n"));
        assert!(text.contains("voicetagd_events_received_total{source=\"api\",kind=\"stt\"} 3\n"));
        assert!(text.contains("# TYPE voicetagd_tags_skipped_total counter\n"));
        assert!(text.contains("voicetagd_sessions_active 2\n"));
    }
}
