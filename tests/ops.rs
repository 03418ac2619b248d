//! Operator surface: tap and `voicetagd tail` with filters, a stalled tap reader, the sessions
//! API, usage totals and `voicetagd usage`.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};

use common::{Daemon, Upstream, config, metric, wait_until};
use serde_json::{Value, json};

fn start(up: &Upstream) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let text = config(
        dir.path(),
        &up.url(),
        "",
        "batch_max_events = 1000",
        "[tags]\nstatic = { host = \"h1\" }\n",
    );
    Daemon::start(dir, &text)
}

fn session(d: &Daemon, id: &str, tags: Value) {
    let body = json!({"sessionId": id, "agentId": format!("agent-{id}"), "customerId": "cust", "metaTags": tags});
    assert_eq!(d.post("/api/v1/voice/session", &body).0, 200);
}

fn tts(d: &Daemon, id: &str, chars: u64) {
    assert_eq!(
        d.post(
            "/api/v1/voice/tts",
            &json!({"sessionId": id, "characters": chars})
        )
        .0,
        200
    );
}

#[test]
fn tail_prints_only_matching_events() {
    let up = Upstream::start(vec![]);
    let d = start(&up);
    session(&d, "s-prod", json!({"env": "prod", "region": "us-east"}));
    session(&d, "s-stg", json!({"env": "staging", "region": "eu"}));
    let mut tail = Command::new(common::bin())
        .args([
            "tail",
            "--url",
            &d.url(""),
            "--filter",
            "env:prod",
            "--filter",
            ":us-east",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(tail.stdout.take().unwrap()).lines();
    // The tap only sees events accepted after it connected: keep sending until one shows.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in lines.by_ref() {
            let _ = tx.send(l.unwrap());
        }
    });
    let first: Value = wait_until("tail to print a matching event", || {
        tts(&d, "s-stg", 1);
        tts(&d, "s-prod", 2);
        rx.recv_timeout(std::time::Duration::from_millis(50))
            .ok()
            .map(|l| serde_json::from_str(&l).unwrap())
    });
    assert_eq!(first["session_id"], "s-prod");
    assert_eq!(
        first["meta_tags"],
        json!({"env": "prod", "region": "us-east", "host": "h1"})
    );
    tts(&d, "s-stg", 3);
    tts(&d, "s-prod", 4);
    let next: Value = serde_json::from_str(&rx.recv_timeout(common::PATIENCE).unwrap()).unwrap();
    assert_eq!(
        next["session_id"], "s-prod",
        "staging events are filtered out"
    );
    let _ = tail.kill();
    let _ = tail.wait();
}

#[test]
fn a_stalled_tap_reader_does_not_slow_delivery() {
    let up = Upstream::start(vec![]);
    let d = start(&up);
    session(&d, "s", json!({"env": "load"}));
    // A tap reader that connects and then never reads.
    let mut stalled = std::net::TcpStream::connect(d.addr).unwrap();
    std::io::Write::write_all(&mut stalled, b"GET /v1/tap HTTP/1.1\r\nhost: x\r\n\r\n").unwrap();
    stalled
        .set_read_timeout(Some(std::time::Duration::from_millis(200)))
        .unwrap();
    // Wait until the daemon has subscribed this reader (it shows in the tap's reader count
    // only through its effect, so: until a first event reaches it).
    let mut head = Vec::new();
    wait_until("the tap to answer", || {
        tts(&d, "s", 1);
        let mut b = [0u8; 4096];
        if let Ok(k) = stalled.read(&mut b) {
            head.extend_from_slice(&b[..k]);
        }
        head.starts_with(b"HTTP/1.1 200").then_some(())
    });
    let before = up.delivered().len();
    let n = 10_000u64;
    let url = d.url("/api/v2/usage");
    std::thread::scope(|s| {
        for t in 0..4 {
            let url = url.clone();
            s.spawn(move || {
                let c = reqwest::blocking::Client::new();
                // 4 KiB events: 40 MB in all, far more than socket buffers and the tap's
                // buffer hold, so the stalled reader must fall behind.
                let pad = "x".repeat(4096);
                for i in 0..n / 4 {
                    let body = json!({"agentId": "a", "customerId": "c", "rawUsage": {"n": t * 100_000 + i, "pad": pad}}).to_string();
                    let r = c.post(&url).header("content-type", "application/json").body(body).send().unwrap();
                    assert_eq!(r.status(), 200);
                }
            });
        }
    });
    // Every event is delivered while the reader stalls.
    let events = up.wait_delivered(before + n as usize);
    assert!(events.len() >= n as usize);
    // The stalled reader lost events rather than holding the pipeline; reading now, it is told.
    let mut buf = vec![0u8; 1 << 20];
    let text = wait_until("the dropped notice", || {
        let k = stalled.read(&mut buf).ok()?;
        let s = String::from_utf8_lossy(&buf[..k]).to_string();
        s.contains("{\"dropped\":").then_some(s)
    });
    assert!(text.contains("{\"dropped\":"));
    let (_, m) = d.get("/metrics");
    assert!(metric(&m, "voicetagd_tap_dropped_total").unwrap_or(0.0) > 0.0);
}

