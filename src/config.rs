//! The TOML configuration: one `deny_unknown_fields` struct per table, a doc comment on every
//! field, defaults in one place.
//!
//! Loading has three steps, each reporting problems as `PATH:LINE:COL: message`:
//! 1. parse and deserialize (serde reports unknown keys and bad values with their span; value
//!    types such as [`DurationValue`], [`ByteSize`] and [`UpstreamUrl`] validate themselves so
//!    that their errors carry the span of the offending value);
//! 2. [`Config::validate`], pure checks across fields;
//! 3. secret resolution (`*_file`, `*_env`), the only step that does I/O.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use toml::Spanned;

/// Default config path when neither `--config` nor `$VOICETAGD_CONFIG` is given.
pub const DEFAULT_PATH: &str = "/etc/voicetagd/voicetagd.toml";

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The HTTP listener and its limits.
    #[serde(default)]
    pub server: ServerConfig,
    /// Session lifetimes.
    #[serde(default)]
    pub sessions: SessionsConfig,
    /// Host-level tags.
    #[serde(default)]
    pub tags: TagsConfig,
    /// The queue between ingest and delivery.
    #[serde(default)]
    pub spool: SpoolConfig,
    /// Where and how events are delivered.
    pub upstream: UpstreamConfig,
    /// Vapi webhook authentication.
    #[serde(default)]
    pub vapi: VapiConfig,
    /// LiveKit webhook verification and usage accounting.
    #[serde(default)]
    pub livekit: LivekitConfig,
    /// Log output.
    #[serde(default)]
    pub log: LogConfig,
}

/// `[server]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address of the one listener (APIs, webhooks, WebSocket, health, metrics).
    /// Default `127.0.0.1:7878`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Largest request body accepted; larger bodies get `413`. Default `1MiB`.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: ByteSize,
    /// If set, the local API and the WebSocket require `Authorization: Bearer <token>` or the
    /// `paygent-api-key` header carrying the same value. Unset by default (open on loopback).
    pub token: Option<String>,
    /// Path of a file holding the token (systemd `LoadCredential=` friendly).
    pub token_file: Option<Spanned<String>>,
    /// Name of an environment variable holding the token.
    pub token_env: Option<Spanned<String>>,
    /// How long a graceful shutdown may spend delivering what is queued before it exits.
    /// Default `30s`.
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout: DurationValue,
}

/// `[sessions]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionsConfig {
    /// A session with no activity this long is ended. Default `2h`.
    #[serde(default = "default_idle_ttl")]
    pub idle_ttl: DurationValue,
    /// Events of a not-yet-started session wait this long for its start before they go on
    /// with static tags only. Default `5s`.
    #[serde(default = "default_unknown_wait")]
    pub unknown_session_wait: DurationValue,
    /// Late events of an ended session still get its tags for this long. Default `10m`.
    #[serde(default = "default_ended_grace")]
    pub ended_grace: DurationValue,
}

/// `[tags]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TagsConfig {
    /// Host-level tags stamped on every event, with the lowest precedence. Checked by the same
    /// rules as every other tag; an invalid one is reported by `check-config`.
    #[serde(default)]
    pub r#static: BTreeMap<String, Spanned<toml::Value>>,
}

/// `[spool]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// Directory for the queue, the session state and `dead-letter/`. Default
    /// `/var/lib/voicetagd`.
    #[serde(default = "default_spool_dir")]
    pub dir: PathBuf,
    /// Most bytes of accepted, undelivered events; when reached, ingest answers `503`.
    /// Default `1GiB`.
    #[serde(default = "default_spool_max")]
    pub max_bytes: ByteSize,
    /// `"always"`: acknowledge only after fsync (group commit). `"never"`: leave flushing to
    /// the OS. Default `"always"`.
    #[serde(default)]
    pub fsync: FsyncPolicy,
}

/// When the spool fsyncs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// Acknowledge only after the data is on disk.
    #[default]
    Always,
    /// Never fsync explicitly.
    Never,
}

/// `[upstream]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// `http://`, `https://` or `file://DIR` (NDJSON files). Required.
    pub url: UpstreamUrl,
    /// Sent as the `paygent-api-key` header.
    pub api_key: Option<String>,
    /// Path of a file holding the API key.
    pub api_key_file: Option<Spanned<String>>,
    /// Name of an environment variable holding the API key.
    pub api_key_env: Option<Spanned<String>>,
    /// A batch is sent when it holds this many events. Default 500.
    #[serde(default = "default_batch_events")]
    pub batch_max_events: NonZeroUsize,
    /// A batch is sent when its events' JSON reaches this size (uncompressed). Default `1MiB`.
    #[serde(default = "default_batch_bytes")]
    pub batch_max_bytes: ByteSize,
    /// A batch is sent at the latest this long after its first event. Default `1s`.
    #[serde(default = "default_batch_timeout")]
    pub batch_timeout: DurationValue,
    /// Body compression: `"gzip"`, `"zstd"` or `"none"`. Default `"gzip"`.
    #[serde(default)]
    pub compression: Compression,
    /// Timeout of one upstream request. Default `10s`.
    #[serde(default = "default_upstream_timeout")]
    pub timeout: DurationValue,
    /// Batches in flight at once. Default 4.
    #[serde(default = "default_concurrency")]
    pub concurrency: NonZeroUsize,
    /// First retry delay; doubles per attempt, with jitter. Default `200ms`.
    #[serde(default = "default_retry_initial")]
    pub retry_initial: DurationValue,
    /// Longest retry delay. Default `30s`.
    #[serde(default = "default_retry_max")]
    pub retry_max: DurationValue,
}

