"""HTTP/2 pool transport (SPEC-1.14 §4.5, pool ``type=3``).

The client keeps **one** TCP connection to the server's tunnel port, with
TLS 1.3 and ALPN ``h2``; every pool entry is one HTTP/2 stream on it:

* the client sends HEADERS (``POST https://{sni}/stream``, no END_STREAM)
  and at once a DATA frame holding one byte ``00``;
* the server checks the request (404 ``not found`` for another path or
  method or while its pool is full, 403 ``unauthorized`` for a foreign IP),
  reads the byte, answers HEADERS ``:status 200`` (no END_STREAM), and the
  pool then writes the 4 ID bytes as the first DATA frame of the response;
* from then on the request body and the response body are the two
  directions of one relay end.

The HTTP/2 state machine is the sans-I/O ``h2`` library, driven from one
:class:`~twisted.internet.protocol.Protocol` per TLS connection
(:class:`H2PoolServerProtocol`, :class:`H2ClientProtocol`), and each stream
is presented as an ordinary Twisted transport (:class:`H2StreamTransport`),
as :mod:`nodepass.pools.quic` does for QUIC streams, so relays, pools and UDP
bridges use it unchanged.

The bulk path: the TLS connection runs the fast TLS data path
(``nodepass.relay.tls_fast``: gathered records in, whole writes into
OpenSSL) instead of Twisted's 16 KiB-at-a-time layer; DATA frames are up to
:data:`MAX_DATA_FRAME` and leave as header and payload without being
copied into h2's output buffer, received frames are parsed where the TLS
path decrypted them (each body copied once), and h2 no longer formats every
received frame for its trace log (``nodepass.compat.h2_internals``); the
output of one write is flushed once.

Flow control (what keeps memory bounded):

* reading is a push producer: a stream's receive window is widened only for
  bytes its protocol has taken while it is not paused, so a stalled reader
  holds at most one stream window (1 MiB on the server, 4 MiB on the
  client: the windows Go advertises) and the peer stops sending;
* the *connection* window is topped up as data arrives, not as it is
  consumed: per-stream windows already bound what is held, and a shared
  window that only a reader could reopen would let one stalled pool entry
  stop every other one on the connection (head-of-line blocking);
* writing is a consumer: bytes the peer's windows do not admit yet wait in
  a per-stream queue, and the registered producer is paused while that
  queue is above :data:`SEND_HIGH_WATER` (resumed under
  :data:`SEND_LOW_WATER`); the TLS transport in turn pauses the whole
  connection (we are its producer) when its own buffer fills, so DATA
  frames are not piled into it.

Closing (SPEC-1.14 §4.5, the v1.14.0 close defect):

* a pool connection is used once, so the peer's END_STREAM ends it: what
  arrived is delivered, our queued bytes are flushed, we send END_STREAM
  and the protocol gets ``connectionLost(ConnectionDone)``;
* ``loseConnection()`` flushes, sends END_STREAM and, unless the peer has
  ended too, RST_STREAM in the same write (CANCEL from a client, as Go's
  client does; NO_ERROR from a server, RFC 9113 §8.1, as Go's server does
  after a complete response) so that the stream stops counting against
  MAX_CONCURRENT_STREAMS at once: a Go server never ends its side, and
  waiting for it would hold the slot until the user leaves;
* unlike Go's server, ours *does* end the stream when its side closes, so
  a client's user sees EOF; as a client we rely on the closes we get;
* ``abortConnection()`` sends RST_STREAM CANCEL; a peer's RST_STREAM gives
  ``connectionLost(ConnectionLost)`` (or ``ConnectionDone`` when the peer
  had ended its side cleanly first: everything it sent is complete).
"""

from __future__ import annotations

import email.utils
from collections import deque
from typing import Any, Callable, Optional, Union

from h2 import events as h2e
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import H2Error, ProtocolError
from h2.settings import SettingCodes, Settings
from OpenSSL import SSL
from twisted.internet import defer, error, ssl
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IConsumer,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IPushProducer,
    ITransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.ssl import TLSVersion
from twisted.python.failure import Failure
from zope.interface import implementer

from nodepass.base.logs import NodeLog
from nodepass.base.timers import Call, ClockLike, IdleTimer
from nodepass.compat import h2_internals
from nodepass.compat.h2_internals import LeanH2Connection
from nodepass.compat.twisted_tls import below_tls, tls_layer
from nodepass.relay import tls_fast
from nodepass.net.dialer import OneProtocolFactory
from nodepass.relay.core import no_delay
from nodepass.net.tls import (
    TLS13_SUITES,
    TLSVerificationFailed,
    client_context_factory,
    explain_verification_failure,
    is_verification_failure,
    peer_certificate_chain,
)

# Received DATA frames are not formatted for h2's trace log (see the module).
h2_internals.install()

#: The ALPN protocol both ends must agree on.
ALPN = b"h2"
#: The only request path the server serves.
STREAM_PATH = b"/stream"

#: What a Go server advertises (SPEC-1.14 §4.5), apart from
#: MAX_CONCURRENT_STREAMS, which is the server's ``max``.
SERVER_MAX_FRAME_SIZE = 1048576
SERVER_MAX_HEADER_LIST_SIZE = 1048896
SERVER_HEADER_TABLE_SIZE = 4096
SERVER_STREAM_WINDOW = 1048576
#: Go's server opens its connection window to 1 MiB at once.
SERVER_CONN_WINDOW_INCREMENT = 983041
#: What a Go client advertises.
CLIENT_STREAM_WINDOW = 4194304
CLIENT_MAX_FRAME_SIZE = 16384
CLIENT_MAX_HEADER_LIST_SIZE = 10485760
CLIENT_CONN_WINDOW_INCREMENT = 1073741824
#: RFC 9113 initial window of every connection.
DEFAULT_WINDOW = 65535

#: Queued (unsent) bytes on a stream above which its producer is paused ...
SEND_HIGH_WATER = 512 * 1024
#: ... and below which it is resumed.
SEND_LOW_WATER = 128 * 1024
#: Largest DATA frame we send, whatever the peer allows: h2's cost is per
#: frame (a Go client allows 16 KiB, a Go server 1 MiB), and a receiver
#: holds a frame whole before h2 parses it.
MAX_DATA_FRAME = 256 * 1024

#: A new server connection must have sent its preface (and SETTINGS) by
#: then (Go's http2 server uses the same 10 s).
PREFACE_TIMEOUT = 10.0
#: A request must have sent its one byte by then, or its stream is reset.
REQUEST_TIMEOUT = 10.0
#: How long a closing stream may wait for the peer's window to take its
#: queued bytes before it is reset.
CLOSE_LINGER = 30.0
#: How long a connection being closed may take to say goodbye (TLS
#: close_notify) before it is aborted.
CLOSE_TIMEOUT = 5.0
#: A server connection that received nothing for this many report
#: intervals is dead and is dropped: a client PINGs every interval, and the
#: control channel (a stream of this connection) carries a signal every
#: interval and has the same 3-interval read deadline.
SILENCE_INTERVALS = 3
#: Control frames (PING and SETTINGS ACKs, resets, headers) we may queue
#: for a peer that does not read while it keeps sending: past this the
#: connection is dropped (a PING flood must not grow our buffers).
MAX_PAUSED_OUTPUT = 1024 * 1024

#: Headers of a pool request, in the order Go's client encodes them.
_REQUEST_TAIL = [(b":path", STREAM_PATH), (b":scheme", b"https"), (b"accept-encoding", b"gzip"),
                 (b"user-agent", b"Go-http-client/2.0")]


