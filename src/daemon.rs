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
use crate::event::Timestamp;
use crate::ingest::livekit::Livekit;
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use crate::reload::Live;
use crate::server::{AppState, Phase, Readiness, router};
use crate::sessions::Registry;
use crate::spool::{Space, StateOp};
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
    set_log_filter: Option<LogFilterHook>,
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
    let token = Arc::new(Live::new(loaded.secrets.server_token.clone()));
    let vapi = Arc::new(Live::new(vapi));
    let state = AppState {
        pipeline: Arc::clone(&pipeline),
        readiness: Arc::clone(&readiness),
        token: Arc::clone(&token),
        vapi: Arc::clone(&vapi),
    };
    let app = router(state, Arc::clone(&livekit), max_body);
    readiness.set(Phase::Ready);
    tracing::info!(listen = %local, upstream = %cfg.upstream.url, spool = %cfg.spool.dir.display(),
        "voicetagd is ready");
    notify(&[sd_notify::NotifyState::Ready]);
    let live = Reloadables {
        pipeline: Arc::clone(&pipeline),
        upstream: Arc::clone(&upstream),
        livekit,
        token,
        vapi,
        set_log_filter,
    };
    let status = tokio::spawn(run_status(
        Arc::clone(&pipeline),
        Arc::clone(&upstream),
        shutdown_tx.subscribe(),
    ));
    let reloader = tokio::spawn(run_reload(loaded.clone(), live, shutdown_tx.subscribe()));

    let ready = Arc::clone(&readiness);
    let graceful = async move {
        stop.await;
        ready.set(Phase::Draining);
        notify(&[
            sd_notify::NotifyState::Stopping,
            sd_notify::NotifyState::Status("draining the queue"),
        ]);
        tracing::info!("shutdown requested; no longer accepting, draining the queue");
    };
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(graceful)
        .await;
    let deadline = tokio::time::Instant::now() + cfg.server.shutdown_timeout.get();
    let _ = shutdown_tx.send(());
    let _ = expiry.await;
    let _ = parked.await;
    let _ = lk_sweep.await;
    let _ = status.await;
    let _ = reloader.await;
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

/// Applies a new log filter (`[log] filter`) on reload; returns an error text if invalid.
pub type LogFilterHook = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Sends a notification to systemd when `NOTIFY_SOCKET` is set (`Type=notify`); a no-op
/// otherwise.
fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// How often STATUS= is refreshed when systemd has no watchdog for us.
pub const STATUS_EVERY: Duration = Duration::from_secs(5);

/// Keeps systemd informed: `STATUS=` with queue depth and upstream state, and `WATCHDOG=1`
/// only after a round trip through the spool writer proves the pipeline still moves (a wedged
/// writer thread then gets the daemon restarted by systemd instead of silently accepting
/// nothing).
async fn run_status(
    pipeline: Arc<Pipeline>,
    upstream: Arc<Upstream>,
    mut shutdown: broadcast::Receiver<()>,
) {
    let usec = watchdog_usec();
    let watchdog = usec.is_some();
    let usec = usec.unwrap_or(0);
    let every = if watchdog {
        Duration::from_micros(usec / 2).max(Duration::from_millis(100))
    } else {
        STATUS_EVERY
    };
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.recv() => return,
        }
        let depth = pipeline.spool().depth();
        let line = format!(
            "queue {} events ({} bytes), {} active sessions, {}",
            depth.events,
            depth.bytes,
            pipeline.sessions().active_count(),
            upstream.status()
        );
        if watchdog {
            let probe = pipeline.spool().write(
                Vec::new(),
                vec![StateOp::Put(
                    "w/heartbeat".into(),
                    Timestamp::now().to_string().into_bytes(),
                )],
                Space::Accepted,
            );
            match tokio::time::timeout(every, probe).await {
                Ok(Ok(())) => notify(&[
                    sd_notify::NotifyState::Watchdog,
                    sd_notify::NotifyState::Status(&line),
                ]),
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "watchdog probe failed: the spool cannot write");
                    notify(&[sd_notify::NotifyState::Status(&line)]);
                }
                Err(_) => tracing::error!("watchdog probe timed out: the spool writer is stuck"),
            }
        } else {
            notify(&[sd_notify::NotifyState::Status(&line)]);
        }
    }
}