#[test]
fn sessions_api() {
    let up = Upstream::start(vec![]);
    let d = start(&up);
    session(&d, "a", json!({"env": "prod"}));
    session(&d, "b", json!({"env": "staging"}));
    tts(&d, "a", 5);
    let client = reqwest::blocking::Client::new();
    let get = |path: &str| -> (u16, Value) {
        let r = client.get(d.url(path)).send().unwrap();
        (r.status().as_u16(), r.json().unwrap())
    };
    let (s, all) = get("/v1/sessions");
    assert_eq!(s, 200);
    let ids: Vec<&str> = all["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["session_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["a", "b"]);
    let (_, prod) = get("/v1/sessions?filter=env%3Aprod");
    assert_eq!(prod["sessions"].as_array().unwrap().len(), 1);
    let (s, a) = get("/v1/sessions/a");
    assert_eq!(s, 200);
    assert_eq!(a["agent_id"], "agent-a");
    assert_eq!(a["state"], "active");
    assert_eq!(a["events"], 1);
    assert_eq!(a["meta_tags"], json!({"env": "prod"}));
    assert_eq!(a["source"], "api");
    assert!(a["ended_at"].is_null());
    let r = client.delete(d.url("/v1/sessions/a")).send().unwrap();
    assert_eq!(r.status(), 200);
    let ended: Value = r.json().unwrap();
    assert_eq!(ended["state"], "ended");
    assert!(ended["ended_at"].is_string());
    let (_, all) = get("/v1/sessions");
    assert_eq!(
        all["sessions"].as_array().unwrap().len(),
        1,
        "only active sessions are listed"
    );
    assert_eq!(get("/v1/sessions/zzz").0, 404);
    assert_eq!(
        client
            .delete(d.url("/v1/sessions/zzz"))
            .send()
            .unwrap()
            .status(),
        404
    );
}

#[test]
fn usage_totals_and_the_usage_command() {
    let up = Upstream::start(vec![]);
    let d = start(&up);
    session(&d, "a", json!({"env": "prod"}));
    session(&d, "b", json!({"env": "staging"}));
    tts(&d, "a", 100);
    tts(&d, "b", 7);
    assert_eq!(
        d.post(
            "/api/v1/voice/stt",
            &json!({"sessionId": "a", "audioMinutes": 1.5})
        )
        .0,
        200
    );
    assert_eq!(
        d.post(
            "/api/v1/voice/llm",
            &json!({"sessionId": "b", "promptTokens": 10, "completionTokens": 5})
        )
        .0,
        200
    );
    let v: Value = reqwest::blocking::get(d.url("/v1/usage?group_by=agent&filter=env:prod"))
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(
        v["usage"],
        json!([{"agent": "agent-a", "events": 2, "stt_minutes": 1.5, "session_minutes": 0.0, "tokens": 0, "characters": 100, "cost_usd": 0.0}])
    );
    let out = Command::new(common::bin())
        .args(["usage", "--url", &d.url(""), "--group-by", "customer"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        vec![
            "customer",
            "events",
            "stt_min",
            "session_min",
            "tokens",
            "characters",
            "cost_usd"
        ]
    );
    assert_eq!(
        lines[1].split_whitespace().collect::<Vec<_>>(),
        vec!["cust", "4", "1.50", "0.00", "15", "107", "0.000000"]
    );
    let bad = reqwest::blocking::get(d.url("/v1/usage?group_by=planet")).unwrap();
    assert_eq!(bad.status(), 400);
}