/// Upstream body compression.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// `Content-Encoding: gzip`.
    #[default]
    Gzip,
    /// `Content-Encoding: zstd`.
    Zstd,
    /// No compression.
    None,
}

/// `[vapi]` (used by `POST /webhooks/vapi`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VapiConfig {
    /// Plain shared secret expected in `X-Vapi-Secret` (or legacy `X-Vapi-Signature`).
    pub secret: Option<String>,
    /// Path of a file holding the secret.
    pub secret_file: Option<Spanned<String>>,
    /// Name of an environment variable holding the secret.
    pub secret_env: Option<Spanned<String>>,
    /// Token expected as `Authorization: Bearer <token>`.
    pub bearer_token: Option<String>,
    /// Path of a file holding the bearer token.
    pub bearer_token_file: Option<Spanned<String>>,
    /// Name of an environment variable holding the bearer token.
    pub bearer_token_env: Option<Spanned<String>>,
    /// HMAC signature verification, as a Vapi webhook credential configures it.
    pub hmac: Option<VapiHmacConfig>,
    /// Accept webhooks with no authentication configured. Default false. When any method
    /// above is configured it must pass, whatever this says.
    #[serde(default)]
    pub allow_unauthenticated: bool,
    /// The application's own webhook handler (`http://` or `https://`). When set, every
    /// message is passed on to it after its usage is recorded, and its answer (status,
    /// content type, body) goes back to Vapi. Unset by default: the daemon answers `200 {}`.
    pub forward_url: Option<Spanned<String>>,
    /// Timeout of one forwarded request; beyond it Vapi gets `502`. Default `10s` (Vapi itself
    /// gives up after `server.timeoutSeconds`, 20 s by default).
    #[serde(default = "default_forward_timeout")]
    pub forward_timeout: DurationValue,
    /// Agent id of a call whose metadata and headers name none. Default `vapi-agent`.
    #[serde(default = "default_vapi_agent")]
    pub default_agent_id: String,
    /// Customer id of a call whose metadata and headers name none. Default `vapi-customer`.
    #[serde(default = "default_vapi_customer")]
    pub default_customer_id: String,
}

impl Default for VapiConfig {
    fn default() -> Self {
        Self {
            secret: None,
            secret_file: None,
            secret_env: None,
            bearer_token: None,
            bearer_token_file: None,
            bearer_token_env: None,
            hmac: None,
            allow_unauthenticated: false,
            forward_url: None,
            forward_timeout: default_forward_timeout(),
            default_agent_id: default_vapi_agent(),
            default_customer_id: default_vapi_customer(),
        }
    }
}

/// `[vapi.hmac]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VapiHmacConfig {
    /// The HMAC key.
    pub secret: Option<String>,
    /// Path of a file holding the HMAC key.
    pub secret_file: Option<Spanned<String>>,
    /// Name of an environment variable holding the HMAC key.
    pub secret_env: Option<Spanned<String>>,
    /// `"sha256"` (default), `"sha512"` or `"sha1"`.
    #[serde(default = "default_hmac_algorithm")]
    pub algorithm: String,
    /// Header carrying the signature. Default `x-signature`.
    #[serde(default = "default_signature_header")]
    pub signature_header: String,
    /// Header carrying the timestamp. Default `x-timestamp`.
    #[serde(default = "default_timestamp_header")]
    pub timestamp_header: String,
    /// What is signed: `{timestamp}` stands for the timestamp header's text, `{body}` for
    /// the raw body bytes. Without `{timestamp}` the timestamp is neither needed nor checked.
    /// Default `{timestamp}.{body}`.
    #[serde(default = "default_payload_format")]
    pub payload_format: String,
    /// Prefix before the encoded signature, e.g. `sha256=`. Default empty.
    #[serde(default)]
    pub prefix: String,
    /// `"hex"` (default) or `"base64"`.
    #[serde(default = "default_encoding")]
    pub encoding: String,
    /// The secret is base64 and is decoded before use. Default false.
    #[serde(default)]
    pub secret_is_base64: bool,
    /// Largest accepted clock difference for the timestamp. Default `5m`.
    #[serde(default = "default_hmac_tolerance")]
    pub tolerance: DurationValue,
}

/// `[livekit]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LivekitConfig {
    /// API key: the expected `iss` of server webhook tokens.
    pub api_key: Option<String>,
    /// API secret: the HS256 key of server webhook tokens.
    pub api_secret: Option<String>,
    /// Path of a file holding the API secret.
    pub api_secret_file: Option<Spanned<String>>,
    /// Name of an environment variable holding the API secret.
    pub api_secret_env: Option<Spanned<String>>,
    /// `"auto"`, `"metrics"` or `"snapshots"`: which LiveKit stream is counted. Default `"auto"`.
    #[serde(default)]
    pub usage_source: UsageSource,
    /// Forward non-billable metrics as `telemetry` events. Default false.
    #[serde(default)]
    pub forward_telemetry: bool,
}

