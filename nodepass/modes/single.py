"""Single-end forwarding (client ``mode=1``, SPEC §2): no server, no pool.

The client listens on its tunnel address and relays every accepted TCP
connection and every UDP session straight to the target group.  Each TCP
connection takes a slot, is screened when ``block=`` is set (SPEC-1.14
§5.1, :mod:`nodepass.relay.block`), is held unread while the target is
dialled (round robin with failover), gets the PROXY v1 line when
``proxy=1``, and is then spliced to the target with the instance's rate
limiter and ``read`` idle timeout.  UDP sessions come from :mod:`nodepass.relay.udp` with a connected
UDP socket to the next target as their backend.  Host names (tunnel address,
targets) are resolved in the reactor's thread pool, never on the reactor
thread that every instance of a master shares.

Every ``NP_REPORT_INTERVAL`` the runner measures a TCP connect to the next
target (its own round robin, so health checks do not skew the users') and
reports it as the CHECK_POINT PING, with POOL 0.
"""

from __future__ import annotations

import socket
import time
from typing import Any, Optional

from twisted.internet import error as terror
from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred, DeferredList, ensureDeferred
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from nodepass.base.errors import error_text
from nodepass.base.kinds import BlockedProtocol
from nodepass.compat.twisted_fastpath import lean_accepts
from nodepass.config.urls import Address, TunnelConfig, is_ip_literal
from nodepass.modes.base import InstanceContext, Runner, TunnelError
from nodepass.net.dialer import ResolveError, TargetGroup
from nodepass.net.resolve import getaddrinfo, prefer_ipv4
from nodepass.relay.block import Blocked, Decision, ScreenedEnd, refuse
from nodepass.relay.core import RELAY_BUFFER_SIZE, Relay, RelayEnd, peer_text, proxy_v1_header
from nodepass.relay.refusals import DropReport
from nodepass.relay.udp import TargetUDP, UDPSession, UDPSessionListener, open_target_udp

#: Listen backlog: bursts of new connections must not overflow the accept
#: queue (the kernel caps it at net.core.somaxconn).
LISTEN_BACKLOG = 4096


