//! LiveKit end to end: the agent WebSocket (every sample object, snapshots, seq/ack/resend,
//! early events, restarts) and signed server webhooks.

mod common;

use std::time::Duration;

use common::{Daemon, Upstream, config, metric};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Ws {
    rt: tokio::runtime::Runtime,
    socket: Socket,
}

impl Ws {
    fn connect(d: &Daemon) -> Ws {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let url = format!("ws://{}/v1/livekit", d.addr);
        let (socket, _) = rt
            .block_on(tokio_tungstenite::connect_async(url))
            .expect("upgrade");
        Ws { rt, socket }
    }

    fn send(&mut self, v: Value) {
        self.rt
            .block_on(self.socket.send(Message::Text(v.to_string().into())))
            .unwrap();
    }

    fn send_text(&mut self, t: &str) {
        self.rt
            .block_on(self.socket.send(Message::Text(t.to_string().into())))
            .unwrap();
    }

    fn recv(&mut self) -> Value {
        let fut = async {
            loop {
                match self.socket.next().await {
                    Some(Ok(Message::Text(t))) => {
                        return serde_json::from_str::<Value>(&t).unwrap();
                    }
                    Some(Ok(_)) => continue,
                    other => panic!("socket ended: {other:?}"),
                }
            }
        };
        self.rt.block_on(async {
            tokio::time::timeout(common::PATIENCE, fut)
                .await
                .expect("a reply")
        })
    }

    /// Sends a frame and expects the ack for `seq`.
    fn frame(&mut self, v: Value) -> Value {
        self.send(v);
        self.recv()
    }
}

fn samples() -> Vec<Value> {
    include_str!("data/livekit/metrics.jsonl")
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn start(up: &Upstream, rest: &str) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    // One batch in flight at a time: delivery order is then acceptance order, so `flush`
    // can tell when everything sent before it has arrived.
    let text = config(
        dir.path(),
        &up.url(),
        "",
        "concurrency = 1",
        &format!("[tags]\nstatic = {{ host = \"h1\" }}\n{rest}"),
    );
    Daemon::start(dir, &text)
}

/// Everything delivered so far: sends a marker event last and waits for it, so events that
/// were (or were not) produced before it are all accounted for, without sleeping.
fn flush(d: &Daemon, up: &Upstream) -> Vec<Value> {
    let marker = uuid_like();
    let body = json!({"agentId": "flush", "customerId": "flush", "rawUsage": {"marker": marker}});
    assert_eq!(d.post("/api/v2/usage", &body).0, 200);
    common::wait_until("the flush marker", || {
        let all = up.delivered();
        all.iter()
            .any(|e| e["usage"]["marker"] == marker.as_str())
            .then(|| {
                all.into_iter()
                    .filter(|e| e["agent_id"] != "flush")
                    .collect()
            })
    })
}

