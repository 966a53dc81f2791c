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

#: Net container allocations between two youngest-generation collections
#: (CPython's default: 700).
YOUNG_THRESHOLD = 100_000


def pace_collector() -> None:
    """Collect the youngest generation every :data:`YOUNG_THRESHOLD` net
    allocations, the older ones at their default ratios."""
    _young, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
