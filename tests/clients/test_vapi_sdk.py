"""voicetagd's Vapi webhook against payloads built with the real SDK, vapi-server-sdk 3.0.0
(CONTRACT section 4.4).

Every message is built from the SDK's own pydantic models (``vapi.types``), with a fresh call id
and random amounts, serialised by the SDK (camelCase aliases, as Vapi sends them), and validated
back through ``ServerMessage`` and the class its ``type`` names before it is sent. Requests are
signed the way a Vapi HMAC credential with the SDK's defaults signs them (HMAC-SHA256 over
``"{timestamp}.{body}"``, hex, in ``x-signature``, the timestamp in ``x-timestamp``). The checks are
made at an in-process upstream (``upstream.py``) on what the daemon delivered, field by field.

The first message takes the SDK 10-20 s to build: pydantic compiles the schemas of the 29-class
``ServerMessage`` union lazily, once per process. Nothing is timed against it.

Run with ``bash tests/clients/run.sh``. ``VOICETAGD_BIN`` overrides the binary path.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import random
import time
import urllib.error
import urllib.request
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Dict, List, Tuple

import pytest

import vapi.types as vt

from harness import STATIC, WAIT, Daemon, of_session

HMAC_KEY = "vapi-hmac-" + uuid.uuid4().hex
# The daemon's namespace for derived event ids (src/event.rs, derived_id).
ID_NAMESPACE = uuid.UUID("6f0c1f4e-8b1d-4c5e-9a3b-7d2e5f60a1b2")


def derived_id(call_id: str, suffix: Any) -> str:
    return str(uuid.uuid5(ID_NAMESPACE, f"{call_id}/end-of-call-report/{suffix}"))


# --------------------------------------------------------------------------------------------
# The daemon under test (fixtures ``upstream``, ``daemon``, ``wait_events``: conftest.py)
# --------------------------------------------------------------------------------------------


class VapiDaemon(Daemon):
    """The shared daemon, plus the webhook and the metrics endpoint."""

    def post(self, body: bytes, headers: Dict[str, str]) -> Tuple[int, Any]:
        req = urllib.request.Request(
            self.base_url + "/webhooks/vapi",
            data=body,
            method="POST",
            headers={"Content-Type": "application/json", **headers},
        )
        try:
            with urllib.request.urlopen(req, timeout=WAIT) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def metric(self, series: str) -> float:
        with urllib.request.urlopen(self.base_url + "/metrics", timeout=WAIT) as r:
            for line in r.read().decode().splitlines():
                name, _, value = line.rpartition(" ")
                if name == series:
                    return float(value)
        return 0.0


@pytest.fixture(scope="module")
def make_daemon() -> Callable[..., Daemon]:
    return functools.partial(
        VapiDaemon,
        sections=f'[vapi]\ndefault_customer_id = "walk-in"\n[vapi.hmac]\nsecret = "{HMAC_KEY}"',
    )


@pytest.fixture(scope="module")
def wait_events(wait_events) -> Callable[[str, int], List[Dict[str, Any]]]:
    """Here by call id: wait_events(call_id, count) -> the call's events (bounded by WAIT)."""
    return lambda call_id, count: wait_events(of_session(call_id), count=count, what=call_id)


# --------------------------------------------------------------------------------------------
# Messages built with the SDK
# --------------------------------------------------------------------------------------------


def sign(body: bytes, ts: str | None = None, key: str = HMAC_KEY) -> Dict[str, str]:
    """The headers of a Vapi HMAC credential with the SDK's defaults."""
    ts = ts or str(int(time.time() * 1000))
    sig = hmac.new(key.encode(), ts.encode() + b"." + body, hashlib.sha256).hexdigest()
    return {"x-signature": sig, "x-timestamp": ts}


def serialize(message: Any, cls: type) -> bytes:
    """The SDK's JSON of ``{"message": ...}``, validated back by the SDK before it is sent."""
    body = vt.ServerMessage(message=message).json().encode()
    parsed = json.loads(body)
    vt.ServerMessage.model_validate(parsed)
    # ServerMessage's union has no discriminator (vapi-wire.md section 1), so validate with the
    # class the type names too, and check nothing was lost on the way.
    again = cls.model_validate(parsed["message"])
    assert json.loads(vt.ServerMessage(message=again).json()) == parsed
    return body