fn uuid_like() -> String {
    format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

fn session_start(sid: &str, seq: u64) -> Value {
    json!({"type": "session.start", "session_id": sid, "agent_id": "agent-lk", "customer_id": "cust-lk",
           "indicator": "voice-session", "meta_tags": {"env": "staging", "bad key": "x"}, "seq": seq})
}

/// The event without the fields that vary per run.
fn stable(e: &Value) -> Value {
    let mut e = e.clone();
    let o = e.as_object_mut().unwrap();
    for k in ["id", "received_at"] {
        assert!(o.remove(k).is_some(), "missing {k}");
    }
    e
}

#[test]
fn every_sample_line_through_the_websocket() {
    let up = Upstream::start(vec![]);
    let d = start(&up, "");
    let mut ws = Ws::connect(&d);
    assert_eq!(
        ws.frame(session_start("lk-1", 1)),
        json!({"type": "ack", "session_id": "lk-1", "seq": 1})
    );
    for (i, line) in samples().into_iter().enumerate() {
        let seq = i as u64 + 2;
        let reply =
            ws.frame(json!({"type": "livekit", "session_id": "lk-1", "seq": seq, "event": line}));
        assert_eq!(
            reply,
            json!({"type": "ack", "session_id": "lk-1", "seq": seq}),
            "line {}",
            i + 1
        );
    }
    // auto: the first billable kind is per-request metrics, so the snapshot (line 16) is not
    // counted; zero-usage records (lines 2, 6) and non-billable ones produce nothing; the first
    // close ends the session with an indicator, the second close changes nothing.
    let events = flush(&d, &up);
    let tags = json!({"env": "staging", "host": "h1"});
    let common = |kind: &str, provider: &str, model: &str, at: &str, usage: Value| {
        json!({"kind": kind, "source": "livekit", "session_id": "lk-1", "agent_id": "agent-lk", "customer_id": "cust-lk",
               "indicator": "voice-session", "provider": provider, "model": model, "occurred_at": at,
               "meta_tags": tags, "usage": usage})
    };
    let sts_usage = json!({"schemaVersion": 1,
        "input": {"text": {"tokens": 250}, "audio": {"tokens": 1200}},
        "output": {"text": {"tokens": 70}, "audio": {"tokens": 310}},
        "cached": {"text": {"tokens": 128}, "audio": {"tokens": 512}}});
    let llm_usage = json!({"prompt_tokens": 812, "completion_tokens": 96, "cached_tokens": 512, "reasoning_tokens": 0});
    let expected = [
        common(
            "stt",
            "Deepgram",
            "nova-3",
            "2025-07-12T12:00:00.250000Z",
            json!({"audio_seconds": 4.2}),
        ),
        common(
            "llm",
            "api.openai.com",
            "gpt-4o-mini",
            "2025-07-12T12:00:01.150000Z",
            llm_usage.clone(),
        ),
        common(
            "tts",
            "Cartesia",
            "sonic-2",
            "2025-07-12T12:00:02.850000Z",
            json!({"characters": 143, "audio_seconds": 9.84}),
        ),
        common(
            "sts",
            "api.openai.com",
            "gpt-realtime",
            "2025-07-12T12:00:10.250000Z",
            sts_usage.clone(),
        ),
        common(
            "llm",
            "api.openai.com",
            "gpt-4o-mini",
            "2025-07-12T12:00:01.150000Z",
            llm_usage,
        ),
        common(
            "sts",
            "api.openai.com",
            "gpt-realtime",
            "2025-07-12T12:00:10.250000Z",
            sts_usage,
        ),
    ];
    let got: Vec<Value> = events.iter().map(stable).collect();
    assert_eq!(got[..6], expected[..], "{got:#?}");
    let ind = &got[6];
    assert_eq!(ind["kind"], "indicator");
    assert_eq!(ind["occurred_at"], "2025-07-12T12:01:00.250000Z");
    assert_eq!(ind["usage"]["indicators"], json!(["voice-session"]));
    assert!(ind["usage"]["total_duration_minutes"].as_f64().is_some());
    assert_eq!(ind["meta_tags"], tags);
    assert_eq!(got.len(), 7, "one indicator only, nothing for telemetry");
    let (_, m) = d.get("/metrics");
    assert_eq!(
        metric(
            &m,
            "voicetagd_livekit_telemetry_total{type=\"vad_metrics\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "voicetagd_tags_skipped_total{reason=\"key_charset\"}"),
        Some(1.0)
    );
}

#[test]
fn telemetry_is_forwarded_when_asked() {
    let up = Upstream::start(vec![]);
    let d = start(&up, "[livekit]\nforward_telemetry = true\n");
    let mut ws = Ws::connect(&d);
    ws.frame(session_start("t-1", 1));
    let lines = samples();
    for (seq, i) in [(2u64, 6usize), (3, 8), (4, 11)] {
        ws.frame(json!({"type": "livekit", "session_id": "t-1", "seq": seq, "event": lines[i]}));
    }
    let events = up.wait_delivered(3);
    let kinds: Vec<(&str, &str)> = events
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap(),
                e["usage"]["type"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("telemetry", "eou_metrics"),
            ("telemetry", "vad_metrics"),
            ("telemetry", "decision_metrics")
        ]
    );
    assert_eq!(events[1]["provider"], "ONNX");
    assert_eq!(events[1]["usage"]["inference_count"], 32);
}

fn snapshot(llm_in: u64, llm_out: u64, stt_secs: f64, chars: u64) -> Value {
    json!({"type": "session_usage_updated", "created_at": 1752321612.61, "usage": {"model_usage": [
        {"type": "llm_usage", "provider": "api.openai.com", "model": "gpt-4o-mini", "input_tokens": llm_in,
         "input_cached_tokens": 0, "input_cache_creation_tokens": 0, "input_audio_tokens": 0, "input_cached_audio_tokens": 0,
         "input_text_tokens": 0, "input_cached_text_tokens": 0, "input_image_tokens": 0, "input_cached_image_tokens": 0,
         "output_tokens": llm_out, "output_audio_tokens": 0, "output_text_tokens": 0, "output_reasoning_tokens": 0, "session_duration": 0.0},
        {"type": "tts_usage", "provider": "Cartesia", "model": "sonic-2", "input_tokens": 0, "output_tokens": 0, "characters_count": chars, "audio_duration": null},
        {"type": "stt_usage", "provider": "Deepgram", "model": "nova-3", "input_tokens": 0, "input_audio_tokens": 0, "output_tokens": 0, "audio_duration": stt_secs},
        {"type": "eot_usage", "provider": "livekit", "model": "turn-detector", "total_requests": 3}
    ]}})
}

#[test]
fn snapshots_are_diffed_with_counter_resets() {
    let up = Upstream::start(vec![]);
    let d = start(&up, "");
    let mut ws = Ws::connect(&d);
    ws.frame(session_start("snap", 1));
    ws.frame(json!({"type": "livekit", "session_id": "snap", "seq": 2, "event": snapshot(812, 96, 4.2, 0)}));
    ws.frame(json!({"type": "livekit", "session_id": "snap", "seq": 3, "event": snapshot(812, 96, 4.2, 0)}));
    ws.frame(json!({"type": "livekit", "session_id": "snap", "seq": 4, "event": snapshot(1624, 192, 9.4, 143)}));
    // The agent's collector restarted: the totals went down.
    ws.frame(json!({"type": "livekit", "session_id": "snap", "seq": 5, "event": snapshot(100, 10, 1.0, 143)}));
    // In auto mode, once snapshots count, per-request metrics of the session are ignored.
    ws.frame(json!({"type": "livekit", "session_id": "snap", "seq": 6, "event": samples()[2]}));
    ws.frame(json!({"type": "session.end", "session_id": "snap", "seq": 7}));
    let all = flush(&d, &up);
    let events: Vec<Value> = all
        .iter()
        .filter(|e| e["kind"] != "indicator")
        .cloned()
        .collect();
    let view: Vec<(String, Value)> = events
        .iter()
        .map(|e| (e["kind"].as_str().unwrap().to_string(), e["usage"].clone()))
        .collect();
    assert_eq!(
        view,
        vec![
            (
                "llm".into(),
                json!({"prompt_tokens": 812, "completion_tokens": 96, "cached_tokens": 0, "reasoning_tokens": 0})
            ),
            ("stt".into(), json!({"audio_seconds": 4.2})),
            (
                "llm".into(),
                json!({"prompt_tokens": 812, "completion_tokens": 96, "cached_tokens": 0, "reasoning_tokens": 0})
            ),
            (
                "tts".into(),
                json!({"characters": 143, "audio_seconds": 0.0})
            ),
            ("stt".into(), json!({"audio_seconds": 5.2})),
            (
                "llm".into(),
                json!({"prompt_tokens": 100, "completion_tokens": 10, "cached_tokens": 0, "reasoning_tokens": 0})
            ),
            ("stt".into(), json!({"audio_seconds": 1.0})),
        ]
    );
    assert!(
        events
            .iter()
            .all(|e| e["occurred_at"] == "2025-07-12T12:00:12.610000Z")
    );
    assert_eq!(all.iter().filter(|e| e["kind"] == "indicator").count(), 1);
}

#[test]
fn seq_ack_resend_errors_and_early_events() {
    let up = Upstream::start(vec![]);
    let d = start(&up, "[sessions]\nunknown_session_wait = \"1h\"\n");
    let mut ws = Ws::connect(&d);
    let lines = samples();
    // Events before session.start wait for it (the reply does not).
    let r =
        ws.frame(json!({"type": "livekit", "session_id": "early", "seq": 1, "event": lines[0]}));
    assert_eq!(r, json!({"type": "ack", "session_id": "early", "seq": 1}));
    assert_eq!(ws.frame(session_start("early", 2))["seq"], 2);
    assert_eq!(
        ws.frame(json!({"type": "livekit", "session_id": "early", "seq": 3, "event": lines[2]}))["seq"],
        3
    );
    // A resend of an already queued frame is dropped and acknowledged with the last seq.
    assert_eq!(
        ws.frame(json!({"type": "livekit", "session_id": "early", "seq": 1, "event": lines[0]})),
        json!({"type": "ack", "session_id": "early", "seq": 3})
    );
    // Bad frames get an error frame and the connection stays open.
    ws.send_text("{not json");
    let e = ws.recv();
    assert_eq!(e["type"], "error");
    assert!(e["message"].as_str().unwrap().contains("invalid JSON"));
    let e = ws.frame(json!({"type": "livekit", "session_id": "early", "seq": 4}));
    assert_eq!(
        e,
        json!({"type": "error", "session_id": "early", "seq": 4, "message": "a livekit frame needs an event object"})
    );
    let e = ws.frame(json!({"type": "hello", "session_id": "early", "seq": 4}));
    assert_eq!(e["message"], "unknown frame type \"hello\"");
    let e = ws.frame(json!({"type": "livekit", "seq": 4, "event": {}}));
    assert_eq!(
        e,
        json!({"type": "error", "seq": 4, "message": "session_id is required"})
    );
    // The rejected seq may be sent again, now valid.
    assert_eq!(
        ws.frame(json!({"type": "livekit", "session_id": "early", "seq": 4, "event": lines[3]}))["seq"],
        4
    );
    // A second connection resending the same frames adds nothing.
    let mut ws2 = Ws::connect(&d);
    assert_eq!(
        ws2.frame(json!({"type": "livekit", "session_id": "early", "seq": 3, "event": lines[2]}))["seq"],
        4
    );
    let events = flush(&d, &up);
    // The early stt event was released when its session started, after the llm frame was
    // not yet sent: stt first, then llm, then tts; nothing twice.
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, vec!["stt", "llm", "tts"]);
    assert!(events.iter().all(
        |e| e["meta_tags"] == json!({"env": "staging", "host": "h1"})
            && e["agent_id"] == "agent-lk"
    ));
}

