//! Live configuration: values that SIGHUP can replace while the daemon runs.
//!
//! [`Live`] holds an `Arc<T>` behind a std `RwLock`: readers clone the `Arc` (the lock is held
//! for that clone only, never across an `.await`), a reload swaps it. Each component keeps
//! reading its own `Live` value, so a reload is one pointer swap per component.
//!
//! What a reload changes: static tags, every secret (server token, upstream API key, Vapi and
//! LiveKit secrets), Vapi settings, upstream batching/retry/compression/timeout/url, and the
//! log filter. What needs a restart (logged when it changed): `server.listen`,
//! `server.max_body_bytes`, `spool.*`, `sessions.*`, `upstream.concurrency`,
//! `livekit.usage_source`, `livekit.forward_telemetry`, `log.format`.

use std::sync::{Arc, RwLock};

/// A value that a reload can replace.
#[derive(Debug, Default)]
pub struct Live<T>(RwLock<Arc<T>>);

impl<T> Live<T> {
    /// Holds `v`.
    pub fn new(v: T) -> Self {
        Live(RwLock::new(Arc::new(v)))
    }

    /// The current value.
    pub fn get(&self) -> Arc<T> {
        Arc::clone(&self.0.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Replaces the value.
    pub fn set(&self, v: T) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(v);
    }
}

/// Keys whose change a reload cannot apply, given the old and new config.
pub fn needs_restart(
    old: &crate::config::Config,
    new: &crate::config::Config,
) -> Vec<&'static str> {
    let mut v = Vec::new();
    let mut check = |changed: bool, key: &'static str| {
        if changed {
            v.push(key);
        }
    };
    check(old.server.listen != new.server.listen, "server.listen");
    check(
        old.server.max_body_bytes != new.server.max_body_bytes,
        "server.max_body_bytes",
    );
    check(old.spool.dir != new.spool.dir, "spool.dir");
    check(
        old.spool.max_bytes != new.spool.max_bytes,
        "spool.max_bytes",
    );
    check(old.spool.fsync != new.spool.fsync, "spool.fsync");
    check(
        old.sessions.idle_ttl != new.sessions.idle_ttl,
        "sessions.idle_ttl",
    );
    check(
        old.sessions.ended_grace != new.sessions.ended_grace,
        "sessions.ended_grace",
    );
    check(
        old.sessions.unknown_session_wait != new.sessions.unknown_session_wait,
        "sessions.unknown_session_wait",
    );
    check(
        old.upstream.concurrency != new.upstream.concurrency,
        "upstream.concurrency",
    );
    check(
        old.livekit.usage_source != new.livekit.usage_source,
        "livekit.usage_source",
    );
    check(
        old.livekit.forward_telemetry != new.livekit.forward_telemetry,
        "livekit.forward_telemetry",
    );
    check(old.log.format != new.log.format, "log.format");
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_values_swap() {
        let l = Live::new(1);
        let before = l.get();
        l.set(2);
        assert_eq!((*before, *l.get()), (1, 2));
    }

    #[test]
    fn restart_keys_are_named() {
        let p = std::path::Path::new("t.toml");
        let a = crate::config::load_str(p, "[upstream]\nurl = \"file:///x\"\n", &|_| None).unwrap();
        let b = crate::config::load_str(
            p,
            "[server]\nlisten = \"127.0.0.1:9\"\n[upstream]\nurl = \"file:///x\"\nbatch_max_events = 3\n",
            &|_| None,
        )
        .unwrap();
        assert_eq!(needs_restart(&a.config, &b.config), vec!["server.listen"]);
    }
}
