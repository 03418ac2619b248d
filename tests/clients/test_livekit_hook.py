"""voicetagd's LiveKit WebSocket (CONTRACT sections 3, 4.2 and 6) driven by the real
livekit-agents 1.8.9 classes through the voicetagd Python hook (clients/python).

The agent side is a real ``livekit.agents.AgentSession`` (a ``livekit.rtc.EventEmitter``) with a
``VoicetagdHook`` attached. The test plays the part of ``AgentActivity._on_metrics_collected``:
for each real ``STTMetrics`` / ``LLMMetrics`` / ``TTSMetrics`` / ``RealtimeModelMetrics`` /
``VADMetrics`` it folds the metric into a real ``ModelUsageCollector`` and emits, on the
session, ``metrics_collected`` (``MetricsCollectedEvent``) and then ``session_usage_updated``
(``SessionUsageUpdatedEvent`` carrying the cumulative ``AgentSessionUsage``), exactly as
livekit-agents 1.8.9 does; the session ends with a real ``CloseEvent``. Every check is made
at an in-process upstream (``upstream.py``) on what the daemon delivered.

The key scenario kills the daemon with SIGKILL mid-stream and restarts it on the same spool
dir while the agent keeps emitting; the totals at the upstream must then be exact: nothing
lost, nothing counted twice (duplicates, if any, carry the same ``id`` and content).

Every wait is bounded (``WAIT`` s); nothing asserts on timing.
Run with ``bash tests/clients/run.sh``. ``VOICETAGD_BIN`` overrides the binary path.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import aiohttp
import pytest

from livekit import rtc
from livekit.agents import AgentSession
from livekit.agents.metrics import (
    AgentSessionUsage,
    LLMMetrics,
    ModelUsageCollector,
    RealtimeModelMetrics,
    STTMetrics,
    TTSMetrics,
    VADMetrics,
)
from livekit.agents.metrics.base import Metadata
from livekit.agents.voice.events import (
    CloseEvent,
    CloseReason,
    MetricsCollectedEvent,
    SessionUsageUpdatedEvent,
)

from harness import STATIC, WAIT, Daemon, of_session, rfc3339, uid, wait_events
from upstream import Upstream
from voicetagd import VoicetagdHook

SESSION_TAGS = {"env": "staging", "feature": "ivr"}
BILLABLE = ("stt", "llm", "tts", "sts")


# --------------------------------------------------------------------------------------------
# The daemon under test (restartable: same port, same spool dir; fixtures ``upstream`` and
# ``daemon``: conftest.py)
# --------------------------------------------------------------------------------------------


def livekit_daemon(tmp: Path, upstream: Upstream, server_extra: str = "") -> Daemon:
    """A daemon (not started) with this module's config; ``server_extra`` goes into [server]."""
    return Daemon(
        tmp,
        upstream,
        server_extra=server_extra,
        upstream_extra='api_key = "up-key"\ncompression = "gzip"\nretry_initial = "100ms"\nretry_max = "1s"',
        sections='[sessions]\nunknown_session_wait = "2s"\n[livekit]\nusage_source = "auto"',
        log_lines=60,
    )


@pytest.fixture(scope="module")
def make_daemon() -> Callable[..., Daemon]:
    return livekit_daemon


def dedup_with_conflicts(
    events: List[Dict[str, Any]],
) -> Tuple[List[Dict[str, Any]], List[Tuple[str, Dict[str, Tuple[Any, Any]]]]]:
    """One event per id (the first seen), and the ids whose copies differ, with the fields
    that differ: (id, {field: (first, other)})."""
    seen: Dict[str, Dict[str, Any]] = {}
    conflicts: List[Tuple[str, Dict[str, Tuple[Any, Any]]]] = []
    for e in events:
        eid = e.get("id")
        assert isinstance(eid, str) and eid, f"event without id: {e}"
        if eid not in seen:
            seen[eid] = e
        elif seen[eid] != e:
            first = seen[eid]
            diff = {k: (first.get(k), e.get(k)) for k in sorted(set(first) | set(e)) if first.get(k) != e.get(k)}
            conflicts.append((eid, diff))
    return list(seen.values()), conflicts


