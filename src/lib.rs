//! voicetagd: a sidecar daemon that stamps voice-agent usage events with their session's meta
//! tags and delivers them upstream, at least once.
//!
//! The data flows one way through these modules:
//!
//! * [`ingest`] — sources turn wire formats into [`event::Event`]s:
//!   [`ingest::paygent`] (the Paygent SDK's HTTP API) and [`ingest::vapi`] (Vapi server
//!   messages: authenticated webhooks whose end-of-call reports become usage events);
//! * [`pipeline`] — stamps each event with its session ([`sessions`]) and the [`tags`] rules,
//!   holding events of not-yet-started sessions, then appends them to the [`spool`];
//! * [`spool`] — the bounded queue between ingest and delivery;
//! * [`upstream`] — cuts batches, compresses, delivers with retries, dead-letters.
//!
//! Around them: [`config`] (the TOML file), [`filter`] (tag filter expressions), [`metrics`],
//! [`server`] (the HTTP listener), [`daemon`] (assembly and shutdown) and [`cli`].
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cli;
pub mod config;
pub mod daemon;
pub mod event;
pub mod filter;
pub mod ingest;
pub mod metrics;
pub mod observe;
pub mod ops;
pub mod pipeline;
pub mod reload;
pub mod server;
pub mod sessions;
pub mod spool;
pub mod tags;
pub mod upstream;
