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
from typing import Callable, Optional

from twisted.internet import error, main, tcp
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from nodepass.base.stats import InstanceStats

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
# straight to the peer's socket when Twisted holds nothing for it; only what
# the socket does not take is copied into Twisted's buffer, whose size still
# drives the producer pause.  TLS and other transports use Twisted's paths.
_READ_BUFFER = memoryview(bytearray(RELAY_BUFFER_SIZE))


def _read_buffer(size: int) -> memoryview:
    """The shared read buffer, grown once if a transport reads more."""
    global _READ_BUFFER
    if len(_READ_BUFFER) < size:
        _READ_BUFFER = memoryview(bytearray(size))
    return _READ_BUFFER


def _plain_tcp(transport) -> bool:
    return isinstance(transport, tcp.Connection) and not getattr(transport, "TLS", False) and hasattr(transport, "socket")


# How a relay writes to one end: a plain TCP socket is written directly
# (:func:`_write_through`); a transport marked ``takes_views`` (the TLS fast
# path of ``nodepass.relay.tls_fast``, which encrypts a chunk before returning) is
# given the view of the shared read buffer as is; anything else gets a copy.
_COPY, _PLAIN, _VIEWS = "copy", "plain", "views"


def _write_mode(transport) -> str:
    if _plain_tcp(transport):
        return _PLAIN
    if getattr(transport, "takes_views", False):
        return _VIEWS
    return _COPY


