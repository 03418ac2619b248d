"""Fixtures shared by the real-client tests (the harness itself is ``harness.py``).

Per module: one in-process upstream, one daemon sending to it, and ``wait_events``. A module
says how its daemon is made by overriding ``make_daemon`` (e.g. ``functools.partial(Daemon,
sections=...)`` for a config section of its own, or a ``Daemon`` subclass).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Iterator, List

import pytest

import harness
from harness import Daemon
from upstream import Upstream


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    up = Upstream().start()
    yield up
    up.stop()


@pytest.fixture(scope="module")
def make_daemon() -> Callable[..., Daemon]:
    """``make_daemon(tmp_dir, upstream) -> Daemon`` (not started); override it in a module."""
    return Daemon


@pytest.fixture(scope="module")
def daemon(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    upstream: Upstream,
    make_daemon: Callable[..., Daemon],
) -> Iterator[Daemon]:
    d = make_daemon(tmp_path_factory.mktemp(f"voicetagd-{request.module.__name__}"), upstream)
    try:
        d.start()
        yield d
    finally:
        d.kill()  # only if still running (a test may have stopped it already)


@pytest.fixture(scope="module")
def wait_events(upstream: Upstream, daemon: Daemon) -> Callable[..., List[Dict[str, Any]]]:
    """wait_events(pred, count=1, what=...) -> the matching events (bounded by WAIT)."""
    return functools.partial(harness.wait_events, upstream, daemon)
