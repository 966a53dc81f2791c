"""What server and client share once a dual-end tunnel is up (SPEC §2-§5).

Both ends run the same control logic and differ only in direction: the
*entry* side accepts user connections on its target address and names a
pool connection in a launch signal; the *exit* side takes that pool
connection and dials its targets.  :class:`DualEndRunner` holds that logic;
:mod:`nodepass.server` and :mod:`nodepass.client` add the handshake and
their kind of pool.
"""

from __future__ import annotations

import abc
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from nodepass.base.kinds import Flow, PoolType, Role, TLSCode, Wire
from nodepass.wire import codec
from nodepass.wire.codec import Codec, Signal, split_origin
from nodepass.wire.dialect import dialect
from nodepass.config.urls import join_host_port
from nodepass.wire.control import FLUSH, ControlChannel
from nodepass.compat.twisted_fastpath import DialBatch, LeanConnection, lean_accepts
from nodepass.net.dialer import TargetGroup
from nodepass.modes.base import InstanceContext, Runner, TunnelError
from nodepass.modes.verify import FingerprintExchange, VerifyGate
from nodepass.pools.tcp import IdlePool, PoolConnectionGone
from nodepass.relay.block import Blocked, Decision, ScreenedEnd, refuse
from nodepass.relay.core import RELAY_BUFFER_SIZE, Relay, RelayEnd, no_delay, peer_text, proxy_v1_header
from nodepass.relay import splice, tls_fast
from nodepass.relay.refusals import DropReport
from nodepass.relay.udp import TargetUDP, UDPSession, UDPSessionListener, open_target_udp


def addr_text(addr: Any) -> str:
    """``ip:port`` (IPv6 bracketed) of a Twisted address or ``(ip, port)``."""
    if isinstance(addr, tuple):
        return join_host_port(addr[0], addr[1])
    return join_host_port(addr.host, addr.port)


def _big_reads(transport: Any, size: int = RELAY_BUFFER_SIZE) -> None:
    """Large reads for relayed sockets (the TLS wrapper's socket included):
    fewer, bigger chunks keep the per-chunk Python cost small."""
    while transport is not None:
        if hasattr(transport, "bufferSize"):
            transport.bufferSize = size
        transport = getattr(transport, "transport", None)



class PoolEnd(RelayEnd):
    """A pool connection (either side) once it is a relay end.  Until it
    is used, bytes that arrive are held (and reading paused)."""

    pool_id: str = ""

    def attach(self, sink: Any) -> None:
        """Route this end's bytes to ``sink.forward(self, data)`` and its
        loss to ``sink.end_lost(self)`` (a UDP session, not a splice).
        ``sink`` is a :class:`~nodepass.relay.core.RelaySink` that takes
        whole ``bytes``: pool connections carrying UDP are never read into
        the relay's shared buffer views."""
        self.relay = sink
        early = self.take_early()
        if early:
            sink.forward(self, early)
        if self.lost:
            sink.end_lost(self)
        elif self.gate is not None:
            self.gate.resume("splice")


class ControlSink:
    """Routes the bytes of a 1.14 control connection that is a pool
    connection (a :class:`PoolEnd`: the client's, or a stream of a stream
    pool on the server) to its control channel."""

    def __init__(self, channel: ControlChannel):
        self.channel = channel

    def forward(self, _end: RelayEnd, data: bytes | memoryview) -> None:
        self.channel.data_received(bytes(data))

    def end_lost(self, end: RelayEnd) -> None:
        reason = end.lost_reason
        why = reason.getErrorMessage() if reason is not None else ""
        self.channel.connection_lost("control connection lost: " + (why or "closed"))


