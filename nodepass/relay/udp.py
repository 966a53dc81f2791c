"""UDP sessions (SPEC §5), shared by single-end and dual-end forwarding.

UDP has no connections, so NodePass makes its own: at the entry, datagrams
are grouped by source address into *sessions*; each session owns one slot,
one outbound channel (its *backend*) and an idle timer.  At the exit, each
session is one connected UDP socket to a target.  This module provides both
halves and keeps the channel in between pluggable, because that is the only
thing that differs between the modes:

* single-end: the backend *is* the exit -- a :class:`TargetUDP` socket to the
  next target of the group;
* dual-end: the backend is a pool connection carrying raw datagrams, and the
  far side of the pool connection feeds a :class:`TargetUDP`.

Entry side::

    async def open_backend(session: UDPSession) -> SessionBackend:
        ...  # may also return the backend directly (no await)

    listener = UDPSessionListener(open_backend, stats, reactor, log,
                                  idle_timeout=tunables.udp_read_timeout,
                                  buf_size=tunables.udp_data_buf_size)
    port = reactor.listenUDP(p, listener, interface=host,
                             maxPacketSize=tunables.udp_data_buf_size)
    ...
    listener.close_all()          # on shutdown: every session ends cleanly

A *session backend* is any object with

* ``send(datagram: bytes) -> None`` -- carry one datagram from the source
  towards the target (must not raise; drop instead), and
* ``close() -> None`` -- release the channel (idempotent),

and it talks back through the session: ``session.reply(datagram)`` for each
datagram coming back (it is sent to the session's source address), and
``session.close()`` when the channel ends on its own.  Datagrams that arrive
while ``open_backend`` is still running are queued (bounded) and flushed once
it returns.  ``session.addr`` is the source ``(ip, port)`` -- the ORIGIN of a
dual-end UDP launch signal.

Exit side::

    t = open_target_udp(reactor, ip, port, on_datagram=..., on_close=...,
                        stats=stats, count_traffic=True,
                        idle_timeout=..., buf_size=..., source=None)
    t.send(datagram); t.close()

Traffic counters follow the relay's convention (SPEC §5: counted on the
target-side socket): bytes read from that socket are ``udp_rx``, bytes
written to it ``udp_tx``.  Whichever object faces the target side gets
``count_traffic=True``: the :class:`TargetUDP` in single-end mode and at a
dual-end exit, the :class:`UDPSessionListener` at a dual-end entry whose
listener sits on the target address (server reverse mode).

Closing is one path for every cause (idle, backend gone, shutdown, refused):
``close()`` cancels the timer, forgets the session, releases the slot
exactly once and closes the backend.
"""

from __future__ import annotations

import inspect
from typing import Any, Awaitable, Callable, Optional, Protocol as TypingProtocol, Union

from twisted.internet import error as terror
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred, succeed
from twisted.internet.protocol import DatagramProtocol

from nodepass.base.logs import NodeLog
from nodepass.base.stats import InstanceStats
from nodepass.base.timers import IdleTimer
from nodepass.relay.refusals import DropReport

Addr = tuple[str, int]

#: Datagrams held per session while its backend is being opened.
PENDING_LIMIT_BYTES = 256 * 1024


class SessionBackend(TypingProtocol):
    """The outbound channel of one session (see the module docstring)."""

    def send(self, datagram: bytes) -> None: ...

    def close(self) -> None: ...


OpenBackend = Callable[["UDPSession"], Union[SessionBackend, Awaitable[SessionBackend]]]


