//! The command line (CONTRACT §1): `run`, `check-config`, `tail`, `usage`, `--version`, `--help`.
//! Exit codes: 0 ok, 1 runtime or config error, 64 usage error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{self, LogFormat};

/// Exit code for a usage error (sysexits EX_USAGE).
pub const EXIT_USAGE: u8 = 64;

/// Stamps voice-agent usage events with session meta tags and delivers them upstream.
#[derive(Debug, Parser)]
#[command(name = "voicetagd", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Run {
        /// Config file [default: $VOICETAGD_CONFIG, else /etc/voicetagd/voicetagd.toml].
        #[arg(long, short = 'c')]
        config: Option<PathBuf>,
    },
    /// Check a config file: print a one-line summary, or every problem as PATH:LINE:COL: message.
    CheckConfig {
        /// Config file [default: $VOICETAGD_CONFIG, else /etc/voicetagd/voicetagd.toml].
        #[arg(long, short = 'c')]
        config: Option<PathBuf>,
    },
    /// Print accepted, stamped events as NDJSON while they flow (only those matching the filters).
    Tail {
        /// Where the daemon is.
        #[command(flatten)]
        remote: Remote,
        /// Tag filter, e.g. "env:staging, region" (repeat to AND several).
        #[arg(long, short = 'f')]
        filter: Vec<String>,
    },
    /// Print usage totals since the daemon started, per agent or customer.
    Usage {
        /// Where the daemon is.
        #[command(flatten)]
        remote: Remote,
        /// Tag filter, e.g. "env:staging" (repeat to AND several).
        #[arg(long, short = 'f')]
        filter: Vec<String>,
        /// Group by agent or customer.
        #[arg(long, default_value = "agent", value_parser = ["agent", "customer"])]
        group_by: String,
    },
}

/// Where the daemon is, for the client subcommands.
#[derive(Debug, clap::Args)]
pub struct Remote {
    /// The daemon's base URL.
    #[arg(long, default_value = "http://127.0.0.1:7878")]
    url: String,
    /// The `[server] token`, if the daemon requires one.
    #[arg(long, env = "VOICETAGD_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

fn config_path(given: Option<PathBuf>) -> PathBuf {
    given
        .or_else(|| std::env::var_os("VOICETAGD_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(config::DEFAULT_PATH))
}

/// Parses the command line, runs it, and returns the exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(EXIT_USAGE),
            };
        }
    };
    match cli.command {
        Command::CheckConfig { config } => {
            let path = config_path(config);
            match config::load(&path) {
                Ok(l) => {
                    println!("{}", l.summary());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Tail { remote, filter } => client(tail(remote, filter)),
        Command::Usage {
            remote,
            filter,
            group_by,
        } => client(usage(remote, filter, group_by)),
        Command::Run { config } => {
            let path = config_path(config);
            let loaded = match config::load(&path) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(1);
                }
            };
            let hook = init_logging(
                loaded.config.log.format,
                loaded.config.log.filter.as_deref(),
            );
            match run(loaded, hook) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("voicetagd: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

fn client(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("voicetagd: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("voicetagd: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn get(
    remote: &Remote,
    path: &str,
    query: &[(&str, &str)],
) -> anyhow::Result<reqwest::RequestBuilder> {
    let mut url = reqwest::Url::parse(&remote.url)?.join(path)?;
    {
        let mut q = url.query_pairs_mut();
        for (k, v) in query {
            q.append_pair(k, v);
        }
    }
    let mut req = reqwest::Client::new().get(url);
    if let Some(t) = &remote.token {
        req = req.bearer_auth(t);
    }
    Ok(req)
}

async fn check(resp: reqwest::Response) -> anyhow::Result<reqwest::Response> {
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    anyhow::bail!("the daemon answered {status}: {body}")
}

async fn tail(remote: Remote, filter: Vec<String>) -> anyhow::Result<()> {
    use std::io::Write as _;
    let query: Vec<(&str, &str)> = filter.iter().map(|f| ("filter", f.as_str())).collect();
    let mut resp = check(get(&remote, "/v1/tap", &query)?.send().await?).await?;
    let mut pending = Vec::new();
    let stdout = std::io::stdout();
    while let Some(chunk) = resp.chunk().await? {
        pending.extend_from_slice(&chunk);
        while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            if line.starts_with(b"{\"dropped\":") {
                let n = String::from_utf8_lossy(&line[11..line.len() - 2]).to_string();
                eprintln!("voicetagd tail: {n} events not shown (this reader was too slow)");
                continue;
            }
            let mut out = stdout.lock();
            out.write_all(&line)?;
            out.flush()?;
        }
    }
    Ok(())
}

async fn usage(remote: Remote, filter: Vec<String>, group_by: String) -> anyhow::Result<()> {
    let mut query: Vec<(&str, &str)> = filter.iter().map(|f| ("filter", f.as_str())).collect();
    query.push(("group_by", &group_by));
    let v: serde_json::Value = check(get(&remote, "/v1/usage", &query)?.send().await?)
        .await?
        .json()
        .await?;
    let rows = v["usage"].as_array().cloned().unwrap_or_default();
    let mut table = vec![[
        group_by.clone(),
        "events".into(),
        "stt_min".into(),
        "session_min".into(),
        "tokens".into(),
        "characters".into(),
        "cost_usd".into(),
    ]];
    for r in &rows {
        let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
        table.push([
            r[group_by.as_str()].as_str().unwrap_or("").to_string(),
            format!("{}", f("events")),
            format!("{:.2}", f("stt_minutes")),
            format!("{:.2}", f("session_minutes")),
            format!("{}", f("tokens")),
            format!("{}", f("characters")),
            format!("{:.6}", f("cost_usd")),
        ]);
    }
    let widths: Vec<usize> = (0..7)
        .map(|i| {
            table
                .iter()
                .map(|r| r[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in &table {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i == 0 {
                    format!("{c:<w$}", w = widths[i])
                } else {
                    format!("{c:>w$}", w = widths[i])
                }
            })
            .collect();
        println!("{}", cells.join("  ").trim_end());
    }
    Ok(())
}

fn run(loaded: config::Loaded, hook: Option<crate::daemon::LogFilterHook>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("voicetagd")
        .build()?;
    rt.block_on(crate::daemon::run(loaded, crate::daemon::signal(), hook))?;
    Ok(())
}

/// Logs to stderr; the filter comes from `VOICETAGD_LOG`, else `[log] filter`, else `info`.
/// Returns the hook a reload uses to change the filter.
fn init_logging(format: LogFormat, filter: Option<&str>) -> Option<crate::daemon::LogFilterHook> {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::prelude::*;
    let initial = EnvFilter::try_from_env("VOICETAGD_LOG")
        .or_else(|_| EnvFilter::try_new(filter.unwrap_or("info")))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter_layer, handle) = tracing_subscriber::reload::Layer::new(initial);
    // Colour codes only for a person at a terminal, never in journald or log files.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let registry = tracing_subscriber::registry().with(filter_layer);
    let ok = match format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(std::io::stderr),
            )
            .try_init()
            .is_ok(),
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(ansi)
                    .with_writer(std::io::stderr),
            )
            .try_init()
            .is_ok(),
    };
    if !ok {
        return None;
    }
    Some(Box::new(move |f: &str| {
        let new = EnvFilter::try_new(f).map_err(|e| format!("log.filter {f:?}: {e}"))?;
        handle.reload(new).map_err(|e| e.to_string())
    }))
}