class EntryTCP(ScreenedEnd):
    """A user connection at the entry's target address (the server's with
    flow ``-``, the client's with flow ``+``)."""

    def __init__(self, runner: "DualEndRunner"):
        super().__init__()
        self.runner = runner

    def connectionMade(self) -> None:
        super().connectionMade()
        self.hold()
        r = self.runner
        if not r.ctx.stats.acquire_tcp():
            peer = addr_text(self.transport.getPeer())
            if r.tcp_refused.drop(r.ctx.stats.slot_limit, peer):
                r.ctx.log.error("TCP slot limit reached (%d), refusing %s", r.ctx.stats.slot_limit, peer)
            self.transport.abortConnection()
            return
        blocked = r.blocked
        if blocked:
            # block= (SPEC-1.14 §5.1): after the slot check, before a pool
            # connection is taken.
            r.screening.add(self)
            self.screen(blocked, r.ctx.reactor).addCallback(self._judged)
        else:
            r.entry_tcp(self)

    def _judged(self, decision: Decision) -> None:
        r = self.runner
        r.screening.discard(self)
        if self.lost or r.stopping:
            r.ctx.stats.release_tcp()
            if not self.lost:
                self.transport.loseConnection()
        elif isinstance(decision, Blocked):
            refuse(self, decision, r.ctx.stats, r.ctx.log, "commonTCPLoop")
        else:
            r.entry_tcp(self)


class _EntryFactory(Factory):
    noisy = False

    def __init__(self, runner: "DualEndRunner"):
        self.runner = runner

    def buildProtocol(self, addr: Any) -> Optional[EntryTCP]:
        if self.runner.stopping:
            return None
        return EntryTCP(self.runner)


class _TargetFactory(Factory):
    noisy = False
    protocol = RelayEnd

    def buildProtocol(self, addr: Any) -> RelayEnd:
        p = RelayEnd()
        p.factory = self
        return p


_TARGET_FACTORY = _TargetFactory()


class _ExitLaunch:
    """One TCP launch at the exit while its target is dialled: the
    dialler's callbacks (no Deferred per launch)."""

    __slots__ = ("runner", "origin", "conn")

    def __init__(self, runner: "DualEndRunner", origin: str, conn: PoolEnd):
        self.runner = runner
        self.origin = origin
        self.conn = conn

    def dialled(self, target: RelayEnd) -> None:
        runner = self.runner
        runner.launching -= 1
        try:
            runner._exit_dialed(target, self.origin, self.conn)
        except Exception:  # noqa: BLE001 - a launch's bug must not reach the dialler
            runner.ctx.log.error("Exit for %s failed: %s", self.origin, Failure().getErrorMessage())

    def failed(self, failure: Failure) -> None:
        runner = self.runner
        runner.launching -= 1
        try:
            runner._exit_dial_failed(failure, self.origin, self.conn)
        except Exception:  # noqa: BLE001
            runner.ctx.log.error("Exit for %s failed: %s", self.origin, Failure().getErrorMessage())


class _UDPOverPool:
    """Entry-side UDP session backend: datagrams written raw on a pool
    connection; each read coming back is one datagram (SPEC §5)."""

    def __init__(self, conn: PoolEnd, session: UDPSession, buf_size: int):
        self.conn = conn
        self.session = session
        self.buf_size = buf_size
        conn.attach(self)

    def send(self, datagram: bytes) -> None:
        t = self.conn.transport
        if t is not None and not self.conn.lost:
            t.write(datagram)

    def close(self) -> None:
        if not self.conn.lost and self.conn.transport is not None:
            self.conn.transport.loseConnection()

    # relay-sink interface of PoolEnd
    def forward(self, _end: PoolEnd, data: bytes) -> None:
        n = self.buf_size
        if len(data) <= n:
            self.session.reply(data)
        else:
            for i in range(0, len(data), n):
                self.session.reply(data[i : i + n])

    def end_lost(self, _end: PoolEnd) -> None:
        self.session.close()


class _PoolToTarget:
    """Exit-side UDP: a pool connection feeding a connected UDP socket."""

    def __init__(self, conn: PoolEnd, buf_size: int):
        self.conn = conn
        self.target: Optional[TargetUDP] = None
        self.buf_size = buf_size

    def forward(self, _end: PoolEnd, data: bytes) -> None:
        t = self.target
        if t is None:
            return
        n = self.buf_size
        if len(data) <= n:
            t.send(data)
        else:
            for i in range(0, len(data), n):
                t.send(data[i : i + n])

    def end_lost(self, _end: PoolEnd) -> None:
        if self.target is not None:
            self.target.close()

    def reply(self, datagram: bytes) -> None:
        if not self.conn.lost and self.conn.transport is not None:
            self.conn.transport.write(datagram)

    def close_conn(self) -> None:
        if not self.conn.lost and self.conn.transport is not None:
            self.conn.transport.loseConnection()