class UDPSession:
    """One source address at the entry: its slot, backend and idle timer."""

    def __init__(self, listener: "UDPSessionListener", addr: Addr):
        self.listener = listener
        self.addr = addr
        self.backend: Optional[SessionBackend] = None
        self.closed = False
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._opening: Optional[Deferred] = None
        self._close_callbacks: list[Callable[[], None]] = []
        self.timer = IdleTimer(listener.clock, listener.idle_timeout, self._idle)

    # -- lifecycle -------------------------------------------------------
    def open(self) -> None:
        try:
            result = self.listener.open_backend(self)
        except Exception as e:  # noqa: BLE001 - a failed open ends the session
            self._open_failed(e)
            return
        if inspect.isawaitable(result):
            d = ensureDeferred(result) if inspect.iscoroutine(result) else maybeDeferred(lambda: result)
            self._opening = d
            d.addCallbacks(self._opened, lambda f: self._open_failed(f.value))
        else:
            self._opened(result)

    def _opened(self, backend: SessionBackend) -> None:
        self._opening = None
        if self.closed:
            backend.close()
            return
        self.backend = backend
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        for datagram in pending:
            backend.send(datagram)

    def _open_failed(self, exc: BaseException) -> None:
        self._opening = None
        if not self.closed:
            self.listener.log.error("UDP session %s failed: %s", _fmt(self.addr), exc)
            self.close()

    def _idle(self) -> None:
        self.listener.log.debug("UDP session %s idle, closing", _fmt(self.addr))
        self.close()

    def on_close(self, callback: Callable[[], None]) -> None:
        self._close_callbacks.append(callback)

    def close(self) -> None:
        """End the session (idempotent): timer, slot, backend, bookkeeping."""
        if self.closed:
            return
        self.closed = True
        self.timer.cancel()
        self._pending = []
        self.listener._forget(self)
        backend, self.backend = self.backend, None
        if backend is not None:
            backend.close()
        if self._opening is not None:
            opening, self._opening = self._opening, None
            opening.cancel()
        callbacks, self._close_callbacks = self._close_callbacks, []
        for cb in callbacks:
            cb()

    # -- data ------------------------------------------------------------
    def received(self, datagram: bytes) -> None:
        """A datagram from the source."""
        self.timer.last = self.listener.clock.seconds()
        backend = self.backend
        if backend is not None:
            backend.send(datagram)
        elif self._pending_bytes + len(datagram) <= PENDING_LIMIT_BYTES:
            self._pending.append(datagram)
            self._pending_bytes += len(datagram)

    def reply(self, datagram: bytes) -> None:
        """A datagram coming back from the backend, for the source."""
        if self.closed:
            return
        self.timer.last = self.listener.clock.seconds()
        self.listener._send(datagram, self.addr)


class UDPSessionListener(DatagramProtocol):
    """The entry-side UDP socket: groups datagrams into sessions by source."""

    #: The UDP port (``IUDPTransport``; typed loosely because mypy cannot
    #: call a zope interface's methods).
    transport: Any

    def __init__(
        self,
        open_backend: OpenBackend,
        stats: InstanceStats,
        clock,
        log: NodeLog,
        idle_timeout: float = 30.0,
        buf_size: int = 16384,
        count_traffic: bool = False,
        report_interval: float = 5.0,
    ):
        self.open_backend = open_backend
        self.stats = stats
        self.clock = clock
        self.log = log
        self.idle_timeout = idle_timeout
        self.buf_size = buf_size
        self.count_traffic = count_traffic
        self.sessions: dict[Addr, UDPSession] = {}
        self.accepting = True
        self.dropped = DropReport(clock, log, report_interval)

    def datagramReceived(self, datagram: bytes, addr: Addr) -> None:
        addr = (addr[0], addr[1])
        session = self.sessions.get(addr)
        if session is None:
            if not self.accepting:
                return
            if not self.stats.acquire_udp():
                self.dropped.drop(self.stats.slot_limit, _fmt(addr))
                return
            session = UDPSession(self, addr)
            self.sessions[addr] = session
            self.log.debug("UDP session %s opened", _fmt(addr))
            session.open()
            if session.closed:
                return
        if self.count_traffic:
            self.stats.udp_rx += len(datagram)
        session.received(datagram)

    def _send(self, datagram: bytes, addr: Addr) -> None:
        transport = self.transport
        if transport is None:
            return
        try:
            transport.write(datagram, addr)
        except (OSError, terror.MessageLengthError) as e:
            self.log.debug("UDP send to %s dropped: %s", _fmt(addr), e)
            return
        if self.count_traffic:
            self.stats.udp_tx += len(datagram)

    def _forget(self, session: UDPSession) -> None:
        if self.sessions.get(session.addr) is session:
            del self.sessions[session.addr]
            self.stats.release_udp()

    def close_all(self) -> None:
        """Stop taking new sessions and close every live one."""
        self.accepting = False
        self.dropped.close()
        for session in list(self.sessions.values()):
            session.close()

    def stopProtocol(self) -> None:
        # The port is gone: no more drops to count, no timer left behind.
        self.dropped.close()


class _TargetProtocol(DatagramProtocol):
    def __init__(self, owner: "TargetUDP"):
        self.owner = owner

    def datagramReceived(self, datagram: bytes, addr) -> None:
        self.owner._received(datagram)

    def connectionRefused(self) -> None:
        # ICMP port unreachable on a connected socket: the target is gone,
        # as a Go peer's Read error would say.
        self.owner.log.debug("UDP target %s refused", _fmt(self.owner.remote))
        self.owner.close()

    def doStop(self) -> None:
        # The port can also end without us: epoll reports the pending ICMP
        # error of a connected UDP socket as a hang-up and Twisted closes it.
        self.owner._port_gone()