class H2PoolError(Exception):
    """An HTTP/2 pool connection could not be set up, or it ended."""


class H2StreamRefused(H2PoolError):
    """The server answered a pool stream with a status other than 200
    (404: wrong path or method, or its pool is full; 403: our IP is not the
    tunnel's client)."""

    def __init__(self, status: int):
        super().__init__(f"HTTP/2 pool stream refused by the server: status {status}")
        self.status = status


def _b(value: Union[bytes, str]) -> bytes:
    """A header name or value as bytes (h2 gives bytes without a header
    encoding, but its types allow text)."""
    return value if isinstance(value, bytes) else value.encode("latin-1")


def _authority(name: str) -> bytes:
    """``:authority`` as Go sends it: the name as is, IDNA for non-ASCII."""
    try:
        return name.encode("ascii")
    except UnicodeEncodeError:
        return name.encode("idna")


def _http_date(seconds: float) -> bytes:
    """The ``date`` header, made once per second."""
    whole = int(seconds)
    cached = _date_cache
    if cached[0] != whole:
        cached[:] = [whole, email.utils.formatdate(whole, usegmt=True).encode("ascii")]
    return bytes(cached[1])


_date_cache: list[Any] = [None, b""]


# ---------------------------------------------------------------------------
# One stream
# ---------------------------------------------------------------------------


@implementer(ITransport, IPushProducer, IConsumer)
class H2StreamTransport:
    """One HTTP/2 stream of a pool connection as a Twisted transport.

    Writes become DATA frames as the peer's windows allow; received DATA is
    handed to the attached protocol's ``dataReceived``.  See the module
    docstring for flow control and closing."""

    #: The relay may hand us views of its shared read buffer: what is sent
    #: at once is copied by h2, and what waits is copied first.
    takes_views = True
    h2_stream = True

    def __init__(self, session: "_H2Connection", stream_id: int, recv_window: int):
        self.session = session
        self.stream_id = stream_id
        self.protocol: Any = None  # attached by attach()
        self.connected = True
        self.disconnecting = False
        #: Reading paused (IPushProducer).
        self.held = False
        self.producer: Any = None
        self.producer_paused = False
        self._streaming = True
        self._send_queue: deque[Union[bytes, memoryview]] = deque()
        self._send_size = 0
        self._recv_pending: deque[bytes] = deque()
        self._recv_size = 0
        #: The peer's allowance on this stream as we granted it.
        self._recv_window = recv_window
        #: Bytes taken by the protocol (or padding) not yet granted again.
        self._uncredited = 0
        self._peer_ended = False
        #: We sent END_STREAM or RST_STREAM, or the peer reset the stream:
        #: nothing more may be sent.
        self._ended = False
        self._lost = False
        self._lost_reason: Exception = error.ConnectionDone("stream closed")
        self._delivering = False
        self._linger: Optional[Call] = None

    # -- wiring ---------------------------------------------------------------
    def attach(self, protocol: Any) -> None:
        """Connect ``protocol`` (``makeConnection``); bytes that arrived
        before are delivered now."""
        self.protocol = protocol
        protocol.makeConnection(self)
        if self._lost:
            protocol.connectionLost(Failure(self._lost_reason))
            self._release()
            return
        self._deliver_pending()
        self.session._maybe_credit(self)
        self.session._flush()

    @property
    def queued_out(self) -> int:
        """Bytes written but not yet sent (waiting for the peer's window)."""
        return self._send_size

    @property
    def queued_in(self) -> int:
        """Bytes received but not yet delivered (reading paused)."""
        return self._recv_size

    # -- ITransport -----------------------------------------------------------
    def write(self, data: Union[bytes, memoryview]) -> None:
        if self._lost or self.disconnecting or self._ended or not data:
            return
        sent = 0
        if not self._send_queue:
            sent = self.session._send_direct(self, data)
            if self._lost or self._ended:
                return
        if sent >= len(data):
            return
        rest = bytes(data[sent:]) if (sent or not isinstance(data, bytes)) else data
        self._send_queue.append(rest)
        self._send_size += len(rest)
        self.session._blocked[self.stream_id] = self
        producer = self.producer
        if producer is not None and not self.producer_paused and self._send_size > SEND_HIGH_WATER:
            self.producer_paused = True
            producer.pauseProducing()

    def writeSequence(self, seq: Any) -> None:
        self.write(b"".join(seq))

    def loseConnection(self) -> None:
        """Flush what is queued, then end the stream (see the module
        docstring); ``connectionLost(ConnectionDone)`` follows."""
        if self._lost or self.disconnecting:
            return
        self.disconnecting = True
        self._try_finish()

    def abortConnection(self) -> None:
        """RST_STREAM CANCEL now; queued bytes are dropped."""
        if self._lost:
            return
        if not self._ended:
            self._ended = True
            self.session._reset_stream(self, ErrorCodes.CANCEL)
        self._connection_lost(error.ConnectionAborted("HTTP/2 stream reset"))

    def getPeer(self) -> Any:
        return self.session.transport.getPeer()

    def getHost(self) -> Any:
        return self.session.transport.getHost()

    def getPeerCertificate(self) -> Any:
        """The peer certificate of the shared TLS connection."""
        return self.session.peer_certificate()

    def getHandle(self) -> Any:
        """The shared TLS connection (``OpenSSL.SSL.Connection``), so that a
        server can read its own certificate; None without TLS."""
        return self.session.tls_handle()

    # -- IPushProducer (our reading) --------------------------------------------
    def pauseProducing(self) -> None:
        self.held = True

    def resumeProducing(self) -> None:
        if not self.held or self._lost:
            return
        self.held = False
        self._deliver_pending()
        if not self._lost:
            self.session._maybe_credit(self)
        self.session._flush()

    def stopProducing(self) -> None:
        self.loseConnection()

    # -- IConsumer (our writing) ---------------------------------------------
    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self.producer is not None:
            raise RuntimeError("a producer is already registered")
        if self._lost:
            producer.stopProducing()
            return
        self.producer = producer
        self._streaming = bool(streaming)
        self.producer_paused = False
        if self._send_size > SEND_HIGH_WATER:
            self.producer_paused = True
            producer.pauseProducing()
        elif not streaming:
            producer.resumeProducing()

    def unregisterProducer(self) -> None:
        self.producer = None
        self.producer_paused = False

    # -- from the session ---------------------------------------------------------
    def _relieve(self) -> None:
        """After sending from the queue: resume the producer once the queue
        is under the low-water mark."""
        producer = self.producer
        if producer is None or self._lost:
            return
        if self.producer_paused and self._send_size <= SEND_LOW_WATER:
            self.producer_paused = False
            producer.resumeProducing()
        elif not self._streaming and not self._send_queue:
            producer.resumeProducing()

    def _data(self, data: bytes, flow_controlled: int) -> None:
        """A DATA frame for this stream (``flow_controlled`` counts padding)."""
        self._recv_window -= flow_controlled
        padding = flow_controlled - len(data)
        if padding > 0:
            self.session._consumed(self, padding)
        if not data or self._lost:
            return
        if self.protocol is None or self.held or self._recv_pending or self._delivering:
            self._recv_pending.append(data)
            self._recv_size += len(data)
            return
        self.protocol.dataReceived(data)
        self.session._consumed(self, len(data))

    def _deliver_pending(self) -> None:
        if self._delivering:
            return  # the outer loop goes on once the protocol returns
        self._delivering = True
        try:
            while self._recv_pending and not self.held and not self._lost and self.protocol is not None:
                data = self._recv_pending.popleft()
                self._recv_size -= len(data)
                self.protocol.dataReceived(data)
                self.session._consumed(self, len(data))
        finally:
            self._delivering = False
        self.session._maybe_credit(self)
        if self._peer_ended and not self._recv_pending and not self.held and not self._lost and self.protocol is not None:
            self._peer_done()

    def _peer_end(self) -> None:
        """The peer's END_STREAM: deliver what is left, then close."""
        self._peer_ended = True
        self._deliver_pending()

    def _peer_done(self) -> None:
        # Everything the peer sent was delivered: a pool connection is
        # used once, so its end is ours too.
        if not self.disconnecting:
            self.disconnecting = True
        self._try_finish()

    def _peer_reset(self, code: int) -> None:
        if self._lost:
            return
        self._ended = True
        self._drop_queue()
        if self._peer_ended:
            # It had ended its side cleanly: what it sent is complete, and
            # the reset only says it reads no more (RFC 9113 §8.1).
            self.disconnecting = True
            self._deliver_pending()
            return
        self._recv_pending.clear()
        self._recv_size = 0
        self._connection_lost(error.ConnectionLost(f"HTTP/2 stream reset by the peer ({_code_name(code)})"))

    def _drop_queue(self) -> None:
        self._send_queue.clear()
        self._send_size = 0
        self.session._blocked.pop(self.stream_id, None)

    def _try_finish(self) -> None:
        """Closing: end the stream once the queue is flushed."""
        if self._lost or not self.disconnecting:
            return
        if self._send_queue and not self._ended:
            if self._linger is None:
                self._linger = self.session.clock.callLater(CLOSE_LINGER, self._linger_expired)
            return
        self.session._finish_stream(self)
        self._connection_lost(error.ConnectionDone("HTTP/2 stream closed"))

    def _linger_expired(self) -> None:
        self._linger = None
        if self._lost:
            return
        unsent = self._send_size
        if not self._ended:
            self._ended = True
            self.session._reset_stream(self, ErrorCodes.CANCEL)
        self._connection_lost(
            error.ConnectionLost(f"HTTP/2 stream reset: {unsent} bytes still unsent after {CLOSE_LINGER:g}s (no window)")
        )

    def _connection_lost(self, reason: Exception) -> None:
        if self._lost:
            return
        self._lost = True
        self.connected = False
        self._lost_reason = reason
        linger, self._linger = self._linger, None
        if linger is not None and linger.active():
            linger.cancel()
        self._drop_queue()
        self._recv_pending.clear()
        self._recv_size = 0
        self.session._forget(self, reason)
        producer, self.producer = self.producer, None
        if producer is not None:
            producer.stopProducing()
        if self.protocol is not None:
            self.protocol.connectionLost(Failure(reason))
            self._release()

    def _release(self) -> None:
        """Let go of the protocol once it has been told of the loss: it holds
        this stream as its ``transport`` (and its pause gate does too), and
        the pair would otherwise be left in a reference cycle, one per
        relayed connection, for the garbage collector.  Late calls find a
        lost stream (``write``, ``loseConnection`` and the producer methods
        do nothing; received frames are dropped)."""
        self.protocol = None


