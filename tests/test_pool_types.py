"""The 1.14 pool types at tunnel level (SPEC-1.14 §3.2-§3.6, §4.3-§4.6).

``tests/test_ws_pool.py`` and ``tests/test_h2_pool.py`` test the WebSocket
and HTTP/2 transports on their own; ``tests/test_v114_peer.py`` plays a Go
1.14 peer against the TCP pool.  This module does the same for pool types
1, 2 and 3, with our real server and client in-process on 127.0.0.1:

* ``GoWebSocketClientAgainstOurServer``: a Go 1.14 client's WebSocket pool
  (type 2, ws://) written byte for byte here -- the upgrade request, the
  masking and the framing are this module's own code (no wsproto);
* ``GoHTTP2ClientAgainstOurServer``: a Go 1.14 client's HTTP/2 pool (type
  3) played with the ``h2`` library (an implementation independent of
  ours) with the Go client's SETTINGS;
* ``OurClientAgainstGoStreamServers``: our client against minimal fake Go
  1.14 servers of types 2 and 3, checking what it sends;
* ``FlowControlPerType`` / ``ClosesPerType``: back-pressure and closes end
  to end for types 1, 2 and 3;
* ``NoGarbagePerType``: relayed connections over types 1, 2 and 3 are freed
  by reference counting, nothing of theirs left for the garbage collector;
* ``AbuseOnStreamPoolPorts``: strangers and garbage on the tunnel port
  of running type-2 and type-3 tunnels;
* ``Quic114Wire``: the 1.14 QUIC pool's control stream and connection count.

Expected bytes are built here (tokens, JSON signals and the XOR/base64 line
codec come from ``tests/test_v114_peer.py``'s hand-made helpers), never with
``nodepass.wire``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import time
from typing import Any, Optional

import attrs
from h2 import events as h2e
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import H2Error
from h2.settings import SettingCodes, Settings
from OpenSSL import crypto
from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.trial import unittest
from zope.interface import implementer

from nodepass.modes import server as server_module
from nodepass.modes.tunnel_port import PortState
from nodepass.net.tls import generate_self_signed
from tests.helpers import (
    PushSender,
    close,
    collector_off,
    connect,
    free_port,
    garbage_of_ours,
    garbage_names,
    listen_tcp,
    service_up,
    sleep,
    wait_for,
)
from tests.test_tunnel import FAST, MiB, TunnelMixin, d
from tests.test_v114_peer import (
    DATE,
    KEY,
    PING,
    PING_LINE,
    PONG,
    PONG_LINE,
    TOKEN,
    ZERO_ID,
    Heard,
    config_body,
    fp_text,
    go_decode,
    go_line,
    go_request,
    ok_answer,
    ok_answer_re,
    tcp_launch,
    verify_signal,
)

#: SPEC-1.14 §4.4's test vector.
SPEC_WS_KEY = "OabYU+AjCv/nJYpuwpfMRA=="
SPEC_WS_ACCEPT = "w6d0uOVLoD9VXqQQnepsp9nZfB4="
#: RFC 6455 §1.3.
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: §4.4: the server's Close frame (status 1000, no reason).
SERVER_CLOSE = b"\x88\x02\x03\xe8"
#: The HTTP/2 client preface.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: §4.5: what a Go client advertises.
GO_CLIENT_SETTINGS = {
    SettingCodes.ENABLE_PUSH: 0,
    SettingCodes.INITIAL_WINDOW_SIZE: 4194304,
    SettingCodes.MAX_FRAME_SIZE: 16384,
    SettingCodes.MAX_HEADER_LIST_SIZE: 10485760,
}
GO_CLIENT_CONN_WINDOW_INCREMENT = 1073741824


# -- WebSocket bytes, by hand (RFC 6455) --------------------------------------


def ws_accept(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + WS_GUID).digest()).decode("ascii")


def xor_mask(data: bytes, mask: bytes) -> bytes:
    return bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def ws_frame(opcode: int, payload: bytes, mask: Optional[bytes] = None) -> bytes:
    """One frame, FIN set; masked when ``mask`` is given (client to server)."""
    n = len(payload)
    mbit = 0x80 if mask is not None else 0
    if n < 126:
        head = bytes([0x80 | opcode, mbit | n])
    elif n < 65536:
        head = bytes([0x80 | opcode, mbit | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, mbit | 127]) + n.to_bytes(8, "big")
    if mask is None:
        return head + payload
    return head + mask + xor_mask(payload, mask)


@attrs.frozen
class WSFrame:
    fin: bool
    opcode: int
    mask: Optional[bytes]
    payload: bytes  # unmasked
    raw: bytes  # as on the wire


def parse_ws_frame(buf: bytes) -> Optional[tuple[WSFrame, int]]:
    """The first whole frame of ``buf`` and its length, or None."""
    if len(buf) < 2:
        return None
    b0, b1 = buf[0], buf[1]
    n, pos = b1 & 0x7F, 2
    if n == 126:
        if len(buf) < 4:
            return None
        n, pos = int.from_bytes(buf[2:4], "big"), 4
    elif n == 127:
        if len(buf) < 10:
            return None
        n, pos = int.from_bytes(buf[2:10], "big"), 10
    mask = None
    if b1 & 0x80:
        if len(buf) < pos + 4:
            return None
        mask, pos = buf[pos : pos + 4], pos + 4
    if len(buf) < pos + n:
        return None
    body = buf[pos : pos + n]
    if mask is not None:
        body = xor_mask(body, mask)
    return WSFrame(bool(b0 & 0x80), b0 & 0x0F, mask, body, buf[: pos + n]), pos + n


def go_upgrade(key: str, host: str = "127.0.0.1", auth: str = "") -> bytes:
    """Go's WebSocket upgrade request, byte for byte (SPEC-1.14 §4.4);
    ``auth``: an ``Authorization`` value, put where our client puts it."""
    return (
        "GET / HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        "User-Agent: Go-http-client/1.1\r\n"
        + (f"Authorization: {auth}\r\n" if auth else "")
        + "Connection: Upgrade\r\n"
        f"Sec-Websocket-Key: {key}\r\n"
        "Sec-Websocket-Version: 13\r\n"
        "Upgrade: websocket\r\n"
        "Accept-Encoding: gzip\r\n"
        "\r\n"
    ).encode("ascii")


def answer_101_re(accept: str) -> re.Pattern:
    """Go's ``101`` answer (§4.4), exactly, with any RFC 1123 date."""
    return re.compile(
        rb"\AHTTP/1\.1 101 Switching Protocols\r\nConnection: Upgrade\r\nSec-Websocket-Accept: "
        + re.escape(accept.encode()) + rb"\r\nUpgrade: websocket\r\nDate: " + DATE + rb"\r\n\r\n\Z"
    )


def new_ws_key() -> str:
    return base64.b64encode(os.urandom(16)).decode("ascii")


async def within(d: Deferred, what: str, timeout: float = 5.0) -> Any:
    """Await ``d``; an AssertionError naming ``what`` after ``timeout`` s."""
    try:
        return await d.addTimeout(timeout, reactor)
    except defer.TimeoutError:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


async def settled(value, what: str, timeout: float = 10.0, window: float = 0.25) -> int:
    """Wait until ``value()`` stops growing for ``window`` seconds (a
    sender that flow control stopped); its value then.  Fails after
    ``timeout`` seconds of growth."""
    deadline = time.monotonic() + timeout
    last = value()
    while True:
        await sleep(window)
        now = value()
        if now == last:
            return now
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} still growing after {timeout}s ({now} bytes)")
        last = now


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# -- a Go 1.14 client, played by the test ---------------------------------------


