"""nodepass.tls: certificates made in memory, fingerprints, tls=2 loading
with fallback and reload, client verification over real TLS connections;
and the control channel's timers (ping, silence) on a fake clock."""

from __future__ import annotations

import hashlib
import os
import re

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import crypto
from twisted.internet import defer, reactor, ssl, task
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from nodepass.wire import codec
from nodepass.wire.codec import Codec
from nodepass.wire.dialect import V112Dialect
from nodepass.wire.control import ControlChannel
from nodepass.base.logs import NodeLog
from nodepass.net.tls import ServerCredentials, client_context_factory, fingerprint, generate_self_signed
from tests.test_tunnel import make_ca, make_leaf

FP = re.compile(r"^sha256:([0-9A-F]{2}:){31}[0-9A-F]{2}$")


class CertificateTests(unittest.TestCase):
    def test_self_signed_in_memory(self):
        cert_pem, key_pem = generate_self_signed("tunnel.example")
        cert = x509.load_pem_x509_certificate(cert_pem)
        self.assertEqual(cert.subject, cert.issuer)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertIn("tunnel.example", names.get_values_for_type(x509.DNSName))
        serialization.load_pem_private_key(key_pem, None)
        self.assertNotEqual(generate_self_signed()[0], generate_self_signed()[0])

    def test_fingerprint_forms_agree(self):
        cert_pem, _ = generate_self_signed()
        der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
        digest = hashlib.sha256(der).hexdigest().upper()
        expected = "sha256:" + ":".join(digest[i : i + 2] for i in range(0, 64, 2))
        self.assertEqual(fingerprint(cert_pem), expected)
        self.assertEqual(fingerprint(x509.load_pem_x509_certificate(cert_pem)), expected)
        self.assertEqual(fingerprint(crypto.load_certificate(crypto.FILETYPE_PEM, cert_pem)), expected)
        self.assertRegex(expected, FP)


class CredentialTests(unittest.TestCase):
    def setUp(self):
        self.lines: list[str] = []
        self.log = NodeLog("debug")
        self.log.listeners.append(lambda level, line: self.lines.append(line))
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        _, self.ca, self.ca_key = make_ca(self.dir)

    def test_plain(self):
        creds = ServerCredentials.from_config(0, "", "", self.log, 3600, task.Clock())
        self.assertEqual(creds.tls_code, 0)
        self.assertRaises(ValueError, creds.context_factory)

    def test_tls1_self_signed(self):
        creds = ServerCredentials.from_config(1, "", "", self.log, 3600, task.Clock())
        self.assertEqual(creds.tls_code, 1)
        self.assertRegex(creds.fingerprint, FP)
        self.assertEqual(creds.fingerprint, fingerprint(creds.cert_pem))

    def test_tls2_fallback_when_files_fail(self):
        crt, _ = make_leaf(self.dir, self.ca, self.ca_key, "localhost")
        other_crt, other_key = make_leaf(self.dir, self.ca, self.ca_key, "other.example")
        for c, k in (("/nonexistent", "/nonexistent"), (crt, other_key), (crt, crt)):
            creds = ServerCredentials.from_config(2, c, k, self.log, 3600, task.Clock())
            self.assertEqual(creds.tls_code, 1, (c, k))
        self.assertEqual(sum("falling back to tls=1" in x for x in self.lines), 3)

    def test_tls2_reload_at_most_once_per_interval(self):
        clock = task.Clock()
        crt, key = make_leaf(self.dir, self.ca, self.ca_key, "localhost")
        creds = ServerCredentials.from_config(2, crt, key, self.log, 3600, clock)
        self.assertEqual(creds.tls_code, 2)
        first = creds.fingerprint
        self.assertEqual(first, fingerprint(open(crt, "rb").read()))
        # renewed on disk (same paths)
        new_crt, new_key = make_leaf(self.dir, self.ca, self.ca_key, "localhost")
        self.assertEqual(new_crt, crt)
        creds.context_factory()
        self.assertEqual(creds.fingerprint, first)  # not yet: interval not over
        clock.advance(3600)
        creds.context_factory()
        self.assertNotEqual(creds.fingerprint, first)
        self.assertEqual(creds.fingerprint, fingerprint(open(crt, "rb").read()))
        # broken on disk: keep serving the current one
        current = creds.fingerprint
        with open(crt, "wb") as f:
            f.write(b"garbage")
        clock.advance(3600)
        creds.context_factory()
        self.assertEqual(creds.fingerprint, current)
        self.assertTrue(any("reload failed" in x for x in self.lines))


class _Hello(Protocol):
    def connectionMade(self):
        self.transport.write(b"hello")


class _Read(Protocol):
    def __init__(self):
        self.done = defer.Deferred()
        self.data = b""

    def dataReceived(self, data):
        self.data += data
        self.transport.loseConnection()

    def connectionLost(self, reason):
        if self.data:
            self.done.callback(self.data)
        else:
            self.done.errback(reason)


