//! The Paygent-compatible API end to end: every SDK path in, the exact stamped events out.

mod common;

use common::{Answer, Daemon, Upstream, config, metric, wait_until};
use serde_json::{Value, json};

fn start(upstream: &Upstream, server_extra: &str, rest: &str) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let text = config(
        dir.path(),
        &upstream.url(),
        server_extra,
        "",
        &format!("[tags]\nstatic = {{ host = \"h1\", env = \"static-env\" }}\n{rest}"),
    );
    Daemon::start(dir, &text)
}

fn by_kind<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["kind"] == kind).collect()
}

/// Removes the fields that vary per run (ids, times), after checking they are present.
fn stable(e: &Value) -> Value {
    let mut e = e.clone();
    let o = e.as_object_mut().unwrap();
    for k in ["id", "occurred_at", "received_at"] {
        let v = o
            .remove(k)
            .unwrap_or_else(|| panic!("event lacks {k}: {e:?}", e = o));
        assert!(
            v.as_str().is_some_and(|s| !s.is_empty()),
            "{k} must be a non-empty string"
        );
    }
    e
}

#[test]
fn every_sdk_path_in_exact_stamped_events_out() {
    let up = Upstream::start(vec![]);
    let d = start(&up, "", "");
    let ok = |path: &str, body: Value| {
        let (status, _, resp) = d.post(path, &body);
        assert_eq!(status, 200, "{path}: {resp}");
        resp
    };
    ok(
        "/api/v1/voice/session",
        json!({"sessionId": "sess-1", "agentId": "my-agent", "customerId": "customer-123",
               "metaTags": {"env": "staging", "feature": "ivr"}}),
    );
    ok(
        "/api/v1/voice/stt",
        json!({"sessionId": "sess-1", "audioMinutes": 1.5902, "provider": "deepgram", "model": "nova-3", "plan": "", "language": "en"}),
    );
    ok(
        "/api/v1/voice/llm",
        json!({"sessionId": "sess-1", "provider": "openai", "model": "gpt-4o-mini", "plan": "default",
               "promptTokens": 812, "completionTokens": 96, "cachedTokens": 512}),
    );
    ok(
        "/api/v1/voice/tts",
        json!({"sessionId": "sess-1", "provider": "cartesia", "model": "sonic-2", "plan": "", "characters": 143,
               "metaTags": {"feature": "tts-override"}}),
    );
    let sts_usage = json!({"schemaVersion": 1,
        "input": {"text": {"tokens": 250}, "audio": {"tokens": 1200}},
        "output": {"text": {"tokens": 70}, "audio": {"tokens": 310}},
        "cached": {"text": {"tokens": 128}, "audio": {"tokens": 512}}});
    ok(
        "/api/v1/voice/speech-to-speech",
        json!({"sessionId": "sess-1", "provider": "openai", "model": "gpt-realtime", "plan": "", "usageMetadata": sts_usage}),
    );
    ok(
        "/api/v1/voice/indicator",
        json!({"sessionId": "sess-1", "indicator": "voice-session", "totalDuration": 2.5}),
    );
    ok(
        "/api/v1/voice/additional-indicators",
        json!({"sessionId": "sess-1", "indicators": ["ivr", "escalation"], "totalDuration": 2.5}),
    );
    ok(
        "/api/v2/usage",
        json!({"agentId": "my-agent", "customerId": "customer-123", "indicator": "chat-message",
               "rawUsage": {"provider": "Open AI", "model": "gpt-4o-mini", "plan": "default", "inputTokens": 100, "outputTokens": 50},
               "metaTags": {"env": "staging", "region": "eu"}}),
    );
    ok(
        "/api/v2/revenue",
        json!({"agentId": "my-agent", "customerId": "customer-123", "indicator": "resolved-ticket"}),
    );
    ok(
        "/api/v1/external-billing",
        json!({"agentId": "my-agent", "customerId": "customer-123", "indicator": "telephony",
               "name": "outbound_call", "externalCostId": "telephony_cost", "properties": {"duration_minutes": 2.5},
               "metaTags": {"env": "staging", "channel": "voice"}}),
    );
    let cust = ok(
        "/api/v1/customers/create-or-get",
        json!({"name": "Dana", "externalId": "customer-123", "email": "dana@example.com"}),
    );
    assert_eq!(
        cust,
        json!({"id": "customer-123", "externalId": "customer-123", "name": "Dana"})
    );

    let events = up.wait_delivered(10);
    assert_eq!(events.len(), 10, "{events:#?}");
    let session_tags = json!({"env": "staging", "feature": "ivr", "host": "h1"});
    let voice = |kind: &str| stable(by_kind(&events, kind)[0]);

    assert_eq!(
        voice("stt"),
        json!({"kind": "stt", "source": "api", "session_id": "sess-1", "agent_id": "my-agent",
               "customer_id": "customer-123", "provider": "deepgram", "model": "nova-3",
               "meta_tags": session_tags,
               "usage": {"audio_seconds": 95.412, "audio_minutes": 1.5902, "language": "en"}})
    );
    assert_eq!(
        voice("llm"),
        json!({"kind": "llm", "source": "api", "session_id": "sess-1", "agent_id": "my-agent",
               "customer_id": "customer-123", "provider": "openai", "model": "gpt-4o-mini", "plan": "default",
               "meta_tags": session_tags,
               "usage": {"prompt_tokens": 812, "completion_tokens": 96, "cached_tokens": 512, "reasoning_tokens": 0}})
    );
    assert_eq!(
        voice("tts"),
        json!({"kind": "tts", "source": "api", "session_id": "sess-1", "agent_id": "my-agent",
               "customer_id": "customer-123", "provider": "cartesia", "model": "sonic-2",
               "meta_tags": {"env": "staging", "feature": "tts-override", "host": "h1"},
               "usage": {"characters": 143}})
    );
    assert_eq!(
        voice("sts"),
        json!({"kind": "sts", "source": "api", "session_id": "sess-1", "agent_id": "my-agent",
               "customer_id": "customer-123", "provider": "openai", "model": "gpt-realtime",
               "meta_tags": session_tags, "usage": sts_usage})
    );
    let ind = by_kind(&events, "indicator");
    assert_eq!(ind.len(), 3);
    assert_eq!(
        stable(ind[0]),
        json!({"kind": "indicator", "source": "api", "session_id": "sess-1", "agent_id": "my-agent",
               "customer_id": "customer-123", "indicator": "voice-session", "meta_tags": session_tags,
               "usage": {"indicators": ["voice-session"], "total_duration_minutes": 2.5}})
    );
    // The additional indicators inherit the session's indicator set just before.
    assert_eq!(
        stable(ind[1]),
        json!({"kind": "indicator", "source": "api", "session_id": "sess-1", "agent_id": "my-agent",
               "customer_id": "customer-123", "indicator": "voice-session", "meta_tags": session_tags,
               "usage": {"indicators": ["ivr", "escalation"], "total_duration_minutes": 2.5}})
    );
    assert_eq!(
        stable(ind[2]),
        json!({"kind": "indicator", "source": "api", "agent_id": "my-agent", "customer_id": "customer-123",
               "indicator": "resolved-ticket", "meta_tags": {"env": "static-env", "host": "h1"},
               "usage": {"indicators": ["resolved-ticket"]}})
    );
    assert_eq!(
        voice("usage"),
        json!({"kind": "usage", "source": "api", "agent_id": "my-agent", "customer_id": "customer-123",
               "indicator": "chat-message", "provider": "Open AI", "model": "gpt-4o-mini", "plan": "default",
               "meta_tags": {"env": "staging", "region": "eu", "host": "h1"},
               "usage": {"provider": "Open AI", "model": "gpt-4o-mini", "plan": "default", "inputTokens": 100, "outputTokens": 50}})
    );
    assert_eq!(
        voice("external_cost"),
        json!({"kind": "external_cost", "source": "api", "agent_id": "my-agent", "customer_id": "customer-123",
               "indicator": "telephony", "meta_tags": {"env": "staging", "channel": "voice", "host": "h1"},
               "usage": {"name": "outbound_call", "external_cost_id": "telephony_cost", "properties": {"duration_minutes": 2.5}}})
    );
    assert_eq!(
        voice("customer"),
        json!({"kind": "customer", "source": "api", "customer_id": "customer-123",
               "meta_tags": {"env": "static-env", "host": "h1"},
               "usage": {"name": "Dana", "externalId": "customer-123", "email": "dana@example.com"}})
    );
    // Ids are unique.
    let mut ids: Vec<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), events.len());
    // The batch carries its id as Idempotency-Key, and the API key.
    let req = &up.requests()[0];
    assert_eq!(
        req.headers["idempotency-key"].to_str().unwrap(),
        req.body["batch_id"].as_str().unwrap()
    );
    assert_eq!(req.headers["paygent-api-key"], "up-key");
    assert_eq!(req.headers["content-encoding"], "gzip");
}