class GoWS(Protocol):
    """One WebSocket of a fake Go 1.14 client (tls=0).  Parses the answer
    head and the server's frames; once its first message is ``00000000``
    it is the control WebSocket: every later binary message must be one
    signal line, decoded into ``signals``; pings are answered with a masked
    pong, as Go does."""

    def __init__(self) -> None:
        self.raw = b""
        self.head: Optional[bytes] = None
        self.frames: list[WSFrame] = []
        self.signals: list[Heard] = []
        self.not_one_line: list[bytes] = []  # control messages that are not exactly one line
        self.auto_pong = True
        self.lost: Deferred = Deferred()
        self._buf = b""

    def upgrade(self, key: str, host: str = "127.0.0.1", auth: str = "") -> None:
        self.transport.write(go_upgrade(key, host, auth))

    def dataReceived(self, data: bytes) -> None:
        self.raw += data
        self._buf += data
        if self.head is None:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self.head, self._buf = self._buf[: end + 4], self._buf[end + 4 :]
        if not self.head.startswith(b"HTTP/1.1 101 "):
            return  # a refusal: its body stays in raw
        while True:
            got = parse_ws_frame(self._buf)
            if got is None:
                return
            frame, used = got
            self._buf = self._buf[used:]
            self.frames.append(frame)
            if frame.opcode == 2 and len(self.frames) > 1 and self.is_control:
                self._signal(frame.payload)

    def _signal(self, payload: bytes) -> None:
        if not payload.endswith(b"\n") or payload.count(b"\n") != 1:
            self.not_one_line.append(payload)
            return
        heard = Heard(0.0, payload, go_decode(payload))
        self.signals.append(heard)
        if heard.payload == PING and self.auto_pong:
            self.send(PONG_LINE)

    @property
    def is_control(self) -> bool:
        return bool(self.frames) and self.frames[0].payload == ZERO_ID

    @property
    def pool_id(self) -> str:
        return self.frames[0].payload.hex() if self.frames else ""

    def messages(self) -> list[bytes]:
        """Binary payloads after the ID."""
        return [f.payload for f in self.frames[1:] if f.opcode == 2]

    def payloads(self) -> list[bytes]:
        return [h.payload for h in self.signals]

    def send(self, payload: bytes, opcode: int = 2) -> bytes:
        frame = ws_frame(opcode, payload, os.urandom(4))
        self.transport.write(frame)
        return frame

    def connectionLost(self, reason=None) -> None:
        if not self.lost.called:
            self.lost.callback(None)


@attrs.define
class H2Stream:
    sid: int
    headers: list = attrs.Factory(list)
    data: list = attrs.Factory(list)  # one entry per DATA frame
    ended: bool = False
    reset: Optional[int] = None

    @property
    def status(self) -> bytes:
        return dict(self.headers).get(b":status", b"")

    @property
    def pool_id(self) -> str:
        return self.data[0].hex() if self.data and len(self.data[0]) == 4 else ""

    def body(self) -> bytes:
        """What arrived after the 4 ID bytes."""
        return b"".join(self.data)[4:]


def go_client_settings() -> Settings:
    """Exactly the four settings a Go client sends (§4.5)."""
    settings = Settings(client=True, initial_values=GO_CLIENT_SETTINGS)
    for code in list(settings):
        if code not in GO_CLIENT_SETTINGS:
            del settings[code]
    return settings


def go_h2_request(authority: bytes = b"none", path: bytes = b"/stream", method: bytes = b"POST") -> list:
    """A Go client's pool request headers, in Go's order (§4.5)."""
    return [(b":authority", authority), (b":method", method), (b":path", path), (b":scheme", b"https"),
            (b"accept-encoding", b"gzip"), (b"user-agent", b"Go-http-client/2.0")]


@implementer(IHandshakeListener)
class GoH2(Protocol):
    """A fake Go 1.14 client's HTTP/2 pool connection (TLS 1.3, ALPN h2),
    driven by ``h2`` with Go's SETTINGS and connection window.  Stream 1
    gets ``00000000``: its later DATA is decoded as signal lines and pings
    are answered."""

    def __init__(self) -> None:
        self.conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.conn.local_settings = go_client_settings()
        self.streams: dict[int, H2Stream] = {}
        self.remote_settings: dict[int, int] = {}
        self.signals: list[Heard] = []
        self.goaway: Optional[int] = None
        self.alpn: Optional[bytes] = None
        self.peer_der = b""
        self.shaken: Deferred = Deferred()
        self.lost: Deferred = Deferred()
        self._lines = b""

    def connectionMade(self) -> None:
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(GO_CLIENT_CONN_WINDOW_INCREMENT)
        self._flush()

    def handshakeCompleted(self) -> None:
        self.alpn = self.transport.negotiatedProtocol
        cert = self.transport.getPeerCertificate()
        self.peer_der = crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)
        if not self.shaken.called:
            self.shaken.callback(self)

    def _flush(self) -> None:
        out = self.conn.data_to_send()
        if out:
            self.transport.write(out)

    def open(self, authority: bytes = b"none", path: bytes = b"/stream", method: bytes = b"POST") -> H2Stream:
        """HEADERS (no END_STREAM), then at once DATA ``00``."""
        sid = self.conn.get_next_available_stream_id()
        stream = self.streams[sid] = H2Stream(sid)
        self.conn.send_headers(sid, go_h2_request(authority, path, method))
        self.conn.send_data(sid, b"\x00")
        self._flush()
        return stream

    def send(self, sid: int, data: bytes) -> None:
        self.conn.send_data(sid, data)
        self._flush()

    @property
    def control(self) -> Optional[H2Stream]:
        s = self.streams.get(1)
        return s if s is not None and s.data and s.data[0] == ZERO_ID else None

    def payloads(self) -> list[bytes]:
        return [h.payload for h in self.signals]

    def dataReceived(self, data: bytes) -> None:
        for ev in self.conn.receive_data(data):
            if isinstance(ev, h2e.ResponseReceived):
                self.streams.setdefault(ev.stream_id, H2Stream(ev.stream_id)).headers = list(ev.headers)
            elif isinstance(ev, h2e.DataReceived):
                stream = self.streams.setdefault(ev.stream_id, H2Stream(ev.stream_id))
                stream.data.append(ev.data)
                try:
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                except H2Error:
                    pass
                if ev.stream_id == 1 and len(stream.data) > 1 and stream.data[0] == ZERO_ID:
                    self._control(ev.data)
            elif isinstance(ev, h2e.StreamEnded):
                self.streams.setdefault(ev.stream_id, H2Stream(ev.stream_id)).ended = True
            elif isinstance(ev, h2e.StreamReset):
                self.streams.setdefault(ev.stream_id, H2Stream(ev.stream_id)).reset = int(ev.error_code)
            elif isinstance(ev, h2e.RemoteSettingsChanged):
                for code, change in ev.changed_settings.items():
                    self.remote_settings[int(code)] = change.new_value
            elif isinstance(ev, h2e.ConnectionTerminated):
                self.goaway = int(ev.error_code)
        self._flush()

    def _control(self, data: bytes) -> None:
        self._lines += data
        while b"\n" in self._lines:
            line, self._lines = self._lines.split(b"\n", 1)
            heard = Heard(0.0, line + b"\n", go_decode(line + b"\n"))
            self.signals.append(heard)
            if heard.payload == PING:
                try:
                    self.conn.send_data(1, PONG_LINE)
                except H2Error:
                    pass

    def connectionLost(self, reason=None) -> None:
        if not self.lost.called:
            self.lost.callback(None)


def _alpn_client_options() -> CertificateOptions:
    """Go's HTTP/2 pool dial with tls 1: TLS 1.3, no verification, no SNI, ALPN h2."""
    return CertificateOptions(verify=False, raiseMinimumTo=TLSVersion.TLSv1_3, acceptableProtocols=[b"h2"])


