"""Connection pools (SPEC §4, TCP pool).

Both ends index idle pool connections by the 4-byte ID the server wrote on
them.  The *entry* side takes any idle connection ("incoming get") and names
it in a launch signal; the *exit* side looks that ID up ("outgoing get"),
waiting a little because the connection may still be on its way.

* :class:`ServerPool` registers accepted connections, writing their random
  ID, refusing more than ``max`` and duplicate IDs.
* :class:`ClientPool` dials connections to the server and sizes itself
  adaptively within ``[min, MAX]``: capacity and the pause between refill
  rounds follow SPEC §4.  Beyond Go NodePass, every consumed connection is
  replaced right away (one dial per consumption, never beyond capacity;
  :data:`REFILL_DELAY` later, so not in the turn of the launch that took
  it), so a burst of new user connections is not throttled by the round
  timer.

All timing goes through ``clock`` so tests can drive it with
:class:`twisted.internet.task.Clock`.
"""

from __future__ import annotations

import os
from collections import OrderedDict, deque
from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from nodepass.base.logs import NodeLog
from nodepass.compat.twisted_fastpath import DialBatch
from nodepass.compat.twisted_internals import is_plain_tcp, write_through
from nodepass.compat.twisted_tls import write_unbuffered


class PoolTimeout(Exception):
    """No pool connection became available in time."""


class PoolClosed(Exception):
    """The pool was shut down while waiting."""


class PoolConnectionGone(Exception):
    """A get named an idle connection that its peer had closed already: the
    entry's user left at once (a health check, a port scan), the entry
    closed the pool connection it had named in the launch, and here the
    close came in before the launch.  Nothing is left to relay; it is not
    a pool error."""


#: How many IDs of idle connections closed by the peer a pool remembers
#: for launches still on their way (one entry each: a few dozen bytes).
GONE_MEMORY = 1024


def _close(conn: Any) -> None:
    transport = getattr(conn, "transport", None)
    if transport is not None and not getattr(conn, "lost", False):
        transport.loseConnection()


class _Waiter:
    __slots__ = ("d", "timer")

    def __init__(self, d: Deferred[Any], timer: Any):
        self.d = d
        self.timer = timer


