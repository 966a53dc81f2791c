"""Strangers on the tunnel port and floods at the slot limit (SPEC §3.2,
§3.3, §5, §7): a peer that never becomes a working client must not restart
a serving tunnel, received bytes never reach a log line, a client claims a
key refusal only when the server really refused, and datagrams dropped at
the ``slot`` limit are summarised, not logged one by one.

Real services on 127.0.0.1; every listener binds port 0 and is read back.
The tunnels run in forward mode (flow ``+``): the server's tunnel port and
the client's entry can both be OS-chosen that way."""

from __future__ import annotations

import re

from twisted.internet import reactor
from twisted.internet.protocol import Protocol
from twisted.trial import unittest

from nodepass.wire.codec import Codec
from nodepass.config.urls import Tunables
from nodepass.service.instance import TunnelService
from tests.helpers import UDPClient, close, connect, listen_tcp, listen_udp, service_up, wait_for
from tests.test_tunnel import TunnelMixin, _connect_from, d

#: Short timers: pings (and drop summaries) every 0.25 s, a candidate
#: control channel gets 3 x 0.25 s to prove itself.
QUICK = Tunables(
    handshake_timeout=1.0,
    pool_get_timeout=1.0,
    report_interval=0.25,
    service_cooldown=0.2,
    shutdown_timeout=2.0,
    min_pool_interval=0.1,
    max_pool_interval=0.5,
)

KEY = "tunnelkey1"
WRONG = "wrongkey12"  # same length as KEY: passes the server's key check


#: The loopback address client entries listen on (see HostileMixin).
ENTRY = "127.0.0.3"


class HostileMixin(TunnelMixin):
    """A server on ``127.0.0.1:0`` whose exit target is a TCP+UDP echo on
    ``127.0.0.1:E`` (E chosen by the OS); forward-mode clients dial the
    tunnel port read back and listen (their entry) on ``127.0.0.3:E``.

    A target port must be named in the URL (port 0 is refused there); the
    echo's sockets on 127.0.0.1:E keep anyone else from binding E on every
    address while the test runs, so 127.0.0.3:E is ours to use."""

    async def server(self, query: str = "", key: str = KEY, name: str = "server") -> TunnelService:
        self.echo_port, _ = self.echo_targets()
        url = f"server://{key}@127.0.0.1:0/127.0.0.1:{self.echo_port}?log=debug&mode=2{query}"
        svc = self._service(name, url, QUICK)
        await service_up(svc, name, timeout=10)
        self.tunnel_port = svc.runner.tunnel_port_number
        return svc

    async def client(self, key: str = KEY, name: str = "client", query: str = "", wait: bool = True,
                     port: int = 0) -> TunnelService:
        """A forward-mode client (entry on 127.0.0.3:E); ``port`` dials
        something other than our server (its entry is never reached)."""
        target = f"{ENTRY}:{self.echo_port}" if not port else f"{ENTRY}:9"
        url = f"client://{key}@127.0.0.1:{port or self.tunnel_port}/{target}?mode=2&log=debug&min=4{query}"
        svc = self._service(name, url, QUICK)
        if wait:
            await service_up(svc, name, timeout=10)
        return svc


async def roundtrip(port: int, payload: bytes) -> bytes:
    """``payload`` through the entry on 127.0.0.3 and back from the echo."""
    c = await connect(port, host=ENTRY)
    c.transport.write(payload)
    got = await c.wait_bytes(len(payload), timeout=5)
    await close(c)
    return got


async def udp_roundtrip(port: int, datagram: bytes) -> bytes:
    client = UDPClient()
    p = listen_udp(client)
    try:
        answer = client.next(timeout=5)
        p.write(datagram, (ENTRY, port))
        return await answer
    finally:
        await p.stopListening()


