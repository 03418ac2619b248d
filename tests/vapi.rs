//! Vapi server messages end to end (CONTRACT §4.4): the samples in, the exact stamped events
//! out; every authentication mode, good and bad; duplicates; forwarding to a real handler.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::post as route_post;
use base64::Engine as _;
use common::{Daemon, Upstream, config, metric, wait_until};
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use voicetagd::event::derived_id;

const SECRET: &str = "vapi-shared-secret";
const PIPELINE_CALL: &str = "019a5193-90ae-7fff-b06b-d09a3312294a";
const REALTIME_CALL: &str = "019a51a8-1c3d-7aa1-8f2e-5d6c7b8a9e01";

fn sample(name: &str) -> Vec<u8> {
    let p = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/vapi/");
    std::fs::read(format!("{p}{name}")).unwrap_or_else(|e| panic!("{p}{name}: {e}"))
}

fn start_with(up: &Upstream, vapi: &str) -> Daemon {
    start_in(tempfile::tempdir().unwrap(), up, vapi)
}

fn start_in(dir: tempfile::TempDir, up: &Upstream, vapi: &str) -> Daemon {
    let text = config(
        dir.path(),
        &up.url(),
        // The local API's token must not apply to the webhook.
        "token = \"local-api-token\"",
        "",
        &format!("[tags]\nstatic = {{ host = \"h1\", env = \"static-env\" }}\n[vapi]\n{vapi}\n"),
    );
    Daemon::start(dir, &text)
}

fn secret_auth() -> String {
    format!("secret = \"{SECRET}\"")
}

/// POSTs to the webhook with the shared secret.
fn post(d: &Daemon, body: Vec<u8>) -> (u16, Value) {
    let (status, _, v) = d.post_raw("/webhooks/vapi", body, &[("x-vapi-secret", SECRET)]);
    (status, v)
}

fn metrics(d: &Daemon) -> String {
    d.get("/metrics").1
}

fn counter(d: &Daemon, series: &str) -> f64 {
    metric(&metrics(d), series).unwrap_or(0.0)
}

fn vapi_events(up: &Upstream, session: &str) -> Vec<Value> {
    up.delivered()
        .into_iter()
        .filter(|e| e["session_id"] == session)
        .collect()
}

/// Waits for `n` delivered events of a session; returns them in item order (indicator last).
fn wait_session(up: &Upstream, session: &str, n: usize) -> Vec<Value> {
    wait_until("the call's events upstream", || {
        let v = vapi_events(up, session);
        (v.len() >= n).then_some(v)
    })
}

fn by_id<'a>(events: &'a [Value], id: &str) -> &'a Value {
    events
        .iter()
        .find(|e| e["id"] == id)
        .unwrap_or_else(|| panic!("no event {id} in {events:#?}"))
}

/// The event without `received_at` (the only field that varies per run), after checking it.
fn fixed(e: &Value) -> Value {
    let mut e = e.clone();
    let o = e.as_object_mut().unwrap();
    let r = o.remove("received_at").expect("received_at");
    assert!(r.as_str().is_some_and(|s| s.ends_with('Z')));
    e
}

fn item_id(call: &str, i: &str) -> String {
    derived_id(&format!("{call}/end-of-call-report/{i}"))
}

