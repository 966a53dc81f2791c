"""The open-files limit of processes nodepass owns (``nodepass.base.limits``)."""

from __future__ import annotations

import json
import os
import resource

from twisted.internet import defer, reactor
from twisted.trial import unittest

from tests.helpers import connect, free_port, wait_for
from tests.procs import spawn
from tests.test_master_state import echo_server
from tests.test_tunnel import d

#: Concurrent connections held through a forwarder that starts with a soft
#: limit of :data:`LOW` descriptors: it needs two per connection.
HELD = 150
LOW = 128

#: In a fresh interpreter: lower the soft limit, raise it again.
PROBE = r"""
import json, resource, sys
from nodepass.base.limits import raise_open_files_limit
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
low = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
first = raise_open_files_limit()
second = raise_open_files_limit()
print(json.dumps({"hard": hard, "first": first, "second": second, "now": resource.getrlimit(resource.RLIMIT_NOFILE)}))
"""

#: The console script, started with a soft limit of ``argv[1]`` (and the
#: hard one too when ``argv[2]`` is ``hard``).
LOWERED = r"""
import resource, runpy, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
low = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_NOFILE, (low, low if sys.argv[2] == "hard" else hard))
sys.argv = ["nodepass", sys.argv[3]]
runpy.run_module("nodepass.cli", run_name="__main__")
"""


def _soft_limit(pid: int) -> str:
    with open(f"/proc/{pid}/limits", encoding="ascii") as f:
        for line in f:
            if line.startswith("Max open files"):
                return line.split()[3]
    raise AssertionError(f"no 'Max open files' in /proc/{pid}/limits")


class OpenFilesLimitTests(unittest.TestCase):
    def setUp(self) -> None:
        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard < 4 * HELD:
            self.fail(f"this machine's hard open-files limit ({hard}) is below {4 * HELD}: raise it (see .ci/run)")

    @d
    async def test_soft_limit_raised_to_the_hard_one(self) -> None:
        proc = spawn(self, ["-c", PROBE, str(LOW)])
        self.assertEqual(await proc.ended.addTimeout(30, reactor), 0, proc.text())
        got = json.loads(proc.out.decode().strip().splitlines()[-1])
        hard = got["hard"]
        want = hard if hard != resource.RLIM_INFINITY else got["now"][0]
        self.assertEqual(got["first"], [LOW, want])
        self.assertEqual(got["second"], [want, want])  # raised already: nothing to do
        self.assertEqual(got["now"], [want, hard])

    @d
    async def test_a_forwarder_started_under_a_low_limit_holds_more_connections(self) -> None:
        """``nodepass client://...?mode=1`` started with a soft limit of
        128 descriptors holds 150 connections at once (300 descriptors),
        as a Go binary would: its soft limit is the hard one."""
        target = await echo_server(self)
        entry = free_port()
        url = f"client://127.0.0.1:{entry}/127.0.0.1:{target}?mode=1&log=info"
        proc = spawn(self, ["-c", LOWERED, str(LOW), "soft", url])
        await proc.wait_for(r"Client started: ", timeout=20)
        pid = proc.transport.pid
        self.assertNotEqual(_soft_limit(pid), str(LOW))
        users = await defer.gatherResults([defer.ensureDeferred(connect(entry)) for _ in range(HELD)])
        for i, user in enumerate(users):
            user.transport.write(b"held-%03d" % i)
        echoed = await defer.gatherResults([user.wait_bytes(8, timeout=20) for user in users])
        self.assertEqual(echoed, [b"held-%03d" % i for i in range(HELD)])
        for user in users:
            user.transport.loseConnection()
        self.assertNotIn("Too many open files", proc.text())
        self.assertNotIn("ERROR", proc.text())

    @d
    async def test_out_of_descriptors_is_an_error_line_and_passes(self) -> None:
        """A forwarder at its hard limit turns users away with one ERROR
        line that names the limit (not one per refusal, and not only at
        INFO as Twisted says it), and serves again once descriptors are
        free."""
        target = await echo_server(self)
        entry = free_port()
        url = f"client://127.0.0.1:{entry}/127.0.0.1:{target}?mode=1&log=info"
        proc = spawn(self, ["-c", LOWERED, "40", "hard", url])
        await proc.wait_for(r"Client started: ", timeout=20)
        pid = proc.transport.pid
        users = await defer.gatherResults([defer.ensureDeferred(connect(entry)) for _ in range(40)])
        for user in users:
            user.transport.write(b"x")
        await proc.wait_for(r"ERROR  Accept on 127\.0\.0\.1:\d+ failed: Too many open files \(open-files limit 40\); connections are refused", timeout=20)
        for user in users:
            user.transport.abortConnection()
        await defer.gatherResults([user.lost for user in users])
        await wait_for(lambda: _descriptors(pid) < 30, timeout=20, what="the forwarder's descriptors freed")
        again = await connect(entry)
        again.transport.write(b"again")
        self.assertEqual(await again.wait_bytes(5, timeout=10), b"again")
        again.transport.loseConnection()
        text = proc.text()
        self.assertEqual(text.count("Accept on"), 1, text)
        self.assertNotIn("Traceback", text)


def _descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))
