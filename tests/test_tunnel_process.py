"""A dual-end tunnel as two real processes: ``twistd -n nodepass`` server and
client carrying TCP and UDP traffic over TLS, then stopped with SIGTERM."""

from __future__ import annotations

import hashlib
import re
import signal

from twisted.internet import protocol, reactor
from twisted.trial import unittest

from tests.helpers import UDPClient, UDPEcho, listen_udp
from tests.procs import TWISTD, free_port, spawn
from tests.test_process import LINE, Echo, echo_through


class TunnelProcessTests(unittest.TestCase):
    def test_server_and_client_processes(self):
        """The 1.14 generation (both ends on wire=auto settle on it)."""
        return self._processes("tls=1", "&mode=1&type=0", 4 << 20, "TLS certificate fingerprint verified: ")

    def test_server_and_client_processes_quic_pool(self):
        """The same over a QUIC pool (``quic=1``): UDP tunnel port too.  A
        quic=1 server speaks 1.12 only: the client falls back to it."""
        return self._processes("quic=1", "&mode=1&quic=1", 2 << 20, "TLS cert verified: ")

    def _processes(self, query: str, started: str, size: int, verified: str):
        echo = reactor.listenTCP(0, protocol.Factory.forProtocol(Echo), interface="127.0.0.1")
        self.addCleanup(echo.stopListening)
        target = echo.getHost().port
        udp = listen_udp(UDPEcho(), port=target)
        self.addCleanup(udp.stopListening)
        tunnel, entry = free_port(), free_port()
        server = spawn(self, ["-c", TWISTD, "-n", "--pidfile=", "nodepass",
                              f"server://127.0.0.1:{tunnel}/127.0.0.1:{entry}?mode=1&{query}&log=info"])
        client = spawn(self, ["-c", TWISTD, "-n", "--pidfile=", "nodepass",
                              f"client://127.0.0.1:{tunnel}/127.0.0.1:{target}?mode=2&min=4&log=info"])

        async def go():
            await server.wait_for(r"Server started: server://")
            await client.wait_for(r"Client started: client://")
            await client.wait_for(verified + "sha256:")
            payload, got = await echo_through(entry, size)
            self.assertEqual(hashlib.sha256(got).hexdigest(), hashlib.sha256(payload).hexdigest())
            u = UDPClient()
            port = reactor.listenUDP(0, u, interface="127.0.0.1")
            try:
                nxt = u.next(timeout=10)
                port.write(b"through the tunnel", ("127.0.0.1", entry))
                self.assertEqual(await nxt, b"through the tunnel")
            finally:
                await port.stopListening()
            await server.wait_for(verified + "sha256:")
            fp = server.text().split(verified)[1].split()[0]
            self.assertIn(verified + fp, client.text())
            self.assertRegex(server.text(), re.compile(LINE + r"Server started: server://[0-9a-f]{8}@127\.0\.0\.1:", re.M))
            self.assertIn(started, server.text())
            for proc, word in ((client, "Client"), (server, "Server")):
                proc.signal(signal.SIGTERM)
                # twistd ends by re-raising the signal it stopped on (exit
                # status -15 here); the shutdown line is what we check.
                self.assertIn(await proc.ended, (0, -signal.SIGTERM), proc.text())
                self.assertRegex(proc.text(), re.compile(LINE + rf"{word} shutdown complete", re.M))
                self.assertNotIn("Traceback", proc.text())

        from twisted.internet import defer

        return defer.ensureDeferred(go())
