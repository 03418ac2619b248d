//! The session registry: session id -> agent, customer, indicator, tags, timestamps.
//!
//! A `DashMap` holds the sessions, so ingest handlers on different cores stamp events of
//! different sessions without contending on one lock; no shard guard is ever held across an
//! `.await` (every method here is synchronous and returns owned data).
//!
//! Lifetimes: an active session with no activity for `idle_ttl` is ended; an ended session is
//! kept for `ended_grace` so late events still get its tags, then forgotten. Expiry works like
//! mini-redis's `purge_expired_keys`: a `BTreeSet<(deadline, id)>` ordered by deadline and one
//! background task that sleeps until the earliest one. Touching a session on the hot path only
//! updates its `last_seen`; the expiry task re-checks a popped entry and re-queues it if the
//! session was seen since, so nothing ever scans the map.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::event::{Source, Timestamp};
use crate::tags::Tags;

/// Whether a session is still running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Started and not ended.
    Active,
    /// Ended (explicitly or by idle TTL), kept for `ended_grace`.
    Ended,
}

/// What a session start says.
#[derive(Debug, Clone, Default)]
pub struct Start {
    /// The agent.
    pub agent_id: Option<String>,
    /// The customer.
    pub customer_id: Option<String>,
    /// The billing indicator.
    pub indicator: Option<String>,
    /// Session tags, already normalized.
    pub tags: Tags,
}

/// A session as `GET /v1/sessions` shows it (CONTRACT §7), and as the spool persists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Session {
    /// The id.
    pub session_id: String,
    /// The agent.
    pub agent_id: Option<String>,
    /// The customer.
    pub customer_id: Option<String>,
    /// The billing indicator.
    pub indicator: Option<String>,
    /// Session tags.
    pub meta_tags: Arc<Tags>,
    /// Which source started it.
    pub source: Source,
    /// Active or ended.
    pub state: State,
    /// When it started.
    pub started_at: Timestamp,
    /// Last start, event or touch.
    pub last_seen_at: Timestamp,
    /// When it ended.
    pub ended_at: Option<Timestamp>,
    /// Events stamped with it.
    pub events: u64,
    #[serde(skip, default = "Instant::now")]
    last_seen: Instant,
    #[serde(skip)]
    ended: Option<Instant>,
}

/// What stamping needs of a session.
#[derive(Debug, Clone)]
pub struct Stamp {
    /// The agent.
    pub agent_id: Option<String>,
    /// The customer.
    pub customer_id: Option<String>,
    /// The billing indicator.
    pub indicator: Option<String>,
    /// Session tags.
    pub tags: Arc<Tags>,
}

/// The concurrent session map.
pub struct Registry {
    map: DashMap<String, Session>,
    /// Deadlines ordered by time. A std `Mutex`: held only for a few map operations, never
    /// across an `.await`, so an async mutex would only add overhead (as in mini-redis).
    expirations: Mutex<BTreeSet<(Instant, String)>>,
    /// Wakes the expiry task when an earlier deadline is inserted.
    wake: Notify,
    idle_ttl: Duration,
    ended_grace: Duration,
}

impl Registry {
    /// An empty registry.
    pub fn new(idle_ttl: Duration, ended_grace: Duration) -> Self {
        Registry {
            map: DashMap::new(),
            expirations: Mutex::new(BTreeSet::new()),
            wake: Notify::new(),
            idle_ttl,
            ended_grace,
        }
    }

    fn expirations(&self) -> MutexGuard<'_, BTreeSet<(Instant, String)>> {
        // A poisoned lock only means another thread panicked mid-insert; the set is still a
        // valid set of deadlines, so keep going rather than take the daemon down.
        self.expirations.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn schedule(&self, at: Instant, id: &str) {
        let earliest = {
            let mut exp = self.expirations();
            exp.insert((at, id.to_string()));
            exp.first().map(|(t, _)| *t) == Some(at)
        };
        if earliest {
            self.wake.notify_one();
        }
    }