class DualEndRunner(Runner):
    """Control signals, both flows, TCP and UDP; subclasses set up the
    handshake, ``self.pool`` and ``self.control``."""

    role: Role = Role.SERVER

    def __init__(self, ctx: InstanceContext):
        super().__init__(ctx)
        cfg = ctx.config
        self.codec = Codec(cfg.tunnel_key)
        self.flow: Optional[Flow] = None
        self.tls_code = TLSCode.NONE
        self.pool_type = PoolType.TCP
        self.pool: Optional[IdlePool] = None
        self.control: Optional[ControlChannel] = None
        #: The wire generation of this run, settled by the handshake.
        self.generation = Wire.V112
        #: The 1.14 entry gate (SPEC-1.14 §3.5), on the entry side with TLS.
        self.gate: Optional[VerifyGate] = None
        self.exchange: Optional[FingerprintExchange] = None
        self.control_addr = ""  # ip:port of the control connection's far end
        self.stopping = False
        self.targets = TargetGroup(
            cfg.targets, ctx.reactor, ctx.log, dns_ttl=cfg.dns, dial=cfg.dial, timeout=ctx.tunables.tcp_dial_timeout
        )
        # Listening ports (IListeningPort: a zope interface, hence Any).
        self.entry_tcp_port: Any = None
        self.entry_udp_port: Any = None
        self.udp_listener: Optional[UDPSessionListener] = None
        self.relays: set[Relay] = set()
        self.screening: set[EntryTCP] = set()  # users whose first bytes block= is judging
        self.udp_bridges: set[_PoolToTarget] = set()
        self.peer_label = ""
        self.launching = 0  # exit-side launches not yet spliced
        #: ``block=`` (read once: every entry connection asks).
        self.blocked = ctx.config.blocked
        self._info = ctx.log.enabled("info")  # Go's per-connection lines
        #: Moves relays to splice(2) once they outlive a short exchange.
        self.splicer = splice.SpliceLater(ctx.reactor)
        # UDP launches the exit turns away at the slot limit: one summary
        # line per report interval, not one per launch.
        self.udp_dropped = DropReport(ctx.reactor, ctx.log, ctx.tunables.report_interval, "sessions")
        # TCP connections and launches turned away there: the first of a
        # quiet period logged as it comes, the rest in one summary line.
        self.tcp_refused = DropReport(
            ctx.reactor, ctx.log, ctx.tunables.report_interval, "connections", kind="TCP", verb="refused", first_alone=True
        )

    # -- shape ------------------------------------------------------------
    @property
    def quic(self) -> bool:
        """Whether pool connections are QUIC streams."""
        return self.pool_type is PoolType.QUIC

    @property
    def is_entry(self) -> bool:
        return (self.role is Role.SERVER) == (self.flow is Flow.REVERSE)

    @property
    def entry_port(self) -> int:
        """The actual TCP port of the entry listener (tests bind port 0)."""
        p = self.entry_tcp_port or self.entry_udp_port
        return p.getHost().port if p is not None else 0

    @property
    def entry_udp_port_number(self) -> int:
        return self.entry_udp_port.getHost().port if self.entry_udp_port is not None else 0

    def pool_idle(self) -> int:
        return self.pool.idle_count() if self.pool is not None else 0

    # -- entry listeners --------------------------------------------------
    def bind_entry(self) -> None:
        """Listen on the first target address for TCP and UDP (unless
        disabled).  Raises ``CannotListenError`` when either fails."""
        ctx = self.ctx
        cfg, t = ctx.config, ctx.tunables
        target = cfg.targets[0]
        host = target.host
        try:
            if not cfg.notcp:
                self.entry_tcp_port = ctx.reactor.listenTCP(target.port, _EntryFactory(self), interface=host)
                lean_accepts(self.entry_tcp_port)
            if not cfg.noudp:
                port = target.port
                if port == 0 and self.entry_tcp_port is not None:
                    port = self.entry_tcp_port.getHost().port
                self.udp_listener = UDPSessionListener(
                    self._open_udp_backend,
                    ctx.stats,
                    ctx.reactor,
                    ctx.log,
                    idle_timeout=t.udp_read_timeout,
                    buf_size=t.udp_data_buf_size,
                    count_traffic=True,
                    report_interval=t.report_interval,
                )
                self.entry_udp_port = ctx.reactor.listenUDP(
                    port, self.udp_listener, interface=host, maxPacketSize=t.udp_data_buf_size
                )
        except Exception:
            self._unbind_entry()
            raise

    def _unbind_entry(self) -> list[Deferred[Any]]:
        ds = []
        for attr in ("entry_tcp_port", "entry_udp_port"):
            p = getattr(self, attr)
            setattr(self, attr, None)
            if p is not None:
                ds.append(defer.maybeDeferred(p.stopListening))
        if self.udp_listener is not None:
            self.udp_listener.close_all()
        return ds

    # -- control ----------------------------------------------------------
    def make_control(self, transport: Any, working: bool = True) -> ControlChannel:
        """The control channel on ``transport``, in the dialect of
        ``self.generation``; ``working=False`` for a peer that has yet to
        show it speaks our key (see :class:`~nodepass.control.ControlChannel`)."""
        ctx = self.ctx
        no_delay(transport)
        try:
            self.control_addr = addr_text(transport.getPeer())
        except Exception:  # noqa: BLE001 - a transport already gone: no address to show
            self.control_addr = ""
        channel = ControlChannel(
            transport,
            dialect(self.generation, self.codec),
            ctx.reactor,
            ctx.tunables.report_interval,
            ctx.log,
            handler=self.on_signal,
            on_pong=self.on_pong,
            on_broken=lambda reason: self.control_broken(channel, reason),
            before_ping=self.check_pool,
            working=working,
            ping_at_once=self.generation is Wire.V114,
            each_read=DialBatch,  # the launches of one read dial their targets together
        )
        self.control = channel
        return channel

    def on_pong(self, ms: int) -> None:
        self.ctx.report(ms, self.pool_idle())

    def check_pool(self) -> None:
        pool = self.pool
        if pool is not None and pool.needs_flush():
            self.ctx.log.warn("Pool errors (%d) exceed half the idle connections (%d), flushing", pool.errors, pool.idle_count())
            if self.control is not None:  # it is: the control channel runs this check
                self.control.send(FLUSH)
            pool.flush()

    def control_broken(self, channel: ControlChannel, reason: str) -> None:
        """``channel`` is lost or silent: fatal for the run (SPEC §7)."""
        if self.generation is Wire.V114 and channel is self.control:
            self.ctx.log.debug("Control connection closed: %s", self.control_addr)
        if not self.stopping and channel is self.control:
            self.fail(reason)

    def on_signal(self, sig: Signal) -> None:
        kind = sig.kind
        log = self.ctx.log
        if kind in (codec.TCP_LAUNCH, codec.UDP_LAUNCH):
            tcp = kind == codec.TCP_LAUNCH
            if self.is_entry or (self.ctx.config.notcp if tcp else self.ctx.config.noudp):
                log.warn("Unexpected %s launch signal for %s ignored", "TCP" if tcp else "UDP", sig.id)
                return
            if self.launching >= self.ctx.tunables.semaphore_limit:
                # NP_SEMAPHORE_LIMIT bounds the launches being set up at once.
                log.error("Signal queue full (%d launches pending), dropping %s", self.launching, sig.host)
                return
            self.launching += 1
            if tcp:
                # Callback style: it counts the launch done itself.
                self.exit_tcp(sig.host, sig.id)
                return
            d = ensureDeferred(self.exit_udp(sig.host, sig.id))
            d.addErrback(lambda f: log.error("Exit for %s failed: %s", sig.host, f.getErrorMessage()))
            d.addBoth(self._launched)
        elif kind == codec.VERIFY:
            ensureDeferred(self.on_verify(sig)).addErrback(
                lambda f: log.error("TLS verify signal failed: %s", f.getErrorMessage())
            )
        elif kind == codec.FLUSH:
            n = self.pool.flush() if self.pool is not None else 0
            log.debug("Pool flushed on request: %d idle connections closed", n)
        else:
            log.debug("Unknown signal fragment ignored (%s)", codec.describe(kind))

    def _launched(self, _result: object) -> None:
        self.launching -= 1

    async def on_verify(self, sig: Signal) -> None:
        if self.generation is Wire.V114:
            # The exchange exists before the control connection's first
            # bytes are read (control_up_114), whenever there is TLS.
            if self.exchange is not None:
                self.exchange.received(sig)
            else:
                self.ctx.log.debug("TLS verify signal ignored: tls=0")
            return
        await self.on_verify_112(sig)

    async def on_verify_112(self, sig: Signal) -> None:
        """Overridden by the client (the side without the certificate)."""
        self.ctx.log.debug("TLS verify signal ignored on this side")

    # -- 1.14: the control connection is the first pool connection ----------
    def control_up_114(self, started: float) -> None:
        """The ``00000000`` connection carries the control channel (SPEC-1.14
        §3.3): say so, and start the fingerprint exchange with TLS."""
        ctx = self.ctx
        ms = int(round((ctx.reactor.seconds() - started) * 1000))
        ctx.log.info("Marking tunnel handshake as complete in %dms", ms)
        if not self.tls_code:
            if self.gate is not None:
                self.gate.open()
            return
        t = ctx.tunables
        if self.is_entry and self.gate is None:
            self.gate = VerifyGate(ctx.reactor)
        self.exchange = FingerprintExchange(
            self, ctx.log, ctx.reactor, t.pool_get_timeout, self.verify_deadline(),
            self.gate if self.is_entry else None, self.control_addr,
        )
        self.exchange.start()

    def verify_deadline(self) -> float:
        """How long the entry side waits for the peer's verify signal: a
        Go peer sends it at a report-interval tick, 1st or later, and then
        needs up to NP_POOL_GET_TIMEOUT for the connection it names."""
        t = self.ctx.tunables
        return 3 * t.report_interval + t.pool_get_timeout

    @abc.abstractmethod
    def own_view(self, conn: Any) -> str:
        """See :class:`~nodepass.modes.verify.ExchangeOwner` (the server's
        certificate, or the one the client was shown)."""

    def send_signal(self, sig: Signal) -> bool:
        control = self.control
        if control is None or control.broken:
            return False
        control.send(sig)
        return True

    # -- TCP --------------------------------------------------------------
    def _splice(self, target: RelayEnd, tunnel: RelayEnd) -> None:
        ctx = self.ctx
        # Go's per-connection INFO lines (dashboards show them, operators
        # grep them): the target-side peer, then the pool connection's.
        exchange = self._info
        if exchange:
            ctx.log.info("Starting exchange: %s <-> %s", peer_text(target.transport), peer_text(tunnel.transport))

        def closed() -> None:
            self.relays.discard(relay)
            ctx.stats.release_tcp()
            if exchange:
                ctx.log.info("Exchange complete: %s", relay.outcome)

        # QUIC streams do their own TLS: only a TCP pool has a TLS transport.
        # Only a TCP pool connection is a TLS transport of its own (QUIC,
        # WebSocket and HTTP/2 streams are transports over one).
        pool_tls = self.tls_code and self.pool_type is PoolType.TCP
        fast = pool_tls and tls_fast.ENABLED
        size = tls_fast.TLS_RELAY_BUFFER_SIZE if fast else RELAY_BUFFER_SIZE
        for end in (target, tunnel):
            t = end.transport
            if type(t) is LeanConnection:
                t.bufferSize = size
                t.setTcpNoDelay(True)
            else:
                _big_reads(t, size)
                no_delay(t)
        if pool_tls:
            tls_fast.release_on_tls_shutdown(tunnel)
            if fast:
                tls_fast.fast_tls(tunnel)
        relay = Relay(
            target, tunnel, ctx.stats, ctx.reactor, limiter=ctx.limiter, idle=ctx.config.read, on_close=closed
        )
        self.relays.add(relay)
        relay.start()
        if not self.tls_code and self.pool_type is PoolType.TCP and splice.AVAILABLE and not relay.closed:
            # Short exchanges are over before this fires (setting up two
            # pipes would cost them more than it saves); bulk transfers
            # move to splice(2) from here on.
            self.splicer.add(relay)

    def entry_wait(self) -> Optional[Deferred[None]]:
        """A Deferred to wait on before the entry takes pool connections, or
        None: the 1.14 gate until the peer's fingerprint checked out."""
        gate = self.gate
        if gate is None or gate.opened:
            return None
        return gate.wait(self.verify_deadline())

    # The per-connection paths below are callback style, not coroutines:
    # they run once per relayed connection and an idle pool connection is
    # usually there, so everything happens synchronously.

    def entry_tcp(self, user: EntryTCP) -> None:
        timeout = self.ctx.tunables.pool_get_timeout
        wait = self.entry_wait()
        pool = self.pool
        assert pool is not None  # made before the entry listens
        d: Deferred[Any]
        if wait is None:
            got = pool.take_any()
            if got is not None:  # the usual case: no Deferred
                self._entry_got(got, user)
                return
            d = pool.incoming_get(timeout)
        else:
            d = wait.addCallback(lambda _r: pool.incoming_get(timeout))
        d.addCallbacks(self._entry_got, self._entry_failed, callbackArgs=(user,), errbackArgs=(user,))

    def _entry_failed(self, failure: Failure, user: EntryTCP) -> None:
        ctx = self.ctx
        if not user.lost:
            ctx.log.error("TCP %s: no pool connection: %s", addr_text(user.transport.getPeer()), failure.getErrorMessage())
            user.transport.loseConnection()
        ctx.stats.release_tcp()

    def _entry_got(self, got: tuple[str, PoolEnd], user: EntryTCP) -> None:
        pool_id, conn = got
        control = self.control
        if user.lost or control is None or control.broken:
            conn.transport.loseConnection()
            if not user.lost:
                user.transport.loseConnection()
            self.ctx.stats.release_tcp()
            return
        control.send(Signal(codec.TCP_LAUNCH, addr_text(user.transport.getPeer()), pool_id))
        self._splice(user, conn)
        t = user.transport
        if type(t) is LeanConnection:
            # The user's first bytes (a request) follow the launch signal at
            # once, rather than a turn of the reactor later: about 7 % more
            # requests per second through a tunnel (docs/benchmarks.md, run
            # T).  (In single-end mode reading before the reactor says so
            # costs instead, and at the exit it gains nothing: see
            # nodepass.compat.twisted_fastpath.)
            t.read_now()

    def exit_tcp(self, origin: str, pool_id: str) -> None:
        """A TCP launch: the pool connection named ``pool_id`` (at once if
        it is here, else waited for), then the target dialled and the two
        spliced.  The launch counts as done (``launching``) once the target
        is connected or any step failed."""
        pool = self.pool
        assert pool is not None  # made before signals are read
        conn = pool.take(pool_id)
        if conn is not None:
            try:
                self._exit_got((pool_id, conn), origin)
            except Exception:  # noqa: BLE001 - as the Deferred path's errback
                self._exit_error(Failure(), origin)
            return
        d = pool.outgoing_get(pool_id, self.ctx.tunables.pool_get_timeout)
        d.addCallbacks(self._exit_got, self._exit_missed, callbackArgs=(origin,), errbackArgs=(origin,))
        d.addErrback(self._exit_error, origin)

    def _exit_error(self, failure: Failure, origin: str) -> None:
        self.ctx.log.error("Exit for %s failed: %s", origin, failure.getErrorMessage())
        self.launching -= 1

    def _exit_missed(self, failure: Failure, origin: str) -> None:
        self.launching -= 1
        if failure.check(PoolConnectionGone):
            # The user left before this end heard of it: nothing to do.
            self.ctx.log.debug("TCP launch %s: %s", origin, failure.getErrorMessage())
            return
        self.ctx.log.error("TCP launch %s: %s", origin, failure.getErrorMessage())

    def _exit_got(self, got: tuple[str, PoolEnd], origin: str) -> None:
        ctx = self.ctx
        conn = got[1]
        if not ctx.stats.acquire_tcp():
            self.launching -= 1
            if self.tcp_refused.drop(ctx.stats.slot_limit, origin):
                ctx.log.error("TCP slot limit reached (%d), dropping %s", ctx.stats.slot_limit, origin)
            conn.transport.loseConnection()
            return
        launch = _ExitLaunch(self, origin, conn)
        self.targets.connect(_TARGET_FACTORY, launch.dialled, launch.failed)

    def _exit_dial_failed(self, failure: Failure, origin: str, conn: PoolEnd) -> None:
        self.ctx.log.error("TCP %s: dial target failed: %s", origin, failure.getErrorMessage())
        conn.transport.loseConnection()
        self.ctx.stats.release_tcp()

    def _exit_dialed(self, target: RelayEnd, origin: str, conn: PoolEnd) -> None:
        ctx = self.ctx
        if conn.lost or self.stopping:
            target.transport.loseConnection()
            ctx.stats.release_tcp()
            return
        target.hold()
        if ctx.config.proxy:
            src = split_origin(origin)
            peer = target.transport.getPeer()
            if src is not None:
                target.transport.write(proxy_v1_header(src, (peer.host, peer.port)))
        self._splice(target, conn)


    # -- UDP --------------------------------------------------------------
    async def _open_udp_backend(self, session: UDPSession) -> _UDPOverPool:
        ctx = self.ctx
        wait = self.entry_wait()
        if wait is not None:
            await wait
        pool = self.pool
        assert pool is not None  # made before the entry listens
        pool_id, conn = await pool.incoming_get(ctx.tunables.pool_get_timeout)
        if session.closed or self.control is None or self.control.broken:
            conn.transport.loseConnection()
            raise TunnelError("UDP session ended before launch")
        origin = addr_text(session.addr)
        self.control.send(Signal(codec.UDP_LAUNCH, origin, pool_id))
        ctx.log.debug("UDP launch %s via pool %s", origin, pool_id)
        return _UDPOverPool(conn, session, ctx.tunables.udp_data_buf_size)

    async def exit_udp(self, origin: str, pool_id: str) -> None:
        ctx = self.ctx
        t = ctx.tunables
        pool = self.pool
        assert pool is not None  # made before signals are read
        try:
            _, conn = await pool.outgoing_get(pool_id, t.pool_get_timeout)
        except PoolConnectionGone as e:
            ctx.log.debug("UDP launch %s: %s", origin, e)
            return
        except Exception as e:  # noqa: BLE001
            ctx.log.error("UDP launch %s: %s", origin, e)
            return
        if not ctx.stats.acquire_udp():
            self.udp_dropped.drop(ctx.stats.slot_limit, origin)
            conn.transport.loseConnection()
            return
        bridge = _PoolToTarget(conn, t.udp_data_buf_size)
        released: list[int] = []

        def on_close() -> None:
            if not released:
                released.append(1)
                ctx.stats.release_udp()
                self.udp_bridges.discard(bridge)
            bridge.close_conn()

        try:
            ip, port, _target = await self.targets.resolve_next()
            source = self.targets.source
            try:
                target = open_target_udp(
                    ctx.reactor, ip, port, bridge.reply, on_close, ctx.stats, ctx.log,
                    count_traffic=True, idle_timeout=t.udp_read_timeout, buf_size=t.udp_data_buf_size, source=source,
                )
            except Exception as e:  # noqa: BLE001 - dial source unusable: fall back once
                if not source:
                    raise
                ctx.log.error("Dial source %s unusable for UDP (%s), falling back to auto", source, e)
                self.targets.source = None
                target = open_target_udp(
                    ctx.reactor, ip, port, bridge.reply, on_close, ctx.stats, ctx.log,
                    count_traffic=True, idle_timeout=t.udp_read_timeout, buf_size=t.udp_data_buf_size,
                )
        except Exception as e:  # noqa: BLE001
            ctx.log.error("UDP %s: open target failed: %s", origin, e)
            on_close()
            return
        bridge.target = target
        self.udp_bridges.add(bridge)
        conn.attach(bridge)

    # -- teardown ---------------------------------------------------------
    async def stop_common(self) -> None:
        self.stopping = True
        self.splicer.stop()
        self.udp_dropped.close()
        self.tcp_refused.close()
        if self.exchange is not None:
            self.exchange.stop()
        if self.gate is not None:
            self.gate.close("tunnel stopped")
        ds = self._unbind_entry()
        if self.control is not None:
            self.control.stop()
            if self.control.transport is not None:
                self.control.transport.loseConnection()
                self.control.broken = True
        if self.pool is not None:
            self.pool.close()
        for relay in list(self.relays):
            # Abort: a graceful close would wait for a stalled peer to read.
            for end in (relay.target, relay.tunnel):
                if not end.lost and end.transport is not None:
                    end.transport.abortConnection()
            relay.close()
        for bridge in list(self.udp_bridges):
            if bridge.target is not None:
                bridge.target.close()
        for user in list(self.screening):
            user.transport.abortConnection()  # its detection timer ends with it
        if ds:
            await defer.DeferredList(ds)