class IdlePool:
    """Idle connections by ID, plus waiters for any / a given ID.

    A connection is anything with a ``transport``, a ``lost`` flag, a
    writable ``pool_id`` and ``on_lost(callback)``: a pool end of
    :mod:`nodepass.modes.dualend`, over TCP or a QUIC stream."""

    def __init__(self, clock: Any, log: NodeLog):
        self.clock = clock
        self.log = log
        self.idle: OrderedDict[str, Any] = OrderedDict()
        self.errors = 0
        self.closed = False
        self._any: deque[_Waiter] = deque()
        self._by_id: dict[str, _Waiter] = {}
        #: IDs of idle connections the peer closed, oldest first (see
        #: :class:`PoolConnectionGone`).
        self._gone: OrderedDict[str, None] = OrderedDict()

    # -- bookkeeping ------------------------------------------------------
    def idle_count(self) -> int:
        return len(self.idle)

    def ready(self) -> bool:
        return bool(self.idle)

    def holds(self, pool_id: str, conn: Any) -> bool:
        """Whether ``conn`` sits idle under ``pool_id``: no get took it."""
        return self.idle.get(pool_id) is conn

    def _offer(self, pool_id: str, conn: Any) -> bool:
        """A connection with its ID is ready: hand it to a waiter or keep it.
        False when the ID is a duplicate (the caller closes it)."""
        if self.closed:
            _close(conn)
            return False
        if pool_id in self.idle:
            return False
        self._gone.pop(pool_id, None)
        conn.pool_id = pool_id
        w = self._by_id.pop(pool_id, None)
        if w is not None:
            self._hand(w, (pool_id, conn))
            return True
        while self._any:
            w = self._any.popleft()
            if not w.d.called:
                self._hand(w, (pool_id, conn))
                return True
        self.idle[pool_id] = conn
        conn.on_lost(lambda _r, i=pool_id, c=conn: self.discard(i, c))
        return True

    def _hand(self, w: _Waiter, value: tuple[str, Any]) -> None:
        if w.timer.active():
            w.timer.cancel()
        self._consumed()
        w.d.callback(value)

    def discard(self, pool_id: str, conn: Any) -> None:
        if self.idle.get(pool_id) is conn:
            del self.idle[pool_id]
            self._remember_gone(pool_id)
            self._lost_idle()

    def _remember_gone(self, pool_id: str) -> None:
        gone = self._gone
        gone[pool_id] = None
        if len(gone) > GONE_MEMORY:
            gone.popitem(last=False)

    def _gone_failure(self, pool_id: str) -> Deferred[Any]:
        self._gone.pop(pool_id, None)
        return defer.fail(PoolConnectionGone(f"pool connection {pool_id} was closed by the peer before its launch"))

    def _consumed(self) -> None:
        """Hook: a connection left the pool for use."""

    def _lost_idle(self) -> None:
        """Hook: an idle connection died."""

    # -- gets -------------------------------------------------------------
    def incoming_get(self, timeout: float) -> Deferred[Any]:
        """Any idle connection, as ``(id, conn)``; waits up to ``timeout``."""
        while self.idle:
            pool_id, conn = self.idle.popitem(last=False)
            if not getattr(conn, "lost", False):
                self._consumed()
                return defer.succeed((pool_id, conn))
        return self._wait(self._any, None, timeout)

    def take_any(self) -> Optional[tuple[str, Any]]:
        """An idle connection as ``(id, conn)`` if there is one now, else
        None (:meth:`incoming_get` without the Deferred or the wait)."""
        while self.idle:
            pool_id, conn = self.idle.popitem(last=False)
            if not getattr(conn, "lost", False):
                self._consumed()
                return pool_id, conn
        return None

    def take(self, pool_id: str) -> Any:
        """The idle connection named ``pool_id`` if it is here now, else
        None; no wait and no error counted (a lenient look-up)."""
        conn = self.idle.pop(pool_id, None)
        if conn is None:
            return None
        if getattr(conn, "lost", False):
            self._remember_gone(pool_id)
            return None
        self._consumed()
        return conn

    def outgoing_get(self, pool_id: str, timeout: float) -> Deferred[Any]:
        """The connection named ``pool_id``; waits up to ``timeout`` for it
        to arrive.  A miss counts as a pool error (SPEC §4)."""
        conn = self.idle.pop(pool_id, None)
        if conn is not None:
            if not getattr(conn, "lost", False):
                self._consumed()
                return defer.succeed((pool_id, conn))
            return self._gone_failure(pool_id)
        if pool_id in self._gone:
            return self._gone_failure(pool_id)
        if pool_id in self._by_id:
            self.errors += 1
            return defer.fail(PoolTimeout(f"pool connection {pool_id} requested twice"))
        return self._wait(None, pool_id, timeout)

    def _wait(self, queue: Optional[deque[_Waiter]], pool_id: Optional[str], timeout: float) -> Deferred[Any]:
        if self.closed:
            return defer.fail(PoolClosed("pool closed"))

        def expire() -> None:
            if pool_id is not None:
                if self._by_id.get(pool_id) is w:
                    del self._by_id[pool_id]
                self.errors += 1
                what = f"pool connection {pool_id} did not arrive within {timeout:g}s"
            else:
                what = f"no idle pool connection within {timeout:g}s"
            if not d.called:
                d.errback(PoolTimeout(what))

        def cancel(_d: Deferred[Any]) -> None:
            if w.timer.active():
                w.timer.cancel()
            if pool_id is not None and self._by_id.get(pool_id) is w:
                del self._by_id[pool_id]

        d: Deferred[Any] = Deferred(cancel)
        w = _Waiter(d, self.clock.callLater(timeout, expire))
        if pool_id is not None:
            self._by_id[pool_id] = w
        else:
            assert queue is not None  # waiting for any connection
            queue.append(w)
        return d

    # -- maintenance ------------------------------------------------------
    def flush(self) -> int:
        """Close every idle connection and reset the error count."""
        idle, self.idle = self.idle, OrderedDict()
        for conn in idle.values():
            _close(conn)
        self.errors = 0
        return len(idle)

    def needs_flush(self) -> bool:
        """SPEC §3.3: errors exceed half the idle connections."""
        return self.errors > 0 and self.errors > len(self.idle) / 2

    def close(self) -> None:
        self.closed = True
        self.flush()
        waiters = list(self._any) + list(self._by_id.values())
        self._any.clear()
        self._by_id.clear()
        for w in waiters:
            if w.timer.active():
                w.timer.cancel()
            if not w.d.called:
                w.d.errback(PoolClosed("pool closed"))


_RANDOM = bytearray()


def _random_id() -> bytes:
    """Four random bytes, from ``os.urandom`` fetched a kilobyte at a time
    (one system call per 256 pool IDs instead of one per ID)."""
    if len(_RANDOM) < 4:
        _RANDOM[:] = os.urandom(1024)
    raw = bytes(_RANDOM[-4:])
    del _RANDOM[-4:]
    return raw


class ServerPool(IdlePool):
    """Server side: accepted connections get a random ID written on them."""

    def __init__(self, max_size: int, clock: Any, log: NodeLog):
        super().__init__(clock, log)
        self.max = max_size

    def register(self, conn: Any) -> Optional[str]:
        """Write a fresh ID on ``conn`` and keep it.  Returns the ID, or None
        when the pool is full or the ID collides (the caller closes)."""
        if self.closed or len(self.idle) >= self.max:
            return None
        raw = _random_id()
        pool_id = raw.hex()
        if pool_id in self.idle or pool_id in self._by_id:
            return None
        transport = conn.transport
        if is_plain_tcp(transport):
            write_through(transport, raw)  # now, not on the reactor's next turn
        else:
            write_unbuffered(transport, raw)  # (TLS: not held for a reactor turn either)
        if not self._offer(pool_id, conn):
            return None
        return pool_id


