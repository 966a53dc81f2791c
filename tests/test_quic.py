"""QUIC pool (SPEC §4, ``quic=1``): the control channel on TCP, pool
connections as streams of a QUIC connection to the tunnel's UDP port.  Real
UDP sockets on loopback, real TLS 1.3 (aioquic), both flows."""

from __future__ import annotations

import hashlib
import os
import socket

from twisted.internet import reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.trial import unittest

from nodepass.wire import codec
from nodepass.base.logs import NodeLog
from nodepass.pools.quic import ALPN, STREAM_WINDOW, QuicPoolClient, QuicPoolError
from tests.helpers import Client, HashingClient, close, connect, free_port, listen_tcp, sleep, wait_for
from tests.test_tunnel import (
    MiB,
    CAMixin,
    TunnelMixin,
    d,
    echo_roundtrip,
    make_leaf,
    udp_roundtrip,
)


class QuicFlowTests(TunnelMixin, unittest.TestCase):
    """Both flows x TCP and UDP over a QUIC pool."""

    async def _both(self, flow: str, query: str = "") -> None:
        server, client = await self.carries_tcp_and_udp(flow, f"&quic=1{query}", size=200_000)
        self.assertTrue(server.runner.quic and client.runner.quic)
        # quic=1 forces TLS: the handshake announces pool type 1, tls >= 1
        self.assertGreaterEqual(server.runner.tls_code, 1)
        self.assertTrue(self.logged("server", "np://1@"))
        # every pool entry is a QUIC stream: no TCP pool connection was made
        idle = list(server.runner.pool.idle.values())
        self.assertTrue(idle)
        self.assertTrue(all(getattr(c.transport, "quic_stream", False) for c in idle))

    @d
    async def test_reverse(self):
        await self._both("-")

    @d
    async def test_forward(self):
        await self._both("+")

    @d
    async def test_tls0_is_raised_to_tls1(self):
        await self._both("-", "&tls=0")

    @d
    async def test_large_transfer_sha256(self):
        """8 MiB each way through one stream arrive intact."""
        server, client, entry, _ = await self.tunnel("+", "&quic=1")
        payload = os.urandom(8 * MiB)
        c = await connect(entry, protocol_class=HashingClient)
        c.transport.write(payload)
        digest = await c.wait_bytes(len(payload), timeout=60)
        self.assertEqual(digest, hashlib.sha256(payload).hexdigest())
        await close(c)
        await wait_for(lambda: server.stats.tcps == 0 and client.stats.tcps == 0, what="slots released")

    @d
    async def test_many_short_connections_and_pool_refill(self):
        server, client, entry, _ = await self.tunnel("-", "&quic=1")
        for i in range(200):
            self.assertEqual(await echo_roundtrip(entry, b"q%d" % i), b"q%d" % i)
        await wait_for(lambda: client.runner.pool.idle_count() >= 8, what="pool refilled")
        # finished streams are discarded on both ends
        sessions = client.runner.quic_client.sessions
        self.assertEqual(len(sessions), 1)
        await wait_for(
            lambda: len(sessions[0].streams) <= client.runner.pool.capacity + 2, what="streams forgotten"
        )
        await wait_for(
            lambda: len(sessions[0].stream_table) <= client.runner.pool.capacity + 4, what="streams discarded"
        )

    @d
    async def test_pool_spreads_over_connections_past_the_stream_limit(self):
        """A server allows 128 open streams per connection (as Go's does), so
        a pool of 150 takes a second QUIC connection (max=200: up to 2)."""
        server, client, entry, _ = await self.tunnel("-", "&quic=1&max=200", client_min=150)
        self.assertEqual(client.runner.quic_client.max_conns, 2)
        await wait_for(lambda: client.runner.pool.idle_count() >= 149, timeout=20, what="pool of 150")
        self.assertEqual(len(client.runner.quic_client.sessions), 2)
        self.assertEqual(len(server.runner.quic_server.sessions), 2)
        for i in range(20):
            self.assertEqual(await echo_roundtrip(entry, b"s%d" % i), b"s%d" % i)

    @d
    async def test_backpressure_through_quic(self):
        """A target that never reads stops the user's sender: the QUIC
        stream's window stops widening, so nothing buffers without bound."""
        await self.stalled_target_pushes_back("&quic=1", timeout=20, limit=32 * MiB)

    @d
    async def test_user_that_stops_reading_stops_the_source(self):
        """Download direction: a user who never reads pauses the endless
        target at the other end of the QUIC stream (the stream's receive
        window stops widening), then both ends let go when the user leaves."""
        from tests.helpers import Endless

        senders = Endless.senders = []
        src, _ = listen_tcp(Endless)
        self.addCleanup(src.stopListening)
        self.tunnel_port = free_port()
        entry = free_port()
        server = await self.start_server(f"127.0.0.1:{entry}", "&mode=1&quic=1")
        client = await self.start_client(f"127.0.0.1:{src.getHost().port}")
        c = await connect(entry)
        c.transport.pauseProducing()  # the user reads nothing more
        await wait_for(lambda: senders and senders[0].paused, timeout=20, what="source pushed back")
        await sleep(0.5)
        written = senders[0].written
        await sleep(0.5)
        self.assertLess(senders[0].written - written, 4 * MiB)
        self.assertLess(written, 32 * MiB)
        c.transport.resumeProducing()
        await c.wait_bytes(written // 2, timeout=30)  # it flows again
        await close(c)
        await wait_for(lambda: server.stats.tcps == 0 and client.stats.tcps == 0, what="both ends released")
        await wait_for(lambda: senders[0].stopped, what="source connection closed")


class QuicServerTests(TunnelMixin, unittest.TestCase):

    @d
    async def test_server_binds_tcp_and_udp_tunnel_port(self):
        tport, _ = self.echo_targets()
        server = await self.start_server(f"127.0.0.1:{tport}", "&quic=1")
        self.assertEqual(server.runner.quic_port.getHost().port, self.tunnel_port)
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.addCleanup(u.close)
        with self.assertRaises(OSError):
            u.bind(("127.0.0.1", self.tunnel_port))

    @d
    async def test_udp_garbage_and_strangers_ignored(self):
        """Garbage datagrams and QUIC from other hosts never disturb a
        running QUIC tunnel (only the control connection's IP is served)."""
        server, client, entry, _ = await self.tunnel("-", "&quic=1")
        self.assertEqual(await echo_roundtrip(entry, b"before"), b"before")
        p = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
        self.addCleanup(p.stopListening)
        for n in (0, 1, 5, 1200, 1500, 9000):
            p.write(os.urandom(n), ("127.0.0.1", self.tunnel_port))
        p.write(b"\xc0\x00\x00\x00\x01" + os.urandom(1300), ("127.0.0.1", self.tunnel_port))
        await sleep(0.2)
        self.assertEqual(len(server.runner.quic_server.sessions), 1)
        self.assertEqual(await echo_roundtrip(entry, b"after"), b"after")

    @d
    async def test_forged_initial_packets_expire(self):
        """Initial packets that look right but do not decrypt (from the
        client's own host) open at most a bounded number of half-connections,
        which expire after 3 report intervals; the tunnel keeps working."""
        server, client, entry, _ = await self.tunnel("-", "&quic=1")
        qs = server.runner.quic_server
        await wait_for(lambda: client.runner.pool.idle_count() > 0, what="pool up")
        self.assertEqual(len(qs.sessions), 1)
        p = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
        self.addCleanup(p.stopListening)
        for _ in range(100):
            dcid, scid = os.urandom(8), os.urandom(8)
            head = b"\xc3\x00\x00\x00\x01" + b"\x08" + dcid + b"\x08" + scid + b"\x00" + b"\x44\xb0"
            p.write(head + os.urandom(1200), ("127.0.0.1", self.tunnel_port))
        await wait_for(lambda: len(qs.sessions) > 1, what="half-connections opened")
        self.assertLessEqual(len(qs.sessions), 64)  # MAX_CONNS
        self.assertEqual(await echo_roundtrip(entry, b"during"), b"during")
        await wait_for(lambda: len(qs.sessions) == 1, timeout=10, what="half-connections expired")
        live = next(iter(qs.sessions))
        self.assertTrue(all(sess is live for sess in qs.by_cid.values()))  # no stale routes
        self.assertEqual(await echo_roundtrip(entry, b"after"), b"after")

    @d
    async def test_stranger_gets_no_answer(self):
        """A QUIC client on a host other than the control connection's gets
        no answer at all: its handshake times out."""
        server, client, entry, _ = await self.tunnel("-", "&quic=1")
        stranger = QuicPoolClient(  # from another host on loopback
            reactor, NodeLog("none"), ("127.0.0.1", self.tunnel_port), 1, "", 0.2, interface="127.0.0.2"
        )
        self.addCleanup(stranger.close)
        with self.assertRaises(QuicPoolError):
            await stranger.connect()
        self.assertEqual(len(server.runner.quic_server.sessions), 1)

    @d
    async def test_stream_bytes_on_the_wire(self):
        """What a Go client does: ALPN ``np-quic``, open a stream, write one
        byte; the server answers exactly 4 bytes, the pool ID it keeps."""
        server, client, entry, _ = await self.tunnel("-", "&quic=1")
        # (after the verify signal, which takes the first stream registered)
        await wait_for(lambda: self.logged("client", "TLS cert verified"), what="verify done")
        probe = QuicPoolClient(reactor, NodeLog("none"), ("127.0.0.1", self.tunnel_port), 1, "", 1.0)
        self.addCleanup(probe.close)
        session = await probe.connect()
        self.assertEqual(session.conn.tls.alpn_negotiated, ALPN)
        raw = Client()
        t = session.open_stream(raw)
        t.write(b"\x00")
        pool_id = (await raw.wait_bytes(4)).hex()
        await sleep(0.1)
        self.assertEqual(len(raw.data()), 4)  # nothing more until launched
        self.assertIn(pool_id, server.runner.pool.idle)

    @d
    async def test_udp_port_unreachable_is_logged_clearly(self):
        """The control connection works but QUIC gets no answer (a firewall
        dropping UDP): the client says so instead of silently having no pool."""
        tport, _ = self.echo_targets()
        entry = free_port()
        server = await self.start_server(f"127.0.0.1:{entry}", "&mode=1&quic=1")
        server.runner.quic_server.allowed_ip = lambda: None  # drops every datagram
        client = await self.start_client(f"127.0.0.1:{tport}")
        await wait_for(lambda: self.logged("client", "QUIC pool connection to the server 127.0.0.1"), timeout=10,
                       what="clear error")
        self.assertTrue(self.logged("client", "is its UDP port reachable?"))
        self.assertEqual(client.runner.pool.idle_count(), 0)
        self.assertEqual(client.runner.control.broken, False)

    @d
    async def test_handshake_line_announces_quic(self):
        """The config line a client receives: ``np://1@MAX/FLOW#TLS``."""
        c = codec.Codec("k")
        info = codec.parse_handshake_config(c.decode(c.encode(codec.handshake_config(1, 64, "+", 1)).rstrip(b"\n")))
        self.assertEqual((info.pool_type, info.max, info.flow, info.tls_code), ("1", 64, "+", 1))
        self.assertEqual(ALPN, "np-quic")
        self.assertEqual(STREAM_WINDOW, 1024 * 1024)

    @d
    async def test_server_restart_client_recovers(self):
        tport, _ = self.echo_targets()
        entry = free_port()
        server = await self.start_server(f"127.0.0.1:{entry}", "&mode=1&quic=1")
        port = self.tunnel_port
        await self.start_client(f"127.0.0.1:{tport}")
        self.assertEqual(await echo_roundtrip(entry, b"one"), b"one")
        await server.stopService()
        server2 = await self.start_server(f"127.0.0.1:{entry}", "&mode=1&quic=1", port=port, name="server2")
        await wait_for(lambda: server2.runner.control is not None, timeout=15, what="client back")
        await wait_for(lambda: server2.runner.pool.idle_count() > 0, timeout=10, what="QUIC pool back")
        self.assertEqual(await echo_roundtrip(entry, b"two"), b"two")


class Quic114FlowTests(TunnelMixin, unittest.TestCase):
    """The 1.14 QUIC pool (``type=1``, SPEC-1.14 §4.3): one QUIC connection
    with ``max`` streams, the first stream the control channel (ID
    00000000), JSON signals and the verify exchange over streams."""

    async def _both(self, flow: str, query: str = "") -> None:
        server, client = await self.carries_tcp_and_udp(flow, f"&type=1&max=64{query}", size=200_000)
        self.assertEqual((server.runner.generation, client.runner.generation), ("1.14", "1.14"))
        self.assertTrue(server.runner.quic and client.runner.quic)
        self.assertTrue(self.logged("server", "Sending tunnel config: FLOW=%s|MAX=64|TLS=1|TYPE=1" % flow))
        self.assertTrue(self.logged("server", "TLS code-1: RAM cert with TLS 1.3 for stream pool"))
        self.assertEqual(len(client.runner.quic_client.sessions), 1)  # exactly one connection
        # the control channel is a stream, as every pool entry
        self.assertTrue(getattr(client.runner.control.transport, "quic_stream", False))
        idle = list(server.runner.pool.idle.values())
        self.assertTrue(idle)
        self.assertTrue(all(getattr(c.transport, "quic_stream", False) for c in idle))

    @d
    async def test_reverse(self):
        await self._both("-")

    @d
    async def test_forward_tls0_raised_to_tls1(self):
        await self._both("+", "&tls=0")


class QuicTLSVerifyTests(CAMixin, unittest.TestCase):
    """tls=2 over QUIC: chain and host name checked by the client."""

    @d
    async def test_tls2_verified(self):
        crt, key = make_leaf(self.dir, self.ca, self.ca_key, "localhost")
        server, client, entry, _ = await self.tunnel(
            "+", f"&quic=1&tls=2&crt={crt}&key={key}", client_host="localhost"
        )
        self.assertEqual(client.runner.tls_code, 2)
        self.assertEqual(await echo_roundtrip(entry, b"x" * 5000), b"x" * 5000)
        self.assertEqual(await udp_roundtrip(entry, [b"u1"]), [b"u1"])
        await wait_for(lambda: self.logged("client", "TLS cert verified: sha256:"), what="client verify line")

    @d
    async def test_wrong_host_name_refused(self):
        await self.wrong_host_name_refused("&quic=1")

    @d
    async def test_tls2_verified_114(self):
        """type=1, tls=2: the client verifies the ``sni`` name."""
        crt, key = make_leaf(self.dir, self.ca, self.ca_key, "localhost")
        server, client, entry, _ = await self.tunnel(
            "-", f"&type=1&tls=2&crt={crt}&key={key}", client_query="&sni=localhost"
        )
        self.assertEqual((client.runner.tls_code, client.runner.generation), (2, "1.14"))
        self.assertEqual(await echo_roundtrip(entry, b"y" * 5000), b"y" * 5000)
        await wait_for(lambda: self.logged("server", "TLS certificate fingerprint verified: sha256:"),
                       what="server verify line")