async def dial(port: int, proto_class, source: str = "", tls: Any = None, timeout: float = 5.0):
    """Connect ``proto_class()`` to 127.0.0.1:port (from ``source`` when
    given, over TLS with ``tls``); fires once it is connected (TCP)."""
    done: Deferred = Deferred()

    class F(ClientFactory):
        noisy = False

        def buildProtocol(self, addr):
            p = proto_class()
            made = p.connectionMade

            def connection_made():
                made()
                if not done.called:
                    done.callback(p)

            p.connectionMade = connection_made
            return p

        def clientConnectionFailed(self, connector, reason):
            if not done.called:
                done.errback(reason)

    bind = (source, 0) if source else None
    if tls is not None:
        reactor.connectSSL("127.0.0.1", port, F(), tls, bindAddress=bind)
    else:
        reactor.connectTCP("127.0.0.1", port, F(), bindAddress=bind)
    done.addTimeout(timeout, reactor)
    return await done


class Raw(Protocol):
    """Records bytes; ``lost`` fires at close."""

    def __init__(self) -> None:
        self.raw = b""
        self.lost: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.raw += data

    def connectionLost(self, reason=None) -> None:
        if not self.lost.called:
            self.lost.callback(None)


async def _abort_all(conns: list) -> None:
    for c in conns:
        if not c.lost.called and c.transport is not None:
            c.transport.abortConnection()
    for c in conns:
        if not c.lost.called:
            await c.lost


class _Mixin(TunnelMixin):
    def setUp(self):
        super().setUp()
        self.conns: list = []
        self.addCleanup(_abort_all, self.conns)  # runs after the services stopped

    async def _server(self, query: str = "", name: str = "server"):
        svc = await self.start_server(f"127.0.0.1:{free_port()}", "&mode=1&max=4" + query, name=name, key=KEY)
        return svc, svc.runner.entry_port

    async def _handshake(self, body: bytes) -> None:
        c = await dial(self.tunnel_port, Raw)
        self.conns.append(c)
        c.transport.write(go_request())
        await within(c.lost, "the handshake connection closed after the answer")
        self.assertRegex(c.raw, ok_answer_re(body))

    async def _user(self, port: int):
        c = await connect(port)
        self.conns.append(c)
        return c

    def quiet(self, name: str) -> None:
        """Neither an error nor a restart was logged."""
        for text in ("Server error", "Server restart", "Client error", "Client restart"):
            self.assertFalse(self.logged(name, text), f"{name} logged {text!r}: {self.lines.get(name)}")


# -- 1: a Go client playing type 2 against our server ------------------------------


class GoWebSocketClientAgainstOurServer(_Mixin, unittest.TestCase):
    async def _ws(self, key: str = "") -> GoWS:
        ws = await dial(self.tunnel_port, GoWS)
        self.conns.append(ws)
        ws.upgrade(key or new_ws_key())
        return ws

    @d
    async def test_type2_upgrade_control_signals_launch_relay_and_close(self):
        """SPEC-1.14 §3.2.4, §3.3, §4.4 (type 2, tls 0, flow "-"): the answer
        announces ``"type":"2"``; Go's byte-exact upgrade gets Go's exact
        ``101`` (the SPEC's accept vector); the first WebSocket's first
        message is ``82 04 00 00 00 00`` (control) and the server's ping
        follows as its own message ``82 19`` + the captured line; our
        masked pong is understood (a CHECK_POINT) and our masked ping gets a
        pong message; a second WebSocket gets a random ID; a user at the
        entry makes a ``tcp`` launch naming it, in one message of exactly one
        line; user bytes go both ways as binary messages; when the user
        leaves the server closes that WebSocket with ``88 02 03 e8``; and a
        Close from us ends the user of another WebSocket."""
        self.assertEqual(ws_accept(SPEC_WS_KEY), SPEC_WS_ACCEPT)
        svc, entry = await self._server("&type=2")
        runner = svc.runner
        await self._handshake(config_body(type_="2"))
        self.assertTrue(self.logged("server", "Sending tunnel config: FLOW=-|MAX=4|TLS=0|TYPE=2"))

        ctrl = await self._ws(SPEC_WS_KEY)
        await wait_for(lambda: len(ctrl.frames) >= 2, what="the ID and the first ping")
        self.assertRegex(ctrl.head, answer_101_re(SPEC_WS_ACCEPT))
        self.assertEqual(ctrl.frames[0].raw, bytes.fromhex("820400000000"))
        self.assertEqual(ctrl.frames[1].raw, b"\x82\x19" + PING_LINE)
        await wait_for(lambda: self.logged("server", "CHECK_POINT|MODE=1|PING="), what="our masked pong understood")
        self.assertTrue(self.logged("server", "Marking tunnel handshake as complete in "))
        sent = ctrl.send(PING_LINE)
        self.assertEqual(sent[:2], b"\x82\x99")  # masked, 25 bytes
        await wait_for(lambda: any(f.raw == b"\x82\x19" + PONG_LINE for f in ctrl.frames), what="the pong message")

        key = new_ws_key()
        pool = await self._ws(key)
        await wait_for(lambda: pool.frames, what="the second WebSocket's ID")
        self.assertRegex(pool.head, answer_101_re(ws_accept(key)))
        self.assertEqual(pool.frames[0].raw[:2], b"\x82\x04")
        self.assertNotEqual(pool.frames[0].payload, ZERO_ID)
        self.assertFalse(pool.is_control)

        user = await self._user(entry)
        remote = f"127.0.0.1:{user.transport.getHost().port}"
        await wait_for(lambda: any(h.action == "tcp" for h in ctrl.signals), what="the launch")
        launch = next(h for h in ctrl.signals if h.action == "tcp")
        self.assertEqual(launch.payload, tcp_launch(remote, pool.pool_id))
        self.assertIn(launch.line, ctrl.messages())  # the whole line, one message
        self.assertEqual(ctrl.not_one_line, [])
        user.transport.write(b"PING-DATA\n")
        await wait_for(lambda: len(pool.frames) >= 2, what="the user's bytes on the WebSocket")
        self.assertEqual(pool.frames[1].raw, b"\x82\x0aPING-DATA\n")
        self.assertEqual(pool.send(b"PONG-DATA\n")[:2], b"\x82\x8a")
        self.assertEqual(await user.wait_bytes(10), b"PONG-DATA\n")

        await close(user)
        await wait_for(lambda: any(f.opcode == 8 for f in pool.frames), what="the server's Close")
        closing = next(f for f in pool.frames if f.opcode == 8)
        self.assertEqual(closing.raw, SERVER_CLOSE)
        self.assertEqual(pool.send(b"\x03\xe8", opcode=8)[:2], b"\x88\x82")
        await within(pool.lost, "the TCP connection closed after the Close exchange")

        # The other way: the exit (us) closes, the user at the entry sees EOF.
        third = await self._ws()
        await wait_for(lambda: third.frames, what="a third WebSocket's ID")
        user2 = await self._user(entry)
        await wait_for(lambda: any(h.payload == tcp_launch(f"127.0.0.1:{user2.transport.getHost().port}",
                                                           third.pool_id) for h in ctrl.signals),
                       what="the launch naming the third WebSocket")
        third.send(b"bye")
        self.assertEqual(await user2.wait_bytes(3), b"bye")
        third.send(b"\x03\xe8", opcode=8)
        await within(user2.lost, "EOF for the user after our Close")
        await wait_for(lambda: any(f.raw == SERVER_CLOSE for f in third.frames), what="the server answering our Close")
        await within(third.lost, "the TCP connection closed after our Close")

        self.assertEqual(ctrl.not_one_line, [])
        self.assertFalse(ctrl.lost.called)
        self.assertIs(svc.runner, runner)
        self.quiet("server")


# -- 2: a Go client playing type 3 against our server --------------------------------


