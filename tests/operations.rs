//! Operating under systemd: sd_notify (READY/STATUS/WATCHDOG), SIGHUP reload, and metrics that
//! move as events flow.

mod common;

use std::collections::BTreeMap;
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use common::{Daemon, Upstream, config, wait_until};
use serde_json::json;

/// Prometheus text -> series -> value.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

#[test]
fn notify_socket_gets_ready_status_and_watchdog() {
    let up = Upstream::start(vec![]);
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let text = config(dir.path(), &up.url(), "", "", "");
    let env = [
        ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
        ("WATCHDOG_USEC", "400000"),
    ];
    let d = Daemon::start_env(dir, &text, &env);
    let mut seen = String::new();
    wait_until("READY=1, STATUS= and WATCHDOG=1", || {
        let mut buf = [0u8; 4096];
        if let Ok(n) = sock.recv(&mut buf) {
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            seen.push('\n');
        }
        (seen.contains("READY=1") && seen.contains("WATCHDOG=1") && seen.contains("STATUS=queue"))
            .then_some(())
    });
    assert!(seen.contains("active sessions, upstream ok"), "{seen}");
    let (code, _) = d.terminate();
    assert_eq!(code, 0);
}

#[test]
fn sighup_reloads_static_tags_and_a_broken_file_changes_nothing() {
    let up = Upstream::start(vec![]);
    let dir = tempfile::tempdir().unwrap();
    let text = config(
        dir.path(),
        &up.url(),
        "",
        "concurrency = 1",
        "[tags]\nstatic = { host = \"h1\" }\n",
    );
    let d = Daemon::start(dir, &text);
    let pid = d.child.id().to_string();
    let hup = || {
        assert!(
            Command::new("kill")
                .args(["-HUP", &pid])
                .status()
                .unwrap()
                .success()
        )
    };
    let send = |n: u64| {
        let body = json!({"agentId": "a", "customerId": "c", "rawUsage": {"n": n}});
        assert_eq!(d.post("/api/v2/usage", &body).0, 200);
    };
    let logs_with = |what: &str| d.logs().iter().filter(|l| l.contains(what)).count();
    send(1);
    std::fs::write(
        &d.config_path,
        text.replace("host = \"h1\"", "host = \"h2\""),
    )
    .unwrap();
    hup();
    wait_until("the reload", || {
        (logs_with("\"config reloaded\"") == 1).then_some(())
    });
    send(2);
    // A broken file: the running config stays.
    std::fs::write(&d.config_path, text.replace("host = \"h1\"", "host = ")).unwrap();
    hup();
    wait_until("the failed reload", || {
        (logs_with("config reload failed") == 1).then_some(())
    });
    send(3);
    // A change that needs a restart is applied where it can be and named.
    std::fs::write(
        &d.config_path,
        text.replace("host = \"h1\"", "host = \"h3\"")
            .replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\""),
    )
    .unwrap();
    hup();
    wait_until("the partial reload", || {
        d.logs()
            .iter()
            .any(|l| l.contains("need a restart") && l.contains("server.listen"))
            .then_some(())
    });
    send(4);
    let events = up.wait_delivered(4);
    let hosts: Vec<(u64, String)> = events
        .iter()
        .map(|e| {
            (
                e["usage"]["n"].as_u64().unwrap(),
                e["meta_tags"]["host"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        hosts,
        vec![
            (1, "h1".into()),
            (2, "h2".into()),
            (3, "h2".into()),
            (4, "h3".into())
        ]
    );
    let (_, m) = d.get("/metrics");
    let m = parse_metrics(&m);
    assert_eq!(m["voicetagd_reloads_total{result=\"ok\"}"], 2.0);
    assert_eq!(m["voicetagd_reloads_total{result=\"error\"}"], 1.0);
}

#[test]
fn metrics_move_as_events_flow() {
    let up = Upstream::start(vec![common::Answer::status(503)]);
    let dir = tempfile::tempdir().unwrap();
    let text = config(
        dir.path(),
        &up.url(),
        "",
        "batch_max_events = 5\nconcurrency = 1",
        "",
    );
    let d = Daemon::start(dir, &text);
    let before = parse_metrics(&d.get("/metrics").1);
    assert_eq!(
        before.get("voicetagd_events_received_total{source=\"api\",kind=\"tts\"}"),
        None
    );
    assert_eq!(before["voicetagd_spool_events"], 0.0);
    assert_eq!(before["voicetagd_ready"], 1.0);
    assert_eq!(
        d.post(
            "/api/v1/voice/session",
            &json!({"sessionId": "s", "agentId": "a", "customerId": "c"})
        )
        .0,
        200
    );
    for i in 0..10 {
        assert_eq!(
            d.post(
                "/api/v1/voice/tts",
                &json!({"sessionId": "s", "characters": i + 1})
            )
            .0,
            200
        );
    }
    up.wait_delivered(10);
    let after = wait_until("delivery to be counted", || {
        let m = parse_metrics(&d.get("/metrics").1);
        (m.get("voicetagd_events_delivered_total{source=\"api\",kind=\"tts\"}") == Some(&10.0))
            .then_some(m)
    });
    assert_eq!(
        after["voicetagd_events_received_total{source=\"api\",kind=\"tts\"}"],
        10.0
    );
    assert_eq!(after["voicetagd_sessions_active"], 1.0);
    assert_eq!(after["voicetagd_spool_events"], 0.0);
    assert_eq!(
        after["voicetagd_upstream_requests_total{status=\"503\"}"],
        1.0
    );
    assert_eq!(
        after["voicetagd_upstream_requests_total{status=\"200\"}"],
        2.0
    );
    assert_eq!(after["voicetagd_upstream_retries_total"], 1.0);
    assert_eq!(after["voicetagd_batch_events_count"], 2.0);
    assert_eq!(after["voicetagd_batch_events_sum"], 10.0);
    assert_eq!(after["voicetagd_batch_events_bucket{le=\"5\"}"], 2.0);
    assert_eq!(after["voicetagd_upstream_request_seconds_count"], 3.0);
    assert_eq!(
        after["voicetagd_upstream_request_seconds_bucket{le=\"+Inf\"}"],
        3.0
    );
}