def new_call(metadata_at: str, meta: Dict[str, Any], started: datetime, ended: datetime | None):
    now = datetime.now(timezone.utc)
    fields: Dict[str, Any] = dict(
        id=str(uuid.uuid4()),
        org_id=str(uuid.uuid4()),
        created_at=now,
        updated_at=now,
        type="webCall",
        started_at=started,
    )
    if ended is not None:
        fields["ended_at"] = ended
    if metadata_at == "call":
        # Not declared on Call: an extra, as POST /call with a top-level metadata echoes it.
        fields["metadata"] = meta
    else:
        fields["assistant_overrides"] = vt.AssistantOverrides(metadata=meta)
    return vt.Call(**fields)


def paygent_metadata(agent: str, customer: str, tags: Dict[str, str]) -> Dict[str, Any]:
    """What paygent_sdk's Vapi hook puts into the call: tags as json.dumps with spaces."""
    return {
        "paygent_agent_id": agent,
        "paygent_customer_id": customer,
        "paygent_indicator": "voice-session",
        "paygent_from_sdk": True,
        "paygent_meta_tags": json.dumps(tags),
    }


def amount(lo: float, hi: float, digits: int = 6) -> float:
    return round(random.uniform(lo, hi), digits)


def tokens(lo: int, hi: int) -> float:
    return float(random.randint(lo, hi))


def report(call: Any, started: datetime, ended: datetime, costs: List[Any]) -> bytes:
    msg = vt.ServerMessageEndOfCallReport(
        type="end-of-call-report",
        ended_reason="customer-ended-call",
        artifact=vt.Artifact(transcript="AI: Hello.\nUser: Hi.\n"),
        analysis=vt.Analysis(summary="A short call."),
        timestamp=ended.timestamp() * 1000,
        started_at=started,
        ended_at=ended,
        cost=round(sum(c.cost for c in costs), 6),
        costs=costs,
        call=call,
    )
    return serialize(msg, vt.ServerMessageEndOfCallReport)


