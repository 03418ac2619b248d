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
use crate::observe::Observer;
use crate::sessions::{Change, Registry, Session, Start};
use crate::spool::{Space, Spool, SpoolError, StateOp};
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
    /// A std `Mutex`: set operations only, never held across an `.await`.
    marks: Mutex<Marks>,
    observer: Observer,
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
            marks: Mutex::new(Marks::default()),
            observer: Observer::new(),
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

    /// The tap and usage totals.
    pub fn observer(&self) -> &Observer {
        &self.observer
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

    /// Counts accepted, stamped events and shows them to the tap and the usage totals.
    fn observe(&self, events: &[Event], records: &[Bytes]) {
        self.observer.accepted(events, records);
        for e in events {
            self.metrics.inc(
                "voicetagd_events_stamped_total",
                &[("source", e.source.as_str()), ("kind", e.kind.as_str())],
            );
        }
    }

    /// Accepts events: stamps those whose session is known, parks the others. Returns once all
    /// are durably accepted (or none are).
    pub async fn accept(&self, events: Vec<Event>) -> Result<(), AcceptError> {
        self.accept_with_state(events, Vec::new()).await
    }

    /// Whether a delivery mark (see [`Pipeline::accept_marked`]) is remembered.
    pub fn is_marked(&self, mark: &str) -> bool {
        self.marks().set.contains(mark)
    }

    /// Accepts events and durably remembers `mark` with them, atomically: a source whose peer
    /// redelivers the same message (a Vapi report, say) checks [`Pipeline::is_marked`] first
    /// and so adds nothing the second time, across restarts too. The newest [`MAX_MARKS`]
    /// marks are kept.
    pub async fn accept_marked(&self, events: Vec<Event>, mark: &str) -> Result<(), AcceptError> {
        let mut ops = vec![StateOp::Put(mark_key(mark), Vec::new())];
        {
            let m = self.marks();
            if m.order.len() >= MAX_MARKS
                && let Some(old) = m.order.front()
            {
                ops.push(StateOp::Delete(mark_key(old)));
            }
        }
        self.accept_with_state(events, ops).await?;
        let mut m = self.marks();
        if m.set.insert(mark.to_string()) {
            m.order.push_back(mark.to_string());
        }
        while m.order.len() > MAX_MARKS {
            if let Some(old) = m.order.pop_front() {
                m.set.remove(&old);
            }
        }
        Ok(())
    }

    fn marks(&self) -> MutexGuard<'_, Marks> {
        self.marks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Accepts events together with state operations of the source (e.g. a LiveKit session's
    /// last seq), written in the same durable write.
    pub async fn accept_with_state(
        &self,
        events: Vec<Event>,
        extra: Vec<StateOp>,
    ) -> Result<(), AcceptError> {
        let counts: Vec<(Source, crate::event::Kind)> =
            events.iter().map(|e| (e.source, e.kind)).collect();
        self.accept_inner(events, extra).await?;
        for (source, kind) in counts {
            self.metrics.inc(
                "voicetagd_events_received_total",
                &[("source", source.as_str()), ("kind", kind.as_str())],
            );
        }
        Ok(())
    }

    async fn accept_inner(
        &self,
        events: Vec<Event>,
        extra: Vec<StateOp>,
    ) -> Result<(), AcceptError> {
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
        let mut park_ops = extra;
        if !waiting.is_empty() {
            let parked = self.parked().count;
            if parked + waiting.len() > MAX_PARKED {
                return Err(AcceptError::TooManyParked(parked));
            }
            for e in &waiting {
                park_ops.push(StateOp::Put(parked_key(&e.id), serde_json::to_vec(e)?));
            }
        }
        // One durable write for the ready events and the waiting ones (as state, so a restart
        // still holds them). If the spool refuses, nothing of this call was accepted.
        let records = self.encode(&ready)?;
        self.spool
            .write(records.clone(), park_ops, Space::Check)
            .await?;
        self.observe(&ready, &records);
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
                p.park(sid, deadline, e);
            }
            earliest.is_none_or(|t| deadline < t)
        };
        if earlier_deadline {
            self.parked_wake.notify_one();
        }
        if !late.is_empty() {
            self.queue_released(late).await;
        }
        Ok(())
    }

    /// Starts a session (durably) and releases the events that waited for it.
    pub async fn start_session(
        &self,
        id: &str,
        start: Start,
        source: Source,
    ) -> Result<(), AcceptError> {
        self.sessions.start(id, start, source);
        let waiting: Vec<Event> = {
            let mut p = self.parked();
            let list = p.by_session.remove(id).unwrap_or_default();
            p.count -= list.len();
            list.into_iter().map(|(_, e)| e).collect()
        };
        // The released events were accepted long ago: queue them whatever happens to the
        // session write (queue_released retries until it works).
        if !waiting.is_empty() {
            let released = self.stamp_released(waiting);
            self.queue_released(released).await;
        }
        // A failed write answers 503 and the client retries the start; the registry already
        // holds it, which is harmless.
        self.spool
            .write(Vec::new(), self.session_op(id), Space::Accepted)
            .await?;
        Ok(())
    }

    /// Ends a session (its late events keep its tags for `ended_grace`), durably.
    pub async fn end_session(&self, id: &str) -> Result<Option<Session>, AcceptError> {
        let ended = self.sessions.end(id);
        if ended.is_some() {
            self.spool
                .write(Vec::new(), self.session_op(id), Space::Accepted)
                .await?;
        }
        Ok(ended)
    }

    /// Sets a session's indicator, durably.
    pub async fn set_indicator(&self, id: &str, indicator: &str) -> Result<(), AcceptError> {
        if self.sessions.set_indicator(id, indicator) {
            self.spool
                .write(Vec::new(), self.session_op(id), Space::Accepted)
                .await?;
        }
        Ok(())
    }

    /// The state operation that records a session as it is now (or its removal).
    fn session_op(&self, id: &str) -> Vec<StateOp> {
        match self.sessions.get(id) {
            Some(s) => match serde_json::to_vec(&s) {
                Ok(v) => vec![StateOp::Put(session_key(id), v)],
                Err(e) => {
                    tracing::error!(session_id = %id, error = %e, "cannot encode session state");
                    Vec::new()
                }
            },
            None => vec![StateOp::Delete(session_key(id))],
        }
    }

    /// Stamps released events with their session if it exists now, else static tags only.
    fn stamp_released(&self, events: Vec<Event>) -> Vec<Event> {
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
        out
    }

    /// Queues events that were already accepted (parked, now released): appended and their
    /// parked copies deleted in one write, never refused for space. A write error (disk) keeps
    /// the parked copies, so a restart releases them again; it is retried until it works.
    async fn queue_released(&self, released: Vec<Event>) {
        let records = match self.encode(&released) {
            Ok(r) => r,
            Err(err) => {
                tracing::error!(error = %err, "released events could not be encoded");
                return;
            }
        };
        let ops: Vec<StateOp> = released
            .iter()
            .map(|e| StateOp::Delete(parked_key(&e.id)))
            .collect();
        let mut delay = Duration::from_millis(100);
        loop {
            match self
                .spool
                .write(records.clone(), ops.clone(), Space::Accepted)
                .await
            {
                Ok(()) => break,
                Err(err) => {
                    tracing::error!(error = %err, events = released.len(), "released events could not be queued; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        self.observe(&released, &records);
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
            let released = self.stamp_released(due);
            self.queue_released(released).await;
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
            let released = self.stamp_released(all);
            self.queue_released(released).await;
        }
    }

    /// Number of parked events.
    pub fn parked_count(&self) -> usize {
        self.parked().count
    }

    /// Restores sessions and parked events from the spool's state after a restart. Parked
    /// events wait again (a full `unknown_session_wait` from now) unless their session is known.
    pub async fn restore(&self, state: &HashMap<String, Vec<u8>>) {
        let mut sessions = 0;
        let mut parked = Vec::new();
        for (k, v) in state {
            if let Some(id) = k.strip_prefix(SESSION_PREFIX) {
                match serde_json::from_slice::<Session>(v) {
                    Ok(s) => {
                        self.sessions.restore(s);
                        sessions += 1;
                    }
                    Err(e) => {
                        tracing::warn!(session_id = %id, error = %e, "ignoring unreadable saved session")
                    }
                }
            } else if let Some(mark) = k.strip_prefix(MARK_PREFIX) {
                // The state map does not keep insertion order, so after a restart the
                // restored marks are evicted in arbitrary order among themselves.
                let mut m = self.marks();
                if m.set.insert(mark.to_string()) {
                    m.order.push_back(mark.to_string());
                }
            } else if k.starts_with(PARKED_PREFIX) {
                match serde_json::from_slice::<Event>(v) {
                    Ok(e) => parked.push(e),
                    Err(err) => {
                        tracing::warn!(key = %k, error = %err, "ignoring unreadable saved event")
                    }
                }
            }
        }
        // Keep arrival order: ids are UUIDv7, ordered by creation time.
        parked.sort_by(|a, b| a.id.cmp(&b.id));
        let n = parked.len();
        let mut late = Vec::new();
        {
            let mut p = self.parked();
            let deadline = Instant::now() + self.wait;
            for e in parked {
                let sid = e.session_id.clone().unwrap_or_default();
                if self.sessions.contains(&sid) {
                    late.push(e);
                } else {
                    p.park(sid, deadline, e);
                }
            }
        }
        self.parked_wake.notify_one();
        if !late.is_empty() {
            let released = self.stamp_released(late);
            self.queue_released(released).await;
        }
        tracing::info!(sessions, parked = n, "restored session state");
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

    /// Runs session expiry until `shutdown` fires, persisting what it changes.
    pub async fn run_expiry(self: Arc<Self>, mut shutdown: tokio::sync::broadcast::Receiver<()>) {
        loop {
            let (next, changes) = self.sessions.purge_expired(Instant::now());
            if !changes.is_empty() {
                let ops: Vec<StateOp> = changes
                    .iter()
                    .filter_map(|c| match c {
                        Change::Ended(s) => serde_json::to_vec(s)
                            .ok()
                            .map(|v| StateOp::Put(session_key(&s.session_id), v)),
                        Change::Removed(id) => Some(StateOp::Delete(session_key(id))),
                    })
                    .collect();
                if let Err(e) = self.spool.write(Vec::new(), ops, Space::Accepted).await {
                    // Losing this only means a restart brings back a session that had expired.
                    tracing::warn!(error = %e, "cannot persist session expiry");
                }
            }
            let sleep = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                // The earliest deadline passed.
                _ = sleep => {}
                // An earlier deadline was scheduled than the one we sleep for.
                _ = self.sessions.wake().notified() => {}
                // The daemon is stopping.
                _ = shutdown.recv() => return,
            }
        }
    }
}

const SESSION_PREFIX: &str = "s/";
const PARKED_PREFIX: &str = "p/";
const MARK_PREFIX: &str = "d/";

/// Delivery marks remembered (about 100 bytes each in memory and in the state log).
pub const MAX_MARKS: usize = 100_000;

/// Remembered delivery marks, oldest first.
#[derive(Default)]
struct Marks {
    set: std::collections::HashSet<String>,
    order: std::collections::VecDeque<String>,
}

fn mark_key(mark: &str) -> String {
    format!("{MARK_PREFIX}{mark}")
}

fn session_key(id: &str) -> String {
    format!("{SESSION_PREFIX}{id}")
}

fn parked_key(event_id: &str) -> String {
    format!("{PARKED_PREFIX}{event_id}")
}

impl Parked {
    fn park(&mut self, sid: String, deadline: Instant, e: Event) {
        let n = self.next;
        self.next += 1;
        self.deadlines.insert((deadline, n), sid.clone());
        self.by_session.entry(sid).or_default().push((deadline, e));
        self.count += 1;
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
        // The directory is leaked on purpose: the spool's writer thread outlives the test body.
        let dir = tempfile::tempdir().unwrap().keep();
        let spool = Arc::new(
            Spool::open(&dir, 1 << 20, crate::config::FsyncPolicy::Never)
                .unwrap()
                .0,
        );
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
            spool.commit(&b.ack);
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
        .await
        .unwrap();
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
            .await
            .unwrap();
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

    #[tokio::test]
    async fn marks_are_remembered_durably() {
        let dir = tempfile::tempdir().unwrap();
        let open = || {
            let reg = Arc::new(Registry::new(
                Duration::from_secs(60),
                Duration::from_secs(60),
            ));
            let spool =
                Spool::open(dir.path(), 1 << 20, crate::config::FsyncPolicy::Never).unwrap();
            (
                Pipeline::new(
                    reg,
                    Arc::new(spool.0),
                    Arc::new(Metrics::new()),
                    Tags::new(),
                    Duration::from_secs(1),
                ),
                spool.1,
            )
        };
        {
            let (p, _) = open();
            assert!(!p.is_marked("call-1/eocr"));
            p.accept_marked(vec![ev_no_session()], "call-1/eocr")
                .await
                .unwrap();
            assert!(p.is_marked("call-1/eocr"));
        }
        let (p, rec) = open();
        assert!(!p.is_marked("call-1/eocr"));
        p.restore(&rec.state).await;
        assert!(p.is_marked("call-1/eocr"));
    }

    fn ev_no_session() -> Event {
        Event::new(Kind::Usage, Source::Vapi, json!({}))
    }
}
