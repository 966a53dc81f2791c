"""Byte-level interoperability with Go NodePass 1.12 (docs/interop.md).

Each test plays the Go peer with raw sockets against our real server or
client, in-process: it writes the exact bytes a Go peer writes and checks the
exact bytes we answer.  The expected lines are built here with a separate
XOR/base64 implementation, not with ``nodepass.codec``, so a codec bug cannot
hide itself.
"""

from __future__ import annotations

import base64
import hashlib
import os

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import reactor
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.trial import unittest
from zope.interface import implementer
from OpenSSL import crypto

from nodepass.wire import codec
from nodepass.net.tls import generate_self_signed
from tests.helpers import Client, close, connect, free_port, service_up, wait_for
from tests.test_tunnel import FAST, TunnelMixin, d

KEY = b"s3cret"


def go_line(payload: bytes, key: bytes = KEY) -> bytes:
    """What Go's encode() writes: std base64 (padded) of payload XOR key, then LF."""
    x = bytes(b ^ key[i % len(key)] for i, b in enumerate(payload))
    return base64.standard_b64encode(x) + b"\n"


def go_decode(line: bytes, key: bytes = KEY) -> bytes:
    raw = base64.standard_b64decode(line.rstrip(b"\n"))
    return bytes(b ^ key[i % len(key)] for i, b in enumerate(raw))


def lines_of(data: bytes) -> list[bytes]:
    return [ln + b"\n" for ln in data.split(b"\n")[:-1]]