class StrangerTests(HostileMixin, unittest.TestCase):
    wire = "1.12"  # the 1.12 key line and np:// signals; 1.14: tests/test_v114_peer.py

    @d
    async def test_same_length_wrong_key_does_not_restart_the_server(self):
        """A client whose key differs but has the same length passes the
        key check (the key line is the key XORed with itself).  It is told
        the keys differ, the server just drops it -- no restart -- and a
        real client then tunnels traffic while a stranger knocks again."""
        server = await self.server()
        stranger = await self.client(key=WRONG, name="stranger", wait=False)
        await wait_for(lambda: self.logged("server", "never used the tunnel"), timeout=3, what="stranger dropped")
        await wait_for(lambda: self.logged("stranger", "Client error:"), what="stranger told")
        await stranger.stopService()
        told = [ln for ln in self.lines["stranger"] if "Client error:" in ln][0]
        self.assertIn("the server's answer could not be decoded", told)
        self.assertIn("tunnel keys most likely differ", told)
        self.assertTrue(self.logged("server", "Tunnel access denied: 127.0.0.1:"))

        await self.client()
        self.assertEqual(await roundtrip(self.echo_port, b"first"), b"first")
        # Another stranger (from another address) while the tunnel works.
        knock = await _connect_from("127.0.0.2", self.tunnel_port)
        knock.transport.write(Codec(WRONG).encode(WRONG))
        self.assertEqual(await roundtrip(self.echo_port, b"during"), b"during")
        await knock.lost.addTimeout(5, reactor)
        self.assertTrue(self.logged("server", "Tunnel access denied: 127.0.0.2:"))
        self.assertEqual(await roundtrip(self.echo_port, b"after"), b"after")
        self.assertTrue(server.runner.control.working)
        self.assertFalse(self.logged("server", "Server error"))
        self.assertFalse(self.logged("server", "Server restart"))

    @d
    async def test_half_handshake_stranger_is_dropped_not_fatal(self):
        """A peer that sends a passing key line and then nothing useful
        holds the tunnel only for 3 report intervals; it is dropped without
        a restart and the real client gets in."""
        await self.server()
        stranger = await connect(self.tunnel_port)
        stranger.transport.write(Codec(WRONG).encode(WRONG))
        await stranger.wait_bytes(1)  # the server's answer: it was accepted
        stranger.transport.write(b"garbage that never decodes\n")
        await stranger.lost.addTimeout(5, reactor)  # dropped after 3 x 0.25 s
        self.assertTrue(self.logged("server", "no valid signal from the peer"))
        await self.client()
        self.assertEqual(await roundtrip(self.echo_port, b"in"), b"in")
        self.assertFalse(self.logged("server", "Server error"))


class NoSecretsInLogsTests(HostileMixin, unittest.TestCase):
    wire = "1.12"  # the 1.12 key line and np:// signals; 1.14: tests/test_v114_peer.py

    @d
    async def test_misdirected_client_does_not_log_its_key(self):
        """A client pointed at an echo service reads back its own key line,
        which decodes to its key: no log line may show it."""
        echo, _ = self.echo_targets()
        await self.client(key="MySecretKey", port=echo, wait=False)
        await wait_for(lambda: self.logged("client", "Client error:"), what="handshake failure")
        for line in self.lines["client"]:
            self.assertNotIn("MySecretKey", line)
        self.assertTrue(self.logged("client", "tunnel keys most likely differ"))
        await wait_for(lambda: self.logged("client", "Handshake answer from"), what="debug trace")
        trace = [ln for ln in self.lines["client"] if "Handshake answer from" in ln][0]
        self.assertRegex(trace, r"\d+ bytes, starting [0-9a-f]{2,16}\b")

    @d
    async def test_undecodable_signal_is_not_logged(self):
        """A control line that decodes under the key but is no signal is
        skipped with its length and a hex prefix only."""
        await self.server()
        client = await self.client()
        self.assertEqual(await roundtrip(self.echo_port, b"up"), b"up")
        client.runner.control.transport.write(Codec(KEY).encode("password=hunter2"))
        await wait_for(lambda: self.logged("server", "Undecodable control signal skipped"), what="skipped line")
        for line in self.lines["server"]:
            self.assertNotIn("hunter2", line)
        self.assertTrue(self.logged("server", "Undecodable control signal skipped: not a signal URL"))
        await wait_for(lambda: self.logged("server", "Undecodable control line:"), what="debug trace")
        self.assertEqual(await roundtrip(self.echo_port, b"fine"), b"fine")


class _Silent(Protocol):
    """A "server" that reads the key line and never answers."""