async def tunnel_address_binds(config: TunnelConfig, reactor: Any) -> bool:
    """Can this host listen on the tunnel address (TCP)?  The client
    ``mode=0`` probe (SPEC §2): yes means single-end forwarding.  The probe
    socket is closed before the answer, so the runner can bind right after.
    ``SO_REUSEADDR`` is set as Twisted's listener sets it, so lingering
    TIME_WAIT connections do not make the answer differ from a real listen.
    A host name is resolved in ``reactor``'s thread pool; the bind itself is
    a local system call, as Twisted's own ``listenTCP`` makes."""
    host = config.tunnel.host or None
    try:
        infos = await getaddrinfo(reactor, host, config.tunnel.port, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except (OSError, UnicodeError):
        return False
    if not infos:
        return False
    family, kind, proto, _, sockaddr = infos[0]
    try:
        sock = socket.socket(family, kind, proto)
    except OSError:
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        return True
    except OSError:
        return False
    finally:
        sock.close()


class _UserEnd(ScreenedEnd):
    """An accepted user connection (screened when ``block=`` is set);
    hands itself to the runner."""

    runner: "SingleEndRunner"
    #: The target dial in progress (a ``GroupDial``), while the runner holds
    #: this end in its ``_dialing`` set.
    dial: Any = None

    def connectionMade(self) -> None:
        super().connectionMade()
        self.runner._accepted(self)

    def target_ready(self, target: RelayEnd) -> None:
        self.runner._dialled(target, self)

    def target_failed(self, failure: Failure) -> None:
        self.runner._dial_failed(failure, self)


class _UserFactory(Factory):
    def __init__(self, runner: "SingleEndRunner"):
        self.runner = runner

    def buildProtocol(self, addr: Any) -> _UserEnd:
        end = _UserEnd()
        end.runner = self.runner
        end.factory = self
        return end


class _TargetFactory(Factory):
    protocol = RelayEnd

    noisy = False


def _peer(transport: Any) -> tuple[str, int]:
    p = transport.getPeer()
    return (p.host, p.port)


def _fmt(addr: tuple[str, int]) -> str:
    return str(Address(addr[0], addr[1]))


class SingleEndRunner(Runner):
    """Client ``mode=1``: listen on the tunnel address, relay to targets."""

    mode = 1

    def __init__(self, ctx: InstanceContext):
        super().__init__(ctx)
        cfg = ctx.config
        self.group = TargetGroup(
            cfg.targets,
            ctx.reactor,
            ctx.log,
            dns_ttl=cfg.dns,
            dial=cfg.dial,
            timeout=ctx.tunables.tcp_dial_timeout,
        )
        self.relays: set[Relay] = set()
        self.udp_listener: Optional[UDPSessionListener] = None
        self.tcp_port: Any = None  # IListeningPort
        self.udp_port: Any = None
        self._ends: set[RelayEnd] = set()
        #: Users whose target is being dialled (each holds its dial).
        self._dialing: set[_UserEnd] = set()
        self._udp_targets: set[TargetUDP] = set()
        self._loop: Optional[task.LoopingCall] = None
        self._ping: Optional[Deferred] = None
        self._ping_index = 0
        self._stopping = False
        self._target_factory = _TargetFactory()
        # Connections turned away at the slot limit: the first of a quiet
        # period logged as it comes, the rest in one summary line.
        self._tcp_refused = DropReport(
            ctx.reactor, ctx.log, ctx.tunables.report_interval, "connections", kind="TCP", verb="refused", first_alone=True
        )
        # NP_TCP_DATA_BUF_SIZE is Go's copy buffer; reads here are never
        # smaller than RELAY_BUFFER_SIZE, which Python needs to keep the
        # per-chunk cost low, but a larger tunable makes them larger.
        self._buffer_size = max(ctx.tunables.tcp_data_buf_size, RELAY_BUFFER_SIZE)
        # Read once: every connection asks.
        self._blocked = cfg.blocked
        self._proxy = cfg.proxy
        self._info = ctx.log.enabled("info")  # Go's per-connection lines

    # -- lifecycle -------------------------------------------------------
    async def start(self) -> None:
        ctx = self.ctx
        cfg = ctx.config
        reactor: Any = ctx.reactor
        host, port = await _listen_host(reactor, cfg.tunnel.host), cfg.tunnel.port
        if not cfg.notcp:
            try:
                self.tcp_port = reactor.listenTCP(port, _UserFactory(self), backlog=LISTEN_BACKLOG, interface=host)
            except terror.CannotListenError as e:
                raise TunnelError(f"cannot listen on TCP {cfg.tunnel}: {error_text(e)}") from None
            lean_accepts(self.tcp_port)
        if not cfg.noudp:
            self.udp_listener = UDPSessionListener(
                self._open_udp_backend,
                ctx.stats,
                reactor,
                ctx.log,
                idle_timeout=ctx.tunables.udp_read_timeout,
                buf_size=ctx.tunables.udp_data_buf_size,
                report_interval=ctx.tunables.report_interval,
            )
            try:
                self.udp_port = reactor.listenUDP(
                    port, self.udp_listener, interface=host, maxPacketSize=ctx.tunables.udp_data_buf_size
                )
            except terror.CannotListenError as e:
                raise TunnelError(f"cannot listen on UDP {cfg.tunnel}: {error_text(e)}") from None
        interval = ctx.tunables.report_interval
        if interval > 0:
            self._loop = task.LoopingCall(self._checkpoint)
            self._loop.clock = reactor
            self._loop.start(interval, now=False)

    async def stop(self) -> None:
        """Close listeners, in-flight dials, every relayed pair and UDP
        session; fires once every socket is released."""
        self._stopping = True
        self._tcp_refused.close()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._ping is not None:
            self._ping.cancel()
        waits: list[Deferred] = []
        for attr in ("tcp_port", "udp_port"):
            port = getattr(self, attr)
            setattr(self, attr, None)
            if port is not None:
                d = port.stopListening()
                if d is not None:
                    waits.append(d)
        waits.extend(t.released for t in self._udp_targets)
        if self.udp_listener is not None:
            self.udp_listener.close_all()
        for user in list(self._dialing):
            self._dialing.discard(user)
            user.dial.cancel()
            self.ctx.stats.release_tcp()
        for end in list(self._ends):
            if not end.lost and end.transport is not None:
                lost: Deferred[None] = Deferred()

                def gone(_reason: Failure, lost: Deferred[None] = lost) -> None:
                    lost.callback(None)

                end.on_lost(gone)
                waits.append(lost)
                end.transport.abortConnection()
        for target in list(self._udp_targets):
            target.close()
        if waits:
            await DeferredList(waits, consumeErrors=True)

    # -- TCP -------------------------------------------------------------
    def _track(self, end: RelayEnd) -> None:
        self._ends.add(end)
        end.owner = self._ends  # it leaves the set when lost

    def _accepted(self, user: _UserEnd) -> None:
        # Runs once per connection: callback style, no coroutine.
        if self._stopping:
            user.transport.abortConnection()
            return
        self._track(user)
        stats = self.ctx.stats
        if not stats.acquire_tcp():
            peer = _fmt(_peer(user.transport))
            if self._tcp_refused.drop(stats.slot_limit, peer):
                self.ctx.log.error("TCP slot limit reached (%d), closing connection from %s", stats.slot_limit, peer)
            user.transport.loseConnection()
            return
        user.hold()
        user.transport.bufferSize = self._buffer_size
        blocked = self._blocked
        if blocked:
            self._screen(user, blocked)
        else:
            self._dial(user)

    def _screen(self, user: _UserEnd, blocked: frozenset[BlockedProtocol]) -> None:
        """``block=`` (SPEC-1.14 §5.1): judge the user's first bytes after
        the slot check and before the target is dialled."""

        def judged(decision: Decision) -> None:
            if user.lost or self._stopping:
                self.ctx.stats.release_tcp()
                if not user.lost:
                    user.transport.loseConnection()
            elif isinstance(decision, Blocked):
                refuse(user, decision, self.ctx.stats, self.ctx.log, "singleTCPLoop")
            else:
                self._dial(user)

        user.screen(blocked, self.ctx.reactor).addCallback(judged)

    def _dial(self, user: _UserEnd) -> None:
        self._dialing.add(user)
        dial = self.group.connect(self._target_factory, user.target_ready, user.target_failed)
        if user in self._dialing:
            user.dial = dial

    def _dial_failed(self, failure: Failure, user: _UserEnd) -> None:
        self._dialing.discard(user)
        user.dial = None
        self.ctx.stats.release_tcp()
        self.ctx.log.error("TCP connection from %s dropped: %s", _fmt(_peer(user.transport)), failure.getErrorMessage())
        if not user.lost:
            user.transport.loseConnection()

    def _dialled(self, target: RelayEnd, user: _UserEnd) -> None:
        self._dialing.discard(user)
        user.dial = None
        ctx = self.ctx
        stats, log = ctx.stats, ctx.log
        self._track(target)
        if user.lost or self._stopping:
            stats.release_tcp()
            target.transport.loseConnection()
            return
        target.transport.bufferSize = self._buffer_size
        if self._proxy:
            target.transport.write(proxy_v1_header(_peer(user.transport), _peer(target.transport)))
        if self._info:
            # Go's per-connection INFO lines: the user, then the target.
            log.info("Starting exchange: %s <-> %s", peer_text(user.transport), peer_text(target.transport))
        relay = Relay(
            target,
            user,
            stats,
            ctx.reactor,
            limiter=ctx.limiter,
            idle=ctx.config.read,
            on_close=lambda: self._relay_closed(relay),
        )
        self.relays.add(relay)
        relay.start()

    def _relay_closed(self, relay: Relay) -> None:
        self.relays.discard(relay)
        self.ctx.stats.release_tcp()
        if self._info:
            self.ctx.log.info("Exchange complete: %s", relay.outcome)

    # -- UDP -------------------------------------------------------------
    async def _open_udp_backend(self, session: UDPSession) -> TargetUDP:
        ctx = self.ctx
        ip, port, _target = await self.group.resolve_next()
        if session.closed or self._stopping:
            raise CancelledError()

        def open_target(source: Optional[str]) -> TargetUDP:
            return open_target_udp(
                ctx.reactor,
                ip,
                port,
                on_datagram=session.reply,
                on_close=session.close,
                stats=ctx.stats,
                log=ctx.log,
                count_traffic=True,
                buf_size=ctx.tunables.udp_data_buf_size,
                source=source,
            )

        source = self.group.source
        try:
            target = open_target(source)
        except terror.CannotListenError as e:
            if not source:
                raise
            ctx.log.error("Dial source %s unusable (%s), falling back to auto", source, error_text(e))
            self.group.source = None
            target = open_target(None)
        self._udp_targets.add(target)

        def closed() -> None:
            self._udp_targets.discard(target)
            session.close()

        target.on_close = closed
        ctx.log.debug("UDP %s -> %s session", _fmt(session.addr), _fmt((ip, port)))
        return target

    # -- CHECK_POINT -----------------------------------------------------
    def _checkpoint(self) -> None:
        if self._ping is not None or self._stopping:
            return  # the previous probe is still dialling
        d = self._ping = ensureDeferred(self._probe())

        def done(result: object) -> object:
            self._ping = None
            return result

        d.addBoth(done)
        d.addErrback(lambda f: f.trap(CancelledError))
        d.addErrback(lambda f: self.ctx.log.error("Checkpoint failed: %s", f.getErrorMessage()))

    async def _probe(self) -> None:
        targets = self.group.targets
        target = targets[self._ping_index % len(targets)]
        self._ping_index += 1
        started = time.monotonic()
        ping = 0
        try:
            end = await self.group.connect_one(target, self._target_factory)
        except CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - an unreachable target is PING=0
            self.ctx.log.warn("Checkpoint: target %s unreachable: %s", target, e)
        else:
            ping = int(round((time.monotonic() - started) * 1000))
            self._track(end)
            end.transport.loseConnection()
        if not self._stopping:
            self.ctx.report(ping, 0)


async def _listen_host(reactor: Any, host: str) -> str:
    """The IP to listen on: Twisted's UDP ports take IP literals only, so a
    host name is resolved once here (as Go's listener does at start), in
    the reactor's thread pool."""
    if not host or is_ip_literal(host):
        return host
    try:
        infos = await getaddrinfo(reactor, host, None, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except (OSError, UnicodeError) as e:
        raise TunnelError(f"cannot listen on {host}: {ResolveError(host, e)}") from None
    return str(prefer_ipv4(infos)[0][4][0])
