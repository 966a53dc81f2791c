"""The idle timer every "close it when nothing happened for N seconds" rule
uses: UDP sessions and their target sockets, relayed TCP pairs, and the
control channel's silence watch.

Activity is frequent (once per datagram or relayed chunk) and the timeout is
long, so the two sides are lopsided on purpose: recording activity is one
attribute store of the clock's time into :attr:`IdleTimer.last`, and the
only timer is re-armed lazily -- when it fires early it looks at ``last``
and sleeps again for the remainder instead of being pushed back on every
touch (one ``DelayedCall`` per idle period, not one per chunk).

Twisted's ``TimeoutMixin`` does the same job by resetting its
``DelayedCall`` on every ``resetTimeout()`` -- a heap update per chunk on
the relay's hot path, where this timer costs one store (docs/benchmarks.md:
the relay's per-chunk Python cost is what limits its throughput)."""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol


class Call(Protocol):
    """What ``callLater`` returns, as far as a timer needs it."""

    def active(self) -> bool: ...

    def cancel(self) -> None: ...


class ClockLike(Protocol):
    """The part of ``IReactorTime`` a timer uses -- the reactor or a
    ``task.Clock``.  (A structural type: mypy cannot check the reactor
    against the zope interface itself.)"""

    def seconds(self) -> float: ...

    def callLater(self, delay: float, callable: Callable[..., Any], *args: object, **kw: object) -> Any: ...


class IdleTimer:
    """Calls ``expire`` once nothing has touched the timer for ``timeout``
    seconds; a ``timeout`` of 0 (or less) never expires.

    Hot paths record activity with ``timer.last = clock.seconds()`` (what
    :meth:`touch` does, without the method call); :meth:`cancel` ends the
    timer for good."""

    __slots__ = ("clock", "timeout", "expire", "last", "_call")

    def __init__(self, clock: ClockLike, timeout: float, expire: Callable[[], object]):
        self.clock = clock
        self.timeout = timeout
        self.expire = expire
        #: When activity was last seen (the clock's seconds).
        self.last = clock.seconds()
        self._call: Optional[Call] = clock.callLater(timeout, self._fire) if timeout > 0 else None

    def touch(self) -> None:
        """Record activity now."""
        self.last = self.clock.seconds()

    def _fire(self) -> None:
        self._call = None
        due = self.last + self.timeout
        now = self.clock.seconds()
        if now >= due:
            self.expire()
        else:
            self._call = self.clock.callLater(due - now, self._fire)

    def cancel(self) -> None:
        """Stop the timer (idempotent); ``expire`` will not be called."""
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()


__all__ = ["Call", "ClockLike", "IdleTimer"]
