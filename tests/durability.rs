//! Nothing accepted is lost: SIGKILL with the upstream down, then restart.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{Daemon, Upstream, config};
use serde_json::{Value, json};

fn config_for(dir: &std::path::Path, upstream: &str) -> String {
    config(
        dir,
        upstream,
        "",
        "batch_max_events = 200\nconcurrency = 2",
        "[sessions]\nunknown_session_wait = \"1h\"\n[tags]\nstatic = { host = \"h1\" }\n",
    )
}

#[test]
fn sigkill_with_upstream_down_loses_nothing_and_sessions_survive() {
    let up_addr = Upstream::free_addr();
    let up_url = format!("http://{up_addr}/v1/events:batch");
    let dir = tempfile::tempdir().unwrap();
    let text = config_for(dir.path(), &up_url);
    let d = Daemon::start(dir, &text);
    assert_eq!(
        d.post(
            "/api/v1/voice/session",
            &json!({"sessionId": "before", "agentId": "a", "customerId": "c", "metaTags": {"env": "staging"}})
        )
        .0,
        200
    );
    // An event whose session starts only after the restart: it is held durably meanwhile.
    assert_eq!(
        d.post(
            "/api/v1/voice/tts",
            &json!({"sessionId": "later", "characters": 9})
        )
        .0,
        200
    );
    // 2,000 events from 8 concurrent clients, while the upstream is down.
    let url = d.url("/api/v1/voice/llm");
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let url = url.clone();
            s.spawn(move || {
                let client = reqwest::blocking::Client::new();
                for i in 0..250u64 {
                    let n = t * 250 + i;
                    let body =
                        json!({"sessionId": "before", "promptTokens": n, "completionTokens": 1});
                    let r = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(body.to_string())
                        .send()
                        .unwrap();
                    assert_eq!(r.status(), 200, "event {n}");
                }
            });
        }
    });
    let dir = d.kill9();

    // Upstream back, daemon restarted on the same state directory.
    let up = Upstream::start_on(up_addr, vec![]);
    let d = Daemon::start(dir, &text);
    let restored = d
        .logs()
        .iter()
        .any(|l| l.contains("spool recovered") && l.contains("\"events\":2000"));
    assert!(restored, "{}", d.logs().join("\n"));
    // The session started before the restart still stamps events sent after it.
    assert_eq!(
        d.post(
            "/api/v1/voice/stt",
            &json!({"sessionId": "before", "audioMinutes": 1})
        )
        .0,
        200
    );
    // The held event gets its session's tags once the session starts.
    assert_eq!(
        d.post(
            "/api/v1/voice/session",
            &json!({"sessionId": "later", "agentId": "a2", "customerId": "c2", "metaTags": {"env": "late"}})
        )
        .0,
        200
    );
    let events = up.wait_delivered(2002);
    let llm: Vec<&Value> = events.iter().filter(|e| e["kind"] == "llm").collect();
    let mut ids_by_n: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    for e in &llm {
        ids_by_n
            .entry(e["usage"]["prompt_tokens"].as_u64().unwrap())
            .or_default()
            .insert(e["id"].as_str().unwrap().to_string());
        assert_eq!(e["meta_tags"], json!({"env": "staging", "host": "h1"}));
    }
    assert_eq!(ids_by_n.len(), 2000, "every accepted event arrives");
    assert!(
        ids_by_n.values().all(|ids| ids.len() == 1),
        "duplicates, if any, carry identical ids"
    );
    let stt: Vec<&Value> = events.iter().filter(|e| e["kind"] == "stt").collect();
    assert_eq!(stt.len(), 1);
    assert_eq!(stt[0]["meta_tags"], json!({"env": "staging", "host": "h1"}));
    assert_eq!(stt[0]["agent_id"], "a");
    let tts: Vec<&Value> = events.iter().filter(|e| e["kind"] == "tts").collect();
    assert_eq!(tts.len(), 1);
    assert_eq!(tts[0]["meta_tags"], json!({"env": "late", "host": "h1"}));
    assert_eq!(tts[0]["agent_id"], "a2");
    let (code, _) = d.terminate();
    assert_eq!(code, 0);
}

#[test]
fn sigterm_with_upstream_down_keeps_the_queue_for_the_next_start() {
    let up_addr = Upstream::free_addr();
    let up_url = format!("http://{up_addr}/v1/events:batch");
    let dir = tempfile::tempdir().unwrap();
    let text = config_for(dir.path(), &up_url)
        .replace("shutdown_timeout = \"20s\"", "shutdown_timeout = \"200ms\"");
    let d = Daemon::start(dir, &text);
    for n in 0..10 {
        let body = json!({"agentId": "a", "customerId": "c", "rawUsage": {"provider": "p", "model": "m", "inputTokens": n}});
        assert_eq!(d.post("/api/v2/usage", &body).0, 200);
    }
    let (code, logs, dir) = d.terminate_keep();
    assert_eq!(code, 0);
    assert!(
        logs.iter().any(|l| l.contains("stays in the spool")),
        "{}",
        logs.join("\n")
    );
    let up = Upstream::start_on(up_addr, vec![]);
    let _d = Daemon::start(dir, &text);
    let events = up.wait_delivered(10);
    let tokens: BTreeSet<u64> = events
        .iter()
        .map(|e| e["usage"]["inputTokens"].as_u64().unwrap())
        .collect();
    assert_eq!(tokens, (0..10).collect());
}
