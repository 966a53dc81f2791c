"""A connection on the server's tunnel port (SPEC §3.2, §4; SPEC-1.14
§3.2, §3.3), as a state machine.

Everything that reaches the tunnel port's TCP listener is one of: a 1.12
client's handshake, which then carries the control channel; a 1.14
client's HTTP handshake request, answered and closed; a "what is my IP"
HTTP probe; a pool connection of the connected client (TLS first when
``tls>=1``; with 1.14 the first one becomes the control channel); or a
stranger to turn away.  Which one is decided by who connects and what it
sends (the generation by the first bytes: :func:`nodepass.wire.v114.sniff`),
so each connection runs :class:`TunnelPortMachine`, whose moves are::

    NEW        --NEWCOMER------> SNIFFING    handshake timer
    NEW        --POOL_PEER-----> POOLED      the pool writes the ID
    NEW        --POOL_PEER_TLS-> POOL_TLS    startTLS, handshake timer
    NEW        --POOL_FULL-----> CLOSED
    NEW        --STREAM_HOST---> DELEGATED   1.14 WebSocket/HTTP-2 pool: its own protocol reads
    NEW        --STREAM_HOST_TLS-> STREAM_TLS  the same, after startTLS (handshake timer)
    STREAM_TLS --TLS_DONE------> DELEGATED
    SNIFFING   --KEY_ACCEPTED--> CONTROL     1.12: answered; the channel is on probation
    SNIFFING   --REQUEST_114---> HTTP_114    1.14: reading the request head
    SNIFFING   --HTTP_PROBE, DENIED, TIMEOUT, RIVAL_WON--> CLOSED
    HTTP_114   --ANSWERED, DENIED, TIMEOUT, RIVAL_WON--> CLOSED
    POOL_TLS   --TLS_DONE------> POOLED
    POOL_TLS   --TIMEOUT, CANDIDATE_DROPPED--> CLOSED
    POOLED     --CONTROL_READY-> CONTROL     1.14: the first pool connection, ID 00000000
    POOLED     --STRAY---------> SNIFFING    bytes no launch claims: judged anew
    POOLED     --POOL_REFUSED--> CLOSED
    any        --LOST----------> CLOSED      (SHUTDOWN closes or aborts, in place)

:class:`TunnelPortProtocol` is the thin Twisted side: it turns Twisted's
callbacks into inputs and performs the machine's I/O.  Once a pool
connection is a relay end its bytes go straight to the relay, past the
machine: that is the per-chunk path.  The machine reaches the server
runner only through :class:`PortOwner`; the runner reaches a connection
only through the machine's inputs (:meth:`~TunnelPortMachine.rival_won`,
:meth:`~TunnelPortMachine.candidate_dropped`,
:meth:`~TunnelPortMachine.shutdown`).  See :mod:`nodepass.modes.machine`
for why a table rather than ``automat``.
"""

from __future__ import annotations

import weakref
from enum import Enum, auto
from typing import Any, ClassVar, Optional, Protocol

import attrs
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from nodepass.base.kinds import Flow, Wire
from nodepass.base.logs import NodeLog
from nodepass.base.timers import ClockLike
from nodepass.compat.twisted_tls import start_tls, tls_layer
from nodepass.modes.dualend import PoolEnd, addr_text
from nodepass.relay.core import no_delay
from nodepass.relay.tls_fast import release_tls
from nodepass.modes.machine import Table, TableMachine
from nodepass.wire import codec, v114
from nodepass.wire.codec import Codec, CodecError
from nodepass.wire.control import ControlChannel

#: Most bytes of an HTTP probe request we read before answering anyway.
MAX_PROBE = 8192


