"""Unit tests of VoicetagdHook against a tiny in-process aiohttp WebSocket server.

The server (``FakeDaemon``) speaks the daemon's side of CONTRACT section 4.2: it queues each
frame whose ``seq`` is new for its session and answers a cumulative ``ack``, re-acks a ``seq`` it
already queued (so resends after a reconnect are not queued twice), and can be told to refuse
the upgrade without a token, reject a seq with an ``error``, never ack, or drop the connection
once mid-stream. It runs on its own thread and loop, so it serves both the hook's
running-loop mode and its background-thread mode. No Rust daemon and no livekit needed: the
events are small objects with ``model_dump_json`` (what pydantic models have), emitted on a
minimal emitter with livekit's ``on``/``off``/``emit`` shape.

Every wait is bounded (WAIT seconds) and nothing asserts on timing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import threading
import time
from typing import Any, Callable, Dict, List, Optional

import pytest
from aiohttp import web

from voicetagd import VoicetagdHook, event_json

WAIT = 20.0


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Emitter:
    """The shape of livekit.rtc.EventEmitter (which AgentSession is): on / off / emit."""

    def __init__(self) -> None:
        self._events: Dict[str, List[Callable[..., Any]]] = {}

    def on(self, event: str, callback: Callable[..., Any]) -> Callable[..., Any]:
        self._events.setdefault(event, []).append(callback)
        return callback

    def off(self, event: str, callback: Callable[..., Any]) -> None:
        self._events.get(event, []).remove(callback)

    def emit(self, event: str, *args: Any) -> None:
        for cb in list(self._events.get(event, [])):
            cb(*args)  # like livekit: a TypeError from a callback propagates to the emitter

    def listeners(self, event: str) -> int:
        return len(self._events.get(event, []))


class Ev:
    """A stand-in for a pydantic event: only ``model_dump_json`` is used by the hook."""

    def __init__(self, **fields: Any) -> None:
        self.fields = fields

    def model_dump_json(self) -> str:
        return json.dumps(self.fields, separators=(",", ":"))


def usage(n: int) -> Ev:
    return Ev(
        type="session_usage_updated",
        usage={"model_usage": [{"type": "llm_usage", "provider": "p", "model": "m", "input_tokens": n}]},
        created_at=1752321600.0 + n,
    )


class FakeDaemon:
    """The daemon's side of the /v1/livekit protocol, on its own thread and event loop."""

    def __init__(
        self,
        port: int = 0,
        *,
        token: Optional[str] = None,
        ack: bool = True,
        reject: tuple = (),
        drop_once_after: Optional[int] = None,
    ) -> None:
        self.port = port or free_port()
        self.token = token
        self.ack = ack
        self.reject = set(reject)
        self.drop_once_after = drop_once_after
        self.cond = threading.Condition()
        self.received: List[Dict[str, Any]] = []  # every frame, resends included
        self.queued: Dict[str, List[Dict[str, Any]]] = {}  # per session, each seq once
        self.last: Dict[str, int] = {}
        self.headers: List[Dict[str, str]] = []
        self.by_conn: Dict[int, List[int]] = {}  # connection number -> seqs received on it
        self.connections = 0
        self.refused = 0
        self.dropped = False
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._runner: Optional[web.AppRunner] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/livekit"

    def start(self) -> "FakeDaemon":
        ready = threading.Event()

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self._serve())
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=main, daemon=True)
        self._thread.start()
        assert ready.wait(WAIT)
        return self

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/livekit", self._handler)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def stop(self) -> None:
        loop = self._loop
        if loop is None:
            return
        assert self._runner is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), loop).result(WAIT)
        loop.call_soon_threadsafe(loop.stop)
        assert self._thread is not None
        self._thread.join(WAIT)
        self._loop = None

    async def _handler(self, request: web.Request) -> web.StreamResponse:
        with self.cond:
            self.headers.append(dict(request.headers))
        if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
            with self.cond:
                self.refused += 1
            return web.Response(status=401, text="unauthorized")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        with self.cond:
            self.connections += 1
            conn = self.connections
            self.by_conn[conn] = []
        async for msg in ws:
            frame = json.loads(msg.data)
            sid, seq = frame["session_id"], frame["seq"]
            with self.cond:
                self.received.append(frame)
                self.by_conn[conn].append(seq)
                drop = (
                    self.drop_once_after is not None
                    and not self.dropped
                    and len(self.received) >= self.drop_once_after
                )
                if drop:
                    self.dropped = True
                self.cond.notify_all()
            if drop:  # gone without acking this frame: a crash, as the client sees it
                assert request.transport is not None
                request.transport.abort()
                break
            if seq in self.reject:
                self.reject.discard(seq)
                await ws.send_json({"type": "error", "session_id": sid, "seq": seq, "message": "malformed frame"})
                continue
            with self.cond:
                if seq > self.last.get(sid, 0):
                    self.queued.setdefault(sid, []).append(frame)
                    self.last[sid] = seq
                last = self.last.get(sid, 0)
                self.cond.notify_all()
            if self.ack and last:
                await ws.send_json({"type": "ack", "session_id": sid, "seq": last})
        return ws

    def wait(self, pred: Callable[["FakeDaemon"], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT
        with self.cond:
            while not pred(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {what}; received={self.received}")
                self.cond.wait(min(left, 0.2))

    def session(self, sid: str) -> List[Dict[str, Any]]:
        with self.cond:
            return list(self.queued.get(sid, []))


async def wait_until(pred: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, WAIT * 2))


@pytest.fixture
def daemon():
    d = FakeDaemon().start()
    yield d
    d.stop()


def make_hook(url: str, sid: str = "sess-1", **kw: Any) -> VoicetagdHook:
    kw.setdefault("backoff_initial", 0.05)
    kw.setdefault("backoff_max", 0.5)
    return VoicetagdHook(
        url,
        session_id=sid,
        agent_id="my-agent",
        customer_id="customer-123",
        meta_tags={"env": "staging"},
        indicator="voice-session",
        **kw,
    )


# ------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------


def test_frames_seq_and_close(daemon: FakeDaemon):
    async def main() -> VoicetagdHook:
        em = Emitter()
        hook = make_hook(daemon.url).attach(em)
        assert em.listeners("session_usage_updated") == 1 and em.listeners("close") == 1
        assert em.listeners("metrics_collected") == 0  # deprecated path: only with metrics=True
        em.emit("session_usage_updated", usage(812))
        em.emit("session_usage_updated", usage(1624))
        em.emit("close", Ev(type="close", error=None, reason="participant_disconnected", created_at=1.5))
        assert em.listeners("session_usage_updated") == 0  # detached at close
        em.emit("session_usage_updated", usage(9999))  # after the end: ignored
        await wait_until(lambda: hook._done.is_set(), "the sender to finish after session.end is acked")
        assert await hook.aclose() is True
        return hook

    hook = run(main())
    frames = daemon.session("sess-1")
    assert [f["seq"] for f in frames] == [1, 2, 3, 4, 5]
    assert frames[0] == {
        "type": "session.start",
        "session_id": "sess-1",
        "agent_id": "my-agent",
        "customer_id": "customer-123",
        "indicator": "voice-session",
        "meta_tags": {"env": "staging"},
        "seq": 1,
    }
    assert frames[1] == {"type": "livekit", "session_id": "sess-1", "seq": 2, "event": json.loads(usage(812).model_dump_json())}
    assert frames[2]["event"]["usage"]["model_usage"][0]["input_tokens"] == 1624
    assert frames[3]["event"] == {"type": "close", "error": None, "reason": "participant_disconnected", "created_at": 1.5}
    assert frames[4] == {"type": "session.end", "session_id": "sess-1", "seq": 5}
    s = hook.stats
    assert (s["sent"], s["acked"], s["resent"], s["dropped"], s["reconnects"], s["buffered"]) == (5, 5, 0, 0, 0, 0)
    assert daemon.connections == 1
    assert "Authorization" not in daemon.headers[0]


def test_metrics_true_subscribes_to_metrics_collected(daemon: FakeDaemon):
    async def main() -> None:
        em = Emitter()
        hook = make_hook(daemon.url, metrics=True).attach(em)
        assert em.listeners("metrics_collected") == 1
        em.emit("metrics_collected", Ev(type="metrics_collected", metrics={"type": "llm_metrics", "prompt_tokens": 5}))
        assert await hook.aclose() is True
        assert em.listeners("metrics_collected") == 0

    run(main())
    frames = daemon.session("sess-1")
    assert [f["type"] for f in frames] == ["session.start", "livekit"]
    assert frames[1]["event"]["metrics"]["prompt_tokens"] == 5


def test_connection_dropped_mid_stream_resends_unacked_in_order():
    # The server drops the connection (TCP abort, no ack) when it receives its 4th frame; the
    # agent keeps emitting. Every frame reaches the server's queue exactly once, in seq order.
    daemon = FakeDaemon(drop_once_after=4).start()
    try:

        async def main() -> VoicetagdHook:
            em = Emitter()
            hook = make_hook(daemon.url).attach(em)
            for i in range(1, 21):
                em.emit("session_usage_updated", usage(i))
                if i % 5 == 0:
                    await asyncio.sleep(0.01)  # let the sender run between bursts
            em.emit("close", Ev(type="close", error=None, reason="user_initiated", created_at=2.0))
            await wait_until(lambda: hook._done.is_set(), "everything acked")
            return hook

        hook = run(main())
    finally:
        daemon.stop()
    assert daemon.dropped and daemon.connections == 2
    frames = daemon.session("sess-1")
    assert [f["seq"] for f in frames] == list(range(1, 24))
    assert [f["event"]["usage"]["model_usage"][0]["input_tokens"] for f in frames[1:21]] == list(range(1, 21))
    assert frames[-1]["type"] == "session.end"
    s = hook.stats
    assert s["reconnects"] == 1
    assert s["resent"] >= 1  # at least the frame the server died on
    assert s["sent"] == 23 and s["acked"] == 23 and s["buffered"] == 0 and s["dropped"] == 0
    # on each connection the frames went out in seq order; the second one began with the
    # frame the first connection died on (it was never acked)
    first, second = daemon.by_conn[1], daemon.by_conn[2]
    assert first == sorted(first) and second == sorted(second)
    assert second[0] <= first[-1]


def test_daemon_down_at_start_then_up_with_the_same_port():
    port = free_port()
    url = f"ws://127.0.0.1:{port}/v1/livekit"

    async def main() -> VoicetagdHook:
        em = Emitter()
        hook = make_hook(url).attach(em)  # nothing listens yet: the hook retries with backoff
        for i in range(1, 6):
            em.emit("session_usage_updated", usage(i))
        await asyncio.sleep(0.3)
        assert hook.stats["buffered"] == 6 and not hook.connected
        daemon = FakeDaemon(port).start()
        try:
            assert await hook.aclose(timeout=WAIT) is True
        finally:
            daemon.stop()
        assert [f["seq"] for f in daemon.session("sess-1")] == [1, 2, 3, 4, 5, 6]
        return hook

    hook = run(main())
    assert hook.stats["acked"] == 6 and hook.stats["reconnects"] == 0


def test_bounded_buffer_drops_oldest_but_keeps_session_start(caplog: pytest.LogCaptureFixture):
    daemon = FakeDaemon(ack=False).start()  # receives, never acks
    try:

        async def main() -> VoicetagdHook:
            em = Emitter()
            hook = make_hook(daemon.url, max_buffer=5).attach(em)
            with caplog.at_level(logging.WARNING, logger="voicetagd"):
                for i in range(1, 21):
                    em.emit("session_usage_updated", usage(i))  # never blocks
            assert hook.stats["buffered"] == 5
            assert await hook.aclose(timeout=0.3) is False  # nothing was acked
            return hook

        hook = run(main())
    finally:
        daemon.stop()
    s = hook.stats
    assert s["dropped"] == 16 and s["buffered"] == 5
    assert "buffer full" in caplog.text
    kept = [f.seq for f in list(hook._inflight) + list(hook._unsent)]
    assert kept == [1, 18, 19, 20, 21]  # session.start pinned, then the newest


def test_rejected_frame_is_logged_and_dropped_not_resent(caplog: pytest.LogCaptureFixture):
    daemon = FakeDaemon(reject=(3,)).start()
    try:

        async def main() -> VoicetagdHook:
            em = Emitter()
            hook = make_hook(daemon.url).attach(em)
            with caplog.at_level(logging.WARNING, logger="voicetagd"):
                for i in range(1, 5):
                    em.emit("session_usage_updated", usage(i))
                    await asyncio.sleep(0.01)
                assert await hook.aclose(timeout=WAIT) is True
            return hook

        hook = run(main())
    finally:
        daemon.stop()
    assert [f["seq"] for f in daemon.session("sess-1")] == [1, 2, 4, 5]
    assert [f["seq"] for f in daemon.received].count(3) == 1
    assert hook.stats["rejected"] == 1
    assert "malformed frame" in caplog.text


def test_token_is_sent_as_bearer_on_the_upgrade():
    daemon = FakeDaemon(token="s3cret").start()
    try:

        async def main() -> None:
            good = make_hook(daemon.url, sid="good", token="s3cret").attach(Emitter())
            bad = make_hook(daemon.url, sid="bad", token="wrong").attach(Emitter())
            assert await good.aclose(timeout=WAIT) is True
            await wait_until(lambda: daemon.refused >= 2, "the bad token to be refused (and retried)")
            assert await bad.aclose(timeout=0.1) is False

        run(main())
    finally:
        daemon.stop()
    assert [f["type"] for f in daemon.session("good")] == ["session.start"]
    assert daemon.session("bad") == []
    assert any(h.get("Authorization") == "Bearer s3cret" for h in daemon.headers)


def test_background_thread_mode_without_a_running_loop(daemon: FakeDaemon):
    em = Emitter()
    hook = make_hook(daemon.url).attach(em)  # no running loop here: a "voicetagd-hook" thread
    assert hook._thread is not None and hook._thread.name == "voicetagd-hook"
    emitters = [
        threading.Thread(target=lambda i=i: em.emit("session_usage_updated", usage(i))) for i in range(1, 11)
    ]
    for t in emitters:
        t.start()
    for t in emitters:
        t.join(WAIT)
    assert hook.close(timeout=WAIT) is True
    frames = daemon.session("sess-1")
    assert [f["seq"] for f in frames] == list(range(1, 12))
    got = sorted(f["event"]["usage"]["model_usage"][0]["input_tokens"] for f in frames[1:])
    assert got == list(range(1, 11))
    hook._thread.join(WAIT)
    assert not hook._thread.is_alive()


def test_callbacks_never_raise_into_the_agent(daemon: FakeDaemon, caplog: pytest.LogCaptureFixture):
    class Broken:
        def model_dump_json(self) -> str:
            raise TypeError("boom")  # livekit's emitter would re-raise a TypeError

    async def main() -> None:
        em = Emitter()
        hook = make_hook(daemon.url).attach(em)
        with caplog.at_level(logging.ERROR, logger="voicetagd"):
            em.emit("session_usage_updated", Broken())
            em.emit("session_usage_updated", object())
            em.emit("close", Broken())  # the event fails, session.end is still sent
        assert await hook.aclose(timeout=WAIT) is True

    run(main())
    assert "could not forward an event" in caplog.text
    assert [f["type"] for f in daemon.session("sess-1")] == ["session.start", "session.end"]


def test_attach_to_something_without_on_does_not_raise(caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.ERROR, logger="voicetagd"):
        hook = make_hook("ws://127.0.0.1:9/v1/livekit").attach(object())
    assert "attach failed" in caplog.text
    assert hook.close(timeout=0.1) in (True, False)


def test_event_json_matches_model_dump_json_and_nan_becomes_null():
    assert json.loads(event_json({"a": math.nan, "b": [math.inf, 1.5], "c": "x"})) == {"a": None, "b": [None, 1.5], "c": "x"}
    ev = usage(3)
    assert event_json(ev) == ev.model_dump_json()


def test_aclose_as_a_livekit_shutdown_callback_gets_the_reason_and_still_flushes(daemon: FakeDaemon):
    # JobContext.add_shutdown_callback(hook.aclose) calls it with the shutdown reason (a str)
    async def main() -> None:
        em = Emitter()
        hook = make_hook(daemon.url).attach(em)
        em.emit("session_usage_updated", usage(1))
        assert await hook.aclose("job_shutdown") is True

    run(main())
    assert [f["seq"] for f in daemon.session("sess-1")] == [1, 2]
