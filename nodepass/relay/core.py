"""The relay core shared by every mode: two connected protocols spliced
together with streaming producers in both directions.

Flow control is Twisted's own: each end's transport is registered as the
producer of the other end's transport, so when a slow reader lets a write
buffer fill, the transport pauses the *other* socket's reading -- the kernel
then pushes back on the fast writer, and nothing here buffers without bound.
The rate limiter and the pre-splice hold use the same pause mechanism through
:class:`PauseGate`, which counts pause reasons so that they never resume a
socket another reason still wants paused.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Callable, Optional, Protocol as TypingProtocol

from twisted.internet import error
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from nodepass.base.stats import InstanceStats
from nodepass.base.timers import ClockLike, IdleTimer
from nodepass.compat.twisted_fastpath import LeanConnection, forget_handlers
from nodepass.compat.twisted_internals import is_plain_tcp, read_into, write_through

#: Read size and write-buffer high-water mark given to relayed TCP
#: transports (Twisted's ``bufferSize`` is both).  Large reads keep the
#: per-chunk Python cost small next to the bytes moved; the same value bounds
#: what one direction of a pair can hold in user space to about twice this.
RELAY_BUFFER_SIZE = 256 * 1024

# The hot path for plain TCP pairs.  Twisted's own read path allocates a new
# bytes object per read and its write path waits for the next reactor turn
# (and may join buffers, copying again).  Once a pair is spliced, each plain
# TCP end is read into one shared buffer (the reactor runs one read at a
# time, and every byte is sent or copied before the read returns) and written
# straight to the peer's socket when Twisted holds nothing for it
# (``write_through``); only what the socket does not take is copied into
# Twisted's buffer, whose size still drives the producer pause.  TLS and
# other transports use Twisted's paths.  Both shortcuts reach under
# Twisted's API: ``nodepass.compat.twisted_internals`` holds what they use.
_READ_BUFFER = memoryview(bytearray(RELAY_BUFFER_SIZE))


def _read_buffer(size: int) -> memoryview:
    """The shared read buffer, grown once if a transport reads more."""
    global _READ_BUFFER
    if len(_READ_BUFFER) < size:
        _READ_BUFFER = memoryview(bytearray(size))
    return _READ_BUFFER


# How a relay writes to one end: a plain TCP socket is written directly
# (``write_through``); a transport marked ``takes_views`` (the TLS fast
# path of ``nodepass.relay.tls_fast``, which encrypts a chunk before
# returning, or a QUIC stream) is given the view of the shared read buffer as
# is; anything else gets a copy.
_COPY, _PLAIN, _VIEWS, _LEAN = "copy", "plain", "views", "lean"


def _write_mode(transport: Any) -> str:
    if is_plain_tcp(transport):
        return _PLAIN
    if getattr(transport, "takes_views", False):
        return _VIEWS
    return _COPY


class TokenBucket:
    """One bucket of ``rate`` bytes/s shared by every connection of an
    instance, both directions together (SPEC §5).  ``consume`` never blocks:
    it answers how long the caller should pause to stay under the rate."""

    def __init__(self, bytes_per_second: float, clock: ClockLike):
        self.rate = float(bytes_per_second)
        self.capacity = max(self.rate / 20.0, 16384.0)
        self.tokens = self.capacity
        self._clock = clock
        self._stamp = clock.seconds()

    def consume(self, n: int) -> float:
        now = self._clock.seconds()
        self.tokens = min(self.capacity, self.tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        self.tokens -= n
        if self.tokens >= 0:
            return 0.0
        return -self.tokens / self.rate


#: The reasons a :class:`PauseGate` holds a transport paused, one bit each:
#: not spliced yet, the peer's transport full, the rate limit, a splice(2)
#: pipe full.
PAUSE_REASONS = {"splice": 1, "consumer": 2, "rate": 4, "pipe": 8}


@implementer(IPushProducer)
class PauseGate:
    """Pauses a transport's reading for as long as any reason holds.

    The reasons are bits of one integer (:data:`PAUSE_REASONS`): every
    relayed connection pauses and resumes its two ends at least once, and
    a set per end was an allocation and a hash per call for four names."""

    __slots__ = ("_transport", "_reasons")

    def __init__(self, transport: Any):
        self._transport = transport
        self._reasons = 0

    @staticmethod
    def _bit(reason: str) -> int:
        bit = PAUSE_REASONS.get(reason)
        if bit is None:
            raise ValueError(f"unknown pause reason {reason!r} (one of {', '.join(PAUSE_REASONS)})")
        return bit

    def pause(self, reason: str) -> None:
        bit = self._bit(reason)
        if not self._reasons:
            self._transport.pauseProducing()
        self._reasons |= bit

    def resume(self, reason: str) -> None:
        bit = self._bit(reason)
        if self._reasons & bit:
            self._reasons &= ~bit
            if not self._reasons:
                self._transport.resumeProducing()

    def release(self) -> None:
        """Drop every reason and read again: the relay is over, so nothing
        downstream is left to protect.  A closing TLS end must keep reading
        to see the peer's close_notify (or FIN); held paused, it and a peer
        flushing towards it would wait on each other forever."""
        if self._reasons:
            self._reasons = 0
            self._transport.resumeProducing()

    @property
    def paused(self) -> bool:
        return bool(self._reasons)

    # IPushProducer, as seen by the *peer's* transport (its consumer role).
    def pauseProducing(self) -> None:
        self.pause("consumer")

    def resumeProducing(self) -> None:
        self.resume("consumer")

    def stopProducing(self) -> None:
        self._transport.loseConnection()


class RelaySink(TypingProtocol):
    """Where a relay end hands what it reads once it is spliced: a
    :class:`Relay`, a UDP bridge, or the discard of a finished relay."""

    def forward(self, source: "RelayEnd", data: bytes | memoryview) -> None: ...

    def end_lost(self, end: "RelayEnd") -> None: ...


class RelayEnd(Protocol):
    """One side of a relayed pair.

    Before :func:`splice` joins it to a peer, whatever arrives is kept and
    reading is paused (at most one read's worth is held).  After, every chunk
    goes straight to the peer's transport.
    """

    #: A TCP, TLS or QUIC stream transport: the relay uses more of it than
    #: ``ITransport`` declares (producers, ``bufferSize``, ``abortConnection``).
    transport: Any
    relay: Optional[RelaySink] = None
    gate: Optional[PauseGate] = None
    lost_reason: Optional[Failure] = None
    #: A set that holds the end while it is connected (a runner's open
    #: ends): the end leaves it when lost, without a callback per end.
    owner: Optional[set] = None

    #: What arrived before the splice (a list once something did) and who
    #: waits for the loss (a list once someone does): most ends never need
    #: either, so they are not allocated per connection.
    _early: "list[bytes] | tuple[()]" = ()
    _lost_callbacks: "list[Callable[[Failure], None]] | tuple[()]" = ()
    lost = False

    def connectionMade(self) -> None:
        self.gate = PauseGate(self.transport)

    def hold(self) -> None:
        """Stop reading until spliced."""
        assert self.gate is not None, "hold() before connectionMade"
        self.gate.pause("splice")

    def take_early(self) -> bytes:
        data = b"".join(self._early)
        self._early = ()
        return data

    def dataReceived(self, data: bytes | memoryview) -> None:
        relay = self.relay
        if relay is None:
            early = self._early
            if not isinstance(early, list):
                early = self._early = []
            early.append(bytes(data))
            assert self.gate is not None, "data before connectionMade"
            self.gate.pause("splice")
            return
        relay.forward(self, data)

    def on_lost(self, callback: Callable[[Failure], None]) -> None:
        callbacks = self._lost_callbacks
        if not isinstance(callbacks, list):
            callbacks = self._lost_callbacks = []
        callbacks.append(callback)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        self.lost_reason = reason
        owner = self.owner
        if owner is not None:
            owner.discard(self)
        relay = self.relay
        if relay is not None:
            # The end lets go of its relay (and a closed transport of the
            # relay's read handler): no reference cycle is left for the
            # garbage collector.
            self.relay = _DISCARD
            relay.end_lost(self)
            transport = self.transport
            if type(transport) is not LeanConnection:  # a lean one did it
                forget_handlers(transport)
        callbacks, self._lost_callbacks = self._lost_callbacks, ()
        for cb in callbacks:
            cb(reason)


def no_delay(transport: Any) -> None:
    """TCP_NODELAY, as Go sets on every TCP connection: without it small
    writes (signals, request/answer traffic, HTTP/2 and WebSocket frames)
    wait for delayed ACKs.  Walks down wrapping transports (TLS) to the TCP
    one."""
    while transport is not None:
        set_nd = getattr(transport, "setTcpNoDelay", None)
        if set_nd is not None:
            try:
                set_nd(True)
            except OSError:
                pass
            return
        transport = getattr(transport, "transport", None)


def proxy_v1_header(src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    """PROXY protocol v1 line (SPEC §5): ``PROXY TCP4|TCP6 SRC DST SPORT DPORT``.
    Mixed families are written as TCP6 with IPv4-mapped addresses, which
    HAProxy's grammar accepts; unknown addresses give ``PROXY UNKNOWN``."""
    try:
        s = ipaddress.ip_address(src[0].split("%")[0])
        d = ipaddress.ip_address(dst[0].split("%")[0])
    except ValueError:
        return b"PROXY UNKNOWN\r\n"
    if s.version == 4 and d.version == 4:
        fam = "TCP4"
    else:
        fam = "TCP6"
        if s.version == 4:
            s = ipaddress.IPv6Address(f"::ffff:{s}")
        if d.version == 4:
            d = ipaddress.IPv6Address(f"::ffff:{d}")
    return f"PROXY {fam} {s} {d} {src[1]} {dst[1]}\r\n".encode("ascii")


class Relay:
    """A spliced pair.  ``target`` is the target-side end whose bytes the
    instance counts (SPEC §5): RX is what is read from it, TX what is written
    to it.  At a dual-end entry that is the accepted user connection, at an
    exit or in single-end mode the dialled target connection; ``tunnel`` is
    the other end (the pool connection, or in single-end mode the accepted
    user connection).

    With ``idle`` set, each direction has its own read deadline, as Go's
    relay sets one per copying goroutine: when nothing arrived from either
    end for ``idle`` seconds the pair closes with ``i/o timeout``.  Each
    chunk only stores the time in its end's :class:`IdleTimer`."""

    __slots__ = (
        "target",
        "tunnel",
        "stats",
        "limiter",
        "idle",
        "clock",
        "_on_close",
        "_closed",
        "_idle_target",
        "_idle_tunnel",
        "_rate_calls",
        "_through_target",
        "_through_tunnel",
        "outcome",
    )

    def __init__(
        self,
        target: RelayEnd,
        tunnel: RelayEnd,
        stats: InstanceStats,
        clock: ClockLike,
        limiter: Optional[TokenBucket] = None,
        idle: float = 0.0,
        on_close: Optional[Callable[[], None]] = None,
    ):
        self.target = target
        self.tunnel = tunnel
        self.stats = stats
        self.limiter = limiter
        self.idle = idle
        self.clock = clock
        self._on_close = on_close
        self._closed = False
        #: Read deadlines of the two ends (armed by :meth:`start` when
        #: ``idle`` is set).
        self._idle_target: Optional[IdleTimer] = None
        self._idle_tunnel: Optional[IdleTimer] = None
        self._rate_calls: dict[RelayEnd, Any] = {}
        self._through_target = _COPY
        self._through_tunnel = _COPY
        #: How the exchange ended, in Go's words (``Exchange complete: ...``):
        #: ``EOF`` when an end closed cleanly, else the first error.
        self.outcome = ""

    @property
    def closed(self) -> bool:
        """Whether the relay is over (its ends closed or closing)."""
        return self._closed

    def forward(self, source: RelayEnd, data: bytes | memoryview) -> None:
        """Move one chunk (bytes, or a view of the shared read buffer that
        must not outlive this call) from ``source`` to the other end."""
        n = len(data)
        if source is self.target:
            self.stats.tcp_rx += n
            timer = self._idle_target
            if timer is not None:
                timer.last = self.clock.seconds()
            through = self._through_tunnel
            if through is _LEAN:
                self.tunnel.transport.write(data)
            elif through is _PLAIN:
                write_through(self.tunnel.transport, data)
            elif through is _VIEWS:
                self.tunnel.transport.write(data)
            else:
                self.tunnel.transport.write(bytes(data))
        else:
            self.stats.tcp_tx += n
            timer = self._idle_tunnel
            if timer is not None:
                timer.last = self.clock.seconds()
            through = self._through_target
            if through is _LEAN:
                self.target.transport.write(data)
            elif through is _PLAIN:
                write_through(self.target.transport, data)
            elif through is _VIEWS:
                self.target.transport.write(data)
            else:
                self.target.transport.write(bytes(data))
        limiter = self.limiter
        if limiter is not None:
            delay = limiter.consume(n)
            if delay > 0 and not source.lost and not self._closed and source not in self._rate_calls:
                gate = source.gate
                assert gate is not None  # connected ends only
                gate.pause("rate")
                self._rate_calls[source] = self.clock.callLater(delay, self._rate_resume, source)

    def _rate_resume(self, source: RelayEnd) -> None:
        self._rate_calls.pop(source, None)
        gate = source.gate
        assert gate is not None
        gate.resume("rate")

    def _idle_expired(self) -> None:
        if not self._closed:
            self.close("i/o timeout")

    def start(self) -> None:
        """Join the two ends: producers both ways, early bytes flushed,
        reading resumed."""
        a, b = self.target, self.tunnel
        a.relay = self
        b.relay = self
        if a.lost or b.lost:
            self.end_lost(a if a.lost else b)
            return
        a_gate, b_gate = a.gate, b.gate
        assert a_gate is not None and b_gate is not None, "splice of an unconnected end"
        ta, tb = a.transport, b.transport
        ta.registerProducer(b_gate, True)
        tb.registerProducer(a_gate, True)
        forward = self.forward
        modes = []
        for end, t in ((a, ta), (b, tb)):
            if type(t) is LeanConnection and not t.TLS:
                # Read into the shared buffer, straight to ``forward``; its
                # own ``write`` sends at once (and takes views).
                mode = _LEAN
                t.relay_reads(_read_buffer(t.bufferSize), forward, end)
            else:
                mode = _write_mode(t)
                if mode is _PLAIN:
                    read_into(t, _read_buffer(t.bufferSize), forward, end)
            modes.append(mode)
        self._through_target, self._through_tunnel = modes
        if self.idle > 0:
            self._idle_target = IdleTimer(self.clock, self.idle, self._idle_expired)
            self._idle_tunnel = IdleTimer(self.clock, self.idle, self._idle_expired)
        for end in (a, b):
            if end._early:
                forward(end, end.take_early())
        a_gate.resume("splice")
        b_gate.resume("splice")

    def end_lost(self, end: RelayEnd) -> None:
        other = self.tunnel if end is self.target else self.target
        if not other.lost and other.transport is not None:
            _close_end(other)
        self._finish(_outcome(end.lost_reason))

    def close(self, outcome: str = "closed") -> None:
        for end in (self.target, self.tunnel):
            if not end.lost and end.transport is not None:
                _close_end(end)
        self._finish(outcome)

    def _finish(self, outcome: str) -> None:
        if self._closed:
            return
        self._closed = True
        self.outcome = outcome
        for timer in (self._idle_target, self._idle_tunnel):
            if timer is not None:
                timer.cancel()
        self._idle_target = self._idle_tunnel = None
        for call in self._rate_calls.values():
            if call.active():
                call.cancel()
        self._rate_calls.clear()
        if self._on_close is not None:
            cb, self._on_close = self._on_close, None
            cb()


def _outcome(reason: Optional[Failure]) -> str:
    """Go's text for how a relayed connection ended: ``EOF`` for a clean
    close, the error otherwise."""
    if reason is None:
        return "EOF"
    value = reason.value  # isinstance: Failure.check compares class names
    if isinstance(value, error.ConnectionDone):
        return "EOF"
    if isinstance(value, error.ConnectionLost):
        return "read: connection reset by peer"
    return reason.getErrorMessage()


def peer_text(transport: Any) -> str:
    """``ip:port`` of a transport's peer (IPv6 bracketed), for log lines."""
    try:
        peer = transport.getPeer()
        host, port = peer.host, peer.port
    except Exception:  # noqa: BLE001 - a transport without an address
        return "?"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Discard:
    """Where a closing end's late bytes go once its relay is over."""

    def forward(self, source: RelayEnd, data: bytes | memoryview) -> None:
        pass

    def end_lost(self, end: RelayEnd) -> None:
        pass


_DISCARD = _Discard()


def _close_end(end: RelayEnd) -> None:
    """Close one end of a finished relay.

    The peer's producer is unregistered first: a TLS transport does not
    start its shutdown while a producer is registered.  Then the end reads
    again, discarding what arrives: a TLS end waits for the peer's
    close_notify, and if its reading stayed paused (its consumer was slow
    when the other end went away) it would never see it while the peer
    waits to flush towards us -- both ends would hold the connection and
    its slot forever."""
    transport = end.transport
    try:
        transport.unregisterProducer()
    except Exception:  # noqa: BLE001 - nothing registered / already gone
        pass
    end.relay = _DISCARD
    if end.gate is not None:
        end.gate.release()
    transport.loseConnection()

