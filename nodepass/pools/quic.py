"""QUIC pool transport (SPEC §4, ``quic=1``).

With ``quic=1`` the control channel stays on TCP, but pool connections are
bidirectional streams of QUIC connections from the client to the server's
tunnel UDP port (ALPN ``np-quic``, TLS 1.3).  Each stream starts like a TCP
pool connection: the client writes one byte (``0x00``: a QUIC peer only
learns of a stream once something is sent on it), the server answers with
the 4 random bytes of the pool ID, and from then on the stream is one relay
end.

The QUIC state machine is aioquic's sans-I/O ``QuicConnection``; this module
drives it from the reactor (a ``DatagramProtocol`` per UDP port, one
``DelayedCall`` per connection for its timers) and presents every stream as
an ordinary Twisted transport, so the pools, relays and UDP bridges of
:mod:`nodepass.tunnel` use it unchanged:

* reading is a push producer: a paused stream stops widening its QUIC
  receive window, so the peer stops sending once one window
  (:data:`STREAM_WINDOW`) is buffered -- nothing grows without bound;
* writing is a consumer: when more than :data:`SEND_HIGH_WATER` bytes are
  written but not yet acknowledged, the registered producer is paused until
  acknowledgements bring it under :data:`SEND_LOW_WATER`.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
from typing import Any, Callable, Optional, Union

from aioquic.buffer import Buffer
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.packet import QuicPacketType, encode_quic_version_negotiation, pull_quic_header
from aioquic.quic.stream import QuicStream
from twisted.internet import address, defer, error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IPushProducer, ITransport
from twisted.internet.protocol import DatagramProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from nodepass.base.logs import NodeLog
from nodepass.compat import aioquic_internals as quic_internals
from nodepass.compat.twisted_internals import socket_of

ALPN = "np-quic"

# aioquic reports through the stdlib logging module; without a handler its
# warnings would reach stderr past our own log (SPEC §7 lines only).
logging.getLogger("quic").addHandler(logging.NullHandler())
logging.getLogger("quic").propagate = False

#: Receive window per stream: what a paused stream may still have to hold.
STREAM_WINDOW = 1024 * 1024
#: Unacknowledged bytes on a stream above which its producer is paused ...
SEND_HIGH_WATER = 1024 * 1024
#: ... and below which it is resumed.
SEND_LOW_WATER = 256 * 1024
#: Concurrent bidirectional streams a peer may open on one connection, as
#: Go NodePass allows (further streams wait for earlier ones to finish).
MAX_STREAMS_PER_CONN = 128
#: QUIC connections one server accepts at once (Go clients open up to
#: ``ceil(max / 128)`` of them, at most 64).
MAX_CONNS = 64
#: UDP payload we send: fits a 1500-byte Ethernet path over IPv6.
MAX_DATAGRAM = 1350
#: Socket buffers for the UDP port (the kernel may cap them lower).
SOCKET_BUFFER = 4 * 1024 * 1024
#: QUIC versions aioquic speaks (others get a version negotiation packet).
SUPPORTED_VERSIONS = list(QuicConfiguration().supported_versions)


class QuicPoolError(Exception):
    """A QUIC pool connection could not be set up or was closed."""


class QuicHandshakeError(QuicPoolError):
    """A QUIC connection ended before its handshake completed (no answer on
    the UDP port, or refused)."""


class QuicTLSVerificationError(QuicHandshakeError):
    """The TLS handshake of a QUIC connection failed (a certificate that
    does not verify, a host name mismatch, no common ALPN)."""


class _Connection(quic_internals.SlidingWindowConnection):
    """aioquic's connection with receive windows that follow the relay.

    aioquic doubles a stream's window whenever half of it is used, whether
    or not the application has taken the data, so a stalled reader could be
    sent ever more.  Here a stream's window slides: at most
    :data:`STREAM_WINDOW` beyond what was received, widened only while the
    stream's reader is not paused."""

    receive_window = STREAM_WINDOW

    def __init__(self, *args: Any, peer_streams: int = MAX_STREAMS_PER_CONN, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # Streams the peer may have open at once (the transport parameter
        # initial_max_streams_bidi); raised by one as each finishes.  1.12
        # allows 128 per connection, 1.14 the pool's max (SPEC-1.14 §4.3).
        quic_internals.allow_peer_streams(self, peer_streams)


def _twisted_address(addr: tuple) -> Union[address.IPv4Address, address.IPv6Address]:
    host, port = addr[0], addr[1]
    if ":" in host:
        return address.IPv6Address("UDP", host, port)
    return address.IPv4Address("UDP", host, port)


@implementer(ITransport, IPushProducer, IConsumer)
class QuicStreamTransport:
    """One bidirectional QUIC stream as a Twisted transport."""

    #: The relay may hand us views of its shared read buffer: aioquic
    #: copies what it is given before ``write`` returns.
    takes_views = True
    quic_stream = True
    disconnecting = False

    def __init__(self, session: "QuicSession", stream_id: int):
        self.session = session
        self.stream_id = stream_id
        self.protocol: Any = None  # the relay end attached to the stream
        self.connected = True
        self.held = False
        self.producer = None
        self.producer_paused = False
        self._pending: list[bytes] = []
        self._fin_sent = False
        self._peer_fin = False
        self._lost = False

    # -- wiring -------------------------------------------------------------
    def attach(self, protocol) -> None:
        self.protocol = protocol
        protocol.makeConnection(self)

    def _stream(self) -> Optional[QuicStream]:
        return self.session.stream_table.get(self.stream_id)

    # -- ITransport -----------------------------------------------------------
    def write(self, data) -> None:
        if self._lost or self._fin_sent or not data:
            return
        session = self.session
        try:
            session.conn.send_stream_data(self.stream_id, data)
        except Exception as e:  # noqa: BLE001 - stream reset/stopped by the peer
            self._connection_lost(error.ConnectionLost(f"QUIC stream write failed: {e}"))
            return
        session.want_send()
        if self.producer is not None and not self.producer_paused and self.unacked() > SEND_HIGH_WATER:
            self.producer_paused = True
            session.pressured.add(self)
            self.producer.pauseProducing()

    def writeSequence(self, seq) -> None:
        self.write(b"".join(seq))

    def unacked(self) -> int:
        stream = self._stream()
        if stream is None:
            return 0
        written, acknowledged = quic_internals.sender_offsets(stream)
        return written - acknowledged

    def relieve(self) -> bool:
        """After acknowledgements: resume the producer once under the low
        water mark.  True when no longer pressured."""
        if self._lost or self.producer is None:
            self.producer_paused = False
            return True
        if self.unacked() <= SEND_LOW_WATER:
            self.producer_paused = False
            self.producer.resumeProducing()
            return True
        return False

    def loseConnection(self) -> None:
        """Finish our direction (FIN after everything written), ask the peer
        to stop sending, and report the stream lost on the next turn."""
        if self._lost or self.disconnecting:
            return
        self.disconnecting = True
        self._finish_stream(stop=True)
        self.session.want_send()
        self.session.reactor.callLater(0, self._connection_lost, error.ConnectionDone("stream closed"))

    def abortConnection(self) -> None:
        if self._lost:
            return
        conn = self.session.conn
        if not self._fin_sent:
            self._fin_sent = True
            try:
                conn.reset_stream(self.stream_id, 0)
            except Exception:  # noqa: BLE001
                pass
        self._stop_receiving()
        self.session.want_send()
        self._connection_lost(error.ConnectionAborted("stream reset"))

    def _finish_stream(self, stop: bool) -> None:
        conn = self.session.conn
        if not self._fin_sent:
            self._fin_sent = True
            try:
                conn.send_stream_data(self.stream_id, b"", end_stream=True)
            except Exception:  # noqa: BLE001 - already reset by the peer
                pass
        if stop:
            self._stop_receiving()

    def _stop_receiving(self) -> None:
        if self._peer_fin:
            return
        stream = self._stream()
        if stream is None or quic_internals.receive_finished(stream):
            return
        try:
            self.session.conn.stop_stream(self.stream_id, 0)
        except Exception:  # noqa: BLE001
            pass

    def getPeer(self):
        return _twisted_address(self.session.peer)

    def getHost(self):
        return self.session.host()

    def getPeerCertificate(self):
        return self.session.peer_certificate()

    def getHandle(self):
        return None

    # -- IPushProducer (our reading) -----------------------------------------
    def pauseProducing(self) -> None:
        if not self.held:
            self.held = True
            stream = self._stream()
            if stream is not None:
                quic_internals.hold(stream, True)

    def resumeProducing(self) -> None:
        if not self.held or self._lost:
            return
        self.held = False
        stream = self._stream()
        if stream is not None:
            quic_internals.hold(stream, False)
        while self._pending and not self.held and not self._lost:
            self.protocol.dataReceived(self._pending.pop(0))
        if self._peer_fin and not self._pending and not self.held:
            self._connection_lost(error.ConnectionDone("stream finished by the peer"))
        self.session.want_send()  # the window may widen now

    def stopProducing(self) -> None:
        self.loseConnection()

    # -- IConsumer (our writing) ---------------------------------------------
    def registerProducer(self, producer, streaming: bool) -> None:
        if self.producer is not None:
            raise RuntimeError("a producer is already registered")
        self.producer = producer
        self.producer_paused = False

    def unregisterProducer(self) -> None:
        self.producer = None
        self.producer_paused = False
        self.session.pressured.discard(self)

    # -- from the session -----------------------------------------------------
    def data_received(self, data: bytes, end_stream: bool) -> None:
        if self._lost:
            return
        if end_stream:
            self._peer_fin = True
        if data:
            if self.held or self._pending:
                self._pending.append(data)
            else:
                self.protocol.dataReceived(data)
        if self._peer_fin and not self._pending and not self.held and not self._lost:
            self._connection_lost(error.ConnectionDone("stream finished by the peer"))

    def stopped_by_peer(self) -> None:
        """STOP_SENDING: the peer reads no more of this stream (RFC 9000
        §3.5).  Only our direction ends; aioquic has reset it already, so
        writes are dropped from here on.  What the peer sends us is still
        delivered: a peer that closes sends its FIN after its last bytes
        and STOP_SENDING with it, and aioquic reports STOP_SENDING first
        when both come in one packet (control frames lead).  Ending the
        stream here would throw away an answer the target sent just
        before it hung up.  The stream ends with the peer's FIN or reset."""
        if self._lost:
            return
        self._fin_sent = True
        if self._peer_fin and not self._pending and not self.held:
            self._connection_lost(error.ConnectionDone("stream finished by the peer"))

    def reset_by_peer(self, why: str) -> None:
        self._peer_fin = True
        self._pending = []
        self._connection_lost(error.ConnectionLost(why))

    def _connection_lost(self, reason: Exception) -> None:
        if self._lost:
            return
        self._lost = True
        self.connected = False
        self._pending = []
        session = self.session
        session.forget(self)
        if not session.closed:
            # Finish our side too, so both ends can discard the stream.
            self._finish_stream(stop=not self._peer_fin)
            session.want_send()
        producer, self.producer = self.producer, None
        if producer is not None:
            producer.stopProducing()
        protocol = self.protocol
        if protocol is not None:
            protocol.connectionLost(Failure(reason))
            # The protocol holds this stream as its ``transport`` (and its
            # pause gate does too): let go of it now that it has been told,
            # so that the pair is freed by reference counting, not left in a
            # cycle, one per relayed connection, for the garbage collector.
            # Late calls find a lost stream and do nothing.
            self.protocol = None


class QuicSession:
    """One QUIC connection driven by the reactor.

    ``send(data, addr)`` puts a datagram on the wire; ``on_stream`` (server)
    is given a :class:`QuicStreamTransport` for each stream the peer opens;
    ``on_closed`` is called once when the connection ends.
    """

    def __init__(
        self,
        conn: _Connection,
        peer,
        port: "QuicPort",
        reactor,
        keepalive: float,
        on_stream: Optional[Callable[[QuicStreamTransport], None]] = None,
        on_closed: Optional[Callable[["QuicSession"], None]] = None,
    ):
        self.conn = conn
        #: The connection's streams by ID (aioquic's own table).
        self.stream_table = quic_internals.stream_table(conn)
        self.peer = peer
        self.port = port
        self.reactor = reactor
        self.keepalive = keepalive
        self.on_stream = on_stream
        self.on_closed = on_closed
        self.streams: dict[int, QuicStreamTransport] = {}
        self.pressured: set[QuicStreamTransport] = set()
        self._ready_waiters: list[Deferred] = []
        self.closed = False
        self.close_reason = ""
        self.handshake_done = False
        self._send_call = None
        self._timer = None
        self._ping_call = None
        self._ping_uid = 0
        self._cids: set[bytes] = set()

    # -- I/O ----------------------------------------------------------------
    def datagram_received(self, data: bytes, addr) -> None:
        if self.closed:
            return
        self.conn.receive_datagram(data, addr, self.reactor.seconds())
        self._process()
        if self.pressured:
            for t in list(self.pressured):
                if t.relieve():
                    self.pressured.discard(t)
        self.want_send()

    def want_send(self) -> None:
        """Send what the connection has queued, once per reactor turn."""
        if self._send_call is None and not self.closed:
            self._send_call = self.reactor.callLater(0, self._send)

    def _send(self) -> None:
        self._send_call = None
        if self.closed:
            return
        now = self.reactor.seconds()
        send = self.port.send
        for data, addr in self.conn.datagrams_to_send(now):
            send(data, addr)
        self._arm_timer(now)

    def _arm_timer(self, now: float) -> None:
        when = self.conn.get_timer()
        if when is None:
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None
            return
        delay = max(0.0, when - now)
        if self._timer is not None and self._timer.active():
            self._timer.reset(delay)
        else:
            self._timer = self.reactor.callLater(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.closed:
            return
        self.conn.handle_timer(self.reactor.seconds())
        self._process()
        self._send()

    def _ping(self) -> None:
        self._ping_call = None
        if self.closed:
            return
        self._ping_uid += 1
        self.conn.send_ping(self._ping_uid)
        self.want_send()
        self._ping_call = self.reactor.callLater(self.keepalive, self._ping)

    # -- events ---------------------------------------------------------------
    def _process(self) -> None:
        conn = self.conn
        while True:
            ev = conn.next_event()
            if ev is None:
                return
            if isinstance(ev, events.StreamDataReceived):
                t = self.streams.get(ev.stream_id)
                if t is None:
                    t = self._remote_stream(ev.stream_id)
                    if t is None:
                        continue
                t.data_received(ev.data, ev.end_stream)
            elif isinstance(ev, events.StreamReset):
                t = self.streams.get(ev.stream_id)
                if t is not None:
                    t.reset_by_peer(f"QUIC stream reset by the peer (code {ev.error_code})")
            elif isinstance(ev, events.StopSendingReceived):
                t = self.streams.get(ev.stream_id)
                if t is not None:
                    t.stopped_by_peer()
            elif isinstance(ev, events.HandshakeCompleted):
                self.handshake_done = True
                if self.keepalive > 0:
                    self._ping_call = self.reactor.callLater(self.keepalive, self._ping)
                waiters, self._ready_waiters = self._ready_waiters, []
                for d in waiters:
                    d.callback(self)
            elif isinstance(ev, events.ConnectionIdIssued):
                self._cids.add(ev.connection_id)
                self.port.cid_issued(ev.connection_id, self)
            elif isinstance(ev, events.ConnectionIdRetired):
                self._cids.discard(ev.connection_id)
                self.port.cid_retired(ev.connection_id, self)
            elif isinstance(ev, events.ConnectionTerminated):
                self._terminated(ev)
                return

    def _remote_stream(self, stream_id: int) -> Optional[QuicStreamTransport]:
        """A stream the peer opened: bidirectional and peer-initiated only."""
        peer_initiated = (stream_id & 1) == (0 if not self.conn.configuration.is_client else 1)
        if stream_id & 2 or not peer_initiated or self.on_stream is None or self.closed:
            return None
        stream = self.stream_table.get(stream_id)
        if stream is None or not quic_internals.claim(stream):
            return None  # a stream we already closed: late data
        t = QuicStreamTransport(self, stream_id)
        self.streams[stream_id] = t
        self.on_stream(t)
        return t

    def _terminated(self, ev: events.ConnectionTerminated) -> None:
        reason = ev.reason_phrase or f"error code {ev.error_code:#x}"
        if not self.handshake_done and 0x100 <= ev.error_code <= 0x1FF:
            exc: Exception = QuicTLSVerificationError(self._tls_failure_text(reason))
        elif not self.handshake_done:
            exc = QuicHandshakeError(f"QUIC handshake failed: {reason}")
        else:
            exc = QuicPoolError(f"QUIC connection closed: {reason}")
        self._shutdown(exc)

    def _tls_failure_text(self, reason: str) -> str:
        """A failed TLS handshake in words: for a certificate this client
        refused, what is wrong with it (names, issuer, dates) rather than
        aioquic's text with reprs of the name patterns."""
        from nodepass.net.tls import explain_verification_failure, is_verification_failure

        conn = self.conn
        if not conn.configuration.is_client or not is_verification_failure(reason):
            return f"QUIC TLS handshake failed: {reason}"
        leaf, rest = quic_internals.peer_certificates(conn)
        chain = [leaf, *rest] if leaf is not None else []
        return explain_verification_failure(reason, conn.configuration.server_name or "", chain)

    def _shutdown(self, exc: Exception) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = str(exc)
        for call in (self._send_call, self._timer, self._ping_call):
            if call is not None and call.active():
                call.cancel()
        self._send_call = self._timer = self._ping_call = None
        for t in list(self.streams.values()):
            t._connection_lost(error.ConnectionLost(str(exc)))
        self.streams.clear()
        self.pressured.clear()
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            d.errback(exc)
        for cid in list(self._cids):
            self.port.cid_retired(cid, self)
        self._cids.clear()
        if self.on_closed is not None:
            cb, self.on_closed = self.on_closed, None
            cb(self)

    # -- for streams and owners -------------------------------------------------
    def when_ready(self) -> Deferred:
        """Fires with this session once its handshake is complete, or fails
        when the connection ends first."""
        if self.handshake_done and not self.closed:
            return defer.succeed(self)
        if self.closed:
            return defer.fail(QuicPoolError(self.close_reason or "QUIC connection closed"))
        d: Deferred[QuicSession] = Deferred()
        self._ready_waiters.append(d)
        return d

    def open_stream(self, protocol) -> QuicStreamTransport:
        """A new stream of ours, connected to ``protocol``."""
        if self.closed:
            raise QuicPoolError(self.close_reason or "QUIC connection closed")
        stream_id = self.conn.get_next_available_stream_id()
        t = QuicStreamTransport(self, stream_id)
        self.streams[stream_id] = t
        t.attach(protocol)
        return t

    def forget(self, t: QuicStreamTransport) -> None:
        if self.streams.get(t.stream_id) is t:
            del self.streams[t.stream_id]
        self.pressured.discard(t)

    def host(self):
        return self.port.host()

    def peer_certificate(self) -> Optional[Any]:
        return quic_internals.peer_certificates(self.conn)[0]

    def close(self, reason: str = "pool closed") -> None:
        """Send CONNECTION_CLOSE and drop every stream now."""
        if self.closed:
            return
        try:
            self.conn.close(error_code=0, reason_phrase=reason)
            for data, addr in self.conn.datagrams_to_send(self.reactor.seconds()):
                self.port.send(data, addr)
        except Exception:  # noqa: BLE001 - nothing more to say to the peer
            pass
        self._shutdown(QuicPoolError(f"QUIC connection closed: {reason}"))


class QuicPort(DatagramProtocol):
    """The UDP side shared by server and client: sending without blocking
    and bigger socket buffers."""

    noisy = False
    #: The UDP port (``IUDPTransport``; typed loosely because mypy cannot
    #: call a zope interface's methods).
    transport: Any

    def __init__(self, reactor, log: NodeLog):
        self.reactor = reactor
        self.log = log
        self._sock = None

    def startProtocol(self) -> None:
        sock = socket_of(self.transport)
        self._sock = sock
        if sock is not None:
            for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
                except OSError:
                    pass

    def send(self, data: bytes, addr) -> None:
        sock = self._sock
        try:
            if sock is not None:
                sock.sendto(data, addr[:2])
            elif self.transport is not None:
                self.transport.write(data, addr[:2])
        except (BlockingIOError, InterruptedError):
            pass  # a full socket buffer is packet loss: QUIC resends
        except OSError as e:
            self.log.debug("QUIC send to %s failed: %s", addr[0], e)

    def host(self):
        if self.transport is None:
            return None
        return self.transport.getHost()

    def cid_issued(self, cid: bytes, session: QuicSession) -> None:
        pass

    def cid_retired(self, cid: bytes, session: QuicSession) -> None:
        pass


def _base_configuration(is_client: bool, keepalive: float) -> QuicConfiguration:
    """What both ends share: ALPN, datagram size, windows, and an idle
    timeout of three keep-alive periods (as Go NodePass sets quic-go's)."""
    return QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[ALPN],
        idle_timeout=3 * keepalive if keepalive > 0 else 60.0,
        max_datagram_size=MAX_DATAGRAM,
        max_stream_data=STREAM_WINDOW,
        max_data=16 * STREAM_WINDOW,
    )


class QuicPoolServer(QuicPort):
    """The server's tunnel UDP port: QUIC connections from the control
    connection's IP only (SPEC §3.2 step 6); every stream they open is
    handed to ``on_stream``.

    ``material()`` gives ``(certificate, chain, private_key)`` for each new
    connection, so a reloaded ``tls=2`` certificate is used at once."""

    def __init__(
        self,
        reactor,
        log: NodeLog,
        material: Callable[[], tuple],
        allowed_ip: Callable[[], Optional[str]],
        on_stream: Callable[[QuicStreamTransport], None],
        keepalive: float,
        peer_streams: int = MAX_STREAMS_PER_CONN,
    ):
        super().__init__(reactor, log)
        self.peer_streams = peer_streams
        self.material = material
        self.allowed_ip = allowed_ip
        self.on_stream = on_stream
        self.keepalive = keepalive
        self.by_cid: dict[bytes, QuicSession] = {}
        self.sessions: set[QuicSession] = set()
        self.closed = False

    def datagramReceived(self, data: bytes, addr) -> None:
        if self.closed:
            return
        allowed = self.allowed_ip()
        if allowed is None or addr[0] != allowed:
            return  # not our client: say nothing (no amplification, no probe answers)
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=8)
        except ValueError:
            return
        supported = SUPPORTED_VERSIONS
        if (
            header.packet_type != QuicPacketType.VERSION_NEGOTIATION
            and header.version is not None
            and header.version not in supported
        ):
            self.send(
                encode_quic_version_negotiation(
                    source_cid=header.destination_cid,
                    destination_cid=header.source_cid,
                    supported_versions=supported,
                ),
                addr,
            )
            return
        session = self.by_cid.get(header.destination_cid)
        if session is None:
            if header.packet_type != QuicPacketType.INITIAL or len(data) < 1200:
                return
            if len(self.sessions) >= MAX_CONNS:
                self.log.debug("QUIC: %d connections already, ignoring another from %s", MAX_CONNS, addr[0])
                return
            session = self._accept(header.destination_cid, addr)
            if session is None:
                return
        session.datagram_received(data, addr)

    def _accept(self, original_cid: bytes, addr) -> Optional[QuicSession]:
        try:
            cert, chain, key = self.material()
        except Exception as e:  # noqa: BLE001
            self.log.error("QUIC: no certificate for a new connection: %s", e)
            return None
        cfg = _base_configuration(False, self.keepalive)
        cfg.certificate = cert
        cfg.certificate_chain = list(chain)
        cfg.private_key = key
        conn = _Connection(
            configuration=cfg, original_destination_connection_id=original_cid, peer_streams=self.peer_streams
        )
        session = QuicSession(
            conn, addr, self, self.reactor, self.keepalive, on_stream=self.on_stream, on_closed=self._closed
        )
        self.sessions.add(session)
        self.by_cid[original_cid] = session
        self.by_cid[conn.host_cid] = session
        session._cids.update((original_cid, conn.host_cid))
        self.log.debug("QUIC connection from %s", addr[0])
        return session

    def cid_issued(self, cid: bytes, session: QuicSession) -> None:
        self.by_cid[cid] = session

    def cid_retired(self, cid: bytes, session: QuicSession) -> None:
        if self.by_cid.get(cid) is session:
            del self.by_cid[cid]

    def _closed(self, session: QuicSession) -> None:
        if not session.handshake_done and not self.closed:
            self.log.debug("QUIC connection from %s ended before its handshake: %s", session.peer[0], session.close_reason)
        self.sessions.discard(session)
        for cid, s in list(self.by_cid.items()):
            if s is session:
                del self.by_cid[cid]

    def close_all(self, reason: str = "pool closed") -> None:
        self.closed = True
        for session in list(self.sessions):
            session.close(reason)
        self.sessions.clear()
        self.by_cid.clear()