#[test]
fn seq_state_survives_a_restart() {
    let up = Upstream::start(vec![]);
    let dir = tempfile::tempdir().unwrap();
    let text = config(dir.path(), &up.url(), "", "concurrency = 1", "");
    let d = Daemon::start(dir, &text);
    let lines = samples();
    {
        let mut ws = Ws::connect(&d);
        ws.frame(session_start("r", 1));
        ws.frame(json!({"type": "livekit", "session_id": "r", "seq": 2, "event": lines[0]}));
        ws.frame(json!({"type": "livekit", "session_id": "r", "seq": 3, "event": lines[2]}));
    }
    let dir = d.kill9();
    let d = Daemon::start(dir, &text);
    let mut ws = Ws::connect(&d);
    // The client resends everything it has not seen acked (here: all of it).
    assert_eq!(ws.frame(session_start("r", 1))["seq"], 3);
    assert_eq!(
        ws.frame(json!({"type": "livekit", "session_id": "r", "seq": 2, "event": lines[0]}))["seq"],
        3
    );
    assert_eq!(
        ws.frame(json!({"type": "livekit", "session_id": "r", "seq": 3, "event": lines[2]}))["seq"],
        3
    );
    assert_eq!(
        ws.frame(json!({"type": "livekit", "session_id": "r", "seq": 4, "event": lines[3]}))["seq"],
        4
    );
    let events = flush(&d, &up);
    // stt and llm may have been delivered before the kill and again after (same ids); tts once.
    let mut ids: Vec<String> = events
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "stt, llm, tts once each: {events:#?}");
    assert!(events.iter().all(|e| e["agent_id"] == "agent-lk"));
}