def _code_name(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return f"code {code:#x}"


# ---------------------------------------------------------------------------
# One connection (shared by server and client)
# ---------------------------------------------------------------------------


def _local_settings(client: bool, values: dict[SettingCodes, int], drop: tuple[SettingCodes, ...]) -> Settings:
    """Our SETTINGS, exactly ``values`` on the wire: h2 sends every entry of
    ``local_settings`` (its defaults too), so the ones Go does not send are
    removed.  Initial values count at once, which is safe for these (larger
    windows and frames than the peer assumes until it sees them)."""
    settings = Settings(client=client, initial_values=values)
    for code in drop:
        if code in settings:
            del settings[code]
    return settings


@implementer(IPushProducer, IHandshakeListener)
class _H2Connection(Protocol):
    """What server and client share: one h2 connection over one TLS
    transport, its streams, windows, output and teardown.  We are the TLS
    transport's producer: while it is paused no DATA is sent (control
    frames still are)."""

    #: The TLS transport (typed loosely: mypy cannot call a zope
    #: interface's methods, and we use more than ``ITransport`` declares).
    transport: Any
    client_side = False
    #: What RST_STREAM follows our END_STREAM when the peer has not ended.
    reset_after_end = ErrorCodes.NO_ERROR
    #: Our per-stream receive window (the INITIAL_WINDOW_SIZE we send) and
    #: the connection window we keep open.
    stream_window = SERVER_STREAM_WINDOW
    conn_window = DEFAULT_WINDOW + SERVER_CONN_WINDOW_INCREMENT

    def __init__(self, clock: ClockLike, log: NodeLog, report_interval: float):
        self.clock = clock
        self.log = log
        self.report_interval = report_interval
        self.conn: Optional[LeanH2Connection] = None
        #: Writes a list of pieces to the TLS transport (the fast TLS data
        #: path's, once it is installed).
        self._write_parts: Callable[[list[Any]], None] = self._write_joined
        #: Whether the fast TLS data path carries this connection's bytes.
        self.fast_tls = False
        self.streams: dict[int, H2StreamTransport] = {}
        #: Streams with queued bytes, oldest first.
        self._blocked: dict[int, H2StreamTransport] = {}
        self._write_paused = False
        #: Bytes handed to the TLS transport while it had us paused.
        self._paused_output = 0
        self.started = False
        self.closed = False
        self.close_reason = ""
        self.transport_gone = False
        self._close_timer: Optional[Call] = None

    # -- set-up ---------------------------------------------------------------------
    def connectionMade(self) -> None:
        no_delay(self.transport)  # frames are small and interactive: no Nagle
        self._decide(final=False)

    def handshakeCompleted(self) -> None:
        self._decide(final=True)

    def _decide(self, final: bool) -> None:
        """Start once ALPN says ``h2``.  Before the TLS handshake is done
        the protocol is unknown (``final`` false: wait for it)."""
        if self.started or self.closed:
            return
        proto = getattr(self.transport, "negotiatedProtocol", None)
        if proto == ALPN:
            self._start()
        elif final:
            self._reject(proto)

    def _reject(self, proto: Optional[bytes]) -> None:
        what = proto.decode("ascii", "replace") if proto else "none"
        self._close(H2PoolError(f"HTTP/2 pool connection without ALPN h2 (negotiated: {what})"), goaway=False)

    def _make_h2(self) -> LeanH2Connection:
        """The h2 state machine of this side, with its settings: made by
        the client and server subclasses, which is all they differ in here."""
        raise NotImplementedError

    def _start(self) -> None:
        self.started = True
        self.conn = self._make_h2()
        transport = self.transport
        assert transport is not None
        if tls_fast.ENABLED:
            # Whole chunks through OpenSSL, gathered records in (as a TLS
            # pool connection's relay does): Twisted's TLS layer would hand
            # h2 one 16 KiB record at a time.
            tls = tls_layer(transport)
            if tls is not None:
                below_tls(transport, tls)[0].bufferSize = tls_fast.TLS_RELAY_BUFFER_SIZE
                write_parts = tls_fast.install(transport, self.dataReceived)
                if write_parts is not None:
                    self._write_parts = write_parts
                    self.fast_tls = True
        try:
            transport.registerProducer(self, True)
        except RuntimeError:  # another producer: no write backpressure
            pass
        self._started()
        self._flush()

    def _started(self) -> None:
        """Send our preface; subclasses arm their timers."""

    # -- I/O --------------------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        if not self.started:
            self._decide(final=True)
            if not self.started:
                return
        conn = self.conn
        assert conn is not None
        self._activity()
        try:
            events = conn.receive_data(data)
        except (ProtocolError, H2Error, LookupError, ValueError) as e:
            # A peer that does not speak HTTP/2 (or breaks it): h2 queued a
            # GOAWAY; send it and hang up.
            self._flush()
            self._close(H2PoolError(f"HTTP/2 protocol error from the peer: {e or type(e).__name__}"), goaway=False)
            return
        for ev in events:
            if self.closed:
                return
            self._event(ev)
        if not self.closed:
            self._top_up()
            self._flush()

    def _activity(self) -> None:
        pass

    def _flush(self) -> None:
        conn, transport = self.conn, self.transport
        if conn is None or transport is None or self.transport_gone:
            return
        parts = conn.output_parts()
        if not parts:
            return
        if self._write_paused:
            self._paused_output += sum(map(len, parts))
            if self._paused_output > MAX_PAUSED_OUTPUT and not self.closed:
                self.log.debug("HTTP/2 pool: the peer sends but does not read, dropping the connection")
                self._write_parts(parts)
                self._close(H2PoolError("HTTP/2 peer does not read"), goaway=False, abort=True)
                return
        self._write_parts(parts)

    def _write_joined(self, parts: list[Any]) -> None:
        self.transport.write(b"".join(parts))

    def _top_up(self) -> None:
        """Keep the connection window open (see the module docstring)."""
        conn = self.conn
        assert conn is not None
        window = conn.inbound_flow_control_window
        if window <= self.conn_window // 2:
            try:
                conn.increment_flow_control_window(self.conn_window - window)
            except ProtocolError:
                pass

    # -- events -----------------------------------------------------------------------
    def _event(self, ev: h2e.Event) -> None:
        if isinstance(ev, h2e.DataReceived):
            sid = ev.stream_id or 0
            t = self.streams.get(sid)
            data = ev.data or b""
            fc = ev.flow_controlled_length or 0
            if t is not None:
                t._data(data, fc)
            else:
                self._data_without_stream(sid, data, fc)
        elif isinstance(ev, h2e.StreamEnded):
            t = self.streams.get(ev.stream_id or 0)
            if t is not None:
                t._peer_end()
            else:
                self._ended_without_stream(ev.stream_id or 0)
        elif isinstance(ev, h2e.StreamReset):
            t = self.streams.get(ev.stream_id or 0)
            if t is not None:
                t._peer_reset(int(ev.error_code or 0))
            else:
                self._reset_without_stream(ev.stream_id or 0)
        elif isinstance(ev, h2e.WindowUpdated):
            if not ev.stream_id:
                self._pump_all()
            else:
                t = self._blocked.get(ev.stream_id)
                if t is not None:
                    self._pump(t)
        elif isinstance(ev, h2e.RemoteSettingsChanged):
            self._settings_received()
            self._pump_all()  # INITIAL_WINDOW_SIZE may have grown
        elif isinstance(ev, h2e.ConnectionTerminated):
            code = _code_name(int(ev.error_code or 0))
            self._close(H2PoolError(f"HTTP/2 connection closed by the peer (GOAWAY {code})"), goaway=False)
        elif isinstance(ev, h2e.RequestReceived):
            self._request(ev)
        elif isinstance(ev, h2e.ResponseReceived):
            self._response(ev)
        elif isinstance(ev, h2e.PingAckReceived):
            self._ping_acked()
        # PINGs and SETTINGS are acknowledged by h2 itself; trailers,
        # priorities, pushes (refused by ENABLE_PUSH 0) and unknown frames
        # mean nothing to a pool.

    def _data_without_stream(self, stream_id: int, data: bytes, flow_controlled: int) -> None:
        """DATA for a stream we keep no transport for (a request still
        waiting for its byte, or one we are done with): the connection
        window is topped up anyway."""

    def _ended_without_stream(self, stream_id: int) -> None:
        pass

    def _reset_without_stream(self, stream_id: int) -> None:
        pass

    def _request(self, ev: h2e.RequestReceived) -> None:
        pass

    def _response(self, ev: h2e.ResponseReceived) -> None:
        pass

    def _ping_acked(self) -> None:
        pass

    def _settings_received(self) -> None:
        pass

    # -- sending ----------------------------------------------------------------------
    def _frame_cap(self) -> int:
        conn = self.conn
        assert conn is not None
        return min(conn.max_outbound_frame_size, MAX_DATA_FRAME)

    def _send_direct(self, t: H2StreamTransport, data: Union[bytes, memoryview]) -> int:
        """Send what the windows admit of a write now; how much was sent."""
        conn = self.conn
        if conn is None or self.closed or self._write_paused:
            return 0
        total = len(data)
        sent = 0
        view: Optional[memoryview] = None
        cap = self._frame_cap()
        try:
            while sent < total and not self._write_paused:
                n = min(total - sent, conn.local_flow_control_window(t.stream_id), cap)
                if n <= 0:
                    break
                if sent == 0 and n == total:
                    piece: Union[bytes, memoryview] = data
                else:
                    if view is None:
                        view = memoryview(data)
                    piece = view[sent : sent + n]
                conn.send_data(t.stream_id, piece)
                sent += n
        except ProtocolError:
            # The stream is closed under us (its reset is being processed):
            # nothing more goes out on it.
            self._flush()
            return total
        self._flush()
        return sent

    def _pump(self, t: H2StreamTransport) -> None:
        """Send from a stream's queue as far as the windows allow."""
        conn = self.conn
        if conn is None or self.closed:
            return
        queue = t._send_queue
        cap = self._frame_cap()
        try:
            while queue and not self._write_paused and not t._lost:
                n = min(conn.local_flow_control_window(t.stream_id), cap)
                if n <= 0:
                    break
                chunk = queue[0]
                if n >= len(chunk):
                    queue.popleft()
                    piece = chunk
                else:
                    view = chunk if isinstance(chunk, memoryview) else memoryview(chunk)
                    piece = view[:n]
                    queue[0] = view[n:]
                t._send_size -= len(piece)
                conn.send_data(t.stream_id, piece)
        except ProtocolError:
            t._drop_queue()
        self._flush()
        if not queue:
            self._blocked.pop(t.stream_id, None)
        t._relieve()
        if t.disconnecting:
            t._try_finish()

    def _pump_all(self) -> None:
        for t in list(self._blocked.values()):
            if self._write_paused or self.closed:
                return
            self._pump(t)

    def _finish_stream(self, t: H2StreamTransport) -> None:
        """END_STREAM, and RST_STREAM right behind it (one write) when the
        peer has not ended: the stream is closed for both sides at once."""
        conn = self.conn
        if t._ended or conn is None or self.closed:
            t._ended = True
            return
        t._ended = True
        self._flush()
        try:
            conn.end_stream(t.stream_id)
            if not t._peer_ended:
                conn.reset_stream(t.stream_id, self.reset_after_end)
        except ProtocolError:
            pass
        self._flush()

    def _reset_stream(self, t: H2StreamTransport, code: ErrorCodes) -> None:
        conn = self.conn
        if conn is None or self.closed:
            return
        try:
            conn.reset_stream(t.stream_id, code)
        except ProtocolError:
            pass
        self._flush()

    # -- receive windows ----------------------------------------------------------------
    def _consumed(self, t: H2StreamTransport, n: int) -> None:
        t._uncredited += n
        if not t._delivering:  # (a delivery loop credits once at its end)
            self._maybe_credit(t)

    def _maybe_credit(self, t: H2StreamTransport) -> None:
        """Give the peer back what the reader took, once half the stream
        window is used and only while the reader is not paused."""
        if t.held or t._uncredited <= 0 or t._lost or t._peer_ended or t._ended:
            return
        if t._recv_window > self.stream_window // 2:
            return
        conn = self.conn
        if conn is None or self.closed:
            return
        n, t._uncredited = t._uncredited, 0
        t._recv_window += n
        try:
            conn.increment_flow_control_window(n, t.stream_id)
        except ProtocolError:
            pass

    # -- IPushProducer (as the TLS transport's producer) ------------------------------
    def pauseProducing(self) -> None:
        self._write_paused = True

    def resumeProducing(self) -> None:
        if not self._write_paused:
            return
        self._write_paused = False
        self._paused_output = 0
        self._pump_all()

    def stopProducing(self) -> None:
        self._write_paused = True

    # -- bookkeeping ----------------------------------------------------------------------
    def _forget(self, t: H2StreamTransport, reason: Exception) -> None:
        if self.streams.get(t.stream_id) is t:
            del self.streams[t.stream_id]
        self._blocked.pop(t.stream_id, None)

    def peer_certificate(self) -> Any:
        try:
            return self.transport.getPeerCertificate()
        except Exception:  # noqa: BLE001 - no TLS, or already freed
            return None

    def tls_handle(self) -> Any:
        try:
            return self.transport.getHandle()
        except Exception:  # noqa: BLE001
            return None

    # -- teardown ------------------------------------------------------------------------
    def close(self, reason: str = "pool closed") -> None:
        """GOAWAY, then close the TLS connection; every stream is lost."""
        self._close(H2PoolError(f"HTTP/2 connection closed: {reason}"), goaway=True)

    def _close(self, exc: Exception, goaway: bool = True, abort: bool = False) -> None:
        if self.closed:
            return
        conn = self.conn
        if goaway and conn is not None and not self.transport_gone:
            try:
                conn.close_connection()
            except ProtocolError:
                pass
            self._flush()
        self._shutdown(exc)
        transport = self.transport
        if transport is None or self.transport_gone:
            return
        try:
            transport.unregisterProducer()
        except Exception:  # noqa: BLE001 - none registered
            pass
        if abort:
            transport.abortConnection()
            return
        transport.loseConnection()
        if not self.transport_gone:
            # A TLS close waits for the peer's close_notify: a dead peer
            # must not keep the socket.
            self._close_timer = self.clock.callLater(CLOSE_TIMEOUT, self._close_timed_out)

    def _close_timed_out(self) -> None:
        self._close_timer = None
        if not self.transport_gone and self.transport is not None:
            self.transport.abortConnection()

    def _shutdown(self, exc: Exception) -> None:
        """Every stream is lost; timers stop.  Once."""
        if self.closed:
            return
        self.closed = True
        self.close_reason = str(exc)
        self._stop_timers()
        streams = list(self.streams.values())
        self.streams.clear()
        self._blocked.clear()
        for t in streams:
            t._connection_lost(error.ConnectionLost(str(exc)))
        self._on_shutdown(exc)

    def _stop_timers(self) -> None:
        pass

    def _on_shutdown(self, exc: Exception) -> None:
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.transport_gone = True
        timer, self._close_timer = self._close_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if not self.closed:
            self._shutdown(self._lost_exception(reason))
        self._gone(reason)

    def _lost_exception(self, reason: Failure) -> Exception:
        return H2PoolError(f"HTTP/2 connection lost: {reason.getErrorMessage()}")

    def _gone(self, reason: Failure) -> None:
        pass


def _cancel(call: Optional[Call]) -> None:
    if call is not None and call.active():
        call.cancel()


# ---------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------


class H2PoolServerProtocol(_H2Connection):
    """One accepted TLS connection of the HTTP/2 pool (ALPN ``h2``; others
    are closed).  Each valid request becomes an :class:`H2StreamTransport`
    given to ``on_stream`` right after the 200 HEADERS went out, so the
    pool's first write (the 4 ID bytes) is the first DATA frame.

    ``is_full()`` and ``allowed(ip)`` are asked for every request;
    ``max_streams`` is the MAX_CONCURRENT_STREAMS we advertise (and h2
    enforces).  Bounds: the preface within :data:`PREFACE_TIMEOUT`, each
    request's byte within :data:`REQUEST_TIMEOUT`, the connection closed
    after ``2 * report_interval`` without streams (Go's idle timeout) and
    after :data:`SILENCE_INTERVALS` report intervals without a byte from
    the client (a live client PINGs every interval)."""

    client_side = False
    reset_after_end = ErrorCodes.NO_ERROR
    stream_window = SERVER_STREAM_WINDOW
    conn_window = DEFAULT_WINDOW + SERVER_CONN_WINDOW_INCREMENT
    #: Instance-adjustable bounds (tests shorten them).
    preface_timeout = PREFACE_TIMEOUT
    request_timeout = REQUEST_TIMEOUT

    def __init__(
        self,
        clock: ClockLike,
        log: NodeLog,
        on_stream: Callable[[H2StreamTransport], None],
        is_full: Callable[[], bool],
        allowed: Callable[[str], bool],
        max_streams: int,
        report_interval: float,
    ):
        super().__init__(clock, log, report_interval)
        self.on_stream = on_stream
        self.is_full = is_full
        self.allowed = allowed
        self.max_streams = max(1, min(int(max_streams), 2**31 - 1))
        self.peer_ip = ""
        #: Requests waiting for their byte: stream ID -> timeout.
        self._requests: dict[int, Call] = {}
        self._preface_timer: Optional[Call] = None
        self._idle_call: Optional[Call] = None
        self._silence: Optional[IdleTimer] = None

    def connectionMade(self) -> None:
        try:
            self.peer_ip = self.transport.getPeer().host
        except Exception:  # noqa: BLE001 - an address without a host
            self.peer_ip = ""
        self._preface_timer = self.clock.callLater(self.preface_timeout, self._no_preface)
        super().connectionMade()

    def _no_preface(self) -> None:
        self._preface_timer = None
        if not self.closed:
            self.log.debug("HTTP/2 pool: no preface from %s in %gs, closing", self.peer_ip, self.preface_timeout)
            self._close(H2PoolError("no HTTP/2 preface"), goaway=self.started, abort=True)

    def _reject(self, proto: Optional[bytes]) -> None:
        self.log.debug("HTTP/2 pool: connection from %s without ALPN h2, closing", self.peer_ip)
        super()._reject(proto)

    def _make_h2(self) -> LeanH2Connection:
        conn = LeanH2Connection(H2Configuration(client_side=False, header_encoding=None))
        conn.local_settings = _local_settings(
            False,
            {
                SettingCodes.MAX_FRAME_SIZE: SERVER_MAX_FRAME_SIZE,
                SettingCodes.MAX_CONCURRENT_STREAMS: self.max_streams,
                SettingCodes.MAX_HEADER_LIST_SIZE: SERVER_MAX_HEADER_LIST_SIZE,
                SettingCodes.HEADER_TABLE_SIZE: SERVER_HEADER_TABLE_SIZE,
                SettingCodes.INITIAL_WINDOW_SIZE: SERVER_STREAM_WINDOW,
            },
            (SettingCodes.ENABLE_PUSH, SettingCodes.ENABLE_CONNECT_PROTOCOL),
        )
        conn.max_inbound_frame_size = SERVER_MAX_FRAME_SIZE
        return conn

    def _started(self) -> None:
        conn = self.conn
        assert conn is not None
        conn.initiate_connection()
        conn.increment_flow_control_window(SERVER_CONN_WINDOW_INCREMENT)
        if self.report_interval > 0:
            self._silence = IdleTimer(self.clock, SILENCE_INTERVALS * self.report_interval, self._silent)
        self._update_idle()

    def _activity(self) -> None:
        silence = self._silence
        if silence is not None:
            silence.last = self.clock.seconds()

    def _silent(self) -> None:
        self._silence = None
        if not self.closed:
            self.log.debug("HTTP/2 pool: nothing from %s for %d report intervals, closing", self.peer_ip,
                           SILENCE_INTERVALS)
            self._close(H2PoolError("HTTP/2 client silent"), goaway=True, abort=True)

    def _settings_received(self) -> None:
        # The client's preface (and its SETTINGS) arrived.
        timer, self._preface_timer = self._preface_timer, None
        _cancel(timer)

    # -- idle timeout (2 x report interval without streams) ------------------------------
    def _update_idle(self) -> None:
        if self.closed or self.report_interval <= 0:
            return
        if self.streams or self._requests:
            call, self._idle_call = self._idle_call, None
            _cancel(call)
        elif self._idle_call is None:
            self._idle_call = self.clock.callLater(2 * self.report_interval, self._idle)

    def _idle(self) -> None:
        self._idle_call = None
        if not self.closed and not self.streams and not self._requests:
            self.log.debug("HTTP/2 pool: connection from %s idle, closing", self.peer_ip)
            self._close(H2PoolError("HTTP/2 connection idle"), goaway=True)

    # -- requests --------------------------------------------------------------------------
    def _request(self, ev: h2e.RequestReceived) -> None:
        sid = ev.stream_id or 0
        headers = {_b(k): _b(v) for k, v in (ev.headers or [])}
        method = headers.get(b":method", b"")
        path = headers.get(b":path", b"").split(b"?", 1)[0]
        ended = ev.stream_ended is not None
        if method != b"POST" or path != STREAM_PATH:
            self.log.debug("HTTP/2 pool: %s %s from %s: not found", method.decode("latin-1"),
                           path.decode("latin-1"), self.peer_ip)
            self._respond_error(sid, 404, b"not found\n", ended)
        elif not self.allowed(self.peer_ip):
            self.log.debug("HTTP/2 pool: request from unauthorized IP %s", self.peer_ip)
            self._respond_error(sid, 403, b"unauthorized\n", ended)
        elif self.is_full():
            self.log.debug("HTTP/2 pool: pool full, refusing a stream from %s", self.peer_ip)
            self._respond_error(sid, 404, b"not found\n", ended)
        elif ended:
            self._reset_id(sid, ErrorCodes.CANCEL)  # no body: no byte to read
        else:
            self._requests[sid] = self.clock.callLater(self.request_timeout, self._request_timed_out, sid)
            self._update_idle()

    def _respond_error(self, sid: int, status: int, body: bytes, request_ended: bool) -> None:
        """What Go's ``http.Error`` answers (headers in Go's sorted order),
        then RST_STREAM NO_ERROR if the request body is still open, as Go's
        server does after a complete response."""
        conn = self.conn
        assert conn is not None
        headers = [
            (b":status", str(status).encode("ascii")),
            (b"content-length", str(len(body)).encode("ascii")),
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"date", _http_date(self.clock.seconds())),
            (b"x-content-type-options", b"nosniff"),
        ]
        try:
            conn.send_headers(sid, headers)
            if conn.local_flow_control_window(sid) >= len(body):
                conn.send_data(sid, body, end_stream=True)
            else:
                conn.end_stream(sid)
            if not request_ended:
                conn.reset_stream(sid, ErrorCodes.NO_ERROR)
        except ProtocolError:
            pass
        self._flush()

    def _reset_id(self, sid: int, code: ErrorCodes) -> None:
        conn = self.conn
        assert conn is not None
        try:
            conn.reset_stream(sid, code)
        except ProtocolError:
            pass
        self._flush()

    def _request_timed_out(self, sid: int) -> None:
        if self._requests.pop(sid, None) is not None and not self.closed:
            self.log.debug("HTTP/2 pool: no byte on stream %d from %s in %gs", sid, self.peer_ip, self.request_timeout)
            self._reset_id(sid, ErrorCodes.CANCEL)
            self._update_idle()

    def _data_without_stream(self, stream_id: int, data: bytes, flow_controlled: int) -> None:
        call = self._requests.get(stream_id)
        if call is None:
            return
        if not data:
            # Padding only: still waiting for the byte; give the window back.
            self._credit_id(stream_id, flow_controlled)
            return
        del self._requests[stream_id]
        _cancel(call)
        self._accept(stream_id, data, flow_controlled)

    def _credit_id(self, sid: int, n: int) -> None:
        conn = self.conn
        if conn is None or n <= 0:
            return
        try:
            conn.increment_flow_control_window(n, sid)
        except ProtocolError:
            pass

    def _accept(self, sid: int, data: bytes, flow_controlled: int) -> None:
        """The request's first byte arrived: answer 200, hand the stream to
        the pool.  Bytes after the first are the stream's first data."""
        conn = self.conn
        assert conn is not None
        rest = data[1:]
        t = H2StreamTransport(self, sid, self.stream_window - flow_controlled)
        try:
            conn.send_headers(
                sid,
                [
                    (b":status", b"200"),
                    (b"content-type", b"application/octet-stream"),
                    (b"date", _http_date(self.clock.seconds())),
                ],
            )
        except ProtocolError:
            return
        self._flush()
        self.streams[sid] = t
        self._update_idle()
        # The byte (and any padding) is ours: it counts as read.
        self._consumed(t, flow_controlled - len(rest))
        if rest:
            t._data(rest, 0)
        try:
            self.on_stream(t)
        except Exception as e:  # noqa: BLE001 - the pool's bug must not take the connection
            self.log.error("HTTP/2 pool: stream handler failed: %s", e)
            t.abortConnection()

    def _ended_without_stream(self, stream_id: int) -> None:
        call = self._requests.pop(stream_id, None)
        if call is not None:
            _cancel(call)
            self._reset_id(stream_id, ErrorCodes.CANCEL)
            self._update_idle()

    def _reset_without_stream(self, stream_id: int) -> None:
        call = self._requests.pop(stream_id, None)
        if call is not None:
            _cancel(call)
            self._update_idle()

    def _forget(self, t: H2StreamTransport, reason: Exception) -> None:
        super()._forget(t, reason)
        self._update_idle()

    @property
    def open_streams(self) -> int:
        """Pool streams open on this connection."""
        return len(self.streams)

    def _stop_timers(self) -> None:
        for call in (self._preface_timer, self._idle_call, *self._requests.values()):
            _cancel(call)
        self._preface_timer = self._idle_call = None
        self._requests.clear()
        silence, self._silence = self._silence, None
        if silence is not None:
            silence.cancel()