impl Default for LivekitConfig {
    fn default() -> Self {
        Self {
            api_key: None,
            api_secret: None,
            api_secret_file: None,
            api_secret_env: None,
            usage_source: UsageSource::Auto,
            forward_telemetry: false,
        }
    }
}

/// Which LiveKit stream counts as usage.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UsageSource {
    /// Whichever billable kind the session sends first.
    #[default]
    Auto,
    /// Per-request metrics.
    Metrics,
    /// Cumulative `session_usage_updated` snapshots.
    Snapshots,
}

/// `[log]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `"text"` (default) or `"json"`.
    #[serde(default)]
    pub format: LogFormat,
    /// The log filter (`EnvFilter` syntax, e.g. `"info"` or `"voicetagd=debug"`), used when
    /// `VOICETAGD_LOG` is not set; reloadable with SIGHUP. Default `"info"`.
    pub filter: Option<String>,
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            max_body_bytes: default_max_body(),
            token: None,
            token_file: None,
            token_env: None,
            shutdown_timeout: default_shutdown_timeout(),
        }
    }
}

impl Default for SessionsConfig {
    fn default() -> Self {
        Self {
            idle_ttl: default_idle_ttl(),
            unknown_session_wait: default_unknown_wait(),
            ended_grace: default_ended_grace(),
        }
    }
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            dir: default_spool_dir(),
            max_bytes: default_spool_max(),
            fsync: FsyncPolicy::Always,
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7878))
}
fn default_max_body() -> ByteSize {
    ByteSize(1 << 20)
}
fn default_shutdown_timeout() -> DurationValue {
    DurationValue(Duration::from_secs(30))
}
fn default_idle_ttl() -> DurationValue {
    DurationValue(Duration::from_secs(2 * 3600))
}
fn default_unknown_wait() -> DurationValue {
    DurationValue(Duration::from_secs(5))
}
fn default_ended_grace() -> DurationValue {
    DurationValue(Duration::from_secs(600))
}
fn default_spool_dir() -> PathBuf {
    PathBuf::from("/var/lib/voicetagd")
}
fn default_spool_max() -> ByteSize {
    ByteSize(1 << 30)
}
fn default_batch_events() -> NonZeroUsize {
    NonZeroUsize::new(500).unwrap_or(NonZeroUsize::MIN)
}
fn default_batch_bytes() -> ByteSize {
    ByteSize(1 << 20)
}
fn default_batch_timeout() -> DurationValue {
    DurationValue(Duration::from_secs(1))
}
fn default_upstream_timeout() -> DurationValue {
    DurationValue(Duration::from_secs(10))
}
fn default_concurrency() -> NonZeroUsize {
    NonZeroUsize::new(4).unwrap_or(NonZeroUsize::MIN)
}
fn default_retry_initial() -> DurationValue {
    DurationValue(Duration::from_millis(200))
}
fn default_retry_max() -> DurationValue {
    DurationValue(Duration::from_secs(30))
}
fn default_hmac_algorithm() -> String {
    "sha256".into()
}
fn default_signature_header() -> String {
    "x-signature".into()
}
fn default_timestamp_header() -> String {
    "x-timestamp".into()
}
fn default_payload_format() -> String {
    "{timestamp}.{body}".into()
}
fn default_encoding() -> String {
    "hex".into()
}
fn default_hmac_tolerance() -> DurationValue {
    DurationValue(Duration::from_secs(300))
}
fn default_forward_timeout() -> DurationValue {
    DurationValue(Duration::from_secs(10))
}
fn default_vapi_agent() -> String {
    "vapi-agent".into()
}
fn default_vapi_customer() -> String {
    "vapi-customer".into()
}

/// A duration written as `"250ms"`, `"5s"`, `"2h"` (humantime syntax).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationValue(pub Duration);

impl DurationValue {
    /// The duration.
    pub fn get(self) -> Duration {
        self.0
    }
}

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(s.trim())
            .map(DurationValue)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid duration {s:?} ({e}); write e.g. \"250ms\", \"5s\", \"2h\""
                ))
            })
    }
}

/// A size in bytes written as `"64KiB"`, `"1MiB"`, `"1GiB"`, `"500kB"` or a plain integer.
///
/// Parsed by hand: the grammar is a number and one of a dozen units, which is less code than
/// adapting a crate's wider syntax and error texts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// The size in bytes.
    pub fn get(self) -> u64 {
        self.0
    }

    /// Parses `"64KiB"`-style text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let unit = unit.trim();
        let mult: u64 = match unit {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            "kB" | "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            _ => {
                return Err(format!(
                    "invalid size {text:?}: unknown unit {unit:?} (use B, KiB, MiB, GiB, kB, MB, GB)"
                ));
            }
        };
        let value: f64 = num.parse().map_err(|_| {
            format!("invalid size {text:?}: expected a number and a unit like \"1MiB\"")
        })?;
        let bytes = value * mult as f64;
        if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
            return Err(format!("invalid size {text:?}: out of range"));
        }
        Ok(ByteSize(bytes.round() as u64))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Text(s) => ByteSize::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