class PortState(Enum):
    NEW = "new"  # accepted; Twisted has not called connectionMade yet
    SNIFFING = "sniffing"  # a newcomer: its first bytes decide, within NP_HANDSHAKE_TIMEOUT
    POOL_TLS = "pool-tls"  # from the client's IP: TLS handshake under way (same time limit)
    HTTP_114 = "http-1.14"  # a 1.14 handshake request: its head is being read
    POOLED = "pooled"  # a pool connection with its ID: idle in the pool, or a relay end
    STREAM_TLS = "stream-tls"  # a stream-pool connection: TLS handshake under way
    DELEGATED = "delegated"  # a stream-pool connection: the pool transport's protocol reads it
    CONTROL = "control"  # the tunnel's control channel
    CLOSED = "closed"  # answered, refused or lost: nothing left to decide


class PortInput(Enum):
    # What the runner says a new connection may be (see Admission).
    NEWCOMER = auto()
    POOL_PEER = auto()
    POOL_PEER_TLS = auto()
    POOL_FULL = auto()
    STREAM_HOST = auto()
    STREAM_HOST_TLS = auto()
    # Twisted's events.
    TLS_DONE = auto()  # the pool connection's TLS handshake completed
    DATA = auto()  # bytes no relay takes (yet)
    LOST = auto()  # connectionLost
    # What the machine made of the bytes.
    HTTP_PROBE = auto()  # the first bytes are an HTTP request
    KEY_ACCEPTED = auto()  # the first line decodes to our key and no client holds the tunnel
    REQUEST_114 = auto()  # the first bytes are a 1.14 handshake request (or must be: wire=1.14)
    ANSWERED = auto()  # the 1.14 request was answered (200 or an error status)
    CONTROL_READY = auto()  # 1.14: the runner made this pool connection the control channel
    DENIED = auto()  # a key line refused, or no line at all
    STRAY = auto()  # bytes on an idle pool connection that no launch claims
    POOL_REFUSED = auto()  # the pool would not take the connection
    TIMEOUT = auto()  # the current state's timer ran out
    # What the runner tells every connection.
    RIVAL_WON = auto()  # another client's handshake won
    CANDIDATE_DROPPED = auto()  # the control candidate never worked and is gone
    SHUTDOWN = auto()  # the runner stops


class Admission(Enum):
    """The runner's verdict on a new connection, from its source IP."""

    NEWCOMER = auto()  # anyone but the connected client: judge its first bytes
    POOL = auto()  # the client's pool connection (tls=0)
    POOL_TLS = auto()  # the client's pool connection, TLS first
    POOL_FULL = auto()  # the client's, but the pool already holds max idle connections
    STREAM_HOST = auto()  # a connection of a 1.14 stream pool (WebSocket, HTTP/2), plain
    STREAM_HOST_TLS = auto()  # the same, TLS first


class Adopted(Enum):
    """What the runner made of a pool connection it was handed."""

    POOLED = auto()  # idle in the pool, its random ID written
    CONTROL = auto()  # 1.14: ID 00000000 written, it carries the control channel
    REFUSED = auto()  # stopping, pool full or a duplicate ID


_S, _I = PortState, PortInput  # short names for the table

_ADMISSION_INPUT = {
    Admission.NEWCOMER: PortInput.NEWCOMER,
    Admission.POOL: PortInput.POOL_PEER,
    Admission.POOL_TLS: PortInput.POOL_PEER_TLS,
    Admission.POOL_FULL: PortInput.POOL_FULL,
    Admission.STREAM_HOST: PortInput.STREAM_HOST,
    Admission.STREAM_HOST_TLS: PortInput.STREAM_HOST_TLS,
}


@attrs.frozen
class PortSettings:
    """What every tunnel-port connection of one server reads: built once
    per start, shared by all of them."""

    clock: ClockLike
    log: NodeLog
    codec: Codec
    handshake_timeout: float
    pool_get_timeout: float
    #: Which generations the port serves (``wire=``): AUTO tells them apart.
    wire: Wire = Wire.AUTO