    /// Starts (or restarts, updating its fields) a session. Returns true if it is new.
    pub fn start(&self, id: &str, start: Start, source: Source) -> bool {
        let now = Instant::now();
        let wall = Timestamp::now();
        let mut is_new = false;
        self.map
            .entry(id.to_string())
            .and_modify(|s| {
                if start.agent_id.is_some() {
                    s.agent_id = start.agent_id.clone();
                }
                if start.customer_id.is_some() {
                    s.customer_id = start.customer_id.clone();
                }
                if start.indicator.is_some() {
                    s.indicator = start.indicator.clone();
                }
                s.meta_tags = Arc::new(start.tags.clone());
                s.state = State::Active;
                s.ended_at = None;
                s.ended = None;
                s.last_seen = now;
                s.last_seen_at = wall;
            })
            .or_insert_with(|| {
                is_new = true;
                Session {
                    session_id: id.to_string(),
                    agent_id: start.agent_id.clone(),
                    customer_id: start.customer_id.clone(),
                    indicator: start.indicator.clone(),
                    meta_tags: Arc::new(start.tags.clone()),
                    source,
                    state: State::Active,
                    started_at: wall,
                    last_seen_at: wall,
                    ended_at: None,
                    events: 0,
                    last_seen: now,
                    ended: None,
                }
            });
        self.schedule(now + self.idle_ttl, id);
        is_new
    }

    /// Ends a session; returns it as it was at its end, or `None` if unknown or already ended.
    pub fn end(&self, id: &str) -> Option<Session> {
        let now = Instant::now();
        let ended = {
            let mut s = self.map.get_mut(id)?;
            if s.state == State::Ended {
                return None;
            }
            s.state = State::Ended;
            s.ended_at = Some(Timestamp::now());
            s.ended = Some(now);
            s.clone()
        };
        self.schedule(now + self.ended_grace, id);
        Some(ended)
    }

    /// The stamp for an event of this session (active, or ended within its grace), counting
    /// the event and refreshing `last_seen`.
    pub fn stamp(&self, id: &str) -> Option<Stamp> {
        let mut s = self.map.get_mut(id)?;
        s.events += 1;
        if s.state == State::Active {
            s.last_seen = Instant::now();
            s.last_seen_at = Timestamp::now();
        }
        Some(Stamp {
            agent_id: s.agent_id.clone(),
            customer_id: s.customer_id.clone(),
            indicator: s.indicator.clone(),
            tags: Arc::clone(&s.meta_tags),
        })
    }

    /// Sets the session's indicator (Paygent's set-voice-indicator names it).
    /// Returns whether the session exists (and so changed).
    pub fn set_indicator(&self, id: &str, indicator: &str) -> bool {
        match self.map.get_mut(id) {
            Some(mut s) => {
                s.indicator = Some(indicator.to_string());
                true
            }
            None => false,
        }
    }

    /// One session.
    pub fn get(&self, id: &str) -> Option<Session> {
        self.map.get(id).map(|s| s.clone())
    }

    /// Whether a session is known (active or within its grace).
    pub fn contains(&self, id: &str) -> bool {
        self.map.contains_key(id)
    }

    /// All active sessions (for the operator API; scans the map, never on the hot path).
    pub fn active(&self) -> Vec<Session> {
        let mut v: Vec<Session> = self
            .map
            .iter()
            .filter(|s| s.state == State::Active)
            .map(|s| s.clone())
            .collect();
        v.sort_by(|a, b| a.session_id.cmp(&b.session_id));
        v
    }

    /// Number of active sessions.
    pub fn active_count(&self) -> usize {
        self.map.iter().filter(|s| s.state == State::Active).count()
    }

