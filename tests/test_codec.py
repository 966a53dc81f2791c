"""Wire vectors of the control channel (SPEC §1 default key, §3.1 line codec,
§3.2 handshake answer, §3.3 signals, §4 pool IDs)."""

from __future__ import annotations

import base64

from hypothesis import given, settings, strategies as st
from twisted.internet import defer, reactor
from twisted.internet.protocol import Factory
from twisted.trial import unittest

from nodepass.wire import codec
from nodepass.wire.codec import Codec, CodecError
from nodepass.config.urls import default_key
from nodepass.wire.control import LineBuffer
from nodepass.base.logs import NodeLog
from nodepass.pools.tcp import ServerPool
from nodepass.relay.core import RelayEnd
from tests import examples
from tests.helpers import connect


class DefaultKeyTests(unittest.TestCase):
    def test_known_port(self):
        # A real Go client on port 41003 printed this key in its start line.
        self.assertEqual(default_key(41003), "61741aaf")

    def test_is_fnv1a_of_decimal_text(self):
        h = 0x811C9DC5
        for b in b"10101":
            h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
        self.assertEqual(default_key(10101), f"{h:08x}")


class LineCodecTests(unittest.TestCase):
    def test_handshake_vector(self):
        c = Codec("61741aaf")
        self.assertEqual(c.encode("np://0@1024/-#1"), b"WEENGx5RIVcGAwMbHEJQ\n")
        self.assertEqual(c.decode(b"WEENGx5RIVcGAwMbHEJQ\n"), b"np://0@1024/-#1")

    def test_xor_then_padded_standard_base64(self):
        c = Codec("ab")
        line = c.encode(b"\x00\x01\x02\xff\xfe")
        raw = bytes([0 ^ 0x61, 1 ^ 0x62, 2 ^ 0x61, 0xFF ^ 0x62, 0xFE ^ 0x61])
        self.assertEqual(line, base64.standard_b64encode(raw) + b"\n")
        self.assertTrue(line.rstrip(b"\n").endswith(b"="))

    def test_key_line(self):
        # What a client sends first: encode(KEY) under its own key.
        c = Codec("61741aaf")
        self.assertEqual(c.decode(c.encode("61741aaf")), b"61741aaf")
        self.assertEqual(base64.b64decode(c.encode("61741aaf")), b"\x00" * 8)

    def test_bad_base64_refused(self):
        c = Codec("k")
        for bad in (b"not base64!!\n", b"QUJD\x00\n", b"QUJ\n"):
            self.assertRaises(CodecError, c.decode, bad)

    @settings(max_examples=200, deadline=None)
    @given(st.binary(min_size=1, max_size=64), st.binary(max_size=300))
    def test_round_trip(self, key, payload):
        c = Codec(key)
        line = c.encode(payload)
        self.assertTrue(line.endswith(b"\n"))
        self.assertEqual(line.count(b"\n"), 1)
        self.assertEqual(c.decode(line), payload)


class KeyStreamTests(unittest.TestCase):
    """:class:`codec.KeyStream` (the per-key cache the line codec and the
    1.14 signals XOR with) against a byte-by-byte XOR, on both sides of
    its cache limit and with the same key stream reused for many lengths."""

    @staticmethod
    def _reference_xor(data: bytes, key: bytes) -> bytes:
        return bytes(b ^ key[i % len(key)] for i, b in enumerate(data)) if key else bytes(data)

    @settings(max_examples=examples(300))
    @given(st.binary(max_size=40), st.lists(st.binary(max_size=codec.KEYSTREAM_CACHE + 40), max_size=6))
    def test_same_bytes_as_a_plain_xor(self, key, payloads):
        stream = codec.KeyStream(key)
        for payload in payloads + payloads:  # the second round hits the cache
            self.assertEqual(stream.xor(payload), self._reference_xor(payload, key))
            self.assertEqual(codec.xor(payload, key), self._reference_xor(payload, key))

    def test_cache_is_bounded(self):
        stream = codec.KeyStream(b"secret")
        for n in range(4 * codec.KEYSTREAM_CACHE):
            stream.xor(bytes(n))
        self.assertEqual(len(stream._streams), codec.KEYSTREAM_CACHE + 1)  # lengths 0..KEYSTREAM_CACHE

    @settings(max_examples=examples(100))
    @given(st.binary(max_size=64), st.binary(max_size=300))
    def test_codec_lines_unchanged(self, key, payload):
        # The line codec's bytes are those of the formula, written out.
        line = Codec(key).encode(payload)
        self.assertEqual(line, base64.b64encode(self._reference_xor(payload, key)) + b"\n")
        self.assertEqual(Codec(key).decode(line), payload)