#[test]
fn websocket_needs_the_server_token() {
    let up = Upstream::start(vec![]);
    let dir = tempfile::tempdir().unwrap();
    let text = config(dir.path(), &up.url(), "token = \"tok\"", "", "");
    let d = Daemon::start(dir, &text);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let url = format!("ws://{}/v1/livekit", d.addr);
    let err = rt
        .block_on(tokio_tungstenite::connect_async(url.clone()))
        .unwrap_err();
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 401),
        other => panic!("expected HTTP 401, got {other:?}"),
    }
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", "Bearer tok".parse().unwrap());
    assert!(rt.block_on(tokio_tungstenite::connect_async(req)).is_ok());
}

#[test]
fn signed_room_finished_webhook_ends_the_session() {
    let up = Upstream::start(vec![]);
    let d = start(
        &up,
        "[livekit]\napi_key = \"devkey\"\napi_secret = \"secret-with-at-least-32-characters-long\"\n",
    );
    let mut ws = Ws::connect(&d);
    ws.frame(session_start("support-call-7f3a", 1));
    let body = include_bytes!("data/livekit/webhook_room_finished.json").to_vec();
    let auth = include_str!("data/livekit/webhook_room_finished.auth")
        .trim()
        .to_string();
    let ct = ("content-type", "application/webhook+json");
    // Tampered body, wrong token, missing token: 401 and the session stays active.
    let mut tampered = body.clone();
    tampered[12] ^= 1;
    assert_eq!(
        d.post_raw(
            "/webhooks/livekit",
            tampered,
            &[("authorization", &auth), ct]
        )
        .0,
        401
    );
    let (status, _, resp) = d.post_raw("/webhooks/livekit", body.clone(), &[ct]);
    assert_eq!(status, 401);
    assert!(resp["error"].as_str().unwrap().contains("refused"));
    assert_eq!(
        d.post_raw(
            "/webhooks/livekit",
            body.clone(),
            &[("authorization", "a.b.c"), ct]
        )
        .0,
        401
    );
    assert!(up.delivered().is_empty());
    // The real signed sample: the session ends with its indicator.
    let (status, _, resp) = d.post_raw(
        "/webhooks/livekit",
        body.clone(),
        &[("authorization", &auth), ct],
    );
    assert_eq!((status, resp), (200, json!({})));
    let events = up.wait_delivered(1);
    assert_eq!(events[0]["kind"], "indicator");
    assert_eq!(events[0]["session_id"], "support-call-7f3a");
    let created = std::time::UNIX_EPOCH + Duration::from_secs(1_796_412_081);
    assert_eq!(
        events[0]["occurred_at"],
        humantime::format_rfc3339_micros(created).to_string()
    );
    // A redelivery of the webhook adds nothing.
    assert_eq!(
        d.post_raw("/webhooks/livekit", body, &[("authorization", &auth), ct])
            .0,
        200
    );
    let all = flush(&d, &up);
    assert_eq!(all.len(), 1);
}

