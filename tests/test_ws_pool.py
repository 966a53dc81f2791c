"""WebSocket pool transport (SPEC-1.14 §4.4, ``type=2``).

Byte-level tests drive the server and client protocols over
``StringTransport`` with a ``task.Clock``: the exact upgrade request and
answer, frame headers and masks, refusals, close codes and timers.  The
end-to-end tests use real TCP (and TLS) sockets on 127.0.0.1: many streams,
multi-MiB transfers checked by SHA-256, message boundaries, flow control in
both directions, closes from either side, and a relay over the stream."""

from __future__ import annotations

import base64
import hashlib
import os
import struct
from typing import Any, Callable, Optional

from twisted.internet import defer, error, reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from nodepass.base.logs import NodeLog
from nodepass.base.stats import InstanceStats
from nodepass.compat.twisted_internals import queued_bytes
from nodepass.net.tls import ServerCredentials, client_context_factory, fingerprint, host_certificate_fingerprint
from nodepass.net.tls import peer_certificate_fingerprint
from nodepass.pools.ws import (
    CLOSE_TIMEOUT,
    HEADER_TIMEOUT,
    Deadlines,
    deadlines,
    WebSocketClientUpgradeProtocol,
    WebSocketHandshakeError,
    WebSocketHandshakeTimeout,
    WebSocketPoolClient,
    WebSocketStreamTransport,
    WebSocketUpgradeError,
    WebSocketUpgradeProtocol,
    accept_value,
    new_key,
    upgrade_request,
)
from nodepass.relay.core import Relay, RelayEnd
from tests.helpers import Client, HashingClient, connect, listen_echo, sleep, wait_for

MiB = 1024 * 1024

#: SPEC-1.14 §4.4 test vector.
KEY = "OabYU+AjCv/nJYpuwpfMRA=="
ACCEPT = "w6d0uOVLoD9VXqQQnepsp9nZfB4="
EPOCH = "Thu, 01 Jan 1970 00:00:00 GMT"  # http_date of a fresh task.Clock

#: The upgrade request exactly as the Go client sends it (§4.4).
GO_REQUEST = (
    b"GET / HTTP/1.1\r\n"
    b"Host: tunnel.example\r\n"
    b"User-Agent: Go-http-client/1.1\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-Websocket-Key: OabYU+AjCv/nJYpuwpfMRA==\r\n"
    b"Sec-Websocket-Version: 13\r\n"
    b"Upgrade: websocket\r\n"
    b"Accept-Encoding: gzip\r\n"
    b"\r\n"
)

#: Go's answer to it (Date as a fresh task.Clock gives it).
GO_ANSWER = (
    b"HTTP/1.1 101 Switching Protocols\r\n"
    b"Connection: Upgrade\r\n"
    b"Sec-Websocket-Accept: w6d0uOVLoD9VXqQQnepsp9nZfB4=\r\n"
    b"Upgrade: websocket\r\n"
    b"Date: Thu, 01 Jan 1970 00:00:00 GMT\r\n"
    b"\r\n"
)


def unmask(key: bytes, data: bytes) -> bytes:
    return bytes(b ^ key[i % 4] for i, b in enumerate(data))


def client_frame(opcode: int, payload: bytes, key: bytes = b"\x11\x22\x33\x44", fin: bool = True) -> bytes:
    """A masked frame as a client sends it (payload < 126 bytes)."""
    assert len(payload) < 126
    return bytes([(0x80 if fin else 0) | opcode, 0x80 | len(payload)]) + key + unmask(key, payload)


def server_frame(opcode: int, payload: bytes) -> bytes:
    """An unmasked frame as a server sends it (payload < 126 bytes)."""
    assert len(payload) < 126
    return bytes([0x80 | opcode, len(payload)]) + payload


