"""The collector's pace in processes nodepass owns
(``nodepass.base.collector``, ``nodepass.tap.own_process``)."""

from __future__ import annotations

import gc
import json
import weakref

from twisted.internet import reactor, task
from twisted.trial import unittest

from nodepass.base.collector import IDLE_SWEEP_EVERY, YOUNG_THRESHOLD, IdleSweep, pace_collector
from tests.procs import spawn
from tests.test_tunnel import d

#: In a fresh interpreter: ``own_process`` for each URL, the thresholds
#: after it (reset in between).
PROBE = r"""
import gc, json, sys
from twisted.internet import reactor
from nodepass.config.urls import parse_url
from nodepass.tap import own_process
default = gc.get_threshold()
out = {}
for url in sys.argv[1:]:
    gc.set_threshold(*default)
    own_process(reactor, parse_url(url))
    out[url] = gc.get_threshold()
print(json.dumps({"default": default, "after": out}))
"""


class PaceTests(unittest.TestCase):
    def test_young_generation_paced_older_kept(self) -> None:
        before = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *before)
        pace_collector()
        self.assertEqual(gc.get_threshold(), (YOUNG_THRESHOLD, before[1], before[2]))
        self.assertTrue(gc.isenabled())

    @d
    async def test_where_tunnels_run(self) -> None:
        """Tunnels and a master hosting them pace the collector; a master
        whose instances run in workers keeps the default."""
        urls = {
            "server://127.0.0.1:0/127.0.0.1:1": True,
            "client://127.0.0.1:0/127.0.0.1:1?mode=1": True,
            "master://127.0.0.1:0?workers=0": True,
            "master://127.0.0.1:0?workers=2": False,
        }
        proc = spawn(self, ["-c", PROBE, *urls])
        status = await proc.ended.addTimeout(30, reactor)
        self.assertEqual(status, 0, proc.text())
        got = json.loads(proc.out.decode().strip().splitlines()[-1])
        default = got["default"]
        self.assertNotEqual(default[0], YOUNG_THRESHOLD)
        for url, paced in urls.items():
            want = [YOUNG_THRESHOLD, default[1], default[2]] if paced else default
            self.assertEqual(got["after"][url], want, url)


class _Node:
    """A member of a reference cycle."""

    def __init__(self) -> None:
        self.other: object = None


def _cycle() -> weakref.ref:
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return weakref.ref(a)


class IdleSweepTests(unittest.TestCase):
    def setUp(self) -> None:
        self.addCleanup(gc.enable)
        gc.disable()  # no collection but the ones this test makes
        self.clock = task.Clock()
        self.sweep = IdleSweep(self.clock)
        self.sweep.start()
        self.addCleanup(self.sweep.stop)

    def test_collects_cycles_when_no_full_collection_ran(self) -> None:
        gone = _cycle()
        self.clock.advance(IDLE_SWEEP_EVERY - 1)
        self.assertIsNotNone(gone(), "collected before the minute was up")
        self.clock.advance(1)
        self.assertIsNone(gone(), "the cycle outlived the sweep")
        self.assertEqual(self.sweep.sweeps, 1)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # and looks again later

    def test_leaves_a_process_whose_own_collections_run(self) -> None:
        gone = _cycle()
        gc.collect()  # a full collection of its own since the last look
        self.assertIsNone(gone())
        kept = _cycle()
        self.clock.advance(IDLE_SWEEP_EVERY)
        self.assertEqual(self.sweep.sweeps, 0)
        self.assertIsNotNone(kept(), "swept although the process collected on its own")
        self.clock.advance(IDLE_SWEEP_EVERY)  # none since: now it sweeps
        self.assertEqual(self.sweep.sweeps, 1)
        self.assertIsNone(kept())

    def test_stop(self) -> None:
        self.sweep.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