#[test]
fn pipeline_sample_exact_events_and_duplicates_add_nothing() {
    let up = Upstream::start(vec![]);
    let d = start_with(&up, &secret_auth());
    let (s, v) = post(&d, sample("status_update_in_progress.json"));
    assert_eq!((s, &v), (200, &json!({})));
    let (s, v) = post(&d, sample("end_of_call_report_pipeline.json"));
    assert_eq!((s, &v), (200, &json!({})));

    let events = wait_session(&up, PIPELINE_CALL, 6);
    assert_eq!(events.len(), 6, "{events:#?}");
    let common = json!({
        "source": "vapi", "session_id": PIPELINE_CALL, "agent_id": "agent-7",
        "customer_id": "cust-42", "indicator": "voice-session",
        "occurred_at": "2026-03-12T17:06:28.909000Z",
        "meta_tags": {"env": "staging", "feature": "ivr", "host": "h1"},
    });
    let expect = |id: String, rest: Value| {
        let mut e = common.clone();
        let o = e.as_object_mut().unwrap();
        o.insert("id".into(), json!(id));
        for (k, v) in rest.as_object().unwrap() {
            o.insert(k.clone(), v.clone());
        }
        e
    };
    let id = |i: &str| item_id(PIPELINE_CALL, i);
    assert_eq!(
        fixed(by_id(&events, &id("0"))),
        expect(
            id("0"),
            json!({"kind": "stt", "provider": "deepgram", "model": "nova-3", "cost_usd": 0.015902,
                   "usage": {"audio_seconds": 95.412, "audio_minutes": 1.5902, "language": "en"}})
        )
    );
    assert_eq!(
        fixed(by_id(&events, &id("1"))),
        expect(
            id("1"),
            json!({"kind": "llm", "provider": "openai", "model": "gpt-4o", "cost_usd": 0.013645,
                   "usage": {"prompt_tokens": 4210, "completion_tokens": 312,
                             "cached_tokens": 1024, "reasoning_tokens": 0}})
        )
    );
    assert_eq!(
        fixed(by_id(&events, &id("2"))),
        expect(
            id("2"),
            json!({"kind": "tts", "provider": "11labs", "model": "eleven_turbo_v2_5",
                   "cost_usd": 0.042624, "usage": {"characters": 1184}})
        )
    );
    assert_eq!(
        fixed(by_id(&events, &id("3"))),
        expect(
            id("3"),
            json!({"kind": "external_cost", "cost_usd": 0.07951,
                   "usage": {"name": "vapi", "external_cost_id": "vapi",
                             "properties": {"subType": "normal", "minutes": 1.5902}}})
        )
    );
    assert_eq!(
        fixed(by_id(&events, &id("4"))),
        expect(
            id("4"),
            json!({"kind": "llm", "provider": "openai", "model": "gpt-4o", "cost_usd": 0.00269,
                   "usage": {"prompt_tokens": 820, "completion_tokens": 64, "cached_tokens": 0,
                             "reasoning_tokens": 0, "purpose": "analysis",
                             "analysis_type": "summary"}})
        )
    );
    assert_eq!(
        fixed(by_id(&events, &id("indicator"))),
        expect(
            id("indicator"),
            json!({"kind": "indicator",
                   "usage": {"indicators": ["voice-session"], "total_duration_minutes": 1.5902}})
        )
    );

    // The same report again, and again after a restart: answered 2xx, nothing added.
    let received = "voicetagd_events_received_total{source=\"vapi\",kind=\"llm\"}";
    assert_eq!(counter(&d, received), 2.0);
    let (s, v) = post(&d, sample("end_of_call_report_pipeline.json"));
    assert_eq!((s, &v), (200, &json!({})));
    assert_eq!(counter(&d, received), 2.0);
    assert_eq!(counter(&d, "voicetagd_vapi_duplicate_reports_total"), 1.0);
    let (code, _, dir) = d.terminate_keep();
    assert_eq!(code, 0);
    let d = start_in(dir, &up, &secret_auth());
    let (s, _) = post(&d, sample("end_of_call_report_pipeline.json"));
    assert_eq!(s, 200);
    assert_eq!(counter(&d, "voicetagd_vapi_duplicate_reports_total"), 1.0);
    assert_eq!(counter(&d, received), 0.0);
    // A later call goes through, so the upstream has seen everything before it.
    post(&d, sample("end_of_call_report_realtime.json"));
    wait_session(&up, REALTIME_CALL, 2);
    assert_eq!(vapi_events(&up, PIPELINE_CALL).len(), 6);
    assert_eq!(
        counter(
            &d,
            "voicetagd_vapi_messages_total{type=\"end-of-call-report\"}"
        ),
        2.0
    );
}