/// The upstream target, checked when the file is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamUrl {
    /// An `http://` or `https://` endpoint.
    Http(String),
    /// `file://DIR`: one NDJSON file per batch in DIR (relative paths are relative to the
    /// working directory, so `file://./var/outbox` works from the repository root).
    File(PathBuf),
}

impl UpstreamUrl {
    /// Parses and checks a URL.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("file://") {
            if rest.is_empty() {
                return Err(
                    "file:// upstream needs a directory, e.g. file:///var/lib/voicetagd/outbox"
                        .into(),
                );
            }
            return Ok(UpstreamUrl::File(PathBuf::from(rest)));
        }
        match reqwest::Url::parse(s) {
            Ok(u) if (u.scheme() == "http" || u.scheme() == "https") && u.host().is_some() => {
                Ok(UpstreamUrl::Http(s.to_string()))
            }
            Ok(u) => Err(format!(
                "unsupported upstream url scheme {:?}: use http://, https:// or file://",
                u.scheme()
            )),
            Err(e) => Err(format!("invalid upstream url {s:?}: {e}")),
        }
    }
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamUrl::Http(u) => f.write_str(u),
            UpstreamUrl::File(p) => write!(f, "file://{}", p.display()),
        }
    }
}

impl<'de> Deserialize<'de> for UpstreamUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        UpstreamUrl::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// One problem found in a config file, located 1-based.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub col: usize,
    /// What is wrong, naming the key.
    pub message: String,
}

/// Everything wrong with a config file.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    /// The file.
    pub path: PathBuf,
    /// Each problem, in file order.
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(
                f,
                "{}:{}:{}: {}",
                self.path.display(),
                p.line,
                p.col,
                p.message
            )?;
        }
        Ok(())
    }
}

/// Secrets resolved from inline values, files or environment variables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Secrets {
    /// `[server] token`.
    pub server_token: Option<String>,
    /// `[upstream] api_key`.
    pub upstream_api_key: Option<String>,
    /// `[vapi] secret`.
    pub vapi_secret: Option<String>,
    /// `[vapi] bearer_token`.
    pub vapi_bearer_token: Option<String>,
    /// `[vapi.hmac] secret`.
    pub vapi_hmac_secret: Option<String>,
    /// `[livekit] api_secret`.
    pub livekit_api_secret: Option<String>,
}

/// A loaded, validated config with its secrets and static tags resolved.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The file it came from.
    pub path: PathBuf,
    /// The parsed file.
    pub config: Config,
    /// Resolved secrets.
    pub secrets: Secrets,
    /// `[tags].static`, normalized by the tag rules.
    pub static_tags: crate::tags::Tags,
}

/// Locator from byte offsets to 1-based line/column.
struct Locator<'a> {
    text: &'a str,
}

impl Locator<'_> {
    fn at(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = self.text.get(..offset).unwrap_or(self.text);
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
        let col = before
            .get(line_start..)
            .map(|s| s.chars().count())
            .unwrap_or(0)
            + 1;
        (line, col)
    }

    fn problem(&self, span: std::ops::Range<usize>, message: impl Into<String>) -> Problem {
        let (line, col) = self.at(span.start);
        Problem {
            line,
            col,
            message: message.into(),
        }
    }
}

/// Reads, parses, validates and resolves a config file.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        path: path.to_path_buf(),
        problems: vec![Problem {
            line: 1,
            col: 1,
            message: format!("cannot read config file: {e}"),
        }],
    })?;
    load_str(path, &text, &|name| std::env::var(name).ok())
}