#[test]
fn invalid_tags_are_skipped_and_counted_never_rejecting() {
    let up = Upstream::start(vec![]);
    let d = start(&up, "", "");
    let long = "x".repeat(257);
    let (status, _, _) = d.post(
        "/api/v1/voice/session",
        &json!({"sessionId": "s", "agentId": "a", "customerId": "c",
                "metaTags": {"env": "staging", "bad key": "x", "n": 7, "flag": true, "long": long, "obj": {"a": 1}}}),
    );
    assert_eq!(status, 200);
    let (status, _, _) = d.post(
        "/api/v1/voice/tts",
        &json!({"sessionId": "s", "characters": 5, "metaTags": "not-an-object"}),
    );
    assert_eq!(status, 200);
    let events = up.wait_delivered(1);
    assert_eq!(
        events[0]["meta_tags"],
        json!({"env": "staging", "n": "7", "flag": "true", "host": "h1"})
    );
    let (_, text) = d.get("/metrics");
    assert_eq!(
        metric(
            &text,
            "voicetagd_tags_skipped_total{reason=\"key_charset\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            "voicetagd_tags_skipped_total{reason=\"value_too_long\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "voicetagd_tags_skipped_total{reason=\"value_type\"}"),
        Some(1.0)
    );
    assert_eq!(
        metric(
            &text,
            "voicetagd_tags_skipped_total{reason=\"not_an_object\"}"
        ),
        Some(1.0)
    );
    assert!(
        d.logs()
            .iter()
            .any(|l| l.contains("skipped") && l.contains("bad key"))
    );
}

#[test]
fn event_before_its_session_start_gets_the_session_tags() {
    let up = Upstream::start(vec![]);
    let d = start(&up, "", "[sessions]\nunknown_session_wait = \"30s\"\n");
    let (status, _, _) = d.post(
        "/api/v1/voice/llm",
        &json!({"sessionId": "early", "promptTokens": 1, "completionTokens": 2}),
    );
    assert_eq!(status, 200, "the reply never waits for the session");
    let (status, _, _) = d.post(
        "/api/v1/voice/session",
        &json!({"sessionId": "early", "agentId": "a", "customerId": "c", "metaTags": {"env": "late"}}),
    );
    assert_eq!(status, 200);
    let events = up.wait_delivered(1);
    assert_eq!(events[0]["meta_tags"], json!({"env": "late", "host": "h1"}));
    assert_eq!(events[0]["agent_id"], "a");
}

#[test]
fn session_that_never_starts_goes_on_with_static_tags_and_is_counted() {
    let up = Upstream::start(vec![]);
    let d = start(&up, "", "[sessions]\nunknown_session_wait = \"100ms\"\n");
    let (status, _, _) = d.post(
        "/api/v1/voice/tts",
        &json!({"sessionId": "ghost", "characters": 3}),
    );
    assert_eq!(status, 200);
    let events = up.wait_delivered(1);
    assert_eq!(
        events[0]["meta_tags"],
        json!({"env": "static-env", "host": "h1"})
    );
    assert_eq!(events[0]["session_id"], "ghost");
    assert!(events[0].get("agent_id").is_none());
    let (_, text) = d.get("/metrics");
    assert_eq!(
        metric(
            &text,
            "voicetagd_unknown_session_events_total{source=\"api\"}"
        ),
        Some(1.0)
    );
}

#[test]
fn malformed_bodies_get_400_naming_the_problem() {
    let up = Upstream::start(vec![]);
    let d = start(&up, "", "");
    let rows: &[(&str, &[u8], &str)] = &[
        (
            "/api/v1/voice/stt",
            b"{not json",
            "invalid body for /api/v1/voice/stt",
        ),
        (
            "/api/v1/voice/stt",
            br#"{"audioMinutes": 1}"#,
            "sessionId is required",
        ),
        (
            "/api/v1/voice/stt",
            br#"{"sessionId": "s", "audioMinutes": null}"#,
            "audioMinutes is required",
        ),
        (
            "/api/v1/voice/stt",
            br#"{"sessionId": "s", "audioMinutes": -1}"#,
            "audioMinutes must be a non-negative number",
        ),
        (
            "/api/v1/voice/stt",
            br#"{"sessionId": "s", "audioMinutes": "2"}"#,
            "invalid type",
        ),
        (
            "/api/v1/voice/llm",
            br#"{"sessionId": "s", "promptTokens": 1}"#,
            "completionTokens is required",
        ),
        (
            "/api/v1/voice/speech-to-speech",
            br#"{"sessionId": "s", "usageMetadata": 3}"#,
            "usageMetadata is required",
        ),
        (
            "/api/v2/usage",
            br#"{"agentId": "a", "customerId": "c"}"#,
            "rawUsage is required",
        ),
        (
            "/api/v1/external-billing",
            br#"{"agentId": "a", "customerId": "c", "name": "n"}"#,
            "externalCostId is required",
        ),
        (
            "/api/v1/customers/create-or-get",
            br#"{"name": "n"}"#,
            "externalId is required",
        ),
        ("/api/v1/voice/session", br#"[]"#, "invalid body"),
    ];
    for (path, body, want) in rows {
        let (status, _, resp) = d.post_raw(path, body.to_vec(), &[]);
        assert_eq!(status, 400, "{path} {}", String::from_utf8_lossy(body));
        let msg = resp["error"].as_str().unwrap_or_default();
        assert!(
            msg.contains(want),
            "{path}: error {msg:?} should contain {want:?}"
        );
    }
    let (status, _, resp) = d.post("/api/v1/nope", &json!({}));
    assert_eq!(status, 404);
    assert!(resp["error"].as_str().unwrap().contains("/api/v1/nope"));
    assert!(up.delivered().is_empty());
    let (_, text) = d.get("/metrics");
    assert_eq!(
        metric(
            &text,
            "voicetagd_ingest_rejected_total{reason=\"bad_request\"}"
        ),
        Some(rows.len() as f64)
    );
    assert_eq!(
        metric(
            &text,
            "voicetagd_ingest_rejected_total{reason=\"not_found\"}"
        ),
        Some(1.0)
    );
}

#[test]
fn too_large_body_gets_413() {
    let up = Upstream::start(vec![]);
    let d = start(&up, "max_body_bytes = \"1KiB\"", "");
    let big = json!({"sessionId": "s", "audioMinutes": 1, "pad": "x".repeat(2000)});
    let (status, _, resp) = d.post("/api/v1/voice/stt", &big);
    assert_eq!(status, 413);
    assert!(resp["error"].as_str().unwrap().contains("too large"));
}

#[test]
fn token_is_required_when_configured() {
    let up = Upstream::start(vec![]);
    let d = start(&up, "token = \"s3cret\"", "");
    let body = json!({"sessionId": "s", "agentId": "a", "customerId": "c"});
    let (status, _, resp) = d.post("/api/v1/voice/session", &body);
    assert_eq!(status, 401);
    assert!(resp["error"].as_str().unwrap().contains("token"));
    let (status, _, _) = d.post_with(
        "/api/v1/voice/session",
        &body,
        &[("authorization", "Bearer wrong")],
    );
    assert_eq!(status, 401);
    let (status, _, _) = d.post_with(
        "/api/v1/voice/session",
        &body,
        &[("authorization", "Bearer s3cret")],
    );
    assert_eq!(status, 200);
    let (status, _, _) = d.post_with(
        "/api/v1/voice/session",
        &body,
        &[("paygent-api-key", "s3cret")],
    );
    assert_eq!(status, 200);
    // Health stays open for probes.
    assert_eq!(d.get("/healthz").0, 200);
}

#[test]
fn full_queue_answers_503_with_retry_after_and_recovers() {
    // The upstream answers 503 (Retry-After: 1) at first, so events pile up in a small queue.
    let up = Upstream::start(vec![Answer::retry_after(503, "1"); 4]);
    let d = common::small_spool_daemon(&up);
    let body = json!({"agentId": "a", "customerId": "c", "rawUsage": {"provider": "p", "model": "m", "inputTokens": 1}});
    let mut accepted = 0;
    let (status, headers, resp) = loop {
        let (status, headers, resp) = d.post("/api/v2/usage", &body);
        if status != 200 {
            break (status, headers, resp);
        }
        accepted += 1;
        assert!(accepted < 100, "the queue never filled");
    };
    assert_eq!(status, 503);
    assert_eq!(headers["retry-after"], "1");
    assert!(resp["error"].as_str().unwrap().contains("spool is full"));
    assert_eq!(d.get("/readyz").0, 503);
    // Once the upstream recovers, delivery frees space and ingest accepts again by itself.
    wait_until("ingest to accept again", || {
        let (status, _, _) = d.post("/api/v2/usage", &body);
        (status == 200).then_some(())
    });
    accepted += 1;
    assert_eq!(d.get("/readyz").0, 200);
    let (code, _) = d.terminate();
    assert_eq!(code, 0);
    let delivered = up.delivered();
    let mut ids: Vec<&str> = delivered
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(
        ids.len(),
        accepted,
        "every accepted event arrives exactly once here"
    );
}

#[test]
fn health_and_readiness() {
    let up = Upstream::start(vec![]);
    let d = start(&up, "", "");
    assert_eq!(d.get("/healthz"), (200, "{\"status\":\"ok\"}".to_string()));
    assert_eq!(
        d.get("/readyz"),
        (200, "{\"status\":\"ready\"}".to_string())
    );
    let (status, text) = d.get("/metrics");
    assert_eq!(status, 200);
    assert_eq!(metric(&text, "voicetagd_ready"), Some(1.0));
}
