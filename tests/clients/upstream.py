"""A tiny in-process upstream for voicetagd: records every batch it is sent.

It accepts ``POST`` on any path, decodes the body (``Content-Encoding: gzip`` or none),
and keeps each batch (headers + parsed JSON) and every event in it. Tests read them with
:meth:`Upstream.events` / :meth:`Upstream.batches` or wait with :meth:`Upstream.wait_for`.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Optional


class Upstream:
    """A threaded HTTP server on 127.0.0.1 (a free port) that records batches."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self._lock = threading.Condition()
        self._batches: List[Dict[str, Any]] = []
        self._errors: List[str] = []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 (http.server naming)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                encoding = (self.headers.get("Content-Encoding") or "identity").lower()
                try:
                    if encoding == "gzip":
                        raw = gzip.decompress(raw)
                    elif encoding not in ("identity", ""):
                        raise ValueError(f"unsupported Content-Encoding {encoding!r}")
                    body = json.loads(raw)
                except Exception as exc:  # recorded, answered 400: the test will see it
                    upstream._record_error(f"{self.path}: {exc}")
                    self._reply(400, {"error": str(exc)})
                    return
                upstream._record(
                    {
                        "path": self.path,
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                        "encoding": encoding,
                        "body": body,
                    }
                )
                self._reply(upstream.status, {"ok": True})

            def _reply(self, status: int, obj: Any) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, fmt: str, *args: Any) -> None:  # quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/events:batch"

    def start(self) -> "Upstream":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # -- recording ------------------------------------------------------------------------

    def _record(self, batch: Dict[str, Any]) -> None:
        with self._lock:
            self._batches.append(batch)
            self._lock.notify_all()

    def _record_error(self, msg: str) -> None:
        with self._lock:
            self._errors.append(msg)
            self._lock.notify_all()

    def batches(self) -> List[Dict[str, Any]]:
        with self._lock:
            return list(self._batches)

    def errors(self) -> List[str]:
        with self._lock:
            return list(self._errors)

    def events(self) -> List[Dict[str, Any]]:
        """Every event received so far, in arrival order."""
        with self._lock:
            return [e for b in self._batches for e in b["body"].get("events", [])]

    def wait_for(
        self,
        pred: Callable[[Dict[str, Any]], bool],
        count: int = 1,
        timeout: float = 30.0,
        what: Optional[str] = None,
    ) -> List[Dict[str, Any]]:
        """Wait (at most ``timeout`` seconds) until ``count`` events match ``pred``.

        Returns the matching events; raises AssertionError naming ``what`` on timeout.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                found = [
                    e for b in self._batches for e in b["body"].get("events", []) if pred(e)
                ]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"timed out after {timeout}s waiting for {count} event(s)"
                        f" {what or ''}: got {len(found)}; upstream errors: {self._errors}"
                    )
                self._lock.wait(timeout=min(left, 0.5))
