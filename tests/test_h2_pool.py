"""HTTP/2 pool transport (SPEC-1.14 §4.5, ``type=3``): one TLS connection
with ALPN ``h2``, one stream per pool entry.

Byte and frame level: an independent ``h2`` connection in the test is the
peer, over a StringTransport, to check what goes on the wire.  End to end:
real sockets and real TLS 1.3 on 127.0.0.1, the server behind ``listenSSL``
with :func:`h2_server_context`."""

from __future__ import annotations

import hashlib
import os
from typing import Any, Optional

from h2 import events as h2e
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hyperframe.frame import (
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from twisted.internet import address, defer, error, reactor, ssl, task
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.ssl import TLSVersion
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from nodepass.base.logs import NodeLog
from nodepass.base.stats import InstanceStats
from nodepass.net.tls import (
    ServerCredentials,
    TLSVerificationFailed,
    fingerprint,
    generate_self_signed,
    host_certificate_fingerprint,
    peer_certificate_fingerprint,
)
from nodepass.pools import h2pool
from nodepass.pools.h2pool import (
    CLIENT_STREAM_WINDOW,
    SERVER_STREAM_WINDOW,
    H2ClientProtocol,
    H2PoolClient,
    H2PoolError,
    H2PoolServerProtocol,
    H2StreamRefused,
    H2StreamTransport,
    h2_client_context,
    h2_server_context,
)
from nodepass.relay.core import Relay, RelayEnd
from tests.helpers import Echo, PushSender, listen_tcp, sleep, until_still, wait_for

MiB = 1024 * 1024
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
GO_REQUEST = [
    (b":authority", b"tunnel.example"),
    (b":method", b"POST"),
    (b":path", b"/stream"),
    (b":scheme", b"https"),
    (b"accept-encoding", b"gzip"),
    (b"user-agent", b"Go-http-client/2.0"),
]
POOL_ID = b"\xde\xad\xbe\xef"


def d(coro_fn):
    def wrapper(self, *a):
        return defer.ensureDeferred(coro_fn(self, *a))

    wrapper.__name__ = coro_fn.__name__
    wrapper.__doc__ = coro_fn.__doc__
    return wrapper


def parse_frames(data: bytes) -> list[Frame]:
    """Every frame in ``data`` (no preface), in order."""
    out = []
    view = memoryview(data)
    while view:
        frame, length = Frame.parse_frame_header(view[:9])
        frame.parse_body(view[9 : 9 + length])
        out.append(frame)
        view = view[9 + length :]
    return out


class FakeTLS(StringTransport):
    """A StringTransport that says ALPN ``h2`` was negotiated."""

    negotiatedProtocol: Optional[bytes] = b"h2"

    def __init__(self, peer_ip: str = "127.0.0.1"):
        super().__init__(
            hostAddress=address.IPv4Address("TCP", "127.0.0.1", 10101),
            peerAddress=address.IPv4Address("TCP", peer_ip, 40000),
        )
        self.aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        self.loseConnection()

    def getPeerCertificate(self):
        return None

    def getHandle(self):
        return None


class Recorder(Protocol):
    """Records what a stream delivers and how it ended."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.reason: Any = None
        self.lost: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(bytes(data))

    def data(self) -> bytes:
        return b"".join(self.chunks)

    def connectionLost(self, reason) -> None:
        self.reason = reason
        if not self.lost.called:
            self.lost.callback(None)  # (a Failure given to callback() would fail it)


def go_client_peer() -> H2Connection:
    peer = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    peer.initiate_connection()
    return peer


def go_server_peer() -> H2Connection:
    peer = H2Connection(H2Configuration(client_side=False, header_encoding=None))
    peer.initiate_connection()
    return peer


class FlagProducer:
    """A streaming producer that only records what it is told."""

    def __init__(self) -> None:
        self.paused = False
        self.stopped = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.stopped = True


class LibraryTests(unittest.TestCase):
    def test_h2_api_we_rely_on(self):
        """What nodepass.pools.h2pool uses of h2 beyond the obvious (all
        public): replacing and trimming ``local_settings``, setting
        ``max_inbound_frame_size``, reading the connection window."""
        import h2

        self.assertEqual(h2.__version__.split(".")[0], "4")
        conn = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        conn.local_settings = h2pool._local_settings(
            False, {SettingCodes.INITIAL_WINDOW_SIZE: 1048576}, (SettingCodes.ENABLE_PUSH,)
        )
        self.assertNotIn(SettingCodes.ENABLE_PUSH, conn.local_settings)
        conn.max_inbound_frame_size = 1048576
        conn.initiate_connection()
        conn.increment_flow_control_window(983041)
        self.assertEqual(conn.inbound_flow_control_window, 1048576)
        (settings, update) = parse_frames(conn.data_to_send())
        self.assertNotIn(SettingCodes.ENABLE_PUSH, settings.settings)
        self.assertEqual(update.window_increment, 983041)


# ---------------------------------------------------------------------------
# Frames: the client
# ---------------------------------------------------------------------------


class ClientFrameTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.proto = H2ClientProtocol(self.clock, NodeLog("none"), "tunnel.example", 5.0)
        self.wire = FakeTLS()
        self.proto.makeConnection(self.wire)

    def test_first_frames_are_gos(self):
        """Preface, SETTINGS with Go's client values (nothing else),
        WINDOW_UPDATE +1073741824; then per stream HEADERS (END_HEADERS, no
        END_STREAM) with Go's pseudo-headers and DATA ``00``."""
        self.assertTrue(self.proto.ready)
        self.proto.open_stream(Recorder())
        wire = self.wire.value()
        self.assertTrue(wire.startswith(PREFACE))
        frames = parse_frames(wire[len(PREFACE) :])
        self.assertEqual(
            [type(f) for f in frames], [SettingsFrame, WindowUpdateFrame, HeadersFrame, DataFrame]
        )
        settings, update, headers, data = frames
        self.assertEqual(
            list(settings.settings.items()),
            [
                (SettingCodes.ENABLE_PUSH, 0),
                (SettingCodes.INITIAL_WINDOW_SIZE, 4194304),
                (SettingCodes.MAX_FRAME_SIZE, 16384),
                (SettingCodes.MAX_HEADER_LIST_SIZE, 10485760),
            ],
        )
        self.assertEqual((update.stream_id, update.window_increment), (0, 1073741824))
        self.assertEqual(headers.stream_id, 1)
        self.assertIn("END_HEADERS", headers.flags)
        self.assertNotIn("END_STREAM", headers.flags)
        self.assertEqual((data.stream_id, data.data), (1, b"\x00"))
        self.assertNotIn("END_STREAM", data.flags)
        # what an independent HTTP/2 server decodes
        events = go_server_peer().receive_data(wire)
        (request,) = [e for e in events if isinstance(e, h2e.RequestReceived)]
        self.assertEqual(request.headers, GO_REQUEST)
        (body,) = [e for e in events if isinstance(e, h2e.DataReceived)]
        self.assertEqual(body.data, b"\x00")

    def test_authority_is_the_sni_value(self):
        proto = H2ClientProtocol(self.clock, NodeLog("none"), "none", 5.0)
        wire = FakeTLS()
        proto.makeConnection(wire)
        proto.open_stream(Recorder())
        events = go_server_peer().receive_data(wire.value())
        (request,) = [e for e in events if isinstance(e, h2e.RequestReceived)]
        self.assertEqual(dict(request.headers)[b":authority"], b"none")

    def test_200_attaches_and_the_id_arrives_as_data(self):
        rec = Recorder()
        opened = self.proto.open_stream(rec)
        peer = go_server_peer()
        peer.receive_data(self.wire.value())
        self.wire.clear()
        peer.send_headers(1, [(b":status", b"200"), (b"content-type", b"application/octet-stream")])
        peer.send_data(1, POOL_ID)
        self.proto.dataReceived(peer.data_to_send())
        t = self.successResultOf(opened)
        self.assertIsInstance(t, H2StreamTransport)
        self.assertIs(rec.transport, t)
        self.assertEqual(rec.data(), POOL_ID)
        # our SETTINGS ACK went out; nothing else was said about stream 1
        frames = parse_frames(self.wire.value())
        self.assertTrue(any(isinstance(f, SettingsFrame) and "ACK" in f.flags for f in frames))
        self.assertFalse([f for f in frames if f.stream_id == 1])

    def test_non_200_fails_naming_the_status(self):
        opened = self.proto.open_stream(Recorder())
        peer = go_server_peer()
        peer.receive_data(self.wire.value())
        self.wire.clear()
        peer.send_headers(1, [(b":status", b"404")])
        peer.send_data(1, b"not found\n", end_stream=True)
        self.proto.dataReceived(peer.data_to_send())
        failure = self.failureResultOf(opened, H2StreamRefused)
        self.assertEqual(failure.value.status, 404)
        self.assertIn("404", str(failure.value))
        self.assertEqual(self.proto.streams, {})

    def test_refused_open_stream_resets_the_stream(self):
        opened = self.proto.open_stream(Recorder())
        peer = go_server_peer()
        peer.receive_data(self.wire.value())
        self.wire.clear()
        peer.send_headers(1, [(b":status", b"403")])
        self.proto.dataReceived(peer.data_to_send())
        self.assertEqual(self.failureResultOf(opened, H2StreamRefused).value.status, 403)
        resets = [f for f in parse_frames(self.wire.value()) if isinstance(f, RstStreamFrame)]
        self.assertEqual([(f.stream_id, f.error_code) for f in resets], [(1, ErrorCodes.CANCEL)])

    def test_streams_wait_for_the_servers_limit(self):
        """Beyond MAX_CONCURRENT_STREAMS, opens wait in order for a stream
        to close (and can be cancelled)."""
        peer = go_server_peer()
        peer.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: 1})
        self.proto.dataReceived(peer.data_to_send())
        first = self.proto.open_stream(Recorder())
        second = self.proto.open_stream(Recorder())
        third = self.proto.open_stream(Recorder())
        peer.receive_data(self.wire.value())
        self.assertEqual(sorted(self.proto.streams), [1])
        peer.send_headers(1, [(b":status", b"200")])
        self.proto.dataReceived(peer.data_to_send())
        t1 = self.successResultOf(first)
        self.assertNoResult(second)
        third.cancel()
        self.failureResultOf(third, defer.CancelledError)
        t1.loseConnection()
        self.assertEqual(sorted(self.proto.streams), [3])
        self.assertNoResult(second)

    def test_ping_every_interval_and_close_when_unanswered(self):
        peer = go_server_peer()
        peer.receive_data(self.wire.value())
        self.wire.clear()
        self.clock.advance(5.0)
        pings = [f for f in parse_frames(self.wire.value()) if isinstance(f, PingFrame)]
        self.assertEqual(len(pings), 1)
        peer.receive_data(self.wire.value())  # it answers this one
        self.proto.dataReceived(peer.data_to_send())
        self.clock.advance(5.0)
        self.assertFalse(self.proto.closed)  # answered: a second PING goes out
        self.clock.advance(5.0)  # not answered within the interval
        self.assertTrue(self.proto.closed)
        self.assertTrue(self.wire.aborted)
        self.failureResultOf(self.proto.open_stream(Recorder()), H2PoolError)

    def test_paused_reader_holds_the_stream_window(self):
        """Received bytes are given back (WINDOW_UPDATE on the stream) only
        when the reader took them and is not paused."""
        rec = Recorder()
        opened = self.proto.open_stream(rec)
        peer = go_server_peer()
        peer.receive_data(self.wire.value())
        peer.send_headers(1, [(b":status", b"200")])
        self.proto.dataReceived(peer.data_to_send())
        t = self.successResultOf(opened)
        t.pauseProducing()
        self.wire.clear()
        window = peer.local_flow_control_window(1)
        self.assertEqual(window, CLIENT_STREAM_WINDOW)
        chunk = b"x" * 16384
        while peer.local_flow_control_window(1) >= len(chunk):
            peer.send_data(1, chunk)
            self.proto.dataReceived(peer.data_to_send())
        self.assertEqual(rec.data(), b"")
        self.assertGreater(t.queued_in, CLIENT_STREAM_WINDOW - len(chunk))
        updates = [f for f in parse_frames(self.wire.value()) if isinstance(f, WindowUpdateFrame)]
        self.assertFalse([f for f in updates if f.stream_id == 1])
        self.wire.clear()
        held = t.queued_in
        t.resumeProducing()
        self.assertEqual(len(rec.data()), held)
        self.assertEqual(t.queued_in, 0)
        updates = [f for f in parse_frames(self.wire.value()) if isinstance(f, WindowUpdateFrame) and f.stream_id == 1]
        self.assertEqual(sum(f.window_increment for f in updates), len(rec.data()))

    def test_server_end_stream_gives_connection_done(self):
        """The server ends its side: we deliver, end ours (END_STREAM, no
        reset) and the protocol sees a clean close."""
        rec = Recorder()
        opened = self.proto.open_stream(rec)
        peer = go_server_peer()
        peer.receive_data(self.wire.value())
        peer.send_headers(1, [(b":status", b"200")])
        peer.send_data(1, POOL_ID + b"last", end_stream=True)
        self.wire.clear()
        self.proto.dataReceived(peer.data_to_send())
        self.successResultOf(opened)
        self.assertEqual(rec.data(), POOL_ID + b"last")
        rec.reason.trap(error.ConnectionDone)
        frames = parse_frames(self.wire.value())
        ends = [f for f in frames if f.stream_id == 1]
        self.assertEqual(len(ends), 1)
        self.assertIsInstance(ends[0], DataFrame)
        self.assertIn("END_STREAM", ends[0].flags)

    def test_lose_connection_ends_and_cancels(self):
        """Our close: queued data, END_STREAM and RST_STREAM CANCEL (as Go's
        client does), in that order, so the stream stops counting against
        the server's limit even if the server never ends it."""
        rec = Recorder()
        opened = self.proto.open_stream(rec)
        peer = go_server_peer()
        peer.receive_data(self.wire.value())
        peer.send_headers(1, [(b":status", b"200")])
        self.proto.dataReceived(peer.data_to_send())
        t = self.successResultOf(opened)
        self.wire.clear()
        t.write(b"bye")
        t.loseConnection()
        frames = [f for f in parse_frames(self.wire.value()) if f.stream_id == 1]
        self.assertEqual([type(f) for f in frames], [DataFrame, DataFrame, RstStreamFrame])
        self.assertEqual(frames[0].data, b"bye")
        self.assertIn("END_STREAM", frames[1].flags)
        self.assertEqual(frames[2].error_code, ErrorCodes.CANCEL)
        rec.reason.trap(error.ConnectionDone)
        self.assertEqual(self.proto.conn.open_outbound_streams, 0)

    def test_abort_resets_and_peer_reset_is_connection_lost(self):
        recs = [Recorder(), Recorder()]
        opened = [self.proto.open_stream(r) for r in recs]
        peer = go_server_peer()
        peer.receive_data(self.wire.value())
        for sid in (1, 3):
            peer.send_headers(sid, [(b":status", b"200")])
        self.proto.dataReceived(peer.data_to_send())
        t1, t3 = (self.successResultOf(o) for o in opened)
        self.wire.clear()
        t1.abortConnection()
        frames = [f for f in parse_frames(self.wire.value()) if f.stream_id == 1]
        self.assertEqual([(type(f), f.error_code) for f in frames], [(RstStreamFrame, ErrorCodes.CANCEL)])
        recs[0].reason.trap(error.ConnectionAborted)
        peer.reset_stream(3, ErrorCodes.INTERNAL_ERROR)
        self.proto.dataReceived(peer.data_to_send())
        recs[1].reason.trap(error.ConnectionLost)
        self.assertIn("INTERNAL_ERROR", recs[1].reason.getErrorMessage())
        self.assertEqual(self.proto.streams, {})

    def test_writer_paused_above_high_water_and_linger_bounded(self):
        """Bytes the peer's window does not admit wait in the stream's
        queue; above the high-water mark the registered producer is paused,
        under the low-water mark resumed.  A close that cannot flush is
        reset after CLOSE_LINGER."""
        rec = Recorder()
        opened = self.proto.open_stream(rec)
        peer = go_server_peer()  # its initial stream window: 65535
        peer.receive_data(self.wire.value())
        self.wire.clear()
        peer.send_headers(1, [(b":status", b"200")])
        self.proto.dataReceived(peer.data_to_send())
        t = self.successResultOf(opened)
        producer = FlagProducer()
        t.registerProducer(producer, True)
        t.write(b"a" * (h2pool.SEND_HIGH_WATER + 100_000))
        self.assertTrue(producer.paused)
        self.assertGreater(t.queued_out, h2pool.SEND_HIGH_WATER)
        # the peer reads and opens the window: the queue drains
        events = peer.receive_data(self.wire.value())
        got = sum(e.flow_controlled_length for e in events if isinstance(e, h2e.DataReceived))
        self.assertEqual(got, 65535 - 1)  # (the first byte took one)
        peer.increment_flow_control_window(t.queued_out - h2pool.SEND_LOW_WATER, 1)
        peer.increment_flow_control_window(MiB)
        self.proto.dataReceived(peer.data_to_send())
        self.assertLessEqual(t.queued_out, h2pool.SEND_LOW_WATER)
        self.assertFalse(producer.paused)
        # now closing cannot flush: the window stays shut
        t.unregisterProducer()
        t.loseConnection()
        self.assertIsNone(rec.reason)
        self.wire.clear()
        self.clock.advance(h2pool.CLOSE_LINGER)
        rec.reason.trap(error.ConnectionLost)
        frames = [f for f in parse_frames(self.wire.value()) if f.stream_id == 1]
        self.assertEqual([(type(f), f.error_code) for f in frames], [(RstStreamFrame, ErrorCodes.CANCEL)])

    def test_goaway_loses_every_stream(self):
        rec = Recorder()
        opened = self.proto.open_stream(rec)
        peer = go_server_peer()
        peer.receive_data(self.wire.value())
        peer.send_headers(1, [(b":status", b"200")])
        self.proto.dataReceived(peer.data_to_send())
        self.successResultOf(opened)
        peer.close_connection()
        self.proto.dataReceived(peer.data_to_send())
        rec.reason.trap(error.ConnectionLost)
        self.assertTrue(self.proto.closed)

    def test_no_alpn_is_refused(self):
        proto = H2ClientProtocol(self.clock, NodeLog("none"), "x", 5.0)
        wire = FakeTLS()
        wire.negotiatedProtocol = None
        proto.makeConnection(wire)
        ready = proto.when_ready()
        self.assertNoResult(ready)
        proto.handshakeCompleted()
        self.assertIn("ALPN", str(self.failureResultOf(ready, H2PoolError).value))
        self.assertEqual(wire.value(), b"")
        self.assertTrue(wire.disconnecting)