class GoHTTP2ClientAgainstOurServer(_Mixin, unittest.TestCase):
    async def _go_h2(self, source: str = "") -> GoH2:
        h = await dial(self.tunnel_port, GoH2, source=source, tls=_alpn_client_options())
        self.conns.append(h)
        await within(h.shaken, "the TLS handshake")
        return h

    async def _control_and_pool(self, n: int) -> tuple[GoH2, list[H2Stream], str]:
        """One connection: stream 1 (control), then ``n`` pool streams.
        Returns (connection, pool streams, the server's fingerprint)."""
        h = await self._go_h2()
        self.assertEqual(h.alpn, b"h2")
        ctrl = h.open()
        self.assertEqual(ctrl.sid, 1)
        await wait_for(lambda: len(ctrl.data) >= 2, what="the control's ID and the first ping")
        self.assertEqual(ctrl.status, b"200")
        self.assertFalse(ctrl.ended)
        self.assertEqual(ctrl.data[0], ZERO_ID)  # its own DATA frame ...
        self.assertEqual(ctrl.data[1], PING_LINE)  # ... and the ping in the next one
        pools = [h.open() for _ in range(n)]
        await wait_for(lambda: all(s.data for s in pools), what="the pool streams' IDs")
        for s in pools:
            self.assertEqual((s.status, len(s.data[0])), (b"200", 4))
            self.assertNotEqual(s.data[0], ZERO_ID)
        self.assertEqual([s.sid for s in pools], list(range(3, 3 + 2 * n, 2)))
        return h, pools, fp_text(h.peer_der)

    def _their_verify(self, h: GoH2) -> Optional[dict]:
        v = next((p for p in h.payloads() if json.loads(p).get("action") == "verify"), None)
        return json.loads(v) if v is not None else None

    @d
    async def test_type3_control_verify_launch_relay_end_stream_and_404(self):
        """SPEC-1.14 §3.3, §3.5, §4.5 (type 3, tls forced to 1, flow "-"):
        one TLS connection with ALPN h2 and the Go client's SETTINGS; the
        server advertises MAX_CONCURRENT_STREAMS = its max; stream 1 gets 200,
        then ``00000000`` and the ping line as separate DATA frames; later
        streams random IDs; the server's ``verify`` names one of them with
        its fingerprint (and ends it); after ours the entry opens, a user's
        launch names another stream and bytes relay over it; when the user
        leaves the server ENDs that stream (Go would not); a request to
        ``/other`` from the handshake IP gets 404 ``not found\\n``."""
        svc, entry = await self._server("&type=3")
        runner = svc.runner
        await self._handshake(config_body(tls="1", type_="3"))
        self.assertTrue(self.logged("server", "Sending tunnel config: FLOW=-|MAX=4|TLS=1|TYPE=3"))
        self.assertTrue(self.logged("server", "TLS code-1: RAM cert with TLS 1.3 for stream pool"))
        h, pools, server_fp = await self._control_and_pool(3)
        self.assertEqual(h.remote_settings.get(SettingCodes.MAX_CONCURRENT_STREAMS), 4)
        await wait_for(lambda: self.logged("server", "CHECK_POINT|MODE=1|PING="), what="our pong counted")

        await wait_for(lambda: self._their_verify(h), timeout=3, what="the server's verify")
        theirs = self._their_verify(h)
        by_id = {s.pool_id: s for s in pools}
        self.assertIn(theirs["id"], by_id)
        self.assertEqual(theirs["fp"], server_fp)
        named = by_id[theirs["id"]]
        await wait_for(lambda: named.ended or named.reset is not None, what="the named stream closed")

        user = await self._user(entry)
        ours, last = [s for s in pools if s is not named]
        h.send(1, go_line(verify_signal(ours.pool_id, server_fp)))
        await wait_for(lambda: any(json.loads(p).get("action") == "tcp" for p in h.payloads()),
                       what="the launch after our verify")
        self.assertTrue(self.logged("server", "TLS certificate fingerprint verified: " + server_fp))
        launch = next(p for p in h.payloads() if json.loads(p).get("action") == "tcp")
        self.assertEqual(launch, tcp_launch(f"127.0.0.1:{user.transport.getHost().port}", last.pool_id))
        user.transport.write(b"PING-DATA\n")
        await wait_for(lambda: last.body() == b"PING-DATA\n", what="the user's bytes on the stream")
        h.send(last.sid, b"PONG-DATA\n")
        self.assertEqual(await user.wait_bytes(10), b"PONG-DATA\n")
        self.assertFalse(last.ended)
        await close(user)
        await wait_for(lambda: last.ended, what="END_STREAM from the server")
        self.assertIn(last.reset, (None, ErrorCodes.NO_ERROR))

        other = h.open(path=b"/other")
        await wait_for(lambda: other.ended, what="the 404's end")
        self.assertEqual(other.status, b"404")
        self.assertEqual(b"".join(other.data), b"not found\n")

        self.assertFalse(h.lost.called)
        self.assertIsNone(h.goaway)
        self.assertIs(svc.runner, runner)
        self.quiet("server")

    @d
    async def test_type3_target_hang_up_ends_the_stream(self):
        """SPEC-1.14 §4.5 closing (flow "+": the Go client is the entry):
        our ``tcp`` launch on one of our streams makes the server dial its
        target; the target says ``bye`` and hangs up; the server relays it
        and ENDs the stream (the v1.14.0 Go server would leave it open)."""

        class HangUp(Protocol):
            def connectionMade(self) -> None:
                self.transport.write(b"bye")
                self.transport.loseConnection()

        target, factory = listen_tcp(HangUp)
        self.addCleanup(target.stopListening)
        svc = await self.start_server(f"127.0.0.1:{target.getHost().port}", "&mode=2&max=4&type=3", key=KEY)
        await self._handshake(config_body(flow="+", tls="1", type_="3"))
        h, pools, server_fp = await self._control_and_pool(2)
        await wait_for(lambda: self._their_verify(h), timeout=3, what="the server's verify")
        named = self._their_verify(h)["id"]
        mine = next(s for s in pools if s.pool_id != named)
        h.send(1, go_line(tcp_launch("127.0.0.1:50000", mine.pool_id)))
        await wait_for(lambda: mine.ended, what="END_STREAM after the target hung up")
        self.assertEqual(mine.body(), b"bye")
        self.assertEqual(factory.accepted, 1)
        await wait_for(lambda: svc.stats.tcps == 0, what="the server's slot released")
        self.quiet("server")


# -- 3: our client against fake Go 1.14 servers of types 2 and 3 ----------------------


class _FakeHandshake(Protocol):
    def __init__(self, fake: "FakeGoStreamServer"):
        self.fake = fake
        self.buf = b""

    def connectionMade(self) -> None:
        self.fake.protos.add(self)

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        if b"\r\n\r\n" in self.buf:
            self.fake.requests.append(self.buf)
            self.transport.write(self.fake.answer)
            self.fake.phase_b = True
            self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        self.fake.protos.discard(self)


def _fresh_id(handed: list) -> bytes:
    while True:
        raw = os.urandom(4)
        if raw != ZERO_ID and raw.hex() not in handed:
            handed.append(raw.hex())
            return raw


class _FakeWSConn(Protocol):
    """A Go 1.14 WebSocket pool connection, server side: records the
    upgrade request, answers Go's ``101``, writes the ID (``00000000`` and a
    ping for the first), parses the client's frames, pongs on the control."""

    def __init__(self, fake: "FakeGoStreamServer"):
        self.fake = fake
        self.request = b""
        self.frames: list[WSFrame] = []
        self.signals: list[Heard] = []
        self._buf = b""

    def connectionMade(self) -> None:
        self.fake.protos.add(self)
        self.fake.conns.append(self)

    def dataReceived(self, data: bytes) -> None:
        self._buf += data
        if not self.request:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self.request, self._buf = self._buf[: end + 4], self._buf[end + 4 :]
            m = re.search(rb"\r\nSec-Websocket-Key: ([^\r]*)\r\n", self.request)
            key = m.group(1).decode("ascii") if m else ""
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nSec-Websocket-Accept: "
                + ws_accept(key).encode() + b"\r\nUpgrade: websocket\r\nDate: Mon, 30 Nov 2026 02:41:40 GMT\r\n\r\n"
            )
            if self.fake.control is None:
                self.fake.control = self
                self.transport.write(ws_frame(2, ZERO_ID))
                self.transport.write(ws_frame(2, PING_LINE))
            else:
                self.transport.write(ws_frame(2, _fresh_id(self.fake.handed)))
        while True:
            got = parse_ws_frame(self._buf)
            if got is None:
                return
            frame, used = got
            self._buf = self._buf[used:]
            self.frames.append(frame)
            if frame.opcode == 8:
                self.transport.write(ws_frame(8, b"\x03\xe8"))
                self.transport.loseConnection()
            elif frame.opcode == 2 and self is self.fake.control:
                heard = Heard(0.0, frame.payload, go_decode(frame.payload))
                self.signals.append(heard)
                if heard.payload == PING:
                    self.transport.write(ws_frame(2, PONG_LINE))

    def connectionLost(self, reason=None) -> None:
        self.fake.protos.discard(self)