def dedup(events: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One event per id; a repeated id must carry the identical event."""
    unique, conflicts = dedup_with_conflicts(events)
    assert not conflicts, f"events with the same id differ: {conflicts}"
    return unique


def totals(events: List[Dict[str, Any]]) -> Dict[Tuple[str, str, str, str], float]:
    """Sum of every numeric usage field per (kind, provider, model, field)."""
    out: Dict[Tuple[str, str, str, str], float] = defaultdict(float)
    for e in events:
        if e["kind"] not in ("stt", "llm", "tts"):
            continue
        for k, v in e["usage"].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[(e["kind"], e.get("provider"), e.get("model"), k)] += v
    return dict(out)


# --------------------------------------------------------------------------------------------
# The agent side: real livekit-agents objects on a real AgentSession
# --------------------------------------------------------------------------------------------

DEEPGRAM = Metadata(model_name="nova-3", model_provider="Deepgram")
OPENAI = Metadata(model_name="gpt-4o-mini", model_provider="api.openai.com")
CARTESIA = Metadata(model_name="sonic-2", model_provider="Cartesia")
REALTIME = Metadata(model_name="gpt-realtime", model_provider="api.openai.com")
SILERO = Metadata(model_name="silero", model_provider="ONNX")


def stt_metrics(i: int, audio: float = 4.25) -> STTMetrics:
    return STTMetrics(
        label="livekit.plugins.deepgram.stt.STT",
        request_id=f"stt-{i}",
        timestamp=time.time(),
        duration=0.0,
        audio_duration=audio,
        streamed=True,
        metadata=DEEPGRAM,
    )


def llm_metrics(i: int, prompt: int = 812, cached: int = 512, completion: int = 96, reasoning: int = 0) -> LLMMetrics:
    return LLMMetrics(
        label="livekit.plugins.openai.llm.LLM",
        request_id=f"chatcmpl-{i}",
        timestamp=time.time(),
        duration=1.42,
        ttft=0.31,
        cancelled=False,
        completion_tokens=completion,
        prompt_tokens=prompt,
        prompt_cached_tokens=cached,
        reasoning_tokens=reasoning,
        total_tokens=prompt + completion,
        tokens_per_second=67.6,
        speech_id=f"speech_{i:012x}",
        metadata=OPENAI,
    )


def tts_metrics(i: int, chars: int = 143) -> TTSMetrics:
    return TTSMetrics(
        label="livekit.plugins.cartesia.tts.TTS",
        request_id=f"tts-{i}",
        timestamp=time.time(),
        ttfb=0.182,
        duration=1.97,
        audio_duration=9.84,
        cancelled=False,
        characters_count=chars,
        streamed=True,
        segment_id=f"seg-{i}",
        speech_id=f"speech_{i:012x}",
        metadata=CARTESIA,
    )


def realtime_metrics(i: int) -> RealtimeModelMetrics:
    return RealtimeModelMetrics(
        label="livekit.plugins.openai.realtime.realtime_model.RealtimeModel",
        request_id=f"resp_{i}",
        timestamp=time.time(),
        duration=2.35,
        ttft=0.42,
        input_tokens=1450,
        output_tokens=380,
        total_tokens=1830,
        tokens_per_second=161.7,
        input_token_details=RealtimeModelMetrics.InputTokenDetails(
            audio_tokens=1200,
            text_tokens=250,
            cached_tokens=640,
            cached_tokens_details=RealtimeModelMetrics.CachedTokenDetails(audio_tokens=512, text_tokens=128),
        ),
        output_token_details=RealtimeModelMetrics.OutputTokenDetails(text_tokens=70, audio_tokens=310),
        metadata=REALTIME,
    )


def vad_metrics() -> VADMetrics:
    return VADMetrics(
        label="livekit.plugins.silero.vad.VAD",
        timestamp=time.time(),
        idle_time=1.02,
        inference_duration_total=0.0421,
        inference_count=32,
        metadata=SILERO,
    )


class Agent:
    """A real AgentSession plus what AgentActivity._on_metrics_collected does with a metric."""

    def __init__(self) -> None:
        self.session = AgentSession()  # needs the running loop
        assert isinstance(self.session, rtc.EventEmitter)
        self.collector = ModelUsageCollector()

    def metric(self, m: Any) -> None:
        # livekit-agents 1.8.9 voice/agent_activity.py::_on_metrics_collected, step by step
        self.collector.collect(m)
        self.session.emit("metrics_collected", MetricsCollectedEvent(metrics=m))
        self.session.emit(
            "session_usage_updated",
            SessionUsageUpdatedEvent(usage=AgentSessionUsage(model_usage=self.collector.flatten())),
        )

    def close(self, reason: CloseReason = CloseReason.PARTICIPANT_DISCONNECTED) -> None:
        self.session.emit("close", CloseEvent(reason=reason))

    def usage(self) -> Dict[Tuple[str, str, str], Any]:
        """The final cumulative snapshot, keyed by (type, provider, model)."""
        return {(u.type, u.provider, u.model): u for u in self.collector.flatten()}


def hook_for(url: str, sid: str, agent: str, customer: str, **kw: Any) -> VoicetagdHook:
    return VoicetagdHook(
        url,
        session_id=sid,
        agent_id=agent,
        customer_id=customer,
        meta_tags=SESSION_TAGS,
        indicator="voice-session",
        **kw,
    )


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 4 * WAIT))


def check_session_fields(events: List[Dict[str, Any]], sid: str, agent: str, customer: str) -> None:
    for e in events:
        assert e["source"] == "livekit", e
        assert e["session_id"] == sid, e
        assert e["agent_id"] == agent, e
        assert e["customer_id"] == customer, e
        assert e.get("indicator") == "voice-session", e
        assert e["meta_tags"] == {**SESSION_TAGS, **STATIC}, e
        assert isinstance(e["id"], str) and e["id"], e
        assert isinstance(e["usage"], dict), e
        rfc3339(e["occurred_at"])
        rfc3339(e["received_at"])


def test_livekit_agents_version_is_the_pinned_one():
    from importlib.metadata import version

    assert version("livekit-agents") == "1.8.9"


# --------------------------------------------------------------------------------------------
# A session counted from session_usage_updated snapshots (the hook's default)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def snap(daemon: Daemon, upstream: Upstream) -> Dict[str, Any]:
    sid, agent, customer = uid("sess"), uid("agent"), uid("cust")

    async def main() -> Tuple[VoicetagdHook, Agent]:
        a = Agent()
        hook = hook_for(daemon.ws_url, sid, agent, customer).attach(a.session)
        a.metric(vad_metrics())  # a snapshot with no usage yet: no event
        a.metric(stt_metrics(1))
        a.metric(llm_metrics(1))  # llm input 812
        a.metric(tts_metrics(1))
        a.metric(vad_metrics())  # the same totals again: no event
        a.metric(llm_metrics(2))  # llm input 1624 cumulative -> a delta of 812
        a.metric(realtime_metrics(1))  # an llm_usage with audio/text splits -> sts
        a.close()
        assert await hook.aclose(timeout=WAIT) is True, hook.stats
        return hook, a

    hook, a = run(main())
    events = wait_events(upstream, daemon, of_session(sid), count=6, what=f"of session {sid}")
    wait_events(
        upstream, daemon, lambda e: e.get("session_id") == sid and e["kind"] == "indicator", what="indicator"
    )
    return {"sid": sid, "agent": agent, "customer": customer, "hook": hook, "agent_side": a,
            "events": dedup([e for e in upstream.events() if e.get("session_id") == sid])}


def test_snapshot_session_hook_counters(snap):
    s = snap["hook"].stats
    # 1 session.start + 7 metrics x session_usage_updated + close + session.end
    assert s["sent"] == 10 and s["acked"] == 10, s
    assert (s["resent"], s["dropped"], s["rejected"], s["reconnects"], s["buffered"]) == (0, 0, 0, 0, 0), s


def test_snapshot_session_events_carry_the_session_tags(snap):
    events = snap["events"]
    assert sorted(e["kind"] for e in events) == ["indicator", "llm", "llm", "sts", "stt", "tts"], events
    check_session_fields(events, snap["sid"], snap["agent"], snap["customer"])


def test_cumulative_snapshots_become_exact_deltas(snap):
    llms = [e for e in snap["events"] if e["kind"] == "llm"]
    assert len(llms) == 2
    for e in llms:
        assert (e["provider"], e["model"]) == ("api.openai.com", "gpt-4o-mini"), e
        assert e["usage"]["prompt_tokens"] == 812, e
        assert e["usage"]["cached_tokens"] == 512, e
        assert e["usage"]["completion_tokens"] == 96, e
        assert e["usage"]["reasoning_tokens"] == 0, e
    [stt] = [e for e in snap["events"] if e["kind"] == "stt"]
    assert (stt["provider"], stt["model"]) == ("Deepgram", "nova-3")
    assert stt["usage"]["audio_seconds"] == pytest.approx(4.25)
    [tts] = [e for e in snap["events"] if e["kind"] == "tts"]
    assert (tts["provider"], tts["model"]) == ("Cartesia", "sonic-2")
    assert tts["usage"]["characters"] == 143


def test_realtime_llm_usage_becomes_sts(snap):
    [sts] = [e for e in snap["events"] if e["kind"] == "sts"]
    assert (sts["provider"], sts["model"]) == ("api.openai.com", "gpt-realtime")
    u = sts["usage"]
    assert u["schemaVersion"] == 1, u
    assert u["input"]["audio"]["tokens"] == 1200, u
    assert u["input"]["text"]["tokens"] == 250, u
    assert u["output"]["audio"]["tokens"] == 310, u
    assert u["output"]["text"]["tokens"] == 70, u
    assert u["cached"]["audio"]["tokens"] == 512, u
    assert u["cached"]["text"]["tokens"] == 128, u


def test_close_ends_the_session_with_one_indicator(snap, daemon: Daemon):
    [ind] = [e for e in snap["events"] if e["kind"] == "indicator"]
    assert ind["indicator"] == "voice-session"
    assert ind["usage"]["indicators"] == ["voice-session"], ind
    minutes = ind["usage"]["total_duration_minutes"]
    assert isinstance(minutes, (int, float)) and minutes >= 0, ind
    # the session is ended at the daemon (GET /v1/sessions/{id}: ended, or gone)
    try:
        with urllib.request.urlopen(f"{daemon.base_url}/v1/sessions/{snap['sid']}", timeout=5) as r:
            session = json.loads(r.read())
        assert session["state"] == "ended", session
        assert session["meta_tags"] == SESSION_TAGS or session["meta_tags"] == {**SESSION_TAGS, **STATIC}, session
    except urllib.error.HTTPError as exc:
        assert exc.code == 404, exc


# --------------------------------------------------------------------------------------------
# A session whose hook also forwards per-request metrics (metrics=True): with usage_source
# "auto" the daemon counts the first billable kind (metrics_collected comes first) and ignores
# the snapshots, so nothing is counted twice.
# --------------------------------------------------------------------------------------------


def test_metrics_and_snapshots_together_count_once(daemon: Daemon, upstream: Upstream):
    sid, agent, customer = uid("sess"), uid("agent"), uid("cust")

    async def main() -> Tuple[VoicetagdHook, Agent]:
        a = Agent()
        hook = hook_for(daemon.ws_url, sid, agent, customer, metrics=True).attach(a.session)
        a.metric(llm_metrics(1))
        a.metric(stt_metrics(1))
        a.metric(vad_metrics())
        a.metric(tts_metrics(1, chars=57))
        a.metric(llm_metrics(2, prompt=300, cached=0, completion=20, reasoning=8))
        a.close()
        assert await hook.aclose(timeout=WAIT) is True, hook.stats
        return hook, a

    hook, a = run(main())
    wait_events(upstream, daemon, lambda e: e.get("session_id") == sid and e["kind"] == "indicator", what="indicator")
    # everything of the session is in by then, or comes within the bound below
    final = a.usage()
    want_prompt = final[("llm_usage", "api.openai.com", "gpt-4o-mini")].input_tokens
    assert want_prompt == 1112

    def prompt_total() -> int:
        evs = dedup([e for e in upstream.events() if e.get("session_id") == sid])
        return sum(e["usage"].get("prompt_tokens", 0) for e in evs if e["kind"] == "llm")

    deadline = time.monotonic() + WAIT
    while prompt_total() < want_prompt and time.monotonic() < deadline:
        time.sleep(0.1)
    events = dedup([e for e in upstream.events() if e.get("session_id") == sid])
    check_session_fields(events, sid, agent, customer)
    assert sorted(e["kind"] for e in events) == ["indicator", "llm", "llm", "stt", "tts"], events
    t = totals(events)
    assert t[("llm", "api.openai.com", "gpt-4o-mini", "prompt_tokens")] == 1112
    assert t[("llm", "api.openai.com", "gpt-4o-mini", "completion_tokens")] == 116
    assert t[("llm", "api.openai.com", "gpt-4o-mini", "cached_tokens")] == 512
    assert t[("llm", "api.openai.com", "gpt-4o-mini", "reasoning_tokens")] == 8
    assert t[("stt", "Deepgram", "nova-3", "audio_seconds")] == pytest.approx(4.25)
    assert t[("tts", "Cartesia", "sonic-2", "characters")] == 57
    assert hook.stats["sent"] == 1 + 5 * 2 + 2  # start, 5 x (metrics_collected + snapshot), close, end


# --------------------------------------------------------------------------------------------
# Protocol details the hook relies on, checked on the raw socket
# --------------------------------------------------------------------------------------------


def test_raw_protocol_acks_reacks_and_errors(daemon: Daemon):
    sid = uid("sess")

    async def main() -> List[Dict[str, Any]]:
        replies: List[Dict[str, Any]] = []
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(daemon.ws_url) as ws:

                async def send(obj: Any) -> Dict[str, Any]:
                    await (ws.send_str(obj) if isinstance(obj, str) else ws.send_json(obj))
                    msg = await ws.receive(timeout=WAIT)
                    assert msg.type == aiohttp.WSMsgType.TEXT, msg
                    reply = json.loads(msg.data)
                    replies.append(reply)
                    return reply

                start = {"type": "session.start", "session_id": sid, "agent_id": "a", "customer_id": "c",
                         "indicator": "voice-session", "meta_tags": SESSION_TAGS, "seq": 1}
                assert await send(start) == {"type": "ack", "session_id": sid, "seq": 1}
                ev = {"type": "livekit", "session_id": sid, "seq": 2,
                      "event": json.loads(MetricsCollectedEvent(metrics=vad_metrics()).model_dump_json())}
                assert await send(ev) == {"type": "ack", "session_id": sid, "seq": 2}
                # a resend of an already queued seq is dropped and re-acked
                assert await send(start) == {"type": "ack", "session_id": sid, "seq": 2}
                # not JSON: an error, the connection stays open
                err = await send("this is not json")
                assert err["type"] == "error" and err.get("message"), err
                # a malformed frame with a seq: an error naming it
                err = await send({"type": "no-such-type", "session_id": sid, "seq": 3})
                assert err["type"] == "error" and err.get("seq") == 3 and err.get("session_id") == sid, err
                # seq 3 may be sent again, correctly this time
                end = {"type": "session.end", "session_id": sid, "seq": 3}
                assert await send(end) == {"type": "ack", "session_id": sid, "seq": 3}
        return replies

    run(main())


def test_token_is_required_on_the_upgrade_when_configured(tmp_path: Path, upstream: Upstream):
    d = livekit_daemon(tmp_path, upstream, server_extra='token = "lk-s3cret"').start()
    try:
        sid = uid("sess")

        async def main() -> None:
            async with aiohttp.ClientSession() as http:
                with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                    await http.ws_connect(d.ws_url)
                assert info.value.status == 401
            a = Agent()
            hook = hook_for(d.ws_url, sid, "agent", "cust", token="lk-s3cret").attach(a.session)
            a.metric(llm_metrics(1))
            assert await hook.aclose(timeout=WAIT) is True, hook.stats

        run(main())
        [e] = wait_events(upstream, d, of_session(sid), what=f"llm of {sid}")
        assert e["kind"] == "llm" and e["usage"]["prompt_tokens"] == 812
        assert e["meta_tags"] == {**SESSION_TAGS, **STATIC}
    finally:
        d.kill()


# --------------------------------------------------------------------------------------------
# The key scenario: SIGKILL mid-stream, restart on the same spool dir, exact totals
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("metrics", [False, True], ids=["snapshots", "metrics+snapshots"])
def test_sigkill_mid_stream_and_restart_totals_are_exact(tmp_path: Path, upstream: Upstream, metrics: bool):
    d = livekit_daemon(tmp_path, upstream).start()
    sid, agent, customer = uid("sess"), uid("agent"), uid("cust")
    turns = 45  # each turn: STT, LLM, TTS (+ VAD every third), each a metric + a snapshot
    kill_at, restart_at = 15, 30

    async def main() -> Tuple[VoicetagdHook, Agent]:
        a = Agent()
        hook = hook_for(d.ws_url, sid, agent, customer, metrics=metrics).attach(a.session)
        for turn in range(1, turns + 1):
            if turn == kill_at:
                # Let the sender write what is queued, then kill -9 at once: the frames just
                # written are (very likely) not acked yet and get resent after the restart.
                for _ in range(3):
                    await asyncio.sleep(0)
                await asyncio.to_thread(d.sigkill)
            if turn == restart_at:
                await asyncio.to_thread(d.start)  # same port, same spool dir
            a.metric(stt_metrics(turn, audio=2.5))
            a.metric(llm_metrics(turn, prompt=800 + turn, cached=256, completion=40 + turn % 7, reasoning=turn % 3))
            a.metric(tts_metrics(turn, chars=100 + turn))
            if turn % 3 == 0:
                a.metric(vad_metrics())
            if turn != kill_at - 1:
                await asyncio.sleep(0.02)  # a turn takes a while; the sender runs meanwhile
        a.close()
        flushed = await hook.aclose(timeout=WAIT)
        assert flushed, f"hook could not flush: {hook.stats}\n{d.log_tail()}"
        return hook, a

    try:
        hook, a = run(main())
        s = hook.stats
        assert s["reconnects"] >= 1 and s["dropped"] == 0 and s["rejected"] == 0 and s["buffered"] == 0, s

        final = a.usage()
        llm_u = final[("llm_usage", "api.openai.com", "gpt-4o-mini")]
        stt_u = final[("stt_usage", "Deepgram", "nova-3")]
        tts_u = final[("tts_usage", "Cartesia", "sonic-2")]
        want = {
            ("llm", "api.openai.com", "gpt-4o-mini", "prompt_tokens"): llm_u.input_tokens,
            ("llm", "api.openai.com", "gpt-4o-mini", "cached_tokens"): llm_u.input_cached_tokens,
            ("llm", "api.openai.com", "gpt-4o-mini", "completion_tokens"): llm_u.output_tokens,
            ("llm", "api.openai.com", "gpt-4o-mini", "reasoning_tokens"): llm_u.output_reasoning_tokens,
            ("tts", "Cartesia", "sonic-2", "characters"): tts_u.characters_count,
        }
        assert want[("llm", "api.openai.com", "gpt-4o-mini", "prompt_tokens")] == sum(800 + t for t in range(1, turns + 1))

        def current() -> List[Dict[str, Any]]:
            return dedup_with_conflicts([e for e in upstream.events() if e.get("session_id") == sid])[0]

        def complete(evs: List[Dict[str, Any]]) -> bool:
            t = totals(evs)
            return all(t.get(k, 0) >= v for k, v in want.items()) and any(e["kind"] == "indicator" for e in evs)

        deadline = time.monotonic() + WAIT
        while not complete(current()) and time.monotonic() < deadline:
            time.sleep(0.2)
        raw = [e for e in upstream.events() if e.get("session_id") == sid]
        events, conflicts = dedup_with_conflicts(raw)
        print(f"\n[{'metrics' if metrics else 'snapshots'}] hook stats {s};"
              f" upstream events {len(raw)}, distinct ids {len(events)}, conflicting ids {len(conflicts)}")
        t = totals(events)
        got = {k: t.get(k, 0) for k in want}
        assert got == want, f"totals differ (nothing may be lost or counted twice)\n{d.log_tail()}"
        assert t[("stt", "Deepgram", "nova-3", "audio_seconds")] == pytest.approx(stt_u.audio_duration)
        assert stt_u.audio_duration == pytest.approx(2.5 * turns)

        check_session_fields(events, sid, agent, customer)  # tags survived the restart
        kinds = [e["kind"] for e in events]
        assert set(kinds) <= {"stt", "llm", "tts", "indicator"}, kinds
        assert kinds.count("indicator") == 1, kinds
        if metrics:
            # per-request metrics counted: exactly one event per request
            assert (kinds.count("stt"), kinds.count("llm"), kinds.count("tts")) == (turns, turns, turns), kinds
        # Last, so that the totals above are checked first: a duplicate (same id) must be the
        # same event, byte for byte, as a replay from the spool is.
        assert not conflicts, (
            f"{len(conflicts)} event id(s) delivered twice with different content"
            f" (id, {{field: (first, second)}}): {conflicts}"
        )
    finally:
        d.kill()