def request(method: str = "GET", version: str = "HTTP/1.1", **headers: str) -> bytes:
    """A request head; ``headers`` replace (or, as "", drop) Go's."""
    fields = {
        "Host": "tunnel.example",
        "Connection": "Upgrade",
        "Sec-Websocket-Key": KEY,
        "Sec-Websocket-Version": "13",
        "Upgrade": "websocket",
    }
    for k, v in headers.items():
        fields[k.replace("_", "-")] = v
    lines = [f"{method} / {version}"] + [f"{k}: {v}" for k, v in fields.items() if v]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Recorder(Protocol):
    """Records each ``dataReceived`` call separately, and the loss."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.reason: Optional[Failure] = None

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = error.ConnectionDone()) -> None:  # type: ignore[assignment]
        self.reason = reason


# -- byte level: the server ---------------------------------------------------------


class ServerBytesTests(unittest.TestCase):
    """The server's side of the upgrade and of the data stream, byte for
    byte, over a StringTransport."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.full = False
        self.streams: list[WebSocketStreamTransport] = []
        self.recorders: list[Recorder] = []
        self.proto = WebSocketUpgradeProtocol(self.clock, NodeLog("none"), self._on_stream, lambda: self.full)
        self.wire = StringTransport()
        self.proto.makeConnection(self.wire)

    def _on_stream(self, stream: WebSocketStreamTransport) -> None:
        rec = Recorder()
        self.streams.append(stream)
        self.recorders.append(rec)
        stream.attach(rec)

    def upgrade(self) -> WebSocketStreamTransport:
        self.proto.dataReceived(GO_REQUEST)
        self.assertEqual(self.wire.value(), GO_ANSWER)
        self.wire.clear()
        self.assertEqual(len(self.streams), 1)
        return self.streams[0]

    def test_accept_vector(self) -> None:
        self.assertEqual(accept_value(KEY), ACCEPT)

    def test_101_answer_for_the_spec_vector(self) -> None:
        """Exactly Connection, Sec-Websocket-Accept, Upgrade, Date."""
        self.proto.dataReceived(GO_REQUEST)
        self.assertEqual(self.wire.value(), GO_ANSWER)
        self.assertFalse(self.wire.disconnecting)
        self.assertEqual(len(self.streams), 1)
        self.assertFalse(self.clock.getDelayedCalls())  # the header timer is gone

    def test_request_in_pieces_any_path_and_early_frame(self) -> None:
        """A request that arrives a byte at a time, on another path, with the
        first frame right behind its head."""
        data = GO_REQUEST.replace(b"GET / ", b"GET /some/where?x=1 ") + client_frame(2, b"hello")
        for i in range(len(data)):
            self.proto.dataReceived(data[i : i + 1])
        self.assertTrue(self.wire.value().startswith(b"HTTP/1.1 101 Switching Protocols\r\n"))
        self.assertEqual(b"".join(self.recorders[0].chunks), b"hello")

    def test_first_message_is_one_unmasked_frame(self) -> None:
        """The ID 00000000 as the Go server sends it: ``82 04 00 00 00 00``."""
        stream = self.upgrade()
        stream.write(b"\x00\x00\x00\x00")
        self.assertEqual(self.wire.value(), bytes.fromhex("820400000000"))

    def test_signal_line_frame(self) -> None:
        stream = self.upgrade()
        line = b"x" * 24 + b"\n"
        stream.write(line)
        self.assertEqual(self.wire.value(), b"\x82\x19" + line)

    def test_payload_lengths_use_7_16_64_bits(self) -> None:
        stream = self.upgrade()
        for size, header in (
            (125, b"\x82\x7d"),
            (126, b"\x82\x7e\x00\x7e"),
            (65535, b"\x82\x7e\xff\xff"),
            (65536, b"\x82\x7f" + struct.pack("!Q", 65536)),
            (3 * MiB, b"\x82\x7f" + struct.pack("!Q", 3 * MiB)),
        ):
            self.wire.clear()
            payload = os.urandom(size)
            stream.write(payload)
            self.assertEqual(self.wire.value(), header + payload, size)

    def test_write_sequence_is_one_message_and_empty_write_sends_nothing(self) -> None:
        stream = self.upgrade()
        stream.write(b"")
        self.assertEqual(self.wire.value(), b"")
        stream.writeSequence([b"ab", b"cd"])
        self.assertEqual(self.wire.value(), b"\x82\x04abcd")

    def test_messages_are_never_joined(self) -> None:
        """Three messages in one TCP read: three dataReceived calls."""
        stream = self.upgrade()
        self.assertIs(stream.protocol, self.recorders[0])
        self.proto.dataReceived(client_frame(2, b"one") + client_frame(2, b"two") + client_frame(2, b"three"))
        self.assertEqual(self.recorders[0].chunks, [b"one", b"two", b"three"])

    def test_message_in_pieces_is_delivered_as_it_comes(self) -> None:
        self.upgrade()
        frame = client_frame(2, b"0123456789")
        self.proto.dataReceived(frame[:9])
        self.proto.dataReceived(frame[9:])
        self.assertEqual(b"".join(self.recorders[0].chunks), b"0123456789")

    def test_fragmented_message_and_ping_between(self) -> None:
        """A message in two frames with a ping between: both pieces are
        delivered (never joined with another message), the ping answered."""
        self.upgrade()
        self.proto.dataReceived(
            client_frame(2, b"frag", fin=False) + client_frame(9, b"p!") + client_frame(0, b"ment") + client_frame(2, b"x")
        )
        self.assertEqual(self.recorders[0].chunks, [b"frag", b"ment", b"x"])
        self.assertEqual(self.wire.value(), b"\x8a\x02p!")  # pong, unmasked

    def test_close_from_us(self) -> None:
        """loseConnection: ``88 02 03 e8``; the TCP connection closes once
        the peer's Close arrives; the protocol sees ConnectionDone."""
        stream = self.upgrade()
        stream.write(b"last")
        stream.loseConnection()
        self.assertEqual(self.wire.value(), b"\x82\x04last" + bytes.fromhex("880203e8"))
        stream.write(b"ignored")  # nothing after the Close
        self.assertEqual(self.wire.value(), b"\x82\x04last" + bytes.fromhex("880203e8"))
        self.assertFalse(self.wire.disconnecting)
        self.proto.dataReceived(client_frame(2, b"late") + client_frame(8, b"\x03\xe8"))
        self.assertEqual(self.recorders[0].chunks, [])  # data after our close is discarded
        self.assertTrue(self.wire.disconnecting)
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        reason = self.recorders[0].reason
        assert reason is not None
        self.assertTrue(reason.check(error.ConnectionDone))
        self.assertFalse(self.clock.getDelayedCalls())

    def test_close_from_peer(self) -> None:
        """A Close from the client is answered with the same status and the
        connection closed."""
        self.upgrade()
        self.proto.dataReceived(client_frame(2, b"data") + client_frame(8, b"\x03\xe8"))
        self.assertEqual(self.recorders[0].chunks, [b"data"])
        self.assertEqual(self.wire.value(), bytes.fromhex("880203e8"))
        self.assertTrue(self.wire.disconnecting)
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        reason = self.recorders[0].reason
        assert reason is not None
        self.assertTrue(reason.check(error.ConnectionDone))

    def test_close_with_error_status_from_peer_is_a_lost_connection(self) -> None:
        self.upgrade()
        self.proto.dataReceived(client_frame(8, b"\x03\xf3"))  # 1011
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        reason = self.recorders[0].reason
        assert reason is not None
        self.assertTrue(reason.check(error.ConnectionLost))
        self.assertIn("1011", reason.getErrorMessage())

    def test_text_frame_closes_with_1003(self) -> None:
        self.upgrade()
        self.proto.dataReceived(client_frame(1, b"text"))
        self.assertEqual(self.wire.value(), bytes.fromhex("880203eb"))
        self.assertEqual(self.recorders[0].chunks, [])
        self.proto.dataReceived(client_frame(8, b"\x03\xeb"))
        self.assertTrue(self.wire.disconnecting)
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        reason = self.recorders[0].reason
        assert reason is not None
        self.assertTrue(reason.check(error.ConnectionLost))
        self.assertIn("text frame", reason.getErrorMessage())

    def test_invalid_utf8_text_frame_also_closes_with_1003(self) -> None:
        self.upgrade()
        self.proto.dataReceived(client_frame(1, b"\xff\xfe"))
        self.assertEqual(self.wire.value(), bytes.fromhex("880203eb"))

    def test_unmasked_client_frame_is_a_protocol_error(self) -> None:
        self.upgrade()
        self.proto.dataReceived(server_frame(2, b"unmasked"))
        self.assertEqual(self.wire.value(), bytes.fromhex("880203ea"))  # 1002
        self.assertEqual(self.recorders[0].chunks, [])

    def test_close_waits_a_bounded_time(self) -> None:
        """A peer that never answers the Close: the TCP connection is closed
        after CLOSE_TIMEOUT and aborted after as long again."""
        stream = self.upgrade()
        self.wire.pauseProducing()  # (as if the reader had paused earlier)
        stream.pauseProducing()
        stream.loseConnection()
        self.assertEqual(self.wire.producerState, "producing")  # reads again, for the Close
        self.clock.advance(CLOSE_TIMEOUT - 0.1)
        self.assertFalse(self.wire.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(self.wire.disconnecting)
        self.assertFalse(self.wire.disconnected)
        self.clock.advance(CLOSE_TIMEOUT)
        self.assertTrue(self.wire.disconnected)  # StringTransport's abort
        self.proto.connectionLost(Failure(error.ConnectionLost()))
        reason = self.recorders[0].reason
        assert reason is not None
        self.assertTrue(reason.check(error.ConnectionDone))  # we asked for the close

    def test_pause_holds_messages_and_the_socket(self) -> None:
        stream = self.upgrade()
        stream.pauseProducing()
        self.assertEqual(self.wire.producerState, "paused")
        self.proto.dataReceived(client_frame(2, b"a") + client_frame(2, b"b"))
        self.assertEqual(self.recorders[0].chunks, [])
        stream.resumeProducing()
        self.assertEqual(self.wire.producerState, "producing")
        self.assertEqual(self.recorders[0].chunks, [b"a", b"b"])

    def test_reader_pausing_inside_data_received(self) -> None:
        """A reader that pauses after each message gets one per resume."""
        stream = self.upgrade()
        rec = self.recorders[0]
        orig = rec.dataReceived

        def one_at_a_time(data: bytes) -> None:
            orig(data)
            stream.pauseProducing()

        rec.dataReceived = one_at_a_time  # type: ignore[method-assign]
        self.proto.dataReceived(client_frame(2, b"1") + client_frame(2, b"2") + client_frame(2, b"3"))
        self.assertEqual(rec.chunks, [b"1"])
        stream.resumeProducing()
        self.assertEqual(rec.chunks, [b"1", b"2"])
        stream.resumeProducing()
        self.assertEqual(rec.chunks, [b"1", b"2", b"3"])

    def test_stream_not_attached_holds_reading(self) -> None:
        """on_stream may attach later: until then nothing is delivered and
        the socket is not read."""
        proto = WebSocketUpgradeProtocol(self.clock, NodeLog("none"), self.streams.append, lambda: False)
        wire = StringTransport()
        proto.makeConnection(wire)
        proto.dataReceived(GO_REQUEST + client_frame(2, b"early"))
        self.assertEqual(wire.producerState, "paused")
        rec = Recorder()
        self.streams[0].attach(rec)
        self.assertEqual(rec.chunks, [b"early"])
        self.assertEqual(wire.producerState, "producing")
        self.assertRaises(RuntimeError, self.streams[0].attach, Recorder())

    def test_lost_before_attach_is_reported_on_attach(self) -> None:
        proto = WebSocketUpgradeProtocol(self.clock, NodeLog("none"), self.streams.append, lambda: False)
        proto.makeConnection(StringTransport())
        proto.dataReceived(GO_REQUEST)
        proto.connectionLost(Failure(error.ConnectionLost("gone")))
        rec = Recorder()
        self.streams[0].attach(rec)
        assert rec.reason is not None
        self.assertTrue(rec.reason.check(error.ConnectionLost))

    def test_producer_is_registered_on_the_socket(self) -> None:
        stream = self.upgrade()
        producer = object()
        stream.registerProducer(producer, True)
        self.assertIs(self.wire.producer, producer)
        self.assertRaises(RuntimeError, stream.registerProducer, object(), True)
        stream.unregisterProducer()
        self.assertIsNone(self.wire.producer)

    def test_close_takes_the_producer_off_the_socket(self) -> None:
        """A TLS transport would not shut down with a producer on it."""
        stream = self.upgrade()

        @implementer(IPushProducer)
        class P:
            stopped = False

            def pauseProducing(self) -> None: ...

            def resumeProducing(self) -> None: ...

            def stopProducing(self) -> None:
                self.stopped = True

        p = P()
        stream.registerProducer(p, True)
        stream.loseConnection()
        self.proto.dataReceived(client_frame(8, b"\x03\xe8"))
        self.assertIsNone(self.wire.producer)
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(p.stopped)

    def test_addresses_and_handles(self) -> None:
        stream = self.upgrade()
        self.assertEqual(stream.getPeer(), self.wire.getPeer())
        self.assertEqual(stream.getHost(), self.wire.getHost())
        self.assertIsNone(stream.getPeerCertificate())  # no TLS

    # -- refusals ----------------------------------------------------------------
    def refused(self, data: bytes) -> bytes:
        self.proto.dataReceived(data)
        self.assertEqual(self.streams, [])
        self.assertTrue(self.wire.disconnecting)
        return self.wire.value()

    def test_pool_full_is_503(self) -> None:
        self.full = True
        answer = self.refused(GO_REQUEST)
        self.assertEqual(
            answer,
            b"HTTP/1.1 503 Service Unavailable\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"X-Content-Type-Options: nosniff\r\n"
            b"Date: " + EPOCH.encode() + b"\r\n"
            b"Content-Length: 10\r\n"
            b"Connection: close\r\n"
            b"\r\n"
            b"pool full\n",
        )
        self.assertEqual(self.proto.refused, 503)

    def test_pool_full_comes_first(self) -> None:
        """npws checks the pool before coder/websocket checks the request."""
        self.full = True
        self.assertTrue(self.refused(request("POST")).startswith(b"HTTP/1.1 503 "))

    def test_non_get_is_405(self) -> None:
        answer = self.refused(request("POST"))
        self.assertTrue(answer.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n"), answer)
        self.assertIn(b'method is not GET but "POST"\n', answer)

    def test_missing_upgrade_tokens_are_426(self) -> None:
        for data in (
            request(Connection=""),
            request(Upgrade=""),
            request(Connection="keep-alive"),
            request(Upgrade="h2c"),
            request(version="HTTP/1.0"),
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        ):
            self.setUp()
            answer = self.refused(data)
            self.assertTrue(answer.startswith(b"HTTP/1.1 426 Upgrade Required\r\n"), answer)

    def test_upgrade_tokens_in_lists_and_any_case(self) -> None:
        self.proto.dataReceived(request(Connection="keep-alive, UPGRADE", Upgrade="WebSocket"))
        self.assertTrue(self.wire.value().startswith(b"HTTP/1.1 101 "))

    def test_non_get_without_upgrade_tokens_is_426(self) -> None:
        """coder/websocket's order: the tokens are checked before the method."""
        answer = self.refused(request("POST", Connection=""))
        self.assertTrue(answer.startswith(b"HTTP/1.1 426 "), answer)

    def test_bad_version_or_key_is_400(self) -> None:
        for data, why in (
            (request(Sec_Websocket_Version="8"), b"only 13 is supported"),
            (request(Sec_Websocket_Version=""), b"only 13 is supported"),
            (request(Sec_Websocket_Key=""), b"missing Sec-WebSocket-Key"),
            (request(Sec_Websocket_Key="short"), b"invalid Sec-WebSocket-Key"),
            (request(Sec_Websocket_Key=base64.b64encode(b"x" * 15).decode()), b"16 byte"),
            (request().replace(b"\r\n\r\n", b"\r\nSec-WebSocket-Key: " + KEY.encode() + b"\r\n\r\n"), b"multiple"),
        ):
            self.setUp()
            answer = self.refused(data)
            self.assertTrue(answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer)
            self.assertIn(why, answer)
        self.setUp()
        self.assertIn(b"\r\nSec-Websocket-Version: 13\r\n", self.refused(request(Sec_Websocket_Version="8")))

    def test_malformed_requests_are_400(self) -> None:
        for data in (
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # TLS to a plain port
            b"GARBAGE\r\n\r\n",
            b"GET /\r\n\r\n",
            b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n folded: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Name: x\r\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nConnection: Upgrade\r\n\r\n",  # no Host
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"G(T / HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET / HTTP/one\r\nHost: a\r\n\r\n",
        ):
            self.setUp()
            answer = self.refused(data)
            self.assertTrue(answer.startswith(b"HTTP/1.1 400 Bad Request"), (data, answer))
            self.assertTrue(answer.endswith(b"Connection: close\r\n\r\n" + answer.split(b"\r\n")[0][9:]))

    def test_http2_preface_is_505(self) -> None:
        answer = self.refused(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 505 HTTP Version Not Supported"), answer)

    def test_head_too_large_is_431(self) -> None:
        self.proto.dataReceived(b"GET / HTTP/1.1\r\n")
        for _ in range(200):
            if self.wire.disconnecting:
                break
            self.proto.dataReceived(b"X-Filler: " + b"y" * 50 + b"\r\n")
        self.assertTrue(self.wire.value().startswith(b"HTTP/1.1 431 Request Header Fields Too Large"))
        self.assertTrue(self.wire.disconnecting)

    def test_bytes_after_a_refusal_are_ignored(self) -> None:
        self.full = True
        answer = self.refused(GO_REQUEST)
        self.proto.dataReceived(GO_REQUEST + os.urandom(100))
        self.assertEqual(self.wire.value(), answer)
        self.assertEqual(self.streams, [])

    def test_refused_peer_that_lingers_is_aborted(self) -> None:
        self.full = True
        self.refused(GO_REQUEST)
        self.assertFalse(self.wire.disconnected)
        self.clock.advance(CLOSE_TIMEOUT)
        self.assertTrue(self.wire.disconnected)
        self.proto.connectionLost(Failure(error.ConnectionLost()))
        self.assertFalse(self.clock.getDelayedCalls())

    def test_slow_loris_is_dropped_after_10s(self) -> None:
        partial = GO_REQUEST[:-2]
        step = len(partial) // 5 + 1
        for i in range(0, len(partial), step):
            self.proto.dataReceived(partial[i : i + step])
            self.clock.advance(1.5)  # each piece well within the limit, the head not
        self.clock.advance(HEADER_TIMEOUT - 1.5 * 5 - 0.01)
        self.assertFalse(self.wire.disconnecting)
        self.clock.advance(0.02)
        self.assertTrue(self.wire.disconnected)  # aborted, without an answer
        self.assertEqual(self.wire.value(), b"")
        self.proto.dataReceived(b"\r\n")  # too late
        self.assertEqual(self.streams, [])
        self.proto.connectionLost(Failure(error.ConnectionLost()))

    def test_idle_connection_is_dropped_after_10s(self) -> None:
        self.clock.advance(HEADER_TIMEOUT)
        self.assertTrue(self.wire.disconnected)

    def test_random_garbage_never_raises(self) -> None:
        rng = __import__("random").Random(1414)
        for _ in range(300):
            self.setUp()
            blob = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300)))
            if rng.random() < 0.5:
                blob += b"\r\n\r\n" + blob
            for piece in (blob[: len(blob) // 2], blob[len(blob) // 2 :]):
                self.proto.dataReceived(piece)
            self.clock.advance(HEADER_TIMEOUT)
            self.assertTrue(self.wire.disconnecting)
            self.proto.connectionLost(Failure(error.ConnectionLost()))

    def test_garbage_frames_after_the_upgrade_never_raise(self) -> None:
        rng = __import__("random").Random(7)
        for _ in range(200):
            self.setUp()
            stream = self.upgrade()
            self.proto.dataReceived(bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 200))))
            self.clock.advance(2 * CLOSE_TIMEOUT)
            self.proto.connectionLost(Failure(error.ConnectionLost()))
            self.assertFalse(stream.connected)
            self.assertIsNotNone(self.recorders[0].reason)
            self.assertFalse(self.clock.getDelayedCalls())