@implementer(IHandshakeListener)
class _FakeH2Conn(Protocol):
    """A Go 1.14 HTTP/2 pool connection, server side (TLS with ALPN h2):
    records the client's SETTINGS, each request's headers and first DATA,
    answers 200 and the ID (``00000000`` and a ping on the first stream)."""

    def __init__(self, fake: "FakeGoStreamServer"):
        self.fake = fake
        self.h2: Optional[H2Connection] = None
        self.alpn: Optional[bytes] = None
        self.sni: Any = "unset"
        self.settings: dict[int, int] = {}
        self.requests: dict[int, list] = {}
        self.first_data: dict[int, bytes] = {}
        self.control_sid: Optional[int] = None
        self.signals: list[Heard] = []
        self._lines = b""

    def connectionMade(self) -> None:
        self.fake.protos.add(self)
        self.fake.conns.append(self)
        self.transport.startTLS(self.fake.tls)

    def handshakeCompleted(self) -> None:
        tls = self.transport.protocol  # the TLS layer startTLS put under us
        self.alpn = tls.negotiatedProtocol
        self.sni = tls.getHandle().get_servername()
        self._start()

    def _start(self) -> None:
        if self.h2 is None:
            self.h2 = H2Connection(H2Configuration(client_side=False, header_encoding=None))
            self.h2.initiate_connection()
            self._flush()

    def _flush(self) -> None:
        out = self.h2.data_to_send()
        if out:
            self.transport.write(out)

    def dataReceived(self, data: bytes) -> None:
        self._start()
        conn = self.h2
        for ev in conn.receive_data(data):
            if isinstance(ev, h2e.RemoteSettingsChanged):
                for code, change in ev.changed_settings.items():
                    self.settings[int(code)] = change.new_value
            elif isinstance(ev, h2e.RequestReceived):
                self.requests[ev.stream_id] = list(ev.headers)
            elif isinstance(ev, h2e.DataReceived):
                sid = ev.stream_id
                try:
                    conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                except H2Error:
                    pass
                if sid not in self.first_data:
                    self.first_data[sid] = ev.data
                    conn.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/octet-stream")])
                    if self.fake.control is None:
                        self.fake.control = self
                        self.control_sid = sid
                        conn.send_data(sid, ZERO_ID)
                        conn.send_data(sid, PING_LINE)
                    else:
                        conn.send_data(sid, _fresh_id(self.fake.handed))
                elif sid == self.control_sid:
                    self._lines += ev.data
                    while b"\n" in self._lines:
                        line, self._lines = self._lines.split(b"\n", 1)
                        heard = Heard(0.0, line + b"\n", go_decode(line + b"\n"))
                        self.signals.append(heard)
                        if heard.payload == PING:
                            conn.send_data(sid, PONG_LINE)
        self._flush()

    def connectionLost(self, reason=None) -> None:
        self.fake.protos.discard(self)


class FakeGoStreamServer(Factory):
    """A Go 1.14 server of pool type 2 (ws://) or 3 (HTTP/2) on one port:
    phase A answers the handshake, phase B serves pool connections."""

    noisy = False

    def __init__(self, pool_type: str):
        self.pool_type = pool_type
        tls = "1" if pool_type == "3" else "0"
        self.answer = ok_answer(config_body(tls=tls, type_=pool_type))
        cert_pem, key_pem = generate_self_signed("go-server")
        self.tls = CertificateOptions(
            privateKey=crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem),
            certificate=crypto.load_certificate(crypto.FILETYPE_PEM, cert_pem),
            raiseMinimumTo=TLSVersion.TLSv1_3,
            acceptableProtocols=[b"h2"],
        )
        self.phase_b = False
        self.requests: list[bytes] = []
        self.conns: list = []
        self.protos: set = set()
        self.control: Any = None
        self.handed: list[str] = []
        self.listener: Any = None

    def buildProtocol(self, addr):
        if not self.phase_b:
            return _FakeHandshake(self)
        return _FakeWSConn(self) if self.pool_type == "2" else _FakeH2Conn(self)

    def listen(self) -> int:
        self.listener = reactor.listenTCP(0, self, interface="127.0.0.1")
        return self.listener.getHost().port

    async def shutdown(self) -> None:
        await self.listener.stopListening()
        for p in list(self.protos):
            p.transport.abortConnection()
        await wait_for(lambda: not self.protos, what="the fake server's connections closed")


class OurClientAgainstGoStreamServers(TunnelMixin, unittest.TestCase):
    """Our client's pool requests, as a Go 1.14 server of type 2 or 3 sees them."""

    async def _client(self, pool_type: str) -> FakeGoStreamServer:
        fake = FakeGoStreamServer(pool_type)
        self.tunnel_port = fake.listen()
        self.addCleanup(fake.shutdown)  # after the client's own cleanup (LIFO)
        svc = self._service("client", f"client://{KEY}@127.0.0.1:{self.tunnel_port}/127.0.0.1:{free_port()}"
                                      "?mode=2&min=2&log=debug&sni=tunnel.example", FAST)
        await service_up(svc, "client")
        return fake

    @d
    async def test_websocket_upgrade_bytes_host_and_bearer(self):
        """SPEC-1.14 §4.4/§4.6: with ``sni=tunnel.example`` the handshake's
        Host is the sni value, but every upgrade request is Go's, byte for
        byte, with ``Host: 127.0.0.1`` (the tunnel host) and a fresh 16-byte
        key -- plus our one ``Authorization: Bearer`` line, equal to the
        handshake's token.  The control (``00000000``) works: our pong is a
        masked frame ``82 99``."""
        fake = await self._client("2")
        self.assertEqual(fake.requests, [go_request("tunnel.example")])
        await wait_for(lambda: len(fake.conns) >= 3 and all(c.request for c in fake.conns),
                       what="control and two pool upgrades")
        handshake_token = re.search(rb"\r\nAuthorization: Bearer ([0-9a-f]{64})\r\n", fake.requests[0]).group(1)
        self.assertEqual(handshake_token.decode(), TOKEN)
        keys = []
        for c in fake.conns:
            key = re.search(rb"\r\nSec-Websocket-Key: ([^\r]*)\r\n", c.request).group(1).decode()
            self.assertEqual(len(base64.b64decode(key, validate=True)), 16)
            keys.append(key)
            self.assertEqual(c.request.count(b"\r\nAuthorization: "), 1)
            self.assertIn(b"\r\nAuthorization: Bearer " + handshake_token + b"\r\n", c.request)
            without = re.sub(rb"Authorization: [^\r]*\r\n", b"", c.request)
            self.assertEqual(without, go_upgrade(key, "127.0.0.1"))  # Go's bytes around it
        self.assertEqual(len(set(keys)), len(keys))
        await wait_for(lambda: self.logged("client", "Marking tunnel handshake as complete in "), what="control up")
        await wait_for(lambda: any(h.payload == PONG for h in fake.control.signals), what="our pong")
        pong = next(f for f in fake.control.frames if f.payload == PONG_LINE)
        self.assertEqual(pong.raw[:2], b"\x82\x99")
        self.assertTrue(all(f.mask is not None for c in fake.conns for f in c.frames))
        self.assertTrue(self.logged("client", "Loading tunnel config: FLOW=-|MAX=4|TLS=0|TYPE=2"))
        self.assertFalse(self.logged("client", "Client error"))

    @d
    async def test_http2_one_connection_settings_headers_and_first_byte(self):
        """SPEC-1.14 §4.5/§4.6: one TLS connection (ALPN h2, no SNI with
        tls 1) carries every pool stream; our SETTINGS are the Go client's
        four and the connection window grows by 1073741824; each stream
        opens with Go's request headers in Go's order -- ``:authority`` the
        sni value, ``:path /stream``, ``:method POST`` -- and a DATA frame
        holding exactly ``00``; the control stream works (our pong)."""
        fake = await self._client("3")
        self.assertEqual(fake.requests, [go_request("tunnel.example")])
        await wait_for(lambda: fake.conns and len(fake.conns[0].first_data) >= 3, what="control and two pool streams")
        self.assertEqual(len(fake.conns), 1)
        conn = fake.conns[0]
        self.assertEqual(conn.alpn, b"h2")
        self.assertIsNone(conn.sni)
        self.assertEqual(conn.settings, {int(k): v for k, v in GO_CLIENT_SETTINGS.items()})
        self.assertGreaterEqual(conn.h2.outbound_flow_control_window, GO_CLIENT_CONN_WINDOW_INCREMENT)
        for sid, headers in conn.requests.items():
            self.assertEqual(headers, go_h2_request(b"tunnel.example"), sid)
        for sid, first in conn.first_data.items():
            self.assertEqual(first, b"\x00", sid)
        self.assertEqual(sorted(conn.first_data), sorted(conn.requests))
        await wait_for(lambda: any(h.payload == PONG for h in conn.signals), what="our pong on the control stream")
        self.assertEqual(conn.control_sid, 1)
        self.assertTrue(self.logged("client", "Loading tunnel config: FLOW=-|MAX=4|TLS=1|TYPE=3"))
        self.assertFalse(self.logged("client", "Client error"))