# ---------------------------------------------------------------------------
# Frames: the server
# ---------------------------------------------------------------------------


class ServerFrameTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.full = False
        self.client_ip = "127.0.0.1"
        self.opened: list[H2StreamTransport] = []
        self.recorders: list[Recorder] = []
        self.proto = self.server()
        self.wire = FakeTLS(self.client_ip)
        self.proto.makeConnection(self.wire)

    def server(self, max_streams: int = 64) -> H2PoolServerProtocol:
        return H2PoolServerProtocol(
            self.clock,
            NodeLog("none"),
            self.on_stream,
            lambda: self.full,
            lambda ip: ip == self.client_ip,
            max_streams,
            5.0,
        )

    def on_stream(self, t: H2StreamTransport) -> None:
        # what the pool does: attach, write the ID
        rec = Recorder()
        self.opened.append(t)
        self.recorders.append(rec)
        t.attach(rec)
        t.write(POOL_ID)

    def new_output(self) -> bytes:
        """What the server wrote since the last call."""
        out = self.wire.value()
        self.wire.clear()
        return out

    def exchange(self, peer: H2Connection) -> list:
        """The peer's pending bytes to the server; the server's answer (and
        anything it wrote before) to the peer; the peer's events."""
        self.proto.dataReceived(peer.data_to_send())
        return peer.receive_data(self.new_output())

    def test_settings_and_window_are_gos(self):
        frames = parse_frames(self.new_output())
        self.assertEqual([type(f) for f in frames], [SettingsFrame, WindowUpdateFrame])
        settings, update = frames
        self.assertEqual(
            dict(settings.settings),
            {
                SettingCodes.MAX_FRAME_SIZE: 1048576,
                SettingCodes.MAX_CONCURRENT_STREAMS: 64,
                SettingCodes.MAX_HEADER_LIST_SIZE: 1048896,
                SettingCodes.HEADER_TABLE_SIZE: 4096,
                SettingCodes.INITIAL_WINDOW_SIZE: 1048576,
            },
        )
        self.assertEqual(len(settings.serialize()), 9 + 30)
        self.assertEqual((update.stream_id, update.window_increment), (0, 983041))

    def test_200_after_the_byte_then_the_id_as_its_own_data_frame(self):
        peer = go_client_peer()
        peer.send_headers(1, GO_REQUEST)
        events = self.exchange(peer)
        # no answer before the byte
        self.assertFalse([e for e in events if isinstance(e, h2e.ResponseReceived)])
        self.assertEqual(self.opened, [])
        peer.send_data(1, b"\x00")
        self.proto.dataReceived(peer.data_to_send())
        out = self.new_output()
        frames = [f for f in parse_frames(out) if f.stream_id == 1]
        self.assertEqual([type(f) for f in frames], [HeadersFrame, DataFrame])
        self.assertNotIn("END_STREAM", frames[0].flags)
        self.assertEqual(frames[1].data, POOL_ID)
        self.assertNotIn("END_STREAM", frames[1].flags)
        events = peer.receive_data(out)
        (response,) = [e for e in events if isinstance(e, h2e.ResponseReceived)]
        headers = dict(response.headers)
        self.assertEqual(headers[b":status"], b"200")
        self.assertIn(b"content-type", headers)
        self.assertTrue(headers[b"date"].endswith(b" GMT"))
        self.assertEqual(len(self.opened), 1)
        self.assertEqual(self.recorders[0].data(), b"")  # the byte is not stream data

    def test_bytes_after_the_first_are_stream_data(self):
        peer = go_client_peer()
        peer.send_headers(1, GO_REQUEST)
        peer.send_data(1, b"\x00hello")
        self.exchange(peer)
        self.assertEqual(self.recorders[0].data(), b"hello")

    def _refused(self, headers, status: int, body: bytes) -> None:
        peer = go_client_peer()
        peer.send_headers(1, headers)
        peer.send_data(1, b"\x00")
        events = self.exchange(peer)
        (response,) = [e for e in events if isinstance(e, h2e.ResponseReceived)]
        self.assertEqual(dict(response.headers)[b":status"], str(status).encode())
        data = b"".join(e.data for e in events if isinstance(e, h2e.DataReceived))
        self.assertEqual(data, body)
        self.assertTrue([e for e in events if isinstance(e, h2e.StreamEnded)])
        resets = [e for e in events if isinstance(e, h2e.StreamReset)]
        self.assertEqual([r.error_code for r in resets], [ErrorCodes.NO_ERROR])
        self.assertEqual(self.opened, [])
        # the connection goes on serving
        self.full, self.client_ip = False, "127.0.0.1"
        self.proto.allowed = lambda ip: True
        peer.send_headers(3, GO_REQUEST)
        peer.send_data(3, b"\x00")
        events = self.exchange(peer)
        (response,) = [e for e in events if isinstance(e, h2e.ResponseReceived)]
        self.assertEqual(dict(response.headers)[b":status"], b"200")

    def test_wrong_path_is_404(self):
        headers = [(k, b"/other" if k == b":path" else v) for k, v in GO_REQUEST]
        self._refused(headers, 404, b"not found\n")

    def test_wrong_method_is_404(self):
        headers = [(k, b"PUT" if k == b":method" else v) for k, v in GO_REQUEST]
        self._refused(headers, 404, b"not found\n")

    def test_full_pool_is_404(self):
        self.full = True
        self._refused(GO_REQUEST, 404, b"not found\n")

    def test_foreign_ip_is_403_per_request(self):
        self.client_ip = "192.0.2.1"  # the tunnel's client is elsewhere now
        self._refused(GO_REQUEST, 403, b"unauthorized\n")

    def test_pings_and_settings_answered(self):
        peer = go_client_peer()
        peer.ping(b"12345678")
        events = self.exchange(peer)
        self.assertTrue([e for e in events if isinstance(e, h2e.PingAckReceived)])
        self.assertTrue([e for e in events if isinstance(e, h2e.SettingsAcknowledged)])

    def test_server_close_ends_the_stream(self):
        """Unlike Go's server, ours ends the stream when its side closes:
        END_STREAM then RST_STREAM NO_ERROR (the client had not ended)."""
        peer = go_client_peer()
        peer.send_headers(1, GO_REQUEST)
        peer.send_data(1, b"\x00")
        self.exchange(peer)
        self.opened[0].write(b"tail")
        self.opened[0].loseConnection()
        events = peer.receive_data(self.new_output())
        data = b"".join(e.data for e in events if isinstance(e, h2e.DataReceived))
        self.assertEqual(data, b"tail")
        self.assertTrue([e for e in events if isinstance(e, h2e.StreamEnded)])
        self.assertEqual([e.error_code for e in events if isinstance(e, h2e.StreamReset)], [ErrorCodes.NO_ERROR])
        self.recorders[0].reason.trap(error.ConnectionDone)

    def test_client_end_stream_closes_the_stream_cleanly(self):
        peer = go_client_peer()
        peer.send_headers(1, GO_REQUEST)
        peer.send_data(1, b"\x00")
        self.exchange(peer)
        peer.send_data(1, b"last", end_stream=True)
        events = self.exchange(peer)
        self.assertEqual(self.recorders[0].data(), b"last")
        self.recorders[0].reason.trap(error.ConnectionDone)
        self.assertTrue([e for e in events if isinstance(e, h2e.StreamEnded)])
        self.assertFalse([e for e in events if isinstance(e, h2e.StreamReset)])  # both ended: no reset
        self.assertEqual(self.proto.open_streams, 0)

    def test_stream_limit_is_enforced(self):
        proto = self.server(max_streams=2)
        wire = FakeTLS()
        proto.makeConnection(wire)
        peer = go_client_peer()
        proto.dataReceived(peer.data_to_send())
        peer.receive_data(wire.value())  # our SETTINGS (the limit), ACK
        for sid in (1, 3):
            peer.send_headers(sid, GO_REQUEST)
            peer.send_data(sid, b"\x00")
        proto.dataReceived(peer.data_to_send())
        self.assertEqual(proto.open_streams, 2)
        self.assertEqual(peer.remote_settings.max_concurrent_streams, 2)

    def test_no_alpn_is_closed_silently(self):
        proto = self.server()
        wire = FakeTLS()
        wire.negotiatedProtocol = None
        proto.makeConnection(wire)  # before the TLS handshake: undecided
        self.assertFalse(wire.disconnecting)
        proto.handshakeCompleted()
        self.assertTrue(wire.disconnecting)
        self.assertEqual(wire.value(), b"")
        proto.connectionLost(error.ConnectionDone())

    def test_undecided_alpn_decided_by_first_data(self):
        """An integrator that does not forward ``handshakeCompleted``: the
        first bytes decide (they come after the handshake)."""
        proto = self.server()
        wire = FakeTLS()
        wire.negotiatedProtocol = None
        proto.makeConnection(wire)
        wire.negotiatedProtocol = b"h2"
        proto.dataReceived(go_client_peer().data_to_send())
        self.assertTrue(proto.started)
        self.assertFalse(wire.disconnecting)

    def test_garbage_instead_of_preface_is_dropped(self):
        self.proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(self.proto.closed)
        self.assertTrue(self.wire.disconnecting)

    def test_silent_peer_dropped_after_preface_timeout(self):
        self.clock.advance(h2pool.PREFACE_TIMEOUT - 0.1)
        self.assertFalse(self.proto.closed)
        self.clock.advance(0.2)
        self.assertTrue(self.proto.closed)
        self.assertTrue(self.wire.aborted)

    def test_preface_cancels_the_timeout(self):
        self.exchange(go_client_peer())
        self.clock.advance(h2pool.PREFACE_TIMEOUT + 1)
        self.assertNotIn("preface", self.proto.close_reason)

    def test_request_without_its_byte_is_reset(self):
        peer = go_client_peer()
        peer.send_headers(1, GO_REQUEST)
        self.exchange(peer)
        self.clock.advance(h2pool.REQUEST_TIMEOUT)
        events = peer.receive_data(self.new_output())
        self.assertEqual([e.error_code for e in events if isinstance(e, h2e.StreamReset)], [ErrorCodes.CANCEL])
        self.assertEqual(self.opened, [])

    def test_idle_timeout_is_twice_the_report_interval(self):
        peer = go_client_peer()
        peer.send_headers(1, GO_REQUEST)
        peer.send_data(1, b"\x00")
        self.exchange(peer)
        for _ in range(6):  # a stream is open: never idle (the client PINGs)
            self.clock.advance(5.0)
            peer.ping(b"keepaliv")
            self.exchange(peer)
        self.assertFalse(self.proto.closed)
        self.opened[0].loseConnection()
        self.clock.advance(9.9)  # report interval 5 s
        self.assertFalse(self.proto.closed)
        self.new_output()
        self.clock.advance(0.2)
        self.assertTrue(self.proto.closed)
        self.assertIn("idle", self.proto.close_reason)
        frames = parse_frames(self.new_output())
        self.assertTrue([f for f in frames if isinstance(f, GoAwayFrame)])

    def test_silent_client_dropped_after_three_intervals(self):
        """A client PINGs every report interval: three silent ones mean it
        is gone, even with streams open."""
        peer = go_client_peer()
        peer.send_headers(1, GO_REQUEST)
        peer.send_data(1, b"\x00")
        self.exchange(peer)
        self.clock.advance(14.0)
        self.assertFalse(self.proto.closed)
        self.clock.advance(1.1)
        self.assertTrue(self.proto.closed)
        self.assertTrue(self.wire.aborted)
        self.recorders[0].reason.trap(error.ConnectionLost)

    def test_peer_that_sends_but_does_not_read_is_dropped(self):
        """While the TLS transport has us paused (the peer does not read),
        the control frames a PING flood makes us queue are bounded."""
        self.patch(h2pool, "MAX_PAUSED_OUTPUT", 4096)
        peer = go_client_peer()
        self.exchange(peer)
        self.proto.pauseProducing()  # what a full socket buffer does
        for i in range(1000):
            if self.proto.closed:
                break
            peer.ping(i.to_bytes(8, "big"))
            self.proto.dataReceived(peer.data_to_send())
        self.assertTrue(self.proto.closed)
        self.assertTrue(self.wire.aborted)
        self.assertLess(len(self.wire.value()), 4096 + 1024)

    def test_paused_reader_holds_the_stream_window(self):
        peer = go_client_peer()
        peer.send_headers(1, GO_REQUEST)
        peer.send_data(1, b"\x00")
        self.exchange(peer)
        t = self.opened[0]
        t.pauseProducing()
        chunk = b"y" * 16384
        while peer.local_flow_control_window(1) >= len(chunk):
            peer.send_data(1, chunk)
            self.exchange(peer)
        self.assertLessEqual(t.queued_in, SERVER_STREAM_WINDOW)
        self.assertGreater(t.queued_in, SERVER_STREAM_WINDOW - 2 * len(chunk))
        self.assertLess(peer.local_flow_control_window(1), len(chunk))  # the client must wait
        # ... on this stream only: the connection window was given back
        self.assertGreaterEqual(peer.outbound_flow_control_window, 512 * 1024)
        t.resumeProducing()
        events = peer.receive_data(self.new_output())
        self.assertTrue([e for e in events if isinstance(e, h2e.WindowUpdated) and e.stream_id == 1])
        self.assertGreaterEqual(peer.local_flow_control_window(1), SERVER_STREAM_WINDOW // 2)


# ---------------------------------------------------------------------------
# End to end: real sockets, real TLS
# ---------------------------------------------------------------------------


class Side(Protocol):
    """A stream end for end-to-end tests: hashes what it reads (the ID bytes
    are kept apart on the client side), can send a payload at once."""

    def __init__(self, is_client: bool = True, payload: bytes = b"", pool_id: bytes = POOL_ID):
        self.is_client = is_client
        self.payload = payload
        self.pool_id = pool_id
        self.id_bytes = b""
        self.sha = hashlib.sha256()
        self.received = 0
        self.head = b""
        self.reason: Any = None
        self.lost: Deferred = Deferred()

    def connectionMade(self) -> None:
        if not self.is_client:
            self.transport.write(self.pool_id)
        if self.payload:
            self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:
        data = bytes(data)
        if self.is_client and len(self.id_bytes) < 4:
            take = 4 - len(self.id_bytes)
            self.id_bytes += data[:take]
            data = data[take:]
        if len(self.head) < 64:
            self.head += data[: 64 - len(self.head)]
        self.sha.update(data)
        self.received += len(data)

    def connectionLost(self, reason) -> None:
        self.reason = reason
        if not self.lost.called:
            self.lost.callback(None)  # (a Failure given to callback() would fail it)


class _ServerFactory(Factory):
    noisy = False

    def __init__(self, case: "E2EBase"):
        self.case = case

    def buildProtocol(self, addr):
        case = self.case
        p = H2PoolServerProtocol(
            reactor,
            NodeLog("none"),
            case.server_stream,
            lambda: case.full,
            lambda ip: ip == case.allowed_ip,
            case.max_streams,
            case.server_report_interval,
        )
        case.server_conns.append(p)
        return p


class E2EBase(unittest.TestCase):
    max_streams = 64
    server_report_interval = 5.0

    def setUp(self):
        self.cert_pem, key_pem = generate_self_signed("localhost")
        self.creds = ServerCredentials(1, self.cert_pem, key_pem)
        self.full = False
        self.allowed_ip = "127.0.0.1"
        self.server_conns: list[H2PoolServerProtocol] = []
        self.server_sides: list[Side] = []
        self.server_transports: list[H2StreamTransport] = []
        self.server_payload = b""
        self.server_transports_all: list[H2StreamTransport] = []
        self.stream_handler: Any = None
        self.clients: list[H2PoolClient] = []
        self.port = reactor.listenSSL(
            0, _ServerFactory(self), h2_server_context(self.creds.context_factory()), interface="127.0.0.1"
        )
        self.addCleanup(self._teardown)

    async def _teardown(self) -> None:
        for c in self.clients:
            await c.close()
        for p in self.server_conns:
            if not p.transport_gone:
                p.close("test over")
        await wait_for(lambda: all(p.transport_gone for p in self.server_conns), timeout=10, what="server conns gone")
        await self.port.stopListening()

    def server_stream(self, t: H2StreamTransport) -> None:
        self.server_transports_all.append(t)
        if self.stream_handler is not None:
            self.stream_handler(t)
            return
        side = Side(is_client=False, payload=self.server_payload, pool_id=os.urandom(4))
        self.server_sides.append(side)
        self.server_transports.append(t)
        t.attach(side)

    def client(self, report_interval: float = 5.0, tls_code: int = 1, name: str = "none",
               connect_timeout: float = 5.0, port: Optional[int] = None) -> H2PoolClient:
        ctx = h2_client_context(tls_code, name, trust_roots=self.cert_pem if tls_code == 2 else None)
        c = H2PoolClient(reactor, NodeLog("none"), "127.0.0.1", port or self.port.getHost().port, name, ctx,
                         report_interval, connect_timeout)
        self.clients.append(c)
        return c


class EndToEndTests(E2EBase):
    @d
    async def test_many_streams_multi_mib_both_ways(self):
        """Eight streams over one connection, 3 MiB each way on each,
        concurrently; every byte arrives intact (sha256)."""
        n, size = 8, 3 * MiB
        self.server_payload = os.urandom(size)
        up = [os.urandom(size) for _ in range(n)]
        client = self.client()
        sides = [Side() for _ in range(n)]
        transports = await defer.gatherResults([client.open_stream(s) for s in sides])
        for t, data in zip(transports, up):
            t.write(data)
        await wait_for(
            lambda: all(s.received == size for s in sides) and len(self.server_sides) == n
            and all(s.received == size for s in self.server_sides),
            timeout=60, what="all bytes both ways",
        )
        want_down = hashlib.sha256(self.server_payload).hexdigest()
        self.assertTrue(all(s.sha.hexdigest() == want_down for s in sides))
        self.assertEqual(sorted(s.sha.hexdigest() for s in self.server_sides),
                         sorted(hashlib.sha256(u).hexdigest() for u in up))
        # every client got its server side's ID first
        self.assertEqual(sorted(s.id_bytes for s in sides), sorted(s.pool_id for s in self.server_sides))
        # one TCP+TLS connection carried them all
        self.assertEqual(client.dials, 1)
        self.assertEqual(len(self.server_conns), 1)
        self.assertEqual({t.session for t in transports}, {client.connection})
        for t in transports:
            t.loseConnection()
        await defer.gatherResults([s.lost for s in sides + self.server_sides])
        for s in sides + self.server_sides:
            s.reason.trap(error.ConnectionDone)
        await wait_for(lambda: client.connection.conn.open_outbound_streams == 0
                       and self.server_conns[0].conn.open_inbound_streams == 0, what="streams closed")

    @d
    async def test_both_ends_take_the_fast_tls_path(self):
        """Both connections move their bytes through the fast TLS data path
        (whole chunks into OpenSSL, DATA frames written without being
        copied), and a 5 MiB transfer each way in relay-sized views and
        small writes arrives intact."""
        size = 5 * MiB
        self.server_payload = os.urandom(size)
        up = os.urandom(size)
        client = self.client()
        side = Side()
        t = await client.open_stream(side)
        self.assertTrue(client.connection.fast_tls)
        await wait_for(lambda: self.server_sides, what="server stream")
        self.assertTrue(self.server_conns[0].fast_tls)
        view = memoryview(up)
        for i in range(0, size - 1000, 256 * 1024):
            t.write(view[i : min(i + 256 * 1024, size - 1000)])
        for i in range(size - 1000, size, 100):
            t.write(up[i : i + 100])
        await wait_for(lambda: side.received == size and self.server_sides[0].received == size,
                       timeout=60, what="all bytes both ways")
        self.assertEqual(side.sha.hexdigest(), hashlib.sha256(self.server_payload).hexdigest())
        self.assertEqual(self.server_sides[0].sha.hexdigest(), hashlib.sha256(up).hexdigest())

    @d
    async def test_server_close_reaches_the_client(self):
        """The server side closes (its target hung up): the client's stream
        gets everything sent before, then a clean connectionLost -- unlike
        Go's server, which never ends the stream."""
        client = self.client()
        side = Side()
        await client.open_stream(side)
        await wait_for(lambda: self.server_transports, what="server stream")
        st = self.server_transports[0]
        st.write(b"goodbye")
        st.loseConnection()
        await side.lost
        side.reason.trap(error.ConnectionDone)
        self.assertEqual(side.head, b"goodbye")
        self.server_sides[0].reason.trap(error.ConnectionDone)
        await wait_for(lambda: not client.connection.streams and not self.server_conns[0].streams,
                       what="stream forgotten")
        self.assertFalse(client.connection.closed)  # the connection stays

    @d
    async def test_client_close_reaches_the_server(self):
        client = self.client()
        side = Side()
        t = await client.open_stream(side)
        t.write(b"last words")
        t.loseConnection()
        await wait_for(lambda: self.server_sides and self.server_sides[0].reason is not None, what="server end")
        self.server_sides[0].reason.trap(error.ConnectionDone)
        self.assertEqual(self.server_sides[0].head, b"last words")
        side.reason.trap(error.ConnectionDone)

    @d
    async def test_abort_reaches_the_peer_as_connection_lost(self):
        client = self.client()
        side = Side()
        t = await client.open_stream(side)
        await wait_for(lambda: self.server_sides, what="server stream")
        t.abortConnection()
        side.reason.trap(error.ConnectionAborted)
        await self.server_sides[0].lost
        self.server_sides[0].reason.trap(error.ConnectionLost)
        # the connection carries on
        other = Side()
        await client.open_stream(other)
        await wait_for(lambda: len(other.id_bytes) == 4, what="second stream's ID")

    @d
    async def test_refusals_name_the_status(self):
        client = self.client()
        self.full = True
        with self.assertRaises(H2StreamRefused) as cm:
            await client.open_stream(Side())
        self.assertEqual(cm.exception.status, 404)
        self.full = False
        self.allowed_ip = "192.0.2.7"
        with self.assertRaises(H2StreamRefused) as cm:
            await client.open_stream(Side())
        self.assertEqual(cm.exception.status, 403)
        self.allowed_ip = "127.0.0.1"
        side = Side()
        await client.open_stream(side)
        await wait_for(lambda: len(side.id_bytes) == 4, what="ID")
        self.assertEqual(client.dials, 1)

    @d
    async def test_certificates_through_the_stream(self):
        """``getPeerCertificate`` of a client stream is the server's
        certificate; ``getHandle`` of a server stream is its TLS connection,
        so the server reads its own certificate (the verify fingerprint)."""
        client = self.client()
        t = await client.open_stream(Side())
        await wait_for(lambda: self.server_transports, what="server stream")
        self.assertEqual(fingerprint(t.getPeerCertificate()), self.creds.fingerprint)
        st = self.server_transports[0]
        self.assertEqual(fingerprint(st.getHandle().get_certificate()), self.creds.fingerprint)
        # the helpers the tunnel uses for the verify fingerprint (SPEC-1.14 §3.5)
        self.assertEqual(peer_certificate_fingerprint(t), self.creds.fingerprint)
        self.assertEqual(host_certificate_fingerprint(st), self.creds.fingerprint)
        self.assertEqual(st.getPeer().host, "127.0.0.1")
        self.assertEqual(t.getPeer().port, self.port.getHost().port)
        # tls=1: no SNI
        self.assertIsNone(st.getHandle().get_servername())
        self.assertEqual(st.getHandle().get_protocol_version_name(), "TLSv1.3")

    @d
    async def test_tls2_verifies_and_sends_sni(self):
        client = self.client(tls_code=2, name="localhost")
        t = await client.open_stream(Side())
        await wait_for(lambda: self.server_transports, what="server stream")
        self.assertEqual(self.server_transports[0].getHandle().get_servername(), b"localhost")
        self.assertEqual(fingerprint(t.getPeerCertificate()), self.creds.fingerprint)

    @d
    async def test_tls2_wrong_name_is_refused_in_words(self):
        client = self.client(tls_code=2, name="other.example")
        with self.assertRaises(TLSVerificationFailed) as cm:
            await client.open_stream(Side())
        self.assertIn("other.example", str(cm.exception))

    @d
    async def test_client_close_loses_streams(self):
        client = self.client()
        side = Side()
        await client.open_stream(side)
        await client.close()
        side.reason.trap(error.ConnectionLost)
        with self.assertRaises(H2PoolError):
            await client.open_stream(Side())

    @d
    async def test_connect_failure_fails_the_open(self):
        probe = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        dead = probe.getHost().port
        await probe.stopListening()
        client = self.client(port=dead)
        with self.assertRaises(H2PoolError):
            await client.open_stream(Side())


class PoliteEcho(Echo):
    """An echo target that stops reading while its answers do not drain
    (its transport is its own producer), as a real server would block."""

    def connectionMade(self) -> None:
        self.transport.registerProducer(self.transport, True)


class RelayTests(E2EBase):
    """The relay core (``nodepass.relay.core``) on the server side, between
    a pool stream and a TCP echo target, as the tunnel uses it."""

    def setUp(self):
        super().setUp()
        self.echo, self.echo_factory = listen_tcp(PoliteEcho)
        self.addCleanup(self.echo.stopListening)
        self.relays: list[Relay] = []
        self.relay_closed: Deferred = Deferred()
        self.stream_handler = self.relay_stream
        self.addCleanup(self._targets_gone)

    async def _targets_gone(self) -> None:
        for relay in self.relays:
            if not relay.closed:
                relay.close("test over")
        # (a TCP end closing with unsent bytes stops reading: against an
        # echo that waits for us to read, only an abort ends it)
        await sleep(0.1)
        for echo in list(self.echo_factory.connections):
            echo.transport.abortConnection()
        await wait_for(lambda: not self.echo_factory.connections and all(r.target.lost for r in self.relays),
                       timeout=10, what="target connections closed")

    def relay_stream(self, t: H2StreamTransport) -> None:
        t.write(POOL_ID)  # the pool writes the ID, then the tunnel relays
        end = RelayEnd()
        t.attach(end)
        end.hold()
        d = connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.echo.getHost().port), RelayEnd())

        def spliced(target: RelayEnd) -> None:
            relay = Relay(target, end, InstanceStats(), reactor, on_close=lambda: self.relay_closed.callback(None))
            self.relays.append(relay)
            relay.start()

        d.addCallback(spliced)

    @d
    async def test_round_trip_and_user_close(self):
        client = self.client()
        side = Side()
        t = await client.open_stream(side)
        payload = os.urandom(4 * MiB)
        for i in range(0, len(payload), 256 * 1024):
            t.write(payload[i : i + 256 * 1024])
        await wait_for(lambda: side.received == len(payload), timeout=60, what="echo")
        self.assertEqual(side.id_bytes, POOL_ID)
        self.assertEqual(side.sha.hexdigest(), hashlib.sha256(payload).hexdigest())
        self.assertEqual(self.relays[0].stats.tcp_tx, len(payload))
        t.loseConnection()
        await self.relay_closed
        self.assertEqual(self.relays[0].outcome, "EOF")
        await wait_for(lambda: not self.echo_factory.connections, what="target closed")

    @d
    async def test_target_close_reaches_the_user(self):
        """The target hangs up: the relay closes the stream and the client
        sees EOF (Go's server would leave the stream open)."""
        client = self.client()
        side = Side()
        t = await client.open_stream(side)
        t.write(b"ping")
        await wait_for(lambda: side.received == 4, what="echo")
        self.echo_factory.connections[0].transport.loseConnection()
        await self.relay_closed
        await side.lost
        side.reason.trap(error.ConnectionDone)
        self.assertEqual(self.relays[0].outcome, "EOF")

    @d
    async def test_stalled_user_pushes_back_the_target(self):
        """The user stops reading while the echo target keeps answering:
        the stream's window stops widening, the relay pauses the target's
        socket, and the user's writer is paused in turn; memory bounded."""
        client = self.client()
        side = Side()
        t = await client.open_stream(side)
        t.pauseProducing()
        sender = PushSender(t)
        self.addCleanup(sender.stopProducing)
        await wait_for(lambda: sender.paused, timeout=20, what="user's writer pushed back")
        written = await until_still(lambda: sender.written, what="the bytes the stalled user's writer hands over")
        self.assertTrue(sender.paused)
        self.assertLess(written, 32 * MiB)  # windows, queues, socket buffers
        self.assertLessEqual(t.queued_in, CLIENT_STREAM_WINDOW)
        server_end = self.server_transports_all[0]
        self.assertLessEqual(server_end.queued_out, h2pool.SEND_HIGH_WATER + 256 * 1024)
        t.resumeProducing()
        await wait_for(lambda: side.received >= written, timeout=30, what="it flows again")
        sender.stopProducing()
        t.unregisterProducer()
        await wait_for(lambda: side.received == sender.written, timeout=30, what="every byte echoed")
        t.loseConnection()
        await self.relay_closed