def rfc3339(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def by_id(events: List[Dict[str, Any]], event_id: str) -> Dict[str, Any]:
    found = [e for e in events if e["id"] == event_id]
    assert len(found) == 1, f"expected one event {event_id}, got {events}"
    return found[0]


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def test_sdk_version_is_the_pinned_one():
    from importlib.metadata import version

    assert version("vapi-server-sdk") == "3.0.0"


def test_status_update_then_pipeline_report(daemon: VapiDaemon, wait_events):
    agent, customer = f"agent-{uuid.uuid4().hex[:8]}", f"cust-{uuid.uuid4().hex[:8]}"
    tags = {"env": "staging", "feature": "ivr", "run": uuid.uuid4().hex[:10]}
    started = datetime.now(timezone.utc) - timedelta(seconds=random.randint(30, 600))
    ended = started + timedelta(milliseconds=random.randint(20_000, 900_000))
    meta = paygent_metadata(agent, customer, tags)

    call = new_call("call", meta, started, None)
    status = vt.ServerMessageStatusUpdate(type="status-update", status="in-progress", call=call)
    body = serialize(status, vt.ServerMessageStatusUpdate)
    assert daemon.post(body, sign(body)) == (200, {})

    minutes = amount(0.5, 15, 4)
    costs = [
        vt.ServerMessageEndOfCallReportCostsItem_Transcriber(
            type="transcriber",
            transcriber={"provider": "deepgram", "model": "nova-3", "language": "en"},
            minutes=minutes,
            cost=amount(0.001, 0.2),
        ),
        vt.ServerMessageEndOfCallReportCostsItem_Model(
            type="model",
            model={"provider": "openai", "model": "gpt-4o"},
            prompt_tokens=tokens(100, 9000),
            completion_tokens=tokens(10, 900),
            cached_prompt_tokens=tokens(0, 99),
            reasoning_tokens=tokens(0, 9),
            cost=amount(0.001, 0.2),
        ),
        vt.ServerMessageEndOfCallReportCostsItem_Voice(
            type="voice",
            voice={"provider": "11labs", "voiceId": "21m00Tcm4TlvDq8ikWAM", "model": "eleven_turbo_v2_5"},
            characters=tokens(50, 5000),
            cost=amount(0.001, 0.2),
        ),
        vt.ServerMessageEndOfCallReportCostsItem_Vapi(
            type="vapi", sub_type="normal", minutes=minutes, cost=amount(0.001, 0.5)
        ),
        vt.ServerMessageEndOfCallReportCostsItem_Transport(
            type="transport", provider="twilio", minutes=minutes, cost=amount(0.001, 0.1)
        ),
        vt.ServerMessageEndOfCallReportCostsItem_Analysis(
            type="analysis",
            analysis_type="summary",
            model={"provider": "openai", "model": "gpt-4o-mini"},
            prompt_tokens=tokens(100, 999),
            completion_tokens=tokens(10, 99),
            cost=amount(0.0001, 0.01),
        ),
    ]
    # The report's own call snapshot carries the metadata too, as Vapi's does.
    call_at_end = new_call("call", meta, started, ended).model_copy(update={"id": call.id})
    body = report(call_at_end, started, ended, costs)
    assert daemon.post(body, sign(body)) == (200, {})

    events = wait_events(call.id, len(costs) + 1)
    assert len(events) == len(costs) + 1, events
    stamped = dict(tags, **STATIC)
    for e in events:
        assert e["source"] == "vapi"
        assert (e["agent_id"], e["customer_id"], e["indicator"]) == (agent, customer, "voice-session")
        assert e["meta_tags"] == stamped
        assert abs(rfc3339(e["occurred_at"]) - ended) < timedelta(milliseconds=1)

    stt = by_id(events, derived_id(call.id, 0))
    assert (stt["kind"], stt["provider"], stt["model"]) == ("stt", "deepgram", "nova-3")
    assert stt["cost_usd"] == costs[0].cost
    assert stt["usage"]["audio_minutes"] == minutes
    assert abs(stt["usage"]["audio_seconds"] - minutes * 60) < 1e-6
    assert stt["usage"]["language"] == "en"

    llm = by_id(events, derived_id(call.id, 1))
    m = costs[1]
    assert (llm["kind"], llm["provider"], llm["model"], llm["cost_usd"]) == ("llm", "openai", "gpt-4o", m.cost)
    assert llm["usage"] == {
        "prompt_tokens": m.prompt_tokens,
        "completion_tokens": m.completion_tokens,
        "cached_tokens": m.cached_prompt_tokens,
        "reasoning_tokens": m.reasoning_tokens,
    }

    tts = by_id(events, derived_id(call.id, 2))
    assert (tts["kind"], tts["provider"], tts["model"]) == ("tts", "11labs", "eleven_turbo_v2_5")
    assert (tts["usage"], tts["cost_usd"]) == ({"characters": costs[2].characters}, costs[2].cost)

    for i, name, props in [
        (3, "vapi", {"subType": "normal", "minutes": minutes}),
        (4, "transport", {"provider": "twilio", "minutes": minutes}),
    ]:
        e = by_id(events, derived_id(call.id, i))
        assert e["kind"] == "external_cost"
        assert e["usage"] == {"name": name, "external_cost_id": "vapi", "properties": props}
        assert e["cost_usd"] == costs[i].cost

    a = by_id(events, derived_id(call.id, 5))
    assert (a["kind"], a["model"], a["cost_usd"]) == ("llm", "gpt-4o-mini", costs[5].cost)
    assert a["usage"] == {
        "prompt_tokens": costs[5].prompt_tokens,
        "completion_tokens": costs[5].completion_tokens,
        "cached_tokens": 0,
        "reasoning_tokens": 0,
        "purpose": "analysis",
        "analysis_type": "summary",
    }

    ind = by_id(events, derived_id(call.id, "indicator"))
    assert ind["kind"] == "indicator"
    assert ind["usage"]["indicators"] == ["voice-session"]
    want = (ended - started).total_seconds() / 60
    assert abs(ind["usage"]["total_duration_minutes"] - want) < 1e-6
    assert "cost_usd" not in ind

    # Redelivered: answered 2xx, nothing added.
    assert daemon.post(body, sign(body)) == (200, {})
    assert daemon.metric("voicetagd_vapi_duplicate_reports_total") >= 1
    marker = new_call("assistantOverrides", {"paygent_agent_id": "marker"}, started, ended)
    marker_body = report(marker, started, ended, [])
    assert daemon.post(marker_body, sign(marker_body)) == (200, {})
    wait_events(marker.id, 1)
    assert len(wait_events(call.id, len(costs) + 1)) == len(costs) + 1


def test_live_model_report_without_status_update(daemon: VapiDaemon, wait_events):
    tags = {"env": "prod", "channel": "web"}
    agent = f"agent-{uuid.uuid4().hex[:8]}"
    meta = {"paygent_agent_id": agent, "paygent_meta_tags": json.dumps(tags)}
    started = datetime.now(timezone.utc) - timedelta(minutes=5)
    ended = started + timedelta(seconds=random.randint(30, 240))
    call = new_call("assistantOverrides", meta, started, ended)
    seconds = float(random.randint(30, 240))
    live = vt.ServerMessageEndOfCallReportCostsItem_Model(
        type="model",
        model={"provider": "openai", "model": "gpt-live"},
        prompt_tokens=tokens(100, 5000),
        completion_tokens=tokens(10, 500),
        cached_prompt_tokens=tokens(1, 50),
        seconds=seconds,
        usage_complete=True,
        cost=amount(0.01, 1),
    )
    zero_stt = vt.ServerMessageEndOfCallReportCostsItem_Transcriber(
        type="transcriber", transcriber={"provider": "openai"}, minutes=0.0, cost=0.0
    )
    body = report(call, started, ended, [zero_stt, live])
    headers = sign(body, ts=str(int(time.time())))  # seconds work as well as milliseconds
    assert daemon.post(body, headers) == (200, {})

    events = wait_events(call.id, 2)
    assert len(events) == 2, events  # the zero transcriber makes no event
    sts = by_id(events, derived_id(call.id, 1))
    assert (sts["kind"], sts["provider"], sts["model"], sts["cost_usd"]) == ("sts", "openai", "gpt-live", live.cost)
    assert sts["usage"] == {
        "schemaVersion": 1,
        "input": {"text": {"tokens": live.prompt_tokens}},
        "output": {"text": {"tokens": live.completion_tokens}},
        "cached": {"tokens": live.cached_prompt_tokens},
        "connection": {"minutes": round(seconds / 60, 9)},
    }
    for e in events:
        assert (e["agent_id"], e["customer_id"]) == (agent, "walk-in")  # the configured default
        assert e["meta_tags"] == dict(tags, **STATIC)


def test_other_messages_are_answered_and_counted(daemon: VapiDaemon):
    before = daemon.metric('voicetagd_vapi_messages_total{type="transcript"}')
    msg = vt.ServerMessageTranscript(
        type="transcript", role="user", transcript_type="final", transcript="Hi there."
    )
    body = serialize(msg, vt.ServerMessageTranscript)
    assert daemon.post(body, sign(body)) == (200, {})
    assert daemon.metric('voicetagd_vapi_messages_total{type="transcript"}') == before + 1


def test_bad_signatures_are_refused(daemon: VapiDaemon):
    msg = vt.ServerMessageHang(type="hang")
    body = serialize(msg, vt.ServerMessageHang)
    good = sign(body)
    assert daemon.post(body, good) == (200, {})
    assert daemon.post(body, sign(body, key="not-the-key"))[0] == 401
    assert daemon.post(body + b" ", good)[0] == 401
    stale = str(int((time.time() - 3600) * 1000))
    assert daemon.post(body, sign(body, ts=stale))[0] == 401
    assert daemon.post(body, {})[0] == 401