#: How long after a pool connection is used its replacement is dialled
#: (see ``ClientPool._consumed``).
REFILL_DELAY = 0.002


def adjust_capacity(capacity: int, created: int, lo: int, hi: int) -> int:
    """SPEC §4: after a round, +1 when the connections created since the
    last round exceed 80% of capacity (the pool is being drained), -1 when
    they are under 20% (it sits mostly idle); always within ``[lo, hi]``.

    The ratio is taken against capacity, as Go NodePass does: measured
    against the dials attempted, every successful refill would grow the
    pool and it would creep up to MAX under any load at all."""
    ratio = created / capacity if capacity > 0 else 0.0
    if ratio > 0.8:
        capacity += 1
    elif ratio < 0.2:
        capacity -= 1
    return max(lo, min(hi, capacity))


def adjust_interval(interval: float, idle: int, capacity: int, lo: float, hi: float, step: float = 0.1) -> float:
    """SPEC §4: refill faster when idle < 20% of capacity, slower when idle
    > 80%, by ``step`` within ``[lo, hi]``."""
    if idle < 0.2 * capacity:
        interval -= step
    elif idle > 0.8 * capacity:
        interval += step
    return max(lo, min(hi, round(interval, 6)))


class ClientPool(IdlePool):
    """Client side: pre-opened connections, adaptively sized.

    ``dial()`` opens one pool connection and fires with it once its ID has
    been read (``conn.pool_id``), or fails.
    """

    def __init__(
        self,
        dial: Callable[[], Deferred],
        min_size: int,
        max_size: int,
        clock: Any,
        log: NodeLog,
        min_interval: float = 0.1,
        max_interval: float = 1.0,
        on_dial_error: Optional[Callable[[BaseException], None]] = None,
    ):
        super().__init__(clock, log)
        self.dial = dial
        self.max = max(1, max_size)
        self.min = max(1, min(min_size, self.max))
        self.capacity = self.min
        self.min_interval = min_interval
        self.max_interval = max(max_interval, min_interval)
        self.interval = min_interval
        self.inflight = 0
        self.on_dial_error = on_dial_error
        self._round_call = None
        self._in_round = False
        self.created = 0  # successful dials since the last round ended
        self._owed = 0  # used connections not yet replaced
        self._refill_call: Any = None

    def start(self) -> None:
        self._schedule(0)

    def _schedule(self, delay: float) -> None:
        if self.closed:
            return
        if self._round_call is not None and self._round_call.active():
            return
        self._round_call = self.clock.callLater(delay, self._round)

    def _dial_one(self) -> Deferred:
        self.inflight += 1
        try:
            d = self.dial()
        except Exception:  # noqa: BLE001 - as maybeDeferred: a failed dial
            d = defer.fail()

        def ok(conn: Any) -> bool:
            self.inflight -= 1
            if self.closed:
                _close(conn)
                return False
            if not self._offer(conn.pool_id, conn):
                _close(conn)
                return False
            self.created += 1
            return True

        def bad(f: Failure) -> bool:
            self.inflight -= 1
            if self.on_dial_error is not None and not self.closed:
                self.on_dial_error(f.value)
            return False

        d.addCallbacks(ok, bad)
        return d

    def _round(self) -> None:
        self._round_call = None
        if self.closed:
            return
        want = self.capacity - len(self.idle) - self.inflight
        if want <= 0:
            self._after_round()
            return
        self._in_round = True
        dials = [self._dial_one() for _ in range(want)]
        dl = defer.gatherResults(dials, consumeErrors=True)
        dl.addCallback(lambda _results: self._after_round())

    def _after_round(self, *_ignored) -> None:
        self._in_round = False
        if self.closed:
            return
        created, self.created = self.created, 0
        self.capacity = adjust_capacity(self.capacity, created, self.min, self.max)
        self.interval = adjust_interval(
            self.interval, len(self.idle), self.capacity, self.min_interval, self.max_interval
        )
        self._schedule(self.interval)

    def _consumed(self) -> None:
        # Beyond Go: replace a used connection right away, never exceeding
        # capacity (idle + in flight), so there is no connection storm.
        # Not in the same turn of the reactor: the connection was taken for
        # a launch whose target dial and first bytes come first (its
        # replacement's dial, and the server's accept of it, would delay
        # them); uses close together are replaced together.
        if self.closed:
            return
        self._owed += 1
        if self._refill_call is None:
            self._refill_call = self.clock.callLater(REFILL_DELAY, self._refill)

    def _refill(self) -> None:
        self._refill_call = None
        owed, self._owed = self._owed, 0
        if self.closed:
            return
        with DialBatch():  # the replacements connect together (one wake-up of the server)
            for _ in range(min(owed, self.capacity - len(self.idle) - self.inflight)):
                self._dial_one()

    def _lost_idle(self) -> None:
        pass

    def close(self) -> None:
        if self._round_call is not None and self._round_call.active():
            self._round_call.cancel()
        self._round_call = None
        if self._refill_call is not None and self._refill_call.active():
            self._refill_call.cancel()
        self._refill_call = None
        super().close()