class ChurnTests(E2EBase):
    @d
    async def test_many_short_streams_leave_nothing_behind(self):
        """300 pool streams, closed alternately by either side, over one
        connection: every table (ours and h2's) is empty or small after."""
        client = self.client()
        for batch in range(15):
            sides = [Side() for _ in range(20)]
            transports = await defer.gatherResults([client.open_stream(s) for s in sides])
            await wait_for(lambda: all(len(s.id_bytes) == 4 for s in sides), what="IDs")
            for i, t in enumerate(transports):
                if i % 2:
                    t.loseConnection()
                else:
                    self.server_transports[batch * 20 + i].loseConnection()
            await defer.gatherResults([s.lost for s in sides])
        server = self.server_conns[0]
        await wait_for(lambda: not server.streams, what="server streams forgotten")
        conn = client.connection
        self.assertEqual(client.dials, 1)
        self.assertEqual(conn.streams, {})
        self.assertEqual(conn._blocked, {})
        self.assertEqual(conn.conn.open_outbound_streams, 0)
        self.assertEqual(server.conn.open_inbound_streams, 0)
        self.assertLessEqual(len(conn.conn.streams), 20)
        self.assertLessEqual(len(server.conn.streams), 20)
        self.assertEqual(len(self.server_sides), 300)
        self.assertTrue(all(s.reason.check(error.ConnectionDone) for s in self.server_sides))