/// Parses, validates and resolves config text; `env` looks up environment variables.
pub fn load_str(
    path: &Path,
    text: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Loaded, ConfigError> {
    let loc = Locator { text };
    let err = |problems: Vec<Problem>| ConfigError {
        path: path.to_path_buf(),
        problems,
    };
    let config: Config = toml::from_str(text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        err(vec![loc.problem(span, e.message().trim().to_string())])
    })?;
    let mut problems = config.validate(&loc);
    let base = path.parent().unwrap_or(Path::new("."));
    let mut resolver = Resolver {
        loc: &loc,
        base,
        env,
        problems: Vec::new(),
    };
    let s = &config;
    let secrets = Secrets {
        server_token: resolver.secret(
            "server.token",
            &s.server.token,
            &s.server.token_file,
            &s.server.token_env,
        ),
        upstream_api_key: resolver.secret(
            "upstream.api_key",
            &s.upstream.api_key,
            &s.upstream.api_key_file,
            &s.upstream.api_key_env,
        ),
        vapi_secret: resolver.secret(
            "vapi.secret",
            &s.vapi.secret,
            &s.vapi.secret_file,
            &s.vapi.secret_env,
        ),
        vapi_bearer_token: resolver.secret(
            "vapi.bearer_token",
            &s.vapi.bearer_token,
            &s.vapi.bearer_token_file,
            &s.vapi.bearer_token_env,
        ),
        vapi_hmac_secret: s.vapi.hmac.as_ref().and_then(|h| {
            resolver.secret("vapi.hmac.secret", &h.secret, &h.secret_file, &h.secret_env)
        }),
        livekit_api_secret: resolver.secret(
            "livekit.api_secret",
            &s.livekit.api_secret,
            &s.livekit.api_secret_file,
            &s.livekit.api_secret_env,
        ),
    };
    problems.append(&mut resolver.problems);
    if let (Some(h), Some(secret)) = (&config.vapi.hmac, &secrets.vapi_hmac_secret)
        && let Err(e) = h.key(secret)
    {
        problems.push(loc.problem(0..0, format!("vapi.hmac.secret: {e}")));
    }
    let mut static_raw = serde_json::Map::new();
    for (k, v) in &config.tags.r#static {
        match toml_to_json(v.get_ref()) {
            Some(j) => {
                static_raw.insert(k.clone(), j);
            }
            None => problems.push(loc.problem(
                v.span(),
                format!("tags.static.{k}: a tag value must be a string, number or boolean"),
            )),
        }
    }
    let (static_tags, skipped) = crate::tags::normalize_map(&static_raw);
    for s in skipped {
        let span = config
            .tags
            .r#static
            .get(&s.key)
            .map(|v| v.span())
            .unwrap_or(0..0);
        problems.push(loc.problem(span, format!("tags.static: {s}")));
    }
    if !problems.is_empty() {
        problems.sort_by_key(|p| (p.line, p.col));
        return Err(err(problems));
    }
    Ok(Loaded {
        path: path.to_path_buf(),
        config,
        secrets,
        static_tags,
    })
}

fn toml_to_json(v: &toml::Value) -> Option<serde_json::Value> {
    match v {
        toml::Value::String(s) => Some(serde_json::Value::String(s.clone())),
        toml::Value::Integer(i) => Some(serde_json::Value::from(*i)),
        toml::Value::Float(f) => serde_json::Number::from_f64(*f).map(serde_json::Value::Number),
        toml::Value::Boolean(b) => Some(serde_json::Value::Bool(*b)),
        _ => None,
    }
}

struct Resolver<'a> {
    loc: &'a Locator<'a>,
    base: &'a Path,
    env: &'a dyn Fn(&str) -> Option<String>,
    problems: Vec<Problem>,
}

impl Resolver<'_> {
    /// Resolves one secret given inline, as `*_file` or as `*_env`; at most one may be set.
    fn secret(
        &mut self,
        name: &str,
        inline: &Option<String>,
        file: &Option<Spanned<String>>,
        env: &Option<Spanned<String>>,
    ) -> Option<String> {
        let set = inline.is_some() as u8 + file.is_some() as u8 + env.is_some() as u8;
        if set > 1 {
            let span = file
                .as_ref()
                .map(|f| f.span())
                .or_else(|| env.as_ref().map(|e| e.span()))
                .unwrap_or(0..0);
            self.problems.push(self.loc.problem(
                span,
                format!("{name}: give the secret only one way (inline, {name}_file or {name}_env)"),
            ));
            return None;
        }
        if let Some(v) = inline {
            return Some(v.clone());
        }
        if let Some(f) = file {
            // systemd's $CREDENTIALS_DIRECTORY is expanded so that a unit can say
            // `api_key_file = "${CREDENTIALS_DIRECTORY}/upstream-api-key"`.
            let raw = f.get_ref();
            let expanded = match (self.env)("CREDENTIALS_DIRECTORY") {
                Some(dir) => raw
                    .replace("${CREDENTIALS_DIRECTORY}", &dir)
                    .replace("$CREDENTIALS_DIRECTORY", &dir),
                None => raw.clone(),
            };
            let p = Path::new(&expanded);
            let p = if p.is_relative() {
                self.base.join(p)
            } else {
                p.to_path_buf()
            };
            return match std::fs::read_to_string(&p) {
                Ok(mut s) => {
                    if s.ends_with('\n') {
                        s.pop();
                        if s.ends_with('\r') {
                            s.pop();
                        }
                    }
                    Some(s)
                }
                Err(e) => {
                    self.problems.push(self.loc.problem(
                        f.span(),
                        format!("{name}_file: cannot read secret file {}: {e}", p.display()),
                    ));
                    None
                }
            };
        }
        if let Some(e) = env {
            return match (self.env)(e.get_ref()) {
                Some(v) => Some(v),
                None => {
                    self.problems.push(self.loc.problem(
                        e.span(),
                        format!(
                            "{name}_env: environment variable {} is not set",
                            e.get_ref()
                        ),
                    ));
                    None
                }
            };
        }
        None
    }
}

