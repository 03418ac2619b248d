//! Test harness: the real daemon binary on an ephemeral port, and a real local upstream (an
//! axum app) that decodes gzip/zstd bodies and records every batch.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::Value;

/// How long a test waits for something that should happen promptly before failing. A bound
/// on a wait, not a timing assertion: on a fast machine it returns at once.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// One answer of the scripted upstream.
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: u16,
    pub retry_after: Option<String>,
}

impl Answer {
    pub fn status(status: u16) -> Self {
        Answer {
            status,
            retry_after: None,
        }
    }
    pub fn retry_after(status: u16, ra: &str) -> Self {
        Answer {
            status,
            retry_after: Some(ra.to_string()),
        }
    }
}

/// One request the upstream received.
#[derive(Clone, Debug)]
pub struct Received {
    pub headers: HeaderMap,
    pub body: Value,
    pub status: u16,
}

#[derive(Default)]
struct UpState {
    script: VecDeque<Answer>,
    received: Vec<Received>,
}

/// The local upstream.
pub struct Upstream {
    pub addr: SocketAddr,
    state: Arc<Mutex<UpState>>,
    _rt: tokio::runtime::Runtime,
}

async fn ingest(
    State(st): State<Arc<Mutex<UpState>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let raw = match headers
        .get("content-encoding")
        .and_then(|v| v.to_str().ok())
    {
        Some("gzip") => {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(&body[..])
                .read_to_end(&mut out)
                .expect("gzip body");
            out
        }
        Some("zstd") => zstd::decode_all(&body[..]).expect("zstd body"),
        None => body.to_vec(),
        Some(other) => panic!("unexpected content-encoding {other}"),
    };
    let json: Value = serde_json::from_slice(&raw).expect("upstream body is JSON");
    let mut st = st.lock().unwrap();
    let answer = st.script.pop_front().unwrap_or(Answer::status(200));
    st.received.push(Received {
        headers,
        body: json,
        status: answer.status,
    });
    let mut resp = (StatusCode::from_u16(answer.status).unwrap(), "{}").into_response();
    if let Some(ra) = answer.retry_after {
        resp.headers_mut()
            .insert("retry-after", ra.parse().unwrap());
    }
    resp
}

impl Upstream {
    /// Starts an upstream that answers the script in order, then 200.
    pub fn start(script: Vec<Answer>) -> Upstream {
        Self::start_on("127.0.0.1:0".parse().unwrap(), script)
    }

    /// An address nothing listens on (yet): an upstream that is down.
    pub fn free_addr() -> SocketAddr {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    }