class PortOwner(Protocol):
    """What a tunnel-port connection needs from the server runner.

    A ``typing.Protocol`` rather than a ``zope.interface.Interface``: mypy
    checks the runner against it structurally, which it cannot do for zope
    interfaces without a plugin, and a test's fake owner needs no
    declaration."""

    @property
    def flow(self) -> Optional[Flow]: ...

    def admit(self, port: TunnelPortMachine, peer_host: str) -> Admission:
        """A new connection from ``peer_host``: track it (until
        :meth:`forget`) and say what it may be."""

    def forget(self, port: TunnelPortMachine) -> None:
        """The connection is gone."""

    def tls_context(self) -> Any:
        """The server context factory for a pool connection's ``startTLS``."""

    def adopt(self, conn: PoolEnd) -> Adopted:
        """Put a pool connection in the pool (it writes the ID), or make it
        the 1.14 control connection."""

    def pool_control(self, port: TunnelPortMachine) -> ControlChannel:
        """The control channel on the 1.14 control connection ``port``."""

    def accept_request(self, port: TunnelPortMachine) -> bool:
        """A valid 1.14 handshake request: answer it (True), or False when a
        client already holds the tunnel (closed without an answer)."""

    def stream_host(self, port: TunnelPortMachine) -> Any:
        """The protocol of the 1.14 stream pool (WebSocket upgrade, HTTP/2
        connection) that reads this connection from now on."""

    def is_idle(self, conn: PoolEnd) -> bool:
        """Whether ``conn`` sits idle in the pool: no launch took it."""

    def unpool(self, conn: PoolEnd) -> None:
        """Take an idle ``conn`` out of the pool: it is not a pool connection."""

    def tunnel_taken(self) -> bool:
        """Whether a client already holds the tunnel."""

    def accept_control(self, port: TunnelPortMachine) -> ControlChannel:
        """Answer the handshake and make ``port`` the control channel."""