impl Config {
    /// Checks that need more than one field; pure, returns every problem found.
    fn validate(&self, loc: &Locator<'_>) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut at_top = |message: String| {
            problems.push(loc.problem(0..0, message));
        };
        if self.upstream.retry_initial.get() > self.upstream.retry_max.get() {
            at_top("upstream.retry_initial must not exceed upstream.retry_max".into());
        }
        if self.upstream.batch_max_bytes.get() == 0 {
            at_top("upstream.batch_max_bytes must be greater than 0".into());
        }
        if self.upstream.timeout.get().is_zero() {
            at_top("upstream.timeout must be greater than 0".into());
        }
        if self.upstream.batch_timeout.get().is_zero() {
            at_top("upstream.batch_timeout must be greater than 0".into());
        }
        if self.spool.max_bytes.get() < self.server.max_body_bytes.get() {
            at_top("spool.max_bytes must be at least server.max_body_bytes".into());
        }
        if self.vapi.forward_timeout.get().is_zero() {
            at_top("vapi.forward_timeout must be greater than 0".into());
        }
        for (key, v) in [
            ("default_agent_id", &self.vapi.default_agent_id),
            ("default_customer_id", &self.vapi.default_customer_id),
        ] {
            if v.trim().is_empty() {
                at_top(format!("vapi.{key} must not be empty"));
            }
        }
        if let Some(h) = &self.vapi.hmac {
            if h.secret.is_none() && h.secret_file.is_none() && h.secret_env.is_none() {
                at_top("vapi.hmac: secret (or secret_file / secret_env) is required".into());
            }
            for (key, v) in [
                ("signature_header", &h.signature_header),
                ("timestamp_header", &h.timestamp_header),
            ] {
                if axum::http::HeaderName::from_bytes(v.trim().as_bytes()).is_err() {
                    at_top(format!("vapi.hmac.{key}: {v:?} is not a valid header name"));
                }
            }
            if let Err(e) = check_payload_format(&h.payload_format) {
                at_top(format!("vapi.hmac.payload_format: {e}"));
            }
            if !matches!(h.algorithm.as_str(), "sha256" | "sha512" | "sha1") {
                at_top(format!(
                    "vapi.hmac.algorithm: {:?} is not one of sha256, sha512, sha1",
                    h.algorithm
                ));
            }
            if !matches!(h.encoding.as_str(), "hex" | "base64") {
                at_top(format!(
                    "vapi.hmac.encoding: {:?} is not one of hex, base64",
                    h.encoding
                ));
            }
        }
        if let Some(u) = &self.vapi.forward_url
            && let Err(e) = check_http_url(u.get_ref())
        {
            problems.push(loc.problem(u.span(), format!("vapi.forward_url: {e}")));
        }
        problems
    }
}

/// Checks an `http(s)://` URL with a host.
fn check_http_url(s: &str) -> Result<(), String> {
    match reqwest::Url::parse(s) {
        Ok(u) if (u.scheme() == "http" || u.scheme() == "https") && u.host().is_some() => Ok(()),
        Ok(u) => Err(format!(
            "unsupported url scheme {:?}: use http:// or https://",
            u.scheme()
        )),
        Err(e) => Err(format!("invalid url {s:?}: {e}")),
    }
}

/// Checks an HMAC payload format: only `{timestamp}` and `{body}` are known placeholders.
/// Vapi also documents `{method}`, `{url}` and `{svix-id}` but not how it renders them, so
/// they are refused rather than guessed.
fn check_payload_format(f: &str) -> Result<(), String> {
    if !f.contains("{body}") {
        return Err(format!("{f:?} must contain {{body}}"));
    }
    let mut rest = f;
    while let Some(open) = rest.find('{') {
        let after = &rest[open..];
        let Some(close) = after.find('}') else { break };
        let name = &after[..=close];
        if name != "{timestamp}" && name != "{body}" {
            return Err(format!(
                "placeholder {name} is not supported (only {{timestamp}} and {{body}})"
            ));
        }
        rest = &after[close + 1..];
    }
    Ok(())
}

impl VapiHmacConfig {
    /// The HMAC key: the secret's bytes, or its base64 decoding with `secret_is_base64`
    /// (standard alphabet, padding optional; URL-safe accepted too).
    pub fn key(&self, secret: &str) -> Result<Vec<u8>, String> {
        if !self.secret_is_base64 {
            return Ok(secret.as_bytes().to_vec());
        }
        use base64::Engine as _;
        let t = secret.trim();
        let engines = [
            &base64::engine::general_purpose::STANDARD,
            &base64::engine::general_purpose::STANDARD_NO_PAD,
            &base64::engine::general_purpose::URL_SAFE,
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        ];
        engines
            .iter()
            .find_map(|e| e.decode(t).ok())
            .ok_or_else(|| "the secret is not valid base64 (secret_is_base64 = true)".to_string())
    }
}

