"""The garbage collector's pace in a process nodepass owns.

A relayed connection's objects are freed by reference counting: the
transports, relays and TLS layers let go of each other when a connection
ends (tests in ``test_tunnel`` and ``test_pool_types``, ``NoGarbagePerType``,
check that nothing of ours is left for the collector).  CPython still runs
its youngest-generation collection every 700 net allocations of container
objects, traversing every young object each time, and a tunnel allocates
thousands per second: 2.4-3.9 % of a ``tls=1`` tunnel end's CPU went to
collections that found almost nothing (about 0.3 objects per relayed
connection; docs/benchmarks.md, run W).  A threshold of 100,000 makes them
rare; the older generations keep their default ratios, so a full collection
still comes, only later, and anything cyclic is still collected.

Only where nodepass owns the process and tunnels run in it (the console
script and ``twistd nodepass`` running a tunnel or a ``workers=0`` master,
and worker processes; see ``nodepass.tap.own_process``): a master whose
instances run in workers keeps the default, and a program that merely
imports nodepass keeps its own settings.
"""

from __future__ import annotations

import gc
from typing import Any, Optional

#: Net container allocations between two youngest-generation collections
#: (CPython's default: 700).
YOUNG_THRESHOLD = 100_000


def pace_collector() -> None:
    """Collect the youngest generation every :data:`YOUNG_THRESHOLD` net
    allocations, the older ones at their default ratios."""
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)


#: Seconds between two looks at a paced process's full collections.
IDLE_SWEEP_EVERY = 60.0


class IdleSweep:
    """A full collection, once a minute, in a paced process whose own have
    stopped.

    With the youngest generation collected every 100,000 net allocations,
    the oldest is collected after about ten million.  A busy tunnel gets
    there in seconds; an idle one may never, and cycles that formed around
    long-lived objects stay: a client whose server kept restarting held
    every old runner (its context, control channel and pool objects, with
    an OpenSSL context each).  Every :data:`IDLE_SWEEP_EVERY` seconds this
    looks at the count of full collections and runs one when there was
    none since the last look (about 17 ms for 60,000 objects, in a process
    that is idle by then)."""

    def __init__(self, clock: Any, every: float = IDLE_SWEEP_EVERY):
        self.clock = clock
        self.every = every
        self.sweeps = 0
        self._seen = _full_collections()
        self._call: Optional[Any] = None

    def start(self) -> None:
        self._schedule()

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _schedule(self) -> None:
        self._call = self.clock.callLater(self.every, self.tick)

    def tick(self) -> None:
        """One look (and a collection if none ran since the last)."""
        if _full_collections() == self._seen:
            gc.collect()
            self.sweeps += 1
        self._seen = _full_collections()
        if self._call is not None:
            self._schedule()


def _full_collections() -> int:
    return int(gc.get_stats()[2]["collections"])