class TargetUDP:
    """A connected UDP socket to one target: the exit of one session.

    Implements :class:`SessionBackend`, so single-end mode hands it straight
    to a :class:`UDPSession`.  ``on_datagram`` gets what the target sends
    back; ``on_close`` runs once when the socket ends for any reason (closed,
    refused, idle when ``idle_timeout`` is set).
    """

    def __init__(
        self,
        reactor,
        remote: Addr,
        on_datagram: Callable[[bytes], None],
        on_close: Optional[Callable[[], None]],
        stats: InstanceStats,
        log: NodeLog,
        count_traffic: bool = True,
        idle_timeout: float = 0.0,
    ):
        self.reactor = reactor
        self.remote = remote
        self.on_datagram = on_datagram
        self.on_close = on_close
        self.stats = stats
        self.log = log
        self.count_traffic = count_traffic
        self.port = None
        self.closed = False
        #: Fires once the socket is released (after :meth:`close`).
        self.released: Deferred = Deferred()
        self.timer = IdleTimer(reactor, idle_timeout, self.close) if idle_timeout > 0 else None

    def _received(self, datagram: bytes) -> None:
        if self.closed:
            return
        if self.timer is not None:
            self.timer.last = self.reactor.seconds()
        if self.count_traffic:
            self.stats.udp_rx += len(datagram)
        self.on_datagram(datagram)

    def send(self, datagram: bytes) -> None:
        if self.closed or self.port is None:
            return
        if self.timer is not None:
            self.timer.last = self.reactor.seconds()
        try:
            self.port.write(datagram)
        except (OSError, terror.MessageLengthError) as e:
            # Full socket buffer or oversized datagram: UDP may drop.
            self.log.debug("UDP send to %s dropped: %s", _fmt(self.remote), e)
            return
        if self.count_traffic:
            self.stats.udp_tx += len(datagram)

    def close(self) -> None:
        """Close the socket (idempotent); :attr:`released` fires when the
        port is gone."""
        if self.closed:
            return
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        port, self.port = self.port, None
        d = maybeDeferred(port.stopListening) if port is not None else succeed(None)
        d.addBoth(self._release)
        if self.on_close is not None:
            cb, self.on_close = self.on_close, None
            cb()

    def _port_gone(self) -> None:
        if not self.closed:
            self.log.debug("UDP target %s socket closed", _fmt(self.remote))
            self.port = None  # already released: nothing to stop
            self.close()

    def _release(self, _result) -> None:
        if not self.released.called:
            self.released.callback(None)


def _bind_host(ip: str, source: Optional[str]) -> str:
    v6 = ":" in ip
    if source and (":" in source) == v6:
        return source
    return "::" if v6 else ""


def open_target_udp(
    reactor,
    ip: str,
    port: int,
    on_datagram: Callable[[bytes], None],
    on_close: Optional[Callable[[], None]],
    stats: InstanceStats,
    log: NodeLog,
    count_traffic: bool = True,
    idle_timeout: float = 0.0,
    buf_size: int = 16384,
    source: Optional[str] = None,
) -> TargetUDP:
    """Bind a UDP socket (on ``source`` when given and of the right family)
    and connect it to ``ip:port`` (an IP literal).  Raises
    :class:`twisted.internet.error.CannotListenError` when ``source`` cannot
    be bound -- the caller decides about falling back (SPEC §1 ``dial``)."""
    target = TargetUDP(reactor, (ip, port), on_datagram, on_close, stats, log, count_traffic, idle_timeout)
    proto = _TargetProtocol(target)
    try:
        udp_port = reactor.listenUDP(0, proto, interface=_bind_host(ip, source), maxPacketSize=buf_size)
    except Exception:
        target.closed = True
        if target.timer is not None:
            target.timer.cancel()
        raise
    try:
        udp_port.connect(ip, port)
    except Exception:
        target.closed = True
        if target.timer is not None:
            target.timer.cancel()
        udp_port.stopListening()
        raise
    target.port = udp_port
    return target


def _fmt(addr: Addr) -> str:
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


__all__ = [
    "OpenBackend",
    "SessionBackend",
    "TargetUDP",
    "UDPSession",
    "UDPSessionListener",
    "open_target_udp",
]