class Mute(Protocol):
    """Accepts TCP and says nothing (a TLS handshake never completes)."""

    instances: list = []

    def connectionMade(self) -> None:
        self.gone = False
        Mute.instances.append(self)

    def connectionLost(self, reason) -> None:
        self.gone = True


class TimeoutTests(E2EBase):
    @d
    async def test_handshake_that_never_completes_times_out(self):
        Mute.instances = []
        mute, _ = listen_tcp(Mute)
        self.addCleanup(mute.stopListening)
        client = self.client(port=mute.getHost().port, connect_timeout=0.3)
        with self.assertRaises(H2PoolError) as cm:
            await client.open_stream(Side())
        self.assertIn("timed out", str(cm.exception))
        await wait_for(lambda: Mute.instances and all(m.gone for m in Mute.instances), what="socket closed")
        # the next attempt dials again
        with self.assertRaises(H2PoolError):
            await client.open_stream(Side())
        self.assertEqual(client.dials, 2)
        await wait_for(lambda: all(m.gone for m in Mute.instances), what="sockets closed")


class LimitTests(E2EBase):
    max_streams = 2

    @d
    async def test_streams_beyond_the_limit_wait(self):
        client = self.client()
        a, b = Side(), Side()
        ta = await client.open_stream(a)
        await client.open_stream(b)
        third = client.open_stream(Side())
        fired: list = []
        third.addBoth(lambda r: fired.append(r) or r)
        await sleep(0.2)
        self.assertEqual(fired, [])
        self.assertEqual(len(self.server_transports), 2)
        ta.loseConnection()
        await third
        self.assertEqual(len(self.server_transports), 3)


