//! Assembly and lifecycle of the running daemon.
//!
//! Start: build the components, bind the listener, flip readiness. Stop (SIGTERM/SIGINT):
//! readiness -> draining, the listener stops accepting and in-flight requests finish, events
//! still waiting for their sessions are stamped with what is known, the spool closes, and
//! delivery drains it within `server.shutdown_timeout`; what it could not deliver by then is
//! logged. Background tasks stop through one broadcast channel (as in mini-redis).

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::broadcast;

use crate::config::Loaded;
use crate::ingest::livekit::Livekit;
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use crate::server::{AppState, Phase, Readiness, router};
use crate::sessions::Registry;
use crate::spool::{Spool, SpoolError};
use crate::upstream::{Settings, Upstream};

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The spool directory could not be created.
    #[error("cannot create spool directory {dir}: {source}")]
    SpoolDir {
        /// The directory.
        dir: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The HTTP client could not be built.
    #[error("cannot build the upstream HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    /// The Vapi webhook settings could not be built.
    #[error("{0}")]
    Vapi(String),
    /// The spool could not be opened.
    #[error("cannot open the spool: {0}")]
    Spool(SpoolError),
    /// The server failed while running.
    #[error("server error: {0}")]
    Serve(std::io::Error),
}

/// Runs the daemon until `stop` resolves (normally a signal), then drains and returns.
pub async fn run(
    loaded: Loaded,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    let cfg = &loaded.config;
    let readiness = Arc::new(Readiness::default());
    readiness.set(Phase::Starting);
    std::fs::create_dir_all(&cfg.spool.dir).map_err(|source| DaemonError::SpoolDir {
        dir: cfg.spool.dir.clone(),
        source,
    })?;
    let metrics = Arc::new(Metrics::new());
    let sessions = Arc::new(Registry::new(
        cfg.sessions.idle_ttl.get(),
        cfg.sessions.ended_grace.get(),
    ));
    let (dir, max, fsync) = (
        cfg.spool.dir.clone(),
        cfg.spool.max_bytes.get(),
        cfg.spool.fsync,
    );
    let started = std::time::Instant::now();
    let (spool, recovery) = tokio::task::spawn_blocking(move || Spool::open(&dir, max, fsync))
        .await
        .map_err(|e| DaemonError::Spool(SpoolError::Io(e.to_string())))?
        .map_err(DaemonError::Spool)?;
    tracing::info!(
        events = recovery.events,
        bytes = recovery.bytes,
        segments = recovery.segments,
        corrupt = recovery.corrupt,
        torn_bytes = recovery.torn_bytes,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "spool recovered"
    );
    let spool = Arc::new(spool);
    let pipeline = Arc::new(Pipeline::new(
        Arc::clone(&sessions),
        Arc::clone(&spool),
        Arc::clone(&metrics),
        loaded.static_tags.clone(),
        cfg.sessions.unknown_session_wait.get(),
    ));
    let settings = Settings::from_config(
        &cfg.upstream,
        loaded.secrets.upstream_api_key.clone(),
        &cfg.spool.dir,
    );
    let upstream = Arc::new(Upstream::new(
        settings,
        Arc::clone(&spool),
        Arc::clone(&metrics),
    )?);

    // Built before anything starts, so a bad [vapi] section stops the daemon at once.
    let vapi = crate::ingest::vapi::Settings::from_loaded(&loaded).map_err(DaemonError::Vapi)?;

    let (shutdown_tx, _) = broadcast::channel::<()>(1);
    if recovery.corrupt > 0 {
        metrics.add(
            "voicetagd_spool_corrupt_records_total",
            &[],
            recovery.corrupt,
        );
    }
    pipeline.restore(&recovery.state).await;
    let max_body = usize::try_from(cfg.server.max_body_bytes.get()).unwrap_or(usize::MAX);
    let livekit = Arc::new(Livekit::new(
        Arc::clone(&pipeline),
        &cfg.livekit,
        loaded.secrets.livekit_api_secret.clone(),
        max_body,
    ));
    livekit.restore(&recovery.state);
    let lk_sweep = tokio::spawn(Arc::clone(&livekit).run_sweep(shutdown_tx.subscribe()));
    let expiry = tokio::spawn(Arc::clone(&pipeline).run_expiry(shutdown_tx.subscribe()));
    let parked = tokio::spawn(Arc::clone(&pipeline).run_parked(shutdown_tx.subscribe()));
    let delivery = tokio::spawn(Arc::clone(&upstream).run());

    let listener = TcpListener::bind(cfg.server.listen)
        .await
        .map_err(|source| DaemonError::Bind {
            addr: cfg.server.listen,
            source,
        })?;
    let local = listener.local_addr().map_err(DaemonError::Serve)?;
    let state = AppState {
        pipeline: Arc::clone(&pipeline),
        readiness: Arc::clone(&readiness),
        token: loaded.secrets.server_token.as_deref().map(Arc::from),
        vapi: Arc::new(vapi),
    };
    let app = router(state, livekit, max_body);
    readiness.set(Phase::Ready);
    tracing::info!(listen = %local, upstream = %cfg.upstream.url, spool = %cfg.spool.dir.display(),
        "voicetagd is ready");

    let drain_started = Arc::new(tokio::sync::Notify::new());
    let notify = Arc::clone(&drain_started);
    let ready = Arc::clone(&readiness);
    let graceful = async move {
        stop.await;
        ready.set(Phase::Draining);
        tracing::info!("shutdown requested; no longer accepting, draining the queue");
        notify.notify_one();
    };
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(graceful)
        .await;
    let deadline = tokio::time::Instant::now() + cfg.server.shutdown_timeout.get();
    let _ = shutdown_tx.send(());
    let _ = expiry.await;
    let _ = parked.await;
    let _ = lk_sweep.await;
    pipeline.release_all().await;
    spool.close();
    let abort = delivery.abort_handle();
    match tokio::time::timeout_at(deadline, delivery).await {
        Ok(_) => tracing::info!("queue drained; exiting"),
        Err(_) => {
            abort.abort();
            let left = spool.depth();
            tracing::error!(
                events = left.events,
                bytes = left.bytes,
                timeout_ms = cfg.server.shutdown_timeout.get().as_millis() as u64,
                "shutdown_timeout reached before the queue drained; the rest stays in the spool for the next start"
            );
        }
    }
    spool.shutdown();
    served.map_err(DaemonError::Serve)
}

/// Resolves on SIGTERM or SIGINT.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        match (term, int) {
            (Ok(mut t), Ok(mut i)) => {
                tokio::select! {
                    _ = t.recv() => {}
                    _ = i.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// A small delay used by tests and callers that need the clock to move; kept here so the
/// lifecycle's timing knobs live in one module.
pub const POLL: Duration = Duration::from_millis(20);