def _verify_locations() -> dict:
    """Where a verifying client finds its roots: ``SSL_CERT_FILE`` /
    ``SSL_CERT_DIR`` and OpenSSL's default paths, as the TCP pool's
    platform trust does; certifi's bundle when there are none."""
    paths = ssl.get_default_verify_paths()
    cafile = paths.cafile if paths.cafile and os.path.exists(paths.cafile) else None
    capath = paths.capath if paths.capath and os.path.isdir(paths.capath) else None
    out = {}
    if cafile:
        out["cafile"] = cafile
    if capath:
        out["capath"] = capath
    return out


class _ClientPort(QuicPort):
    """The UDP socket of one client connection (each QUIC connection of a
    client gets its own, as Go's ``quic.DialAddr`` does)."""

    session: Optional[QuicSession] = None

    def datagramReceived(self, data: bytes, addr) -> None:
        s = self.session
        if s is not None and not s.closed:
            s.datagram_received(data, addr)


def connections_for(max_pool: int) -> int:
    """How many QUIC connections a client may spread its pool over: one per
    :data:`MAX_STREAMS_PER_CONN` streams of the server's ``max``, within
    [1, :data:`MAX_CONNS`] (what Go NodePass's client does)."""
    return max(1, min(MAX_CONNS, -(-max_pool // MAX_STREAMS_PER_CONN)))


class QuicPoolClient:
    """The client's QUIC connections to the server's tunnel UDP port.

    :meth:`connect` gives a live session with stream credit left, dialling a
    new connection when every live one has used up the streams its peer
    allows (up to ``max_conns``), or when the last one ended."""

    def __init__(
        self,
        reactor,
        log: NodeLog,
        server: tuple[str, int],
        tls_code: int,
        hostname: str,
        keepalive: float,
        max_conns: int = 1,
        interface: str = "",
    ):
        self.reactor = reactor
        self.log = log
        self.server = server
        self.tls_code = tls_code
        self.hostname = hostname
        self.keepalive = keepalive
        self.max_conns = max(1, max_conns)
        self.interface = interface or ("::" if ":" in server[0] else "")
        self.sessions: list[QuicSession] = []
        self._ports: dict[QuicSession, Any] = {}  # IListeningPort
        self._stopping: list[Deferred] = []
        self.closed = False

    def _configuration(self) -> QuicConfiguration:
        cfg = _base_configuration(True, self.keepalive)
        if self.tls_code == 2:
            cfg.verify_mode = ssl.CERT_REQUIRED
            cfg.server_name = self.hostname
            for k, v in _verify_locations().items():
                setattr(cfg, k, v)
        else:
            cfg.verify_mode = ssl.CERT_NONE
            cfg.server_name = self.hostname or None
        return cfg

    @staticmethod
    def has_credit(session: QuicSession) -> bool:
        """The peer still lets this connection open another stream now."""
        return quic_internals.has_stream_credit(session.conn)

    def _dial(self) -> QuicSession:
        proto = _ClientPort(self.reactor, self.log)
        port = self.reactor.listenUDP(0, proto, interface=self.interface, maxPacketSize=65535)
        conn = _Connection(configuration=self._configuration())
        s = QuicSession(conn, self.server, proto, self.reactor, self.keepalive, on_closed=self._closed)
        proto.session = s
        self._ports[s] = port
        self.sessions.append(s)
        conn.connect(self.server, now=self.reactor.seconds())
        s._send()
        return s

    def connect(self) -> Deferred:
        """Fires with a handshake-complete :class:`QuicSession`."""
        if self.closed:
            return defer.fail(QuicPoolError("QUIC pool closed"))
        live = [s for s in self.sessions if not s.closed]
        for s in live:
            if s.handshake_done and self.has_credit(s):
                return defer.succeed(s)
        for s in live:
            if not s.handshake_done:
                return s.when_ready()
        if len(live) < self.max_conns:
            try:
                return self._dial().when_ready()
            except Exception as e:  # noqa: BLE001 - no UDP socket
                return defer.fail(QuicPoolError(f"cannot open a UDP socket: {e}"))
        # Every connection is at its stream limit: queue on the least
        # loaded one; the stream opens when an earlier one finishes.
        return defer.succeed(min(live, key=lambda s: s.conn.get_next_available_stream_id()))

    def _closed(self, session: QuicSession) -> None:
        if session in self.sessions:
            self.sessions.remove(session)
        if not session.handshake_done and not self.closed:
            self.log.debug("QUIC connection to the server ended: %s", session.close_reason)
        port = self._ports.pop(session, None)
        if port is not None:
            d = defer.maybeDeferred(port.stopListening)
            self._stopping.append(d)

            def stopped(result: object) -> object:
                if d in self._stopping:
                    self._stopping.remove(d)
                return result

            d.addBoth(stopped)

    def open_stream(self, protocol) -> Deferred:
        """Connect ``protocol`` to a new stream once a session is up."""
        d = self.connect()
        d.addCallback(self._open_on, protocol)
        return d

    def _open_on(self, session: QuicSession, protocol):
        # Several dials may have waited on one handshake: those past its
        # stream credit ask again, which may dial another connection.  When
        # every connection is full, connect() answers the same least loaded
        # one twice and the stream opens there, to wait for credit.
        if session.closed or self.has_credit(session):
            return session.open_stream(protocol)
        d = self.connect()
        d.addCallback(lambda other: other.open_stream(protocol) if other is session else self._open_on(other, protocol))
        return d

    def close(self, reason: str = "pool closed") -> Deferred:
        """Close every connection; fires when their UDP ports are closed."""
        self.closed = True
        for s in list(self.sessions):
            s.close(reason)
        return defer.DeferredList(list(self._stopping))