class ClientVerifyTests(unittest.TestCase):
    """client_context_factory over real TLS connections."""

    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.ca_path, self.ca, self.ca_key = make_ca(self.dir)

    def _serve(self, creds: ServerCredentials) -> int:
        f = Factory.forProtocol(_Hello)
        f.noisy = False
        port = reactor.listenSSL(0, f, creds.context_factory(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    async def _fetch(self, port: int, ctx) -> bytes:
        proto = _Read()
        f = ClientFactory.forProtocol(lambda: proto)
        f.noisy = False
        reactor.connectSSL("127.0.0.1", port, f, ctx)
        return await proto.done

    def _creds(self, name: str) -> ServerCredentials:
        crt, key = make_leaf(self.dir, self.ca, self.ca_key, name)
        return ServerCredentials.from_config(2, crt, key, NodeLog("none"), 3600, reactor)

    def test_tls1_accepts_anything(self):
        creds = ServerCredentials.from_config(1, "", "", NodeLog("none"), 3600, reactor)
        port = self._serve(creds)
        d = defer.ensureDeferred(self._fetch(port, client_context_factory(1, "whatever")))
        return d.addCallback(self.assertEqual, b"hello")

    def test_tls12_client_refused(self):
        """The server speaks TLS 1.3 only."""
        creds = ServerCredentials.from_config(1, "", "", NodeLog("none"), 3600, reactor)
        port = self._serve(creds)
        old = ssl.CertificateOptions(verify=False, lowerMaximumSecurityTo=ssl.TLSVersion.TLSv1_2)
        d = defer.ensureDeferred(self._refused(old, port))
        return d.addCallback(lambda e: self.assertIn("version", (str(e) + repr(e)).lower()))

    def test_tls2_right_name(self):
        port = self._serve(self._creds("localhost"))
        ca_pem = open(self.ca_path, "rb").read()
        d = defer.ensureDeferred(self._fetch(port, client_context_factory(2, "localhost", trust_roots=ca_pem)))
        return d.addCallback(self.assertEqual, b"hello")

    async def _refused(self, ctx, port):
        try:
            await self._fetch(port, ctx)
        except Exception as e:  # noqa: BLE001
            return e
        self.fail("connection was not refused")

    def test_tls2_wrong_name_refused(self):
        port = self._serve(self._creds("other.example"))
        ca = ssl.Certificate.loadPEM(open(self.ca_path, "rb").read())
        d = defer.ensureDeferred(self._refused(client_context_factory(2, "localhost", trust_roots=ca), port))
        return d.addCallback(lambda e: self.assertIn("localhost", str(e) + repr(e)))

    def test_tls2_unknown_ca_refused(self):
        port = self._serve(self._creds("localhost"))
        other_dir = self.mktemp()
        os.makedirs(other_dir)
        other_ca, _, _ = make_ca(other_dir)
        ctx = client_context_factory(2, "localhost", trust_roots=open(other_ca, "rb").read())
        d = defer.ensureDeferred(self._refused(ctx, port))
        return d.addCallback(lambda e: self.assertIn("certificate verify failed", str(e) + repr(e)))


class ControlChannelTimerTests(unittest.TestCase):
    """Pings every interval, pong -> round trip, silence x3 -> broken."""

    def _channel(self):
        self.clock = task.Clock()
        self.transport = StringTransport()
        self.broken: list[str] = []
        self.pongs: list[int] = []
        self.signals = []
        self.checks = []
        self.key = Codec("61741aaf")
        ch = ControlChannel(
            self.transport, V112Dialect(self.key), self.clock, 5.0, NodeLog("none"),
            handler=self.signals.append, on_pong=self.pongs.append, on_broken=self.broken.append,
            before_ping=lambda: self.checks.append(1),
        )
        ch.start()
        return ch

    def _sent(self) -> list[bytes]:
        lines = self.transport.value().split(b"\n")[:-1]
        return [self.key.decode(x) for x in lines]

    def test_ping_pong_checkpoint(self):
        ch = self._channel()
        self.clock.advance(5)
        self.assertEqual(self._sent(), [b"np:#i"])
        self.assertEqual(self.checks, [1])  # pool check runs before each ping
        self.clock.advance(0.012)
        ch.data_received(self.key.encode("np:#o"))
        self.assertEqual(self.pongs, [12])
        ch.data_received(self.key.encode("np:#i") + self.key.encode("np://1.2.3.4:5/abcd0123#1"))
        self.assertEqual(self._sent()[-1], b"np:#o")
        self.assertEqual([s.id for s in self.signals], ["abcd0123"])
        ch.stop()

    def test_garbage_and_unknown_skipped(self):
        ch = self._channel()
        ch.data_received(b"!!!notbase64\n" + self.key.encode("np:#zz") + self.key.encode("hello"))
        self.assertEqual([s.kind for s in self.signals], ["zz"])
        self.assertEqual(self.broken, [])
        ch.data_received(b"x" * (codec.MAX_LINE + 10))
        self.assertEqual(self.broken, ["control line too long"])

    def test_silence_breaks_after_three_intervals(self):
        ch = self._channel()
        self.clock.advance(10)
        ch.data_received(self.key.encode("np:#i"))  # heard at t=10
        self.clock.advance(14.9)
        self.assertEqual(self.broken, [])
        self.clock.advance(0.2)
        self.assertEqual(len(self.broken), 1)
        self.assertIn("silent", self.broken[0])
        self.assertTrue(self.transport.disconnecting)
        ch.stop()