# -- 4 and 5: flow control and closes, end to end -------------------------------------


#: What an ``A`` target answers before it hangs up: more than one pool
#: window or socket buffer's worth, so the close comes while most of it is
#: still on its way.
ANSWER = bytes(range(256)) * (1536 * 4)  # 1.5 MiB


class MuxTarget(Protocol):
    """The exit's target.  A connection's first byte says what it is:
    ``S`` never reads again, ``F`` floods (sends for as long as it may),
    ``A`` answers (:data:`ANSWER`) and hangs up at once, as an HTTP server
    does after a ``Connection: close`` response, ``U`` keeps what follows
    (in ``uploaded``) until the other side closes; anything else echoes.
    Every connection is kept in ``factory.connections``."""

    def connectionMade(self) -> None:
        self.kind: Optional[bytes] = None
        self.uploaded: list[bytes] = []
        self.sender: Optional[PushSender] = None
        self.lost: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        if self.kind is None:
            self.kind = data[:1]
            if self.kind == b"S":
                self.transport.pauseProducing()
                return
            if self.kind == b"F":
                self.sender = PushSender(self.transport)
                return
            if self.kind == b"A":
                self.transport.write(ANSWER)
                self.transport.loseConnection()
                return
            if self.kind == b"U":
                self.uploaded.append(data[1:])
                return
        if self.kind == b"U":
            self.uploaded.append(data)
            return
        if self.kind not in (b"S", b"F"):
            self.transport.write(data)

    def connectionLost(self, reason=None) -> None:
        if self.sender is not None:
            self.sender.stopProducing()
        if not self.lost.called:
            self.lost.callback(None)


#: Most bytes a stalled path may take: socket buffers along the way (several
#: MiB each on loopback) plus the pools' windows -- 10 to 15 MiB were taken
#: here; without back-pressure the sender never stops at all.
TAKEN_LIMIT = 32 * MiB
#: Most a stopped sender may still push in half a second, and most the
#: process may grow meanwhile (nothing and a few KiB were seen here).
HOLD_GROWTH = 4 * MiB
RSS_GROWTH = 8 * MiB


class _PairMixin(_Mixin):
    async def _pair(self, flow: str, query: str, target_port: int, suffix: str = ""):
        """Server + client for ``flow`` with the exit dialling ``target_port``;
        returns (server, client, entry port)."""
        self.tunnel_port = free_port()
        entry = free_port()
        if flow == "-":
            server = await self.start_server(f"127.0.0.1:{entry}", f"&mode=1{query}", name="server" + suffix, key=KEY)
            client = await self.start_client(f"127.0.0.1:{target_port}", name="client" + suffix, min_size=4, key=KEY)
        else:
            server = await self.start_server(f"127.0.0.1:{target_port}", f"&mode=2{query}", name="server" + suffix,
                                             key=KEY)
            client = await self.start_client(f"127.0.0.1:{entry}", name="client" + suffix, min_size=4, key=KEY)
        self.assertEqual(server.runner.generation, "1.14")
        return server, client, entry

    def _target(self):
        port, factory = listen_tcp(MuxTarget)
        self.addCleanup(port.stopListening)
        return port.getHost().port, factory