class GoClientAgainstOurServer(TunnelMixin, unittest.TestCase):
    """A Go client's bytes against our server."""

    @d
    async def test_handshake_pool_id_launch_ping_relay(self):
        port = free_port()
        self.tunnel_port = port
        svc = self._service("server", f"server://{KEY.decode()}@127.0.0.1:{port}/127.0.0.1:{free_port()}"
                                      "?log=debug&mode=1&max=100", FAST)
        await service_up(svc)
        entry = svc.runner.entry_port

        ctrl = await connect(port)
        self.addCleanup(close, ctrl)
        key_line = go_line(KEY)
        self.assertEqual(key_line, b"AAAAAAAA\n")  # the key XOR itself: zero bytes
        ctrl.transport.write(key_line)
        await wait_for(lambda: b"\n" in ctrl.data(), what="handshake answer")
        first = ctrl.data().split(b"\n")[0] + b"\n"
        self.assertEqual(first, go_line(b"np://0@100/-#0"))

        # A Go client pings right after the handshake; we answer pong.
        ctrl.transport.write(go_line(b"np:#i"))
        await wait_for(lambda: go_line(b"np:#o") in lines_of(ctrl.data()), what="pong")

        # Pool connection: the server writes 4 raw bytes, nothing else.
        pool = await connect(port)
        self.addCleanup(close, pool)
        raw_id = await pool.wait_bytes(4)
        self.assertEqual(len(raw_id), 4)
        pool_id = raw_id.hex()

        # A user at the server's target: launch signal names the pool ID.
        user = await connect(entry)
        self.addCleanup(close, user)
        upeer = user.transport.getHost()
        launch = go_line(f"np://127.0.0.1:{upeer.port}/{pool_id}#1".encode())
        await wait_for(lambda: launch in lines_of(ctrl.data()), what="launch signal")
        for line in lines_of(ctrl.data())[1:]:  # nothing but pings, pongs and the launch
            self.assertIn(go_decode(line), (b"np:#o", b"np:#i", go_decode(launch)))

        # Raw relay both ways on the launched pool connection.
        user.transport.write(b"from user")
        self.assertEqual(await pool.wait_bytes(4 + 9), raw_id + b"from user")
        pool.transport.write(b"from exit")
        self.assertEqual(await user.wait_bytes(9), b"from exit")

    @d
    async def test_tls1_pool_id_after_handshake_and_verify_signal(self):
        """tls=1: control stays plain; a pool connection gets TLS 1.3, then
        exactly 4 raw bytes; the verify signal names it with the client's
        control address, as Go writes RemoteAddr().String()."""
        port = free_port()
        self.tunnel_port = port
        svc = self._service("server", f"server://{KEY.decode()}@127.0.0.1:{port}/127.0.0.1:{free_port()}"
                                      "?log=debug&mode=1&max=100&tls=1", FAST)
        await service_up(svc)
        ctrl = await connect(port)
        self.addCleanup(close, ctrl)
        ctrl.transport.write(go_line(KEY))
        await wait_for(lambda: b"\n" in ctrl.data(), what="handshake answer")
        self.assertEqual(lines_of(ctrl.data())[0], go_line(b"np://0@100/-#1"))

        got: Deferred = Deferred()

        @implementer(IHandshakeListener)
        class GoPool(Client):
            def handshakeCompleted(self):
                got.callback(self)

        class F(ClientFactory):
            noisy = False

            def buildProtocol(self, addr):
                return GoPool()

        # Go's tls=1 client: TLS 1.3, no verification, no SNI, no ALPN.
        reactor.connectSSL("127.0.0.1", port, F(),
                           CertificateOptions(verify=False, raiseMinimumTo=TLSVersion.TLSv1_3))
        pool = await got
        self.addCleanup(close, pool)
        raw_id = await pool.wait_bytes(4)
        self.assertEqual(len(raw_id), 4)
        peer = pool.transport.getPeerCertificate()
        digest = hashlib.sha256(crypto.dump_certificate(crypto.FILETYPE_ASN1, peer)).hexdigest().upper()
        fp = "sha256:" + ":".join(digest[i : i + 2] for i in range(0, 64, 2))
        here = ctrl.transport.getHost()
        verify = go_line(f"np://127.0.0.1:{here.port}/{raw_id.hex()}#v".encode())
        await wait_for(lambda: verify in lines_of(ctrl.data()), what="verify signal")
        self.assertTrue(self.logged("server", "TLS cert verified: " + fp))
        self.assertEqual(pool.data(), raw_id)  # nothing else on the pool connection

    @d
    async def test_forward_flow_go_client_entry_tcp_and_udp(self):
        """Flow "+": the Go client is the entry.  It writes user bytes on the
        pool connection right after its launch signal; on another socket
        they can arrive first, which the worst case here replays."""
        tport, uport = self.echo_targets()
        port = free_port()
        self.tunnel_port = port
        svc = self._service("server", f"server://{KEY.decode()}@127.0.0.1:{port}/127.0.0.1:{tport}"
                                      "?log=debug&mode=2&max=100", FAST)
        await service_up(svc)
        ctrl = await connect(port)
        self.addCleanup(close, ctrl)
        ctrl.transport.write(go_line(KEY))
        await wait_for(lambda: b"\n" in ctrl.data(), what="handshake answer")
        self.assertEqual(lines_of(ctrl.data())[0], go_line(b"np://0@100/+#0"))

        tcp = await connect(port)
        self.addCleanup(close, tcp)
        tcp_id = (await tcp.wait_bytes(4)).hex()
        tcp.transport.write(b"user bytes first")
        ctrl.transport.write(go_line(f"np://127.0.0.1:50000/{tcp_id}#1".encode()))
        self.assertEqual(await tcp.wait_bytes(4 + 16), bytes.fromhex(tcp_id) + b"user bytes first")

        udp = await connect(port)
        self.addCleanup(close, udp)
        udp_id = (await udp.wait_bytes(4)).hex()
        ctrl.transport.write(go_line(f"np://127.0.0.1:50001/{udp_id}#2".encode()))
        udp.transport.write(b"one datagram")  # raw, no length prefix
        self.assertEqual(await udp.wait_bytes(4 + 12), bytes.fromhex(udp_id) + b"one datagram")

    @d
    async def test_ip_probe_exact_bytes(self):
        port = free_port()
        self.tunnel_port = port
        svc = self._service("probe", f"server://127.0.0.1:{port}/127.0.0.1:{free_port()}?log=debug&mode=1", FAST)
        await service_up(svc)
        get = await connect(port)
        get.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(
            await get.lost,
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 10\r\n"
            b"Connection: close\r\n\r\n127.0.0.1\n",
        )
        put = await connect(port)
        put.transport.write(b"PUT / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(
            await put.lost,
            b"HTTP/1.1 405 Method Not Allowed\r\nAllow: GET\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        # Only a space as 4th byte marks HTTP (Go's test): "POST /" is read
        # as a handshake line, fails to decode and is closed unanswered.
        post = await connect(port)
        post.transport.write(b"POST / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(await post.lost, b"")


# -- a Go server, played by the test -------------------------------------
class _GoControl(Protocol):
    def __init__(self, fake):
        self.fake = fake
        self.buf = b""

    def connectionMade(self):
        self.fake.control = self

    def dataReceived(self, data):
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            line += b"\n"
            self.fake.received.append(line)
            if len(self.fake.received) == 1:
                # Go: answer the config line, then ping at once.
                self.transport.write(go_line(self.fake.config) + go_line(b"np:#i"))
            elif go_decode(line) == b"np:#i":
                self.transport.write(go_line(b"np:#o"))

    def send(self, payload: bytes) -> None:
        self.transport.write(go_line(payload))


@implementer(IHandshakeListener)
class _GoPoolConn(Protocol):
    def __init__(self, fake):
        self.fake = fake

    def connectionMade(self):
        if self.fake.tls is None:
            self.handshakeCompleted()
        else:
            self.transport.startTLS(self.fake.tls)

    def dataReceived(self, data):
        self.received += data

    received = b""

    def handshakeCompleted(self):
        self.pool_id = os.urandom(4)
        self.transport.write(self.pool_id)
        self.fake.pool[self.pool_id.hex()] = self


class _FakeGoServer(Factory):
    noisy = False

    def __init__(self, config: bytes, tls: bool = True):
        self.config = config
        self.control = None
        self.received: list[bytes] = []
        self.pool: dict[str, _GoPoolConn] = {}
        cert_pem, key_pem = generate_self_signed("go-server")
        cert = x509.load_pem_x509_certificate(cert_pem)
        digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest().upper()
        self.fingerprint = "sha256:" + ":".join(digest[i : i + 2] for i in range(0, 64, 2))
        self.tls = CertificateOptions(
            privateKey=crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem),
            certificate=crypto.load_certificate(crypto.FILETYPE_PEM, cert_pem),
            raiseMinimumTo=TLSVersion.TLSv1_3,
        ) if tls else None

    def buildProtocol(self, addr):
        return _GoControl(self) if self.control is None else _GoPoolConn(self)


class OurClientAgainstGoServer(TunnelMixin, unittest.TestCase):
    wire = "1.12"  # this fake Go server speaks 1.12 only, without the IP probe
    """Our client against the bytes of a Go server (tls=1, reverse flow)."""

    @d
    async def test_key_line_pong_and_verify_of_a_closed_connection(self):
        fake = _FakeGoServer(b"np://0@1024/-#1")
        listener = reactor.listenTCP(0, fake, interface="127.0.0.1")
        self.addCleanup(listener.stopListening)
        self.tunnel_port = listener.getHost().port
        client = await self.start_client(f"127.0.0.1:{free_port()}", "&min=2", key=KEY.decode(), wait=False)
        self.addCleanup(lambda: [c.transport.loseConnection() for c in fake.pool.values()])
        self.addCleanup(lambda: fake.control and fake.control.transport.loseConnection())
        await service_up(client, "client")

        self.assertEqual(fake.received[0], go_line(KEY))
        await wait_for(lambda: go_line(b"np:#o") in fake.received, what="pong from our client")

        # Go's server names a pool connection in the verify signal and closes
        # it right away: the close can arrive before the signal.
        runner = client.runner
        await wait_for(lambda: any(i in runner.pool.idle for i in fake.pool), what="an idle pool connection")
        pool_id = next(i for i in fake.pool if i in runner.pool.idle)
        fake.pool.pop(pool_id).transport.loseConnection()
        await wait_for(lambda: pool_id not in runner.pool.idle, what="the close to reach the client")
        fake.control.send(f"np://127.0.0.1:40000/{pool_id}#v".encode())
        await wait_for(lambda: self.logged("client", "TLS cert verified: " + fake.fingerprint),
                       timeout=1.5, what="the verified fingerprint logged")
        self.assertFalse(self.logged("client", "TLS verify signal failed"))


    @d
    async def test_exit_for_go_server_launches(self):
        """tls=0, flow "-": our client is the exit of a Go server's TCP and
        UDP launches (raw bytes both ways on the named pool connections)."""
        tport, uport = self.echo_targets()
        fake = _FakeGoServer(b"np://0@1024/-#0", tls=False)
        listener = reactor.listenTCP(0, fake, interface="127.0.0.1")
        self.addCleanup(listener.stopListening)
        self.tunnel_port = listener.getHost().port
        client = await self.start_client(f"127.0.0.1:{tport}", "&min=2", key=KEY.decode(), wait=False)
        self.addCleanup(lambda: [c.transport.loseConnection() for c in fake.pool.values()])
        self.addCleanup(lambda: fake.control and fake.control.transport.loseConnection())
        await service_up(client, "client")
        runner = client.runner
        await wait_for(lambda: sum(i in runner.pool.idle for i in fake.pool) >= 2, what="two idle pool connections")
        tcp_id, udp_id = [i for i in fake.pool if i in runner.pool.idle][:2]
        tcp, udp = fake.pool[tcp_id], fake.pool[udp_id]
        fake.control.send(f"np://[2001:db8::7]:40000/{tcp_id}#1".encode())
        tcp.transport.write(b"tcp payload")
        await wait_for(lambda: tcp.received == b"tcp payload", what="TCP echo through our exit")
        fake.control.send(f"np://203.0.113.9:40001/{udp_id}#2".encode())
        udp.transport.write(b"udp payload")
        await wait_for(lambda: udp.received == b"udp payload", what="UDP echo through our exit")


class GoURLFormatting(unittest.TestCase):
    """Signal URLs as Go's net/url writes and reads them."""

    def test_ipv6_zone_escaped_in_host(self):
        text = codec.tcp_launch("[fe80::1%eth0]:5000", "0a1b2c3d")
        self.assertEqual(text, "np://[fe80::1%25eth0]:5000/0a1b2c3d#1")
        sig = codec.parse_signal(text)
        self.assertEqual((sig.host, sig.id), ("[fe80::1%eth0]:5000", "0a1b2c3d"))
        self.assertEqual(codec.split_origin(sig.host), ("fe80::1%eth0", 5000))

    def test_plain_ipv6_and_v4_unchanged(self):
        self.assertEqual(codec.udp_launch("[::1]:53", "00ff00ff"), "np://[::1]:53/00ff00ff#2")
        self.assertEqual(codec.verify("10.0.0.1:40000", "deadbeef"), "np://10.0.0.1:40000/deadbeef#v")

    def test_id_only_signal_is_an_unknown_fragment_not_garbage(self):
        # Newer Go peers write signals like np:ID#0; they must be ignored
        # quietly (unknown fragment), not reported as undecodable.
        sig = codec.parse_signal(b"np:0a1b2c3d#0")
        self.assertEqual((sig.kind, sig.host, sig.id), ("0", "", "0a1b2c3d"))
        self.assertRaises(codec.CodecError, codec.parse_signal, b"np:0a1b2c3d#1")
