"""Run nodepass entry points as real subprocesses from inside a trial test
without blocking the reactor: output is collected by a ProcessProtocol and
tests await the lines they need."""

from __future__ import annotations

import os
import re
import signal
import sys
from typing import Optional

from twisted.internet import defer, protocol, reactor

from tests.helpers import free_port  # noqa: F401 - re-exported for the process tests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = "from twisted.scripts.twistd import run; run()"


def child_env(**extra: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.update(extra)
    return env


class Proc(protocol.ProcessProtocol):
    """Collects stdout/stderr; ``wait_for(regex)`` fires when a line matches."""

    def __init__(self) -> None:
        self.out = b""
        self.err = b""
        self.ended: defer.Deferred = defer.Deferred()
        self._waiters: list[tuple[re.Pattern, defer.Deferred]] = []
        self.status: Optional[int] = None

    def _check(self) -> None:
        text = (self.out + self.err).decode("utf-8", "replace")
        for item in list(self._waiters):
            m = item[0].search(text)
            if m:
                self._waiters.remove(item)
                item[1].callback(m)

    def outReceived(self, data: bytes) -> None:
        self.out += data
        self._check()

    def errReceived(self, data: bytes) -> None:
        self.err += data
        self._check()

    def processEnded(self, reason) -> None:
        code = reason.value.exitCode
        # A process that ended on a signal (twistd re-raises SIGTERM) has no
        # exit code: record -signal so "still running" (None) stays distinct.
        self.status = code if code is not None else -(getattr(reason.value, "signal", None) or 0)
        for _, d in self._waiters:
            d.errback(AssertionError(f"process ended before the line appeared; output:\n{self.text()}"))
        self._waiters = []
        self.ended.callback(self.status)

    def text(self) -> str:
        return (self.out + self.err).decode("utf-8", "replace")

    def wait_for(self, pattern: str, timeout: float = 15.0) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        if self.status is not None:
            d.errback(AssertionError(f"process already ended; output:\n{self.text()}"))
            return d
        self._waiters.append((re.compile(pattern, re.M), d))
        self._check()

        def too_late(f, t):
            raise AssertionError(f"{pattern!r} not seen within {t}s; output:\n{self.text()}")

        d.addTimeout(timeout, reactor, onTimeoutCancel=too_late)
        return d

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.status is None:
            self.transport.signalProcess(sig)


def spawn(test, argv: list[str], env: Optional[dict] = None, executable: str = sys.executable) -> Proc:
    """Start ``executable`` with the arguments ``argv`` (Python by default)
    in the repo root; the test's cleanup kills it if it is still running."""
    proc = Proc()
    reactor.spawnProcess(proc, executable, [executable, *argv], env=env or child_env(), path=REPO)

    def cleanup():
        if proc.status is None:
            proc.signal(signal.SIGKILL)
            return proc.ended

    test.addCleanup(cleanup)
    return proc