class HandshakeConfigTests(unittest.TestCase):
    def test_build_and_parse(self):
        self.assertEqual(codec.handshake_config(0, 1024, "-", 1), "np://0@1024/-#1")
        info = codec.parse_handshake_config(b"np://0@512/+#2")
        self.assertEqual((info.pool_type, info.max, info.flow, info.tls_code), ("0", 512, "+", 2))

    def test_empty_parts_rejected(self):
        for bad in ("np://@1024/-#1", "np://0@/-#1", "np://0@1024/#1", "np://0@1024/-#", "np://01024/-#1", "http://x"):
            with self.assertRaises(CodecError, msg=bad):
                codec.parse_handshake_config(bad)


class SignalTests(unittest.TestCase):
    def test_launch_signals(self):
        self.assertEqual(codec.tcp_launch("127.0.0.1:5555", "0a1b2c3d"), "np://127.0.0.1:5555/0a1b2c3d#1")
        self.assertEqual(codec.udp_launch("[::1]:53", "0a1b2c3d"), "np://[::1]:53/0a1b2c3d#2")
        sig = codec.parse_signal(b"np://[::1]:53/0a1b2c3d#2")
        self.assertEqual((sig.kind, sig.host, sig.id), ("2", "[::1]:53", "0a1b2c3d"))
        self.assertEqual(codec.split_origin(sig.host), ("::1", 53))

    def test_escaped_ids(self):
        # Go's url.PathEscape: '/', ' ', '?', ',' and ';' are escaped.
        payload = codec.tcp_launch("1.2.3.4:5", "a/b c?d,e;f")
        self.assertEqual(payload, "np://1.2.3.4:5/a%2Fb%20c%3Fd%2Ce%3Bf#1")
        self.assertEqual(codec.parse_signal(payload).id, "a/b c?d,e;f")
        self.assertEqual(codec.path_escape("x$&+:=@y"), "x$&+:=@y")

    def test_simple_signals(self):
        for kind, text in ((codec.FLUSH, "np:#f"), (codec.PING, "np:#i"), (codec.PONG, "np:#o")):
            self.assertEqual(codec.simple(kind), text)
            self.assertEqual(codec.parse_signal(text).kind, kind)
        self.assertEqual(codec.verify("10.0.0.1:40000", "deadbeef"), "np://10.0.0.1:40000/deadbeef#v")

    def test_garbage_signals(self):
        for bad in (b"hello", b"np://x/y", b"\xff\xfe", b"np:x#1"):
            self.assertRaises(CodecError, codec.parse_signal, bad)
        self.assertEqual(codec.parse_signal("np:#zz").kind, "zz")  # unknown: caller ignores


class LineBufferTests(unittest.TestCase):
    def test_split_and_overflow(self):
        lb = LineBuffer(max_line=10)
        self.assertEqual(lb.feed(b"abc"), [])
        self.assertEqual(lb.feed(b"d\nef\ngh"), [b"abcd", b"ef"])
        self.assertFalse(lb.overflow)
        lb.feed(b"x" * 20)
        self.assertTrue(lb.overflow)
        self.assertEqual(lb.rest(), b"")


class _PoolSide(RelayEnd):
    """What the server does with a pool connection: register it (writes ID)."""

    pool: ServerPool

    def connectionMade(self):
        super().connectionMade()
        self.id = self.factory.pool.register(self)
        self.factory.registered.append(self)
        if self.id is None:  # full: the server closes it (as ServerRunner does)
            self.transport.loseConnection()


class PoolIDExchangeTests(unittest.TestCase):
    """The server writes 4 raw random bytes; the ID is their lowercase hex."""

    async def _exchange(self):
        pool = ServerPool(2, reactor, NodeLog("none"))
        f = Factory.forProtocol(_PoolSide)
        f.noisy = False
        f.pool = pool
        f.registered = []
        port = reactor.listenTCP(0, f, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        clients = []
        for _ in range(3):
            c = await connect(port.getHost().port)
            clients.append(c)
        first = await clients[0].wait_bytes(4)
        second = await clients[1].wait_bytes(4)
        third = await clients[2].lost  # beyond max=2: closed without an ID
        pool.close()
        for c in clients[:2]:
            await c.lost
        return f, first, second, third

    def test_exchange(self):
        async def run():
            f, first, second, third = await self._exchange()
            self.assertEqual(len(first), 4)
            self.assertEqual(codec.pool_id(first), f.registered[0].id)
            self.assertEqual(codec.pool_id(second), f.registered[1].id)
            self.assertRegex(f.registered[0].id, r"^[0-9a-f]{8}$")
            self.assertNotEqual(first, second)
            self.assertEqual(third, b"")
            self.assertIsNone(f.registered[2].id)

        return defer.ensureDeferred(run())

    def test_pool_id_needs_four_bytes(self):
        self.assertEqual(codec.pool_id(bytes.fromhex("00ff10ab")), "00ff10ab")
        self.assertRaises(CodecError, codec.pool_id, b"abc")
