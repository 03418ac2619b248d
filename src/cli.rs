//! The command line (CONTRACT §1): `run`, `check-config`, `--version`, `--help`.
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
        Command::Run { config } => {
            let path = config_path(config);
            let loaded = match config::load(&path) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(1);
                }
            };
            init_logging(loaded.config.log.format);
            match run(loaded) {
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

fn run(loaded: config::Loaded) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("voicetagd")
        .build()?;
    rt.block_on(crate::daemon::run(loaded, crate::daemon::signal()))?;
    Ok(())
}

/// Logs to stderr; the filter comes from `VOICETAGD_LOG` (default `info`).
fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("VOICETAGD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never in journald or log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
