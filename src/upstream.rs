//! Delivery: spool -> batch -> request -> retry (the shape of Vector's HTTP sinks).
//!
//! * **Batch.** [`Spool::next_batch`] cuts runs of records by count, bytes or time. Up to
//!   `concurrency` batches are in flight; a semaphore permit is taken before the next batch is
//!   read, so the spool keeps what delivery cannot take yet.
//! * **Request.** The body `{"batch_id","sent_at","events":[...]}` is built once per batch by
//!   concatenating the stored event JSON, compressed once, and re-sent unchanged on every
//!   retry with the same `Idempotency-Key: <batch_id>`; each event keeps its own stable `id`.
//! * **Retry.** Connection errors, timeouts, 408, 429 and 5xx except 501 are retried forever
//!   with exponential backoff (`retry_initial` doubling up to `retry_max`, "equal jitter":
//!   half fixed, half random, so a fleet does not retry in lockstep). A `Retry-After` on 429 or
//!   503 replaces the computed delay (capped at [`RETRY_AFTER_CAP`] so a bogus header cannot
//!   park delivery for days). Other 4xx and 501 will never succeed: the batch is written to
//!   `<spool dir>/dead-letter/<batch_id>.json` and counted. A batch is committed to the spool
//!   only after a 2xx (or the dead-letter write), which is what makes delivery at-least-once.
//! * **file://** writes each batch as one NDJSON file (`<millis>-<batch_id>.ndjson`), written
//!   to a temporary name, fsynced and renamed, so a reader never sees half a batch.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, HeaderValue};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::config::{Compression, UpstreamConfig, UpstreamUrl};
use crate::event::{Timestamp, new_id};
use crate::metrics::Metrics;
use crate::reload::Live;
use crate::spool::{Batch, BatchLimits, Spool};

/// Longest `Retry-After` honoured.
pub const RETRY_AFTER_CAP: Duration = Duration::from_secs(600);

/// Delivery settings (the reloadable part of `[upstream]`).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Target.
    pub url: UpstreamUrl,
    /// `paygent-api-key` header.
    pub api_key: Option<String>,
    /// Batch cut.
    pub limits: BatchLimits,
    /// Body compression.
    pub compression: Compression,
    /// Request timeout.
    pub timeout: Duration,
    /// Batches in flight.
    pub concurrency: usize,
    /// First retry delay.
    pub retry_initial: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
    /// Where dead-lettered batches go.
    pub dead_letter_dir: PathBuf,
}

impl Settings {
    /// From the config file.
    pub fn from_config(c: &UpstreamConfig, api_key: Option<String>, spool_dir: &Path) -> Self {
        Settings {
            url: c.url.clone(),
            api_key,
            limits: BatchLimits {
                max_events: c.batch_max_events.get(),
                max_bytes: usize::try_from(c.batch_max_bytes.get()).unwrap_or(usize::MAX),
                timeout: c.batch_timeout.get(),
            },
            compression: c.compression,
            timeout: c.timeout.get(),
            concurrency: c.concurrency.get(),
            retry_initial: c.retry_initial.get(),
            retry_max: c.retry_max.get(),
            dead_letter_dir: spool_dir.join("dead-letter"),
        }
    }
}

