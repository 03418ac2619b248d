"""``VoicetagdHook``: stream a LiveKit ``AgentSession``'s usage to voicetagd, at least once.

Wire protocol (voicetagd CONTRACT section 4.2): one WebSocket per hook, text frames, one JSON
object each::

    -> {"type":"session.start","session_id":S,"agent_id":A,"customer_id":C,"indicator":I,"meta_tags":{...},"seq":1}
    -> {"type":"livekit","session_id":S,"seq":N,"event":<ev.model_dump_json()>}
    -> {"type":"session.end","session_id":S,"seq":N}
    <- {"type":"ack","session_id":S,"seq":N}            cumulative: every frame <= N is durably queued
    <- {"type":"error","session_id":S,"seq":N,"message":"..."}

How delivery works
------------------
* Every frame gets the next ``seq`` (1, 2, 3, ...) and is serialized *when the event fires*
  (LiveKit objects may be mutated later), then appended to an in-memory buffer. The agent's
  callback returns at once: nothing in the hook ever blocks or raises into the agent.
* The buffer holds every frame not yet acknowledged. It has two parts: ``_inflight`` (written
  on the current connection, waiting for an ack) followed by ``_unsent``; together they are
  always in ``seq`` order. An ack ``N`` removes every frame with ``seq <= N``.
* When the connection breaks, ``_inflight`` is put back in front of ``_unsent``; the next
  connection (exponential backoff with jitter, 0.2 s doubling up to 10 s) writes them all again
  in order. The daemon drops, but re-acks, a ``seq`` it already queued, so a resend never counts
  twice: delivery is at-least-once on the wire and exactly-once in the daemon's queue.
* The buffer is bounded (``max_buffer`` frames, default 10,000). When it is full the oldest
  frame is dropped (never the ``session.start`` frame, which carries the session's tags),
  counted in ``stats["dropped"]`` and logged as a warning.
* A frame the daemon answers with ``error`` is logged and dropped (``stats["rejected"]``): the
  daemon only rejects frames it cannot use, and resending the same bytes would not change that.

Where the sender runs
---------------------
``attach()`` looks for a running asyncio loop (``asyncio.get_running_loop()``). Inside a
LiveKit job there always is one (``entrypoint`` is a coroutine), and the sender becomes a task
on that loop: the agent's event callbacks and the sender share one thread, no locking cost
worth mentioning. If ``attach()`` is called where no loop is running (a script, a test, a
thread), the hook starts one daemon thread, ``voicetagd-hook``, with its own loop; callbacks
may then come from any thread (the buffer is guarded by a ``threading.Lock``, never held across
an ``await``, and the sender is woken with ``call_soon_threadsafe``).

The sender stops by itself once the session's ``session.end`` frame has been acked, or when
``aclose()`` is awaited. In the running-loop mode its fate is tied to that loop: frames still
unacked when the process exits are lost, so await ``hook.aclose()`` in a shutdown callback.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import json
import logging
import math
import random
import threading
import time
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Tuple

import aiohttp

logger = logging.getLogger("voicetagd")

#: Default bound of the unacked-frame buffer. At a few hundred bytes a frame this is a few MB,
#: and it covers minutes of a daemon outage at the rate an AgentSession emits usage (about one
#: ``session_usage_updated`` a second while audio flows).
DEFAULT_MAX_BUFFER = 10_000
#: Reconnect delay: starts here, doubles after each failed attempt, capped at BACKOFF_MAX.
BACKOFF_INITIAL = 0.2
BACKOFF_MAX = 10.0
#: aiohttp WebSocket heartbeat (ping interval, seconds): a silent dead peer is noticed within
#: about 1.5x this.
DEFAULT_HEARTBEAT = 15.0
#: A connection that lived this long (or received an ack) resets the backoff.
_STABLE_AFTER = 5.0

_START = "session.start"
_EVENT = "livekit"
_END = "session.end"


class _Frame:
    __slots__ = ("seq", "kind", "data", "sends")

    def __init__(self, seq: int, kind: str, data: str) -> None:
        self.seq = seq
        self.kind = kind
        self.data = data
        self.sends = 0  # how many times it was written to a socket (touched on the loop only)


def _finite(obj: Any) -> Any:
    """NaN/inf -> None, recursively (what pydantic's model_dump_json does)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _json_default(obj: Any) -> Any:
    dump_json = getattr(obj, "model_dump_json", None)
    if callable(dump_json):
        return json.loads(dump_json())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if hasattr(obj, "value"):  # enums
        return obj.value
    raise TypeError(f"cannot serialize {type(obj).__name__}")


def event_json(ev: Any) -> str:
    """The JSON text of one LiveKit object, exactly as ``ev.model_dump_json()`` gives it.

    ``model_dump_json`` (not ``json.dumps(ev.model_dump(mode="json"))``): only the former turns
    NaN/inf into ``null``; the latter would write ``NaN``, which is not JSON. Plain dicts and
    dataclasses (``AgentSessionUsage``) are accepted too.
    """
    dump_json = getattr(ev, "model_dump_json", None)
    if callable(dump_json):
        return dump_json()
    if dataclasses.is_dataclass(ev) and not isinstance(ev, type):
        ev = _json_default(ev)
    return json.dumps(_finite(json.loads(json.dumps(ev, default=_json_default))), separators=(",", ":"))


class VoicetagdHook:
    """Forwards an ``AgentSession``'s usage events to voicetagd's ``/v1/livekit`` WebSocket.

    ::

        hook = VoicetagdHook("ws://127.0.0.1:7878/v1/livekit", session_id=ctx.room.name,
                             agent_id="my-agent", customer_id="customer-123",
                             meta_tags={"env": "staging"}, indicator="voice-session")
        hook.attach(session)

    Parameters
    ----------
    url: the daemon's WebSocket endpoint, ``ws://HOST:PORT/v1/livekit``.
    session_id: the session's id (e.g. the room name); every frame carries it.
    agent_id, customer_id, indicator, meta_tags: sent once, in ``session.start``; the daemon
        stamps ``meta_tags`` on every STT/LLM/TTS/STS event of the session.
    token: sent as ``Authorization: Bearer <token>`` on the upgrade (daemon ``[server] token``).
    metrics: also forward the deprecated session-level ``metrics_collected`` events (off by
        default; ``session_usage_updated`` carries the same usage, and the daemon counts only
        one of the two kinds per session).
    max_buffer: bound of the unacked-frame buffer (frames); the oldest are dropped beyond it.
    heartbeat: WebSocket ping interval in seconds (aiohttp ``heartbeat=``).
    """

    def __init__(
        self,
        url: str,
        *,
        session_id: str,
        agent_id: Optional[str] = None,
        customer_id: Optional[str] = None,
        meta_tags: Optional[Mapping[str, Any]] = None,
        indicator: Optional[str] = None,
        token: Optional[str] = None,
        metrics: bool = False,
        max_buffer: int = DEFAULT_MAX_BUFFER,
        heartbeat: float = DEFAULT_HEARTBEAT,
        connect_timeout: float = 10.0,
        backoff_initial: float = BACKOFF_INITIAL,
        backoff_max: float = BACKOFF_MAX,
    ) -> None:
        if not session_id:
            raise ValueError("session_id is required")
        if max_buffer < 2:
            raise ValueError("max_buffer must be at least 2")
        self.url = url
        self.session_id = str(session_id)
        self.agent_id = agent_id
        self.customer_id = customer_id
        self.meta_tags = dict(meta_tags or {})
        self.indicator = indicator
        self.metrics = metrics
        self.max_buffer = int(max_buffer)
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._heartbeat = heartbeat
        self._connect_timeout = connect_timeout
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max

        # Guards the buffer, the seq counter and the counters. A threading.Lock (not an
        # asyncio one) because producers may be on another thread; it is held only for a few
        # deque operations and never across an await.
        self._lock = threading.Lock()
        self._inflight: Deque[_Frame] = collections.deque()
        self._unsent: Deque[_Frame] = collections.deque()
        self._next_seq = 1
        self._acked_seq = 0
        self._ended = False  # session.end queued: no more frames
        self._closed = False  # aclose() called or detached: no more frames
        self._stats: Dict[str, int] = {
            "sent": 0,  # frames written for the first time
            "acked": 0,  # frames acknowledged by the daemon
            "resent": 0,  # frames written again after a reconnect
            "dropped": 0,  # frames dropped because the buffer was full
            "rejected": 0,  # frames the daemon answered with an error (dropped)
            "reconnects": 0,  # connections made after the first one
        }

        self._emitter: Any = None
        self._handlers: List[Tuple[str, Callable[..., None]]] = []
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._loop_thread_id: Optional[int] = None
        self._thread: Optional[threading.Thread] = None
        self._task: Optional["asyncio.Task[None]"] = None
        self._done = threading.Event()  # the sender has finished (or never ran)
        self._done.set()
        # Created on the sender's loop (Python 3.9 binds asyncio primitives to a loop).
        self._wake: Optional[asyncio.Event] = None
        self._progress: Optional[asyncio.Event] = None
        self._stopping = False
        self._closers = 0  # aclose() calls in progress on the sender's loop
        self.connected = False

    # ------------------------------------------------------------------------------------
    # public API
    # ------------------------------------------------------------------------------------

    @property
    def stats(self) -> Dict[str, int]:
        """A snapshot of the counters, plus ``buffered`` (frames not yet acked)."""
        with self._lock:
            out = dict(self._stats)
            out["buffered"] = len(self._inflight) + len(self._unsent)
            out["acked_seq"] = self._acked_seq
        return out

    def attach(self, session: Any) -> "VoicetagdHook":
        """Queue ``session.start``, subscribe to ``session`` and start the sender. Never raises."""
        try:
            if self._emitter is not None:
                logger.warning("voicetagd hook already attached", extra={"session_id": self.session_id})
                return self
            self._emitter = session
            start: Dict[str, Any] = {"type": _START, "session_id": self.session_id}
            for key, value in (
                ("agent_id", self.agent_id),
                ("customer_id", self.customer_id),
                ("indicator", self.indicator),
            ):
                if value is not None:
                    start[key] = value
            start["meta_tags"] = self.meta_tags
            body = json.dumps(start, separators=(",", ":"), default=str)
            self._enqueue(_START, lambda seq: body[:-1] + f',"seq":{seq}}}')

            subscriptions: List[Tuple[str, Callable[..., None]]] = [
                ("session_usage_updated", self._on_event),
                ("close", self._on_close),
            ]
            if self.metrics:
                # Deprecated in livekit-agents 1.8.9: AgentSession.on() logs a warning for it.
                subscriptions.append(("metrics_collected", self._on_event))
            for name, cb in subscriptions:
                session.on(name, cb)
                self._handlers.append((name, cb))
            self._start_sender()
        except Exception:
            logger.exception("voicetagd hook: attach failed", extra={"session_id": self.session_id})
        return self

    def track(self, ev: Any) -> None:
        """Forward one LiveKit object (a bare metric, a usage record, an event). Never raises.

        For per-plugin metrics, e.g. ``llm.on("metrics_collected", hook.track)``.
        """
        self._on_event(ev)

    async def aclose(self, timeout: float = 5.0) -> bool:
        """Stop listening, wait (at most ``timeout`` s) until every frame is acked, close.

        Returns True when everything was acked. Never raises. (``timeout`` that is not a
        number, e.g. the shutdown reason when ``hook.aclose`` itself is passed to
        ``JobContext.add_shutdown_callback``, means the default 5 s.)
        """
        timeout = _as_timeout(timeout)
        try:
            self._detach()
            loop = self._loop
            if loop is None or self._done.is_set():
                return self._pending() == 0
            if asyncio.get_running_loop() is loop:
                return await self._aclose_on_loop(timeout)
            fut = asyncio.run_coroutine_threadsafe(self._aclose_on_loop(timeout), loop)
            deadline = time.monotonic() + timeout + 5.0
            while not fut.done() and time.monotonic() < deadline and not self._done.is_set():
                await asyncio.sleep(0.02)
            return self._result_of(fut)
        except Exception:
            logger.exception("voicetagd hook: aclose failed", extra={"session_id": self.session_id})
            return False

    def close(self, timeout: float = 5.0) -> bool:
        """Blocking ``aclose`` for code without a running loop (background-thread mode)."""
        timeout = _as_timeout(timeout)
        try:
            self._detach()
            loop = self._loop
            if loop is None or self._done.is_set():
                return self._pending() == 0
            if threading.get_ident() == self._loop_thread_id:
                logger.warning("voicetagd hook: close() called on the sender's loop; use aclose()")
                return False
            fut = asyncio.run_coroutine_threadsafe(self._aclose_on_loop(timeout), loop)
            deadline = time.monotonic() + timeout + 5.0
            while not fut.done() and time.monotonic() < deadline and not self._done.is_set():
                self._done.wait(0.02)
            return self._result_of(fut)
        except Exception:
            logger.exception("voicetagd hook: close failed", extra={"session_id": self.session_id})
            return False

    def _result_of(self, fut: "concurrent.futures.Future[bool]") -> bool:
        """The closer's result; if the sender's thread ended first, what is left unacked."""
        try:
            return fut.result(0.5)
        except Exception:
            fut.cancel()
            return self._pending() == 0

    # ------------------------------------------------------------------------------------
    # callbacks (called by the emitter, on the agent's thread)
    # ------------------------------------------------------------------------------------

    def _on_event(self, ev: Any) -> None:
        try:
            text = event_json(ev)
            head = '{"type":"livekit","session_id":' + json.dumps(self.session_id) + ',"seq":'
            self._enqueue(_EVENT, lambda seq: f'{head}{seq},"event":{text}}}')
        except Exception:
            logger.exception(
                "voicetagd hook: could not forward an event",
                extra={"session_id": self.session_id, "event_type": type(ev).__name__},
            )

    def _on_close(self, ev: Any) -> None:
        try:
            self._on_event(ev)
            head = '{"type":"session.end","session_id":' + json.dumps(self.session_id) + ',"seq":'
            self._enqueue(_END, lambda seq: f"{head}{seq}}}")
            with self._lock:
                self._ended = True
            self._detach()
            self._wake_up()
        except Exception:
            logger.exception("voicetagd hook: close handling failed", extra={"session_id": self.session_id})

    # ------------------------------------------------------------------------------------
    # buffer
    # ------------------------------------------------------------------------------------

    def _enqueue(self, kind: str, build: Callable[[int], str]) -> None:
        dropped: List[Tuple[int, int]] = []  # (seq, running total of drops)
        with self._lock:
            if self._closed or self._ended:
                logger.debug("voicetagd hook: frame after end/close ignored", extra={"session_id": self.session_id})
                return
            seq = self._next_seq
            self._next_seq += 1
            self._unsent.append(_Frame(seq, kind, build(seq)))
            while len(self._inflight) + len(self._unsent) > self.max_buffer:
                victim = self._drop_oldest_locked()
                if victim is None:
                    break
                dropped.append((victim.seq, self._stats["dropped"]))
        for victim_seq, total in dropped:
            if total == 1 or total % 1000 == 0:  # the first drop, then every 1000th
                logger.warning(
                    "voicetagd hook: buffer full (%d frames unacked), dropped the oldest frame"
                    " (seq %d); %d dropped so far",
                    self.max_buffer,
                    victim_seq,
                    total,
                    extra={"session_id": self.session_id},
                )
        self._wake_up()

    def _drop_oldest_locked(self) -> Optional[_Frame]:
        for dq in (self._inflight, self._unsent):
            for i, frame in enumerate(dq):
                if frame.kind != _START:
                    del dq[i]
                    self._stats["dropped"] += 1
                    return frame
        return None

    def _pending(self) -> int:
        with self._lock:
            return len(self._inflight) + len(self._unsent)

    def _finished(self) -> bool:
        """The session ended and the daemon acked everything: nothing left to do."""
        with self._lock:
            return self._ended and not self._inflight and not self._unsent

    def _take_unsent(self) -> List[_Frame]:
        with self._lock:
            frames = list(self._unsent)
            self._inflight.extend(self._unsent)
            self._unsent.clear()
        return frames

    def _requeue(self) -> None:
        """Connection lost: everything written but unacked goes back, in order, to be resent."""
        with self._lock:
            self._inflight.extend(self._unsent)
            self._unsent, self._inflight = self._inflight, collections.deque()

    def _on_ack(self, seq: int) -> None:
        with self._lock:
            n = 0
            for dq in (self._inflight, self._unsent):  # together in seq order
                while dq and dq[0].seq <= seq:
                    dq.popleft()
                    n += 1
            self._stats["acked"] += n
            if seq > self._acked_seq:
                self._acked_seq = seq
        if self._progress is not None:
            self._progress.set()
        if self._wake is not None:
            self._wake.set()

    def _on_error(self, seq: Optional[int], message: str) -> None:
        found = None
        if seq is not None:
            with self._lock:
                for dq in (self._inflight, self._unsent):
                    for i, frame in enumerate(dq):
                        if frame.seq == seq:
                            found = frame
                            del dq[i]
                            self._stats["rejected"] += 1
                            break
                    if found is not None:
                        break
        logger.warning(
            "voicetagd rejected frame seq %s (%s): %s",
            seq,
            "dropped" if found is not None else "not in the buffer",
            message,
            extra={"session_id": self.session_id},
        )
        if self._progress is not None:
            self._progress.set()
        if self._wake is not None:
            self._wake.set()

    # ------------------------------------------------------------------------------------
    # sender
    # ------------------------------------------------------------------------------------

    def _wake_up(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is None or wake is None:
            return  # the sender has not started yet; it reads the buffer when it does
        try:
            if threading.get_ident() == self._loop_thread_id:
                wake.set()
            else:
                loop.call_soon_threadsafe(wake.set)
        except RuntimeError:
            pass  # that loop is closed: the sender is gone

    def _detach(self) -> None:
        emitter, handlers = self._emitter, self._handlers
        self._handlers = []
        for name, cb in handlers:
            try:
                emitter.off(name, cb)
            except Exception:
                pass

    def _start_sender(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        self._done.clear()
        if loop is not None:
            self._loop = loop
            self._loop_thread_id = threading.get_ident()
            self._make_primitives()
            self._task = loop.create_task(self._run())
            return
        ready = threading.Event()

        def thread_main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._loop_thread_id = threading.get_ident()
            asyncio.set_event_loop(loop)
            try:
                self._make_primitives()
                self._task = loop.create_task(self._run())
                ready.set()
                loop.run_until_complete(self._linger(self._task))
            except BaseException:
                logger.exception("voicetagd hook: sender thread failed")
            finally:
                self._done.set()
                ready.set()
                try:
                    loop.run_until_complete(loop.shutdown_asyncgens())
                finally:
                    loop.close()

        self._thread = threading.Thread(target=thread_main, name="voicetagd-hook", daemon=True)
        self._thread.start()
        ready.wait(5.0)

    async def _linger(self, task: "asyncio.Task[None]") -> None:
        """Background-thread mode: keep the loop alive while an aclose() is still running on
        it, so that its result is delivered before the loop stops."""
        try:
            await task
        finally:
            while self._closers:
                await asyncio.sleep(0.01)

    def _make_primitives(self) -> None:
        # On the sender's loop thread, with that loop current (Python 3.9 binds asyncio
        # primitives to the current loop when they are made).
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._wake.set()  # frames may already be queued (session.start is)

    async def _run(self) -> None:
        assert self._wake is not None and self._progress is not None
        backoff = self._backoff_initial
        attempt = 0
        connections = 0
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self._connect_timeout, sock_connect=self._connect_timeout
        )
        try:
            async with aiohttp.ClientSession(timeout=timeout) as http:
                while not self._stopping and not self._finished():
                    attempt += 1
                    stable = False
                    try:
                        ws = await http.ws_connect(
                            self.url, headers=self._headers, heartbeat=self._heartbeat, autoping=True
                        )
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:
                        log = logger.warning if attempt == 1 else logger.debug
                        log(
                            "voicetagd hook: cannot connect to %s (attempt %d): %s",
                            self.url,
                            attempt,
                            _describe(exc),
                            extra={"session_id": self.session_id},
                        )
                    else:
                        connections += 1
                        if connections > 1:
                            with self._lock:
                                self._stats["reconnects"] += 1
                            logger.info(
                                "voicetagd hook: reconnected, resending %d unacked frame(s)",
                                self._pending(),
                                extra={"session_id": self.session_id},
                            )
                        attempt = 0
                        stable = await self._connection(ws)
                    if self._stopping or self._finished():
                        break
                    if stable:
                        backoff = self._backoff_initial
                    delay = backoff * random.uniform(0.5, 1.0)  # "equal jitter"
                    backoff = min(backoff * 2, self._backoff_max)
                    self._wake.clear()
                    try:  # a sleep that aclose() can cut short
                        await asyncio.wait_for(self._stopped(), delay)
                    except asyncio.TimeoutError:
                        pass
        except asyncio.CancelledError:
            pass
        except Exception:
            logger.exception("voicetagd hook: sender failed", extra={"session_id": self.session_id})
        finally:
            self.connected = False
            if self._progress is not None:
                self._progress.set()
            if self._thread is None:
                self._done.set()

    async def _stopped(self) -> None:
        assert self._wake is not None
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()

    async def _connection(self, ws: aiohttp.ClientWebSocketResponse) -> bool:
        """Serve one connection until it breaks or the work is done; True if it was stable."""
        started = time.monotonic()
        acked_before = self._stats["acked"]
        self.connected = True
        reader = asyncio.ensure_future(self._read(ws))
        writer = asyncio.ensure_future(self._write(ws))
        try:
            done, pending = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
            for t in pending:
                t.cancel()
            for t in pending:
                try:
                    await t
                except BaseException:
                    pass
            for t in done:
                exc = t.exception()
                if exc is not None:
                    logger.warning(
                        "voicetagd hook: connection failed: %s",
                        _describe(exc),
                        extra={"session_id": self.session_id},
                    )
        except asyncio.CancelledError:
            reader.cancel()
            writer.cancel()
            raise
        finally:
            self.connected = False
            self._requeue()
            try:
                await ws.close()
            except Exception:
                pass
        return time.monotonic() - started >= _STABLE_AFTER or self._stats["acked"] > acked_before

    async def _write(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        assert self._wake is not None
        while not self._stopping:
            self._wake.clear()  # before taking: a frame queued after this sets it again
            frames = self._take_unsent()
            for frame in frames:
                await ws.send_str(frame.data)
                frame.sends += 1
                with self._lock:
                    self._stats["sent" if frame.sends == 1 else "resent"] += 1
            if frames:
                continue
            if self._finished():
                return
            await self._wake.wait()

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                self._on_message(msg.data)
            elif msg.type == aiohttp.WSMsgType.ERROR:
                raise ConnectionError(f"websocket error: {ws.exception()!r}")
        # the daemon closed the connection
        if ws.close_code not in (None, 1000):
            logger.info(
                "voicetagd hook: connection closed by the daemon (code %s)",
                ws.close_code,
                extra={"session_id": self.session_id},
            )

    def _on_message(self, data: str) -> None:
        try:
            msg = json.loads(data)
        except ValueError:
            logger.warning("voicetagd hook: daemon sent non-JSON text: %.200s", data)
            return
        if not isinstance(msg, dict):
            return
        sid = msg.get("session_id")
        if sid is not None and sid != self.session_id:
            return
        seq = msg.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool):
            seq = None
        kind = msg.get("type")
        if kind == "ack" and seq is not None:
            self._on_ack(seq)
        elif kind == "error":
            self._on_error(seq, str(msg.get("message", "")))
        else:
            logger.debug("voicetagd hook: ignoring daemon message: %.200s", data)

    async def _aclose_on_loop(self, timeout: float) -> bool:
        self._closers += 1
        try:
            return await self._flush_and_stop(timeout)
        finally:
            self._closers -= 1

    async def _flush_and_stop(self, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        with self._lock:
            self._closed = True
        deadline = loop.time() + max(0.0, timeout)
        task = self._task
        while self._pending() > 0 and task is not None and not task.done():
            left = deadline - loop.time()
            if left <= 0:
                break
            assert self._progress is not None
            self._progress.clear()
            if self._pending() == 0:
                break
            try:
                await asyncio.wait_for(self._progress.wait(), min(left, 0.5))
            except asyncio.TimeoutError:
                pass
        left_over = self._pending()
        self._stopping = True
        if self._wake is not None:
            self._wake.set()
        if task is not None and not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), 2.0)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                task.cancel()
                try:
                    await task
                except BaseException:
                    pass
        if left_over:
            logger.warning(
                "voicetagd hook closed with %d unacked frame(s) (timeout %.1fs)",
                left_over,
                timeout,
                extra={"session_id": self.session_id},
            )
        return left_over == 0


def _as_timeout(value: Any, default: float = 5.0) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return max(0.0, float(value))
    return default


def _describe(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.WSServerHandshakeError):
        return f"upgrade refused with HTTP {exc.status}" + (
            " (check the token)" if exc.status == 401 else ""
        )
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