def _write_through(transport, data) -> None:
    """Write ``data`` (bytes or a view of the shared read buffer) on a plain
    TCP transport, socket first when nothing is queued ahead of it."""
    if (
        not transport._tempDataLen
        and transport.offset == len(transport.dataBuffer)
        and transport.connected
        and not transport.disconnecting
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0  # EAGAIN, or an error Twisted's write path will report
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(bytes(data))


def _fast_reader(relay: "Relay", end: "RelayEnd"):
    """A ``doRead`` for a plain TCP transport of a spliced pair: reads up to
    the transport's ``bufferSize`` into the shared buffer and forwards."""
    recv_into = end.transport.socket.recv_into
    size = end.transport.bufferSize
    view = _read_buffer(size)
    forward = relay.forward

    def doRead():
        try:
            n = recv_into(view, size)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return main.CONNECTION_LOST
        if not n:
            return main.CONNECTION_DONE
        forward(end, view[:n])
        return None

    return doRead


class TokenBucket:
    """One bucket of ``rate`` bytes/s shared by every connection of an
    instance, both directions together (SPEC §5).  ``consume`` never blocks:
    it answers how long the caller should pause to stay under the rate."""

    def __init__(self, bytes_per_second: float, clock):
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


@implementer(IPushProducer)
class PauseGate:
    """Pauses a transport's reading for as long as any reason holds."""

    __slots__ = ("_transport", "_reasons")

    def __init__(self, transport):
        self._transport = transport
        self._reasons: set = set()

    def pause(self, reason: str) -> None:
        if not self._reasons:
            self._transport.pauseProducing()
        self._reasons.add(reason)

    def resume(self, reason: str) -> None:
        if reason in self._reasons:
            self._reasons.discard(reason)
            if not self._reasons:
                self._transport.resumeProducing()

    def release(self) -> None:
        """Drop every reason and read again: the relay is over, so nothing
        downstream is left to protect.  A closing TLS end must keep reading
        to see the peer's close_notify (or FIN); held paused, it and a peer
        flushing towards it would wait on each other forever."""
        if self._reasons:
            self._reasons.clear()
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


class RelayEnd(Protocol):
    """One side of a relayed pair.

    Before :func:`splice` joins it to a peer, whatever arrives is kept and
    reading is paused (at most one read's worth is held).  After, every chunk
    goes straight to the peer's transport.
    """

    relay: Optional["Relay"] = None
    gate: Optional[PauseGate] = None
    connected_ = False
    lost_reason: Optional[Failure] = None

    def __init__(self) -> None:
        self._early: list[bytes] = []
        self._lost_callbacks: list[Callable[[Failure], None]] = []
        self.lost = False

    def connectionMade(self) -> None:
        self.connected_ = True
        self.gate = PauseGate(self.transport)

    def hold(self) -> None:
        """Stop reading until spliced."""
        self.gate.pause("splice")

    def take_early(self) -> bytes:
        data = b"".join(self._early)
        self._early = []
        return data

    def dataReceived(self, data: bytes) -> None:
        relay = self.relay
        if relay is None:
            self._early.append(data)
            self.gate.pause("splice")
            return
        relay.forward(self, data)

    def on_lost(self, callback: Callable[[Failure], None]) -> None:
        self._lost_callbacks.append(callback)

    def connectionLost(self, reason: Failure) -> None:
        self.lost = True
        self.lost_reason = reason
        if self.relay is not None:
            self.relay.end_lost(self)
        callbacks, self._lost_callbacks = self._lost_callbacks, []
        for cb in callbacks:
            cb(reason)


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
    user connection)."""

    __slots__ = (
        "target",
        "tunnel",
        "stats",
        "limiter",
        "idle",
        "clock",
        "_on_close",
        "_closed",
        "_timer",
        "_last_target",
        "_last_tunnel",
        "udp",
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
        clock,
        limiter: Optional[TokenBucket] = None,
        idle: float = 0.0,
        on_close: Optional[Callable[[], None]] = None,
        udp: bool = False,
    ):
        self.target = target
        self.tunnel = tunnel
        self.stats = stats
        self.limiter = limiter
        self.idle = idle
        self.clock = clock
        self.udp = udp
        self._on_close = on_close
        self._closed = False
        self._timer = None
        self._rate_calls: dict = {}
        self._through_target = _COPY
        self._through_tunnel = _COPY
        #: How the exchange ended, in Go's words (``Exchange complete: ...``):
        #: ``EOF`` when an end closed cleanly, else the first error.
        self.outcome = ""
        now = clock.seconds()
        self._last_target = now
        self._last_tunnel = now

    def forward(self, source: RelayEnd, data) -> None:
        """Move one chunk (bytes, or a view of the shared read buffer that
        must not outlive this call) from ``source`` to the other end."""
        n = len(data)
        if source is self.target:
            if self.udp:
                self.stats.udp_rx += n
            else:
                self.stats.tcp_rx += n
            if self.idle:
                self._last_target = self.clock.seconds()
            through = self._through_tunnel
            if through is _PLAIN:
                _write_through(self.tunnel.transport, data)
            elif through is _VIEWS:
                self.tunnel.transport.write(data)
            else:
                self.tunnel.transport.write(bytes(data))
        else:
            if self.udp:
                self.stats.udp_tx += n
            else:
                self.stats.tcp_tx += n
            if self.idle:
                self._last_tunnel = self.clock.seconds()
            through = self._through_target
            if through is _PLAIN:
                _write_through(self.target.transport, data)
            elif through is _VIEWS:
                self.target.transport.write(data)
            else:
                self.target.transport.write(bytes(data))
        limiter = self.limiter
        if limiter is not None:
            delay = limiter.consume(n)
            if delay > 0 and not source.lost and not self._closed and source not in self._rate_calls:
                source.gate.pause("rate")
                self._rate_calls[source] = self.clock.callLater(delay, self._rate_resume, source)

    def _rate_resume(self, source: RelayEnd) -> None:
        self._rate_calls.pop(source, None)
        source.gate.resume("rate")

    def _check_idle(self) -> None:
        self._timer = None
        if self._closed:
            return
        oldest = min(self._last_target, self._last_tunnel)
        due = oldest + self.idle
        now = self.clock.seconds()
        if now >= due:
            self.close("i/o timeout")
        else:
            self._timer = self.clock.callLater(due - now, self._check_idle)

    def start(self) -> None:
        """Join the two ends: producers both ways, early bytes flushed,
        reading resumed."""
        a, b = self.target, self.tunnel
        a.relay = self
        b.relay = self
        if a.lost or b.lost:
            self.end_lost(a if a.lost else b)
            return
        a.transport.registerProducer(b.gate, True)
        b.transport.registerProducer(a.gate, True)
        if not self.udp:
            self._through_target = _write_mode(a.transport)
            self._through_tunnel = _write_mode(b.transport)
            for end, mode in ((a, self._through_target), (b, self._through_tunnel)):
                if mode is _PLAIN:
                    end.transport.doRead = _fast_reader(self, end)
        for end in (a, b):
            early = end.take_early()
            if early:
                self.forward(end, early)
        if self.idle:
            self._timer = self.clock.callLater(self.idle, self._check_idle)
        a.gate.resume("splice")
        b.gate.resume("splice")

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
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
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
    if reason is None or reason.check(error.ConnectionDone):
        return "EOF"
    if reason.check(error.ConnectionLost):
        return "read: connection reset by peer"
    return reason.getErrorMessage()


def peer_text(transport) -> str:
    """``ip:port`` of a transport's peer (IPv6 bracketed), for log lines."""
    try:
        peer = transport.getPeer()
        host, port = peer.host, peer.port
    except Exception:  # noqa: BLE001 - a transport without an address
        return "?"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Discard:
    """Where a closing end's late bytes go once its relay is over."""

    @staticmethod
    def forward(source: RelayEnd, data) -> None:
        pass

    @staticmethod
    def end_lost(end: RelayEnd) -> None:
        pass


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
    end.relay = _Discard  # type: ignore[assignment]
    if end.gate is not None:
        end.gate.release()
    transport.loseConnection()


def splice(
    target: RelayEnd,
    tunnel: RelayEnd,
    stats: InstanceStats,
    clock,
    limiter: Optional[TokenBucket] = None,
    idle: float = 0.0,
    on_close: Optional[Callable[[], None]] = None,
    udp: bool = False,
) -> Relay:
    relay = Relay(target, tunnel, stats, clock, limiter=limiter, idle=idle, on_close=on_close, udp=udp)
    relay.start()
    return relay
