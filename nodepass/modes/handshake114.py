"""The client's 1.14 handshake (SPEC-1.14 §3.2): one HTTP exchange.

The client connects to the tunnel address (TLS only when the tunnel port is
443: SPEC-1.14 §1), sends ``GET /`` with ``Authorization: Bearer TOKEN``,
and reads the answer: a JSON tunnel config with status 200, or an error
status.  The server closes the connection after answering; the control
channel is the first pool connection, not this one.

A 1.12 server takes the request for its "what is my IP" probe and answers
``200`` with ``Content-Type: text/plain`` and the IP (§3.2.5): that answer
is :class:`Server112`, which lets a client on ``wire=auto`` fall back.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

from nodepass.modes.base import TunnelError
from nodepass.wire import v114


class Server112(TunnelError):
    """The server answered the way a 1.12 server answers an HTTP probe."""


class HandshakeStatus(TunnelError):
    """The server answered with an error status (``status 401``)."""


#: Why each error status comes, as far as a client can tell.
_STATUS_HINTS = {
    401: "the server refused our tunnel key: the keys of both URLs differ",
    404: "this address answers HTTP but is not a NodePass 1.14 server",
    405: "this address answers HTTP but is not a NodePass 1.14 server",
    400: "the server could not read our request",
}


def _looks_like_probe_answer(data: bytes) -> bool:
    """A complete ``200`` answer with a ``text/plain`` body: a 1.12 server's
    IP echo (Go 1.12 and ours send ``Content-Type: text/plain``)."""
    head, sep, _body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    lines = head.split(b"\r\n")
    if not re.match(rb"HTTP/1\.[0-9] 200(?: |\Z)", lines[0]):
        return False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-type":
            return value.strip().lower().startswith(b"text/plain")
    return False


class HandshakeProtocol(Protocol):
    """Sends the request and parses the answer; ``result`` fires with the
    :class:`~nodepass.wire.v114.TunnelConfig` or fails with a
    :class:`~nodepass.modes.base.TunnelError` that says why."""

    transport: Any

    def __init__(self, request: bytes, clock: Any, timeout: float, server: str, https: bool = False):
        self.request = request
        self.https = https
        self.clock = clock
        self.timeout = timeout
        self.server = server
        self.result: Deferred[v114.TunnelConfig] = Deferred()
        self._buf = b""
        self._timer: Any = None

    def connectionMade(self) -> None:
        self.transport.write(self.request)
        self._timer = self.clock.callLater(self.timeout, self._timed_out)

    def dataReceived(self, data: bytes) -> None:
        if self.result.called:
            return
        self._buf += data
        self._parse(eof=False)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_timer()
        if not self.result.called:
            if self._buf:
                self._parse(eof=True)
            if not self.result.called and self.https:
                self._fail(TunnelError(
                    f"tunnelHandshake: the HTTPS handshake with {self.server} failed "
                    f"({reason.getErrorMessage() or 'closed'}): on port 443 a 1.14 client speaks HTTPS, for a "
                    "TLS-terminating proxy or CDN in front of the server; a NodePass server itself answers "
                    "plain HTTP, so put it on another port or behind such a proxy"
                ))
            elif not self.result.called:
                self._fail(TunnelError(
                    "tunnelHandshake: the server closed the connection without an answer "
                    "(another client holds the tunnel, or the server is restarting)"
                ))

    def _parse(self, eof: bool) -> None:
        if len(self._buf) >= 5 and self._buf[4:5] == b"H" and not self._buf.startswith(b"HTTP"):
            # A server that already serves a client from our IP took us for
            # one of its pool connections and wrote a 4-byte pool ID before
            # it read our request (and then answered it): skip the ID.
            self._buf = self._buf[4:]
        if _looks_like_probe_answer(self._buf):
            self._fail(Server112(f"tunnelHandshake: the server at {self.server} speaks the 1.12 generation"))
            return
        try:
            got = v114.parse_answer(self._buf, eof=eof)
        except v114.V114Error as e:
            text = str(e)
            if text.startswith("status "):
                status = int(text[7:])
                hint = _STATUS_HINTS.get(status, "not a NodePass 1.14 answer")
                self._fail(HandshakeStatus(f"tunnelHandshake: status {status} ({hint})"))
            else:
                self._fail(TunnelError(f"tunnelHandshake: invalid answer from {self.server}: {text}"))
            return
        if got is v114.NEED_MORE:
            return
        assert isinstance(got, v114.TunnelConfig)
        self._stop_timer()
        self.result.callback(got)
        self.transport.loseConnection()

    def _fail(self, exc: TunnelError) -> None:
        self._stop_timer()
        if not self.result.called:
            self.result.errback(exc)
        if self.transport is not None:
            self.transport.loseConnection()

    def _timed_out(self) -> None:
        self._timer = None
        if not self.result.called:
            self.result.errback(TunnelError(
                f"tunnelHandshake: no answer from {self.server} within {self.timeout:g}s "
                "(is a NodePass server listening at that address?)"
            ))
            self.transport.abortConnection()

    def _stop_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()


def handshake_uses_tls(port: int) -> bool:
    """SPEC-1.14 §1: a tunnel port of exactly 443 means HTTPS for the
    handshake (a TLS-terminating proxy or CDN in front of the server)."""
    return port == 443