    /// Starts an upstream on a given address.
    pub fn start_on(addr: SocketAddr, script: Vec<Answer>) -> Upstream {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let state = Arc::new(Mutex::new(UpState {
            script: script.into(),
            received: Vec::new(),
        }));
        let app = Router::new()
            .route("/v1/events:batch", post(ingest))
            .with_state(state.clone());
        let listener = rt.block_on(tokio::net::TcpListener::bind(addr)).unwrap();
        let addr = listener.local_addr().unwrap();
        rt.spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Upstream {
            addr,
            state,
            _rt: rt,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/v1/events:batch", self.addr)
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }

    /// Events of the requests answered 2xx, in arrival order.
    pub fn delivered(&self) -> Vec<Value> {
        self.requests()
            .into_iter()
            .filter(|r| r.status < 300)
            .flat_map(|r| r.body["events"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// Waits until at least `n` events were delivered and returns them.
    pub fn wait_delivered(&self, n: usize) -> Vec<Value> {
        wait_until("upstream to receive events", || {
            let d = self.delivered();
            (d.len() >= n).then_some(d)
        })
    }
}

/// Polls `f` until it returns `Some`, failing after [`PATIENCE`].
pub fn wait_until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > PATIENCE {
            panic!("gave up waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The daemon under test.
pub struct Daemon {
    pub child: Child,
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    logs: Arc<Mutex<Vec<String>>>,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_voicetagd")
}

/// A config with the test's spool dir and upstream, plus extra TOML per table (a key given in
/// `upstream_extra` replaces the harness default).
pub fn config(
    dir: &Path,
    upstream_url: &str,
    server_extra: &str,
    upstream_extra: &str,
    rest: &str,
) -> String {
    let defaults: String = [
        "batch_timeout = \"50ms\"",
        "retry_initial = \"10ms\"",
        "retry_max = \"100ms\"",
    ]
    .iter()
    .filter(|line| {
        let key = line.split(' ').next().unwrap_or_default();
        !upstream_extra
            .lines()
            .any(|l| l.trim_start().starts_with(key))
    })
    .map(|l| format!("{l}\n"))
    .collect();
    format!(
        r#"[server]
listen = "127.0.0.1:0"
shutdown_timeout = "20s"
{server_extra}

[spool]
dir = "{spool}"

[upstream]
url = "{upstream_url}"
api_key = "up-key"
{defaults}{upstream_extra}

[log]
format = "json"

{rest}
"#,
        spool = dir.join("spool").display()
    )
}

/// Sets `[spool] max_bytes` in a config made by [`config`].
pub fn with_spool_max(text: &str, max: &str) -> String {
    text.replace("[spool]\n", &format!("[spool]\nmax_bytes = \"{max}\"\n"))
}

/// A daemon whose spool holds only 2 KiB (1 KiB bodies), one batch of two events in flight:
/// it fills after a few events while the upstream refuses.
pub fn small_spool_daemon(up: &Upstream) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let text = config(
        dir.path(),
        &up.url(),
        "max_body_bytes = \"1KiB\"",
        "batch_max_events = 2\nconcurrency = 1",
        "",
    );
    Daemon::start(dir, &with_spool_max(&text, "2KiB"))
}

impl Daemon {
    /// Starts the daemon on the given config text and waits until it listens.
    pub fn start(dir: tempfile::TempDir, config_text: &str) -> Daemon {
        Self::start_env(dir, config_text, &[])
    }

    /// [`Daemon::start`] with extra environment variables.
    pub fn start_env(dir: tempfile::TempDir, config_text: &str, env: &[(&str, &str)]) -> Daemon {
        let config_path = dir.path().join("voicetagd.toml");
        std::fs::write(&config_path, config_text).unwrap();
        let mut child = Command::new(bin())
            .args(["run", "--config"])
            .arg(&config_path)
            .envs(env.iter().copied())
            .env("VOICETAGD_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start voicetagd");
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && v["message"] == "voicetagd is ready"
                {
                    let _ = tx.send(v["listen"].as_str().unwrap_or_default().to_string());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let addr = match rx.recv_timeout(PATIENCE) {
            Ok(a) => a.parse().expect("listen address"),
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "daemon did not become ready; logs:\n{}",
                    logs.lock().unwrap().join("\n")
                );
            }
        };
        Daemon {
            child,
            addr,
            dir,
            config_path,
            logs,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    /// POSTs JSON and returns (status, headers, body).
    pub fn post(&self, path: &str, body: &Value) -> (u16, HeaderMap, Value) {
        self.post_with(path, body, &[])
    }

    pub fn post_with(
        &self,
        path: &str,
        body: &Value,
        headers: &[(&str, &str)],
    ) -> (u16, HeaderMap, Value) {
        self.post_raw(path, serde_json::to_vec(body).unwrap(), headers)
    }

    pub fn post_raw(
        &self,
        path: &str,
        body: Vec<u8>,
        headers: &[(&str, &str)],
    ) -> (u16, HeaderMap, Value) {
        let client = reqwest::blocking::Client::new();
        let mut req = client
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().expect("request to daemon");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().unwrap_or_default();
        let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, headers, json)
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        let resp = reqwest::blocking::get(self.url(path)).expect("request to daemon");
        let status = resp.status().as_u16();
        (status, resp.text().unwrap_or_default())
    }

    /// SIGKILL: no drain, no flush; returns the state directory for a restart.
    pub fn kill9(mut self) -> tempfile::TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }

    /// Sends SIGTERM, waits for the exit code, and keeps the state directory for a restart.
    pub fn terminate_keep(mut self) -> (i32, Vec<String>, tempfile::TempDir) {
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        let (code, logs) = self.terminate();
        (code, logs, dir)
    }

    /// Sends SIGTERM and waits for the exit code.
    pub fn terminate(mut self) -> (i32, Vec<String>) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let status = wait_until("daemon to exit", || self.child.try_wait().ok().flatten());
        std::thread::sleep(Duration::from_millis(50));
        (status.code().unwrap_or(-1), self.logs())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A metric's value from Prometheus text, by exact series name (with labels).
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}
