//! The one entry point of every source: stamp events with their session's tags and queue them.
//!
//! Flow: a source builds [`Event`]s (their `meta_tags` hold only the event's own tags) and
//! calls [`Pipeline::accept`]. An event of a known session is stamped at once (event >
//! session > static) and appended to the spool. An event whose session has not started yet is
//! *parked*: it is accepted at once (the reply never waits for the session) and held until the
//! session starts or `unknown_session_wait` passes; then it is stamped (with static tags only
//! in the second case, counted) and appended. Parked events are already accepted, so their
//! append is never refused for space.
//!
//! The race between an event parking and its session starting is closed by the parked lock:
//! `accept` re-checks the registry under it before parking, and `start_session` inserts into
//! the registry before taking the parked events under it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::event::{Event, Source};
use crate::metrics::Metrics;
use crate::sessions::{Registry, Session, Start};
use crate::spool::{Spool, SpoolError};
use crate::tags::{self, Skipped, Tags};

/// Most events parked at once, waiting for their sessions. Beyond it ingest answers `503`
/// like a full spool: a misbehaving client that never starts its sessions cannot grow memory
/// without bound.
pub const MAX_PARKED: usize = 100_000;

/// Why events were not accepted.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    /// The spool refused them.
    #[error(transparent)]
    Spool(#[from] SpoolError),
    /// Too many events wait for sessions that have not started.
    #[error("too many events ({0}) are waiting for sessions that have not started")]
    TooManyParked(usize),
    /// An event could not be serialized (not expected for events built by sources).
    #[error("event could not be serialized: {0}")]
    Encode(#[from] serde_json::Error),
}

#[derive(Default)]
struct Parked {
    /// Parked events per session, each with its deadline, in arrival order.
    by_session: HashMap<String, Vec<(Instant, Event)>>,
    /// (deadline, tiebreak) -> session; one entry per parking call.
    deadlines: BTreeMap<(Instant, u64), String>,
    count: usize,
    next: u64,
}

/// Stamping and queueing, shared by every source.
pub struct Pipeline {
    sessions: Arc<Registry>,
    spool: Arc<Spool>,
    metrics: Arc<Metrics>,
    /// Static tags; a `RwLock` so a reload can swap them. Read on every event, written only on
    /// reload, never held across an `.await`.
    static_tags: RwLock<Arc<Tags>>,
    /// A std `Mutex`: held for map operations only, never across an `.await`.
    parked: Mutex<Parked>,
    parked_wake: Notify,
    wait: Duration,
}

impl Pipeline {
    /// A pipeline over the given registry and spool.
    pub fn new(
        sessions: Arc<Registry>,
        spool: Arc<Spool>,
        metrics: Arc<Metrics>,
        static_tags: Tags,
        unknown_session_wait: Duration,
    ) -> Self {
        Pipeline {
            sessions,
            spool,
            metrics,
            static_tags: RwLock::new(Arc::new(static_tags)),
            parked: Mutex::new(Parked::default()),
            parked_wake: Notify::new(),
            wait: unknown_session_wait,
        }
    }

    fn parked(&self) -> MutexGuard<'_, Parked> {
        self.parked.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn static_tags(&self) -> Arc<Tags> {
        Arc::clone(&self.static_tags.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Replaces the static tags (config reload).
    pub fn set_static_tags(&self, tags: Tags) {
        *self.static_tags.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(tags);
    }

    /// The session registry.
    pub fn sessions(&self) -> &Registry {
        &self.sessions
    }

    /// The spool.
    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Logs and counts tags skipped while reading an event or session start.
    pub fn report_skipped(&self, skipped: &[Skipped], session_id: Option<&str>, what: &str) {
        for s in skipped {
            tracing::warn!(
                session_id = session_id.unwrap_or(""),
                key = %s.key,
                reason = s.reason.as_str(),
                "{what}: {s}"
            );
            self.metrics.inc(
                "voicetagd_tags_skipped_total",
                &[("reason", s.reason.as_str())],
            );
        }
    }

    /// Stamps one event with its session (if given) and the static tags.
    fn stamp(&self, mut e: Event, session: Option<&crate::sessions::Stamp>) -> Event {
        let empty = Tags::new();
        let stat = self.static_tags();
        let (session_tags, agent, customer, indicator) = match session {
            Some(s) => (&*s.tags, &s.agent_id, &s.customer_id, &s.indicator),
            None => (&empty, &None, &None, &None),
        };
        if e.agent_id.is_none() {
            e.agent_id = agent.clone();
        }
        if e.customer_id.is_none() {
            e.customer_id = customer.clone();
        }
        if e.indicator.is_none() {
            e.indicator = indicator.clone();
        }
        let (merged, skipped) = tags::merge(&e.meta_tags, session_tags, &stat);
        self.report_skipped(&skipped, e.session_id.as_deref(), "merging tags");
        e.meta_tags = merged;
        e
    }

    fn encode(&self, events: &[Event]) -> Result<Vec<Bytes>, AcceptError> {
        let mut out = Vec::with_capacity(events.len());
        for e in events {
            out.push(Bytes::from(serde_json::to_vec(e)?));
        }
        Ok(out)
    }

    fn count_received(&self, events: &[Event]) {
        for e in events {
            self.metrics.inc(
                "voicetagd_events_received_total",
                &[("source", e.source.as_str()), ("kind", e.kind.as_str())],
            );
        }
    }

    /// Accepts events: stamps those whose session is known, parks the others. Returns once all
    /// are accepted (or none are).
    pub async fn accept(&self, events: Vec<Event>) -> Result<(), AcceptError> {
        let mut ready = Vec::with_capacity(events.len());
        let mut waiting = Vec::new();
        for e in events {
            match e.session_id.as_deref() {
                None => ready.push(self.stamp(e, None)),
                Some(sid) => match self.sessions.stamp(sid) {
                    Some(st) => ready.push(self.stamp(e, Some(&st))),
                    None => waiting.push(e),
                },
            }
        }
        if !waiting.is_empty() {
            let parked = self.parked().count;
            if parked + waiting.len() > MAX_PARKED {
                return Err(AcceptError::TooManyParked(parked));
            }
        }
        // Queue the ready events first: if the spool refuses them, nothing of this call was
        // accepted and the client may simply retry.
        let records = self.encode(&ready)?;
        self.spool.append(records).await?;
        self.count_received(&ready);
        if waiting.is_empty() {
            return Ok(());
        }
        // Re-check under the parked lock: a session that started since the lookup above has
        // already taken its parked events, so these must not park.
        let mut late = Vec::new();
        let earlier_deadline = {
            let mut p = self.parked();
            let deadline = Instant::now() + self.wait;
            let earliest = p.deadlines.first_key_value().map(|(k, _)| k.0);
            for e in waiting {
                let sid = e.session_id.clone().unwrap_or_default();
                if let Some(st) = self.sessions.stamp(&sid) {
                    late.push(self.stamp(e, Some(&st)));
                    continue;
                }
                tracing::debug!(session_id = %sid, event_id = %e.id, "event waits for its session to start");
                let n = p.next;
                p.next += 1;
                p.deadlines.insert((deadline, n), sid.clone());
                p.by_session.entry(sid).or_default().push((deadline, e));
                p.count += 1;
            }
            earliest.is_none_or(|t| deadline < t)
        };
        if earlier_deadline {
            self.parked_wake.notify_one();
        }
        if !late.is_empty() {
            // Already accepted as part of this call: never refused for space.
            let records = self.encode(&late)?;
            self.spool.append_accepted(records).await?;
            self.count_received(&late);
        }
        Ok(())
    }

    /// Starts a session and releases the events that waited for it.
    pub async fn start_session(&self, id: &str, start: Start, source: Source) {
        self.sessions.start(id, start, source);
        let waiting: Vec<Event> = {
            let mut p = self.parked();
            let list = p.by_session.remove(id).unwrap_or_default();
            p.count -= list.len();
            list.into_iter().map(|(_, e)| e).collect()
        };
        if !waiting.is_empty() {
            self.release(waiting).await;
        }
    }

    /// Ends a session (its late events keep its tags for `ended_grace`).
    pub fn end_session(&self, id: &str) -> Option<Session> {
        self.sessions.end(id)
    }

    /// Stamps released events (with their session if it exists now) and queues them.
    async fn release(&self, events: Vec<Event>) {
        let mut out = Vec::with_capacity(events.len());
        for e in events {
            let st = e.session_id.as_deref().and_then(|s| self.sessions.stamp(s));
            if st.is_none() {
                tracing::warn!(
                    session_id = e.session_id.as_deref().unwrap_or(""),
                    event_id = %e.id,
                    "session did not start within unknown_session_wait; event goes on with static tags only"
                );
                self.metrics.inc(
                    "voicetagd_unknown_session_events_total",
                    &[("source", e.source.as_str())],
                );
            }
            out.push(self.stamp(e, st.as_ref()));
        }
        match self.encode(&out) {
            Ok(records) => {
                // Never refused for space (append_accepted); Closed cannot happen either.
                if let Err(err) = self.spool.append_accepted(records).await {
                    tracing::error!(error = %err, events = out.len(), "released events could not be queued");
                    return;
                }
                self.count_received(&out);
            }
            Err(err) => {
                tracing::error!(error = %err, "released events could not be encoded");
            }
        }
    }

    /// Releases every parked event whose deadline passed; returns the next deadline.
    async fn release_expired(&self, now: Instant) -> Option<Instant> {
        let due: Vec<Event> = {
            let mut p = self.parked();
            let mut due = Vec::new();
            while let Some((&(at, n), _)) = p.deadlines.first_key_value() {
                if at > now {
                    break;
                }
                let sid = p.deadlines.remove(&(at, n)).unwrap_or_default();
                // Events of one session are in arrival order with equal waits, so the due ones
                // are a prefix of its list.
                if let Some(list) = p.by_session.get_mut(&sid) {
                    let cutoff = list.iter().take_while(|(d, _)| *d <= now).count();
                    let taken: Vec<Event> = list.drain(..cutoff).map(|(_, e)| e).collect();
                    if list.is_empty() {
                        p.by_session.remove(&sid);
                    }
                    p.count -= taken.len();
                    due.extend(taken);
                }
            }
            due
        };
        if !due.is_empty() {
            self.release(due).await;
        }
        self.parked().deadlines.first_key_value().map(|(k, _)| k.0)
    }

    /// Releases everything still parked (shutdown): stamped with what is known now.
    pub async fn release_all(&self) {
        let all: Vec<Event> = {
            let mut p = self.parked();
            p.deadlines.clear();
            p.count = 0;
            p.by_session
                .drain()
                .flat_map(|(_, v)| v.into_iter().map(|(_, e)| e))
                .collect()
        };
        if !all.is_empty() {
            self.release(all).await;
        }
    }

    /// Number of parked events.
    pub fn parked_count(&self) -> usize {
        self.parked().count
    }

    /// Runs the parked-event timer until `shutdown` fires.
    pub async fn run_parked(self: Arc<Self>, mut shutdown: tokio::sync::broadcast::Receiver<()>) {
        loop {
            let next = self.release_expired(Instant::now()).await;
            let sleep = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                // A parked event's wait is over.
                _ = sleep => {}
                // An event parked with an earlier deadline than the one we sleep for.
                _ = self.parked_wake.notified() => {}
                // The daemon is stopping; the caller releases what is left.
                _ = shutdown.recv() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Kind;
    use crate::spool::BatchLimits;
    use serde_json::json;

    fn setup(wait: Duration) -> (Arc<Pipeline>, Arc<Spool>) {
        let reg = Arc::new(Registry::new(
            Duration::from_secs(3600),
            Duration::from_secs(600),
        ));
        let spool = Arc::new(Spool::new(1 << 20));
        let stat: Tags = [
            ("host".to_string(), "h1".to_string()),
            ("env".to_string(), "static".to_string()),
        ]
        .into_iter()
        .collect();
        let p = Arc::new(Pipeline::new(
            reg,
            spool.clone(),
            Arc::new(Metrics::new()),
            stat,
            wait,
        ));
        (p, spool)
    }

    fn ev(session: &str) -> Event {
        let mut e = Event::new(Kind::Stt, Source::Api, json!({"audio_seconds": 1.0}));
        e.session_id = Some(session.into());
        e
    }

    async fn drain(spool: &Spool) -> Vec<Event> {
        spool.close();
        let mut out = Vec::new();
        while let Some(b) = spool
            .next_batch(BatchLimits {
                max_events: 1000,
                max_bytes: 1 << 20,
                timeout: Duration::from_millis(1),
            })
            .await
        {
            for r in &b.records {
                out.push(serde_json::from_slice(r).unwrap());
            }
            spool.commit(b.seqs);
        }
        out
    }

    fn start(tags: &[(&str, &str)]) -> Start {
        Start {
            agent_id: Some("agent".into()),
            customer_id: Some("cust".into()),
            indicator: None,
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[tokio::test]
    async fn known_session_is_stamped_with_precedence() {
        let (p, spool) = setup(Duration::from_secs(5));
        p.start_session(
            "s1",
            start(&[("env", "session"), ("team", "a")]),
            Source::Api,
        )
        .await;
        let mut e = ev("s1");
        e.meta_tags.insert("team".into(), "event".into());
        p.accept(vec![e]).await.unwrap();
        let out = drain(&spool).await;
        assert_eq!(out.len(), 1);
        let t = &out[0].meta_tags;
        assert_eq!(t.get("env").unwrap(), "session");
        assert_eq!(t.get("team").unwrap(), "event");
        assert_eq!(t.get("host").unwrap(), "h1");
        assert_eq!(out[0].agent_id.as_deref(), Some("agent"));
        assert_eq!(out[0].customer_id.as_deref(), Some("cust"));
    }

    #[tokio::test(start_paused = true)]
    async fn early_event_waits_for_its_session() {
        let (p, spool) = setup(Duration::from_secs(5));
        p.accept(vec![ev("late")]).await.unwrap();
        assert_eq!(p.parked_count(), 1);
        assert_eq!(spool.depth().events, 0);
        p.start_session("late", start(&[("env", "s")]), Source::Api)
            .await;
        assert_eq!(p.parked_count(), 0);
        let out = drain(&spool).await;
        assert_eq!(out[0].meta_tags.get("env").unwrap(), "s");
        assert_eq!(out[0].agent_id.as_deref(), Some("agent"));
    }

    #[tokio::test(start_paused = true)]
    async fn never_started_session_goes_on_with_static_tags_after_the_wait() {
        let (p, spool) = setup(Duration::from_secs(5));
        let (tx, _) = tokio::sync::broadcast::channel(1);
        let task = tokio::spawn(p.clone().run_parked(tx.subscribe()));
        p.accept(vec![ev("ghost")]).await.unwrap();
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(p.parked_count(), 0);
        let _ = tx.send(());
        task.await.unwrap();
        let out = drain(&spool).await;
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].meta_tags.get("env").unwrap(), "static");
        assert!(out[0].agent_id.is_none());
        assert_eq!(
            p.metrics().get(
                "voicetagd_unknown_session_events_total",
                &[("source", "api")]
            ),
            1
        );
    }
}