/// The watchdog interval systemd asks for, as `sd_watchdog_enabled(3)` reads it:
/// `WATCHDOG_USEC`, for this process if `WATCHDOG_PID` names it or is unset.
fn watchdog_usec() -> Option<u64> {
    let usec: u64 = std::env::var("WATCHDOG_USEC")
        .ok()?
        .parse()
        .ok()
        .filter(|u| *u > 0)?;
    match std::env::var("WATCHDOG_PID") {
        Ok(pid) if pid.parse::<u32>().ok() != Some(std::process::id()) => None,
        _ => Some(usec),
    }
}

/// What a reload can change, and where.
struct Reloadables {
    pipeline: Arc<Pipeline>,
    upstream: Arc<Upstream>,
    livekit: Arc<Livekit>,
    token: Arc<Live<Option<String>>>,
    vapi: Arc<Live<crate::ingest::vapi::Settings>>,
    set_log_filter: Option<LogFilterHook>,
}

/// Reloads the config file on SIGHUP: a file with errors changes nothing.
async fn run_reload(mut current: Loaded, live: Reloadables, mut shutdown: broadcast::Receiver<()>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP; reload needs a restart");
            return;
        };
        loop {
            tokio::select! {
                _ = hup.recv() => {}
                _ = shutdown.recv() => return,
            }
            notify(&[sd_notify::NotifyState::Reloading]);
            let path = current.path.clone();
            match crate::config::load(&path) {
                Err(e) => {
                    live.pipeline
                        .metrics()
                        .inc("voicetagd_reloads_total", &[("result", "error")]);
                    tracing::error!(problems = %e, "config reload failed; keeping the running config");
                }
                Ok(new) => match apply(&current, &new, &live) {
                    Ok(()) => {
                        live.pipeline
                            .metrics()
                            .inc("voicetagd_reloads_total", &[("result", "ok")]);
                        current = new;
                    }
                    Err(why) => {
                        live.pipeline
                            .metrics()
                            .inc("voicetagd_reloads_total", &[("result", "error")]);
                        tracing::error!(error = %why, "config reload failed; keeping the running config");
                    }
                },
            }
            notify(&[sd_notify::NotifyState::Ready]);
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (current, live, shutdown.recv().await);
    }
}

/// Applies what can change live; logs what needs a restart.
fn apply(old: &Loaded, new: &Loaded, live: &Reloadables) -> Result<(), String> {
    // Build everything that can fail first, so a failure changes nothing.
    let vapi = crate::ingest::vapi::Settings::from_loaded(new)?;
    if let (Some(hook), Some(filter)) = (&live.set_log_filter, &new.config.log.filter)
        && std::env::var_os("VOICETAGD_LOG").is_none()
    {
        hook(filter)?;
    }
    live.pipeline.set_static_tags(new.static_tags.clone());
    live.token.set(new.secrets.server_token.clone());
    live.vapi.set(vapi);
    live.livekit.reload(
        new.config.livekit.api_key.clone(),
        new.secrets.livekit_api_secret.clone(),
    );
    live.upstream.reload(Settings::from_config(
        &new.config.upstream,
        new.secrets.upstream_api_key.clone(),
        &old.config.spool.dir,
    ));
    let restart = crate::reload::needs_restart(&old.config, &new.config);
    if restart.is_empty() {
        tracing::info!(path = %new.path.display(), "config reloaded");
    } else {
        tracing::warn!(path = %new.path.display(), keys = %restart.join(", "),
            "config reloaded; these changes need a restart to take effect");
    }
    Ok(())
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
