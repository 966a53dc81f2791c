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

* **Control frames and the close handshake: here, as wsproto does them.**
  Pings are answered, Close frames checked by wsproto's rules (status
  codes, UTF-8 reason) and answered by echoing them, and the close
  handshake's state is two flags -- no wsproto ``Connection`` per pool
  connection: one is built only to name what is wrong with a frame header
  we refuse (its words go into the error).  Pool connections are opened
  and closed by the hundred per second (one per relayed connection), and
  wsproto's objects and close round were a good part of what a WebSocket
  pool connection cost over a TCP one (issue 12; ``tests/test_ws_pool.py``
  checks every kind of Close payload against wsproto's verdict).
  Autobahn would not do better: it brings its own Twisted protocol classes
  and buffering that would sit between the relay's producers and the
  socket.
* **Data frames: here.**  Every write is one binary frame, byte for byte as
  wsproto would make it (FIN set, opcode 2, the shortest length form, a
  fresh ``os.urandom`` mask per frame from a client, none from a server);
  a small frame is written as one piece, a large one as header and payload
  without joining them: on a plain socket in one ``sendmsg``, under TLS
  through the fast TLS data path (``nodepass.relay.tls_fast``, whole chunks
  into OpenSSL).  Received frames are parsed here too
  (:meth:`WebSocketStreamTransport._consume`): each binary payload is
  handed on as it arrives, unmasked by C code (``websockets``'
  ``apply_mask``), piece by piece -- a piece never spans two frames, so
  never two messages -- and the socket is read into one shared buffer.
  wsproto's own path parsed, copied and re-joined every frame and was most
  of this pool's CPU (issue 12's profile).
* **The HTTP upgrade is written here, by hand.**  Go's client spells its
  headers ``Sec-Websocket-Key``/``Sec-Websocket-Version`` in a fixed order
  with ``User-Agent`` and ``Accept-Encoding``, and Go's server answers with a
  fixed set (SPEC-1.14 §4.4).  wsproto's h11-based handshake (and autobahn's)
  cannot produce those bytes, and both request and answer are a dozen lines.
  Go's (and our) exact request and answer are read by comparing their
  fixed parts as bytes (:func:`_quick_request`, and the client's expected
  ``101`` up to its Date), which takes exactly what one regular expression
  would match; anything else goes to that expression, then to the general
  header parser, which decides the same.  The server's ``101`` leaves in one
  write with the stream's first frame (the ID), and under TLS our client's
  request leaves with its TLS Finished.

What a pool connection costs per connection, besides its bytes:

* closing under TLS: our Close frame and the TLS close_notify go out
  together, and the peer's Close is still read (TLS reads on until the
  peer's close_notify, which Go and we send after answering the Close):
  the same flights as the TCP pool's close.  Without TLS we wait for the
  peer's Close (at most :data:`CLOSE_TIMEOUT`), then close TCP;
* timeouts (the upgrade's, the close's) that almost never fire are entries
  of a :class:`Deadlines` (one ``DelayedCall`` for all of one length), not a
  ``callLater`` and ``cancel`` each;