# ---------------------------------------------------------------------------
# Client
# ---------------------------------------------------------------------------


class H2ClientProtocol(_H2Connection):
    """The client side of one HTTP/2 pool connection (made by
    :class:`H2PoolClient`).  It PINGs every report interval and closes the
    connection when a PING stays unanswered for an interval."""

    client_side = True
    reset_after_end = ErrorCodes.CANCEL
    stream_window = CLIENT_STREAM_WINDOW
    conn_window = DEFAULT_WINDOW + CLIENT_CONN_WINDOW_INCREMENT

    def __init__(self, clock: ClockLike, log: NodeLog, authority: str, report_interval: float):
        super().__init__(clock, log, report_interval)
        self.authority = authority
        self._headers = [(b":authority", _authority(authority)), (b":method", b"POST"), *_REQUEST_TAIL]
        self._ready_waiters: list[Deferred[H2ClientProtocol]] = []
        #: Opens waiting for the server's stream limit.
        self._queue: deque[tuple[Any, Deferred[H2StreamTransport]]] = deque()
        #: Streams sent, waiting for their :status.
        self._opening: dict[int, tuple[Any, Deferred[H2StreamTransport]]] = {}
        self._ping_call: Optional[Call] = None
        self._ping_outstanding = False
        self._ping_count = 0
        self.ready = False
        #: Why the connection failed before it was ready (set by the owner
        #: on a dial timeout, say).
        self.failure: Optional[Exception] = None
        #: Fires (with None) once the TCP connection is gone, or the dial failed.
        self.gone: Deferred[None] = Deferred()

    def _make_h2(self) -> LeanH2Connection:
        conn = LeanH2Connection(H2Configuration(client_side=True, header_encoding=None))
        conn.local_settings = _local_settings(
            True,
            {
                SettingCodes.ENABLE_PUSH: 0,
                SettingCodes.INITIAL_WINDOW_SIZE: CLIENT_STREAM_WINDOW,
                SettingCodes.MAX_FRAME_SIZE: CLIENT_MAX_FRAME_SIZE,
                SettingCodes.MAX_HEADER_LIST_SIZE: CLIENT_MAX_HEADER_LIST_SIZE,
            },
            (SettingCodes.HEADER_TABLE_SIZE, SettingCodes.ENABLE_CONNECT_PROTOCOL),
        )
        conn.max_inbound_frame_size = CLIENT_MAX_FRAME_SIZE
        return conn

    def _started(self) -> None:
        conn = self.conn
        assert conn is not None
        conn.initiate_connection()
        conn.increment_flow_control_window(CLIENT_CONN_WINDOW_INCREMENT)
        self.ready = True
        if self.report_interval > 0:
            self._ping_call = self.clock.callLater(self.report_interval, self._ping)
        waiters, self._ready_waiters = self._ready_waiters, []
        for d in waiters:
            d.callback(self)

    def _reject(self, proto: Optional[bytes]) -> None:
        what = proto.decode("ascii", "replace") if proto else "none"
        self._close(H2PoolError(f"the server did not agree to HTTP/2 (ALPN h2; negotiated: {what})"), goaway=False)

    # -- keep-alive ----------------------------------------------------------------------
    def _ping(self) -> None:
        self._ping_call = None
        if self.closed:
            return
        if self._ping_outstanding:
            self.log.debug("HTTP/2 pool: PING unanswered for %gs, closing the connection", self.report_interval)
            self._close(H2PoolError(f"HTTP/2 PING unanswered for {self.report_interval:g}s"), goaway=False,
                        abort=True)
            return
        conn = self.conn
        assert conn is not None
        self._ping_count += 1
        self._ping_outstanding = True
        try:
            conn.ping(self._ping_count.to_bytes(8, "big"))
        except ProtocolError:
            pass
        self._flush()
        self._ping_call = self.clock.callLater(self.report_interval, self._ping)

    def _ping_acked(self) -> None:
        self._ping_outstanding = False

    # -- streams -------------------------------------------------------------------------
    def when_ready(self) -> Deferred[H2ClientProtocol]:
        """Fires with this connection once TLS and ALPN are done, or fails
        when it ends first."""
        if self.closed:
            return defer.fail(self.failure or H2PoolError(self.close_reason or "HTTP/2 connection closed"))
        if self.ready:
            return defer.succeed(self)
        d: Deferred[H2ClientProtocol] = Deferred()
        self._ready_waiters.append(d)
        return d

    def has_room(self) -> bool:
        """The server's MAX_CONCURRENT_STREAMS admits another stream now."""
        conn = self.conn
        assert conn is not None
        return conn.open_outbound_streams < conn.remote_settings.max_concurrent_streams

    def open_stream(self, protocol: Any) -> Deferred[H2StreamTransport]:
        """A new pool stream (HEADERS, then DATA ``00``); fires with its
        transport, attached to ``protocol``, once the server answered 200.
        Beyond the server's stream limit it waits for a stream to close."""
        if self.closed or not self.ready:
            return defer.fail(H2PoolError(self.close_reason or "HTTP/2 connection not ready"))
        entry: tuple[Any, Deferred[H2StreamTransport]]

        def cancel(d: Deferred[H2StreamTransport]) -> None:
            if entry in self._queue:
                self._queue.remove(entry)
                return
            for sid, value in list(self._opening.items()):
                if value is entry:
                    del self._opening[sid]
                    t = self.streams.get(sid)
                    if t is not None:
                        t.abortConnection()

        d: Deferred[H2StreamTransport] = Deferred(cancel)
        entry = (protocol, d)
        if self._queue or not self.has_room():
            self._queue.append(entry)
        else:
            self._send_request(entry)
        return d

    def _send_request(self, entry: tuple[Any, Deferred[H2StreamTransport]]) -> None:
        conn = self.conn
        assert conn is not None
        try:
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, self._headers)
        except ProtocolError as e:
            entry[1].errback(H2PoolError(f"cannot open an HTTP/2 stream: {e}"))
            return
        t = H2StreamTransport(self, sid, self.stream_window)
        self.streams[sid] = t
        self._opening[sid] = entry
        t.write(b"\x00")
        self._flush()

    def _drain_queue(self) -> None:
        while self._queue and not self.closed and self.has_room():
            self._send_request(self._queue.popleft())

    def _response(self, ev: h2e.ResponseReceived) -> None:
        sid = ev.stream_id or 0
        entry = self._opening.pop(sid, None)
        t = self.streams.get(sid)
        if entry is None or t is None:
            return
        protocol, d = entry
        status = {_b(k): _b(v) for k, v in (ev.headers or [])}.get(b":status", b"0")
        try:
            code = int(status)
        except ValueError:
            code = 0
        if code == 200:
            t.attach(protocol)
            d.callback(t)
            return
        self.log.debug("HTTP/2 pool: stream refused by the server: status %d", code)
        t.abortConnection()
        d.errback(H2StreamRefused(code))

    def _forget(self, t: H2StreamTransport, reason: Exception) -> None:
        super()._forget(t, reason)
        entry = self._opening.pop(t.stream_id, None)
        if entry is not None and not entry[1].called:
            entry[1].errback(H2PoolError(f"HTTP/2 pool stream ended before the server's answer: {reason}"))
        if not self.closed:
            self._drain_queue()

    def _settings_received(self) -> None:
        self._drain_queue()  # the stream limit may have grown

    # -- teardown ------------------------------------------------------------------------
    def _stop_timers(self) -> None:
        call, self._ping_call = self._ping_call, None
        _cancel(call)

    def _on_shutdown(self, exc: Exception) -> None:
        exc = self.failure or exc
        waiters, self._ready_waiters = self._ready_waiters, []
        queued, self._queue = list(self._queue), deque()
        opening, self._opening = list(self._opening.values()), {}
        for ready in waiters:
            ready.errback(exc)
        for _, d in queued + opening:
            if not d.called:
                d.errback(exc)

    def _lost_exception(self, reason: Failure) -> Exception:
        if self.failure is not None:
            return self.failure
        if not self.ready:
            if is_verification_failure(reason):
                chain = peer_certificate_chain(self.transport)
                return TLSVerificationFailed(explain_verification_failure(reason, self.authority, chain))
            return H2PoolError(f"HTTP/2 pool connection failed: {reason.getErrorMessage()}")
        return H2PoolError(f"HTTP/2 connection lost: {reason.getErrorMessage()}")

    def dial_failed(self, reason: Failure) -> None:
        """The TCP connection was never made."""
        if not self.closed:
            self._shutdown(self.failure or H2PoolError(f"HTTP/2 pool connection failed: {reason.getErrorMessage()}"))
        self._gone(reason)

    def _gone(self, reason: Failure) -> None:
        if not self.gone.called:
            self.gone.callback(None)


