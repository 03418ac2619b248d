"""The harness the real-client tests share: the voicetagd binary as a subprocess, its config,
and the bounded waits. The pytest fixtures built on it are in ``conftest.py``.

A :class:`Daemon` writes its TOML config into a temp dir (a free port on 127.0.0.1, the spool
dir beside it, the in-process ``upstream.py`` as its upstream), and :meth:`Daemon.start` runs
the binary and waits (bounded) for ``/readyz``. It is restartable: ``start`` again after
``sigkill`` / ``terminate`` reuses the same port, config and spool dir, appending to the same log.
What a test module needs beyond the common config is given as TOML fragments
(``server_extra``, ``upstream_extra``, ``sections``).

``VOICETAGD_BIN`` overrides the binary path.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from datetime import datetime
from pathlib import Path
from typing import IO, Any, Callable, Dict, List, Optional

from upstream import Upstream

REPO = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("VOICETAGD_BIN", REPO / "target" / "debug" / "voicetagd"))
WAIT = 30.0  # seconds: the overall bound for anything to happen (an event to reach the upstream, ...)
STATIC = {"host": "ci-host"}  # the static tags every daemon is configured with

Event = Dict[str, Any]


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rfc3339(value: Any) -> datetime:
    assert isinstance(value, str) and value, f"not a timestamp: {value!r}"
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def of_session(sid: str) -> Callable[[Event], bool]:
    return lambda e: e.get("session_id") == sid


def config_text(
    port: int,
    spool: Path,
    upstream_url: str,
    server_extra: str = "",
    upstream_extra: str = "",
    sections: str = "",
) -> str:
    """The daemon's TOML: the common settings plus a module's own lines (``server_extra`` in
    ``[server]``, ``upstream_extra`` in ``[upstream]``) and tables (``sections``)."""
    static = ", ".join(f"{k} = {json.dumps(v)}" for k, v in STATIC.items())
    return f"""\
[server]
listen = "127.0.0.1:{port}"
{server_extra}
[tags]
static = {{ {static} }}
[spool]
dir = "{spool}"
[upstream]
url = "{upstream_url}"
batch_max_events = 50
batch_timeout = "200ms"
{upstream_extra}
{sections}
"""


class Daemon:
    """voicetagd under test (restartable: same port, same config, same spool dir)."""

    def __init__(
        self,
        tmp: Path,
        upstream: Upstream,
        *,
        server_extra: str = "",
        upstream_extra: str = "",
        sections: str = "",
        log_lines: int = 40,
    ) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/v1/livekit"
        self.log_path = tmp / "voicetagd.log"
        self.log_lines = log_lines  # how much of the log a failure message shows
        self.config = tmp / "voicetagd.toml"
        self.config.write_text(
            config_text(self.port, tmp / "spool", upstream.url, server_extra, upstream_extra, sections)
        )
        assert BIN.exists(), f"{BIN} missing: run `cargo build` first (run.sh does)"
        self.proc: Optional[subprocess.Popen] = None
        self._log: Optional[IO[bytes]] = None
        self.starts = 0

    def start(self) -> "Daemon":
        """Run the binary (its output appended to ``log_path``) and wait until it is ready."""
        env = dict(os.environ, VOICETAGD_LOG=os.environ.get("VOICETAGD_LOG", "info"), NO_COLOR="1")
        self._log = open(self.log_path, "ab")
        self._log.write(f"\n===== start #{self.starts + 1} =====\n".encode())
        self._log.flush()
        self.proc = subprocess.Popen(
            [str(BIN), "run", "--config", str(self.config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.starts += 1
        self.wait_ready()
        return self

    def log_tail(self, lines: Optional[int] = None) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-(lines or self.log_lines):])

    def wait_ready(self, timeout: float = WAIT) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"voicetagd exited with {self.proc.returncode} before ready:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.base_url + "/readyz", timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        raise AssertionError(f"voicetagd not ready after {timeout}s:\n{self.log_tail()}")

    def sigkill(self) -> None:
        """kill -9: no drain, no flush; whatever was acked must be in the spool."""
        assert self.proc is not None and self.proc.poll() is None, self.log_tail()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=WAIT)
        self._close_log()

    def terminate(self, timeout: float = WAIT) -> int:
        """SIGTERM, then wait (bounded) for the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._close_log()

    def kill(self) -> None:
        """Stop it for good if it still runs (teardown)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None and not self._log.closed:
            self._log.close()


def wait_events(
    upstream: Upstream, daemon: Daemon, pred: Callable[[Event], bool], count: int = 1, what: str = ""
) -> List[Event]:
    """Wait (at most ``WAIT`` s) until ``count`` events at ``upstream`` match ``pred``; on timeout
    the AssertionError carries the tail of the daemon's log."""
    try:
        return upstream.wait_for(pred, count=count, timeout=WAIT, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- voicetagd log ---\n{daemon.log_tail()}") from None