impl Loaded {
    /// The one-line summary `check-config` prints.
    pub fn summary(&self) -> String {
        let c = &self.config;
        format!(
            "{}: ok: listen {}, upstream {}, spool {} (max {} bytes, fsync {:?}), {} static tag(s)",
            self.path.display(),
            c.server.listen,
            c.upstream.url,
            c.spool.dir.display(),
            c.spool.max_bytes.get(),
            c.spool.fsync,
            self.static_tags.len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str) -> Result<Loaded, ConfigError> {
        load_str(Path::new("t.toml"), text, &|_| None)
    }

    fn first_error(text: &str) -> String {
        match load_text(text) {
            Ok(_) => panic!("expected an error for {text:?}"),
            Err(e) => e.to_string(),
        }
    }

    const MIN: &str = "[upstream]\nurl = \"file:///tmp/out\"\n";

    #[test]
    fn minimal_config_gets_defaults() {
        let l = load_text(MIN).unwrap();
        assert_eq!(l.config.server.listen.to_string(), "127.0.0.1:7878");
        assert_eq!(l.config.upstream.batch_max_events.get(), 500);
        assert_eq!(l.config.upstream.batch_max_bytes.get(), 1 << 20);
        assert_eq!(
            l.config.sessions.unknown_session_wait.get(),
            Duration::from_secs(5)
        );
        assert_eq!(l.config.spool.fsync, FsyncPolicy::Always);
        assert_eq!(l.config.upstream.compression, Compression::Gzip);
        assert_eq!(l.config.vapi.default_agent_id, "vapi-agent");
        assert_eq!(l.config.vapi.default_customer_id, "vapi-customer");
        assert_eq!(l.config.vapi.forward_timeout.get(), Duration::from_secs(10));
        assert!(l.config.vapi.forward_url.is_none());
        assert!(!l.config.vapi.allow_unauthenticated);
    }

    #[test]
    fn vapi_hmac_defaults_follow_the_sdk() {
        let l = load_text(&format!(
            "{MIN}[vapi]\nforward_url = \"http://127.0.0.1:3000/vapi\"\n[vapi.hmac]\nsecret = \"a2V5\"\nsecret_is_base64 = true\n"
        ))
        .unwrap();
        let h = l.config.vapi.hmac.as_ref().unwrap();
        assert_eq!(h.algorithm, "sha256");
        assert_eq!(h.signature_header, "x-signature");
        assert_eq!(h.timestamp_header, "x-timestamp");
        assert_eq!(h.payload_format, "{timestamp}.{body}");
        assert_eq!(h.encoding, "hex");
        assert_eq!(h.prefix, "");
        assert_eq!(h.tolerance.get(), Duration::from_secs(300));
        assert_eq!(h.key("a2V5").unwrap(), b"key");
        assert_eq!(h.key("a2V5eQ").unwrap(), b"keyy");
    }

    #[test]
    fn error_table() {
        let rows: &[(&str, &str, &str)] = &[
            (
                "unknown top-level key",
                "bogus = 1\n[upstream]\nurl = \"file:///x\"\n",
                "t.toml:1:1: unknown field `bogus`",
            ),
            (
                "unknown key in a table",
                "[upstream]\nurl = \"file:///x\"\nbatch_max_event = 3\n",
                "t.toml:3:1: unknown field `batch_max_event`",
            ),
            (
                "bad duration",
                "[sessions]\nidle_ttl = \"2 fortnights\"\n[upstream]\nurl = \"file:///x\"\n",
                "t.toml:2:12: invalid duration",
            ),
            (
                "bad size",
                "[server]\nmax_body_bytes = \"1 MiBB\"\n[upstream]\nurl = \"file:///x\"\n",
                "t.toml:2:18: invalid size",
            ),
            (
                "bad url scheme",
                "[upstream]\nurl = \"ftp://x/y\"\n",
                "t.toml:2:7: unsupported upstream url scheme",
            ),
            (
                "bad compression",
                "[upstream]\nurl = \"file:///x\"\ncompression = \"brotli\"\n",
                "t.toml:3:15: unknown variant `brotli`",
            ),
            (
                "zero concurrency",
                "[upstream]\nurl = \"file:///x\"\nconcurrency = 0\n",
                "t.toml:3:15:",
            ),
            (
                "missing upstream",
                "[server]\n",
                "t.toml:1:1: missing field `upstream`",
            ),
            (
                "missing secret file",
                "[upstream]\nurl = \"file:///x\"\napi_key_file = \"/nonexistent/key\"\n",
                "t.toml:3:16: upstream.api_key_file: cannot read secret file",
            ),
            (
                "missing secret env",
                "[upstream]\nurl = \"file:///x\"\napi_key_env = \"NOPE\"\n",
                "t.toml:3:15: upstream.api_key_env: environment variable NOPE is not set",
            ),
            (
                "two ways for one secret",
                "[upstream]\nurl = \"file:///x\"\napi_key = \"a\"\napi_key_env = \"B\"\n",
                "only one way",
            ),
            (
                "invalid static tag key",
                "[upstream]\nurl = \"file:///x\"\n[tags]\nstatic = { \"bad key\" = \"v\" }\n",
                "t.toml:4:24: tags.static: tag \"bad key\" skipped",
            ),
            (
                "vapi forward_url not http",
                "[upstream]\nurl = \"file:///x\"\n[vapi]\nforward_url = \"ftp://app/hook\"\n",
                "t.toml:4:15: vapi.forward_url: unsupported url scheme \"ftp\"",
            ),
            (
                "vapi forward_timeout zero",
                "[upstream]\nurl = \"file:///x\"\n[vapi]\nforward_timeout = \"0s\"\n",
                "vapi.forward_timeout must be greater than 0",
            ),
            (
                "vapi empty default id",
                "[upstream]\nurl = \"file:///x\"\n[vapi]\ndefault_agent_id = \" \"\n",
                "vapi.default_agent_id must not be empty",
            ),
            (
                "vapi hmac without secret",
                "[upstream]\nurl = \"file:///x\"\n[vapi.hmac]\nalgorithm = \"sha256\"\n",
                "vapi.hmac: secret (or secret_file / secret_env) is required",
            ),
            (
                "vapi hmac unknown algorithm",
                "[upstream]\nurl = \"file:///x\"\n[vapi.hmac]\nsecret = \"k\"\nalgorithm = \"md5\"\n",
                "vapi.hmac.algorithm: \"md5\" is not one of sha256, sha512, sha1",
            ),
            (
                "vapi hmac unsupported placeholder",
                "[upstream]\nurl = \"file:///x\"\n[vapi.hmac]\nsecret = \"k\"\npayload_format = \"{method}.{body}\"\n",
                "placeholder {method} is not supported",
            ),
            (
                "vapi hmac format without body",
                "[upstream]\nurl = \"file:///x\"\n[vapi.hmac]\nsecret = \"k\"\npayload_format = \"{timestamp}\"\n",
                "must contain {body}",
            ),
            (
                "vapi hmac bad header name",
                "[upstream]\nurl = \"file:///x\"\n[vapi.hmac]\nsecret = \"k\"\nsignature_header = \"x sig\"\n",
                "vapi.hmac.signature_header: \"x sig\" is not a valid header name",
            ),
            (
                "vapi hmac secret not base64",
                "[upstream]\nurl = \"file:///x\"\n[vapi.hmac]\nsecret = \"not base64!\"\nsecret_is_base64 = true\n",
                "vapi.hmac.secret: the secret is not valid base64",
            ),
            (
                "vapi unknown key",
                "[upstream]\nurl = \"file:///x\"\n[vapi]\nforward = \"http://x\"\n",
                "t.toml:4:1: unknown field `forward`",
            ),
            (
                "bad listen address",
                "[server]\nlisten = \"localhost\"\n[upstream]\nurl = \"file:///x\"\n",
                "t.toml:2:10:",
            ),
        ];
        for (name, text, want) in rows {
            let got = first_error(text);
            assert!(
                got.contains(want),
                "{name}: got {got:?}, want it to contain {want:?}"
            );
        }
    }

    #[test]
    fn secret_file_loses_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("key");
        std::fs::write(&p, "s3cret\n").unwrap();
        let text = format!("[upstream]\nurl = \"file:///x\"\napi_key_file = {:?}\n", p);
        let l = load_text(&text).unwrap();
        assert_eq!(l.secrets.upstream_api_key.as_deref(), Some("s3cret"));
    }

