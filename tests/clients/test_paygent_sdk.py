"""voicetagd against the real Python SDK, paygent-sdk 4.9.7 (CONTRACT sections 3, 4.1 and 6).

The daemon binary runs as a subprocess; a real ``paygent_sdk.Client`` is pointed at it through
``client.base_url``; every check is made at an in-process upstream (``upstream.py``), field by
field, on what the daemon delivered.

Two kinds of SDK call:
- voice calls (``initialize_voice_session``, ``track_voice_*``, ``set_voice_indicator``) are
  synchronous and ``raise_for_status()``: a non-2xx answer from the daemon fails the test there;
- ``send_usage_v2``, ``send_external_cost`` and ``create_or_get_customer`` are fire-and-forget on
  the SDK's thread pool (errors only logged), so the tests poll the upstream with a bounded
  deadline (``WAIT`` seconds) and never assert on timing.

Run with ``bash tests/clients/run.sh``. ``VOICETAGD_BIN`` overrides the binary path.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Dict, List

import pytest

import paygent_sdk
from paygent_sdk import (
    Client,
    CustomerCreateOrGetRequest,
    ExternalCostData,
    RawUsageData,
    SpeechToSpeechUsageMetadata,
    StsCachedBreakdown,
    StsInputSide,
    StsModalityUsage,
    StsOutputSide,
)

from harness import STATIC, Daemon, of_session, rfc3339, uid
from upstream import Upstream

SESSION_TAGS = {"env": "staging", "feature": "ivr"}


# --------------------------------------------------------------------------------------------
# The daemon under test (fixtures ``upstream``, ``daemon``, ``wait_events``: conftest.py)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def make_daemon() -> Callable[..., Daemon]:
    return functools.partial(
        Daemon,
        upstream_extra='api_key = "up-key"\ncompression = "gzip"',
        sections='[sessions]\nunknown_session_wait = "2s"',
    )


@pytest.fixture(scope="module")
def client(daemon: Daemon) -> Client:
    c = Client("sdk-key")
    c.base_url = daemon.base_url
    return c


def one(events: List[Dict[str, Any]], kind: str) -> Dict[str, Any]:
    found = [e for e in events if e["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} event, got {len(found)}: {events}"
    return found[0]


def test_sdk_version_is_the_pinned_one():
    from importlib.metadata import version

    assert version("paygent-sdk") == "4.9.7"
    assert paygent_sdk.Client is Client


# --------------------------------------------------------------------------------------------
# A voice session driven by the SDK's voice calls
# --------------------------------------------------------------------------------------------

STS_USAGE = SpeechToSpeechUsageMetadata(
    schema_version=1,
    input=StsInputSide(
        text=StsModalityUsage(tokens=120),
        audio=StsModalityUsage(tokens=850, minutes=0.71),
    ),
    output=StsOutputSide(
        text=StsModalityUsage(tokens=40),
        audio=StsModalityUsage(tokens=610, minutes=0.5),
    ),
    cached=StsCachedBreakdown(text_tokens=64, audio_tokens=256),
    connection_minutes=1.25,
)


@pytest.fixture(scope="module")
def voice(client: Client, wait_events) -> Dict[str, Any]:
    """One session: start with tags, then STT, LLM, TTS, STS and the closing indicator."""
    sid, agent, customer = uid("sess"), uid("agent"), uid("cust")
    client.initialize_voice_session(sid, agent, customer, meta_tags=SESSION_TAGS)
    client.track_voice_stt(
        sid,
        {
            "audioDuration": 1.5,  # minutes
            "serviceProvider": "deepgram",
            "model": "nova-3",
            "plan": "default",
            "language": "en-US",
        },
    )
    client.track_voice_llm(
        sid,
        {
            "serviceProvider": "openai",
            "model": "gpt-4o-mini",
            "plan": "default",
            "promptTokens": 812,
            "completionTokens": 64,
            "cachedTokens": 128,
        },
    )
    client.track_voice_tts(
        sid,
        {
            "serviceProvider": "elevenlabs",
            "model": "eleven_flash_v2_5",
            "plan": "default",
            "characterCount": 342,
        },
    )
    client.track_voice_sts(
        sid,
        STS_USAGE,
        service_provider="openai",
        model="gpt-realtime",
        plan="default",
    )
    client.set_voice_indicator(sid, "voice-session", 3)
    events = wait_events(of_session(sid), count=5, what=f"of session {sid}")
    return {"sid": sid, "agent": agent, "customer": customer, "events": events}


def test_voice_events_inherit_session_ids_and_tags(voice):
    events = voice["events"]
    assert sorted(e["kind"] for e in events) == ["indicator", "llm", "sts", "stt", "tts"]
    for e in events:
        assert e["session_id"] == voice["sid"], e
        assert e["agent_id"] == voice["agent"], e
        assert e["customer_id"] == voice["customer"], e
        assert e["meta_tags"] == {**SESSION_TAGS, **STATIC}, e
        assert e["source"] == "api", e
        assert isinstance(e["id"], str) and e["id"], e
        rfc3339(e["occurred_at"])
        rfc3339(e["received_at"])


def test_voice_stt_usage(voice):
    e = one(voice["events"], "stt")
    assert e["usage"] == {"audio_seconds": 90.0, "audio_minutes": 1.5, "language": "en-US"}
    assert (e["provider"], e["model"], e["plan"]) == ("deepgram", "nova-3", "default")


def test_voice_llm_usage(voice):
    e = one(voice["events"], "llm")
    assert e["usage"] == {
        "prompt_tokens": 812,
        "completion_tokens": 64,
        "cached_tokens": 128,
        "reasoning_tokens": 0,
    }
    assert (e["provider"], e["model"], e["plan"]) == ("openai", "gpt-4o-mini", "default")


def test_voice_tts_usage(voice):
    e = one(voice["events"], "tts")
    assert e["usage"] == {"characters": 342}
    assert (e["provider"], e["model"], e["plan"]) == ("elevenlabs", "eleven_flash_v2_5", "default")


def test_voice_sts_usage_is_the_usage_metadata_as_sent(voice):
    e = one(voice["events"], "sts")
    assert e["usage"] == STS_USAGE.to_api_dict()
    assert e["usage"] == {
        "schemaVersion": 1,
        "input": {"text": {"tokens": 120}, "audio": {"tokens": 850, "minutes": 0.71}},
        "output": {"text": {"tokens": 40}, "audio": {"tokens": 610, "minutes": 0.5}},
        "cached": {"text": {"tokens": 64}, "audio": {"tokens": 256}},
        "connection": {"minutes": 1.25},
    }
    assert (e["provider"], e["model"], e["plan"]) == ("openai", "gpt-realtime", "default")


def test_voice_indicator(voice):
    e = one(voice["events"], "indicator")
    assert e["indicator"] == "voice-session"
    assert e["usage"] == {"indicators": ["voice-session"], "total_duration_minutes": 3}


# --------------------------------------------------------------------------------------------
# Fire-and-forget calls
# --------------------------------------------------------------------------------------------


def test_send_usage_v2(client: Client, wait_events):
    agent, customer = uid("agent"), uid("cust")
    client.send_usage_v2(
        agent,
        customer,
        "chat-completion",
        RawUsageData(provider="Open AI", model="gpt-4o-mini", input_tokens=100, output_tokens=50),
        meta_tags={"env": "staging", "region": "eu"},
    )
    [e] = wait_events(lambda e: e.get("agent_id") == agent, what=f"usage of {agent}")
    assert e["kind"] == "usage"
    assert e["source"] == "api"
    assert e["customer_id"] == customer
    assert e["indicator"] == "chat-completion"
    assert e.get("session_id") is None
    assert e["meta_tags"] == {"env": "staging", "region": "eu", **STATIC}
    assert (e["provider"], e["model"], e["plan"]) == ("Open AI", "gpt-4o-mini", "default")
    # usage is the rawUsage object exactly as the SDK sent it (camelCase keys)
    assert e["usage"] == {
        "provider": "Open AI",
        "model": "gpt-4o-mini",
        "plan": "default",
        "inputTokens": 100,
        "outputTokens": 50,
    }
    assert e["usage"]["inputTokens"] == 100


def test_send_external_cost(client: Client, wait_events):
    agent, customer = uid("agent"), uid("cust")
    client.send_external_cost(
        agent,
        customer,
        "telephony",
        ExternalCostData(
            name="outbound_call",
            external_cost_id="telephony_cost",
            properties={"duration_minutes": 2.5},
        ),
        meta_tags={"env": "staging", "channel": "voice"},
    )
    [e] = wait_events(lambda e: e.get("agent_id") == agent, what=f"external cost of {agent}")
    assert e["kind"] == "external_cost"
    assert e["source"] == "api"
    assert e["customer_id"] == customer
    assert e["indicator"] == "telephony"
    assert e["meta_tags"] == {"env": "staging", "channel": "voice", **STATIC}
    assert e["usage"] == {
        "name": "outbound_call",
        "external_cost_id": "telephony_cost",
        "properties": {"duration_minutes": 2.5},
    }


def test_create_or_get_customer(client: Client, wait_events):
    ext = uid("cust")
    client.create_or_get_customer(
        CustomerCreateOrGetRequest(name="Acme Corp", external_id=ext, email="ops@acme.test")
    )
    [e] = wait_events(
        lambda e: e.get("kind") == "customer" and e.get("customer_id") == ext,
        what=f"customer {ext}",
    )
    assert e["source"] == "api"
    assert e["meta_tags"] == STATIC


# --------------------------------------------------------------------------------------------
# Tag rules
# --------------------------------------------------------------------------------------------


def test_daemon_skips_only_the_invalid_session_tags(client: Client, wait_events):
    # The SDK never sends an invalid tag itself (see the next test), so the session start is
    # posted through the SDK's own HTTP session, as the SDK would, with invalid tags in it.
    sid, agent, customer = uid("sess"), uid("agent"), uid("cust")
    r = client.session.post(
        client.base_url + "/api/v1/voice/session",
        json={
            "sessionId": sid,
            "agentId": agent,
            "customerId": customer,
            "metaTags": {
                "env": "staging",
                "bad key!": "space and ! are not allowed in keys",
                "feature": "ivr",
                "too_long": "x" * 257,
            },
        },
        headers={"paygent-api-key": client.api_key},
    )
    assert r.status_code == 200, r.text
    client.track_voice_llm(
        sid,
        {"serviceProvider": "openai", "model": "gpt-4o-mini", "promptTokens": 10, "completionTokens": 2},
    )
    [e] = wait_events(of_session(sid), what=f"llm of {sid}")
    assert e["kind"] == "llm"
    assert (e["agent_id"], e["customer_id"]) == (agent, customer)
    assert e["meta_tags"] == {"env": "staging", "feature": "ivr", **STATIC}


def test_sdk_itself_drops_the_whole_tag_map_when_one_tag_is_invalid(
    client: Client, wait_events, caplog: pytest.LogCaptureFixture
):
    # What the SDK does on its own: meta_tags.normalize_meta_tags raises on the first invalid
    # tag, and initialize_voice_session then logs a warning and sends the session start
    # WITHOUT metaTags at all (the valid "env" is lost too). The daemon cannot recover tags it
    # never received: the session's events carry the static tags only.
    sid, agent, customer = uid("sess"), uid("agent"), uid("cust")
    with caplog.at_level(logging.WARNING, logger="paygent_sdk"):
        client.initialize_voice_session(
            sid, agent, customer, meta_tags={"env": "staging", "bad key!": "x"}
        )
    assert "skipped invalid meta_tags" in caplog.text
    client.track_voice_tts(sid, {"serviceProvider": "cartesia", "model": "sonic-2", "characterCount": 12})
    [e] = wait_events(of_session(sid), what=f"tts of {sid}")
    assert (e["agent_id"], e["customer_id"]) == (agent, customer)
    assert e["meta_tags"] == STATIC

    # Same for send_usage_v2: merge_meta_tags silently discards an invalid map, and the usage is
    # sent without metaTags.
    agent2 = uid("agent")
    client.send_usage_v2(
        agent2,
        customer,
        "chat",
        RawUsageData(provider="Open AI", model="gpt-4o-mini", input_tokens=1, output_tokens=1),
        meta_tags={"env": "staging", "bad key!": "x"},
    )
    [u] = wait_events(lambda e: e.get("agent_id") == agent2, what=f"usage of {agent2}")
    assert u["kind"] == "usage"
    assert u["meta_tags"] == STATIC


def test_voice_body_metatags_rank_above_session_tags(client: Client, wait_events):
    # Beyond the SDK: a voice body may carry its own metaTags (event > session > static).
    sid = uid("sess")
    client.initialize_voice_session(sid, uid("agent"), uid("cust"), meta_tags=SESSION_TAGS)
    r = client.session.post(
        client.base_url + "/api/v1/voice/tts",
        json={
            "sessionId": sid,
            "provider": "elevenlabs",
            "model": "eleven_flash_v2_5",
            "plan": "default",
            "characters": 20,
            "metaTags": {"feature": "outbound", "host": "edge-7", "bad key!": "skipped"},
        },
        headers={"paygent-api-key": client.api_key},
    )
    assert r.status_code == 200, r.text
    [e] = wait_events(of_session(sid), what=f"tts of {sid}")
    assert e["meta_tags"] == {"env": "staging", "feature": "outbound", "host": "edge-7"}


def test_event_before_session_start_gets_the_session_tags(client: Client, wait_events):
    # The TTS call is answered (raise_for_status) before the session exists; the session start
    # follows within unknown_session_wait (2 s), and the event is stamped with its tags.
    sid, agent, customer = uid("sess"), uid("agent"), uid("cust")
    client.track_voice_tts(
        sid, {"serviceProvider": "elevenlabs", "model": "eleven_flash_v2_5", "characterCount": 99}
    )
    client.initialize_voice_session(sid, agent, customer, meta_tags=SESSION_TAGS)
    [e] = wait_events(of_session(sid), what=f"early tts of {sid}")
    assert e["kind"] == "tts"
    assert e["usage"] == {"characters": 99}
    assert (e["agent_id"], e["customer_id"]) == (agent, customer)
    assert e["meta_tags"] == {**SESSION_TAGS, **STATIC}


# --------------------------------------------------------------------------------------------
# Delivery
# --------------------------------------------------------------------------------------------


def test_event_ids_are_unique_and_non_empty(client: Client, upstream: Upstream, wait_events):
    sid = uid("sess")
    client.initialize_voice_session(sid, uid("agent"), uid("cust"))
    for i in range(10):
        client.track_voice_llm(
            sid,
            {"serviceProvider": "openai", "model": "gpt-4o-mini", "promptTokens": i + 1, "completionTokens": 1},
        )
    wait_events(of_session(sid), count=10, what=f"10 llm of {sid}")
    ids = [e.get("id") for e in upstream.events()]
    assert all(isinstance(i, str) and i.strip() for i in ids), ids
    assert len(ids) == len(set(ids)), [i for i in ids if ids.count(i) > 1]


def test_upstream_batches_are_well_formed(upstream: Upstream, voice):
    batches = upstream.batches()
    assert batches and not upstream.errors()
    for b in batches:
        h, body = b["headers"], b["body"]
        assert b["path"] == "/v1/events:batch"
        assert h["content-encoding"] == "gzip"
        assert h["content-type"].startswith("application/json")
        assert h["paygent-api-key"] == "up-key"
        assert body["batch_id"] and h["idempotency-key"] == body["batch_id"]
        rfc3339(body["sent_at"])
        assert 1 <= len(body["events"]) <= 50
    batch_ids = [b["body"]["batch_id"] for b in batches]
    assert len(batch_ids) == len(set(batch_ids))


def test_sigterm_exits_zero(daemon: Daemon):
    # Last in the module: the daemon is stopped here, the fixture teardown has nothing left.
    assert daemon.proc.poll() is None, f"voicetagd died early:\n{daemon.log_tail()}"
    code = daemon.terminate()
    assert code == 0, f"voicetagd exited {code} on SIGTERM:\n{daemon.log_tail()}"