class H2PoolClient:
    """The client's one HTTP/2 connection to the server's tunnel port, and
    the pool streams on it.

    :meth:`open_stream` dials when there is no live connection (none yet,
    or the last one closed: a failed PING, a GOAWAY, a dropped socket), so
    the next stream after a failure re-dials.  Streams beyond the server's
    MAX_CONCURRENT_STREAMS wait (queued, in order) until earlier ones close;
    the returned Deferred can be cancelled."""

    def __init__(
        self,
        reactor: Any,
        log: NodeLog,
        ip: str,
        port: int,
        authority: str,
        tls_context_factory: Any,
        report_interval: float,
        connect_timeout: float,
    ):
        self.reactor = reactor
        self.log = log
        self.ip = ip
        self.port = port
        self.authority = authority
        self.tls_context_factory = tls_context_factory
        self.report_interval = report_interval
        self.connect_timeout = connect_timeout
        #: The current connection (ready, or being dialled); None before the first.
        self.connection: Optional[H2ClientProtocol] = None
        #: How many connections were dialled.
        self.dials = 0
        self.closed = False
        #: Connections whose socket is not gone yet (an old one may still be
        #: closing when the next is dialled): close() waits for them all.
        self._open: list[H2ClientProtocol] = []
        self._connectors: dict[H2ClientProtocol, Any] = {}
        self._timers: dict[H2ClientProtocol, Call] = {}

    def _live(self) -> H2ClientProtocol:
        conn = self.connection
        if conn is None or conn.closed:
            conn = self._dial()
        return conn

    def _dial(self) -> H2ClientProtocol:
        proto = H2ClientProtocol(self.reactor, self.log, self.authority, self.report_interval)
        self.connection = proto
        self.dials += 1
        self._open.append(proto)
        proto.gone.addBoth(self._gone, proto)
        self._connectors[proto] = self.reactor.connectSSL(
            self.ip, self.port, OneProtocolFactory(proto, proto.dial_failed), self.tls_context_factory, timeout=self.connect_timeout
        )
        if self.connect_timeout > 0:
            # connectSSL's timeout covers TCP only; this one the TLS handshake too.
            self._timers[proto] = self.reactor.callLater(self.connect_timeout, self._dial_timed_out, proto)
        proto.when_ready().addBoth(self._dial_done, proto)
        return proto

    def _dial_done(self, result: Any, proto: H2ClientProtocol) -> None:
        _cancel(self._timers.pop(proto, None))
        if isinstance(result, Failure):
            self.log.debug("HTTP/2 pool connection to %s:%d failed: %s", self.ip, self.port, result.getErrorMessage())

    def _gone(self, result: Any, proto: H2ClientProtocol) -> None:
        _cancel(self._timers.pop(proto, None))
        self._connectors.pop(proto, None)
        if proto in self._open:
            self._open.remove(proto)

    def _dial_timed_out(self, proto: H2ClientProtocol) -> None:
        self._timers.pop(proto, None)
        if proto.ready or proto.closed:
            return
        proto.failure = H2PoolError(
            f"HTTP/2 pool connection to {self.ip}:{self.port} timed out after {self.connect_timeout:g}s"
        )
        self._hang_up(proto)

    def _hang_up(self, proto: H2ClientProtocol) -> None:
        """Abandon a connection: stop dialling it, or abort its socket."""
        if proto.transport is not None:
            proto.transport.abortConnection()
            return
        connector = self._connectors.get(proto)
        if connector is not None:
            try:
                connector.stopConnecting()
            except error.NotConnectingError:
                pass

    def open_stream(self, protocol: Any) -> Deferred[H2StreamTransport]:
        """A pool stream on the shared connection (dialled if needed),
        attached to ``protocol`` once the server answered 200; the server's
        4 ID bytes then arrive through ``protocol.dataReceived``.  Fails
        with :class:`H2StreamRefused` on another status, with
        :class:`H2PoolError` (or ``TLSVerificationFailed``) when the
        connection fails."""
        if self.closed:
            return defer.fail(H2PoolError("HTTP/2 pool closed"))
        return self._live().when_ready().addCallback(lambda c: c.open_stream(protocol))

    def close(self, reason: str = "pool closed") -> Deferred[None]:
        """Close the connection (GOAWAY; every stream is lost); fires once
        every socket this client opened is gone."""
        self.closed = True
        waits: list[Deferred[None]] = []
        for proto in list(self._open):
            if proto.transport is None:
                proto.failure = proto.failure or H2PoolError("HTTP/2 pool closed")
                self._hang_up(proto)
            else:
                proto.close(reason)
            if not proto.gone.called:
                waits.append(proto.gone)  # (fires with None, never fails)
        return defer.gatherResults(waits).addCallback(lambda _: None)