class FlowControlTests(E2EBase):
    async def _stalled(self, reader: H2StreamTransport, writer: H2StreamTransport, window: int,
                       receiver: Side) -> None:
        reader.pauseProducing()
        sender = PushSender(writer)
        self.addCleanup(sender.stopProducing)
        await wait_for(lambda: sender.paused, timeout=20, what="writer pushed back")
        # nothing more while stalled (once the buffers on the way are full)
        written = await until_still(lambda: sender.written, what="the bytes the stalled writer hands over")
        self.assertTrue(sender.paused)
        # what is in flight: the reader's window, the writer's queue up to
        # its high-water mark, one chunk, socket buffers
        self.assertLess(written, window + h2pool.SEND_HIGH_WATER + 4 * MiB)
        self.assertLessEqual(reader.queued_in, window)
        self.assertLessEqual(writer.queued_out, h2pool.SEND_HIGH_WATER + len(sender.chunk))
        reader.resumeProducing()
        await wait_for(lambda: receiver.received >= written, timeout=20, what="it flows again")
        await wait_for(lambda: sender.written > written, timeout=20, what="writer resumed")
        sender.stopProducing()
        writer.unregisterProducer()

    @d
    async def test_client_reader_paused_pushes_back_the_server_writer(self):
        client = self.client()
        side = Side()
        t = await client.open_stream(side)
        await wait_for(lambda: self.server_transports, what="server stream")
        await self._stalled(t, self.server_transports[0], CLIENT_STREAM_WINDOW, side)

    @d
    async def test_server_reader_paused_pushes_back_the_client_writer(self):
        client = self.client()
        t = await client.open_stream(Side())
        await wait_for(lambda: self.server_transports, what="server stream")
        await self._stalled(self.server_transports[0], t, SERVER_STREAM_WINDOW, self.server_sides[0])

    @d
    async def test_a_stalled_stream_does_not_block_the_others(self):
        """One stream's reader stops; its window fills, but the connection
        window stays open: another stream on the connection moves 4 MiB."""
        client = self.client()
        stalled = await client.open_stream(Side())
        await wait_for(lambda: self.server_transports, what="server stream")
        self.server_transports[0].pauseProducing()
        sender = PushSender(stalled)
        self.addCleanup(sender.stopProducing)
        await wait_for(lambda: sender.paused, timeout=20, what="stalled stream pushed back")
        self.server_payload = os.urandom(4 * MiB)
        other = Side()
        t = await client.open_stream(other)
        t.write(self.server_payload)
        await wait_for(lambda: other.received == 4 * MiB and self.server_sides[1].received == 4 * MiB,
                       timeout=30, what="the other stream's bytes")
        self.assertEqual(other.sha.hexdigest(), hashlib.sha256(self.server_payload).hexdigest())
        self.assertTrue(sender.paused)