class FlowControlPerType(_PairMixin, unittest.TestCase):
    """SPEC-1.14 §4.3-§4.5 with SPEC §5's back-pressure: nothing in a
    tunnel of type 1, 2 or 3 buffers without bound."""

    async def _pushes_back(self, query: str, pool_type: int) -> None:
        """Upload: a target that never reads pauses the user's sender within
        a bounded time, after a bounded number of bytes, and it stays
        paused while the process does not grow.  Meanwhile another user's
        echo flows (no head-of-line blocking on a shared QUIC or HTTP/2
        connection).  Download: a user who never reads pauses the flooding
        target the same way; once the user reads again the bytes flow."""
        tport, factory = self._target()
        server, client, entry = await self._pair("-", query, tport)
        self.assertEqual((server.runner.pool_type, client.runner.pool_type), (pool_type, pool_type))

        up = await self._user(entry)
        up.transport.write(b"S")
        sender = PushSender(up.transport)
        self.addCleanup(sender.stopProducing)
        await wait_for(lambda: sender.paused, timeout=10, what="the user's sender pushed back")
        taken = await settled(lambda: sender.written, "the user's sender")
        rss = rss_bytes()
        await sleep(0.5)
        self.assertLess(sender.written - taken, HOLD_GROWTH)
        self.assertLess(rss_bytes() - rss, RSS_GROWTH)
        self.assertLess(taken, TAKEN_LIMIT)

        payload = b"E" + os.urandom(300_000)
        echo = await self._user(entry)
        echo.transport.write(payload)
        self.assertEqual(await echo.wait_bytes(len(payload)), payload)
        await close(echo)

        down = await self._user(entry)
        down.transport.pauseProducing()  # this user reads nothing
        down.transport.write(b"F")
        await wait_for(lambda: any(t.kind == b"F" and t.sender is not None and t.sender.paused
                                   for t in factory.connections), timeout=10, what="the flooding target pushed back")
        flood = next(t.sender for t in factory.connections if t.kind == b"F")
        sent = await settled(lambda: flood.written, "the flooding target")
        rss = rss_bytes()
        await sleep(0.5)
        self.assertLess(flood.written - sent, HOLD_GROWTH)
        self.assertLess(rss_bytes() - rss, RSS_GROWTH)
        self.assertLess(sent, TAKEN_LIMIT)
        down.transport.resumeProducing()
        await down.wait_bytes(sent // 2, timeout=20)  # it flows again
        self.assertEqual((server.stats.tcps, client.stats.tcps), (2, 2))
        down.transport.abortConnection()
        await wait_for(lambda: (server.stats.tcps, client.stats.tcps) == (1, 1), what="the download's slots released")
        # (Not so the stalled upload: while the tunnel pushes back nothing
        # reads its user's socket, so the reset goes unseen and both ends
        # keep its slot until a read timeout -- Go's relay blocks the same way.)
        sender.stopProducing()
        up.transport.abortConnection()
        self.quiet("server")
        self.quiet("client")

    @d
    async def test_quic_type1(self):
        """Type 1 (QUIC, tls 1): a paused stream stops widening its window,
        and other streams of the one QUIC connection keep flowing."""
        await self._pushes_back("&type=1", 1)

    @d
    async def test_websocket_type2_ws(self):
        """Type 2 (ws://): a paused WebSocket stops reading its TCP
        connection, and a paused writer waits for its socket buffer."""
        await self._pushes_back("&type=2&tls=0", 2)

    @d
    async def test_http2_type3(self):
        """Type 3 (HTTP/2, tls 1): a paused stream stops crediting its
        window, and other streams of the one connection keep flowing."""
        await self._pushes_back("&type=3", 3)


class ClosesPerType(_PairMixin, unittest.TestCase):
    """SPEC-1.14 §4.3-§4.5: a close at either end of a relayed connection
    reaches the other end, for both flows."""

    async def _closes(self, queries: dict[str, str]) -> None:
        """For each flow: the user closes -> the exit's target connection
        closes; the target closes -> the user gets EOF (with type 3 this is
        the END_STREAM a Go server would not send); both ends free their
        slots."""
        for flow, query in queries.items():
            suffix = "+" if flow == "+" else "-"
            tport, factory = self._target()
            server, client, entry = await self._pair(flow, query, tport, suffix)

            user = await self._user(entry)
            user.transport.write(b"E-one")
            self.assertEqual(await user.wait_bytes(5), b"E-one")
            target = factory.connections[-1]
            await close(user)
            await within(target.lost, f"the exit's target closed after its user left (flow {flow})")

            user = await self._user(entry)
            user.transport.write(b"E-two")
            self.assertEqual(await user.wait_bytes(5), b"E-two")
            target = factory.connections[-1]
            self.assertFalse(target.lost.called)
            target.transport.loseConnection()
            await within(user.lost, f"EOF for the user after its target left (flow {flow})")
            self.assertEqual(user.data(), b"E-two")

            await wait_for(lambda: server.stats.tcps == 0 and client.stats.tcps == 0, what=f"slots released ({flow})")
            self.quiet("server" + suffix)
            self.quiet("client" + suffix)

    @d
    async def test_quic_type1_both_flows(self):
        """Type 1: FIN / STOP_SENDING on a stream reach the far end both ways."""
        await self._closes({"-": "&type=1", "+": "&type=1"})

    @d
    async def test_websocket_type2_ws_and_wss(self):
        """Type 2: the Close handshake reaches the far end both ways, over
        ws:// (flow "-") and wss:// (flow "+")."""
        await self._closes({"-": "&type=2&tls=0", "+": "&type=2&tls=1"})

    @d
    async def test_http2_type3_both_flows(self):
        """Type 3: END_STREAM (from the client, and from our server where a
        Go server sends nothing) reaches the far end both ways."""
        await self._closes({"-": "&type=3", "+": "&type=3"})


class AnswerAndHangUpPerType(_PairMixin, unittest.TestCase):
    """SPEC §5 / SPEC-1.14 §4: a target that answers and closes in the same
    breath (an HTTP server after ``Connection: close``) gets every byte of
    its answer to the user, then EOF, over every pool type and both flows;
    and so does a user that uploads and closes at once, to its target.
    The close travels behind the data (FIN, END_STREAM, Close frame); it
    must not overtake or void it."""

    async def _answered(self, query: str) -> None:
        for flow in ("-", "+"):
            tport, factory = self._target()
            suffix = "+" if flow == "+" else "-"
            server, client, entry = await self._pair(flow, query, tport, suffix)
            for i in range(3):
                user = await self._user(entry)
                user.transport.write(b"A-%d" % i)
                got = await within(user.lost, f"the user's EOF after the answer ({query}, flow {flow}, #{i})")
                self.assertEqual(len(got), len(ANSWER), f"{query}, flow {flow}, #{i}: bytes lost")
                self.assertEqual(got, ANSWER)
            for i in range(3):
                user = await self._user(entry)
                user.transport.write(b"U" + ANSWER)
                user.transport.loseConnection()  # after the bytes, at once
                await wait_for(lambda: len(factory.connections) == 4 + i, what=f"the upload's target ({query}, {flow})")
                target = factory.connections[-1]
                await within(target.lost, f"the target's EOF after the upload ({query}, flow {flow}, #{i})")
                up = b"".join(target.uploaded)
                self.assertEqual(len(up), len(ANSWER), f"upload {query}, flow {flow}, #{i}: bytes lost")
                self.assertEqual(up, ANSWER)
            await wait_for(lambda: server.stats.tcps == 0 and client.stats.tcps == 0, what=f"slots released ({flow})")
            self.quiet("server" + suffix)
            self.quiet("client" + suffix)

    @d
    async def test_tcp_type0_plain_and_tls(self):
        await self._answered("&type=0&tls=0")
        await self._answered("&type=0&tls=1")

    @d
    async def test_quic_type1(self):
        await self._answered("&type=1")

    @d
    async def test_websocket_type2_ws_and_wss(self):
        await self._answered("&type=2&tls=0")
        await self._answered("&type=2&tls=1")

    @d
    async def test_http2_type3(self):
        await self._answered("&type=3")


class NoGarbagePerType(_PairMixin, unittest.TestCase):
    """Relayed connections over the stream pools are freed by reference
    counting at both ends: nothing of theirs (pool connections, WebSocket
    streams, TLS layers, the fast TLS path's closures) is left for the
    garbage collector, whose work would otherwise grow with the rate of
    short connections."""

    async def _no_garbage(self, query: str) -> None:
        tport, _factory = self._target()
        server, client, entry = await self._pair("-", query, tport)

        async def exchanges(n: int) -> None:
            for i in range(n):
                user = await self._user(entry)
                word = b"G-%d" % i
                user.transport.write(word)
                self.assertEqual(await user.wait_bytes(len(word)), word)
                await close(user)
            self.conns.clear()
            await wait_for(lambda: server.stats.tcps == 0 and client.stats.tcps == 0, what="slots released")

        await exchanges(3)  # (module-level caches filled)
        with collector_off():
            await exchanges(8)
            await sleep(0.2)  # the closes' own turns (WebSocket Close, TLS close_notify)
            left = garbage_of_ours()
        self.assertEqual(left, [], garbage_names(left))

    @d
    async def test_websocket_type2_wss(self):
        await self._no_garbage("&type=2&tls=1")

    @d
    async def test_websocket_type2_ws(self):
        await self._no_garbage("&type=2&tls=0")

    @d
    async def test_http2_type3(self):
        """One TLS connection carries every stream: what a relayed
        connection leaves is its stream and its pool ends."""
        await self._no_garbage("&type=3")

    @d
    async def test_quic_type1(self):
        """One QUIC connection carries every stream: what a relayed
        connection leaves is its stream and its pool ends."""
        await self._no_garbage("&type=1")


# -- 6: abuse on the tunnel port of running type-2 and type-3 tunnels -----------------


class AbuseOnStreamPoolPorts(_PairMixin, unittest.TestCase):
    @d
    async def test_strangers_and_garbage_do_not_disturb_type2_and_type3(self):
        """SPEC-1.14 §3.2.1/§4.4/§4.5 and our own stranger rules, with a
        type-2 (ws://) and a type-3 tunnel running: garbage on either port
        is refused and closed (a half-open TLS hello within the handshake
        timeout); a stalled half upgrade and a stalled half HTTP/2 preface
        are held; a WebSocket upgrade from 127.0.0.2 without the token gets
        ``403`` and a WARN ``Tunnel access denied`` (with the token it is
        accepted: the refusal is about the token); HTTP/2 requests from
        127.0.0.2 get ``403 unauthorized`` per request.  Throughout, a
        user's open connection and new ones keep flowing through both
        tunnels, and neither server restarts or logs ``Server error``."""
        ws_target, _ = self._target()
        h2_target, _ = self._target()
        ws_server, _, ws_entry = await self._pair("-", "&type=2&tls=0", ws_target, "-ws")
        ws_port = self.tunnel_port
        h2_server, _, h2_entry = await self._pair("-", "&type=3", h2_target, "-h2")
        h2_port = self.tunnel_port
        runners = (ws_server.runner, h2_server.runner)
        lives = [await self._user(ws_entry), await self._user(h2_entry)]
        rounds = [0]

        async def still_flowing() -> None:
            rounds[0] += 1
            for entry, live in zip((ws_entry, h2_entry), lives):
                msg = b"E%d" % rounds[0] if live.received == 0 else b"-%d" % rounds[0]
                before = live.received
                live.transport.write(msg)
                await live.wait_bytes(before + len(msg))
                fresh = await self._user(entry)
                fresh.transport.write(b"E-fresh")
                self.assertEqual(await fresh.wait_bytes(7), b"E-fresh")
                await close(fresh)

        await still_flowing()

        # -- the WebSocket port --------------------------------------------------
        garbage = await dial(ws_port, Raw)
        self.conns.append(garbage)
        garbage.transport.write(b"\x00\x01\x02\xfe\xff" * 2000)  # no line end: a head too large
        await within(garbage.lost, "garbage refused and closed")
        self.assertTrue(garbage.raw.startswith(b"HTTP/1.1 431 "), garbage.raw[:60])
        junk = await dial(ws_port, Raw)
        self.conns.append(junk)
        junk.transport.write(b"\x16\x03\x01 no HTTP at all\r\n\r\n")
        await within(junk.lost, "junk refused and closed")
        self.assertTrue(junk.raw.startswith(b"HTTP/1.1 400 "), junk.raw[:60])
        half_upgrade = await dial(ws_port, Raw)
        self.conns.append(half_upgrade)
        half_upgrade.transport.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upg")
        stranger = await dial(ws_port, GoWS, source="127.0.0.2")
        self.conns.append(stranger)
        stranger.upgrade(new_ws_key())
        await wait_for(lambda: stranger.head is not None, what="an answer to the stranger's upgrade")
        self.assertTrue(stranger.head.startswith(b"HTTP/1.1 403 Forbidden\r\n"), stranger.head)
        await within(stranger.lost, "the refused stranger closed")
        self.assertTrue(stranger.raw.endswith(b"\r\n\r\nunauthorized\n"), stranger.raw[-60:])
        denied = [x for x in self.lines["server-ws"] if "Tunnel access denied: 127.0.0.2:" in x]
        self.assertTrue(denied and all("  WARN  " in x for x in denied), denied)
        bearer = await dial(ws_port, GoWS, source="127.0.0.2")
        self.conns.append(bearer)
        bearer.upgrade(new_ws_key(), auth="Bearer " + TOKEN)
        await wait_for(lambda: bearer.frames, what="the ID for an upgrade with the token")
        self.assertTrue(bearer.head.startswith(b"HTTP/1.1 101 "))
        pid = bearer.pool_id
        self.assertNotEqual(pid, ZERO_ID.hex())
        await wait_for(lambda: pid in ws_server.runner.pool.idle, what="the proxied WebSocket pooled")
        bearer.transport.abortConnection()
        await wait_for(lambda: pid not in ws_server.runner.pool.idle, what="it left the pool when it went")
        await still_flowing()

        # -- the HTTP/2 port -----------------------------------------------------
        not_tls = await dial(h2_port, Raw)
        self.conns.append(not_tls)
        not_tls.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(300))
        await within(not_tls.lost, "plain bytes on the TLS port closed")
        half_hello = await dial(h2_port, Raw)
        self.conns.append(half_hello)
        half_hello.transport.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello, cut short
        await within(half_hello.lost, "a cut-short ClientHello dropped", timeout=4 * FAST.handshake_timeout)
        half_preface = await dial(h2_port, Raw, tls=_alpn_client_options())
        self.conns.append(half_preface)
        half_preface.transport.write(H2_PREFACE[:10])
        foreign = await dial(h2_port, GoH2, source="127.0.0.2", tls=_alpn_client_options())
        self.conns.append(foreign)
        await within(foreign.shaken, "the foreign TLS handshake")
        refused = [foreign.open(), foreign.open()]
        await wait_for(lambda: all(s.ended for s in refused), what="both foreign requests answered")
        for s in refused:
            self.assertEqual(s.status, b"403")
            self.assertEqual(b"".join(s.data), b"unauthorized\n")
        self.assertFalse(any(s.data and s.data[0] == ZERO_ID for s in refused))
        await still_flowing()

        # the stalled halves are held (within Go's 10 s limits), disturbing nothing
        self.assertFalse(half_upgrade.lost.called)
        self.assertFalse(half_preface.lost.called)
        for svc, runner in zip((ws_server, h2_server), runners):
            self.assertIs(svc.runner, runner)
            self.assertFalse(runner.control.broken)
        for name in ("server-ws", "server-h2", "client-ws", "client-h2"):
            self.quiet(name)