class WsprotoBehaviourTests(unittest.TestCase):
    """What nodepass.pools.ws relies on in wsproto's public API, so that an
    upgrade that changes it fails here, naming the version."""

    def need(self, ok: bool, what: str) -> None:
        import wsproto

        if not ok:
            self.fail(f"wsproto {wsproto.__version__}: {what} -- relied on by nodepass/pools/ws.py")

    def test_one_frame_per_message_and_masking(self) -> None:
        from wsproto.connection import Connection, ConnectionType
        from wsproto.events import BytesMessage

        server = Connection(ConnectionType.SERVER)
        client = Connection(ConnectionType.CLIENT)
        big = b"\x00" * 200_000
        self.need(server.send(BytesMessage(data=big)) == b"\x82\x7f" + struct.pack("!Q", len(big)) + big, "server frame")
        frame = client.send(BytesMessage(data=memoryview(b"abc")))  # type: ignore[arg-type]
        self.need(frame[:2] == b"\x82\x83" and unmask(frame[2:6], frame[6:]) == b"abc", "client frame")

    def test_protocol_error_is_a_close_event_without_state_change(self) -> None:
        from wsproto.connection import Connection, ConnectionState, ConnectionType
        from wsproto.events import CloseConnection

        server = Connection(ConnectionType.SERVER)
        server.receive_data(server_frame(2, b"unmasked"))
        events = list(server.events())
        self.need(len(events) == 1 and isinstance(events[0], CloseConnection), "ParseFailed as a CloseConnection event")
        self.need(server.state is ConnectionState.OPEN, "state unchanged by a protocol error")

    def test_frames_in_pieces_as_they_arrive(self) -> None:
        from wsproto.connection import Connection, ConnectionType
        from wsproto.events import BytesMessage

        client = Connection(ConnectionType.CLIENT)
        frame = b"\x82\x7e\x01\x00" + b"z" * 256
        client.receive_data(frame[:100])
        first = list(client.events())
        client.receive_data(frame[100:])
        second = list(client.events())
        self.need(
            [type(e) for e in first + second] == [BytesMessage, BytesMessage]
            and b"".join(e.data for e in first + second) == b"z" * 256,  # type: ignore[attr-defined]
            "partial frames delivered as they arrive",
        )


# -- byte level: the client ---------------------------------------------------------


class ClientBytesTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.rec = Recorder()
        self.proto = WebSocketClientUpgradeProtocol(self.clock, "tunnel.example", attach_to=self.rec, key=KEY)
        self.wire = StringTransport()
        self.proto.makeConnection(self.wire)
        self.results: list[Any] = []
        self.proto.done.addBoth(self.results.append)

    def upgrade(self, extra: bytes = b"") -> WebSocketStreamTransport:
        self.proto.dataReceived(GO_ANSWER + extra)
        self.assertEqual(len(self.results), 1)
        stream = self.results[0]
        self.assertIsInstance(stream, WebSocketStreamTransport)
        self.wire.clear()
        return stream

    def test_request_is_byte_exact(self) -> None:
        self.assertEqual(self.wire.value(), GO_REQUEST)
        self.assertEqual(upgrade_request("tunnel.example", KEY), GO_REQUEST)

    def test_fresh_keys(self) -> None:
        a = WebSocketClientUpgradeProtocol(self.clock, "h").key
        b = WebSocketClientUpgradeProtocol(self.clock, "h").key
        self.assertNotEqual(a, b)
        self.assertEqual(len(base64.b64decode(a)), 16)

    def test_101_with_the_id_in_the_same_segment(self) -> None:
        """The server's first message often rides with its 101."""
        stream = self.upgrade(b"\x82\x04\x00\x00\x00\x00\x82\x03abc")
        self.assertIs(stream.protocol, self.rec)
        self.assertEqual(self.rec.chunks, [b"\x00\x00\x00\x00", b"abc"])

    def test_client_frames_are_masked_with_fresh_keys(self) -> None:
        """``82 99`` + 4-byte mask + masked payload for a 25-byte line."""
        stream = self.upgrade()
        line = b"y" * 24 + b"\n"
        masks = set()
        for _ in range(8):
            self.wire.clear()
            stream.write(line)
            frame = self.wire.value()
            self.assertEqual(frame[:2], b"\x82\x99")
            self.assertEqual(len(frame), 2 + 4 + 25)
            self.assertEqual(unmask(frame[2:6], frame[6:]), line)
            masks.add(frame[2:6])
        self.assertGreater(len(masks), 1)

    def test_large_client_frame(self) -> None:
        stream = self.upgrade()
        payload = os.urandom(70000)
        stream.write(payload)
        frame = self.wire.value()
        self.assertEqual(frame[:2], b"\x82\xff")
        self.assertEqual(struct.unpack("!Q", frame[2:10])[0], 70000)
        self.assertEqual(unmask(frame[10:14], frame[14:]), payload)

    def test_client_close(self) -> None:
        """``88 82`` + mask + masked ``03 e8``."""
        stream = self.upgrade()
        stream.loseConnection()
        frame = self.wire.value()
        self.assertEqual(frame[:2], b"\x88\x82")
        self.assertEqual(unmask(frame[2:6], frame[6:]), b"\x03\xe8")
        self.proto.dataReceived(server_frame(8, b"\x03\xe8"))
        self.assertTrue(self.wire.disconnecting)
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        assert self.rec.reason is not None
        self.assertTrue(self.rec.reason.check(error.ConnectionDone))

    def test_text_frame_from_server_closes_with_1003(self) -> None:
        self.upgrade()
        self.proto.dataReceived(server_frame(1, b"hi"))
        frame = self.wire.value()
        self.assertEqual(frame[:2], b"\x88\x82")
        self.assertEqual(unmask(frame[2:6], frame[6:]), b"\x03\xeb")

    def test_ping_is_answered_with_a_masked_pong(self) -> None:
        self.upgrade()
        self.proto.dataReceived(server_frame(9, b"hb"))
        frame = self.wire.value()
        self.assertEqual(frame[:2], b"\x8a\x82")
        self.assertEqual(unmask(frame[2:6], frame[6:]), b"hb")

    def test_masked_server_frame_is_a_protocol_error(self) -> None:
        self.upgrade()
        self.proto.dataReceived(client_frame(2, b"masked"))
        frame = self.wire.value()
        self.assertEqual(unmask(frame[2:6], frame[6:]), b"\x03\xea")
        self.assertEqual(self.rec.chunks, [])

    def test_refusal_names_status_and_body(self) -> None:
        self.proto.dataReceived(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: 10\r\n\r\npool "
        )
        self.assertEqual(self.results, [])  # waits for the body
        self.proto.dataReceived(b"full\n")
        failure = self.results[0]
        self.assertIsInstance(failure, Failure)
        self.assertTrue(failure.check(WebSocketUpgradeError))
        self.assertEqual(str(failure.value), "503 pool full")
        self.assertEqual(failure.value.status, 503)
        self.assertTrue(self.wire.disconnected)
        self.assertIsNone(self.rec.reason)  # never attached

    def test_refusal_cut_short_or_without_body(self) -> None:
        self.proto.dataReceived(b"HTTP/1.1 404 Not Found\r\nContent-Length: 100\r\n\r\nnot fo")
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(str(self.results[0].value), "404 not fo")
        self.setUp()
        self.proto.dataReceived(b"HTTP/1.1 426 Upgrade Required\r\n\r\n")
        self.assertEqual(str(self.results[0].value), "426 Upgrade Required")

    def test_wrong_accept_is_refused(self) -> None:
        self.proto.dataReceived(GO_ANSWER.replace(ACCEPT.encode(), accept_value("AAAAAAAAAAAAAAAAAAAAAA==").encode()))
        self.assertTrue(self.results[0].check(WebSocketHandshakeError))
        self.assertIn("Accept", str(self.results[0].value))
        self.assertTrue(self.wire.disconnected)

    def test_101_without_upgrade_headers_is_refused(self) -> None:
        self.proto.dataReceived(GO_ANSWER.replace(b"Upgrade: websocket\r\n", b""))
        self.assertTrue(self.results[0].check(WebSocketHandshakeError))

    def test_garbage_answer(self) -> None:
        self.proto.dataReceived(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        self.assertTrue(self.results[0].check(WebSocketHandshakeError))
        self.setUp()
        self.proto.dataReceived(b"z" * 9000)
        self.assertTrue(self.results[0].check(WebSocketHandshakeError))

    def test_connection_closed_before_answer(self) -> None:
        self.proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(self.results[0].check(WebSocketHandshakeError))


# -- the frame reader ----------------------------------------------------------------


def any_frame(opcode: int, payload: bytes, key: Optional[bytes] = None, fin: bool = True, first: int = 0) -> bytes:
    """A frame of any length (the shortest length form), masked with
    ``key`` when given; ``first`` ORs bits (RSV) into the first byte."""
    size = len(payload)
    bit = 0x80 if key is not None else 0
    head = bytes([(0x80 if fin else 0) | first | opcode])
    if size <= 125:
        head += bytes([bit | size])
    elif size <= 0xFFFF:
        head += bytes([bit | 126]) + struct.pack("!H", size)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", size)
    if key is None:
        return head + payload
    return head + key + unmask(key, payload)


class FrameReaderTests(unittest.TestCase):
    """The pool's own data-frame reader (``WebSocketStreamTransport.feed``):
    frames split across reads at every byte, both directions (masked to the
    server, plain to the client), control frames between data frames,
    refused headers, closes in the middle of a frame, and a reader that
    pauses in the middle of one.  Every delivered piece belongs to one
    frame, and the bytes are exactly the payloads."""

    def setUp(self) -> None:
        self.clock = Clock()

    def stream(self, client: bool) -> tuple[WebSocketStreamTransport, Recorder, StringTransport]:
        wire = StringTransport()
        stream = WebSocketStreamTransport(wire, client=client, clock=self.clock)
        rec = Recorder()
        stream.attach(rec)
        return stream, rec, wire

    def mixed(self, client: bool) -> tuple[bytes, list[bytes], bytes]:
        """Frames as the peer of a ``client``-side stream sends them: data
        of every length form, an empty frame, a ping, and a message in
        three fragments with a pong between; returns the bytes, the
        payloads, and the pong our side answers the ping with."""
        key = None if client else b"\x9a\x0b\xc3\x7d"
        payloads = [b"a", bytes(range(126)) * 2, b"", b"x" * 125, os.urandom(300)]
        data = b"".join(any_frame(2, p, key) for p in payloads)
        data += any_frame(9, b"beat", key)
        data += any_frame(2, b"frag1", key, fin=False) + any_frame(10, b"", key)
        data += any_frame(0, b"frag-two", key, fin=False) + any_frame(0, b"3", key)
        payloads += [b"frag1", b"frag-two", b"3"]
        return data, [p for p in payloads if p], b"beat"

    def check_delivery(self, rec: Recorder, payloads: list[bytes]) -> None:
        """Pieces never span two frames: they regroup into the payloads."""
        got: list[bytes] = []
        want = list(payloads)
        piece = b""
        for chunk in rec.chunks:
            piece += chunk
            self.assertTrue(want[0].startswith(piece), (piece, want[0]))
            if piece == want[0]:
                got.append(piece)
                want.pop(0)
                piece = b""
        self.assertEqual(got, payloads)

    def pong_of(self, wire: StringTransport, client: bool) -> bytes:
        out = wire.value()
        if client:
            self.assertEqual(out[:2], b"\x8a\x84")
            return unmask(out[2:6], out[6:10])
        self.assertEqual(out[:2], b"\x8a\x04")
        return out[2:6]

    def every_split(self, client: bool) -> None:
        data, payloads, ping = self.mixed(client)
        for cut in range(len(data) + 1):
            stream, rec, wire = self.stream(client)
            stream.feed(data[:cut])
            stream.feed(memoryview(data)[cut:])  # (a view, as the fast paths hand over)
            self.check_delivery(rec, payloads)
            self.assertEqual(self.pong_of(wire, client), ping, cut)
            self.assertIsNone(rec.reason)

    def test_server_reads_masked_frames_split_anywhere(self) -> None:
        self.every_split(client=False)

    def test_client_reads_plain_frames_split_anywhere(self) -> None:
        self.every_split(client=True)

    def test_one_byte_at_a_time_and_in_three_pieces(self) -> None:
        for client in (False, True):
            data, payloads, ping = self.mixed(client)
            stream, rec, wire = self.stream(client)
            for i in range(len(data)):
                stream.feed(data[i : i + 1])
            self.check_delivery(rec, payloads)
            self.assertEqual(self.pong_of(wire, client), ping)
            for a in range(0, len(data), 37):
                for b in range(a, len(data), 53):
                    stream, rec, wire = self.stream(client)
                    for piece in (data[:a], data[a:b], data[b:]):
                        stream.feed(piece)
                    self.check_delivery(rec, payloads)

    def test_large_frames_split_around_their_headers(self) -> None:
        """64-bit lengths; every cut in and near the headers, and the mask
        key's rotation across cuts that are not a multiple of 4."""
        key = b"\x01\x80\xfe\x33"
        big, bigger = os.urandom(70000), os.urandom(65536)
        data = any_frame(2, big, key) + any_frame(2, bigger, key)
        second = len(any_frame(2, big, key))
        cuts = list(range(0, 20)) + list(range(second - 10, second + 20)) + [4099, 33333, 65537]
        for cut in cuts:
            stream, rec, wire = self.stream(client=False)
            stream.feed(data[:cut])
            stream.feed(data[cut:])
            self.check_delivery(rec, [big, bigger])

    def test_refused_headers_are_protocol_errors(self) -> None:
        """RSV bits, reserved opcodes, a fragmented or oversized control
        frame, lengths not in their shortest form, a 64-bit length with its
        top bit set, the wrong masking: Close 1002, nothing delivered, and
        nothing read after it."""
        key = b"\x11\x22\x33\x44"
        bad = [
            any_frame(2, b"rsv", key, first=0x40),
            any_frame(3, b"op3", key),
            any_frame(0xB, b"opB", key),
            any_frame(9, b"ping", key, fin=False),
            b"\x89\xfe\x00\x7e" + key + b"p" * 126,  # a ping of 126 bytes
            b"\x82\xfe\x00\x05" + key + b"short",  # 16 bits for 5 bytes
            b"\x82\xff" + struct.pack("!Q", 1000) + key,  # 64 bits for 1000 bytes
            b"\x82\xff" + struct.pack("!Q", 1 << 63) + key,  # top bit set
            b"\x82\xff" + struct.pack("!Q", (1 << 64) - 1) + key,
            any_frame(2, b"unmasked"),
        ]
        for frame in bad:
            for pieces in ([frame], [frame[:1], frame[1:]], [frame[:3], frame[3:]]):
                stream, rec, wire = self.stream(client=False)
                for piece in pieces:
                    stream.feed(piece + b"" if piece is not pieces[-1] else piece + any_frame(2, b"after", key))
                self.assertEqual(wire.value(), bytes.fromhex("880203ea"), frame)
                self.assertEqual(rec.chunks, [], frame)
                stream.feed(any_frame(2, b"later", key) + any_frame(8, b"\x03\xe8", key))
                self.assertEqual(rec.chunks, [], frame)
                self.clock.advance(2 * CLOSE_TIMEOUT)  # no Close answer is read: the timers close it
                self.assertTrue(wire.disconnecting)
                stream.underlying_lost(Failure(error.ConnectionLost()))
                assert rec.reason is not None
                self.assertTrue(rec.reason.check(error.ConnectionLost), frame)
                self.assertIn("protocol error", rec.reason.getErrorMessage())

    def test_continuations_out_of_order_are_protocol_errors(self) -> None:
        key = b"\x11\x22\x33\x44"
        for data, words in (
            (any_frame(0, b"orphan", key), "unexpected CONTINUATION"),
            (any_frame(2, b"one", key, fin=False) + any_frame(2, b"two", key), "expected CONTINUATION"),
            (any_frame(2, b"one", key, fin=False) + any_frame(1, b"two", key), "expected CONTINUATION"),
        ):
            stream, rec, wire = self.stream(client=False)
            stream.feed(data)
            self.assertEqual(wire.value(), bytes.fromhex("880203ea"))
            self.assertEqual(b"".join(rec.chunks), b"" if words.startswith("unexpected") else b"one")
            self.clock.advance(2 * CLOSE_TIMEOUT)
            stream.underlying_lost(Failure(error.ConnectionLost()))
            assert rec.reason is not None
            self.assertIn(words, rec.reason.getErrorMessage())

    def test_text_message_in_fragments_is_refused_and_skipped(self) -> None:
        """A text message (1003) is skipped, fragments too; the peer's Close
        after it is still read and ends the connection."""
        key = b"\x05\x06\x07\x08"
        stream, rec, wire = self.stream(client=False)
        data = any_frame(1, b"t" * 200, key, fin=False) + any_frame(0, b"u", key) + any_frame(2, b"bin", key)
        stream.feed(data + any_frame(8, b"\x03\xeb", key))
        self.assertEqual(wire.value(), bytes.fromhex("880203eb"))
        self.assertEqual(rec.chunks, [])
        self.assertTrue(wire.disconnecting)  # the close handshake is done

    def test_control_frames_split_and_between_data(self) -> None:
        """A ping split inside its header and its payload, between two
        pieces of one data frame's read; a close with a reason."""
        key = b"\xaa\xbb\xcc\xdd"
        stream, rec, wire = self.stream(client=False)
        ping = any_frame(9, b"0123456789", key)
        stream.feed(any_frame(2, b"before", key) + ping[:1])
        stream.feed(ping[1:7])
        self.assertEqual(wire.value(), b"")
        stream.feed(ping[7:] + any_frame(2, b"after", key))
        self.assertEqual(wire.value(), b"\x8a\x0a0123456789")
        self.assertEqual(rec.chunks, [b"before", b"after"])
        wire.clear()
        close = any_frame(8, b"\x03\xe8bye", key)
        stream.feed(close[:5])
        stream.feed(close[5:])
        self.assertEqual(wire.value(), b"\x88\x05\x03\xe8bye")  # echoed, as wsproto answers
        self.assertEqual(stream.peer_close_code, 1000)
        self.assertTrue(wire.disconnecting)

    def test_connection_lost_in_the_middle_of_a_frame(self) -> None:
        for client in (False, True):
            key = None if client else b"\x01\x02\x03\x04"
            stream, rec, wire = self.stream(client)
            frame = any_frame(2, b"z" * 1000, key)
            stream.feed(frame[:600])
            stream.underlying_lost(Failure(error.ConnectionLost("gone")))
            self.assertEqual(b"".join(rec.chunks), b"z" * (600 - len(frame) + 1000))
            assert rec.reason is not None
            self.assertTrue(rec.reason.check(error.ConnectionLost))
            stream.feed(frame[600:])  # late bytes: nothing happens
            self.assertEqual(len(b"".join(rec.chunks)), 600 - len(frame) + 1000)

    def test_our_close_in_the_middle_of_a_peer_frame(self) -> None:
        """We close while a peer frame is half read: the rest of it and what
        follows are discarded, the peer's Close completes the handshake."""
        key = b"\x01\x02\x03\x04"
        stream, rec, wire = self.stream(client=False)
        frame = any_frame(2, b"q" * 500, key)
        stream.feed(frame[:100])
        stream.loseConnection()
        self.assertEqual(wire.value(), bytes.fromhex("880203e8"))
        stream.feed(frame[100:] + any_frame(2, b"more", key) + any_frame(8, b"\x03\xe8", key))
        self.assertEqual(b"".join(rec.chunks), b"q" * (100 - 8))
        self.assertTrue(wire.disconnecting)
        stream.underlying_lost(Failure(error.ConnectionDone()))
        assert rec.reason is not None
        self.assertTrue(rec.reason.check(error.ConnectionDone))

    def test_pause_in_the_middle_of_a_frame(self) -> None:
        """A reader that pauses inside a read: the socket is paused, the rest
        of the read waits (the mask key rotated right), and arrives on
        resume; bytes fed meanwhile come after it."""
        key = b"\x10\x20\x30\x40"
        payload = os.urandom(1001)
        frame = any_frame(2, payload, key) + any_frame(2, b"next", key)
        stream, rec, wire = self.stream(client=False)
        orig = rec.dataReceived

        def pause_once(data: bytes) -> None:
            orig(data)
            if len(rec.chunks) == 1:
                stream.pauseProducing()

        rec.dataReceived = pause_once  # type: ignore[method-assign]
        stream.feed(frame[:503])
        self.assertEqual(rec.chunks, [payload[: 503 - 8]])
        self.assertEqual(wire.producerState, "paused")
        stream.feed(frame[503:700])  # (one read already under way)
        stream.feed(frame[700:])
        self.assertEqual(len(rec.chunks), 1)
        stream.resumeProducing()
        self.assertEqual(wire.producerState, "producing")
        self.check_delivery(rec, [payload, b"next"])

    def test_empty_frames_and_control_frames_only(self) -> None:
        stream, rec, wire = self.stream(client=True)
        stream.feed(any_frame(2, b"") * 3 + any_frame(10, b"pong") + any_frame(9, b""))
        self.assertEqual(rec.chunks, [])
        self.assertEqual(wire.value()[:2], b"\x8a\x80")  # an empty masked pong
        self.assertIsNone(rec.reason)


# -- end to end ------------------------------------------------------------------------


@implementer(IPushProducer)
class Pump:
    """Writes ``chunk``-sized messages for as long as its consumer lets it:
    the registered producer of a stream."""

    def __init__(self, transport: Any, chunk: int = 64 * 1024):
        self.transport = transport
        self.block = os.urandom(chunk)
        self.paused = False
        self.stopped = False
        self.written = 0
        self._call: Any = None

    def start(self) -> None:
        self.transport.registerProducer(self, True)
        self._schedule()

    def _schedule(self) -> None:
        if self._call is None and not self.paused and not self.stopped:
            self._call = reactor.callLater(0, self._run)

    def _run(self) -> None:
        self._call = None
        for _ in range(16):
            if self.paused or self.stopped:
                return
            self.transport.write(self.block)
            self.written += len(self.block)
        self._schedule()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._schedule()

    def stopProducing(self) -> None:
        self.stopped = True
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


class _TLSFirst(Protocol):
    """What the tunnel port does for tls >= 1: startTLS on the accepted TCP
    connection, then hand it to the WebSocket protocol."""

    def __init__(self, inner: WebSocketUpgradeProtocol, context: Any):
        self.inner = inner
        self.context = context

    def connectionMade(self) -> None:
        self.transport.startTLS(self.context)
        self.inner.makeConnection(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.inner.dataReceived(data)

    def connectionLost(self, reason: Failure = error.ConnectionDone()) -> None:  # type: ignore[assignment]
        self.inner.connectionLost(reason)


class WsServer(Factory):
    """A WebSocket pool server on 127.0.0.1: ``make()`` builds the protocol
    attached to each accepted stream."""

    noisy = False

    def __init__(self, make: Callable[[], Protocol], credentials: Optional[ServerCredentials] = None, clock: Any = None):
        self.make = make
        self.credentials = credentials
        self.clock = clock or reactor
        self.full = False
        self.streams: list[WebSocketStreamTransport] = []
        self.protocols: list[Any] = []
        self.upgraders: list[WebSocketUpgradeProtocol] = []
        self.port = reactor.listenTCP(0, self, interface="127.0.0.1")

    def buildProtocol(self, addr: Any) -> Protocol:
        inner = WebSocketUpgradeProtocol(self.clock, NodeLog("none"), self.on_stream, lambda: self.full)
        self.upgraders.append(inner)
        if self.credentials is not None:
            return _TLSFirst(inner, self.credentials.context_factory())
        return inner

    def on_stream(self, stream: WebSocketStreamTransport) -> None:
        proto = self.make()
        self.streams.append(stream)
        self.protocols.append(proto)
        stream.attach(proto)

    @property
    def number(self) -> int:
        return self.port.getHost().port


class EndToEnd(unittest.TestCase):
    """Real sockets; ``tls`` selects plain ``ws://`` or TLS with a fresh
    self-signed certificate (the server does startTLS as the tunnel port
    does)."""

    tls = False
    timeout = 120

    def setUp(self) -> None:
        self.creds: Optional[ServerCredentials] = None
        if self.tls:
            self.creds = ServerCredentials.from_config(1, "", "", NodeLog("none"), 3600, reactor)
        self.client_streams: list[WebSocketStreamTransport] = []
        self.client_protocols: list[Any] = []
        self.servers: list[WsServer] = []
        self.addCleanup(self._teardown)

    def serve(self, make: Callable[[], Protocol] = Client, clock: Any = None) -> WsServer:
        server = WsServer(make, self.creds, clock)
        self.servers.append(server)
        return server

    def pool(self, server: WsServer) -> WebSocketPoolClient:
        ctx = client_context_factory(1, "localhost") if self.tls else None
        return WebSocketPoolClient(reactor, NodeLog("none"), "127.0.0.1", server.number, "localhost", ctx, 5.0)

    async def open(self, server: WsServer, proto: Any = None) -> tuple[WebSocketStreamTransport, Any]:
        proto = proto if proto is not None else Client()
        self.client_protocols.append(proto)
        stream = await self.pool(server).open_stream(proto)
        self.client_streams.append(stream)
        return stream, proto

    async def _teardown(self) -> None:
        streams = self.client_streams + [s for srv in self.servers for s in srv.streams]
        for s in streams:
            if s.connected:
                s.abortConnection()
        await wait_for(lambda: not any(s.connected for s in streams), timeout=10, what="streams closed")
        for srv in self.servers:
            for up in srv.upgraders:
                if up.stream is None and up.transport is not None and up.transport.connected:
                    up.transport.abortConnection()
            await defer.maybeDeferred(srv.port.stopListening)
        await wait_for(
            lambda: all(up.transport is None or not up.transport.connected for srv in self.servers for up in srv.upgraders),
            timeout=10,
            what="upgrade connections closed",
        )
        await sleep(0.01)  # let aborted TLS connections finish their turn

    async def server_side(self, server: WsServer, n: int = 1) -> Any:
        await wait_for(lambda: len(server.protocols) >= n, what="server stream")
        return server.protocols[n - 1]

    # -- tests --------------------------------------------------------------------
    async def test_many_streams_with_ids(self) -> None:
        """50 concurrent streams: each gets its 4-byte ID as the server's
        first message, then echoes."""

        class IdEcho(Protocol):
            def connectionMade(self) -> None:
                self.transport.write(os.urandom(4))

            def dataReceived(self, data: bytes) -> None:
                self.transport.write(data)

        server = self.serve(IdEcho)
        opened = await defer.gatherResults([defer.ensureDeferred(self.open(server)) for _ in range(50)])
        for i, (stream, proto) in enumerate(opened):
            await proto.wait_bytes(4)
            stream.write(b"ping %d" % i)
        for i, (stream, proto) in enumerate(opened):
            data = await proto.wait_bytes(4 + len(b"ping %d" % i))
            self.assertEqual(data[4:], b"ping %d" % i)
        self.assertEqual(len(server.streams), 50)

    async def test_frames_take_the_fast_paths(self) -> None:
        """Both ends read and write frames on the socket itself (``ws://``)
        or through the fast TLS data path (``wss://``), and a message and
        a 3 MiB transfer go through it intact."""
        server = self.serve(HashingClient)
        stream, proto = await self.open(server, HashingClient())
        far = await self.server_side(server)
        want = "tls" if self.tls else "plain"
        self.assertEqual((stream.fast_path, server.streams[0].fast_path), (want, want))
        # The kernel's receive buffer is fixed (no autotuning to tens of MiB
        # behind a stalled stream): Linux reports twice what was set.
        import socket

        from nodepass.compat.twisted_tls import below_tls, tls_layer
        from nodepass.pools.ws import SOCKET_RECEIVE_BUFFER

        for s in (stream, server.streams[0]):
            layer = tls_layer(s.underlying)
            conn = below_tls(s.underlying, layer)[0] if layer is not None else s.underlying
            size = conn.socket.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            self.assertIn(size, (SOCKET_RECEIVE_BUFFER, 2 * SOCKET_RECEIVE_BUFFER))
        payload = os.urandom(3 * MiB)
        for i in range(0, len(payload), 256 * 1024):
            stream.write(memoryview(payload)[i : i + 256 * 1024])
        self.assertEqual(await far.wait_bytes(len(payload), timeout=60), hashlib.sha256(payload).hexdigest())
        server.streams[0].write(b"back")
        self.assertEqual(await proto.wait_bytes(4), hashlib.sha256(b"back").hexdigest())

    async def test_large_transfer_both_ways(self) -> None:
        """6 MiB each way at once, in relay-sized writes, checked by SHA-256."""
        size = 6 * MiB
        up, down = os.urandom(size), os.urandom(size)

        class Both(HashingClient):
            def connectionMade(self) -> None:
                for i in range(0, size, 256 * 1024):
                    self.transport.write(down[i : i + 256 * 1024])

        server = self.serve(Both)
        stream, proto = await self.open(server, HashingClient())
        for i in range(0, size, 100_000):
            stream.write(up[i : i + 100_000])
        far = await self.server_side(server)
        got_down = await proto.wait_bytes(size, timeout=60)
        got_up = await far.wait_bytes(size, timeout=60)
        self.assertEqual(got_down, hashlib.sha256(down).hexdigest())
        self.assertEqual(got_up, hashlib.sha256(up).hexdigest())

    async def test_message_boundaries_preserved(self) -> None:
        """Three small writes arrive as three dataReceived calls, both ways
        (UDP datagrams ride on this)."""
        server = self.serve(Recorder)
        stream, proto = await self.open(server, Client())
        stream.write(b"alpha")
        stream.write(b"be")
        stream.write(b"gamma!")
        far = await self.server_side(server)
        await wait_for(lambda: len(far.chunks) >= 3)
        self.assertEqual(far.chunks, [b"alpha", b"be", b"gamma!"])
        for d in (b"x" * 1000, b"y", b"z" * 70000):
            server.streams[0].write(d)
        await proto.wait_bytes(71001)
        self.assertEqual(proto.chunks[:2], [b"x" * 1000, b"y"])
        self.assertEqual(b"".join(proto.chunks[2:]), b"z" * 70000)

    async def _flow_control(self, reader: Any, writer: Any, reader_stream: Any, writer_stream: Any) -> None:
        reader_stream.pauseProducing()
        pump = Pump(writer_stream)
        pump.start()
        await wait_for(lambda: pump.paused, timeout=20, what="writer pushed back")
        await sleep(0.5)
        written = pump.written
        await sleep(0.5)
        self.assertLess(pump.written - written, 4 * MiB)
        self.assertLess(pump.written, 32 * MiB)
        self.assertLess(reader.received, 1 * MiB)  # at most one socket read was taken
        if not self.tls:
            self.assertLessEqual(queued_bytes(writer_stream.underlying), 2 * MiB)
        reader_stream.resumeProducing()
        await reader.wait_bytes(pump.written + 1, timeout=30)  # it flows again
        self.assertFalse(pump.stopped)
        writer_stream.unregisterProducer()
        pump.stopProducing()

    async def test_flow_control_client_to_server(self) -> None:
        server = self.serve(HashingClient)
        stream, _ = await self.open(server)
        far = await self.server_side(server)
        await self._flow_control(far, None, server.streams[0], stream)

    async def test_flow_control_server_to_client(self) -> None:
        server = self.serve(HashingClient)
        stream, proto = await self.open(server, HashingClient())
        await self.server_side(server)
        await self._flow_control(proto, None, stream, server.streams[0])

    async def test_writer_producer_stopped_when_the_stream_is_lost(self) -> None:
        server = self.serve(Client)
        stream, _ = await self.open(server)
        await self.server_side(server)
        pump = Pump(stream)
        pump.start()
        server.streams[0].abortConnection()
        await wait_for(lambda: pump.stopped, what="producer stopped")

    async def _close_reaches_the_other_side(self, from_client: bool) -> None:
        server = self.serve(Client)
        stream, proto = await self.open(server)
        far = await self.server_side(server)
        closer, closer_proto, other_proto = (stream, proto, far) if from_client else (server.streams[0], far, proto)
        closer.write(b"bye")
        started = reactor.seconds()
        closer.loseConnection()
        await other_proto.lost
        await closer_proto.lost
        self.assertLess(reactor.seconds() - started, CLOSE_TIMEOUT - 1)  # the close handshake, not a timer
        self.assertEqual(other_proto.data(), b"bye")
        self.assertFalse(stream.connected or server.streams[0].connected)

    async def test_close_from_client(self) -> None:
        await self._close_reaches_the_other_side(True)

    async def test_close_from_server(self) -> None:
        await self._close_reaches_the_other_side(False)

    async def test_reasons_on_close(self) -> None:
        server = self.serve(Recorder)
        stream, proto = await self.open(server, Recorder())
        far = await self.server_side(server)
        stream.loseConnection()
        await wait_for(lambda: far.reason is not None and proto.reason is not None)
        self.assertTrue(far.reason.check(error.ConnectionDone))
        self.assertTrue(proto.reason.check(error.ConnectionDone))
        self.assertEqual(server.streams[0].peer_close_code, 1000)

    async def test_pool_full_refusal(self) -> None:
        server = self.serve()
        server.full = True
        with self.assertRaises(WebSocketUpgradeError) as cm:
            await self.open(server)
        self.assertEqual(str(cm.exception), "503 pool full")
        self.assertEqual(cm.exception.status, 503)
        server.full = False
        stream, _ = await self.open(server)  # the listener goes on
        self.assertTrue(stream.connected)

    async def test_handshake_timeout(self) -> None:
        """A server that accepts and never answers: the dial gives up."""
        server = self.serve()
        pool = self.pool(server)
        pool.handshake_timeout = 0.5
        orig = server.buildProtocol

        def mute(addr: Any) -> Protocol:
            p = orig(addr)
            p.dataReceived = lambda data: None  # type: ignore[method-assign]
            return p

        server.buildProtocol = mute  # type: ignore[method-assign]
        with self.assertRaises(WebSocketHandshakeTimeout):
            await pool.open_stream(Client())

    async def test_connection_refused(self) -> None:
        server = self.serve()
        pool = self.pool(server)
        await server.port.stopListening()
        with self.assertRaises(error.ConnectError):
            await pool.open_stream(Client())

    async def test_cancel_a_dial(self) -> None:
        server = self.serve()
        server.buildProtocol = lambda addr: Protocol()  # type: ignore[method-assign]
        d = self.pool(server).open_stream(Client())
        await sleep(0.1)
        d.cancel()
        with self.assertRaises(Exception):
            await d

    async def test_pool_close_drops_dials_in_progress(self) -> None:
        server = self.serve()
        server.buildProtocol = lambda addr: Protocol()  # type: ignore[method-assign]
        pool = self.pool(server)
        d = pool.open_stream(Client())
        await sleep(0.1)
        pool.close()
        with self.assertRaises(Exception) as cm:
            await d
        self.assertIn("closed", str(cm.exception))
        with self.assertRaises(Exception):
            await pool.open_stream(Client())

    async def test_dials_leave_no_bookkeeping_behind(self) -> None:
        """The pool client's bookkeeping (dials in progress, their
        deadlines), settled by the protocol just before ``done`` fires: gone
        after an upgrade, a cancelled dial, a closed pool and a refused
        dial."""
        server = self.serve()
        pool = self.pool(server)

        def clean() -> None:
            self.assertEqual(pool._dialling, {})
            self.assertEqual(list(pool._due._due), [])

        proto = Client()
        self.client_protocols.append(proto)
        self.client_streams.append(await pool.open_stream(proto))
        clean()
        d = pool.open_stream(Client())
        d.cancel()
        with self.assertRaises(Exception):
            await d
        clean()
        d = pool.open_stream(Client())
        pool.close()
        with self.assertRaises(Exception):
            await d
        clean()
        pool = self.pool(server)
        await server.port.stopListening()
        with self.assertRaises(error.ConnectError):
            await pool.open_stream(Client())
        clean()

    async def test_garbage_client_is_answered_and_others_unaffected(self) -> None:
        server = self.serve(Client)
        stream, proto = await self.open(server)
        raw = await connect(server.number)
        raw.transport.write(b"\x00\x01garbage\xff\r\n\r\n" + os.urandom(1000))
        await raw.lost
        if not self.tls:
            self.assertTrue(raw.data().startswith(b"HTTP/1.1 400 Bad Request"), raw.data())
        stream.write(b"still fine")
        far = await self.server_side(server)
        self.assertEqual(await far.wait_bytes(10), b"still fine")

    async def test_slow_loris_dropped_by_the_header_timer(self) -> None:
        """A real socket whose request head never ends is dropped when the
        (fake) clock passes 10 s; nothing is answered."""
        clock = Clock()
        server = self.serve(Client, clock=clock)
        raw = await connect(server.number)
        if self.tls:
            raw.transport.write(b"\x16\x03\x01")  # a TLS record that never completes
        else:
            raw.transport.write(GO_REQUEST[:-2])
        await wait_for(lambda: server.upgraders and server.upgraders[0].transport is not None)
        await sleep(0.1)
        clock.advance(HEADER_TIMEOUT - 0.1)
        await sleep(0.1)
        self.assertFalse(raw.lost.called)
        clock.advance(0.2)
        await raw.lost
        self.assertEqual(raw.data(), b"")
        self.assertEqual(server.streams, [])

    async def test_relay_over_the_stream(self) -> None:
        """The relay core on the server side, between the stream and a TCP
        echo target: 2 MiB round-trip intact; closing the user end closes
        the relay."""
        echo, _ = listen_echo()
        self.addCleanup(echo.stopListening)
        closed: Deferred[None] = Deferred()
        relays: list[Relay] = []

        def make_tunnel_end() -> Protocol:
            end = RelayEnd()
            orig = end.connectionMade

            def made() -> None:
                orig()
                end.hold()
                d = connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", echo.getHost().port), RelayEnd())

                def spliced(target: RelayEnd) -> None:
                    relay = Relay(target, end, InstanceStats(), reactor, on_close=lambda: closed.callback(None))
                    relays.append(relay)
                    relay.start()

                d.addCallback(spliced)

            end.connectionMade = made  # type: ignore[method-assign]
            return end

        server = self.serve(make_tunnel_end)
        stream, proto = await self.open(server, HashingClient())
        payload = os.urandom(2 * MiB)
        for i in range(0, len(payload), 32 * 1024):
            stream.write(payload[i : i + 32 * 1024])
        digest = await proto.wait_bytes(len(payload), timeout=60)
        self.assertEqual(digest, hashlib.sha256(payload).hexdigest())
        self.assertEqual(relays[0].stats.tcp_tx, len(payload))
        stream.loseConnection()
        await closed
        await proto.lost


class EndToEndTLS(EndToEnd):
    tls = True

    async def test_close_starts_the_tls_shutdown_at_once(self) -> None:
        """Closing sends our Close and starts the TLS shutdown in the same
        turn (no wait for the peer's Close first); the peer still answers
        the Close, and both ends see a clean close well before any timer."""
        server = self.serve(Recorder)
        stream, proto = await self.open(server, Recorder())
        far = await self.server_side(server)
        started = reactor.seconds()
        server.streams[0].loseConnection()
        tls = server.streams[0]._tls
        assert tls is not None
        self.assertTrue(tls.disconnecting)  # close_notify on its way, right behind the Close
        await wait_for(lambda: far.reason is not None and proto.reason is not None)
        self.assertLess(reactor.seconds() - started, CLOSE_TIMEOUT - 1)
        self.assertTrue(far.reason.check(error.ConnectionDone))
        self.assertTrue(proto.reason.check(error.ConnectionDone))
        self.assertEqual(stream.peer_close_code, 1000)
        self.assertEqual(server.streams[0].peer_close_code, 1000)  # the answer was read

    async def test_certificates_for_the_fingerprint_check(self) -> None:
        """The client reads the server's certificate from its stream (the
        ``verify`` fingerprint, SPEC-1.14 §3.5); the server its own."""
        assert self.creds is not None
        server = self.serve(Client)
        stream, _ = await self.open(server)
        self.assertEqual(peer_certificate_fingerprint(stream), self.creds.fingerprint)
        self.assertEqual(fingerprint(stream.getPeerCertificate()), self.creds.fingerprint)
        await self.server_side(server)
        self.assertEqual(host_certificate_fingerprint(server.streams[0]), self.creds.fingerprint)
        self.assertIsNotNone(server.streams[0].getHandle().get_certificate())

    async def test_later_connections_resume_the_tls_session(self) -> None:
        """The first pool connection's TLS session is resumed by the next
        ones (no certificate exchange: cheaper dials, as in the TCP pool),
        and they still show the server's certificate."""
        from nodepass.compat.openssl_internals import session_reused

        assert self.creds is not None
        server = self.serve(Client)
        pool = self.pool(server)
        first = await pool.open_stream(Client())
        self.client_streams.append(first)
        self.assertFalse(session_reused(first.getHandle()))
        for _ in range(3):
            stream = await pool.open_stream(Client())
            self.client_streams.append(stream)
            self.assertTrue(session_reused(stream.getHandle()))
            self.assertEqual(peer_certificate_fingerprint(stream), self.creds.fingerprint)
            self.assertEqual(stream.fast_path, "tls")
        assert pool.tls is not None
        self.assertIsNotNone(pool.tls.session)

    async def test_tls2_verifies_the_tunnel_host(self) -> None:
        """tls=2 verifies against the tunnel host (trusting the test CA)."""
        from tests.test_tunnel import make_ca, make_leaf

        directory = self.mktemp()
        os.makedirs(directory)
        ca_path, ca, ca_key = make_ca(directory)
        crt, key = make_leaf(directory, ca, ca_key, "localhost")
        with open(ca_path, "rb") as f:
            ca_pem = f.read()
        self.creds = ServerCredentials.from_config(2, crt, key, NodeLog("none"), 3600, reactor)
        server = self.serve(Client)
        ok = WebSocketPoolClient(
            reactor,
            NodeLog("none"),
            "127.0.0.1",
            server.number,
            "localhost",
            client_context_factory(2, "localhost", trust_roots=ca_pem),
        )
        proto = Client()
        stream = await ok.open_stream(proto)
        self.client_streams.append(stream)
        self.assertEqual(peer_certificate_fingerprint(stream), self.creds.fingerprint)
        wrong = WebSocketPoolClient(
            reactor,
            NodeLog("none"),
            "127.0.0.1",
            server.number,
            "other.example",
            client_context_factory(2, "other.example", trust_roots=ca_pem),
        )
        with self.assertRaises(Exception) as cm:
            await wrong.open_stream(Client())
        self.assertNotIsInstance(cm.exception, WebSocketUpgradeError)


class CountingTransport(StringTransport):
    """A StringTransport that keeps each write apart."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        super().write(data)


class LeanPathTests(unittest.TestCase):
    """What the connection-rate work (issue 12) changed, byte for byte: the
    101 and the ID in one write, the canonical request read in one pass,
    control frames handled without wsproto, timeouts behind one timer."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.seen: list[dict[str, list[str]]] = []
        self.streams: list[WebSocketStreamTransport] = []

    def serve(self, wire: StringTransport, write_id: bool = True) -> WebSocketUpgradeProtocol:
        def on_stream(stream: WebSocketStreamTransport) -> None:
            self.streams.append(stream)
            stream.attach(Recorder())
            if write_id:
                stream.write(b"\x00\x00\x00\x00")

        def authorize(headers: dict[str, list[str]]) -> bool:
            self.seen.append(headers)
            return True

        proto = WebSocketUpgradeProtocol(self.clock, NodeLog("none"), on_stream, lambda: False, authorize=authorize)
        proto.makeConnection(wire)
        return proto

    def test_101_and_the_id_go_in_one_write(self) -> None:
        wire = CountingTransport()
        self.serve(wire).dataReceived(GO_REQUEST)
        self.assertEqual(wire.writes, [GO_ANSWER + bytes.fromhex("820400000000")])

    def test_101_alone_when_nothing_is_written(self) -> None:
        wire = CountingTransport()
        self.serve(wire, write_id=False).dataReceived(GO_REQUEST)
        self.assertEqual(wire.writes, [GO_ANSWER])
        self.streams[0].write(b"x" * 20000)
        self.assertEqual(wire.writes[1:], [b"\x82\x7e\x4e\x20" + b"x" * 20000])

    def test_canonical_and_general_requests_decide_the_same(self) -> None:
        """Go's request, ours with Authorization, and the same requests in
        spellings the one-match path does not take (header case, spacing,
        order): the same answer and the same headers for ``authorize``."""
        ours = upgrade_request("tunnel.example", KEY, "tok")
        variants = [
            (GO_REQUEST, GO_REQUEST.replace(b"Upgrade: websocket", b"upgrade:   websocket")),
            (ours, ours.replace(b"Authorization: Bearer tok", b"AUTHORIZATION:Bearer tok")),
            (GO_REQUEST.replace(b"GET / ", b"GET /x?y=1 "), GO_REQUEST.replace(b"GET / ", b"GET /x?y=1 ").replace(
                b"Accept-Encoding: gzip\r\n", b"").replace(b"Host:", b"Accept-Encoding: gzip\r\nHost:")),
        ]
        for fast, general in variants:
            answers = []
            for data in (fast, general):
                wire = CountingTransport()
                self.serve(wire).dataReceived(data)
                answers.append(wire.value())
            self.assertEqual(answers[0], answers[1])
            self.assertTrue(answers[0].startswith(GO_ANSWER))
            self.assertEqual(self.seen[-2], self.seen[-1])
        self.assertEqual(self.seen[2]["authorization"], ["Bearer tok"])

    def test_close_payloads_are_judged_as_wsproto_judges_them(self) -> None:
        """Every kind of Close payload a peer may send: answered (echoed,
        ``88 00`` for none) when wsproto accepts it, else closed with the
        status wsproto names (1007, invalid UTF-8, refused with 1003 as Go
        does)."""
        from wsproto.connection import Connection, ConnectionType
        from wsproto.events import CloseConnection

        key = b"\x01\x02\x03\x04"
        payloads = [b"", b"\x03", struct.pack("!H", 999), b"\x03\xe8", b"\x03\xe9bye", b"\x03\xec", b"\x03\xed",
                    b"\x03\xee", b"\x03\xf7", b"\x0b\xb7", b"\x0b\xb8", b"\x13\x87ok", b"\x13\x88",
                    b"\x03\xe8\xff\xfe", b"\x03\xf3"]
        for payload in payloads:
            frame = any_frame(8, payload, key)
            probe = Connection(ConnectionType.SERVER)
            probe.receive_data(frame)
            event = next(e for e in probe.events() if isinstance(e, CloseConnection))
            valid = probe.state.name == "REMOTE_CLOSING"
            stream, rec, wire = FrameReaderTests.stream(self, client=False)  # type: ignore[arg-type]
            stream.feed(frame)
            if valid:
                self.assertEqual(wire.value(), bytes(probe.send(event.response())), payload)
                self.assertEqual(stream.peer_close_code, event.code, payload)
            else:
                code = 1003 if event.code == 1007 else event.code
                self.assertEqual(wire.value(), b"\x88\x02" + struct.pack("!H", code), payload)
                self.assertIsNone(stream.peer_close_code, payload)
                self.assertIn(str(event.reason)[:20], str(stream._reason), payload)
            self.assertTrue(wire.disconnecting or not valid, payload)

    def test_client_masks_are_fresh_and_keys_unique(self) -> None:
        stream, _rec, wire = FrameReaderTests.stream(self, client=True)  # type: ignore[arg-type]
        masks = set()
        for _ in range(300):
            wire.clear()
            stream.write(b"abcd")
            frame = wire.value()
            masks.add(frame[2:6])
            self.assertEqual(unmask(frame[2:6], frame[6:]), b"abcd")
        self.assertGreater(len(masks), 295)
        keys = {new_key() for _ in range(300)}
        self.assertEqual(len(keys), 300)
        self.assertTrue(all(len(base64.b64decode(k)) == 16 for k in keys))

    def test_deadlines_fire_each_entry_at_its_own_time(self) -> None:
        clock = Clock()
        due = Deadlines(clock, 5.0)
        fired: list[str] = []
        due.add("a", lambda: fired.append("a"))
        clock.advance(1)
        due.add("b", lambda: fired.append("b"))
        due.add("c", lambda: fired.append("c"))
        clock.advance(1)
        due.discard("b")
        due.add("a", lambda: fired.append("a2"))  # again: now after c
        self.assertEqual(len(clock.getDelayedCalls()), 1)  # one timer for all
        clock.advance(3)  # t=5: a's first deadline is gone
        self.assertEqual(fired, [])
        clock.advance(1)  # t=6: c
        self.assertEqual(fired, ["c"])
        clock.advance(0.99)
        self.assertEqual(fired, ["c"])
        clock.advance(0.01)  # t=7: a (added again at t=2)
        self.assertEqual(fired, ["c", "a2"])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_deadlines_hold_no_timer_when_empty(self) -> None:
        clock = Clock()
        due = Deadlines(clock, 5.0)
        due.add("a", lambda: None)
        due.discard("a")
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertNotIn("a", due)

    def test_deadlines_are_shared_per_clock_and_length(self) -> None:
        """Streams and upgrades of one clock share one timer per length; a
        new clock (a test's Clock, whose id may be an old one's) gets its
        own."""
        clock = Clock()
        self.assertIs(deadlines(clock, 5.0), deadlines(clock, 5.0))
        self.assertIsNot(deadlines(clock, 5.0), deadlines(clock, 10.0))
        for _ in range(3):
            other = Clock()
            fired: list[int] = []
            deadlines(other, 5.0).add("x", lambda: fired.append(1))
            other.advance(5.0)
            self.assertEqual(fired, [1])
            del other



# -- the connection-rate fast paths ------------------------------------------------


def _mutations(rng: Any, base: bytes, alphabet: bytes, count: int) -> list[bytes]:
    """``count`` copies of ``base``, each with one to three bytes changed,
    inserted or deleted at random places (``rng``: a seeded Random)."""
    out = []
    for _ in range(count):
        data = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            op, pos = rng.random(), rng.randint(0, len(data))
            if op < 0.4 and pos < len(data):
                data[pos] = rng.choice(alphabet)
            elif op < 0.7:
                data[pos:pos] = bytes([rng.choice(alphabet)])
            elif pos < len(data):
                del data[pos : pos + rng.randint(1, 3)]
        out.append(bytes(data))
    return out


def _frames_out(data: bytes) -> list[tuple[int, bytes]]:
    """Our side's frames as ``(first byte, unmasked payload)`` (short
    frames only: closes, pongs and the small test messages)."""
    frames = []
    pos = 0
    while pos < len(data):
        b0, b1 = data[pos], data[pos + 1]
        size = b1 & 0x7F
        assert size < 126
        if b1 & 0x80:
            key = data[pos + 2 : pos + 6]
            frames.append((b0, unmask(key, data[pos + 6 : pos + 6 + size])))
            pos += 6 + size
        else:
            frames.append((b0, data[pos + 2 : pos + 2 + size]))
            pos += 2 + size
    return frames


class FastPathTests(unittest.TestCase):
    """The shortcuts that cut the Python work of opening and closing a
    WebSocket pool connection (docs/benchmarks.md, run V) decide exactly as
    the general paths they bypass, on the same inputs (seeded, so a failure reproduces): the
    upgrade request read without the regular expression, our ``101`` read
    by comparison, whole frames taken at once by ``_consume``, and the frames and answers written (bytes equal to
    wsproto's and to the general path's)."""

    def setUp(self) -> None:
        self.clock = Clock()

    def test_quick_request_is_the_regular_expression(self) -> None:
        """``_quick_request`` takes exactly the heads that
        ``_CANONICAL_REQUEST`` matches with the path ``/``, with the same
        groups: Go's and our requests, and mutations of them."""
        import random

        from nodepass.pools import ws

        rng = random.Random(20261130)
        bases = [
            GO_REQUEST,
            upgrade_request("tunnel.example", KEY, "tok"),
            upgrade_request("10.0.0.1", "abcdefghijklmnopqrstuv==", ""),
            upgrade_request("", "ABCDEFGHIJKLMNOPQRSTU+/=", "x y"),
        ]
        alphabet = b"\r\n :=+/aZ09\x00\x7f\x80\t-GETHOSUgzip"
        taken = 0
        for base in bases:
            heads = [base[:-4]] + _mutations(rng, base[:-4], alphabet, 6000)
            for head in heads:
                m = ws._CANONICAL_REQUEST.fullmatch(head)
                want = m.group(2, 3, 4, 5) if m is not None and m.group(1) == b"/" else None
                got = ws._quick_request(head)
                self.assertEqual(got, want, head)
                taken += got is not None
        self.assertGreater(taken, 1000)  # (the mutations do reach the quick path)

    def test_requests_answered_as_by_the_general_path(self) -> None:
        """Whole requests (with early frame bytes behind them) through the
        upgrade protocol: the quick path and the general one (the head cut
        by ``_head_end`` and judged by ``_request``) give the same answer,
        the same headers to ``authorize`` and the same stream bytes."""
        import random

        rng = random.Random(7)
        alphabet = b"\r\n :=+/aZ09\x00\t-"
        ours = upgrade_request("tunnel.example", KEY, "tok")
        early = client_frame(2, b"early")
        for data in [GO_REQUEST, ours] + _mutations(rng, ours, alphabet, 400) + _mutations(rng, GO_REQUEST, alphabet, 400):
            outcomes = []
            for quick in (True, False):
                seen: list[Any] = []
                recs: list[Recorder] = []

                def on_stream(stream: WebSocketStreamTransport) -> None:
                    rec = Recorder()
                    recs.append(rec)
                    stream.attach(rec)
                    stream.write(b"\x00\x00\x00\x00")

                def authorize(headers: dict[str, list[str]]) -> bool:
                    seen.append(headers)
                    return True

                proto = WebSocketUpgradeProtocol(self.clock, NodeLog("none"), on_stream, lambda: False, authorize=authorize)
                wire = StringTransport()
                proto.makeConnection(wire)
                if quick:
                    proto.dataReceived(data + early)
                else:
                    from nodepass.pools.ws import _head_end

                    whole = data + early
                    ends = _head_end(whole)
                    if ends is None or ends[0] > proto.max_head:
                        proto.dataReceived(whole)  # (no head yet: both take the same path)
                    else:
                        proto._done = False
                        proto._request(whole[: ends[0]], whole[ends[1] :])
                outcomes.append((wire.value(), seen, [r.chunks for r in recs], proto.refused))
            self.assertEqual(outcomes[0], outcomes[1], data)

    def test_quick_answer_decides_as_the_general_path(self) -> None:
        """Our ``101`` (with the ID frame behind it) and mutations of it: the
        client's comparison takes it only when the general path (the
        regular expression, then the header parser) would upgrade with the
        same trailing bytes, and anything else is judged by that path."""
        import random

        rng = random.Random(11)
        base = GO_ANSWER + b"\x82\x04\x00\x00\x00\x00"
        alphabet = b"\r\n :=+/aZ09\x00\x7f\t-HTP1"
        answers = [base, GO_ANSWER.replace(b"Date: Thu", b"Date: \x7fThu"), GO_ANSWER.replace(b"00 GMT", b"")]
        answers += _mutations(rng, base, alphabet, 1500)
        upgraded = 0
        for data in answers:
            outcomes = []
            for quick in (True, False):
                rec = Recorder()
                proto = WebSocketClientUpgradeProtocol(self.clock, "tunnel.example", attach_to=rec, key=KEY)
                if not quick:
                    proto._expected = b"\x00"  # (a prefix no answer has: the general path only)
                proto.makeConnection(StringTransport())
                results: list[Any] = []
                proto.done.addBoth(results.append)
                proto.dataReceived(data)
                result = results[0] if results else None
                if isinstance(result, Failure):
                    result = (result.type, str(result.value))
                elif result is not None:
                    result = "upgraded"
                outcomes.append((result, rec.chunks))
            self.assertEqual(outcomes[0], outcomes[1], data)
            upgraded += outcomes[0][0] == "upgraded"
        self.assertGreater(upgraded, 100)

    def random_frames(self, rng: Any, client: bool) -> bytes:
        """A few frames as the peer of a ``client``-side stream might send
        them, good and bad: small and 16-bit binary messages (empty ones
        too), text, fragments in and out of order, pings, pongs, Closes with
        every kind of payload, and refused headers."""
        key = None if client else bytes(rng.randrange(256) for _ in range(4))
        wrong = b"\x01\x02\x03\x04" if client else None
        closes = [b"", b"\x03\xe8", b"\x03\xe9bye", b"\x03", struct.pack("!H", 999), b"\x03\xed", b"\x03\xe8\xff\xfe", b"\x0b\xb8"]
        out = b""
        for _ in range(rng.randint(1, 6)):
            kind = rng.random()
            if kind < 0.35:
                out += any_frame(2, os.urandom(rng.choice([0, 1, 4, 32, 125])), key)
            elif kind < 0.45:
                out += any_frame(2, os.urandom(rng.choice([126, 200, 1000])), key)
            elif kind < 0.5:
                out += any_frame(1, b"text", key)
            elif kind < 0.6:
                out += any_frame(2, b"frag", key, fin=False) + any_frame(0, b"ment", key, fin=rng.random() < 0.7)
            elif kind < 0.65:
                out += any_frame(0, b"stray", key)
            elif kind < 0.75:
                out += any_frame(rng.choice([9, 10]), os.urandom(rng.randint(0, 10)), key)
            elif kind < 0.9:
                out += any_frame(8, rng.choice(closes), key)
            elif kind < 0.95:
                out += any_frame(2, b"rsv", key, first=rng.choice([0x10, 0x20, 0x40]))
            else:
                out += any_frame(2, b"mask", wrong)
        return out

    def read(self, client: bool, pieces: list[bytes]) -> tuple[Any, ...]:
        """Everything a stream's reading decides, for ``pieces`` fed one by
        one: what it delivered, what it wrote (unmasked), how it closed."""
        wire = StringTransport()
        stream = WebSocketStreamTransport(wire, client=client, clock=self.clock)
        rec = Recorder()
        stream.attach(rec)
        for piece in pieces:
            stream.feed(memoryview(piece))
        reason = stream._reason
        return (
            b"".join(rec.chunks),
            _frames_out(wire.value()),
            stream.peer_close_code,
            type(reason),
            str(reason),
            stream._closing,
            wire.disconnecting,
        )

    def test_whole_frames_read_as_the_frame_loop_reads_them(self) -> None:
        """The same frames fed whole one by one (``feed``'s shortcut), all
        at once (``_consume``'s) and a byte at a time (the frame loop
        only): the same payloads, the same answers and the same close; and
        fed whole, each data frame is one ``dataReceived``."""
        import random

        from wsproto.frame_protocol import FrameDecoder

        rng = random.Random(5)
        for client in (False, True):
            for _ in range(300):
                data = self.random_frames(rng, client)
                frames = []
                decoder = FrameDecoder(client=client)  # (only to cut ``data`` into its frames)
                pos = 0
                while pos < len(data):
                    for end in range(pos + 2, len(data) + 1):
                        decoder = FrameDecoder(client=client)
                        decoder.receive_bytes(data[pos:end])
                        try:
                            frame = decoder.process_buffer()
                        except Exception:  # noqa: BLE001 - a refused header: the rest as one piece
                            end = len(data)
                            break
                        if frame is not None and frame.frame_finished:
                            break
                    frames.append(data[pos:end])
                    pos = end
                whole = self.read(client, frames)
                self.assertEqual(whole, self.read(client, [data]), (client, data))
                self.assertEqual(whole, self.read(client, [data[i : i + 1] for i in range(len(data))]), (client, data))

    def test_wrong_mask_bit_is_refused_whatever_the_length(self) -> None:
        """A frame with the wrong mask bit, in a piece exactly as long as a
        whole frame with the right one would be (the length alone does not
        tell them apart): refused as the frame loop refuses it."""
        cases = [
            (True, b"\x82\x88\x01\x02\x03\x04" + b"abcd"),  # masked, to a client: 2 + 8 bytes
            (False, b"\x82\x04abcd" + b"wxyz"),  # plain, to a server: 6 + 4 bytes
            (True, b"\x88\x82\x01\x02\x03\x04"),  # a masked Close to a client
            (False, b"\x88\x04\x03\xe8ab"),  # a plain Close to a server
        ]
        for client, piece in cases:
            got = self.read(client, [piece])
            self.assertEqual(got, self.read(client, [piece[i : i + 1] for i in range(len(piece))]), piece)
            self.assertEqual(got[0], b"", piece)
            self.assertIn("protocol error", got[4], piece)

    def test_small_messages_are_one_piece_each(self) -> None:
        for client in (False, True):
            key = None if client else b"\x10\x20\x30\x40"
            wire = StringTransport()
            stream = WebSocketStreamTransport(wire, client=client, clock=self.clock)
            rec = Recorder()
            stream.attach(rec)
            payloads = [os.urandom(n) for n in (1, 2, 5, 125, 7)]
            for p in payloads:
                stream.feed(memoryview(any_frame(2, p, key)))
            self.assertEqual(rec.chunks, payloads)
            self.assertTrue(all(type(c) is bytes for c in rec.chunks))

    def test_server_frames_are_wsprotos(self) -> None:
        """Every length around the 7/16/64-bit boundaries, and the Close:
        byte for byte what wsproto's server sends."""
        from wsproto.connection import Connection, ConnectionType
        from wsproto.events import BytesMessage, CloseConnection

        for size in list(range(0, 130)) + [65535, 65536, 70000]:
            data = os.urandom(size)
            wire = StringTransport()
            stream = WebSocketStreamTransport(wire, client=False, clock=self.clock)
            stream.attach(Recorder())
            stream.write(data)
            want = Connection(ConnectionType.SERVER).send(BytesMessage(data=data)) if size else b""
            self.assertEqual(wire.value(), want, size)
        wire = StringTransport()
        stream = WebSocketStreamTransport(wire, client=False, clock=self.clock)
        stream.attach(Recorder())
        stream.loseConnection()
        self.assertEqual(wire.value(), Connection(ConnectionType.SERVER).send(CloseConnection(code=1000)))

    def test_client_frames_are_wsprotos_but_for_the_mask(self) -> None:
        """The same header bytes as wsproto's client frame, a fresh key, the
        payload masked with it; the Close that answers the server's too."""
        from wsproto.connection import Connection, ConnectionType
        from wsproto.events import BytesMessage

        keys = set()
        for size in list(range(1, 130)) + [65535, 65536]:
            data = os.urandom(size)
            wire = StringTransport()
            stream = WebSocketStreamTransport(wire, client=True, clock=self.clock)
            stream.attach(Recorder())
            stream.write(data)
            out = wire.value()
            theirs = Connection(ConnectionType.CLIENT).send(BytesMessage(data=data))
            head = len(theirs) - size - 4
            self.assertEqual(out[:head], theirs[:head], size)
            key = out[head : head + 4]
            keys.add(key)
            self.assertEqual(unmask(key, out[head + 4 :]), data, size)
            if size == 1:
                stream.feed(b"\x88\x02\x03\xe8")
                close = wire.value()[len(out) :]
                self.assertEqual(close[:2], b"\x88\x82")
                self.assertEqual(unmask(close[2:6], close[6:]), b"\x03\xe8")
        self.assertGreater(len(keys), 120)

    def test_requests_and_answers_are_byte_exact(self) -> None:
        """The request (made from parts kept per host and token) and the
        ``101``, against the SPEC's text and the test vector."""
        from nodepass.pools.ws import upgrade_answer

        for host, bearer in [("tunnel.example", ""), ("tunnel.example", "tok"), ("1.2.3.4", "tok"), ("1.2.3.4", "")]:
            for _ in range(2):  # (the second time from the kept parts)
                key = new_key()
                auth = f"Authorization: Bearer {bearer}\r\n" if bearer else ""
                want = (
                    f"GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: Go-http-client/1.1\r\n{auth}"
                    f"Connection: Upgrade\r\nSec-Websocket-Key: {key}\r\nSec-Websocket-Version: 13\r\n"
                    "Upgrade: websocket\r\nAccept-Encoding: gzip\r\n\r\n"
                ).encode()
                self.assertEqual(upgrade_request(host, key, bearer), want)
                digest = base64.b64encode(hashlib.sha1(key.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
                self.assertEqual(accept_value(key), digest.decode())
        self.assertEqual(upgrade_answer(KEY, EPOCH), GO_ANSWER)