class TunnelPortMachine(TableMachine[PortState, PortInput]):
    """The life of one tunnel-port connection; see the module docstring."""

    __slots__ = ("conn", "owner", "settings", "channel", "_buf", "delegate")

    def __init__(self, conn: TunnelPortProtocol, owner: PortOwner, settings: PortSettings):
        super().__init__(self.TABLE, PortState.NEW, settings.clock)
        self.conn = conn
        self.owner = owner
        self.settings = settings
        self.channel: Optional[ControlChannel] = None  # once this is the control connection
        self._buf = b""
        self.delegate: Any = None  # the stream pool's protocol, once DELEGATED

    # -- what the runner reads -------------------------------------------
    @property
    def peer(self) -> str:
        """``ip:port`` of the peer, for log lines."""
        return self.conn.peer

    @property
    def transport(self) -> Any:
        """The connection's transport (the control channel is written on it)."""
        return self.conn.transport

    # -- inputs: from the protocol ----------------------------------------
    def connected(self) -> None:
        self._fire(_ADMISSION_INPUT[self.owner.admit(self, self.conn.peer_host)])

    def tls_done(self) -> None:
        self._fire(PortInput.TLS_DONE)

    def data(self, data: bytes) -> None:
        self._fire(PortInput.DATA, data)

    def lost(self, reason: Failure) -> None:
        self._fire(PortInput.LOST, reason)

    # -- inputs: from the runner ------------------------------------------
    def rival_won(self) -> None:
        """Another client's handshake won: a handshake in flight loses."""
        self._fire(PortInput.RIVAL_WON)

    def candidate_dropped(self) -> None:
        """The control candidate is gone: a pool connection half-way
        through TLS is not ours to keep."""
        self._fire(PortInput.CANDIDATE_DROPPED)

    def shutdown(self) -> None:
        """The runner stops: the control connection is closed cleanly,
        everything else aborted."""
        self._fire(PortInput.SHUTDOWN)

    # -- outputs ----------------------------------------------------------
    def _start_sniffing(self) -> None:
        self._start_timer(self.settings.handshake_timeout, PortInput.TIMEOUT)

    def _start_tls(self) -> None:
        self.conn.start_tls(self.owner.tls_context())
        self._start_timer(self.settings.handshake_timeout, PortInput.TIMEOUT)

    def _register(self) -> None:
        adopted = self.owner.adopt(self.conn)
        if adopted is Adopted.CONTROL:
            self._fire(PortInput.CONTROL_READY)
        elif adopted is Adopted.REFUSED:
            self._fire(PortInput.POOL_REFUSED)

    def _close(self) -> None:
        self.conn.close()

    def _abort(self) -> None:
        self.conn.abort()

    def _keep(self, data: bytes) -> None:
        self.conn.keep(data)

    def _sniff(self, data: bytes) -> None:
        """Collect a newcomer's first bytes until they are a 1.14 request,
        another HTTP request (byte 4 a space) or a whole key line."""
        buf = self._buf + data
        self._buf = buf
        wire = self.settings.wire
        if wire is Wire.V114:
            self._fire(PortInput.REQUEST_114)
            return
        if wire is Wire.AUTO:
            generation = v114.sniff(buf)
            if generation is v114.Generation.V114:
                self._fire(PortInput.REQUEST_114)
                return
            if generation is v114.Generation.NEED_MORE and buf.startswith(b"GET "):
                return  # a GET's headers decide
        if len(buf) >= 4 and buf[3:4] == b" ":
            if b"\r\n\r\n" in buf or b"\n\n" in buf or len(buf) > MAX_PROBE:
                self._fire(PortInput.HTTP_PROBE, buf[:3])
            return
        nl = buf.find(b"\n")
        if nl < 0:
            if len(buf) > codec.MAX_LINE:
                self._fire(PortInput.DENIED, "handshake line too long", False)
            return
        self._buf = b""
        self._judge(buf[:nl], buf[nl + 1 :])

    def _judge(self, line: bytes, rest: bytes) -> None:
        key = self.settings.codec
        try:
            got = key.decode(line)
        except CodecError:
            self._fire(PortInput.DENIED, "bad handshake encoding", True)
            return
        if got != key.key:
            self._fire(PortInput.DENIED, "wrong tunnel key", True)
        elif self.owner.tunnel_taken():
            self._fire(PortInput.DENIED, "a client is already connected", True)
        else:
            self._fire(PortInput.KEY_ACCEPTED, rest)

    def _deny(self, why: str, judged: bool) -> None:
        """Refuse this peer.  ``judged``: its handshake line was read and
        refused (wrong key, a client already connected): close cleanly, as a
        Go server does, so a client can tell a real refusal (FIN) from a
        connection lost while a server restarts (reset).  Peers that said
        nothing usable in time are aborted."""
        self.settings.log.warn("Tunnel access denied: %s (%s)", self.conn.peer, why)
        if judged:
            self.conn.close()
        else:
            self.conn.abort()

    def _handshake_timed_out(self) -> None:
        self._deny("handshake timeout", False)

    def _lost_to_rival(self) -> None:
        self._deny("another client won the handshake", True)

    def _answer_probe(self, method: bytes) -> None:
        if method == b"GET":
            body = (self.conn.peer_host + "\n").encode("ascii")
            head = (
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode("ascii")
            self.conn.write(head + body)
        else:
            # The exact bytes a Go NodePass server sends: no body.
            self.conn.write(
                b"HTTP/1.1 405 Method Not Allowed\r\nAllow: GET\r\n"
                b"Content-Length: 0\r\nConnection: close\r\n\r\n"
            )
        # The method is received bytes: named only when it is the one we know.
        what = "GET" if method == b"GET" else "with another method"
        self.settings.log.debug("HTTP probe %s from %s answered", what, self.conn.peer)
        self.conn.close()

    # -- 1.14 ----------------------------------------------------------------
    def _read_request(self, data: bytes = b"") -> None:
        """Read a 1.14 request head (SPEC-1.14 §3.2.3) and answer it."""
        self._buf += data
        got = v114.parse_request(self._buf, self.settings.codec.key)
        if got is v114.NEED_MORE:
            if not self.timer_running:
                self._start_timer(self.settings.handshake_timeout, PortInput.TIMEOUT)
            return
        head = self._buf
        self._buf = b""
        if isinstance(got, v114.Refusal):
            self._fire(PortInput.ANSWERED, got, head.startswith(b"HEAD "))
        else:
            self._fire(PortInput.ANSWERED, None, False)

    def _answer(self, refusal: Optional[v114.Refusal], head_only: bool) -> None:
        if refusal is not None:
            # Go logs nothing here; we say who was turned away and why.
            self.settings.log.warn(
                "Tunnel access denied: %s (1.14 handshake answered %d %s)", self.conn.peer, refusal.status, refusal.reason
            )
            self.conn.write(refusal.answer(v114.http_date(), with_body=not head_only))
            self.conn.close()
            return
        if not self.owner.accept_request(self):
            self.settings.log.warn("Tunnel access denied: %s (a client is already connected)", self.conn.peer)
        self.conn.close()

    def _request_timed_out(self) -> None:
        self._deny("handshake timeout", False)

    # -- stream pools (WebSocket, HTTP/2) ------------------------------------
    def _start_stream_tls(self) -> None:
        self.conn.start_tls(self.owner.tls_context())
        self._start_timer(self.settings.handshake_timeout, PortInput.TIMEOUT)

    def _delegate(self) -> None:
        early = self.conn.take_early()  # bytes that came with the end of TLS
        self.conn.resume_reading()
        proto = self.delegate = self.owner.stream_host(self)
        # Over TLS the stream pool talks to the TLS layer itself, as it would
        # under listenSSL (it reads ALPN and the certificates there).
        transport = self.conn.transport
        proto.makeConnection(tls_layer(transport) or transport)
        if early:
            proto.dataReceived(early)

    def _to_delegate(self, data: bytes) -> None:
        self.delegate.dataReceived(data)

    def _delegate_lost(self, reason: Failure) -> None:
        self.owner.forget(self)
        self.delegate.connectionLost(reason)

    def _become_pool_control(self) -> None:
        self.channel = self.owner.pool_control(self)

    def _become_control(self, rest: bytes) -> None:
        channel = self.channel = self.owner.accept_control(self)
        if rest:
            channel.data_received(rest)

    def _to_channel(self, data: bytes) -> None:
        assert self.channel is not None  # set on entering CONTROL
        self.channel.data_received(data)

    def _tls_timed_out(self) -> None:
        self.settings.log.debug("Pool connection from %s: TLS handshake timed out", self.conn.peer)
        self.conn.abort()

    def _pooled_data(self, data: bytes) -> None:
        conn = self.conn
        if conn.relay is None and self.owner.is_idle(conn):
            if self.owner.flow is Flow.REVERSE:
                # In flow "-" the client never writes on a pool connection
                # before it has been launched: this is not our pool client
                # but someone else on its host (a second client, a probe).
                # Judge it like any newcomer.
                self._fire(PortInput.STRAY, data)
                return
            if not self.timer_running:
                # Flow "+": the client writes right after its launch
                # signal, which may still be on its way.  If no launch
                # claims this connection in time, it was not ours.
                self._start_timer(self.settings.pool_get_timeout, PortInput.TIMEOUT)
        conn.keep(data)

    def _unclaimed(self) -> None:
        conn = self.conn
        if conn.relay is None and self.owner.is_idle(conn):
            self._fire(PortInput.STRAY, conn.take_early())

    def _unpool(self, data: bytes) -> None:
        conn = self.conn
        self.settings.log.debug("Unexpected data on idle pool connection from %s", conn.peer)
        self.owner.unpool(conn)
        conn.resume_reading()  # held as a pool connection
        self._start_timer(self.settings.handshake_timeout, PortInput.TIMEOUT)
        self._sniff(data)

    def _lost(self, reason: Failure) -> None:
        self.owner.forget(self)

    def _control_lost(self, reason: Failure) -> None:
        self.owner.forget(self)
        assert self.channel is not None  # set on entering CONTROL
        self.channel.connection_lost("control connection lost: " + (reason.getErrorMessage() or "closed"))

    # -- the table --------------------------------------------------------
    # (state, input) -> (next state, output).  A pair not listed means the
    # input is nothing to act on in that state (a late timer, bytes after
    # we closed); tests/test_machines.py walks every pair.
    TABLE: ClassVar[Table[PortState, PortInput]] = {
        (_S.NEW, _I.NEWCOMER): (_S.SNIFFING, _start_sniffing),
        (_S.NEW, _I.POOL_PEER): (_S.POOLED, _register),
        (_S.NEW, _I.POOL_PEER_TLS): (_S.POOL_TLS, _start_tls),
        (_S.NEW, _I.POOL_FULL): (_S.CLOSED, _close),
        (_S.NEW, _I.LOST): (_S.CLOSED, _lost),
        (_S.SNIFFING, _I.DATA): (_S.SNIFFING, _sniff),
        (_S.SNIFFING, _I.HTTP_PROBE): (_S.CLOSED, _answer_probe),
        (_S.SNIFFING, _I.KEY_ACCEPTED): (_S.CONTROL, _become_control),
        (_S.SNIFFING, _I.REQUEST_114): (_S.HTTP_114, _read_request),
        (_S.HTTP_114, _I.DATA): (_S.HTTP_114, _read_request),
        (_S.HTTP_114, _I.ANSWERED): (_S.CLOSED, _answer),
        (_S.HTTP_114, _I.TIMEOUT): (_S.CLOSED, _request_timed_out),
        (_S.HTTP_114, _I.RIVAL_WON): (_S.CLOSED, _close),
        (_S.HTTP_114, _I.SHUTDOWN): (_S.HTTP_114, _abort),
        (_S.HTTP_114, _I.LOST): (_S.CLOSED, _lost),
        (_S.SNIFFING, _I.DENIED): (_S.CLOSED, _deny),
        (_S.SNIFFING, _I.TIMEOUT): (_S.CLOSED, _handshake_timed_out),
        (_S.SNIFFING, _I.RIVAL_WON): (_S.CLOSED, _lost_to_rival),
        (_S.SNIFFING, _I.SHUTDOWN): (_S.SNIFFING, _abort),
        (_S.SNIFFING, _I.LOST): (_S.CLOSED, _lost),
        (_S.POOL_TLS, _I.TLS_DONE): (_S.POOLED, _register),
        (_S.POOL_TLS, _I.DATA): (_S.POOL_TLS, _keep),
        (_S.POOL_TLS, _I.TIMEOUT): (_S.CLOSED, _tls_timed_out),
        (_S.POOL_TLS, _I.CANDIDATE_DROPPED): (_S.CLOSED, _abort),
        (_S.POOL_TLS, _I.SHUTDOWN): (_S.POOL_TLS, _abort),
        (_S.POOL_TLS, _I.LOST): (_S.CLOSED, _lost),
        (_S.POOLED, _I.POOL_REFUSED): (_S.CLOSED, _close),
        (_S.POOLED, _I.CONTROL_READY): (_S.CONTROL, _become_pool_control),
        (_S.NEW, _I.STREAM_HOST): (_S.DELEGATED, _delegate),
        (_S.NEW, _I.STREAM_HOST_TLS): (_S.STREAM_TLS, _start_stream_tls),
        (_S.STREAM_TLS, _I.TLS_DONE): (_S.DELEGATED, _delegate),
        (_S.STREAM_TLS, _I.DATA): (_S.STREAM_TLS, _keep),
        (_S.STREAM_TLS, _I.TIMEOUT): (_S.CLOSED, _tls_timed_out),
        (_S.STREAM_TLS, _I.SHUTDOWN): (_S.STREAM_TLS, _abort),
        (_S.STREAM_TLS, _I.LOST): (_S.CLOSED, _lost),
        (_S.DELEGATED, _I.DATA): (_S.DELEGATED, _to_delegate),
        (_S.DELEGATED, _I.SHUTDOWN): (_S.DELEGATED, _abort),
        (_S.DELEGATED, _I.LOST): (_S.CLOSED, _delegate_lost),
        (_S.POOLED, _I.DATA): (_S.POOLED, _pooled_data),
        (_S.POOLED, _I.TIMEOUT): (_S.POOLED, _unclaimed),
        (_S.POOLED, _I.STRAY): (_S.SNIFFING, _unpool),
        (_S.POOLED, _I.SHUTDOWN): (_S.POOLED, _abort),
        (_S.POOLED, _I.LOST): (_S.CLOSED, _lost),
        (_S.CONTROL, _I.DATA): (_S.CONTROL, _to_channel),
        (_S.CONTROL, _I.SHUTDOWN): (_S.CONTROL, _close),
        (_S.CONTROL, _I.LOST): (_S.CLOSED, _control_lost),
        (_S.CLOSED, _I.SHUTDOWN): (_S.CLOSED, _abort),
        (_S.CLOSED, _I.LOST): (_S.CLOSED, _lost),
    }


@implementer(IHandshakeListener)
class TunnelPortProtocol(PoolEnd):
    """The Twisted side of a tunnel-port connection: events in, I/O out.

    It is a :class:`PoolEnd` because a pool connection is a relay end once
    a launch takes it; until then its bytes go to the machine."""

    def __init__(self, owner: PortOwner, settings: PortSettings):
        super().__init__()
        self.peer = ""  # ip:port, for log lines
        self.peer_host = ""
        self.machine = TunnelPortMachine(self, owner, settings)

    # -- events -----------------------------------------------------------
    def connectionMade(self) -> None:
        super().connectionMade()
        peer = self.transport.getPeer()
        self.peer, self.peer_host = addr_text(peer), peer.host
        no_delay(self.transport)  # as Go: every tunnel-port connection
        self.machine.connected()

    def handshakeCompleted(self) -> None:
        self.machine.tls_done()

    def dataReceived(self, data: bytes | memoryview) -> None:
        relay = self.relay
        if relay is not None:
            relay.forward(self, data)  # a relay end: the per-chunk path
            return
        delegate = self.machine.delegate
        if delegate is not None:
            # A stream-pool connection (DELEGATED): every WebSocket or
            # HTTP/2 chunk goes straight to its protocol, past the table.
            delegate.dataReceived(data)
            return
        self.machine.data(bytes(data))  # bytes already, unless a relay ran

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        machine = self.machine
        machine.lost(reason)
        PoolEnd.connectionLost(self, reason)
        # A TLS pool connection's TLS layer (startTLS) is in reference
        # cycles with its TCP connection: broken here, once it is gone.
        release_tls(self.transport)
        # The machine (now CLOSED) keeps only a weak reference back: the
        # pair is then freed by reference counting when the protocol goes,
        # not left, one per pool connection, to the garbage collector.
        machine.conn = weakref.proxy(self)

    # -- I/O for the machine ----------------------------------------------
    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def close(self) -> None:
        self.transport.loseConnection()

    def abort(self) -> None:
        self.transport.abortConnection()

    def start_tls(self, context: Any) -> None:
        # Twisted's startTLS, its records sent at once (no write
        # registration per handshake flight, pool ID and close_notify).
        start_tls(self.transport, context)

    def keep(self, data: bytes) -> None:
        """Keep bytes for the relay to come, and stop reading meanwhile."""
        PoolEnd.dataReceived(self, data)

    def resume_reading(self) -> None:
        if self.gate is not None:
            self.gate.resume("splice")