    #[test]
    fn secret_from_env_and_credentials_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tok"), "t0k\n").unwrap();
        let d = dir.path().to_string_lossy().to_string();
        let text = "[server]\ntoken_file = \"${CREDENTIALS_DIRECTORY}/tok\"\n[upstream]\nurl = \"file:///x\"\napi_key_env = \"KEY\"\n";
        let env = move |n: &str| match n {
            "KEY" => Some("k".to_string()),
            "CREDENTIALS_DIRECTORY" => Some(d.clone()),
            _ => None,
        };
        let l = load_str(Path::new("t.toml"), text, &env).unwrap();
        assert_eq!(l.secrets.upstream_api_key.as_deref(), Some("k"));
        assert_eq!(l.secrets.server_token.as_deref(), Some("t0k"));
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(ByteSize::parse("64KiB").unwrap().get(), 65536);
        assert_eq!(ByteSize::parse("1MiB").unwrap().get(), 1 << 20);
        assert_eq!(ByteSize::parse("1GiB").unwrap().get(), 1 << 30);
        assert_eq!(ByteSize::parse("500kB").unwrap().get(), 500_000);
        assert_eq!(ByteSize::parse("123").unwrap().get(), 123);
        assert!(ByteSize::parse("12 parsecs").is_err());
        assert!(ByteSize::parse("MiB").is_err());
        let l = load_text(
            "[upstream]\nurl = \"file:///x\"\nbatch_timeout = \"250ms\"\nretry_max = \"2h\"\n",
        )
        .unwrap();
        assert_eq!(
            l.config.upstream.batch_timeout.get(),
            Duration::from_millis(250)
        );
        assert_eq!(l.config.upstream.retry_max.get(), Duration::from_secs(7200));
    }

    #[test]
    fn static_tags_numbers_become_strings() {
        let l = load_text("[upstream]\nurl = \"file:///x\"\n[tags]\nstatic = { host = \"h1\", rack = 42, canary = true }\n").unwrap();
        let got: Vec<(String, String)> = l
            .static_tags
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("canary".into(), "true".into()),
                ("host".into(), "h1".into()),
                ("rack".into(), "42".into())
            ]
        );
    }

    #[test]
    fn shipped_config_is_valid() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/voicetagd.toml");
        let l = load(&p).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(l.config.server.listen.to_string(), "127.0.0.1:7878");
        assert_eq!(
            l.config.upstream.url,
            UpstreamUrl::File(PathBuf::from("./var/outbox"))
        );
    }
}