#[test]
fn report_without_status_update_starts_the_session_and_skips_zero_items() {
    let up = Upstream::start(vec![]);
    let d = start_with(&up, &secret_auth());
    let (s, _) = post(&d, sample("end_of_call_report_realtime.json"));
    assert_eq!(s, 200);
    let events = wait_session(&up, REALTIME_CALL, 2);
    assert_eq!(events.len(), 2, "{events:#?}");
    let tags = json!({"env": "staging", "feature": "ivr", "host": "h1"});
    let base = |id: String| {
        json!({"id": id, "source": "vapi", "session_id": REALTIME_CALL, "agent_id": "agent-7",
               "customer_id": "cust-42", "indicator": "voice-session",
               "occurred_at": "2026-03-12T17:32:07.025000Z", "meta_tags": tags})
    };
    // Item 0, the zero-minute, zero-cost transcriber of a realtime model, makes no event.
    let mut vapi = base(item_id(REALTIME_CALL, "1"));
    vapi["kind"] = json!("external_cost");
    vapi["cost_usd"] = json!(0.052065);
    vapi["usage"] = json!({"name": "vapi", "external_cost_id": "vapi",
                           "properties": {"subType": "normal", "minutes": 1.0413}});
    assert_eq!(fixed(by_id(&events, &item_id(REALTIME_CALL, "1"))), vapi);
    let mut ind = base(item_id(REALTIME_CALL, "indicator"));
    ind["kind"] = json!("indicator");
    ind["usage"] = json!({"indicators": ["voice-session"], "total_duration_minutes": 1.041333333});
    assert_eq!(
        fixed(by_id(&events, &item_id(REALTIME_CALL, "indicator"))),
        ind
    );
}

/// The pipeline sample's report with every metadata object removed.
fn report_without_metadata() -> Vec<u8> {
    let mut v: Value = serde_json::from_slice(&sample("end_of_call_report_pipeline.json")).unwrap();
    v["message"]["call"]
        .as_object_mut()
        .unwrap()
        .remove("metadata");
    serde_json::to_vec(&v).unwrap()
}

#[test]
fn status_updates_start_and_end_the_session_and_its_tags_outlive_the_end() {
    let up = Upstream::start(vec![]);
    let d = start_with(&up, &secret_auth());
    let (s, _) = post(&d, sample("status_update_in_progress.json"));
    assert_eq!(s, 200);
    let ended = json!({"message": {"type": "status-update", "status": "ended",
                                   "endedReason": "customer-ended-call",
                                   "call": {"id": PIPELINE_CALL}}});
    let (s, _) = post(&d, serde_json::to_vec(&ended).unwrap());
    assert_eq!(s, 200);
    // A late in-progress without metadata neither revives the call nor replaces its tags.
    let late = json!({"message": {"type": "status-update", "status": "in-progress",
                                  "call": {"id": PIPELINE_CALL}}});
    let (s, _) = post(&d, serde_json::to_vec(&late).unwrap());
    assert_eq!(s, 200);
    // The report comes after the end and carries no metadata: the ended session (within
    // ended_grace) still stamps its events.
    let (s, _) = post(&d, report_without_metadata());
    assert_eq!(s, 200);
    let events = wait_session(&up, PIPELINE_CALL, 6);
    for e in &events {
        assert_eq!(e["agent_id"], "agent-7", "{e}");
        assert_eq!(e["customer_id"], "cust-42");
        assert_eq!(
            e["meta_tags"],
            json!({"env": "staging", "feature": "ivr", "host": "h1"})
        );
    }
    let m = metrics(&d);
    assert_eq!(
        metric(&m, "voicetagd_vapi_messages_total{type=\"status-update\"}"),
        Some(3.0)
    );
    assert!(!m.contains("voicetagd_vapi_default_ids_total"), "{m}");
}

#[test]
fn concurrent_deliveries_of_one_report_add_its_events_once() {
    let up = Upstream::start(vec![]);
    let d = start_with(&up, &secret_auth());
    let body = report_without_metadata();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| post(&d, body.clone()).0))
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), 200);
        }
    });
    assert_eq!(counter(&d, "voicetagd_vapi_duplicate_reports_total"), 3.0);
    assert_eq!(
        counter(
            &d,
            "voicetagd_events_received_total{source=\"vapi\",kind=\"llm\"}"
        ),
        2.0
    );
    // Unknown ids: the configured defaults, counted once for the one session start.
    let events = wait_session(&up, PIPELINE_CALL, 6);
    assert!(events.iter().all(|e| e["agent_id"] == "vapi-agent"
        && e["customer_id"] == "vapi-customer"
        && e["meta_tags"] == json!({"env": "static-env", "host": "h1"})));
    assert_eq!(
        counter(&d, "voicetagd_vapi_default_ids_total{field=\"agent_id\"}"),
        1.0
    );
}

