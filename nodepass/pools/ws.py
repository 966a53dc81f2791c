"""WebSocket pool transport (SPEC-1.14 §4.4, ``type=2``).

Each pool connection is one WebSocket over its own TCP connection to the
tunnel port (TLS first when ``tls`` is 1 or 2, or on port 443: §1).  The
client sends an HTTP/1.1 upgrade request, the server answers ``101``, and
from then on every write of either side is **one binary message in one
frame**; the receiving side treats the payloads as a byte stream, but one
``dataReceived`` never spans two messages, so a UDP datagram written as one
message arrives as one piece (the WebSocket pool preserves datagram
boundaries, unlike the other pools).

This module gives the rest of the code what :mod:`nodepass.pools.quic`
gives for QUIC streams: :class:`WebSocketStreamTransport` is an ordinary
Twisted transport (``ITransport``, ``IPushProducer`` for its reading,
``IConsumer`` for its writing), so pools, relays and UDP bridges use it
unchanged.  :class:`WebSocketUpgradeProtocol` is the server side of one
accepted connection, :class:`WebSocketPoolClient` dials the client side.

Why the pieces are split the way they are:

* **Control frames and the close handshake: wsproto**
  (``wsproto.connection.Connection``, its post-handshake sans-I/O object).
  It is maintained, typed and has no I/O of its own (so the reactor drives
  it, as aioquic is driven in the QUIC pool); it answers pings, checks and
  answers Close frames and keeps the close handshake's state, and names
  what is wrong with a frame header we refuse.  Autobahn would also do, but
  it brings its own Twisted protocol classes and buffering that would sit
  between the relay's producers and the socket.
* **Data frames: here.**  Every write is one binary frame, byte for byte as
  wsproto would make it (FIN set, opcode 2, the shortest length form, a
  fresh ``os.urandom`` mask per frame from a client, none from a server),
  written as header and payload without joining them: on a plain socket in
  one ``sendmsg``, under TLS through the fast TLS data path
  (``nodepass.relay.tls_fast``, whole chunks into OpenSSL).  Received
  frames are parsed here too (:meth:`WebSocketStreamTransport._consume`):
  each binary payload is handed on as it arrives, unmasked by C code
  (``websockets``' ``apply_mask``), piece by piece -- a piece never spans
  two frames, so never two messages -- and the socket is read into one
  shared buffer.  wsproto's own path parsed, copied and re-joined every
  frame and was most of this pool's CPU (issue 12's profile); control
  frames and refused headers still go to wsproto.
* **The HTTP upgrade is written here, by hand.**  Go's client spells its
  headers ``Sec-Websocket-Key``/``Sec-Websocket-Version`` in a fixed order
  with ``User-Agent`` and ``Accept-Encoding``, and Go's server answers with a
  fixed set (SPEC-1.14 §4.4).  wsproto's h11-based handshake (and autobahn's)
  cannot produce those bytes, and both request and answer are a dozen lines.

Flow control, so that nothing buffers without bound:

* reading: :meth:`WebSocketStreamTransport.pauseProducing` pauses the
  underlying TCP/TLS transport's reading, so the far writer stalls through
  TCP; what was already read (at most one socket read) is kept
  (:attr:`WebSocketStreamTransport._rest`) and delivered on resume;
* writing: :meth:`WebSocketStreamTransport.registerProducer` registers the
  producer on the underlying transport, so its write buffer pauses our
  producer exactly as a plain TCP connection would.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import os
import re
import socket
import struct
from functools import partial
from typing import Any, Callable, Optional, Sequence

from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IPushProducer, ITransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import CloseConnection, Ping
from zope.interface import implementer

from nodepass.base.logs import NodeLog
from nodepass.base.timers import ClockLike
from nodepass.compat.openssl_internals import session_reused
from nodepass.compat.twisted_internals import below_tls, is_plain_tcp, read_into, tls_layer, write_parts_through
from nodepass.compat.wsproto_internals import apply_mask
from nodepass.net.dialer import OneProtocolFactory
from nodepass.net.tls import ResumingClient
from nodepass.relay import tls_fast
from nodepass.relay.core import no_delay

#: RFC 6455 §1.3: appended to the client's key before hashing.
WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: Go's ``ReadHeaderTimeout`` on the server: the whole request head (and any
#: idle time before it) must arrive within this many seconds.
HEADER_TIMEOUT = 10.0
#: Largest request head the server reads (Go allows 1 MiB; a real upgrade
#: request is about 200 bytes, so 8 KiB bounds a garbage sender early).
MAX_REQUEST_HEAD = 8192
#: Largest answer head the client reads.
MAX_ANSWER_HEAD = 8192
#: Largest error body the client waits for (``pool full\n`` and Go's own
#: error texts are far below it), to name the refusal in its error.
MAX_ERROR_BODY = 1024
#: How long the client's dial, TLS handshake and upgrade may take together
#: (Go's pool gives ``createConnection`` a 30 s context).
HANDSHAKE_TIMEOUT = 30.0
#: How long a closing side waits for the peer's Close frame (coder/websocket
#: waits 5 s), and then again for the TCP/TLS connection to finish closing
#: before it is aborted.
CLOSE_TIMEOUT = 5.0

#: Close status codes (RFC 6455 §7.4.1).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_UNSUPPORTED_DATA = 1003
CLOSE_NO_STATUS = 1005
CLOSE_INVALID_PAYLOAD = 1007

#: Read size of a pool connection's plain TCP socket (over TLS: the TLS
#: fast path's, ``tls_fast.TLS_RELAY_BUFFER_SIZE``), also its write
#: buffer's high-water mark, as for relayed sockets.
PLAIN_READ_SIZE = 256 * 1024
#: Kernel receive buffer of a pool connection's socket (Linux doubles it):
#: fixed, because with receive-buffer autotuning (up to
#: ``net.ipv4.tcp_rmem``'s maximum, 32 MiB here) a reader as quick as this
#: one lets the kernel hold tens of MiB for a stalled stream before the far
#: writer feels it.  2 MiB still keeps a loopback or LAN pipe full.
SOCKET_RECEIVE_BUFFER = 1024 * 1024

# What the payload of the frame being read is for: delivered (binary
# data), passed to wsproto (control frames), or skipped (a refused text
# message).
_DATA, _PASS, _SKIP = "data", "pass", "skip"
_CONTROL = (0x8, 0x9, 0xA)
_HEAD16 = struct.Struct("!BBH")
_HEAD64 = struct.Struct("!BBQ")
# Plain sockets read into this one buffer (the reactor runs one read at a
# time, and the frame reader copies what it keeps before it returns).
_read_buffer = memoryview(bytearray(PLAIN_READ_SIZE))


def _feed_view(stream: "WebSocketStreamTransport", data: memoryview) -> None:
    stream.feed(data)


def _bound_receive_buffer(transport: Any) -> None:
    """A fixed kernel receive buffer (:data:`SOCKET_RECEIVE_BUFFER`) for the
    TCP connection under a WebSocket."""
    tls = tls_layer(transport)
    conn = below_tls(transport, tls)[0] if tls is not None else transport
    sock = getattr(conn, "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_RECEIVE_BUFFER)
        except OSError:
            pass


_HEAD_END = re.compile(rb"\r?\n\r?\n")
_LINE_END = re.compile(rb"\r?\n")
#: RFC 7230 ``token`` characters: method and header names.
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_VERSION = re.compile(rb"^HTTP/(\d)\.(\d)$")
_STATUS_LINE = re.compile(rb"^HTTP/\d\.\d (\d{3})(?: (.*))?$")
#: Control characters other than tab, which may separate a header's value.
_ANY_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")

_STATUS_TEXT = {
    101: "Switching Protocols",
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    426: "Upgrade Required",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


class WebSocketError(Exception):
    """A WebSocket pool connection could not be set up."""


class WebSocketUpgradeError(WebSocketError):
    """The server answered the upgrade with something other than ``101``.

    ``str()`` is the status and what the server said, e.g. ``503 pool full``
    (the body when there is one, else the reason phrase)."""

    def __init__(self, status: int, reason: str = "", body: bytes = b""):
        self.status = status
        self.reason = reason
        self.body = body
        text = body.decode("utf-8", "replace").strip() or reason
        super().__init__(f"{status} {text}".strip())


class WebSocketHandshakeError(WebSocketError):
    """A ``101`` answer that is not a valid WebSocket accept, or a connection
    that ended (or sent garbage) before the upgrade completed."""


class WebSocketHandshakeTimeout(WebSocketError):
    """The dial, TLS handshake and upgrade took longer than allowed."""


# -- the upgrade bytes ----------------------------------------------------------


def new_key() -> str:
    """A fresh ``Sec-Websocket-Key``: 16 random bytes, base64."""
    return base64.b64encode(os.urandom(16)).decode("ascii")


def accept_value(key: str) -> str:
    """RFC 6455 ``Sec-WebSocket-Accept`` for a client key:
    ``OabYU+AjCv/nJYpuwpfMRA==`` gives ``w6d0uOVLoD9VXqQQnepsp9nZfB4=``."""
    digest = hashlib.sha1(key.strip().encode("ascii") + WEBSOCKET_GUID).digest()
    return base64.b64encode(digest).decode("ascii")


def http_date(seconds: float) -> str:
    """An HTTP ``Date`` value (``Mon, 02 Jan 2006 15:04:05 GMT``), made
    once per second (every pool connection's answer carries one)."""
    whole = int(seconds)
    cached = _date_cache
    if cached[0] != whole:
        cached[:] = [whole, email.utils.formatdate(whole, usegmt=True)]
    return str(cached[1])


_date_cache: list[Any] = [None, ""]


def upgrade_request(host: str, key: str, bearer: str = "") -> bytes:
    """The upgrade request byte for byte as Go's client sends it
    (SPEC-1.14 §4.4): path ``/``, ``Host`` the tunnel host without port,
    Go's header spelling and order, no subprotocol, extension or Origin.

    ``bearer``: our client adds ``Authorization: Bearer TOKEN`` (the
    handshake's token), which a Go server ignores and ours uses to accept
    pool connections from an IP other than the handshake's."""
    auth = f"Authorization: Bearer {bearer}\r\n" if bearer else ""
    return (
        "GET / HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        "User-Agent: Go-http-client/1.1\r\n"
        f"{auth}"
        "Connection: Upgrade\r\n"
        f"Sec-Websocket-Key: {key}\r\n"
        "Sec-Websocket-Version: 13\r\n"
        "Upgrade: websocket\r\n"
        "Accept-Encoding: gzip\r\n"
        "\r\n"
    ).encode("ascii")


def upgrade_answer(key: str, date: str) -> bytes:
    """The ``101`` answer byte for byte as Go's server sends it."""
    return (
        "HTTP/1.1 101 Switching Protocols\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-Websocket-Accept: {accept_value(key)}\r\n"
        "Upgrade: websocket\r\n"
        f"Date: {date}\r\n"
        "\r\n"
    ).encode("ascii")


def error_answer(status: int, body: str, date: str, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """An error answer as Go's ``http.Error`` writes it (its header map
    sorted, then ``Date`` and ``Content-Length``), plus ``Connection: close``
    because we close after it: a refused pool connection is not reused."""
    payload = (body + "\n").encode("utf-8")
    fields = sorted(
        (("Content-Type", "text/plain; charset=utf-8"), ("X-Content-Type-Options", "nosniff")) + tuple(headers)
    )
    lines = [f"HTTP/1.1 {status} {_STATUS_TEXT.get(status, '')}"]
    lines += [f"{name}: {value}" for name, value in fields]
    lines += [f"Date: {date}", f"Content-Length: {len(payload)}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("utf-8") + payload


def bad_request_answer(status: int, detail: str = "") -> bytes:
    """Go's server-level refusal of a request it cannot parse (before any
    handler runs): ``400 Bad Request``, ``431 ...``, ``505 ...``."""
    text = f"{status} {_STATUS_TEXT.get(status, '')}"
    if detail:
        text += ": " + detail
    return (f"HTTP/1.1 {text}\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n{text}").encode(
        "utf-8"
    )


def _head_end(buf: bytes) -> Optional[tuple[int, int]]:
    """``(end of head, start of what follows)`` once a blank line ends the
    head (CRLF or bare LF, as Go's reader accepts), else None."""
    m = _HEAD_END.search(buf)
    if m is None:
        return None
    return m.start(), m.end()


def _parse_headers(lines: list[bytes]) -> Optional[dict[str, list[str]]]:
    """Header lines by lowercase name; None if one is malformed (no colon,
    a name that is not a token, or folded)."""
    headers: dict[str, list[str]] = {}
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.match(name):
            return None
        headers.setdefault(name.decode("ascii").lower(), []).append(value.strip(b" \t").decode("latin-1"))
    return headers


def _has_token(headers: dict[str, list[str]], name: str, token: str) -> bool:
    """Whether any ``name`` header lists ``token`` (comma-separated,
    case-insensitive), as coder/websocket checks Connection and Upgrade."""
    for value in headers.get(name, ()):
        if any(part.strip().lower() == token for part in value.split(",")):
            return True
    return False


# -- the stream transport -------------------------------------------------------


@implementer(ITransport, IPushProducer, IConsumer)
class WebSocketStreamTransport:
    """One pool connection over one WebSocket, as a Twisted transport.

    ``transport`` is the underlying TCP or TLS transport, past the upgrade;
    ``client`` says which side we are (the client masks its frames);
    ``trailing`` holds bytes that arrived right behind the upgrade head (the
    server's ID often comes in the same segment as its ``101``).  The owner
    feeds it the underlying connection's bytes (:meth:`feed`) and its end
    (:meth:`underlying_lost`); :meth:`attach` connects the protocol on top.
    Until then reading is held, so early bytes wait in the socket.
    """

    #: ``write`` copies what it is given before returning (wsproto builds the
    #: frame at once), so a relay may hand it views of its read buffer.
    takes_views = True
    websocket_stream = True

    def __init__(
        self,
        transport: Any,
        client: bool,
        clock: ClockLike,
        trailing: bytes = b"",
        close_timeout: float = CLOSE_TIMEOUT,
    ):
        self.underlying: Any = transport
        self.client = client
        self.clock = clock
        self.close_timeout = close_timeout
        self.protocol: Any = None
        self.connected = True
        self.disconnecting = False
        self.producer: Any = None
        #: Close status the peer sent, once its Close frame arrived.
        self.peer_close_code: Optional[int] = None
        self._ws = Connection(ConnectionType.CLIENT if client else ConnectionType.SERVER)
        self._held = False  # our reader paused us
        self._reading_paused = False  # we paused the underlying transport
        self._producer_below = False  # self.producer is registered on the underlying transport
        self._processing = False
        self._again = False
        # The frame reader (see _consume): received bytes not yet parsed or
        # delivered (a partial header, or what came while the reader was
        # paused), and where we are in the current frame.
        self._rest = bytearray()
        self._left = 0  # payload bytes of the current frame still to come
        self._kind = _DATA  # what they are for
        self._key: Optional[bytes] = None  # its masking key (the server reads masked frames)
        self._key_turn = 0  # payload bytes of the frame unmasked so far, modulo 4
        self._in_message = False  # a message's last frame (FIN) is still to come
        self._text = False  # ... and it is a text message (refused, its frames discarded)
        self._broken = False  # a protocol error: nothing more is parsed
        self._mask_bit = 0x80 if client else 0
        self._send_parts: Callable[[Sequence[Any]], None] = self._send_generic
        #: How frames go to and from the socket: ``"plain"`` (straight, on a
        #: TCP connection), ``"tls"`` (the fast TLS data path) or ``""``
        #: (through the underlying transport, e.g. with NP_NO_FAST_TLS).
        self.fast_path = ""
        self._closing = False  # a Close frame is sent or being answered: no more data either way
        self._tcp_closing = False  # the underlying transport is being closed
        self._lost = False
        self._reason: Optional[Exception] = None  # what connectionLost will report
        self._pending_loss: Optional[Failure] = None  # lost before attach()
        self._timer: Any = None
        self._fast_paths()
        if trailing:
            self._rest += trailing
        self._update_reading()

    # -- wiring ---------------------------------------------------------------
    def attach(self, protocol: Any) -> None:
        """Connect ``protocol`` (``makeConnection``), then deliver what is
        waiting: buffered messages, or the loss that came first."""
        if self.protocol is not None:
            raise RuntimeError("a protocol is already attached")
        self.protocol = protocol
        protocol.makeConnection(self)
        if self._pending_loss is not None:
            reason, self._pending_loss = self._pending_loss, None
            protocol.connectionLost(reason)
            return
        self._update_reading()
        self._process()

    def _fast_paths(self) -> None:
        """Choose how frames are written and read: straight to and from the
        socket of a plain TCP connection, through the fast TLS data path
        (``nodepass.relay.tls_fast``) under a TLS one, else through the
        underlying transport's ``write`` and its protocol's ``dataReceived``
        (which calls :meth:`feed`)."""
        underlying = self.underlying
        _bound_receive_buffer(underlying)
        if is_plain_tcp(underlying):
            underlying.bufferSize = PLAIN_READ_SIZE
            self._send_parts = partial(write_parts_through, underlying)
            read_into(underlying, _read_buffer, _feed_view, self)
            self.fast_path = "plain"
            return
        tls = tls_layer(underlying)
        if tls is None or os.environ.get("NP_NO_FAST_TLS"):
            return
        below_tls(underlying, tls)[0].bufferSize = tls_fast.TLS_RELAY_BUFFER_SIZE
        write_parts = tls_fast.install(underlying, self.feed)
        if write_parts is not None:
            self._send_parts = write_parts
            self.fast_path = "tls"

    def _send_generic(self, parts: Sequence[Any]) -> None:
        self.underlying.write(b"".join(parts))

    def feed(self, data: bytes | memoryview) -> None:
        """Bytes the underlying connection received (a view is not kept:
        what is not delivered at once is copied)."""
        if self._lost or self._ws.state is ConnectionState.CLOSED or self._broken:
            return  # after the close handshake: nothing more is WebSocket
        if self._rest or self._processing or not self._may_deliver():
            self._rest += data
            self._process()
            return
        # The usual case: parse and deliver straight from ``data``.
        self._processing = True
        try:
            done = self._consume(data)
            if done < len(data) and not self._lost and not self._broken:
                self._rest += data[done:]
        finally:
            self._processing = False
        if self._again:
            self._process()

    def underlying_lost(self, reason: Failure) -> None:
        """The underlying connection ended: report it (once) upwards."""
        self._cancel_timer()
        if self._lost:
            return
        self._lost = True
        self.connected = False
        self.disconnecting = True
        why = self._reason
        failure = Failure(why) if why is not None else reason
        producer, self.producer = self.producer, None
        if producer is not None and not self._producer_below:
            # Twisted stops a producer still registered below; one we took
            # off for the close must be told here.
            producer.stopProducing()
        self._producer_below = False
        if self.protocol is None:
            self._pending_loss = failure
            return
        self.protocol.connectionLost(failure)

    # -- receiving --------------------------------------------------------------
    def _may_deliver(self) -> bool:
        return self._closing or (self.protocol is not None and not self._held)

    def _process(self) -> None:
        """Parse and deliver what :attr:`_rest` holds, for as long as the
        reader is not paused.  Re-entrant calls (a reader that pauses and
        resumes, or closes, from ``dataReceived``) only flag another round."""
        if self._processing:
            self._again = True
            return
        self._processing = True
        try:
            again = True
            while again and self._rest and not self._lost and not self._broken and self._may_deliver():
                self._again = False
                buf, self._rest = self._rest, bytearray()
                with memoryview(buf) as view:
                    done = self._consume(view)
                    if done < len(buf) and not self._lost and not self._broken:
                        # Bytes fed meanwhile (re-entrantly) come after these.
                        self._rest = buf[done:] + self._rest
                again = self._again
        finally:
            self._processing = False

    def _consume(self, data: Any) -> int:
        """Parse frames from ``data`` (bytes or a view) and hand data frames'
        payloads on as they come, piece by piece (a piece never spans two
        frames, so never two messages); control frames go to wsproto, which
        answers pings and keeps the close handshake's state.  Returns how
        much of ``data`` was used: the rest is a partial header, or waits
        for a paused reader."""
        pos = 0
        end = len(data)
        while pos < end:
            if self._lost or self._broken or self._ws.state is ConnectionState.CLOSED:
                return end
            left = self._left
            if left:
                take = left if left <= end - pos else end - pos
                kind = self._kind
                if kind is _DATA and not self._closing:
                    if not self._may_deliver():
                        return pos
                    piece = data[pos : pos + take]
                    key = self._key
                    if key is not None:
                        turn = self._key_turn
                        piece = apply_mask(piece, key[turn:] + key[:turn] if turn else key)
                        self._key_turn = (turn + take) & 3
                    else:
                        piece = bytes(piece)
                    pos += take
                    self._left = left - take
                    self.protocol.dataReceived(piece)
                elif kind is _PASS:
                    self._left = left - take
                    self._to_wsproto(bytes(data[pos : pos + take]))
                    pos += take
                else:  # skipped, or data after our Close
                    pos += take
                    self._left = left - take
                continue
            # A frame header.
            if end - pos < 2:
                return pos
            if not self._may_deliver():
                return pos
            b0 = data[pos]
            b1 = data[pos + 1]
            size = b1 & 0x7F
            head = 2
            if size == 126:
                head = 4
            elif size == 127:
                head = 10
            masked = b1 & 0x80
            if masked:
                head += 4
            if end - pos < head:
                return pos
            opcode = b0 & 0x0F
            if size == 126:
                size = (data[pos + 2] << 8) | data[pos + 3]
                minimal = size > 125
            elif size == 127:
                size = int.from_bytes(data[pos + 2 : pos + 10], "big")
                minimal = size > 0xFFFF and not size >> 63
            else:
                minimal = True
            if (
                b0 & 0x70
                or masked != self._mask_bit ^ 0x80
                or not minimal
                or (opcode > 2 and (opcode not in _CONTROL or size > 125 or not b0 & 0x80))
            ):
                # Not a frame we may accept: wsproto names what is wrong.
                self._to_wsproto(bytes(data[pos : pos + head]))
                self._broken_frame("WebSocket frame header refused")
                return end
            pos += head
            self._left = size
            self._key = bytes(data[pos - 4 : pos]) if masked else None
            self._key_turn = 0
            if opcode in _CONTROL:
                # Ping, pong or close: wsproto checks and handles it.
                self._kind = _PASS
                self._to_wsproto(bytes(data[pos - head : pos]))
                continue
            fin = b0 & 0x80
            if opcode == 0:
                if not self._in_message:
                    self._protocol_error("unexpected CONTINUATION")
                    return end
            elif self._in_message:
                self._protocol_error(f"expected CONTINUATION, got {opcode:#x}")
                return end
            else:
                self._text = opcode == 1
            self._in_message = not fin
            if self._text:
                # Go's pool reader accepts binary messages only: a text
                # frame fails it, and it closes with 1003 (SPEC-1.14 §4.4).
                self._kind = _SKIP
                if not self._closing:
                    self._fail(CLOSE_UNSUPPORTED_DATA, "WebSocket text frame (only binary messages are carried)")
            else:
                self._kind = _DATA
        return end

    def _to_wsproto(self, raw: bytes) -> None:
        """Bytes of a control frame (or of a refused header) for wsproto;
        then what it made of them."""
        if raw:
            self._ws.receive_data(raw)
        for event in self._ws.events():
            self._handle(event)
            if self._lost:
                return

    def _protocol_error(self, why: str) -> None:
        """A frame out of order (wsproto's message decoder would refuse it
        too, with the same words): close with 1002."""
        self._broken_frame(why)

    def _broken_frame(self, why: str) -> None:
        """Nothing after a frame we cannot parse is read as frames (wsproto
        stops there too); the close handshake is under way."""
        self._broken = True
        self._rest = bytearray()
        self._left = 0
        if not self._closing:  # (wsproto has reported a refused header by now)
            self._fail(CLOSE_PROTOCOL_ERROR, f"WebSocket protocol error: {why}")

    def _handle(self, event: Any) -> None:
        if isinstance(event, Ping):
            if self._ws.state is ConnectionState.OPEN:
                self._send_parts((self._ws.send(event.response()),))
        elif isinstance(event, CloseConnection):
            self._close_event(event)
        # Pong: nothing to do (we send no pings).  Data frames never reach
        # wsproto.

    def _close_event(self, event: CloseConnection) -> None:
        state = self._ws.state
        if state not in (ConnectionState.REMOTE_CLOSING, ConnectionState.CLOSED):
            # wsproto reports a frame it cannot parse as a close event of
            # its own, without a state change: a protocol error.  Invalid
            # UTF-8 (1007) only comes from text payloads here, which Go
            # refuses with 1003 whatever they hold.
            code = event.code
            if code == CLOSE_INVALID_PAYLOAD:
                code = CLOSE_UNSUPPORTED_DATA
            self._fail(code, f"WebSocket protocol error: {event.reason}")
            return
        self.peer_close_code = event.code
        if state is ConnectionState.REMOTE_CLOSING:
            # The peer started the close: answer it and finish the connection.
            if self._reason is None:
                self._reason = _peer_close_reason(event.code)
            self._closing = True
            self.disconnecting = True
            self._send_parts((self._ws.send(event.response()),))
        # Either way the close handshake is complete: the TCP/TLS
        # connection goes now (bounded, in case it does not finish).
        self._close_underlying()

    # -- closing ----------------------------------------------------------------
    def _fail(self, code: int, why: str) -> None:
        if self._closing:
            return
        self._reason = error.ConnectionLost(why)
        self._start_close(code)

    def _start_close(self, code: int) -> None:
        """Send our Close frame (after everything written before it) and
        read on until the peer answers, at most :attr:`close_timeout`."""
        self._closing = True
        self.disconnecting = True
        if self._ws.state is ConnectionState.OPEN:
            self._send_parts((self._ws.send(CloseConnection(code=code)),))
        self._update_reading()  # the peer's Close must be seen, paused or not
        self._arm_timer(self._close_timed_out)
        self._process()  # the answer may be buffered already

    def _close_timed_out(self) -> None:
        self._timer = None
        self._close_underlying()

    def _close_underlying(self) -> None:
        """Close the TCP/TLS connection (it flushes first), and abort it if
        that does not finish within :attr:`close_timeout`."""
        if self._tcp_closing or self._lost:
            return
        self._tcp_closing = True
        self._closing = True
        self.disconnecting = True
        if self._producer_below:
            # A TLS transport does not start its shutdown while a producer
            # is registered on it.
            self._producer_below = False
            self.underlying.unregisterProducer()
        self._update_reading()
        self._arm_timer(self._linger_timed_out)
        self.underlying.loseConnection()

    def _linger_timed_out(self) -> None:
        self._timer = None
        if not self._lost:
            self.underlying.abortConnection()

    def _arm_timer(self, fn: Callable[[], None]) -> None:
        self._cancel_timer()
        self._timer = self.clock.callLater(self.close_timeout, fn)

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    # -- ITransport ---------------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` as one binary message in one frame (nothing for an
        empty write, as a TCP transport sends nothing)."""
        if self._closing or self._lost:
            return
        size = len(data)
        if not size:
            return
        # wsproto's frame, byte for byte (FIN, opcode 2, the shortest
        # length, a fresh os.urandom key from a client), built here so that
        # the payload is masked once and never copied into a frame buffer.
        bit = self._mask_bit
        if size <= 125:
            head = bytes((0x82, bit | size))
        elif size <= 0xFFFF:
            head = _HEAD16.pack(0x82, bit | 126, size)
        else:
            head = _HEAD64.pack(0x82, bit | 127, size)
        if bit:
            key = os.urandom(4)
            self._send_parts((head + key, apply_mask(data, key)))
        else:
            self._send_parts((head, data))

    def writeSequence(self, seq: Any) -> None:
        """All of ``seq`` as one message: it is one write."""
        self.write(b"".join(seq))

    def loseConnection(self) -> None:
        """Close with status 1000 after everything written so far, then
        close the TCP/TLS connection once the peer's Close arrives (or after
        :attr:`close_timeout`).  Messages that arrive meanwhile are
        discarded, as a TCP transport stops reading when it closes.  The
        protocol sees ``ConnectionDone``."""
        if self._closing or self._lost:
            return
        self._reason = error.ConnectionDone("WebSocket closed")
        self._start_close(CLOSE_NORMAL)

    def abortConnection(self) -> None:
        """Drop the connection at once, without a close handshake."""
        if self._lost:
            return
        self._reason = error.ConnectionAborted("WebSocket aborted")
        self._closing = True
        self._tcp_closing = True
        self.disconnecting = True
        self._cancel_timer()
        self.underlying.abortConnection()

    def getPeer(self) -> Any:
        return self.underlying.getPeer()

    def getHost(self) -> Any:
        return self.underlying.getHost()

    def getPeerCertificate(self) -> Any:
        """The TLS peer's certificate (the client computes the ``verify``
        fingerprint from it, SPEC-1.14 §3.5), or None without TLS."""
        tls = tls_layer(self.underlying)
        if tls is None:
            return None
        return tls.getPeerCertificate()

    def getHandle(self) -> Any:
        """The ``OpenSSL.SSL.Connection`` with TLS (its ``get_certificate``
        is our own certificate), else the socket."""
        tls = tls_layer(self.underlying)
        if tls is not None:
            return tls.getHandle()
        return self.underlying.getHandle()

    # -- IPushProducer (our reading) ----------------------------------------------
    def pauseProducing(self) -> None:
        self._held = True
        self._update_reading()

    def resumeProducing(self) -> None:
        if not self._held or self._lost:
            return
        self._held = False
        self._update_reading()
        self._process()

    def stopProducing(self) -> None:
        self.loseConnection()

    def _update_reading(self) -> None:
        """The underlying transport reads while someone takes what comes: a
        reader is attached and not paused, or we are closing (and discard)."""
        if self._lost:
            return
        pause = not self._may_deliver()
        if pause == self._reading_paused:
            return
        self._reading_paused = pause
        if pause:
            self.underlying.pauseProducing()
        else:
            self.underlying.resumeProducing()

    # -- IConsumer (our writing) ----------------------------------------------------
    def registerProducer(self, producer: Any, streaming: bool) -> None:
        """Register ``producer`` on the underlying transport: its write
        buffer pauses and resumes the producer."""
        if self.producer is not None:
            raise RuntimeError("a producer is already registered")
        self.producer = producer
        if not self._lost and not self._tcp_closing:
            self.underlying.registerProducer(producer, streaming)
            self._producer_below = True

    def unregisterProducer(self) -> None:
        if self._producer_below:
            self._producer_below = False
            self.underlying.unregisterProducer()
        self.producer = None


def _peer_close_reason(code: int) -> Exception:
    """What the protocol hears when the peer closed with ``code``."""
    if code in (CLOSE_NORMAL, CLOSE_GOING_AWAY, CLOSE_NO_STATUS):
        return error.ConnectionDone("WebSocket closed by the peer")
    return error.ConnectionLost(f"WebSocket closed by the peer with status {code}")


# -- server side -------------------------------------------------------------------


class WebSocketUpgradeProtocol(Protocol):
    """The server side of one accepted tunnel-port connection (after TLS, if
    any): reads the upgrade request within :data:`HEADER_TIMEOUT` and
    :data:`MAX_REQUEST_HEAD` bytes, refuses as Go does (``503 pool full``
    when ``is_full()``, ``426``/``405``/``400`` for a bad upgrade, ``400``/
    ``431``/``505`` for a request that is not HTTP/1.x) and closes, or
    answers ``101`` and hands the new :class:`WebSocketStreamTransport` to
    ``on_stream``, which attaches the pool end (writes the ID, etc.).

    Any path is accepted and there is no Origin check (§4.4); ``authorize``,
    when given, decides who may join (the server passes a token-or-IP rule).
    """

    #: The accepted TCP connection (or its TLS transport).
    transport: Any

    def __init__(
        self,
        clock: ClockLike,
        log: NodeLog,
        on_stream: Callable[[WebSocketStreamTransport], None],
        is_full: Callable[[], bool],
        header_timeout: float = HEADER_TIMEOUT,
        max_head: int = MAX_REQUEST_HEAD,
        close_timeout: float = CLOSE_TIMEOUT,
        authorize: Optional[Callable[[dict[str, list[str]]], bool]] = None,
    ):
        self.clock = clock
        self.log = log
        self.on_stream = on_stream
        self.is_full = is_full
        #: Given the request's headers (lowercased names): whether this peer
        #: may join the pool; refused with ``403 unauthorized`` otherwise.
        self.authorize = authorize
        self.header_timeout = header_timeout
        self.max_head = max_head
        self.close_timeout = close_timeout
        #: The stream, once upgraded.
        self.stream: Optional[WebSocketStreamTransport] = None
        #: The status we refused with (None: not refused).
        self.refused: Optional[int] = None
        self._buf = b""
        self._timer: Any = None
        self._done = False  # answered (101 or refusal): no more request bytes

    def connectionMade(self) -> None:
        self._timer = self.clock.callLater(self.header_timeout, self._timed_out)

    def dataReceived(self, data: bytes) -> None:
        stream = self.stream
        if stream is not None:
            stream.feed(data)
            return
        if self._done:
            return
        self._buf += data
        ends = _head_end(self._buf)
        if ends is None:
            if len(self._buf) > self.max_head:
                self._refuse(431, bad_request_answer(431))
            return
        end, rest = ends
        head, trailing = self._buf[:end], self._buf[rest:]
        self._buf = b""
        if end > self.max_head:
            self._refuse(431, bad_request_answer(431))
            return
        self._request(head, trailing)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_timer()
        self._done = True
        if self.stream is not None:
            self.stream.underlying_lost(reason)

    # -- the request ------------------------------------------------------------
    def _request(self, head: bytes, trailing: bytes) -> None:
        lines = _LINE_END.split(head)
        parts = lines[0].split(b" ")
        if len(parts) != 3 or any(_ANY_CONTROL.search(line) for line in lines):
            self._refuse(400, bad_request_answer(400, "malformed HTTP request"))
            return
        method, target, version = parts
        m = _VERSION.match(version)
        if not method or not _TOKEN.match(method) or not target:
            self._refuse(400, bad_request_answer(400, "malformed HTTP request"))
            return
        if m is None:
            self._refuse(400, bad_request_answer(400, "malformed HTTP version"))
            return
        if m.group(1) != b"1":
            self._refuse(505, bad_request_answer(505, "unsupported protocol version"))
            return
        headers = _parse_headers(lines[1:])
        if headers is None:
            self._refuse(400, bad_request_answer(400, "malformed MIME header line"))
            return
        if version == b"HTTP/1.1" and len(headers.get("host", ())) != 1:
            detail = "missing required Host header" if "host" not in headers else "too many Host headers"
            self._refuse(400, bad_request_answer(400, detail))
            return
        self._upgrade(method.decode("ascii"), version, headers, trailing)

    def _upgrade(self, method: str, version: bytes, headers: dict[str, list[str]], trailing: bytes) -> None:
        """npws's handler: full pool first, then coder/websocket's checks in
        its order, then the ``101``."""
        date = http_date(self.clock.seconds())
        if self.authorize is not None and not self.authorize(headers):
            self._refuse(403, error_answer(403, "unauthorized", date))
            return
        if self.is_full():
            self._refuse(503, error_answer(503, "pool full", date))
            return
        upgrade_hint = (("Connection", "Upgrade"), ("Upgrade", "websocket"))
        if version != b"HTTP/1.1":
            why = f'WebSocket protocol violation: handshake request must be at least HTTP/1.1: "{version.decode()}"'
            self._refuse(426, error_answer(426, why, date))
            return
        if not _has_token(headers, "connection", "upgrade"):
            got = _first(headers, "connection")
            why = f'WebSocket protocol violation: Connection header "{got}" does not contain Upgrade'
            self._refuse(426, error_answer(426, why, date, upgrade_hint[1:]))
            return
        if not _has_token(headers, "upgrade", "websocket"):
            got = _first(headers, "upgrade")
            why = f'WebSocket protocol violation: Upgrade header "{got}" does not contain websocket'
            self._refuse(426, error_answer(426, why, date, upgrade_hint[1:]))
            return
        if method != "GET":
            why = f'WebSocket protocol violation: handshake request method is not GET but "{method}"'
            self._refuse(405, error_answer(405, why, date))
            return
        if _first(headers, "sec-websocket-version") != "13":
            got = _first(headers, "sec-websocket-version")
            why = f'unsupported WebSocket protocol version (only 13 is supported): "{got}"'
            self._refuse(400, error_answer(400, why, date, (("Sec-Websocket-Version", "13"),)))
            return
        keys = headers.get("sec-websocket-key", [])
        if len(keys) != 1:
            why = "WebSocket protocol violation: " + (
                "missing Sec-WebSocket-Key" if not keys else "multiple Sec-WebSocket-Key headers"
            )
            self._refuse(400, error_answer(400, why, date))
            return
        key = keys[0].strip()
        if not _valid_key(key):
            why = f'WebSocket protocol violation: invalid Sec-WebSocket-Key "{key}", must be a 16 byte base64 encoded string'
            self._refuse(400, error_answer(400, why, date))
            return
        self._done = True
        self._cancel_timer()
        self.transport.write(upgrade_answer(key, date))
        stream = self.stream = WebSocketStreamTransport(
            self.transport, client=False, clock=self.clock, trailing=trailing, close_timeout=self.close_timeout
        )
        try:
            self.on_stream(stream)
        except Exception as e:  # noqa: BLE001 - one bad connection must not reach the listener
            self.log.error("WebSocket pool connection dropped: %s", e)
            stream.abortConnection()

    def _refuse(self, status: int, answer: bytes) -> None:
        """Write the refusal, then close (bounded: a peer that does not read
        or finish its TLS shutdown is aborted after ``close_timeout``)."""
        self._done = True
        self.refused = status
        self._buf = b""
        self.log.debug("WebSocket upgrade refused: %d %s", status, _STATUS_TEXT.get(status, ""))
        self._cancel_timer()
        transport = self.transport
        assert transport is not None
        transport.write(answer)
        self._timer = self.clock.callLater(self.close_timeout, transport.abortConnection)
        transport.loseConnection()

    def _timed_out(self) -> None:
        """Go's ``ReadHeaderTimeout``: no complete head in time, the
        connection is dropped without an answer."""
        self._timer = None
        if self._done:
            return
        self._done = True
        self._buf = b""
        self.log.debug("WebSocket upgrade request not read within %gs", self.header_timeout)
        assert self.transport is not None
        self.transport.abortConnection()

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()


def _first(headers: dict[str, list[str]], name: str) -> str:
    values = headers.get(name)
    return values[0] if values else ""


def _valid_key(key: str) -> bool:
    try:
        return len(base64.b64decode(key.encode("ascii"), validate=True)) == 16
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return False


# -- client side --------------------------------------------------------------------


class WebSocketClientUpgradeProtocol(Protocol):
    """The client side of one pool connection until the upgrade is done:
    sends :func:`upgrade_request`, reads the answer (at most
    :data:`MAX_ANSWER_HEAD` bytes of head), checks the ``101`` and the accept
    value, then builds the :class:`WebSocketStreamTransport`, attaches
    ``attach_to`` (if given) and fires :attr:`done` with the stream.
    Anything else fails :attr:`done` (a refusal with
    :class:`WebSocketUpgradeError` naming the status) and drops the
    connection.  Timing is the caller's (:class:`WebSocketPoolClient`)."""

    #: The dialled TCP connection (or its TLS transport).
    transport: Any

    def __init__(
        self,
        clock: ClockLike,
        host: str,
        attach_to: Any = None,
        key: Optional[str] = None,
        close_timeout: float = CLOSE_TIMEOUT,
        bearer: str = "",
    ):
        self.clock = clock
        self.host = host
        self.bearer = bearer
        self.attach_to = attach_to
        self.key = key or new_key()
        self.close_timeout = close_timeout
        self.done: Deferred[WebSocketStreamTransport] = Deferred()
        self.stream: Optional[WebSocketStreamTransport] = None
        self._buf = b""
        self._refusal: Optional[tuple[int, str, int]] = None  # status, reason, body length
        self._failed = False
        self._lost = False

    def dial_failed(self, reason: Failure) -> None:
        """The TCP (or TLS) dial failed before ``connectionMade``."""
        if not self.done.called:
            self.done.errback(reason)

    def connectionMade(self) -> None:
        assert self.transport is not None
        no_delay(self.transport)  # one frame per write: no Nagle
        self.transport.write(upgrade_request(self.host, self.key, self.bearer))

    def dataReceived(self, data: bytes) -> None:
        stream = self.stream
        if stream is not None:
            stream.feed(data)
            return
        if self._failed:
            return
        self._buf += data
        if self._refusal is not None:
            self._read_refusal()
            return
        ends = _head_end(self._buf)
        if ends is None:
            if len(self._buf) > MAX_ANSWER_HEAD:
                self.fail(WebSocketHandshakeError("WebSocket upgrade answer head too large"))
            return
        end, rest = ends
        if end > MAX_ANSWER_HEAD:
            self.fail(WebSocketHandshakeError("WebSocket upgrade answer head too large"))
            return
        head, self._buf = self._buf[:end], self._buf[rest:]
        self._answer(head)

    def _answer(self, head: bytes) -> None:
        lines = _LINE_END.split(head)
        m = _STATUS_LINE.match(lines[0])
        headers = _parse_headers(lines[1:])
        if m is None or headers is None:
            self.fail(WebSocketHandshakeError(f"not an HTTP answer to the WebSocket upgrade: {lines[0][:80]!r}"))
            return
        status = int(m.group(1))
        reason = (m.group(2) or b"").decode("latin-1")
        if status != 101:
            length = _first(headers, "content-length")
            size = int(length) if length.isdigit() else 0
            self._refusal = (status, reason, min(size, MAX_ERROR_BODY))
            self._read_refusal()
            return
        if not _has_token(headers, "upgrade", "websocket") or not _has_token(headers, "connection", "upgrade"):
            self.fail(WebSocketHandshakeError("WebSocket upgrade answer without Upgrade: websocket / Connection: Upgrade"))
            return
        if _first(headers, "sec-websocket-accept") != accept_value(self.key):
            self.fail(WebSocketHandshakeError("WebSocket upgrade answer with a wrong Sec-WebSocket-Accept"))
            return
        if headers.get("sec-websocket-extensions") or headers.get("sec-websocket-protocol"):
            self.fail(WebSocketHandshakeError("WebSocket upgrade answer negotiates an extension or subprotocol"))
            return
        trailing, self._buf = self._buf, b""
        stream = self.stream = WebSocketStreamTransport(
            self.transport, client=True, clock=self.clock, trailing=trailing, close_timeout=self.close_timeout
        )
        if self.attach_to is not None:
            stream.attach(self.attach_to)
        if not self.done.called:
            self.done.callback(stream)

    def _read_refusal(self, final: bool = False) -> None:
        assert self._refusal is not None
        status, reason, size = self._refusal
        if len(self._buf) >= size or final:
            self.fail(WebSocketUpgradeError(status, reason, self._buf[:size]))

    def fail(self, why: Exception) -> None:
        """Fail :attr:`done` with ``why`` and drop the connection."""
        if self._failed or self.stream is not None:
            return
        self._failed = True
        self._buf = b""
        if self.transport is not None and not self._lost:
            self.transport.abortConnection()
        if not self.done.called:
            self.done.errback(Failure(why))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        if self.stream is not None:
            self.stream.underlying_lost(reason)
            return
        if self._refusal is not None and not self._failed:
            self._read_refusal(final=True)
            return
        if not self.done.called:
            self._failed = True
            if reason.check(error.ConnectionDone, error.ConnectionLost) and not _is_tls_error(reason):
                self.done.errback(
                    Failure(WebSocketHandshakeError(f"connection closed before the WebSocket upgrade: {reason.getErrorMessage()}"))
                )
            else:
                self.done.errback(reason)


