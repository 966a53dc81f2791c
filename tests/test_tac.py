"""``.tac`` files under twistd as a daemon: logs go to ``--logfile`` (as
with ``twistd --logfile=F nodepass URL``), and a start that fails exits
non-zero without leaving a pidfile behind."""

from __future__ import annotations

import os
import signal

from twisted.internet import protocol, reactor
from twisted.trial import unittest

from tests.helpers import wait_for
from tests.procs import REPO, TWISTD, child_env, spawn
from tests.test_tunnel import d

MASTER_TAC = os.path.join(REPO, "tap", "master.tac")


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return ""


class DaemonTacTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.log = os.path.join(self.dir, "np.log")
        self.pidfile = os.path.join(self.dir, "twistd.pid")

    def twistd(self, url: str):
        """``twistd --logfile=F --pidfile=P -y tap/master.tac`` (a daemon):
        returns the parent process, which exits once the daemon started."""
        env = child_env(NODEPASS_URL=url, NP_STATE_DIR=os.path.join(self.dir, "state"))
        argv = ["-c", TWISTD, f"--logfile={self.log}", f"--pidfile={self.pidfile}", "-y", MASTER_TAC]
        return spawn(self, argv, env=env)

    def kill_daemon(self) -> None:
        """Cleanup: the daemon is not our child; stop it if still there."""
        try:
            pid = int(_read(self.pidfile).strip())
            os.kill(pid, signal.SIGKILL)
        except (ValueError, OSError):
            pass

    @d
    async def test_daemon_logs_to_logfile(self):
        parent = self.twistd("master://127.0.0.1:0/api?log=info")
        self.addCleanup(self.kill_daemon)
        self.assertEqual(await parent.ended.addTimeout(20, reactor), 0, parent.text())
        await wait_for(lambda: "Master started: master://127.0.0.1:" in _read(self.log), timeout=10,
                       what="start line in the logfile")
        self.assertIn("INFO  API Key created: ", _read(self.log))
        pid = int(_read(self.pidfile).strip())
        os.kill(pid, signal.SIGTERM)
        await wait_for(lambda: not os.path.exists(self.pidfile), timeout=10, what="pidfile removed at exit")
        await wait_for(lambda: "Master shutdown complete" in _read(self.log), what="shutdown line")

    @d
    async def test_failed_start_exits_nonzero_without_pidfile(self):
        busy = reactor.listenTCP(0, protocol.Factory.forProtocol(protocol.Protocol), interface="127.0.0.1")
        self.addCleanup(busy.stopListening)
        parent = self.twistd(f"master://127.0.0.1:{busy.getHost().port}/api?log=info")
        self.addCleanup(self.kill_daemon)
        self.assertNotEqual(await parent.ended.addTimeout(20, reactor), 0, parent.text())
        self.assertIn("Master did not start", parent.text())
        # twistd's daemon tells its parent first and removes the pidfile
        # after: the parent can be gone a moment before the file is.
        await wait_for(lambda: not os.path.exists(self.pidfile), timeout=10, what="the failed daemon's pidfile removed")
        self.assertIn("ERROR  Master error: ", _read(self.log))


#: In a fresh interpreter: a process nodepass owns gets SIGTERM before its
#: reactor runs (where twistd has already told its parent it started).
EARLY_SIGTERM = r"""
import os, signal
from twisted.internet import reactor
from nodepass.config.urls import parse_url
from nodepass.tap import own_process
own_process(reactor, parse_url("client://127.0.0.1:0/127.0.0.1:1?mode=1"))
stopped = []
reactor.addSystemEventTrigger("before", "shutdown", lambda: stopped.append("shutdown"))
os.kill(os.getpid(), signal.SIGTERM)
reactor.run()
print("stopped cleanly" if stopped else "not stopped")
"""


class EarlySignalTests(unittest.TestCase):
    @d
    async def test_sigterm_before_the_reactor_runs_stops_cleanly(self) -> None:
        """The SIGTERM is not lost and does not end the process at once: the
        reactor starts, runs its shutdown (a daemon's cleanup: workers, its
        pidfile) and the process exits 0.  twistd's daemon tells its parent
        it started before it runs the reactor; a supervisor's SIGTERM in
        that window used to kill it outright (seen once in CI:
        ``test_daemon_logs_to_logfile`` found its pidfile left behind)."""
        proc = spawn(self, ["-c", EARLY_SIGTERM])
        status = await proc.ended.addTimeout(30, reactor)
        self.assertEqual(status, 0, proc.text())
        self.assertIn("stopped cleanly", proc.text())