class KeepAliveTests(E2EBase):
    server_report_interval = 0.2

    @d
    async def test_ping_keeps_the_connection(self):
        client = self.client(report_interval=0.2)
        side = Side()
        await client.open_stream(side)
        conn = client.connection
        await sleep(1.2)  # six intervals: the server's silence bound is three
        self.assertIs(client.connection, conn)
        self.assertFalse(conn.closed)
        self.assertGreaterEqual(conn._ping_count, 4)
        self.assertIsNone(side.reason)
        self.assertEqual(len(self.server_conns), 1)
        self.assertFalse(self.server_conns[0].closed)

    @d
    async def test_dead_peer_is_dropped_and_the_next_stream_redials(self):
        client = self.client(report_interval=0.2)
        side = Side()
        await client.open_stream(side)
        first = client.connection
        # the server stops answering: its socket is no longer read
        self.server_conns[0].transport.transport.stopReading()
        await side.lost
        side.reason.trap(error.ConnectionLost)
        self.assertTrue(first.closed)
        self.assertIn("PING", first.close_reason)
        again = Side()
        await client.open_stream(again)
        await wait_for(lambda: len(again.id_bytes) == 4, what="stream on the new connection")
        self.assertEqual(client.dials, 2)
        self.assertIsNot(client.connection, first)
        await wait_for(lambda: self.server_conns[0].closed, what="server drops the silent connection")

    @d
    async def test_server_idle_timeout_then_redial(self):
        client = self.client(report_interval=5.0)
        t = await client.open_stream(Side())
        first = client.connection
        t.loseConnection()
        await wait_for(lambda: first.closed, timeout=5, what="idle connection closed by the server")
        self.assertIn("GOAWAY", first.close_reason)
        side = Side()
        await client.open_stream(side)
        await wait_for(lambda: len(side.id_bytes) == 4, what="stream on a new connection")
        self.assertEqual(client.dials, 2)