def _is_tls_error(reason: Failure) -> bool:
    return type(reason.value).__module__.startswith("OpenSSL")


class WebSocketPoolClient:
    """Dials the client's WebSocket pool connections (SPEC-1.14 §4.4).

    ``ip``/``port``: where to connect (the resolved tunnel address);
    ``host``: the tunnel host as written in the URL, without port -- it is
    the ``Host`` header (never the ``sni`` value, §4.6), and the caller
    builds ``tls`` (a client context factory, or None for ``ws://``) for the
    same name: ``nodepass.net.tls.client_context_factory(tls_code, host)``.
    ``connect_timeout`` bounds the TCP connect, ``handshake_timeout`` the
    whole dial (TCP, TLS and upgrade).
    """

    def __init__(
        self,
        reactor: Any,
        log: NodeLog,
        ip: str,
        port: int,
        host: str,
        tls: Any = None,
        connect_timeout: float = 10.0,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        bearer: str = "",
    ):
        self.reactor = reactor
        self.bearer = bearer
        self.log = log
        self.ip = ip
        self.port = port
        self.host = host
        #: Each pool connection resumes the TLS session of an earlier one
        #: (as the TCP pool's do): a full handshake's key exchange and
        #: certificate signature cost more than the rest of a dial.
        self.tls: Optional[ResumingClient] = ResumingClient(tls) if tls is not None else None
        self.connect_timeout = connect_timeout
        self.handshake_timeout = handshake_timeout
        self.closed = False
        #: Dials in progress, each with how to give it up.
        self._dialling: dict[WebSocketClientUpgradeProtocol, Callable[[Exception], None]] = {}

    def open_stream(self, protocol: Any, key: Optional[str] = None) -> Deferred[WebSocketStreamTransport]:
        """Dial one pool connection; once the server has accepted the
        upgrade, ``protocol`` is attached to the stream (``makeConnection``)
        and the Deferred fires with the stream.  A refusal fails it with
        :class:`WebSocketUpgradeError` (``503 pool full``), a slow server
        with :class:`WebSocketHandshakeTimeout`, a TCP or TLS failure with
        Twisted's or OpenSSL's error.  ``key`` fixes the
        ``Sec-Websocket-Key`` (tests); cancelling the Deferred drops the
        dial."""
        if self.closed:
            return defer.fail(WebSocketError("WebSocket pool closed"))
        proto = WebSocketClientUpgradeProtocol(self.reactor, self.host, attach_to=protocol, key=key, bearer=self.bearer)
        factory = OneProtocolFactory(proto, proto.dial_failed)
        if self.tls is not None:
            connector = self.reactor.connectSSL(self.ip, self.port, factory, self.tls, timeout=self.connect_timeout)
        else:
            connector = self.reactor.connectTCP(self.ip, self.port, factory, timeout=self.connect_timeout)

        def give_up(why: Exception) -> None:
            if proto.transport is not None:
                proto.fail(why)
            elif not proto.done.called:
                proto.done.errback(Failure(why))
                connector.stopConnecting()  # its failure finds ``done`` fired

        self._dialling[proto] = give_up
        timer = self.reactor.callLater(
            self.handshake_timeout,
            give_up,
            WebSocketHandshakeTimeout(f"WebSocket pool connection not ready within {self.handshake_timeout:g}s"),
        )

        def finished(result: Any) -> Any:
            self._dialling.pop(proto, None)
            if timer.active():
                timer.cancel()
            if not isinstance(result, Failure):
                self._remember_session(proto.transport)
            else:
                self.log.debug("WebSocket pool connection to %s:%d failed: %s", self.ip, self.port, result.getErrorMessage())
            return result

        def cancel(d: Deferred[WebSocketStreamTransport]) -> None:
            give_up(WebSocketError("WebSocket dial cancelled"))

        # The caller's Deferred: cancellable, and independent of proto.done.
        outer: Deferred[WebSocketStreamTransport] = Deferred(cancel)
        proto.done.addBoth(finished)
        proto.done.chainDeferred(outer)
        return outer

    def _remember_session(self, transport: Any) -> None:
        """Keep the TLS session of an upgraded connection for the next dials
        (the server's session tickets came before its ``101``): from the
        first full handshake, and again from any later one (the server
        stopped resuming ours: its tickets expired, or it restarted)."""
        creator = self.tls
        if creator is None or transport is None:
            return
        tls = tls_layer(transport)
        if tls is None:
            return
        if creator.session is None or not session_reused(tls.getHandle()):
            creator.remember(tls)

    def close(self) -> None:
        """Drop the dials in progress; streams already open are the
        caller's to close."""
        self.closed = True
        for give_up in list(self._dialling.values()):
            give_up(WebSocketError("WebSocket pool closed"))