    /// Applies every deadline that has passed; returns the earliest one still pending and
    /// what changed (so the caller can persist it).
    pub fn purge_expired(&self, now: Instant) -> (Option<Instant>, Vec<Change>) {
        let mut changes = Vec::new();
        loop {
            let (at, id) = {
                let mut exp = self.expirations();
                match exp.first() {
                    Some((at, _)) if *at <= now => {}
                    Some((at, _)) => return (Some(*at), changes),
                    None => return (None, changes),
                }
                match exp.pop_first() {
                    Some(e) => e,
                    None => return (None, changes),
                }
            };
            let _ = at;
            let mut requeue = None;
            let mut remove = false;
            if let Some(mut s) = self.map.get_mut(&id) {
                match (s.state, s.ended) {
                    (State::Active, _) => {
                        let due = s.last_seen + self.idle_ttl;
                        if due <= now {
                            tracing::info!(session_id = %id, "session ended after idle_ttl without activity");
                            s.state = State::Ended;
                            s.ended_at = Some(Timestamp::now());
                            s.ended = Some(now);
                            requeue = Some(now + self.ended_grace);
                            changes.push(Change::Ended(s.clone()));
                        } else {
                            requeue = Some(due);
                        }
                    }
                    (State::Ended, Some(ended)) => {
                        let due = ended + self.ended_grace;
                        if due <= now {
                            remove = true;
                        } else {
                            requeue = Some(due);
                        }
                    }
                    (State::Ended, None) => remove = true,
                }
            }
            if remove {
                // Re-check under the shard lock: the session may have been restarted between
                // the read above and now.
                let removed = self.map.remove_if(&id, |_, s| {
                    s.state == State::Ended && s.ended.is_some_and(|e| e + self.ended_grace <= now)
                });
                if removed.is_some() {
                    changes.push(Change::Removed(id.clone()));
                }
            }
            if let Some(at) = requeue {
                self.expirations().insert((at, id));
            }
        }
    }

    /// Notified when a deadline earlier than all others is scheduled.
    pub fn wake(&self) -> &Notify {
        &self.wake
    }

    /// Puts back a session recovered from the spool after a restart. Its idle and grace
    /// timers start again from now.
    pub fn restore(&self, mut s: Session) {
        let now = Instant::now();
        s.last_seen = now;
        let at = match s.state {
            State::Active => now + self.idle_ttl,
            State::Ended => {
                s.ended = Some(now);
                now + self.ended_grace
            }
        };
        let id = s.session_id.clone();
        self.map.insert(id.clone(), s);
        self.schedule(at, &id);
    }
}

/// A change made by expiry.
#[derive(Debug, Clone)]
pub enum Change {
    /// The session ended after `idle_ttl` without activity.
    Ended(Session),
    /// The session was forgotten after `ended_grace`.
    Removed(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(tags: &[(&str, &str)]) -> Start {
        Start {
            agent_id: Some("a".into()),
            customer_id: Some("c".into()),
            indicator: None,
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn idle_session_ends_then_is_forgotten_after_grace() {
        let r = Registry::new(Duration::from_secs(10), Duration::from_secs(5));
        assert!(r.start("s", start(&[("env", "x")]), Source::Api));
        let t0 = Instant::now();
        // Activity at t0+8 pushes the idle deadline to t0+18.
        tokio::time::advance(Duration::from_secs(8)).await;
        assert!(r.stamp("s").is_some());
        r.purge_expired(t0 + Duration::from_secs(11));
        assert_eq!(r.get("s").unwrap().state, State::Active);
        tokio::time::advance(Duration::from_secs(11)).await;
        r.purge_expired(Instant::now());
        let s = r.get("s").unwrap();
        assert_eq!(s.state, State::Ended);
        // Late events within the grace still get the session's tags.
        assert_eq!(r.stamp("s").unwrap().tags.get("env").unwrap(), "x");
        tokio::time::advance(Duration::from_secs(6)).await;
        r.purge_expired(Instant::now());
        assert!(r.get("s").is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn restart_within_grace_is_not_removed() {
        let r = Registry::new(Duration::from_secs(100), Duration::from_secs(5));
        r.start("s", start(&[]), Source::Api);
        r.end("s");
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(!r.start("s", start(&[("k", "v")]), Source::Api));
        tokio::time::advance(Duration::from_secs(3)).await;
        r.purge_expired(Instant::now());
        let s = r.get("s").unwrap();
        assert_eq!(s.state, State::Active);
        assert_eq!(s.meta_tags.get("k").unwrap(), "v");
    }

    #[test]
    fn end_twice_returns_none() {
        let r = Registry::new(Duration::from_secs(100), Duration::from_secs(5));
        r.start("s", start(&[]), Source::Api);
        assert!(r.end("s").is_some());
        assert!(r.end("s").is_none());
        assert!(r.end("unknown").is_none());
    }

    #[test]
    fn stamp_counts_events() {
        let r = Registry::new(Duration::from_secs(100), Duration::from_secs(5));
        r.start("s", start(&[]), Source::Api);
        r.stamp("s");
        r.stamp("s");
        assert_eq!(r.get("s").unwrap().events, 2);
        assert_eq!(r.active_count(), 1);
    }
}