* nothing for the garbage collector: the client dials lean TCP connections
  (``nodepass.compat.twisted_fastpath.lean_connect``, TLS started over them
  as the TCP pool's are) instead of ``connectTCP``/``connectSSL``, whose
  transport and connector hold each other and the protocol, and a lost
  stream lets go of its protocol and of the readers the fast paths put on
  the connection below (:meth:`WebSocketStreamTransport._release`), so
  reference counting frees a pool connection when its relay ends;
* as little Python as the protocol allows: a pool connection is opened
  and closed per relayed connection, and its WebSocket work (upgrade
  request and answer, the ID frame, a message or two, the Close handshake)
  is what set this pool's rate of new connections below the TCP pool's.
  Hence shortcuts, each deciding exactly as the general path it bypasses
  (``FastPathTests`` in ``tests/test_ws_pool.py`` compares them on seeded
  random inputs): the upgrade read by byte comparison, not regular
  expressions; a whole small binary message or Close taken at once by
  ``_consume``, without the frame loop's bookkeeping; frame
  headers from a table and masking keys popped from a list; a new stream's
  state in class attributes; the pool client told of a finished dial by a
  plain call rather than a callback on its Deferred.

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
import weakref
from functools import partial
from typing import Any, Callable, Optional, Sequence

from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IHandshakeListener, IPushProducer, ITransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection
from wsproto.frame_protocol import CloseReason
from zope.interface import implementer

from nodepass.base.logs import NodeLog
from nodepass.base.timers import ClockLike
from nodepass.compat.openssl_internals import session_reused
from nodepass.compat.twisted_fastpath import lean_connect
from nodepass.compat.twisted_internals import is_plain_tcp, read_into, write_parts_through
from nodepass.compat.twisted_tls import below_tls, start_tls, tls_blockers, tls_layer
from nodepass.compat.wsproto_internals import apply_mask
from nodepass.net.tls import ResumingClient
from nodepass.relay import tls_fast
from nodepass.relay.core import no_delay

_sha1 = hashlib.sha1
_b2a_base64 = binascii.b2a_base64


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
#: Frames with payloads up to this size are written as one piece, header
#: and payload joined (a copy that costs less than a second TLS record).
JOIN_SIZE = 16 * 1024
#: Kernel receive buffer of a pool connection's socket (Linux doubles it):
#: fixed, because with receive-buffer autotuning (up to
#: ``net.ipv4.tcp_rmem``'s maximum, 32 MiB here) a reader as quick as this
#: one lets the kernel hold tens of MiB for a stalled stream before the far
#: writer feels it.  2 MiB still keeps a loopback or LAN pipe full.
SOCKET_RECEIVE_BUFFER = 1024 * 1024

# What the payload of the frame being read is for: delivered (binary
# data), gathered for a control frame, or skipped (a refused text message).
_DATA, _CTRL, _SKIP = "data", "ctrl", "skip"
_CONTROL = (0x8, 0x9, 0xA)
_OP_CLOSE, _OP_PING = 0x8, 0x9
#: Close codes a peer may send (wsproto's and RFC 6455's rules): the
#: registered ones other than the local-only 1005, 1006 and 1015, and
#: 3000-4999.
_REMOTE_CODES = frozenset(int(c) for c in CloseReason) - {1005, 1006, 1015}
_HEAD16 = struct.Struct("!BBH")
_HEAD64 = struct.Struct("!BBQ")
_CODE = struct.Struct("!H")
#: The header of a binary message of at most 125 bytes (FIN, opcode 2),
#: by its second byte (the mask bit and the length): made once, not per
#: frame.
_SMALL_HEADS = tuple(bytes((0x82, second)) for second in range(256))
#: A server's Close frame with status 1000 and no reason (SPEC-1.14 §4.4).
_SERVER_CLOSE_NORMAL = b"\x88\x02\x03\xe8"
#: Masking keys (4 bytes a frame from a client) and Sec-Websocket-Keys are
#: cut from a pool of ``os.urandom`` bytes refilled this many at a time:
#: one getrandom call per 256 frames instead of one per frame.
_RANDOM_CHUNK = 1024
_random_pool = b""
_random_pos = 0


def _random_bytes(n: int) -> bytes:
    """``n`` bytes from ``os.urandom`` (drawn in chunks, each byte used once)."""
    global _random_pool, _random_pos
    pos = _random_pos
    end = pos + n
    if end > len(_random_pool):
        _random_pool, pos, end = os.urandom(max(_RANDOM_CHUNK, n)), 0, n
    _random_pos = end
    return _random_pool[pos:end]


#: Masking keys ready to use, each 4 bytes of ``os.urandom`` used once
#: (taken with ``pop()``: one C call per frame a client sends).
_mask_keys: list[bytes] = []


def _mask_key() -> bytes:
    """A fresh 4-byte masking key; :data:`_mask_keys` is refilled from one
    ``os.urandom`` call when it runs out."""
    if not _mask_keys:
        _mask_keys[:] = map(os.urandom(_RANDOM_CHUNK).__getitem__, _KEY_SLICES)  # (no Python loop)
    return _mask_keys.pop()


_KEY_SLICES = tuple(slice(i, i + 4) for i in range(0, _RANDOM_CHUNK, 4))


def _forget_random() -> None:
    """A forked child draws its own bytes, never its parent's."""
    global _random_pool, _random_pos
    _random_pool, _random_pos = b"", 0
    _mask_keys.clear()


os.register_at_fork(after_in_child=_forget_random)


class Deadlines:
    """Timeouts of one length on one clock behind one ``DelayedCall``.

    Pool connections come and go by the hundred per second, each with a
    timeout that almost never fires (the upgrade's, the close's); a
    ``callLater`` and a ``cancel`` apiece keep Twisted's timer heap busy.
    Here an entry is a dict item: as every entry waits the same time, the
    oldest is due first, and one call, armed for it, fires each entry at
    its own deadline.  The call is cancelled when the last entry goes, so
    an idle clock holds nothing."""

    def __init__(self, clock: Any, delay: float):
        self._clock = weakref.ref(clock)
        self.delay = delay
        self._due: dict[Any, tuple[float, Callable[[], Any]]] = {}
        self._call: Any = None

    def add(self, key: Any, fn: Callable[[], Any]) -> None:
        """Call ``fn()`` :attr:`delay` seconds from now, unless ``key`` is
        discarded (or added again) first."""
        clock = self._clock()
        if clock is None:
            return
        due = self._due
        due.pop(key, None)
        due[key] = (clock.seconds() + self.delay, fn)
        if self._call is None:
            self._call = clock.callLater(self.delay, self._fire)

    def discard(self, key: Any) -> None:
        due = self._due
        if due.pop(key, None) is not None and not due and self._call is not None:
            call, self._call = self._call, None
            call.cancel()

    def __contains__(self, key: Any) -> bool:
        return key in self._due

    def _fire(self) -> None:
        self._call = None
        clock = self._clock()
        if clock is None:
            return
        due = self._due
        now = clock.seconds() + 1e-9  # (a float's rounding does not delay an entry)
        while due:
            key = next(iter(due))
            when, fn = due[key]
            if when > now:
                if self._call is None:
                    self._call = clock.callLater(when - clock.seconds(), self._fire)
                return
            del due[key]
            fn()


_deadline_sets: "weakref.WeakKeyDictionary[Any, dict[float, Deadlines]]" = weakref.WeakKeyDictionary()


_recent_deadlines: dict[tuple[int, float], Deadlines] = {}


def deadlines(clock: Any, delay: float) -> Deadlines:
    """The :class:`Deadlines` of ``clock`` for timeouts of ``delay``."""
    key = (id(clock), delay)
    found = _recent_deadlines.get(key)
    if found is not None and found._clock() is clock:
        return found  # (the usual case: one reactor, a few delays)
    try:
        per_clock = _deadline_sets[clock]
    except KeyError:
        per_clock = _deadline_sets[clock] = {}
    found = per_clock.get(delay)
    if found is None:
        found = per_clock[delay] = Deadlines(clock, delay)
    if len(_recent_deadlines) > 64:
        _recent_deadlines.clear()
    _recent_deadlines[key] = found
    return found


# Plain sockets read into this one buffer (the reactor runs one read at a
# time, and the frame reader copies what it keeps before it returns).
_read_buffer = memoryview(bytearray(PLAIN_READ_SIZE))


def _feed_view(stream: "WebSocketStreamTransport", data: memoryview) -> None:
    stream.feed(data)


def _bound_receive_buffer(conn: Any) -> None:
    """A fixed kernel receive buffer (:data:`SOCKET_RECEIVE_BUFFER`) for the
    TCP connection ``conn`` under a WebSocket."""
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

#: The upgrade request exactly as Go's client and ours write it (SPEC-1.14
#: §4.4; ours adds Authorization), printable ASCII only: read with one match
#: instead of line by line.  Anything else takes the general path, which
#: decides the same for these requests.
_CANONICAL_REQUEST = re.compile(
    rb"GET ([!-~]+) HTTP/1\.1\r\n"
    rb"Host: ([ -~]*)\r\n"
    rb"User-Agent: ([ -~]*)\r\n"
    rb"(?:Authorization: ([ -~]*)\r\n)?"
    rb"Connection: Upgrade\r\n"
    rb"Sec-Websocket-Key: ([A-Za-z0-9+/]{22}==)\r\n"
    rb"Sec-Websocket-Version: 13\r\n"
    rb"Upgrade: websocket\r\n"
    rb"Accept-Encoding: gzip"
)
#: The headers of a canonical request whose values are fixed.
_CANONICAL_FIELDS: dict[str, list[str]] = {
    "connection": ["Upgrade"],
    "sec-websocket-version": ["13"],
    "upgrade": ["websocket"],
    "accept-encoding": ["gzip"],
}
#: The ``101`` exactly as Go's server and ours write it.
_CANONICAL_ANSWER = re.compile(
    rb"HTTP/1\.1 101 Switching Protocols\r\n"
    rb"Connection: Upgrade\r\n"
    rb"Sec-Websocket-Accept: ([A-Za-z0-9+/]{27}=)\r\n"
    rb"Upgrade: websocket\r\n"
    rb"Date: [ -~]*"
)

#: Printable ASCII (the regular expressions' ``[ -~]``) and the base64
#: alphabet, deleted with ``bytes.translate``: what is left is what does not
#: belong (one C call instead of a regular expression's loop per byte).
_PRINTABLE = bytes(range(0x20, 0x7F))
_BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
#: A canonical request's fixed start (path ``/``), and its fixed end: the
#: Connection line and the key's name, the 24-character key, then the rest.
_REQUEST_START = b"GET / HTTP/1.1\r\nHost: "
_REQUEST_KEY = b"\r\nConnection: Upgrade\r\nSec-Websocket-Key: "
_REQUEST_END = b"\r\nSec-Websocket-Version: 13\r\nUpgrade: websocket\r\nAccept-Encoding: gzip"
_REQUEST_TAIL = len(_REQUEST_KEY) + 24 + len(_REQUEST_END)
_KEY_AT = len(_REQUEST_KEY)  # where the key starts in the tail


def _quick_request(head: bytes) -> Optional[tuple[bytes, bytes, Optional[bytes], bytes]]:
    """``(host, user agent, authorization or None, key)`` of a request head
    that :data:`_CANONICAL_REQUEST` matches with the path ``/`` (what Go's
    client and ours send), read by comparing its fixed parts and checking
    the rest by character class (a regular expression over the whole head
    was a fifth of what an upgrade cost the server); None for anything
    else, which the expression then judges.

    The fixed parts are compared whole and the rest checked as the
    expression would (``[ -~]`` for the header values, the base64 alphabet
    for the key), so a head taken here is one the expression matches, with
    the same groups; ``tests/test_ws_pool.py`` checks that on mutated
    requests."""
    tail = len(head) - _REQUEST_TAIL  # where the Connection line must start
    if (
        tail <= 22
        or not head.startswith(_REQUEST_START)
        or not head.startswith(_REQUEST_KEY, tail)
        or not head.endswith(_REQUEST_END)
    ):
        return None
    key = head[tail + _KEY_AT : tail + _KEY_AT + 24]
    if not key.endswith(b"==") or key[:22].translate(None, _BASE64_ALPHABET):
        return None
    # Host, User-Agent and (ours) Authorization, each printable: no line
    # break but the two or three between them.
    lines = head[22:tail].split(b"\r\n")
    n = len(lines)
    if n == 2:
        host, agent = lines
        auth = None
        values = host + agent
    elif n == 3:
        host, agent, auth = lines
        if auth[:15] != b"Authorization: ":
            return None
        auth = auth[15:]
        values = host + agent + auth
    else:
        return None
    if agent[:12] != b"User-Agent: " or values.translate(None, _PRINTABLE):
        return None
    return host, agent[12:], auth, key


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
    return _b2a_base64(_random_bytes(16), newline=False).decode("ascii")


def accept_value(key: str) -> str:
    """RFC 6455 ``Sec-WebSocket-Accept`` for a client key:
    ``OabYU+AjCv/nJYpuwpfMRA==`` gives ``w6d0uOVLoD9VXqQQnepsp9nZfB4=``."""
    return _accept_bytes(key.strip().encode("ascii")).decode("ascii")


def _accept_bytes(key: bytes) -> bytes:
    """:func:`accept_value` of an already stripped ASCII key, as bytes: what
    the server writes and the client compares, with no text in between
    (one of these per pool connection at each end)."""
    return _b2a_base64(_sha1(key + WEBSOCKET_GUID).digest(), newline=False)


def http_date(seconds: float) -> str:
    """An HTTP ``Date`` value (``Mon, 02 Jan 2006 15:04:05 GMT``), made
    once per second (every pool connection's answer carries one)."""
    return _http_date_bytes(seconds).decode("ascii")


def _http_date_bytes(seconds: float) -> bytes:
    """:func:`http_date` as the bytes of the ``101`` (made once per second)."""
    whole = int(seconds)
    cached = _date_cache
    if cached[0] != whole:
        cached[:] = [whole, email.utils.formatdate(whole, usegmt=True).encode("ascii")]
    date: bytes = cached[1]
    return date


_date_cache: list[Any] = [None, b""]


def upgrade_request(host: str, key: str, bearer: str = "") -> bytes:
    """The upgrade request byte for byte as Go's client sends it
    (SPEC-1.14 §4.4): path ``/``, ``Host`` the tunnel host without port,
    Go's header spelling and order, no subprotocol, extension or Origin.

    ``bearer``: our client adds ``Authorization: Bearer TOKEN`` (the
    handshake's token), which a Go server ignores and ours uses to accept
    pool connections from an IP other than the handshake's."""
    around = _request_around.get((host, bearer))
    if around is None:
        # What surrounds the key, made once per tunnel (its every dial
        # sends the same host and token).
        auth = f"Authorization: Bearer {bearer}\r\n" if bearer else ""
        around = (
            (f"GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: Go-http-client/1.1\r\n{auth}"
             "Connection: Upgrade\r\nSec-Websocket-Key: ").encode("ascii"),
            b"\r\nSec-Websocket-Version: 13\r\nUpgrade: websocket\r\nAccept-Encoding: gzip\r\n\r\n",
        )
        if len(_request_around) > 64:
            _request_around.clear()
        _request_around[(host, bearer)] = around
    return around[0] + key.encode("ascii") + around[1]


_request_around: dict[tuple[str, str], tuple[bytes, bytes]] = {}


def upgrade_answer(key: str, date: str) -> bytes:
    """The ``101`` answer byte for byte as Go's server sends it."""
    return _answer_bytes(_accept_bytes(key.strip().encode("ascii")), date.encode("ascii"))


#: The ``101`` up to the accept value, and from it up to the date.
_ANSWER_START = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nSec-Websocket-Accept: "
_ANSWER_MIDDLE = b"\r\nUpgrade: websocket\r\nDate: "


def _answer_bytes(accept: bytes, date: bytes) -> bytes:
    """:func:`upgrade_answer` from the accept value and date as bytes."""
    return _ANSWER_START + accept + _ANSWER_MIDDLE + date + b"\r\n\r\n"


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

    #: ``write`` is done with what it is given when it returns (masked,
    #: joined or sent), so a relay may hand it views of its read buffer.
    takes_views = True
    websocket_stream = True

    # The state of a new stream, as class attributes: an instance holds only
    # what has changed (one stream is made per relayed connection, and each
    # attribute set in ``__init__`` cost its bytecode every time).
    protocol: Any = None
    connected = True
    disconnecting = False
    producer: Any = None
    #: Close status the peer sent, once its Close frame arrived.
    peer_close_code: Optional[int] = None
    #: How frames go to and from the socket: ``"plain"`` (straight, on a
    #: TCP connection), ``"tls"`` (the fast TLS data path) or ``""``
    #: (through the underlying transport, e.g. with NP_NO_FAST_TLS).
    fast_path = ""
    # The close handshake (RFC 6455 §7): open until either side's Close,
    # finished when both were sent.
    _sent_close = False
    _got_close = False
    _ctrl_op = 0  # the opcode of the control frame being read ...
    _ctrl = b""  # ... and its (unmasked) payload so far, when it came in pieces
    _held = False  # our reader paused us
    _reading_paused = False  # we paused the underlying transport
    _producer_below = False  # self.producer is registered on the underlying transport
    _processing = False
    _again = False
    # Where the frame reader is in the current frame:
    _left = 0  # payload bytes of the current frame still to come
    _kind = _DATA  # what they are for
    _key: Optional[bytes] = None  # its masking key (the server reads masked frames)
    _key_turn = 0  # payload bytes of the frame unmasked so far, modulo 4
    _in_message = False  # a message's last frame (FIN) is still to come
    _text = False  # ... and it is a text message (refused, its frames discarded)
    _broken = False  # a protocol error: nothing more is parsed
    _mask_bit = 0  # set in the frames we send (a client's are masked) ...
    _want_mask = 0x80  # ... and what received frames' mask bit must be
    _small_head = 6  # the header size of a received frame of at most 125 bytes
    #: Bytes to go out ahead of the first frame (the server's ``101``, so
    #: that it and the ID travel in one TLS record and one segment).
    _head = b""
    #: Under TLS our Close and close_notify go out together, and the peer's
    #: Close is read until its close_notify (TLS keeps reading): no wait
    #: of our own between the two (see :meth:`_start_close`).
    _close_with_tls = False
    #: The TLS layer under us (None without TLS).
    _tls: Any = None
    _closing = False  # a Close frame is sent or being answered: no more data either way
    _tcp_closing = False  # the underlying transport is being closed
    _lost = False
    _reason: Optional[Exception] = None  # what connectionLost will report
    _pending_loss: Optional[Failure] = None  # lost before attach()
    _send_parts: Callable[[Sequence[Any]], None]  # how frames are written (see _fast_paths)

    def __init__(
        self,
        transport: Any,
        client: bool,
        clock: ClockLike,
        trailing: bytes = b"",
        close_timeout: float = CLOSE_TIMEOUT,
        head: bytes = b"",
        hold: bool = True,
    ):
        self.underlying: Any = transport
        self.client = client
        self.clock = clock
        self.close_timeout = close_timeout
        # The frame reader (see _consume): received bytes not yet parsed or
        # delivered (a partial header, or what came while the reader was
        # paused).
        self._rest = bytearray()
        if client:
            self._mask_bit = 0x80
            self._want_mask = 0
            self._small_head = 2
        self._timers = deadlines(clock, close_timeout)
        self._fast_paths()
        if head:
            self._head = head
            self._send_real = self._send_parts
            self._send_parts = self._send_with_head
        if trailing:
            self._rest += trailing
        if hold:
            # (Not when the maker attaches at once: a pause and a resume of
            # the socket, two epoll_ctl calls, for nothing.)
            self._update_reading()

    # -- wiring ---------------------------------------------------------------
    def attach(self, protocol: Any) -> None:
        """Connect ``protocol`` (``makeConnection``), then deliver what is
        waiting: buffered messages, or the loss that came first."""
        if self.protocol is not None or self._released:
            raise RuntimeError("a protocol is already attached")
        self.protocol = protocol
        protocol.makeConnection(self)
        if self._pending_loss is not None:
            reason, self._pending_loss = self._pending_loss, None
            protocol.connectionLost(reason)
            self._release()
            return
        if self._reading_paused:
            # (Held until now.  Otherwise there is nothing to change: a
            # reader that paused in makeConnection has paused the socket.)
            self._update_reading()
        if self._rest or self._processing:
            self._process()

    def _fast_paths(self) -> None:
        """Choose how frames are written and read: straight to and from the
        socket of a plain TCP connection, through the fast TLS data path
        (``nodepass.relay.tls_fast``) under a TLS one, else through the
        underlying transport's ``write`` and its protocol's ``dataReceived``
        (which calls :meth:`feed`)."""
        underlying = self.underlying
        tls = tls_layer(underlying)
        if tls is None:
            _bound_receive_buffer(underlying)
            if is_plain_tcp(underlying):
                underlying.bufferSize = PLAIN_READ_SIZE
                self._send_parts = partial(write_parts_through, underlying)
                read_into(underlying, _read_buffer, _feed_view, self)
                self.fast_path = "plain"
            else:
                self._send_parts = self._send_generic
            return
        self._tls = tls
        self._close_with_tls = True
        below = below_tls(underlying, tls)[0]
        _bound_receive_buffer(below)
        write_parts = None
        if tls_fast.ENABLED:
            below.bufferSize = tls_fast.TLS_RELAY_BUFFER_SIZE
            write_parts = tls_fast.install(underlying, self.feed)
        if write_parts is not None:
            self._send_parts = write_parts
            self.fast_path = "tls"
        else:
            self._send_parts = self._send_generic

    def _send_generic(self, parts: Sequence[Any]) -> None:
        self.underlying.write(b"".join(parts))

    def _send_with_head(self, parts: Sequence[Any]) -> None:
        """The first send: :attr:`_head` goes with it (small frames joined
        to it, so one TLS record carries both)."""
        send = self._send_parts = self._send_real
        head, self._head = self._head, b""
        if len(parts) == 1 and len(parts[0]) <= 4096:
            send((head + parts[0],))
        elif sum(map(len, parts)) <= 4096:
            send((b"".join((head, *parts)),))
        else:
            send((head, *parts))

    def send_head(self) -> None:
        """Send :attr:`_head` now if no frame has taken it yet."""
        if self._head and not self._lost:
            self._send_with_head(())

    def feed(self, data: bytes | memoryview) -> None:
        """Bytes the underlying connection received (a view is not kept:
        what is not delivered at once is copied)."""
        if self._lost or self._broken or (self._got_close and self._sent_close):
            return  # after the close handshake: nothing more is WebSocket
        if self._rest or self._processing or not (self._closing or (self.protocol is not None and not self._held)):
            self._rest += data
            self._process()
            return
        # The usual case: parse and deliver straight from ``data`` (a whole
        # small message or Close is taken at once by _consume).
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
        self._timers.discard(self)
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
            self._release()
            return
        self.protocol.connectionLost(failure)
        self._release()

    #: The protocol was told of the loss and let go (see :meth:`_release`).
    _released = False

    def _release(self) -> None:
        """Break the reference cycles a lost pool connection is in, so that
        reference counting frees it (one per relayed connection: left to
        the garbage collector, a collection's worth of work each): the
        protocol on top holds this transport as its ``transport`` (and its
        pause gate holds it too), so the transport lets go of the protocol
        once it has been told of the loss; and the reader the fast paths
        installed on the TCP connection below (``read_into``'s ``doRead``,
        the fast TLS path's closures, ``startTLS``'s bound methods) holds
        this transport, which holds that connection.  Late calls find a lost
        transport (``write``, ``loseConnection``, ``pauseProducing`` do
        nothing) and, with TLS, the TLS layer's own methods, which still
        answer ``getPeerCertificate``."""
        if self.protocol is not None:
            self.protocol = None
            self._released = True
        tls_fast.release_tls(self.underlying)

    # -- receiving --------------------------------------------------------------
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
            while (
                again
                and self._rest
                and not self._lost
                and not self._broken
                and (self._closing or (self.protocol is not None and not self._held))
            ):
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

    def _unmasked(self, piece: Any) -> Any:
        """``piece`` (the next payload bytes of the current frame) unmasked
        with the frame's key, turned by the bytes unmasked before it; as is
        (a view) when the frame is not masked."""
        key = self._key
        if key is None:
            return piece
        turn = self._key_turn
        self._key_turn = (turn + len(piece)) & 3
        return apply_mask(piece, key[turn:] + key[:turn] if turn else key)

    def _consume(self, data: Any) -> int:
        """Parse frames from ``data`` (bytes or a view) and hand data frames'
        payloads on as they come, piece by piece (a piece never spans two
        frames, so never two messages); control frames are gathered and
        handled whole (:meth:`_control`).  Returns how
        much of ``data`` was used: the rest is a partial header, or waits
        for a paused reader."""
        pos = 0
        end = len(data)
        while pos < end:
            if self._lost or self._broken or self._got_close:
                return end  # (after the peer's Close nothing more is read)
            left = self._left
            if left:
                take = left if left <= end - pos else end - pos
                kind = self._kind
                if kind is _DATA and not self._closing:
                    if self._held or self.protocol is None:
                        return pos
                    # (_unmasked, inlined: this runs for every data piece)
                    key = self._key
                    if key is None:
                        piece = data[pos : pos + take]
                        if isinstance(piece, memoryview):
                            piece = bytes(piece)
                    else:
                        turn = self._key_turn
                        self._key_turn = (turn + take) & 3
                        piece = apply_mask(data[pos : pos + take], key[turn:] + key[:turn] if turn else key)
                    pos += take
                    self._left = left - take
                    self.protocol.dataReceived(piece)
                elif kind is _CTRL:
                    piece = bytes(self._unmasked(data[pos : pos + take]))
                    pos += take
                    self._left = left - take
                    if left == take:
                        # The whole payload (most often it came in one piece).
                        if self._ctrl:
                            piece, self._ctrl = self._ctrl + piece, b""
                        self._control(piece)
                    else:
                        self._ctrl += piece
                else:  # skipped, or data after our Close
                    pos += take
                    self._left = left - take
                continue
            # A frame header.
            if end - pos < 2:
                return pos
            if not self._closing and (self._held or self.protocol is None):
                return pos
            b0 = data[pos]
            size = data[pos + 1] - self._want_mask
            if 0 <= size < 126 and (b0 == 0x82 or b0 == 0x88):
                # The usual frames, read whole at once: a small binary
                # message (FIN, no RSV bits) or a Close, masked as they must
                # be (``size`` is the second byte less the mask bit they
                # must have), with their payloads in ``data``.  What the
                # general path below would do for them, less its
                # bookkeeping (the frame state it keeps is only read for a
                # frame's later pieces, and here there are none).
                start = pos + self._small_head
                stop = start + size
                if stop <= end:
                    if b0 == 0x82:
                        if size and not self._in_message and not self._closing:
                            if self._want_mask:
                                piece = apply_mask(data[start:stop], bytes(data[pos + 2 : start]))
                            else:
                                piece = bytes(data[start:stop])
                            pos = stop
                            self.protocol.dataReceived(piece)
                            continue
                    else:
                        pos = stop
                        self._ctrl_op = _OP_CLOSE
                        if self._want_mask:
                            self._peer_close(apply_mask(data[start:stop], bytes(data[start - 4 : start])))
                        else:
                            self._peer_close(bytes(data[start:stop]))
                        continue
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
                or masked != self._want_mask
                or not minimal
                or (opcode > 2 and (opcode not in _CONTROL or size > 125 or not b0 & 0x80))
            ):
                # Not a frame we may accept: wsproto names what is wrong.
                self._refused_header(bytes(data[pos : pos + head]))
                self._broken_frame("WebSocket frame header refused")
                return end
            pos += head
            self._left = size
            self._key = bytes(data[pos - 4 : pos]) if masked else None
            self._key_turn = 0
            if opcode in _CONTROL:
                # Ping, pong or close: gathered (125 bytes at most), then
                # handled whole.
                self._kind = _CTRL
                self._ctrl_op = opcode
                self._ctrl = b""
                if not size:
                    self._control(b"")
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

    def _refused_header(self, raw: bytes) -> None:
        """A frame header we refuse: a throwaway wsproto connection (only
        ever made on this error path) names what is wrong and the status."""
        probe = Connection(ConnectionType.CLIENT if self.client else ConnectionType.SERVER)
        probe.receive_data(raw)
        for event in probe.events():
            if isinstance(event, CloseConnection):
                # Invalid UTF-8 (1007) is refused with 1003, as Go does.
                code = CLOSE_UNSUPPORTED_DATA if event.code == CLOSE_INVALID_PAYLOAD else event.code
                self._fail(code, f"WebSocket protocol error: {event.reason}")
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
        if not self._closing:  # (a refused header has been reported by now)
            self._fail(CLOSE_PROTOCOL_ERROR, f"WebSocket protocol error: {why}")

    # -- control frames (RFC 6455 §5.5), as wsproto handles them ------------------
    def _control_frame(self, opcode: int, payload: bytes) -> bytes:
        """A control frame (FIN set; masked with a fresh key from a client)."""
        if self._mask_bit:
            key = _mask_key()
            return bytes((0x80 | opcode, 0x80 | len(payload))) + key + apply_mask(payload, key)
        return bytes((0x80 | opcode, len(payload))) + payload

    def _close_frame(self, code: int, reason: bytes = b"") -> bytes:
        """A Close frame: the status (none for 1005, "no status") and reason
        (the server's usual one, 1000 without a reason, made once)."""
        if code == CLOSE_NORMAL and not reason and not self._mask_bit:
            return _SERVER_CLOSE_NORMAL
        return self._control_frame(_OP_CLOSE, b"" if code == CLOSE_NO_STATUS else _CODE.pack(code) + reason)

    def _control(self, payload: bytes) -> None:
        """A whole control frame has been read (its ``payload``): answer a
        ping while open, check and answer a Close; a pong needs nothing (we
        send no pings)."""
        opcode = self._ctrl_op
        if opcode == _OP_PING:
            if not self._sent_close and not self._got_close:
                self._send_parts((self._control_frame(0xA, payload),))
        elif opcode == _OP_CLOSE:
            self._peer_close(payload)

    def _send_close(self, frame: bytes) -> None:
        """Send our Close frame.  On the fast TLS path, when the TLS
        shutdown follows at once, the frame is only encrypted here
        (``SSL_write`` into the memory BIO, through the public
        ``getHandle``): the shutdown's flush sends it with the close_notify,
        one segment instead of two."""
        if self.fast_path == "tls" and not self._head and not self._tcp_closing:
            tls = self._tls
            if tls is not None and not tls.disconnecting and not any(tls_blockers(tls)):
                try:
                    tls.getHandle().send(frame)
                except Exception:  # noqa: BLE001 - pyOpenSSL refused: the ordinary path
                    pass
                else:
                    return
        self._send_parts((frame,))

    def _peer_close(self, payload: bytes) -> None:
        """The peer's Close, checked as wsproto checks it (a bad one is a
        protocol error, closed with its status); a valid one is answered
        (echoing status and reason, as wsproto and Go do) unless it answers
        ours, and the TCP/TLS connection goes."""
        code, reason, problem = CLOSE_NO_STATUS, b"", ""
        size = len(payload)
        if payload == b"\x03\xe8":
            code = CLOSE_NORMAL  # (the usual Close: 1000, no reason)
        elif size == 1:
            problem = "CLOSE with 1 byte payload"
        elif size:
            code, reason = (payload[0] << 8) | payload[1], payload[2:]
            if code < 1000 or code > 4999:
                problem = "CLOSE with invalid code"
            elif code in (1005, 1006, 1015):
                problem = "remote CLOSE with local-only reason"
            elif code <= 2999 and code not in _REMOTE_CODES:
                problem = "CLOSE with unknown reserved code"
            elif reason:
                try:
                    reason.decode("utf-8")
                except UnicodeDecodeError as e:
                    # (1007, refused with 1003 as Go does: see _refused_header)
                    self._fail(CLOSE_UNSUPPORTED_DATA, f"WebSocket protocol error: Error decoding CLOSE reason: {e}")
                    return
        if problem:
            self._fail(CLOSE_PROTOCOL_ERROR, f"WebSocket protocol error: {problem}")
            return
        self.peer_close_code = code
        self._got_close = True
        if not self._sent_close:
            # The peer started the close: answer it and finish the connection.
            if self._reason is None:
                self._reason = _peer_close_reason(code)
            self._closing = True
            self.disconnecting = True
            self._sent_close = True
            self._send_close(self._close_frame(code, reason))
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
        read on until the peer answers.  Under TLS the TLS shutdown starts
        right behind it (Twisted reads on until the peer's close_notify,
        which comes after its Close), as the TCP pool's close_notify goes:
        one flight less each way than waiting for the Close first; the
        connection is aborted if it has not finished within
        :attr:`close_timeout`.  Otherwise we wait for the peer's Close at
        most :attr:`close_timeout`, then close."""
        self._closing = True
        self.disconnecting = True
        if not self._sent_close and not self._got_close:
            self._sent_close = True
            self._send_close(self._close_frame(code))
        if self._close_with_tls:
            self._close_underlying()  # (reads on: the peer's Close must be seen)
        else:
            self._update_reading()  # the peer's Close must be seen, paused or not
            self._timers.add(self, self._close_timed_out)
        if self._rest or self._processing:  # the answer may be buffered already
            self._process()

    def _close_timed_out(self) -> None:
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
        self._timers.add(self, self._linger_timed_out)
        self.underlying.loseConnection()

    def _linger_timed_out(self) -> None:
        if not self._lost:
            self.underlying.abortConnection()

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
            head = _SMALL_HEADS[bit | size]
        elif size <= 0xFFFF:
            head = _HEAD16.pack(0x82, bit | 126, size)
        else:
            head = _HEAD64.pack(0x82, bit | 127, size)
        # A small frame goes as one piece (one TLS record, not a record for
        # its header and one for its payload); a large one unjoined.
        if bit:
            key = _mask_keys.pop() if _mask_keys else _mask_key()
            if size <= JOIN_SIZE:
                self._send_parts((head + key + apply_mask(data, key),))
            else:
                self._send_parts((head + key, apply_mask(data, key)))
        elif size <= JOIN_SIZE:
            self._send_parts((head + data,))
        else:
            self._send_parts((head, data))

    def writeSequence(self, seq: Any) -> None:
        """All of ``seq`` as one message: it is one write."""
        self.write(b"".join(seq))

    def loseConnection(self) -> None:
        """Close with status 1000 after everything written so far, then
        close the TCP connection once the peer's Close arrives (or after
        :attr:`close_timeout`); under TLS the TLS shutdown starts at once,
        behind the Close (see :meth:`_start_close`).  Messages that arrive
        meanwhile are discarded, as a TCP transport stops reading when it
        closes.  The protocol sees ``ConnectionDone``."""
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
        self._timers.discard(self)
        self.underlying.abortConnection()

    def getPeer(self) -> Any:
        return self.underlying.getPeer()

    def getHost(self) -> Any:
        return self.underlying.getHost()

    def getPeerCertificate(self) -> Any:
        """The TLS peer's certificate (the client computes the ``verify``
        fingerprint from it, SPEC-1.14 §3.5), or None without TLS."""
        tls = self._tls
        if tls is None:
            return None
        return tls.getPeerCertificate()

    def getHandle(self) -> Any:
        """The ``OpenSSL.SSL.Connection`` with TLS (its ``get_certificate``
        is our own certificate), else the socket."""
        tls = self._tls
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
        pause = not (self._closing or (self.protocol is not None and not self._held))
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
        self._header_due = deadlines(clock, header_timeout)  # the request's

    # (Initial state as class attributes: one of these is made per pool
    # connection, and an instance stores only what changes.)
    #: The stream, once upgraded.
    stream: Optional[WebSocketStreamTransport] = None
    #: The status we refused with (None: not refused).
    refused: Optional[int] = None
    _buf = b""
    _timer: Any = None  # the refusal's bound on closing
    _done = False  # answered (101 or refusal): no more request bytes

    def connectionMade(self) -> None:
        self._header_due.add(self, self._timed_out)

    def dataReceived(self, data: bytes) -> None:
        stream = self.stream
        if stream is not None:
            stream.feed(data)
            return
        if self._done:
            return
        buf = self._buf = self._buf + data
        # Go's (or our) request: its head ends at the first CRLF CRLF (its
        # lines hold no other line break, so _head_end would find the same).
        end = buf.find(b"\r\n\r\n")
        if 0 <= end <= self.max_head:
            quick = _quick_request(buf[:end])
            if quick is not None:
                self._buf = b""
                self._canonical(quick, buf[end + 4 :])
                return
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
        self._done = True
        if self.stream is not None:
            # (_accept cancelled the timers, and none is armed after it.)
            self.stream.underlying_lost(reason)
            return
        self._cancel_timer()

    # -- the request ------------------------------------------------------------
    def _request(self, head: bytes, trailing: bytes) -> None:
        m = _CANONICAL_REQUEST.fullmatch(head)
        if m is not None:
            self._canonical(m.group(2, 3, 4, 5), trailing)
            return
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

    def _canonical(self, groups: Any, trailing: bytes) -> None:
        """Go's (or our) request, its ``(host, user agent, authorization or
        None, key)`` as bytes: every check of the general path but the
        pool's own (authorize, is_full) is known to pass."""
        host, agent, auth, key = groups
        fields = {
            **_CANONICAL_FIELDS,  # (its fixed values shared: read only)
            "host": [host.strip(b" \t").decode("ascii")],
            "user-agent": [agent.strip(b" \t").decode("ascii")],
            "sec-websocket-key": [key.decode("ascii")],
        }
        if auth is not None:
            fields["authorization"] = [auth.strip(b" \t").decode("ascii")]
        date = _http_date_bytes(self.clock.seconds())
        if self._refused_by_pool(fields, date):
            return
        self._accept(_answer_bytes(_accept_bytes(key), date), trailing)

    def _refused_by_pool(self, headers: dict[str, list[str]], date: bytes) -> bool:
        """The pool's own checks, ahead of the protocol's (npws's order):
        authorization, then room.  True when one refused (and answered)."""
        if self.authorize is not None and not self.authorize(headers):
            self._refuse(403, error_answer(403, "unauthorized", date.decode("ascii")))
            return True
        if self.is_full():
            self._refuse(503, error_answer(503, "pool full", date.decode("ascii")))
            return True
        return False

    def _upgrade(
        self, method: str, version: bytes, headers: dict[str, list[str]], trailing: bytes
    ) -> None:
        """npws's handler: full pool first, then coder/websocket's checks in
        its order, then the ``101``."""
        raw_date = _http_date_bytes(self.clock.seconds())
        if self._refused_by_pool(headers, raw_date):
            return
        date = raw_date.decode("ascii")
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
        self._accept(upgrade_answer(key, date), trailing)

    def _accept(self, answer: bytes, trailing: bytes) -> None:
        """The ``101`` (``answer``), and the stream for ``on_stream``."""
        self._done = True
        self._cancel_timer()
        # The 101 goes out with the stream's first frame (the ID ``on_stream``
        # writes): one TLS record, one segment, one read at the client.
        stream = self.stream = WebSocketStreamTransport(
            self.transport,
            client=False,
            clock=self.clock,
            trailing=trailing,
            close_timeout=self.close_timeout,
            head=answer,
            hold=False,
        )
        try:
            self.on_stream(stream)
        except Exception as e:  # noqa: BLE001 - one bad connection must not reach the listener
            self.log.error("WebSocket pool connection dropped: %s", e)
            stream.abortConnection()
            return
        stream.send_head()
        if stream.protocol is None:
            stream._update_reading()  # held until attached (attach() saw to it otherwise)

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
        if self._done:
            return
        self._done = True
        self._buf = b""
        self.log.debug("WebSocket upgrade request not read within %gs", self.header_timeout)
        assert self.transport is not None
        self.transport.abortConnection()

    def _cancel_timer(self) -> None:
        self._header_due.discard(self)
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