#[test]
fn every_cost_type_headers_fallback_and_defaults() {
    let up = Upstream::start(vec![]);
    let d = start_with(
        &up,
        &format!("{}\ndefault_customer_id = \"walk-in\"", secret_auth()),
    );
    let call = "call-all-types";
    let report = json!({"message": {
    "type": "end-of-call-report", "endedReason": "customer-ended-call",
    "artifact": {}, "analysis": {}, "timestamp": 1773335188909u64,
    "durationSeconds": 30,
    "call": {"id": call, "orgId": "o", "createdAt": "2026-03-12T17:00:00Z",
             "updatedAt": "2026-03-12T17:00:00Z",
             "assistantOverrides": {"metadata": {
                 "paygent_indicator": "ivr-minutes",
                 "paygent_meta_tags": {"team": "billing", "bad key": "x"},
                 "paygent_llm_plan": "enterprise"}}},
    "costs": [
        {"type": "model", "model": {"provider": "openai", "model": "gpt-realtime"},
         "promptTokens": 900, "completionTokens": 300, "cachedPromptTokens": 100, "cost": 0.2},
        {"type": "model", "model": {"provider": "openai", "model": "gpt-4o-mini"},
         "promptTokens": 10, "completionTokens": 5, "reasoningTokens": 2, "cost": 0.001},
        {"type": "knowledge-base", "model": {"provider": "openai", "model": "gpt-4o-mini"},
         "promptTokens": 50, "completionTokens": 7, "cost": 0.0004},
        {"type": "voicemail-detection", "provider": "google",
         "model": {"provider": "google", "model": "gemini-2.0-flash"},
         "promptTextTokens": 12, "promptAudioTokens": 300, "completionTextTokens": 1,
         "completionAudioTokens": 0, "cost": 0.0003},
        {"type": "transport", "provider": "twilio", "minutes": 0.5, "cost": 0.007},
        {"type": "brand-new-thing", "widgets": 3, "cost": 0.05}
    ]}});
    let (s, _, v) = d.post_raw(
        "/webhooks/vapi",
        serde_json::to_vec(&report).unwrap(),
        &[("x-vapi-secret", SECRET), ("paygent-agent-id", "hdr-agent")],
    );
    assert_eq!((s, v), (200, json!({})));
    let events = wait_session(&up, call, 7);
    let ev = |i: &str| fixed(by_id(&events, &item_id(call, i)));
    for e in &events {
        assert_eq!(e["agent_id"], "hdr-agent");
        assert_eq!(e["customer_id"], "walk-in");
        assert_eq!(e["indicator"], "ivr-minutes");
        assert_eq!(e["occurred_at"], "2026-03-12T17:06:28.909000Z");
        assert_eq!(
            e["meta_tags"],
            json!({"team": "billing", "env": "static-env", "host": "h1"})
        );
    }
    let e = ev("0");
    assert_eq!(
        (&e["kind"], &e["model"], &e["cost_usd"]),
        (&json!("sts"), &json!("gpt-realtime"), &json!(0.2))
    );
    assert_eq!(
        e["usage"],
        json!({"schemaVersion": 1, "input": {"text": {"tokens": 900}},
               "output": {"text": {"tokens": 300}}, "cached": {"tokens": 100}})
    );
    let e = ev("1");
    assert_eq!(
        (&e["kind"], &e["plan"]),
        (&json!("llm"), &json!("enterprise"))
    );
    assert_eq!(
        e["usage"],
        json!({"prompt_tokens": 10, "completion_tokens": 5, "cached_tokens": 0, "reasoning_tokens": 2})
    );
    let e = ev("2");
    assert_eq!(e["usage"]["purpose"], "knowledge-base");
    assert!(e.get("plan").is_none());
    let e = ev("3");
    assert_eq!(
        (&e["kind"], &e["provider"], &e["model"]),
        (&json!("llm"), &json!("google"), &json!("gemini-2.0-flash"))
    );
    assert_eq!(
        e["usage"],
        json!({"prompt_tokens": 312, "completion_tokens": 1, "cached_tokens": 0,
               "reasoning_tokens": 0, "purpose": "voicemail-detection",
               "prompt_text_tokens": 12, "prompt_audio_tokens": 300,
               "completion_text_tokens": 1, "completion_audio_tokens": 0,
               "detection_provider": "google"})
    );
    let e = ev("4");
    assert_eq!(
        (&e["kind"], &e["usage"], &e["cost_usd"]),
        (
            &json!("external_cost"),
            &json!({"name": "transport", "external_cost_id": "vapi",
                    "properties": {"provider": "twilio", "minutes": 0.5}}),
            &json!(0.007)
        )
    );
    assert!(e.get("provider").is_none());
    let e = ev("5");
    assert_eq!(
        e["usage"],
        json!({"name": "brand-new-thing", "external_cost_id": "vapi", "properties": {"widgets": 3}})
    );
    let e = ev("indicator");
    assert_eq!(
        e["usage"],
        json!({"indicators": ["ivr-minutes"], "total_duration_minutes": 0.5})
    );
    let m = metrics(&d);
    assert_eq!(
        metric(
            &m,
            "voicetagd_vapi_default_ids_total{field=\"customer_id\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "voicetagd_vapi_default_ids_total{field=\"agent_id\"}"),
        None
    );
    assert_eq!(
        metric(&m, "voicetagd_tags_skipped_total{reason=\"key_charset\"}"),
        Some(1.0)
    );
}

#[test]
fn other_message_types_are_counted_and_make_no_event() {
    let up = Upstream::start(vec![]);
    let d = start_with(&up, &secret_auth());
    for ty in [
        "transcript",
        "some-future-type",
        "assistant-request",
        "hang",
    ] {
        let body = json!({"message": {"type": ty, "call": {"id": "call-x"}}});
        let (s, v) = post(&d, serde_json::to_vec(&body).unwrap());
        assert_eq!((s, v), (200, json!({})), "{ty}");
    }
    let m = metrics(&d);
    for (ty, n) in [
        ("transcript", 1.0),
        ("other", 1.0),
        ("assistant-request", 1.0),
        ("hang", 1.0),
    ] {
        assert_eq!(
            metric(
                &m,
                &format!("voicetagd_vapi_messages_total{{type=\"{ty}\"}}")
            ),
            Some(n),
            "{ty}"
        );
    }
    assert!(!m.contains("voicetagd_events_received_total"), "{m}");

    // Malformed bodies are refused after authentication, naming the problem.
    for (body, want) in [
        (b"not json".to_vec(), "body is not JSON"),
        (
            b"{\"type\":\"status-update\"}".to_vec(),
            "message is required",
        ),
        (
            b"{\"message\":{\"status\":\"ended\"}}".to_vec(),
            "message.type is required",
        ),
        (
            b"{\"message\":{\"type\":\"status-update\",\"status\":\"in-progress\"}}".to_vec(),
            "message.call.id is required",
        ),
        (
            b"{\"message\":{\"type\":\"end-of-call-report\",\"call\":{}}}".to_vec(),
            "message.call.id is required",
        ),
    ] {
        let (s, v) = post(&d, body);
        assert_eq!(s, 400, "{v}");
        assert!(v["error"].as_str().unwrap().contains(want), "{v}");
    }
    // Without credentials even a malformed body is a 401: nothing is parsed before auth.
    let (s, _, v) = d.post_raw("/webhooks/vapi", b"not json".to_vec(), &[]);
    assert_eq!(
        (s, v),
        (401, json!({"error": "vapi webhook authentication failed"}))
    );
    assert_eq!(counter(&d, "voicetagd_vapi_auth_failures_total"), 1.0);
}

// ---------------------------------------------------------------------------------------------
// Authentication
// ---------------------------------------------------------------------------------------------

const HANG: &[u8] = br#"{"message":{"type":"hang","timestamp":1773335093538}}"#;

fn hmac_hex(alg: &str, key: &[u8], msg: &[u8]) -> Vec<u8> {
    match alg {
        "sha256" => {
            let mut m = <Hmac<sha2::Sha256> as Mac>::new_from_slice(key).unwrap();
            m.update(msg);
            m.finalize().into_bytes().to_vec()
        }
        "sha512" => {
            let mut m = <Hmac<sha2::Sha512> as Mac>::new_from_slice(key).unwrap();
            m.update(msg);
            m.finalize().into_bytes().to_vec()
        }
        "sha1" => {
            let mut m = <Hmac<sha1::Sha1> as Mac>::new_from_slice(key).unwrap();
            m.update(msg);
            m.finalize().into_bytes().to_vec()
        }
        other => panic!("{other}"),
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn status_of(d: &Daemon, body: &[u8], headers: &[(&str, &str)]) -> u16 {
    d.post_raw("/webhooks/vapi", body.to_vec(), headers).0
}

#[test]
fn plain_secret_bearer_and_default_hmac_any_one_passes() {
    let up = Upstream::start(vec![]);
    let d = start_with(
        &up,
        &format!(
            "secret = \"{SECRET}\"\nbearer_token = \"b-token\"\n[vapi.hmac]\nsecret = \"h-key\"\n"
        ),
    );
    // Plain secret, current and legacy header.
    assert_eq!(status_of(&d, HANG, &[("x-vapi-secret", SECRET)]), 200);
    assert_eq!(status_of(&d, HANG, &[("x-vapi-signature", SECRET)]), 200);
    assert_eq!(
        status_of(&d, HANG, &[("x-vapi-secret", "vapi-shared-secreT")]),
        401
    );
    assert_eq!(
        status_of(&d, HANG, &[("x-vapi-secret", "vapi-shared")]),
        401
    );
    // Bearer.
    assert_eq!(
        status_of(&d, HANG, &[("authorization", "Bearer b-token")]),
        200
    );
    assert_eq!(
        status_of(&d, HANG, &[("authorization", "Bearer b-tokem")]),
        401
    );
    // The local API's token is not a Vapi credential.
    assert_eq!(
        status_of(&d, HANG, &[("authorization", "Bearer local-api-token")]),
        401
    );
    // HMAC with the SDK defaults: sha256, hex, x-signature, x-timestamp, "{timestamp}.{body}".
    let sign = |ts: &str, body: &[u8], key: &[u8]| {
        hex::encode(hmac_hex(
            "sha256",
            key,
            &[ts.as_bytes(), b".", body].concat(),
        ))
    };
    let ts = now_secs().to_string();
    let good = sign(&ts, HANG, b"h-key");
    assert_eq!(
        status_of(&d, HANG, &[("x-signature", &good), ("x-timestamp", &ts)]),
        200
    );
    let ms = (now_secs() * 1000 + 250).to_string();
    let good_ms = sign(&ms, HANG, b"h-key");
    assert_eq!(
        status_of(&d, HANG, &[("x-signature", &good_ms), ("x-timestamp", &ms)]),
        200,
        "millisecond timestamps are accepted"
    );
    let tampered = br#"{"message":{"type":"hang","timestamp":1773335093539}}"#;
    assert_eq!(
        status_of(
            &d,
            tampered,
            &[("x-signature", &good), ("x-timestamp", &ts)]
        ),
        401,
        "tampered body"
    );
    let wrong_key = sign(&ts, HANG, b"h-kez");
    assert_eq!(
        status_of(
            &d,
            HANG,
            &[("x-signature", &wrong_key), ("x-timestamp", &ts)]
        ),
        401
    );
    let stale = (now_secs() - 301).to_string();
    let stale_sig = sign(&stale, HANG, b"h-key");
    assert_eq!(
        status_of(
            &d,
            HANG,
            &[("x-signature", &stale_sig), ("x-timestamp", &stale)]
        ),
        401,
        "timestamp outside the 5m tolerance"
    );
    let future_ms = ((now_secs() + 310) * 1000).to_string();
    let future_sig = sign(&future_ms, HANG, b"h-key");
    assert_eq!(
        status_of(
            &d,
            HANG,
            &[("x-signature", &future_sig), ("x-timestamp", &future_ms)]
        ),
        401
    );
    // The timestamp is part of what is signed.
    let other_ts = (now_secs() - 1).to_string();
    assert_eq!(
        status_of(
            &d,
            HANG,
            &[("x-signature", &good), ("x-timestamp", &other_ts)]
        ),
        401
    );
    assert_eq!(status_of(&d, HANG, &[("x-signature", &good)]), 401);
    assert_eq!(status_of(&d, HANG, &[]), 401);
    assert_eq!(counter(&d, "voicetagd_vapi_auth_failures_total"), 11.0);
}

#[test]
fn hmac_variants_sha512_base64_prefix_sha1() {
    let up = Upstream::start(vec![]);
    let b64 = base64::engine::general_purpose::STANDARD;
    let raw_key = b"\x00\x01binary-key\xff";

    // sha512, base64 signature, base64 secret, custom headers and format.
    let d = start_with(
        &up,
        &format!(
            "[vapi.hmac]\nsecret = \"{}\"\nsecret_is_base64 = true\nalgorithm = \"sha512\"\nencoding = \"base64\"\nsignature_header = \"X-Hub-Sig\"\ntimestamp_header = \"X-Hub-Time\"\npayload_format = \"v1:{{timestamp}}:{{body}}\"\ntolerance = \"30s\"\n",
            b64.encode(raw_key)
        ),
    );
    let ts = now_secs().to_string();
    let msg = [b"v1:", ts.as_bytes(), b":", HANG].concat();
    let sig = b64.encode(hmac_hex("sha512", raw_key, &msg));
    assert_eq!(
        status_of(&d, HANG, &[("x-hub-sig", &sig), ("x-hub-time", &ts)]),
        200
    );
    // Keyed with the base64 text instead of the decoded bytes: refused.
    let wrong = b64.encode(hmac_hex("sha512", b64.encode(raw_key).as_bytes(), &msg));
    assert_eq!(
        status_of(&d, HANG, &[("x-hub-sig", &wrong), ("x-hub-time", &ts)]),
        401
    );
    let hex_sig = hex::encode(hmac_hex("sha512", raw_key, &msg));
    assert_eq!(
        status_of(&d, HANG, &[("x-hub-sig", &hex_sig), ("x-hub-time", &ts)]),
        401,
        "hex where base64 is configured"
    );
    let stale = (now_secs() - 31).to_string();
    let stale_msg = [b"v1:", stale.as_bytes(), b":", HANG].concat();
    let stale_sig = b64.encode(hmac_hex("sha512", raw_key, &stale_msg));
    assert_eq!(
        status_of(
            &d,
            HANG,
            &[("x-hub-sig", &stale_sig), ("x-hub-time", &stale)]
        ),
        401
    );
    drop(d);

    // Vapi's knowledge-base example: x-vapi-signature = "sha256=" + hex(HMAC(body)), no
    // timestamp.
    let d = start_with(
        &up,
        "[vapi.hmac]\nsecret = \"kb-key\"\nsignature_header = \"x-vapi-signature\"\nprefix = \"sha256=\"\npayload_format = \"{body}\"\n",
    );
    let sig = format!(
        "sha256={}",
        hex::encode(hmac_hex("sha256", b"kb-key", HANG))
    );
    assert_eq!(status_of(&d, HANG, &[("x-vapi-signature", &sig)]), 200);
    let bad = format!(
        "sha256={}",
        hex::encode(hmac_hex("sha256", b"kb-kez", HANG))
    );
    assert_eq!(status_of(&d, HANG, &[("x-vapi-signature", &bad)]), 401);
    let tampered = br#"{"message":{"type":"hang" }}"#;
    assert_eq!(status_of(&d, tampered, &[("x-vapi-signature", &sig)]), 401);
    drop(d);

    // sha1, hex, default headers and format.
    let d = start_with(
        &up,
        "[vapi.hmac]\nsecret = \"sha1-key\"\nalgorithm = \"sha1\"\n",
    );
    let ts = now_secs().to_string();
    let msg = [ts.as_bytes(), b".", HANG].concat();
    let sig = hex::encode(hmac_hex("sha1", b"sha1-key", &msg));
    assert_eq!(
        status_of(&d, HANG, &[("x-signature", &sig), ("x-timestamp", &ts)]),
        200
    );
    let sig256 = hex::encode(hmac_hex("sha256", b"sha1-key", &msg));
    assert_eq!(
        status_of(&d, HANG, &[("x-signature", &sig256), ("x-timestamp", &ts)]),
        401
    );
}

#[test]
fn nothing_configured_is_401_unless_explicitly_allowed() {
    let up = Upstream::start(vec![]);
    let d = start_with(&up, "");
    assert_eq!(status_of(&d, HANG, &[("x-vapi-secret", "anything")]), 401);
    drop(d);
    let d = start_with(&up, "allow_unauthenticated = true");
    assert_eq!(status_of(&d, HANG, &[]), 200);
}

// ---------------------------------------------------------------------------------------------
// forward_url
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<(HeaderMap, Bytes)>>>);

/// The application's own webhook handler: answers tool calls and assistant requests.
struct App {
    addr: SocketAddr,
    seen: Seen,
    _rt: tokio::runtime::Runtime,
}

async fn app_handler(
    State(seen): State<Seen>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    seen.0.lock().unwrap().push((headers, body));
    // Like Vapi's SDK, a tool-calls message may come without its type.
    let ty = v["message"]["type"]
        .as_str()
        .or_else(|| v["message"].get("toolCallList").map(|_| "tool-calls"));
    match ty {
        Some("assistant-request") => (
            StatusCode::OK,
            [("content-type", "application/json")],
            r#"{"assistantId":"asst-from-app"}"#.to_string(),
        ),
        Some("tool-calls") => (
            StatusCode::CREATED,
            [("content-type", "application/vnd.app+json")],
            r#"{"results":[{"toolCallId":"t1","result":"42"}]}"#.to_string(),
        ),
        _ => (
            StatusCode::ACCEPTED,
            [("content-type", "text/plain")],
            "noted".to_string(),
        ),
    }
}

impl App {
    fn start() -> App {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let seen = Seen::default();
        let app = Router::new()
            .route("/vapi-hook", route_post(app_handler))
            .with_state(seen.clone());
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
        App {
            addr,
            seen,
            _rt: rt,
        }
    }
}

#[test]
fn forward_url_passes_every_message_on_and_returns_the_answer() {
    let up = Upstream::start(vec![]);
    let app = App::start();
    let d = start_with(
        &up,
        &format!(
            "{}\nforward_url = \"http://{}/vapi-hook\"\nforward_timeout = \"5s\"",
            secret_auth(),
            app.addr
        ),
    );
    let send = |body: Vec<u8>| {
        let client = reqwest::blocking::Client::new();
        let r = client
            .post(d.url("/webhooks/vapi"))
            .header("content-type", "application/json; charset=utf-8")
            .header("x-vapi-secret", SECRET)
            .header("x-call-tag", "abc")
            .body(body)
            .send()
            .unwrap();
        let ct = r
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string());
        (r.status().as_u16(), ct, r.text().unwrap())
    };
    let ask = br#"{"message":{"type":"assistant-request","call":{"id":"c-fwd"}}}"#.to_vec();
    assert_eq!(
        send(ask.clone()),
        (
            200,
            Some("application/json".into()),
            r#"{"assistantId":"asst-from-app"}"#.into()
        )
    );
    let tools = br#"{"message":{"toolCallList":[{"id":"t1"}],"toolWithToolCallList":[]}}"#.to_vec();
    assert_eq!(
        send(tools),
        (
            201,
            Some("application/vnd.app+json".into()),
            r#"{"results":[{"toolCallId":"t1","result":"42"}]}"#.into()
        )
    );
    // Usage is recorded and the report forwarded too.
    let report = sample("end_of_call_report_pipeline.json");
    assert_eq!(
        send(report.clone()),
        (202, Some("text/plain".into()), "noted".into())
    );
    assert_eq!(wait_session(&up, PIPELINE_CALL, 6).len(), 6);
    {
        let seen = app.seen.0.lock().unwrap();
        assert_eq!(seen.len(), 3);
        let (h, b) = &seen[0];
        assert_eq!(b.as_ref(), ask.as_slice(), "the exact raw body");
        assert_eq!(h["x-vapi-secret"], SECRET);
        assert_eq!(h["x-call-tag"], "abc");
        assert_eq!(h["content-type"], "application/json; charset=utf-8");
        assert_eq!(seen[2].1.as_ref(), report.as_slice());
    }
    assert_eq!(
        counter(&d, "voicetagd_vapi_messages_total{type=\"tool-calls\"}"),
        1.0
    );
    // Refused requests are not passed on.
    let (s, _, _) = d.post_raw("/webhooks/vapi", ask.clone(), &[("x-vapi-secret", "nope")]);
    assert_eq!(s, 401);
    assert_eq!(app.seen.0.lock().unwrap().len(), 3);
    drop(d);

    // A handler that is down: 502, and the usage is still recorded.
    let down = Upstream::free_addr();
    let d = start_with(
        &up,
        &format!(
            "{}\nforward_url = \"http://{down}/vapi-hook\"",
            secret_auth()
        ),
    );
    let (s, _, v) = d.post_raw(
        "/webhooks/vapi",
        sample("end_of_call_report_realtime.json"),
        &[("x-vapi-secret", SECRET)],
    );
    assert_eq!(s, 502, "{v}");
    assert!(v["error"].as_str().unwrap().contains("forwarding"), "{v}");
    assert_eq!(wait_session(&up, REALTIME_CALL, 2).len(), 2);
}
