"""The collector's pace in processes nodepass owns
(``nodepass.base.collector``, ``nodepass.tap.own_process``)."""

from __future__ import annotations

import gc
import json

from twisted.internet import reactor
from twisted.trial import unittest

from nodepass.base.collector import YOUNG_THRESHOLD, pace_collector
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