class HostileTests(E2EBase):
    """Whatever reaches the port, the server stays quiet and bounded: no
    exception, no stream, the connection closed."""

    async def _connect(self, proto: Protocol, tls: Any = None) -> Protocol:
        made: Deferred = Deferred()

        class F(ClientFactory):
            noisy = False

            def buildProtocol(self, addr):
                orig = proto.connectionMade

                def connection_made():
                    orig()
                    made.callback(proto)

                proto.connectionMade = connection_made
                return proto

            def clientConnectionFailed(self, connector, reason):
                made.errback(reason)

        port = self.port.getHost().port
        if tls is None:
            reactor.connectTCP("127.0.0.1", port, F())
        else:
            reactor.connectSSL("127.0.0.1", port, F(), tls)
        return await made

    async def _closed_by_server(self, proto: Recorder) -> None:
        await proto.lost
        await wait_for(lambda: self.server_conns and all(p.closed for p in self.server_conns), what="server closed")
        self.assertEqual(self.server_transports, [])

    @d
    async def test_raw_garbage(self):
        rec = Recorder()
        await self._connect(rec)
        rec.transport.write(os.urandom(512))
        await rec.lost
        await wait_for(lambda: all(p.transport_gone for p in self.server_conns), what="server side gone")

    @d
    async def test_tls_without_alpn(self):
        rec = Recorder()
        await self._connect(rec, ssl.CertificateOptions(verify=False, raiseMinimumTo=TLSVersion.TLSv1_3))
        rec.transport.write(b"hello")
        await self._closed_by_server(rec)

    @d
    async def test_tls_with_another_alpn(self):
        rec = Recorder()
        tls = ssl.CertificateOptions(verify=False, raiseMinimumTo=TLSVersion.TLSv1_3,
                                     acceptableProtocols=[b"http/1.1"])
        await self._connect(rec, tls)
        rec.transport.write(b"GET / HTTP/1.1\r\n\r\n")
        await rec.lost
        await wait_for(lambda: all(p.transport_gone for p in self.server_conns), what="server side gone")
        self.assertEqual(self.server_transports, [])

    @d
    async def test_h2_alpn_with_garbage(self):
        rec = Recorder()
        tls = ssl.CertificateOptions(verify=False, raiseMinimumTo=TLSVersion.TLSv1_3, acceptableProtocols=[b"h2"])
        await self._connect(rec, tls)
        rec.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await self._closed_by_server(rec)

    @d
    async def test_h2_alpn_and_silence(self):
        rec = Recorder()
        tls = ssl.CertificateOptions(verify=False, raiseMinimumTo=TLSVersion.TLSv1_3, acceptableProtocols=[b"h2"])
        await self._connect(rec, tls)
        await wait_for(lambda: self.server_conns, what="accepted")
        self.server_conns[0].preface_timeout = 0.2
        # (the timer was armed with the default; re-arm as a short one)
        self.server_conns[0]._preface_timer.reset(0.2)
        await self._closed_by_server(rec)

    @d
    async def test_client_to_a_server_without_alpn(self):
        """Our client refuses a server that does not agree to h2."""
        plain = reactor.listenSSL(0, Factory.forProtocol(Protocol), self.creds.context_factory(),
                                  interface="127.0.0.1")
        self.addCleanup(plain.stopListening)
        client = self.client(port=plain.getHost().port)
        # Twisted >= 26 servers fail the handshake when no protocol
        # overlaps; older ones complete it without ALPN and our client
        # refuses (ClientFrameTests.test_no_alpn_is_refused).
        with self.assertRaises(H2PoolError):
            await client.open_stream(Side())