# ---------------------------------------------------------------------------
# TLS contexts
# ---------------------------------------------------------------------------


@implementer(IOpenSSLClientConnectionCreator)
class _ALPNClient:
    """Wraps a client context so that every connection offers ALPN ``h2``
    only (set on the connection, so verification and SNI stay the inner
    context's)."""

    def __init__(self, inner: Any):
        self.inner = inner

    def clientConnectionForTLS(self, tls_protocol: Any) -> SSL.Connection:
        if IOpenSSLClientConnectionCreator.providedBy(self.inner):
            conn = self.inner.clientConnectionForTLS(tls_protocol)
        else:
            conn = SSL.Connection(self.inner.getContext(), None)
        conn.set_alpn_protos([ALPN])
        return conn


def h2_client_context(tls_code: int, server_name: str, trust_roots: Any = None) -> Any:
    """The client TLS for an HTTP/2 pool (SPEC-1.14 §4.5, §4.6): TLS 1.3 and
    ALPN ``h2``.  ``tls_code`` 2 verifies the chain (system roots, or
    ``trust_roots`` as :func:`nodepass.net.tls.client_context_factory`
    takes them) and ``server_name``, which is also sent as SNI when it is a
    DNS name; any other code neither verifies nor sends SNI (the dial
    target is an IP address)."""
    if tls_code == 2:
        inner = client_context_factory(2, server_name, trust_roots)
    else:
        inner = client_context_factory(1, "")
    return _ALPNClient(inner)


