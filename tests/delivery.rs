//! Upstream delivery end to end: retries, Retry-After, dead-letter, compression, file://,
//! and the drain on SIGTERM.

mod common;

use common::{Answer, Daemon, Upstream, config, metric, wait_until};
use serde_json::{Value, json};

fn usage(n: u64) -> Value {
    json!({"agentId": "a", "customerId": "c", "indicator": "i",
           "rawUsage": {"provider": "p", "model": "m", "inputTokens": n}})
}

fn start(up: &Upstream, upstream_extra: &str) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let text = config(dir.path(), &up.url(), "", upstream_extra, "");
    Daemon::start(dir, &text)
}

fn ids(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn upstream_503_n_times_then_200_delivers_once_with_same_ids_and_key() {
    let up = Upstream::start(vec![
        Answer::status(503),
        Answer::status(502),
        Answer::status(500),
        Answer::status(408),
    ]);
    let d = start(&up, "batch_max_events = 3\nconcurrency = 1");
    for n in 0..3 {
        assert_eq!(d.post("/api/v2/usage", &usage(n)).0, 200);
    }
    let delivered = up.wait_delivered(3);
    let reqs = up.requests();
    assert_eq!(
        reqs.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![503, 502, 500, 408, 200]
    );
    // Every attempt carried the same batch (same key, same event ids, same body).
    let first = &reqs[0];
    for r in &reqs[1..] {
        assert_eq!(
            r.headers["idempotency-key"],
            first.headers["idempotency-key"]
        );
        assert_eq!(r.body, first.body);
    }
    assert_eq!(
        ids(&delivered),
        ids(first.body["events"].as_array().unwrap())
    );
    assert_eq!(
        delivered
            .iter()
            .map(|e| e["usage"]["inputTokens"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    let (_, text) = d.get("/metrics");
    assert_eq!(metric(&text, "voicetagd_upstream_retries_total"), Some(4.0));
    assert_eq!(
        metric(
            &text,
            "voicetagd_events_delivered_total{source=\"api\",kind=\"usage\"}"
        ),
        Some(3.0)
    );
    assert_eq!(
        metric(&text, "voicetagd_upstream_requests_total{status=\"503\"}"),
        Some(1.0)
    );
}

#[test]
fn upstream_429_with_retry_after_is_retried() {
    let up = Upstream::start(vec![Answer::retry_after(429, "1")]);
    let d = start(&up, "");
    assert_eq!(d.post("/api/v2/usage", &usage(7)).0, 200);
    let delivered = up.wait_delivered(1);
    assert_eq!(delivered[0]["usage"]["inputTokens"], 7);
    let reqs = up.requests();
    assert_eq!(
        reqs.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![429, 200]
    );
    assert_eq!(
        reqs[0].headers["idempotency-key"],
        reqs[1].headers["idempotency-key"]
    );
    assert!(
        d.logs()
            .iter()
            .any(|l| l.contains("will retry") && l.contains("retry_in_ms\":1000"))
    );
}

#[test]
fn upstream_400_and_501_go_to_dead_letter_and_delivery_goes_on() {
    let up = Upstream::start(vec![Answer::status(400), Answer::status(501)]);
    let d = start(&up, "batch_max_events = 1\nconcurrency = 1");
    for n in 0..3 {
        assert_eq!(d.post("/api/v2/usage", &usage(n)).0, 200);
    }
    let delivered = up.wait_delivered(1);
    assert_eq!(delivered[0]["usage"]["inputTokens"], 2);
    let dl = d.dir.path().join("spool/dead-letter");
    let files = wait_until("dead-letter files", || {
        let mut f: Vec<_> = std::fs::read_dir(&dl)
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        f.sort();
        (f.len() == 2).then_some(f)
    });
    let mut statuses = Vec::new();
    let mut tokens = Vec::new();
    for f in files {
        let v: Value = serde_json::from_slice(&std::fs::read(&f).unwrap()).unwrap();
        assert_eq!(
            f.file_stem().unwrap().to_str().unwrap(),
            v["batch_id"].as_str().unwrap()
        );
        statuses.push(v["status"].as_u64().unwrap());
        tokens.push(v["events"][0]["usage"]["inputTokens"].as_u64().unwrap());
        assert_eq!(v["events"][0]["kind"], "usage");
    }
    statuses.sort();
    tokens.sort();
    assert_eq!(statuses, vec![400, 501]);
    assert_eq!(tokens, vec![0, 1]);
    let (_, text) = d.get("/metrics");
    assert_eq!(
        metric(
            &text,
            "voicetagd_events_dead_lettered_total{source=\"api\",kind=\"usage\"}"
        ),
        Some(2.0)
    );
    assert_eq!(metric(&text, "voicetagd_upstream_retries_total"), None);
}

#[test]
fn zstd_and_uncompressed_bodies() {
    for (compression, encoding) in [("zstd", Some("zstd")), ("none", None)] {
        let up = Upstream::start(vec![]);
        let d = start(&up, &format!("compression = \"{compression}\""));
        assert_eq!(d.post("/api/v2/usage", &usage(5)).0, 200);
        let delivered = up.wait_delivered(1);
        assert_eq!(delivered[0]["usage"]["inputTokens"], 5);
        let req = &up.requests()[0];
        assert_eq!(
            req.headers
                .get("content-encoding")
                .map(|v| v.to_str().unwrap()),
            encoding
        );
        assert_eq!(req.headers["content-type"], "application/json");
        assert!(req.body["sent_at"].as_str().unwrap().ends_with('Z'));
    }
}

#[test]
fn batches_cut_by_count() {
    let up = Upstream::start(vec![]);
    let d = start(
        &up,
        "batch_max_events = 4\nbatch_timeout = \"1h\"\nconcurrency = 1",
    );
    for n in 0..8 {
        assert_eq!(d.post("/api/v2/usage", &usage(n)).0, 200);
    }
    up.wait_delivered(8);
    let sizes: Vec<usize> = up
        .requests()
        .iter()
        .map(|r| r.body["events"].as_array().unwrap().len())
        .collect();
    assert_eq!(sizes, vec![4, 4]);
}

#[test]
fn file_sink_writes_ndjson_batches() {
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("outbox");
    let text = config(
        dir.path(),
        &format!("file://{}", outbox.display()),
        "",
        "",
        "",
    );
    let d = Daemon::start(dir, &text);
    assert_eq!(
        d.post(
            "/api/v1/voice/session",
            &json!({"sessionId": "s", "agentId": "a", "customerId": "c", "metaTags": {"env": "x"}})
        )
        .0,
        200
    );
    for n in 0..3 {
        assert_eq!(
            d.post(
                "/api/v1/voice/tts",
                &json!({"sessionId": "s", "characters": n + 1})
            )
            .0,
            200
        );
    }
    let lines = wait_until("outbox files", || {
        let mut lines = Vec::new();
        for f in std::fs::read_dir(&outbox).ok()? {
            let p = f.ok()?.path();
            if p.extension().is_some_and(|x| x == "ndjson") {
                let text = std::fs::read_to_string(&p).ok()?;
                lines.extend(
                    text.lines()
                        .map(|l| serde_json::from_str::<Value>(l).unwrap()),
                );
            }
        }
        (lines.len() == 3).then_some(lines)
    });
    let mut chars: Vec<u64> = lines
        .iter()
        .map(|e| e["usage"]["characters"].as_u64().unwrap())
        .collect();
    chars.sort();
    assert_eq!(chars, vec![1, 2, 3]);
    assert!(
        lines
            .iter()
            .all(|e| e["meta_tags"] == json!({"env": "x"}) && e["kind"] == "tts")
    );
}

#[test]
fn sigterm_drains_the_queue_then_exits_0() {
    let up = Upstream::start(vec![Answer::status(503)]);
    // A batch would otherwise wait an hour: the drain must not wait for the batch timeout.
    let d = start(&up, "batch_timeout = \"1h\"");
    for n in 0..25 {
        assert_eq!(d.post("/api/v2/usage", &usage(n)).0, 200);
    }
    let (code, logs) = d.terminate();
    assert_eq!(code, 0, "{}", logs.join("\n"));
    let delivered = up.delivered();
    assert_eq!(delivered.len(), 25);
    assert!(logs.iter().any(|l| l.contains("queue drained")));
}

#[test]
fn drain_deadline_gives_up_and_still_exits_0() {
    let up = Upstream::start(vec![Answer::status(503); 10_000]);
    let dir = tempfile::tempdir().unwrap();
    let text = config(dir.path(), &up.url(), "", "", "")
        .replace("shutdown_timeout = \"20s\"", "shutdown_timeout = \"300ms\"");
    let d = Daemon::start(dir, &text);
    assert_eq!(d.post("/api/v2/usage", &usage(1)).0, 200);
    wait_until("a first attempt", || {
        (!up.requests().is_empty()).then_some(())
    });
    let (code, logs) = d.terminate();
    assert_eq!(code, 0);
    assert!(
        logs.iter()
            .any(|l| l.contains("shutdown_timeout reached") && l.contains("\"events\":1")),
        "{}",
        logs.join("\n")
    );
}