@implementer(IHandshakeListener)
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
    #: Told ``(this protocol, the result)`` right before :attr:`done` fires
    #: (:class:`WebSocketPoolClient`'s bookkeeping), once.
    on_settled: Optional[Callable[[Any, Any], None]] = None
    #: The :class:`Deadlines` holding this dial's time limit, if any.
    due: Optional[Deadlines] = None
    #: The TLS layer, once its handshake is done (looked up once).
    tls_done: Any = None

    def __init__(
        self,
        clock: ClockLike,
        host: str,
        attach_to: Any = None,
        key: Optional[str] = None,
        close_timeout: float = CLOSE_TIMEOUT,
        bearer: str = "",
        tls: Any = None,
    ):
        self.clock = clock
        self.host = host
        self.bearer = bearer
        #: The client TLS connection creator when the connection runs TLS
        #: over the dialled TCP connection (``startTLS`` in
        #: :meth:`connectionMade`); None for ``ws://`` or a transport that is
        #: TLS already.
        self.tls = tls
        self.attach_to = attach_to
        self.key = key or new_key()
        self.close_timeout = close_timeout
        self.done: Deferred[WebSocketStreamTransport] = Deferred(self._cancel)

    # (Initial state as class attributes: one of these is made per pool
    # connection, and an instance stores only what changes.)
    stream: Optional[WebSocketStreamTransport] = None
    #: Set by WebSocketPoolClient: the dial in progress (its ``cancel()``
    #: stops it; None once connected or failed) and its time limit.
    connector: Any = None
    handshake_timeout = HANDSHAKE_TIMEOUT
    _buf = b""
    _expected = b""  # the canonical 101 up to its Date value, once computed
    _refusal: Optional[tuple[int, str, int]] = None  # status, reason, body length
    _failed = False
    _lost = False

    def give_up(self, why: Exception) -> None:
        """Drop the dial (or the upgrade under way), failing :attr:`done`."""
        if self.transport is not None:
            self.fail(why)
        elif not self.done.called:
            self._settle(Failure(why))
            dial, self.connector = self.connector, None
            if dial is not None:
                dial.cancel()  # its failure finds ``done`` fired

    def timed_out(self) -> None:
        self.give_up(WebSocketHandshakeTimeout(f"WebSocket pool connection not ready within {self.handshake_timeout:g}s"))

    def _cancel(self, _d: Any) -> None:
        self.give_up(WebSocketError("WebSocket dial cancelled"))
        hook = self.on_settled
        if hook is not None:  # (still open: Deferred.cancel fails ``done`` itself now)
            self.on_settled = None
            hook(self, Failure(defer.CancelledError()))

    def _settle(self, result: Any) -> None:
        """Fire :attr:`done` with ``result`` (the stream, or a Failure),
        :attr:`on_settled` first."""
        hook = self.on_settled
        if hook is not None:
            self.on_settled = None
            hook(self, result)
        if isinstance(result, Failure):
            self.done.errback(result)
        else:
            self.done.callback(result)

    def dial_failed(self, reason: Failure) -> None:
        """The TCP dial failed before ``connectionMade``."""
        self.connector = None  # (the dial holds this protocol: no cycle left)
        if not self.done.called:
            self._settle(reason)

    def connectionMade(self) -> None:
        assert self.transport is not None
        # The dial is over; it holds this protocol, so it is let go (no
        # reference cycle left behind for the garbage collector).
        self.connector = None
        no_delay(self.transport)  # one frame per write: no Nagle
        if self.tls is not None:
            # TLS over the dialled connection, as the TCP pool's client does
            # (``startTLS``, its records sent at once): the request goes
            # with our Finished (handshakeCompleted).
            start_tls(self.transport, self.tls)
        elif tls_layer(self.transport) is None:
            self.transport.write(upgrade_request(self.host, self.key, self.bearer))
        # Under TLS the request goes once the handshake is done (see
        # handshakeCompleted): written now, it would wait in Twisted's TLS
        # write buffers for the handshake, and first for a reactor turn.

    def handshakeCompleted(self) -> None:
        """The TLS handshake is done: the request is encrypted straight into
        the TLS connection (public ``getHandle``); Twisted sends it with our
        Finished, which it flushes right after this call."""
        tls = self.tls_done = tls_layer(self.transport)
        if tls is None or self._failed or self._lost:
            return
        request = upgrade_request(self.host, self.key, self.bearer)
        try:
            tls.getHandle().send(request)
        except Exception:  # noqa: BLE001 - pyOpenSSL refused: Twisted's write path
            self.transport.write(request)

    def dataReceived(self, data: bytes) -> None:
        stream = self.stream
        if stream is not None:
            stream.feed(data)
            return
        if self._failed:
            return
        buf = self._buf = self._buf + data
        if self._refusal is not None:
            self._read_refusal()
            return
        # Go's (or our) 101 with the right accept value, compared as bytes:
        # what _CANONICAL_ANSWER would match, its head ending at the first
        # CRLF CRLF after the Date (whose value, printable, holds none).
        expected = self._expected
        if not expected:
            expected = self._expected = _ANSWER_START + _accept_bytes(self.key.strip().encode("ascii")) + _ANSWER_MIDDLE
        if buf.startswith(expected):
            start = len(expected)
            end = buf.find(b"\r\n\r\n", start)
            if start <= end <= MAX_ANSWER_HEAD and not buf[start:end].translate(None, _PRINTABLE):
                self._buf = buf[end + 4 :]
                self._upgraded()
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
        m = _CANONICAL_ANSWER.fullmatch(head)
        if m is not None:
            # Go's (or our) 101: only the accept value is left to check.
            if m.group(1).decode("ascii") != accept_value(self.key):
                self.fail(WebSocketHandshakeError("WebSocket upgrade answer with a wrong Sec-WebSocket-Accept"))
                return
            self._upgraded()
            return
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
        self._upgraded()

    def _upgraded(self) -> None:
        """A valid ``101``: the stream, attached to ``attach_to``."""
        trailing, self._buf = self._buf, b""
        # Over TLS the stream talks to the TLS layer (as the server's does):
        # its loseConnection is the TLS shutdown, its certificates are there.
        stream = self.stream = WebSocketStreamTransport(
            self.tls_done or tls_layer(self.transport) or self.transport, client=True, clock=self.clock, close_timeout=self.close_timeout, hold=False
        )
        if self.attach_to is not None:
            stream.attach(self.attach_to)
        else:
            stream._update_reading()  # held until attached
        if trailing:
            # (The server's first frame, the ID, mostly: read as if it came
            # now, straight from ``trailing``; kept if the reader is not
            # ready, as it would have been given to the constructor.)
            stream.feed(trailing)
        if not self.done.called:
            self._settle(stream)

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
            self._settle(Failure(why))

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
                self._settle(
                    Failure(WebSocketHandshakeError(f"connection closed before the WebSocket upgrade: {reason.getErrorMessage()}"))
                )
            else:
                self._settle(reason)


