"""The master's HTTP transport: the Site, its channels and its requests.

What happens here comes before any route is chosen: the request body is
capped at ``MAX_BODY``, request heads Twisted cannot or will not parse are
answered (JSON with CORS headers, as every answer of the master), and open
connections are tracked so stopping the master closes them.  Routes and
statuses are :mod:`nodepass.master.api`'s.

Requests Twisted cannot even parse (a malformed request line or header, a
request line or header block over the limits below) get their answer from
:class:`MasterChannel`: a JSON error with CORS headers, then the connection
is closed once the client had a chance to read it.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.abstract import FileDescriptor
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web import http, server

from nodepass.compat.twisted_internals import http_channel_transport
from nodepass.master.records import json_utf8

MAX_BODY = 64 * 1024

MAX_LINE = 16 * 1024  # the request line, and each header line
MAX_HEAD = 32 * 1024  # the request line and every header line together
MAX_HEADERS = 200  # header lines in one request
# After refusing a request head, what the client is still sending is read
# and discarded for at most this long and this much, then the connection
# is aborted.
DRAIN_SECONDS = 2.0
DRAIN_BYTES = 1 << 20
MAX_MESSAGE = 300  # characters of an error message

CORS = {
    b"access-control-allow-origin": b"*",
    b"access-control-allow-methods": b"GET, PATCH, POST, PUT, DELETE, OPTIONS",
    b"access-control-allow-headers": b"Content-Type, Authorization, X-API-Key, Cache-Control",
}


class CappedRequest(server.Request):
    """A request whose body is kept only up to ``MAX_BODY`` bytes; beyond
    that it is discarded and the handler answers 413."""

    max_body = MAX_BODY
    too_large = False
    _received = 0
    #: ``(prepath, postpath)`` as Twisted split the path, kept when
    #: :class:`~nodepass.master.api.MasterRoot` mounts the API app.
    mount_origin: Optional[tuple[list[bytes], list[bytes]]] = None

    def gotLength(self, length: Optional[int]) -> None:
        if length is not None and length > self.max_body:
            self._refuse_body()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.too_large:
            return
        self._received += len(data)
        if self._received > self.max_body:
            self._refuse_body()
            return
        super().handleContentChunk(data)

    def _refuse_body(self) -> None:
        """Keep no body: what ``Request`` installs for an empty one (an
        empty in-memory file), and remember why."""
        self.too_large = True
        super().gotLength(0)


def refusal(status: int, reason: str, message: str) -> bytes:
    """A complete HTTP answer for a request that never became a
    :class:`CappedRequest`: JSON error body, CORS headers, ``Connection:
    close``."""
    body = json_utf8({"error": message})
    lines = [
        b"HTTP/1.1 %d %s" % (status, reason.encode("ascii")),
        b"Content-Type: application/json",
        b"Content-Length: %d" % len(body),
        b"Connection: close",
    ]
    lines += [b"%s: %s" % (name.title(), value) for name, value in CORS.items()]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class MasterChannel(http.HTTPChannel):
    """An HTTP channel that answers requests it refuses to parse.

    ``HTTPChannel`` drops a connection whose request line or header line is
    longer than ``MAX_LENGTH`` without a word, and answers other unparsable
    heads with a bare ``400`` before closing at once, so a client still
    sending gets a connection reset (which can destroy the answer before it
    is read).  Here the head is measured as it arrives: a request line over
    ``MAX_LINE`` gets ``414``, header lines over ``MAX_LINE`` or a head
    over ``MAX_HEAD`` / ``MAX_HEADERS`` get ``431``, anything else
    unparsable ``400`` -- each as JSON with CORS headers.  After the answer
    the channel stops parsing, half-closes where the transport can, and
    discards input until the client closes (bounded by ``DRAIN_SECONDS``
    and ``DRAIN_BYTES``).
    """

    MAX_LENGTH = MAX_LINE
    # Twisted's own limits stay as a backstop, set above ours so that ours
    # (which answer properly) always trip first.
    totalHeadersSize = MAX_HEAD + MAX_LINE + 4
    maxHeaders = MAX_HEADERS * 2

    _head_lines = 0  # lines of the current request head so far
    _head_bytes = 0
    _refused = False
    _drained = 0
    _drain_timer = None

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            self._discard(data)
            return
        super().dataReceived(data)

    def rawDataReceived(self, data: bytes) -> None:
        if self._refused:
            self._discard(data)
            return
        super().rawDataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self._refused:
            return
        if not line:  # the end of this request's head (or a stray CRLF before one)
            self._head_lines = self._head_bytes = 0
            super().lineReceived(line)
            return
        self._head_lines += 1  # the request line, then header lines
        self._head_bytes += len(line)
        if self._head_bytes > MAX_HEAD or self._head_lines > MAX_HEADERS + 1:
            self.refuse(431, "Request Header Fields Too Large", "Request header fields too large")
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        if self._refused:
            return
        if self._head_lines == 0:
            self.refuse(414, "URI Too Long", f"Request line too long (limit {MAX_LINE} bytes)")
        else:
            self.refuse(431, "Request Header Fields Too Large", f"Request header line too long (limit {MAX_LINE} bytes)")

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Private hook, checked against Twisted 26.10.0: HTTPChannel calls it
        # for every request head it cannot parse (bad request line, header
        # without a colon, invalid header name or value, its own size
        # limits) and Request for a malformed multipart body.  Its contract
        # is "answer, then stop reading this connection"; we keep it, with a
        # JSON answer and the drain of ``refuse`` instead of a bare 400 and
        # an immediate close.  Should a later Twisted stop calling it, the
        # bare 400 comes back and tests.test_master_hostile notices.
        self.refuse(400, "Bad Request", "Bad request: malformed request line or header")

    def refuse(self, status: int, reason: str, message: str) -> None:
        """Answer ``status`` and stop parsing this connection."""
        if self._refused:
            return
        self._refused = True
        self.clearLineBuffer()
        self.setTimeout(None)
        # A TCP transport or a TLS one wrapping it (zope interfaces tell
        # mypy nothing about either).
        transport: Any = self.transport
        transport.write(refusal(status, reason, message))
        # Half-close: the answer and our FIN go out while the client may
        # still be sending.  Closing with unread input would send a reset.
        # Only a socket itself can do that: a TLS wrapper claims the
        # interfaces of the TCP transport beneath it and forwards
        # loseWriteConnection() to it, which would cut the TLS stream short;
        # over TLS we wait for the client to close instead.
        if isinstance(transport, FileDescriptor):
            transport.loseWriteConnection()
        self._drain_timer = self.callLater(DRAIN_SECONDS, self._abort)

    def _discard(self, data: bytes) -> None:
        self._drained += len(data)
        if self._drained > DRAIN_BYTES and self._drain_timer is not None:
            # Not from inside dataReceived: a TLS transport aborted while it
            # is still delivering data fails on its own cleared state.
            self._drain_timer.reset(0)

    def _abort(self) -> None:
        if self._drain_timer is not None and self._drain_timer.active():
            self._drain_timer.cancel()
        self._drain_timer = None
        transport: Any = self.transport
        transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._drain_timer is not None and self._drain_timer.active():
            self._drain_timer.cancel()
        self._drain_timer = None
        super().connectionLost(reason)


class MasterSite(server.Site):
    """The Site of one master: capped requests, no access log, and a record
    of open connections so stopping the master closes keep-alive and SSE
    connections instead of leaving them to the peer."""

    requestFactory = CappedRequest
    noisy = False
    # Plain HTTP/1.1 channels (the master offers no HTTP/2 over ALPN), which
    # answer unparsable request heads.  Twisted types ``protocol`` as a
    # factory of its generic HTTP/1.1-or-2 proxy; a channel class is what
    # ``Site.buildProtocol`` calls all the same.
    protocol = MasterChannel  # type: ignore[assignment]

    def __init__(self, resource: Any) -> None:
        super().__init__(resource)
        self.channels: dict[object, defer.Deferred] = {}

    def log(self, request: Any) -> None:  # no per-request access log (Go prints none)
        pass

    def buildProtocol(self, addr: Any) -> Any:
        proto = super().buildProtocol(addr)
        gone: defer.Deferred = defer.Deferred()
        self.channels[proto] = gone
        original = proto.connectionLost

        def connectionLost(reason, _orig=original, _proto=proto):
            self.channels.pop(_proto, None)
            try:
                return _orig(reason)
            finally:
                if not gone.called:
                    gone.callback(None)

        proto.connectionLost = connectionLost
        return proto

    async def close_connections(self, reactor, timeout: float = 2.0) -> None:
        """Close every connection: politely first (so a final SSE
        ``shutdown`` event still reaches its reader), then abort whatever is
        still open after ``timeout`` (a reader that stopped reading)."""
        transports = []
        waits = []
        for proto, gone in list(self.channels.items()):
            waits.append(gone)
            transport = http_channel_transport(proto)
            if transport is not None:
                transports.append(transport)
                transport.loseConnection()
        if not waits:
            return
        d = defer.DeferredList(waits, consumeErrors=True)
        d.addTimeout(timeout, reactor)
        try:
            await d
            return
        except defer.TimeoutError:
            pass
        for transport in transports:
            abort = getattr(transport, "abortConnection", None)
            if abort is not None and getattr(transport, "connected", True):
                abort()