/// Why one delivery attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The upstream answered with a status that may succeed later.
    #[error("upstream answered {status}")]
    Retryable {
        /// The status.
        status: StatusCode,
        /// Its `Retry-After`, when it gave one on 429/503.
        retry_after: Option<Duration>,
    },
    /// The upstream answered with a status that will not succeed on retry.
    #[error("upstream answered {status}: {body}")]
    Rejected {
        /// The status.
        status: StatusCode,
        /// The start of the response body.
        body: String,
    },
    /// Connection error or timeout.
    #[error("upstream request failed: {0}")]
    Transport(#[from] reqwest::Error),
    /// Writing the file sink failed.
    #[error("writing the batch file failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Classifies a status per CONTRACT §6.
pub fn is_retryable(status: StatusCode) -> bool {
    status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || (status.is_server_error() && status != StatusCode::NOT_IMPLEMENTED)
}

/// Parses `Retry-After` as seconds or an HTTP date.
pub fn parse_retry_after(v: &str, now: SystemTime) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    httpdate::parse_http_date(v)
        .ok()
        .map(|t| t.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The delay before retry number `attempt` (0-based), with equal jitter.
pub fn backoff(attempt: u32, initial: Duration, max: Duration) -> Duration {
    let exp = initial.saturating_mul(2u32.saturating_pow(attempt.min(30)));
    let capped = exp.min(max);
    let half = capped / 2;
    let jitter = if half.is_zero() {
        Duration::ZERO
    } else {
        Duration::from_nanos(rand::random_range(
            0..=half.as_nanos().min(u64::MAX as u128) as u64,
        ))
    };
    half + jitter
}

/// The delivery side of the daemon.
pub struct Upstream {
    /// Reloadable: read once per batch (limits) and once per attempt (target, key, retry).
    settings: Live<Settings>,
    /// Fixed at start: the number of batches in flight.
    concurrency: usize,
    client: reqwest::Client,
    spool: Arc<Spool>,
    metrics: Arc<Metrics>,
    state: Health,
}

/// The upstream's recent health, for `STATUS=` lines.
#[derive(Default)]
struct Health(std::sync::Mutex<(bool, String)>);

impl Health {
    fn delivered(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = (true, String::new());
    }
    fn failed(&self, why: &str) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = (false, why.to_string());
    }
    fn line(&self) -> String {
        let g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if g.0 || g.1.is_empty() {
            "upstream ok".to_string()
        } else {
            format!("upstream retrying ({})", g.1)
        }
    }
}

impl Upstream {
    /// Builds the HTTP client.
    pub fn new(
        settings: Settings,
        spool: Arc<Spool>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .user_agent(concat!("voicetagd/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Upstream {
            concurrency: settings.concurrency,
            settings: Live::new(settings),
            client,
            spool,
            metrics,
            state: Health::default(),
        })
    }

    /// Delivers batches until the spool is closed and empty. In-flight batches are awaited.
    pub async fn run(self: Arc<Self>) {
        let sem = Arc::new(Semaphore::new(self.concurrency));
        let mut tasks = JoinSet::new();
        loop {
            // Take the permit first: while every slot is busy, records stay in the spool.
            let Ok(permit) = Arc::clone(&sem).acquire_owned().await else {
                break;
            };
            // Reap finished tasks so the set does not grow.
            while tasks.try_join_next().is_some() {}
            let limits = self.settings.get().limits;
            let Some(batch) = self.spool.next_batch(limits).await else {
                break;
            };
            let me = Arc::clone(&self);
            tasks.spawn(async move {
                me.deliver(batch).await;
                drop(permit);
            });
        }
        while tasks.join_next().await.is_some() {}
    }

    async fn deliver(&self, batch: Batch) {
        let batch_id = new_id();
        let n = batch.records.len() as u64;
        let sent_at = Timestamp::now();
        let mut attempt = 0u32;
        // The body is built and compressed once and re-sent unchanged on every retry; only a
        // reload that changes the compression makes it be built again.
        let mut body: Option<(Compression, Bytes)> = None;
        self.metrics.observe("voicetagd_batch_events", n as f64);
        loop {
            let s = self.settings.get();
            let started = std::time::Instant::now();
            let result = match &s.url {
                UpstreamUrl::Http(url) => {
                    if body.as_ref().is_none_or(|(c, _)| *c != s.compression) {
                        let b = match encode_body(&batch_id, sent_at, &batch.records, s.compression)
                        {
                            Ok(b) => (s.compression, b),
                            Err(e) => {
                                // Compression into memory only fails on allocation; send as is.
                                tracing::error!(batch_id, error = %e, "could not compress batch; sending it uncompressed");
                                (
                                    Compression::None,
                                    Bytes::from(json_body(&batch_id, sent_at, &batch.records)),
                                )
                            }
                        };
                        body = Some(b);
                    }
                    let (c, b) = body.clone().unwrap_or((Compression::None, Bytes::new()));
                    let r = self.post(&s, url, &batch_id, b, c).await;
                    self.metrics.observe(
                        "voicetagd_upstream_request_seconds",
                        started.elapsed().as_secs_f64(),
                    );
                    r
                }
                UpstreamUrl::File(dir) => {
                    write_ndjson(dir, &batch_id, &batch.records).map_err(DeliveryError::from)
                }
            };
            match result {
                Ok(()) => {
                    tracing::debug!(batch_id, events = n, "batch delivered");
                    self.count_by_kind("voicetagd_events_delivered_total", &batch.records);
                    self.metrics.inc("voicetagd_batches_delivered_total", &[]);
                    self.state.delivered();
                    self.spool.commit(&batch.ack);
                    return;
                }
                Err(DeliveryError::Rejected { status, body: text }) => {
                    tracing::error!(batch_id, status = status.as_u16(), events = n, response = %text,
                        "upstream rejected the batch; writing it to dead-letter");
                    self.dead_letter(&s, &batch_id, status, &text, &batch.records)
                        .await;
                    self.count_by_kind("voicetagd_events_dead_lettered_total", &batch.records);
                    self.state
                        .failed(&format!("rejected a batch with {status}"));
                    self.spool.commit(&batch.ack);
                    return;
                }
                Err(err) => {
                    let delay = match &err {
                        DeliveryError::Retryable {
                            retry_after: Some(ra),
                            ..
                        } => (*ra).min(RETRY_AFTER_CAP),
                        _ => backoff(attempt, s.retry_initial, s.retry_max),
                    };
                    tracing::warn!(batch_id, attempt = attempt + 1, error = %err, retry_in_ms = delay.as_millis() as u64,
                        "batch delivery failed; will retry");
                    self.metrics.inc("voicetagd_upstream_retries_total", &[]);
                    self.state.failed(&err.to_string());
                    attempt = attempt.saturating_add(1);
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Counts records by their `source` and `kind` (read from the stored JSON).
    fn count_by_kind(&self, name: &'static str, records: &[Bytes]) {
        #[derive(serde::Deserialize)]
        struct Head<'a> {
            #[serde(borrow)]
            source: std::borrow::Cow<'a, str>,
            #[serde(borrow)]
            kind: std::borrow::Cow<'a, str>,
        }
        for r in records {
            match serde_json::from_slice::<Head>(r) {
                Ok(h) => self
                    .metrics
                    .inc(name, &[("source", &h.source), ("kind", &h.kind)]),
                Err(_) => self
                    .metrics
                    .inc(name, &[("source", "unknown"), ("kind", "unknown")]),
            }
        }
    }

    /// Replaces the reloadable settings.
    pub fn reload(&self, settings: Settings) {
        self.settings.set(settings);
    }

    /// A one-line state for `STATUS=` and logs.
    pub fn status(&self) -> String {
        self.state.line()
    }

    async fn post(
        &self,
        s: &Settings,
        url: &str,
        batch_id: &str,
        body: Bytes,
        compression: Compression,
    ) -> Result<(), DeliveryError> {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        match compression {
            Compression::Gzip => {
                headers.insert("content-encoding", HeaderValue::from_static("gzip"));
            }
            Compression::Zstd => {
                headers.insert("content-encoding", HeaderValue::from_static("zstd"));
            }
            Compression::None => {}
        }
        if let Some(k) = &s.api_key
            && let Ok(v) = HeaderValue::from_str(k)
        {
            headers.insert("paygent-api-key", v);
        }
        if let Ok(v) = HeaderValue::from_str(batch_id) {
            headers.insert("idempotency-key", v);
        }
        let resp = self
            .client
            .post(url)
            .timeout(s.timeout)
            .headers(headers)
            .body(body)
            .send()
            .await;
        let resp = match resp {
            Ok(r) => r,
            Err(e) => {
                self.metrics
                    .inc("voicetagd_upstream_requests_total", &[("status", "error")]);
                return Err(e.into());
            }
        };
        let status = resp.status();
        self.metrics.inc(
            "voicetagd_upstream_requests_total",
            &[("status", status.as_str())],
        );
        if status.is_success() {
            return Ok(());
        }
        if is_retryable(status) {
            let retry_after = if status == StatusCode::TOO_MANY_REQUESTS
                || status == StatusCode::SERVICE_UNAVAILABLE
            {
                resp.headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, SystemTime::now()))
            } else {
                None
            };
            return Err(DeliveryError::Retryable {
                status,
                retry_after,
            });
        }
        let text = resp.text().await.unwrap_or_default();
        let body: String = text.chars().take(512).collect();
        Err(DeliveryError::Rejected { status, body })
    }

    async fn dead_letter(
        &self,
        s: &Settings,
        batch_id: &str,
        status: StatusCode,
        response: &str,
        records: &[Bytes],
    ) {
        let dir = s.dead_letter_dir.clone();
        let mut doc = Vec::new();
        doc.extend_from_slice(b"{\"batch_id\":");
        doc.extend_from_slice(&serde_json::to_vec(batch_id).unwrap_or_default());
        doc.extend_from_slice(format!(",\"status\":{},\"response\":", status.as_u16()).as_bytes());
        doc.extend_from_slice(&serde_json::to_vec(response).unwrap_or_default());
        doc.extend_from_slice(
            format!(
                ",\"dead_lettered_at\":\"{}\",\"events\":[",
                Timestamp::now()
            )
            .as_bytes(),
        );
        join_records(&mut doc, records);
        doc.extend_from_slice(b"]}\n");
        let name = format!("{batch_id}.json");
        // Retry the write until it works: committing without it would lose the events.
        let mut attempt = 0;
        loop {
            match write_atomic(&dir, &name, &doc) {
                Ok(()) => return,
                Err(e) => {
                    let delay = backoff(attempt, s.retry_initial, s.retry_max);
                    tracing::error!(batch_id, dir = %dir.display(), error = %e, "cannot write dead-letter file; retrying");
                    attempt += 1;
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }
}

fn join_records(out: &mut Vec<u8>, records: &[Bytes]) {
    for (i, r) in records.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(r);
    }
}

/// The uncompressed request body.
pub fn json_body(batch_id: &str, sent_at: Timestamp, records: &[Bytes]) -> Vec<u8> {
    let total: usize = records.iter().map(|r| r.len() + 1).sum();
    let mut out = Vec::with_capacity(total + 128);
    out.extend_from_slice(b"{\"batch_id\":");
    out.extend_from_slice(&serde_json::to_vec(batch_id).unwrap_or_default());
    out.extend_from_slice(format!(",\"sent_at\":\"{sent_at}\",\"events\":[").as_bytes());
    join_records(&mut out, records);
    out.extend_from_slice(b"]}");
    out
}

/// The request body, compressed as configured.
pub fn encode_body(
    batch_id: &str,
    sent_at: Timestamp,
    records: &[Bytes],
    c: Compression,
) -> std::io::Result<Bytes> {
    let raw = json_body(batch_id, sent_at, records);
    Ok(Bytes::from(match c {
        Compression::None => raw,
        Compression::Gzip => {
            let mut enc = flate2::write::GzEncoder::new(
                Vec::with_capacity(raw.len() / 4),
                flate2::Compression::fast(),
            );
            enc.write_all(&raw)?;
            enc.finish()?
        }
        Compression::Zstd => zstd::bulk::compress(&raw, 3)?,
    }))
}

fn write_ndjson(dir: &Path, batch_id: &str, records: &[Bytes]) -> std::io::Result<()> {
    let mut doc = Vec::with_capacity(records.iter().map(|r| r.len() + 1).sum());
    for r in records {
        doc.extend_from_slice(r);
        doc.push(b'\n');
    }
    let millis = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    write_atomic(dir, &format!("{millis:013}-{batch_id}.ndjson"), &doc)
}

/// Writes `name` in `dir` via a temporary file, fsync and rename, then fsyncs the directory.
fn write_atomic(dir: &Path, name: &str, data: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_classification() {
        for s in [408u16, 429, 500, 502, 503, 504, 599] {
            assert!(is_retryable(StatusCode::from_u16(s).unwrap()), "{s}");
        }
        for s in [400u16, 401, 403, 404, 413, 422, 501] {
            assert!(!is_retryable(StatusCode::from_u16(s).unwrap()), "{s}");
        }
    }

    #[test]
    fn retry_after_seconds_and_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn backoff_grows_and_is_capped_with_jitter() {
        let (i, m) = (Duration::from_millis(200), Duration::from_secs(30));
        for attempt in 0..40 {
            let d = backoff(attempt, i, m);
            let cap = i
                .saturating_mul(2u32.saturating_pow(attempt.min(30)))
                .min(m);
            assert!(
                d >= cap / 2 && d <= cap,
                "attempt {attempt}: {d:?} vs {cap:?}"
            );
        }
    }

    #[test]
    fn body_is_valid_json_and_decompresses() {
        let recs = vec![
            Bytes::from_static(br#"{"id":"a"}"#),
            Bytes::from_static(br#"{"id":"b"}"#),
        ];
        let t = Timestamp::parse("2026-01-01T00:00:00Z").unwrap();
        for c in [Compression::None, Compression::Gzip, Compression::Zstd] {
            let b = encode_body("B1", t, &recs, c).unwrap();
            let raw = match c {
                Compression::None => b.to_vec(),
                Compression::Gzip => {
                    let mut out = Vec::new();
                    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&b[..]), &mut out)
                        .unwrap();
                    out
                }
                Compression::Zstd => zstd::decode_all(&b[..]).unwrap(),
            };
            let v: serde_json::Value = serde_json::from_slice(&raw).unwrap();
            assert_eq!(v["batch_id"], "B1");
            assert_eq!(v["events"][1]["id"], "b");
        }
    }
}