class _Reset(Protocol):
    """A "server" that resets the connection once the key line is in --
    what a NodePass server that stops or restarts does to handshakes it
    has not judged yet."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.abortConnection()


class RefusalWordingTests(HostileMixin, unittest.TestCase):
    wire = "1.12"  # the 1.12 key line and np:// signals; 1.14: tests/test_v114_peer.py

    def listen(self, protocol) -> tuple[int, object]:
        port, factory = listen_tcp(protocol)
        self.addCleanup(port.stopListening)
        return port.getHost().port, factory

    @d
    async def test_own_shutdown_during_handshake_is_no_refusal(self):
        port, factory = self.listen(_Silent)
        client = await self.client(port=port, wait=False)
        await wait_for(lambda: factory.connections, what="handshake connection")
        await client.stopService()
        self.assertFalse(self.logged("client", "refused"))
        self.assertFalse(self.logged("client", "ERROR"))

    @d
    async def test_only_a_real_refusal_is_called_one(self):
        """A reset before the answer (what a stopping server leaves) is no
        key refusal; our server's refusal of a key of another length (a
        clean close after reading it) is."""
        port, _ = self.listen(_Reset)
        await self.client(port=port, wait=False, name="reset")
        await wait_for(lambda: self.logged("reset", "Client error:"), what="client error")
        self.assertTrue(self.logged("reset", "closed before the handshake completed"))
        self.assertFalse(self.logged("reset", "refused our tunnel key"))

        await self.server()
        await self.client(key="short", wait=False, name="refused")
        await wait_for(lambda: self.logged("refused", "Client error:"), what="client error")
        self.assertTrue(self.logged("refused", "Client error: the server refused our tunnel key"))
        self.assertTrue(self.logged("server", "(wrong tunnel key)"))


class SlotFloodTests(HostileMixin, unittest.TestCase):
    """Datagrams of new sources beyond ``slot`` are dropped with one
    summary line per report interval."""

    async def flood(self, host: str, port: int, n: int) -> None:
        """One datagram from a first source, which takes the only slot,
        then ``n`` from a second source."""
        first = UDPClient()
        fport = listen_udp(first)
        self.addCleanup(fport.stopListening)
        answer = first.next(timeout=5)
        fport.write(b"first", (host, port))
        self.assertEqual(await answer, b"first")
        oport = listen_udp(UDPClient())
        self.addCleanup(oport.stopListening)
        for i in range(n):
            oport.write(b"x%d" % i, (host, port))

    def summaries(self, name: str) -> list[str]:
        return [ln for ln in self.lines.get(name, []) if "UDP slot limit reached" in ln]

    def dropped(self, name: str, unit: str) -> int:
        """What the summary lines of ``name`` add up to."""
        return sum(int(n) for ln in self.summaries(name) for n in re.findall(rf"dropped (\d+) {unit} in the last", ln))

    async def summarised(self, name: str, unit: str, n: int) -> None:
        """``n`` drops reported, in at most two lines (the burst may
        straddle a report interval), each shaped as documented."""
        await wait_for(lambda: self.dropped(name, unit) >= n, what=f"{n} {unit} reported")
        lines = self.summaries(name)
        self.assertEqual(self.dropped(name, unit), n, lines)
        self.assertLessEqual(len(lines), 2, lines)
        for line in lines:
            self.assertRegex(line, rf"UDP slot limit reached \(1\), dropped \d+ {unit} in the last \d+ms")

    @d
    async def test_single_end_drops_are_summarised(self):
        target, _ = self.echo_targets()
        svc = self._service("single", f"client://127.0.0.1:0/127.0.0.1:{target}?mode=1&slot=1&log=debug", QUICK)
        await service_up(svc, "single", timeout=10)
        await self.flood("127.0.0.1", svc.runner.udp_port.getHost().port, 200)
        await self.summarised("single", "datagrams", 200)

    @d
    async def test_dual_end_entry_drops_are_summarised(self):
        await self.server()
        await self.client(query="&slot=1")
        await self.flood(ENTRY, self.echo_port, 150)
        await self.summarised("client", "datagrams", 150)

    @d
    async def test_dual_end_exit_drops_are_summarised(self):
        """The exit refuses UDP launches beyond its slots: one line too."""
        await self.server("&slot=1")
        await self.client()
        self.assertEqual(await udp_roundtrip(self.echo_port, b"held"), b"held")
        for i in range(10):
            p = listen_udp(UDPClient())
            self.addCleanup(p.stopListening)
            p.write(b"s%d" % i, (ENTRY, self.echo_port))
        await self.summarised("server", "sessions", 10)
