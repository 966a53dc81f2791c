"""Entry points as real processes: the ``nodepass`` console script,
``twistd -n nodepass URL`` and a ``.tac`` file from ``tap/``."""

from __future__ import annotations

import hashlib
import os
import re
import signal

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial import unittest

from tests.procs import REPO, TWISTD, child_env, free_port, spawn

LINE = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}  (DEBUG|INFO|WARN|ERROR|EVENT)  "


class Echo(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


class Collect(protocol.Protocol):
    """Sends ``payload``, collects ``len(payload)`` bytes back."""

    def __init__(self, payload: bytes):
        self.payload = payload
        self.got = bytearray()
        self.done: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:
        self.got += data
        if len(self.got) >= len(self.payload) and not self.done.called:
            self.transport.loseConnection()
            self.done.callback(bytes(self.got))

    def connectionLost(self, reason) -> None:
        if not self.done.called:
            self.done.callback(bytes(self.got))


async def echo_through(port: int, size: int = 1 << 20) -> bytes:
    payload = os.urandom(size)
    proto = Collect(payload)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), proto)
    got = await proto.done
    return payload, got


class ProcessTests(unittest.TestCase):
    def setUp(self) -> None:
        self.echo = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
        self.addCleanup(self.echo.stopListening)
        self.target = self.echo.getHost().port

    async def _traffic_and_stop(self, proc, word: str, port: int) -> None:
        await proc.wait_for(rf"{word} started: client://")
        payload, got = await echo_through(port)
        self.assertEqual(hashlib.sha256(got).hexdigest(), hashlib.sha256(payload).hexdigest())
        proc.signal(signal.SIGTERM)
        status = await proc.ended
        self.assertEqual(status, 0, proc.text())
        self.assertRegex(proc.text(), "(?m)" + LINE + rf"{word} shutdown complete")

    def test_twistd_single_end(self):
        port = free_port()
        url = f"client://127.0.0.1:{port}/127.0.0.1:{self.target}?mode=1&log=info"
        proc = spawn(self, ["-c", TWISTD, "-n", "--pidfile=", "nodepass", url])

        async def go():
            await self._traffic_and_stop(proc, "Client", port)
            started = [ln for ln in proc.text().splitlines() if "Client started:" in ln]
            self.assertEqual(len(started), 1)
            self.assertRegex(started[0], LINE + re.escape("Client started: client://"))
            self.assertIn(f"/127.0.0.1:{self.target}?dns=5m0s&sni=none&min=64&mode=1&dial=auto", started[0])
            # twistd's own lines follow the NodePass format too.
            for ln in proc.text().splitlines():
                if ln.strip() and not ln.startswith((" ", "\t", "Traceback")):
                    self.assertRegex(ln, LINE)

        return defer.ensureDeferred(go())

    def test_console_script(self):
        port = free_port()
        url = f"client://127.0.0.1:{port}/127.0.0.1:{self.target}?mode=1"
        proc = spawn(self, ["-m", "nodepass.cli", url])
        return defer.ensureDeferred(self._traffic_and_stop(proc, "Client", port))

    def test_tac_file(self):
        port = free_port()
        url = f"client://127.0.0.1:{port}/127.0.0.1:{self.target}?mode=1"
        tac = os.path.join(REPO, "tap", "single-end.tac")
        proc = spawn(self, ["-c", TWISTD, "-n", "--pidfile=", "-y", tac], env=child_env(NODEPASS_URL=url))
        return defer.ensureDeferred(self._traffic_and_stop(proc, "Client", port))


class BadURLProcessTests(unittest.TestCase):
    async def _exec(self, argv):
        proc = spawn(self, argv)
        status = await proc.ended
        return proc, status

    def test_console_bad_urls_exit_2(self):
        async def go():
            for url in ("bogus://h:1/t:2", "server://h:1", "client://h/t:1", "server://0.0.0.0:80/127.0.0.1:80"):
                proc, status = await self._exec(["-m", "nodepass.cli", url])
                self.assertEqual(status, 2, proc.text())
                self.assertEqual(proc.out, b"")
                lines = proc.err.decode().strip().splitlines()
                self.assertEqual(len(lines), 1, proc.text())
                self.assertTrue(lines[0].startswith("nodepass: "))

        return defer.ensureDeferred(go())

    def test_twistd_bad_url_nonzero(self):
        async def go():
            proc, status = await self._exec(["-c", TWISTD, "-n", "--pidfile=", "nodepass", "bogus://x:1/y:2"])
            self.assertNotEqual(status, 0)
            self.assertIn("unknown scheme", proc.text())

        return defer.ensureDeferred(go())


class MasterStartFailureTests(unittest.TestCase):
    """A master that cannot serve exits non-zero instead of lingering."""

    def setUp(self) -> None:
        self.busy = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
        self.addCleanup(self.busy.stopListening)
        self.url = f"master://127.0.0.1:{self.busy.getHost().port}/api"

    def test_console_port_in_use(self):
        async def go():
            proc = spawn(self, ["-m", "nodepass.cli", "--state-dir", os.path.abspath(self.mktemp()), self.url])
            status = await proc.ended
            self.assertEqual(status, 1, proc.text())
            self.assertRegex(proc.text(), "(?m)" + LINE + "Master error: ")

        return defer.ensureDeferred(go())

    def test_twistd_port_in_use(self):
        async def go():
            argv = ["-c", TWISTD, "-n", "--pidfile=", "nodepass", "--state-dir", os.path.abspath(self.mktemp()), self.url]
            proc = spawn(self, argv)
            status = await proc.ended
            self.assertEqual(status, 1, proc.text())
            self.assertIn("Master error: ", proc.text())

        return defer.ensureDeferred(go())