# -- 7: the 1.14 QUIC pool on the wire --------------------------------------------------


class Quic114Wire(_Mixin, unittest.TestCase):
    @d
    async def test_first_stream_is_control_one_connection_alpn(self):
        """SPEC-1.14 §4.3 (type 1): the first stream our client opens (QUIC
        stream 0) carries our one byte ``00`` and gets ``00000000``: it is
        both sides' control channel; later streams get random IDs; a pool
        of 140 streams (more than the 128 a 1.12 connection takes, so a
        1.12 client would open a second connection for it) runs on exactly
        one QUIC connection, with ALPN ``np-quic`` on both ends."""
        first_bytes: list[tuple[Any, bytes]] = []
        original = server_module.QuicPoolStream.dataReceived

        def spy(stream, data):
            if stream.state is PortState.NEW:
                first_bytes.append((stream, bytes(data)))
            return original(stream, data)

        self.patch(server_module.QuicPoolStream, "dataReceived", spy)
        tport, _ = self.echo_targets()
        self.tunnel_port = free_port()
        entry = free_port()
        server = await self.start_server(f"127.0.0.1:{entry}", "&mode=1&type=1&max=200", key=KEY)
        client = await self.start_client(f"127.0.0.1:{tport}", key=KEY, min_size=140)
        self.assertTrue(self.logged("server", "Sending tunnel config: FLOW=-|MAX=200|TLS=1|TYPE=1"))
        control = client.runner.control_conn
        self.assertEqual(control.pool_id, "00000000")
        self.assertEqual(control.transport.stream_id, 0)
        await wait_for(lambda: client.runner.pool.idle_count() >= 139, timeout=10, what="a pool of 140 streams")

        stream0, data0 = first_bytes[0]
        self.assertEqual(stream0.transport.stream_id, 0)
        self.assertEqual(data0[:1], b"\x00")
        self.assertEqual(stream0.pool_id, "00000000")
        others = [s.pool_id for s, _ in first_bytes[1:]]
        self.assertTrue(others and "00000000" not in others)
        self.assertTrue(all(data[:1] == b"\x00" for _, data in first_bytes))

        sessions = client.runner.quic_client.sessions
        self.assertEqual(len(sessions), 1)
        self.assertEqual(len(server.runner.quic_server.sessions), 1)
        self.assertEqual(sessions[0].conn.tls.alpn_negotiated, "np-quic")
        self.assertEqual(next(iter(server.runner.quic_server.sessions)).conn.tls.alpn_negotiated, "np-quic")
        user = await self._user(entry)
        user.transport.write(b"over the one connection")
        self.assertEqual(await user.wait_bytes(23), b"over the one connection")
        self.assertEqual(len(client.runner.quic_client.sessions), 1)
        self.quiet("server")
        self.quiet("client")
