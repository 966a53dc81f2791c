"""The control channel (SPEC §3.2 step 5, §3.3) after the handshake.

One :class:`ControlChannel` sits on the control TCP connection of each end.
It frames lines (refusing over-long ones so garbage cannot grow memory),
decodes signals and hands them to a handler, sends a ping every
``NP_REPORT_INTERVAL`` and declares the tunnel broken after
``3 x NP_REPORT_INTERVAL`` of silence.  Writes are whole lines in one
``transport.write`` call, which Twisted never interleaves: signals are
serialised by construction.

The channel is not itself a Protocol: the server's tunnel-port protocol and
the client's control protocol both feed it, because on the server the same
connection first carried the handshake.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any, Callable, ContextManager, Optional

from twisted.internet.task import LoopingCall

from nodepass.wire import codec
from nodepass.wire.codec import Signal
from nodepass.wire.dialect import UNKNOWN_ACTION, Dialect, SignalError
from nodepass.base.logs import NodeLog
from nodepass.base.timers import ClockLike, IdleTimer


PING = Signal(codec.PING)
PONG = Signal(codec.PONG)
FLUSH = Signal(codec.FLUSH)


class LineBuffer:
    """Splits a byte stream into ``\\n``-terminated lines, at most
    ``max_line`` bytes each; ``overflow`` is set once a line grows past it
    (the caller then drops the connection)."""

    __slots__ = ("_buf", "max_line", "overflow")

    def __init__(self, max_line: int = codec.MAX_LINE):
        self._buf = b""
        self.max_line = max_line
        self.overflow = False

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf + data
        if b"\n" not in data:
            self._buf = buf
            if len(buf) > self.max_line:
                self.overflow = True
                self._buf = b""
            return []
        lines = buf.split(b"\n")
        self._buf = lines.pop()
        if len(self._buf) > self.max_line or any(len(x) > self.max_line for x in lines):
            self.overflow = True
            self._buf = b""
            return [x for x in lines if len(x) <= self.max_line]
        return lines

    def rest(self) -> bytes:
        data, self._buf = self._buf, b""
        return data


def enable_keepalive(transport: Any, interval: float) -> None:
    """TCP keep-alive with the report interval as probe period (SPEC §3.2)."""
    try:
        transport.setTcpKeepAlive(True)
        sock = transport.getHandle()
        if hasattr(sock, "setsockopt") and hasattr(socket, "TCP_KEEPIDLE"):
            secs = max(1, int(interval))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, secs)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, secs)
    except Exception:  # noqa: BLE001 - keep-alive is best effort
        pass


class ControlChannel:
    """Signals over one control connection.

    ``handler(signal)`` gets every decoded signal except ping/pong, which
    the channel answers itself; ``on_pong(ms)`` gets the round trip of each
    pong; ``before_ping()`` runs before each ping (the pool health check);
    ``on_broken(reason)`` runs once when the channel is lost or silent.

    ``working`` says whether the peer has shown that it speaks our key.  A
    client knows that once the server's answer decodes; a server cannot
    tell from the handshake (the key line is the key XORed with itself, so
    any key of the right length passes), so its channel starts not working
    and becomes working at the first signal that decodes, or when the
    runner calls :meth:`mark_working` (the client's first pool connection).
    Until then the silence limit counts from :meth:`start`, whatever bytes
    arrive, so a peer that never proves itself is dropped after
    ``3 x interval``; ``on_working()`` runs once when it does.  The silence
    watch is an :class:`~nodepass.base.timers.IdleTimer` that only a
    working channel's reads touch.

    ``each_read()`` makes a context that the signals of one read are
    handled in (the runner's: the target dials their launches make connect
    together when the read is done).
    """

    def __init__(
        self,
        transport: Any,
        dialect: Dialect,
        clock: ClockLike,
        interval: float,
        log: NodeLog,
        handler: Callable[[Signal], None],
        on_pong: Callable[[int], None],
        on_broken: Callable[[str], None],
        before_ping: Optional[Callable[[], None]] = None,
        working: bool = True,
        on_working: Optional[Callable[[], None]] = None,
        ping_at_once: bool = False,
        each_read: Callable[[], ContextManager[Any]] = contextlib.nullcontext,
    ):
        self.transport = transport
        self.dialect = dialect
        self.ping_at_once = ping_at_once
        self.clock = clock
        self.interval = interval
        self.log = log
        self.handler = handler
        self.on_pong = on_pong
        self.on_broken = on_broken
        self.before_ping = before_ping
        self.working = working
        self.on_working = on_working
        self.each_read = each_read
        self.lines = LineBuffer()
        self.ping_sent: Optional[float] = None
        self.broken = False
        self._loop: Optional[LoopingCall] = None
        self._silence: Optional[IdleTimer] = None

    def start(self) -> None:
        enable_keepalive(self.transport, self.interval)
        if self.interval > 0:
            self._loop = LoopingCall(self._tick)
            self._loop.clock = self.clock  # type: ignore[assignment]  # typed IReactorTime, a zope interface
            # 1.14 peers ping as soon as the channel exists (SPEC-1.14 §3.3).
            self._loop.start(self.interval, now=self.ping_at_once)
            self._silence = IdleTimer(self.clock, 3 * self.interval, self._silent)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._silence is not None:
            self._silence.cancel()
        self._silence = None

    # -- outgoing ---------------------------------------------------------
    def send(self, sig: Signal) -> None:
        """One signal, as one write (never interleaved with another)."""
        if self.broken or self.transport is None:
            return
        if self.log.enabled("debug"):
            self.log.debug("Tunnel signal -> : %s", self.dialect.text(sig))
        self.transport.write(self.dialect.line(sig))

    def ping(self) -> None:
        self.ping_sent = self.clock.seconds()
        self.send(PING)

    def _tick(self) -> None:
        if self.broken:
            return
        if self.before_ping is not None:
            try:
                self.before_ping()
            except Exception as e:  # noqa: BLE001 - never let the timer die
                self.log.error("Pool check failed: %s", e)
        self.ping()

    def _silent(self) -> None:
        """Nothing touched the silence timer for ``3 x interval``: since the
        last read of a working channel, or since :meth:`start` for one that
        never worked."""
        silence = self._silence
        if self.broken or silence is None:
            return
        quiet = self.clock.seconds() - silence.last
        if self.working:
            self.fail(f"control connection silent for {quiet:.1f}s")
        else:
            self.fail(f"no valid signal from the peer within {quiet:.1f}s")

    # -- incoming ---------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.broken:
            return
        silence = self._silence
        if silence is not None and self.working:
            silence.last = self.clock.seconds()
        with self.each_read():
            for line in self.lines.feed(data):
                self._line(line)
                if self.broken:
                    return
        if self.lines.overflow:
            self.fail("control line too long")

    def _line(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            sig = self.dialect.read(line)
        except SignalError as e:
            # Never the line itself: it may be anything (SPEC §3.3 says skip).
            self.log.warn("%s", e.line)
            self.log.debug("Undecodable control line: %s", codec.describe(line))
            return
        if not self.working:
            self.mark_working()
        if self.log.enabled("debug"):
            self.log.debug("Tunnel signal <- : %s", self.dialect.text(sig) if sig.kind != UNKNOWN_ACTION else "unknown action")
        if sig.kind == codec.PING:
            self.send(PONG)
        elif sig.kind == codec.PONG:
            if self.ping_sent is not None:
                ms = int(round((self.clock.seconds() - self.ping_sent) * 1000))
                self.ping_sent = None
                self.on_pong(ms)
        else:
            self.handler(sig)

    def mark_working(self) -> None:
        """The peer proved it speaks our key by other means (a pool
        connection that only a client which decoded our answer opens)."""
        if self.working or self.broken:
            return
        self.working = True
        if self._silence is not None:
            self._silence.touch()
        if self.on_working is not None:
            self.on_working()

    def connection_lost(self, why: str = "control connection lost") -> None:
        self.fail(why)

    def fail(self, reason: str) -> None:
        if self.broken:
            return
        self.broken = True
        self.stop()
        transport, self.transport = self.transport, None
        if transport is not None:
            transport.loseConnection()
        self.on_broken(reason)