_server_cache: list[tuple[Any, ssl.CertificateOptions]] = []


def h2_server_context(options: ssl.CertificateOptions) -> ssl.CertificateOptions:
    """A server context with the certificate of ``options`` (what
    ``ServerCredentials.context_factory()`` returns, so a reloaded
    certificate is used) that selects ALPN ``h2``: TLS 1.3 only, session
    tickets on.  Cached for the last ``options`` given.  A client offering
    no ALPN still completes the handshake (and is then closed by
    :class:`H2PoolServerProtocol`)."""
    for source, made in _server_cache:
        if source is options:
            return made
    made = ssl.CertificateOptions(
        privateKey=options.privateKey,
        certificate=options.certificate,
        extraCertChain=list(options.extraCertChain or []) or None,
        raiseMinimumTo=TLSVersion.TLSv1_3,
        enableSessionTickets=True,
        acceptableProtocols=[ALPN],
    )
    try:
        made.getContext().set_tls13_ciphersuites(TLS13_SUITES)
    except (AttributeError, SSL.Error):
        pass
    _server_cache[:] = [(options, made)]
    return made


__all__ = [
    "ALPN",
    "H2ClientProtocol",
    "H2PoolClient",
    "H2PoolError",
    "H2PoolServerProtocol",
    "H2StreamRefused",
    "H2StreamTransport",
    "h2_client_context",
    "h2_server_context",
]