#[test]
fn webhook_without_configured_secret_is_401() {
    let up = Upstream::start(vec![]);
    let d = start(&up, "");
    let body = include_bytes!("data/livekit/webhook_room_finished.json").to_vec();
    let auth = include_str!("data/livekit/webhook_room_finished.auth")
        .trim()
        .to_string();
    let (status, _, resp) = d.post_raw("/webhooks/livekit", body, &[("authorization", &auth)]);
    assert_eq!(status, 401);
    assert!(resp["error"].as_str().unwrap().contains("not configured"));
}

#[test]
fn full_spool_stops_acking_until_space_returns() {
    // The upstream refuses at first, so the small spool fills; frames are then neither read nor
    // acknowledged until delivery frees space, and every one of them arrives once.
    let up = Upstream::start(vec![common::Answer::retry_after(503, "1"); 3]);
    let d = common::small_spool_daemon(&up);
    let mut ws = Ws::connect(&d);
    ws.frame(session_start("bp", 1));
    let stt = samples()[0].clone();
    let n = 30u64;
    for seq in 2..2 + n {
        ws.send(json!({"type": "livekit", "session_id": "bp", "seq": seq, "event": stt}));
    }
    let mut last = 0;
    while last < 1 + n {
        let r = ws.recv();
        assert_eq!(r["type"], "ack", "{r}");
        last = r["seq"].as_u64().unwrap();
    }
    let events = up.wait_delivered(n as usize);
    let mut ids: Vec<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n as usize);
    let (_, m) = d.get("/metrics");
    assert!(
        metric(&m, "voicetagd_livekit_backpressure_total").unwrap_or(0.0) >= 1.0,
        "the spool filled up"
    );
}