def _dialled(_proto: WebSocketClientUpgradeProtocol) -> None:
    """A lean dial connected: the protocol's ``connectionMade`` took over."""


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
        #: Dials in progress (a dict: given up in the order they began).
        self._dialling: dict[WebSocketClientUpgradeProtocol, None] = {}
        self._due = Deadlines(reactor, handshake_timeout)

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
        proto = WebSocketClientUpgradeProtocol(
            self.reactor, self.host, attach_to=protocol, key=key, bearer=self.bearer, tls=self.tls
        )
        proto.handshake_timeout = self.handshake_timeout
        # Bookkeeping first: a dial that fails at once settles inside
        # lean_connect, and _settled then finds its entries.
        self._dialling[proto] = None
        due = self._due
        if due.delay != self.handshake_timeout:  # (changed since)
            due = self._due = Deadlines(self.reactor, self.handshake_timeout)
        due.add(proto, proto.timed_out)
        proto.due = due
        proto.on_settled = self._settled
        # A lean dial (``nodepass.compat.twisted_fastpath``), TLS started
        # over it by the protocol: Twisted's ``connectTCP``/``connectSSL``
        # leave their client transport and connector (which holds the
        # factory, which holds the protocol) in a reference cycle per pool
        # connection, for the garbage collector.  Bound methods, not
        # closures: fewer objects per dial, at hundreds of dials a second.
        # (The dial may be over before it returns: then it gives None.)
        dial = lean_connect(
            self.reactor, self.ip, self.port, proto, _dialled, proto.dial_failed, timeout=self.connect_timeout
        )
        if dial is not None and proto.transport is None and not proto.done.called:
            proto.connector = dial
        # The caller's Deferred is proto.done (cancelling it drops the dial).
        return proto.done

    def _settled(self, proto: WebSocketClientUpgradeProtocol, result: Any) -> None:
        """A dial is over (``result``: the stream or a Failure), told by the
        protocol just before its ``done`` fires -- a plain call where a first
        callback on ``done`` cost a Deferred round per pool connection."""
        self._dialling.pop(proto, None)
        due = proto.due
        if due is not None:
            due.discard(proto)
        if not isinstance(result, Failure):
            self._remember_session(proto.transport, proto.tls_done)
        else:
            self.log.debug("WebSocket pool connection to %s:%d failed: %s", self.ip, self.port, result.getErrorMessage())

    def _remember_session(self, transport: Any, tls: Any = None) -> None:
        """Keep the TLS session of an upgraded connection for the next dials
        (the server's session tickets came before its ``101``): from the
        first full handshake, and again from any later one (the server
        stopped resuming ours: its tickets expired, or it restarted).
        ``tls``: its TLS layer when the caller knows it already."""
        creator = self.tls
        if creator is None or transport is None:
            return
        if tls is None:
            tls = tls_layer(transport)
        if tls is None:
            return
        if creator.session is None or not session_reused(tls.getHandle()):
            creator.remember(tls)

    def close(self) -> None:
        """Drop the dials in progress; streams already open are the
        caller's to close."""
        self.closed = True
        for proto in list(self._dialling):
            proto.give_up(WebSocketError("WebSocket pool closed"))
