"""Client dual-end mode (``client://`` with ``mode=2``, or ``mode=0`` when
the tunnel address does not bind locally; SPEC §2-§4).

The client dials the server's tunnel address, sends its key, learns the
pool type, pool maximum, flow and TLS code from the answer, then keeps a
pool of pre-opened connections to the same address.  A lost or silent
control connection is a fatal error: the service logs ``Client error:``,
cools down and tries again, for as long as the server stays away.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Optional, TypeVar

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import ClientFactory, Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from nodepass.base.errors import error_text
from nodepass.base.kinds import ClientMode, Role, TLSCode
from nodepass.wire.codec import Signal, TunnelInfo
from nodepass.net.dialer import DNSCache, ResolveError
from nodepass.modes.base import InstanceContext, TunnelError
from nodepass.modes.control_client import ClientControlProtocol, HandshakeSettings
from nodepass.pools.tcp import ClientPool
from nodepass.net.tls import (
    ResumingClient,
    TLSVerificationFailed,
    client_context_factory,
    explain_verification_failure,
    is_verification_failure,
    peer_certificate_chain,
    peer_certificate_fingerprint,
)
from nodepass.modes.dualend import DualEndRunner, PoolEnd, addr_text

if TYPE_CHECKING:
    from nodepass.pools.quic import QuicPoolClient

_T = TypeVar("_T")

#: SPEC §4: the client reads the 4-byte pool ID within one minute.
POOL_ID_TIMEOUT = 60.0


class ClientPoolConn(PoolEnd):
    """One pool connection: reads the 4-byte ID, then is a relay end.

    ``ready`` fires with the connection once its ID is in, or fails (dial
    error, closed early, or :meth:`expire` after the one-minute limit --
    checked by the runner's periodic sweep rather than a timer per
    connection, since this runs for every relayed connection)."""

    connector: Any = None  # IConnector of a TCP dial in progress

    def __init__(self, started: float):
        super().__init__()
        self.ready: Deferred[ClientPoolConn] = Deferred()
        self.started = started
        self._id_buf = b""

    def expire(self) -> None:
        if not self.ready.called:
            self.ready.errback(TunnelError("pool ID not received in time"))
            if self.transport is not None:
                self.transport.abortConnection()

    def dataReceived(self, data: bytes | memoryview) -> None:
        if self.ready.called:
            PoolEnd.dataReceived(self, data)
            return
        buf = self._id_buf + data
        if len(buf) < 4:
            self._id_buf = buf
            return
        self._id_buf = b""
        self.pool_id = buf[:4].hex()
        self.ready.callback(self)
        if len(buf) > 4:
            PoolEnd.dataReceived(self, buf[4:])

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if not self.ready.called:
            self.ready.errback(reason)
        PoolEnd.connectionLost(self, reason)


class _PoolConnFactory(ClientFactory):
    """Connects one :class:`ClientPoolConn`; a failed dial fails its
    ``ready``.

    Pool connections keep this factory rather than an endpoint: one is
    dialled for every relayed connection, and an endpoint would add its
    wrapping factory, wrapping protocol and Deferred to each of them (and
    a call per chunk wherever the relay does not bypass the protocol)."""

    noisy = False

    def __init__(self, conn: ClientPoolConn):
        self.conn = conn

    def buildProtocol(self, addr: Any) -> ClientPoolConn:
        return self.conn

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if not self.conn.ready.called:
            self.conn.ready.errback(reason)


class _Given(Factory):
    """The factory of one given protocol, for an endpoint's ``connect``:
    :func:`~twisted.internet.endpoints.connectProtocol` without its
    "Starting factory" log line (its factory is noisy)."""

    noisy = False

    def __init__(self, proto: Protocol):
        self.proto = proto

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.proto


class ClientRunner(DualEndRunner):
    """``client://`` in dual-end mode; the
    :class:`~nodepass.modes.control_client.ControlOwner` of its control
    connection."""

    role = Role.CLIENT
    mode: int = ClientMode.DUAL_END
    pool: Optional[ClientPool]

    def __init__(self, ctx: InstanceContext):
        super().__init__(ctx)
        self.server_ip: Optional[str] = None
        self.info: Optional[TunnelInfo] = None
        self.control_proto: Optional[ClientControlProtocol] = None
        self._last_tls_error = 0.0
        self._dialing: set[ClientPoolConn] = set()
        self._verify_gate: Optional[Deferred[None]] = None
        self._tls_creator: Optional[ResumingClient] = None
        # Fingerprints of TLS pool connections that died idle before the
        # verify signal came: a Go server closes the connection it names in
        # that signal right after sending it, so the close may overtake it.
        self._lost_fps: dict[str, str] = {}
        self._verify_seen = False
        self.quic_client: Optional[QuicPoolClient] = None  # with quic=1

    async def start(self) -> None:
        ctx = self.ctx
        cfg = ctx.config
        reactor = ctx.reactor
        dns = DNSCache(cfg.dns, reactor)
        try:
            self.server_ip = server_ip = await dns.resolve(cfg.tunnel.host)
        except ResolveError as e:
            raise TunnelError(f"cannot reach the server at {cfg.tunnel}: {e}") from None
        proto = ClientControlProtocol(self, HandshakeSettings(
            clock=reactor,
            log=ctx.log,
            codec=self.codec,
            tunnel_key=cfg.tunnel_key,
            server=str(cfg.tunnel),
            handshake_timeout=ctx.tunables.handshake_timeout,
        ))
        self.control_proto = proto
        machine = proto.machine
        try:
            await self._connect_control(proto, server_ip)
        except Exception as e:  # noqa: BLE001
            raise TunnelError(f"cannot reach the server at {cfg.tunnel}: {error_text(e)}") from None
        info, rest = await machine.answer
        self.info = info
        ctx.log.info("Tunnel signal <- : %s <- %s", info.payload(), cfg.tunnel)
        if proto.transport is not None:
            ctx.log.info(
                "Tunnel handshaked: %s <-> %s", addr_text(proto.transport.getHost()), addr_text(proto.transport.getPeer())
            )
        pool_type = info.known_pool_type
        if pool_type is None:
            machine.close()
            raise TunnelError(f"server asked for pool type {info.pool_type}, which this client does not know")
        self.flow, self.tls_code, self.pool_type = info.flow, info.tls_code, pool_type
        if self.quic:
            # QUIC always encrypts: a server announcing tls 0 is treated as 1.
            self.tls_code = max(TLSCode.RAM_CERT, info.tls_code)
            try:
                self._open_quic(server_ip, info)
            except Exception:
                machine.close()
                raise
        if self.tls_code and self.is_entry:
            self._verify_gate = Deferred()
        if self.is_entry:
            try:
                self.bind_entry()
            except Exception:
                machine.close()
                raise
        t = ctx.tunables
        self.pool = pool = ClientPool(
            self._dial_pool,
            cfg.min,
            info.max,
            reactor,
            ctx.log,
            min_interval=t.min_pool_interval,
            max_interval=t.max_pool_interval,
            on_dial_error=self._pool_dial_error,
        )
        control = self.make_control(proto.transport)
        control.start()
        if not machine.channel_ready(control) or proto.transport is None:
            raise TunnelError("control connection lost right after the handshake")
        pool.start()
        if rest:
            control.data_received(rest)

    def _open_quic(self, server_ip: str, info: TunnelInfo) -> None:
        # Imported here: aioquic is only loaded by tunnels that use QUIC.
        from nodepass.pools.quic import QuicPoolClient, connections_for

        ctx = self.ctx
        self.quic_client = QuicPoolClient(
            ctx.reactor,
            ctx.log,
            (server_ip, ctx.config.tunnel.port),
            self.tls_code,
            ctx.config.tunnel.host,
            ctx.tunables.report_interval,
            max_conns=connections_for(info.max),
        )

    def _connect_control(self, proto: ClientControlProtocol, server_ip: str) -> Deferred[Any]:
        """Dial the server's tunnel address for the control connection;
        fires once ``proto`` is connected (after its ``connectionMade``).
        An address literal needs no resolving: TCP6ClientEndpoint connects
        an IPv6 literal at once, TCP4ClientEndpoint an IPv4 one."""
        reactor = self.ctx.reactor
        port, timeout = self.ctx.config.tunnel.port, self.ctx.tunables.tcp_dial_timeout
        endpoint_type = TCP6ClientEndpoint if ":" in server_ip else TCP4ClientEndpoint
        endpoint = endpoint_type(reactor, server_ip, port, timeout=timeout)
        # A Factory provides IProtocolFactory (zope's @implementer, which
        # mypy cannot see without the mypy-zope plugin).
        return endpoint.connect(_Given(proto))  # type: ignore[arg-type]

    def _tls_ctx(self) -> Optional[ResumingClient]:
        if not self.tls_code:
            return None
        if self._tls_creator is None:
            self._tls_creator = ResumingClient(client_context_factory(self.tls_code, self.ctx.config.tunnel.host))
        return self._tls_creator

    def _dial_pool(self) -> Deferred[ClientPoolConn]:
        if self.stopping:
            return defer.fail(TunnelError("stopping"))
        reactor = self.ctx.reactor
        conn = ClientPoolConn(reactor.seconds())
        if self.quic:
            return self._dial_quic(conn)
        factory = _PoolConnFactory(conn)
        timeout = self.ctx.tunables.tcp_dial_timeout
        tls_ctx = self._tls_ctx()
        ip, port = self.server_ip, self.ctx.config.tunnel.port
        if tls_ctx is not None:
            conn.connector = reactor.connectSSL(ip, port, factory, tls_ctx, timeout=timeout)
        else:
            conn.connector = reactor.connectTCP(ip, port, factory, timeout=timeout)
        dialing = self._dialing
        dialing.add(conn)
        # Each add*() returns this same Deferred (typed anew by Twisted's
        # stubs): ``d`` keeps the type its callbacks preserve.
        d = conn.ready
        d.addBoth(_forget, dialing, conn)
        if self.tls_code == TLSCode.CERT_FILES:
            d.addErrback(self._explain_tls_failure, conn)
        if tls_ctx is not None:
            if tls_ctx.session is None:
                d.addCallback(_remember_session, tls_ctx)
            if not self._verify_seen:
                d.addCallback(self._watch_for_verify)
        return d

    def _dial_quic(self, conn: ClientPoolConn) -> Deferred[ClientPoolConn]:
        """A new stream on the QUIC pool connection: our handshake byte,
        then the server's 4-byte ID (SPEC §4)."""
        assert self.quic_client is not None  # opened in start() with a QUIC pool
        dialing = self._dialing
        dialing.add(conn)

        def opened(transport: Any) -> Deferred[ClientPoolConn]:
            transport.write(b"\x00")
            return conn.ready

        d = self.quic_client.open_stream(conn)
        d.addCallback(opened)
        d.addBoth(_forget, dialing, conn)
        if not self._verify_seen:
            d.addCallback(self._watch_for_verify)
        return d

    def _explain_tls_failure(self, failure: Failure, conn: ClientPoolConn) -> Failure:
        """A tls=2 pool connection that failed on the server's certificate
        fails with the reason in words (which names the certificate has,
        whether it is self-signed, ...), read from the certificates the
        server sent while they are still at hand."""
        if not is_verification_failure(failure):
            return failure
        text = explain_verification_failure(
            failure, self.ctx.config.tunnel.host, peer_certificate_chain(conn.transport)
        )
        raise TLSVerificationFailed(text)

    def _watch_for_verify(self, conn: ClientPoolConn) -> ClientPoolConn:
        conn.on_lost(lambda _reason: self._idle_lost(conn))
        return conn

    def _idle_lost(self, conn: ClientPoolConn) -> None:
        if self._verify_seen or conn.relay is not None or len(self._lost_fps) >= 1024:
            return
        fp = peer_certificate_fingerprint(conn.transport)
        if fp and conn.pool_id:
            self._lost_fps[conn.pool_id] = fp

    def check_pool(self) -> None:
        """Before each ping: drop pool connections whose ID is late (SPEC §4:
        one minute), then the common pool health check."""
        now = self.ctx.reactor.seconds()
        for conn in [c for c in self._dialing if now - c.started >= POOL_ID_TIMEOUT]:
            conn.expire()
        super().check_pool()

    def _pool_dial_error(self, exc: BaseException) -> None:
        ctx = self.ctx
        text = error_text(exc)
        value = getattr(exc, "value", exc)
        quic_down = False
        if self.quic:
            from nodepass.pools.quic import QuicHandshakeError, QuicTLSVerificationError

            quic_down = isinstance(value, QuicHandshakeError) and not isinstance(value, QuicTLSVerificationError)
        is_tls = self.tls_code and not quic_down and _looks_like_tls_failure(exc)
        now = time.monotonic()
        due = now - self._last_tls_error >= max(1.0, ctx.tunables.report_interval)
        if is_tls and due:
            self._last_tls_error = now
            ctx.log.error(
                "TLS verification of the server %s failed (tls=%d): %s -- pool connection refused",
                ctx.config.tunnel, self.tls_code, text,
            )
        elif quic_down and due:
            self._last_tls_error = now
            ctx.log.error(
                "QUIC pool connection to the server %s (UDP) failed: %s -- is its UDP port reachable?",
                ctx.config.tunnel, text,
            )
        else:
            ctx.log.debug("Pool connection failed: %s", text)

    def entry_wait(self) -> Optional[Deferred[None]]:
        gate = self._verify_gate
        if gate is None or gate.called:
            return None
        d: Deferred[None] = Deferred()

        def passed(result: object) -> object:
            if not d.called:
                d.callback(None)
            return result

        gate.addBoth(passed)
        d.addTimeout(self.ctx.tunables.pool_get_timeout, self.ctx.reactor)

        def timed_out(failure: Failure) -> None:
            failure.trap(defer.TimeoutError)
            self._open_gate()  # no verify signal: go on without it

        return d.addErrback(timed_out)

    def _open_gate(self) -> None:
        gate = self._verify_gate
        if gate is not None and not gate.called:
            gate.callback(None)

    async def on_verify(self, sig: Signal) -> None:
        try:
            await self._verify_conn(sig)
        finally:
            self._open_gate()

    async def _verify_conn(self, sig: Signal) -> None:
        ctx = self.ctx
        self._verify_seen = True
        lost_fps, self._lost_fps = self._lost_fps, {}
        pool = self.pool
        assert pool is not None  # made before signals are read
        if sig.id in lost_fps and sig.id not in pool.idle:
            # Already closed by the server (Go does that): still log it.
            ctx.log.info("TLS cert verified: %s", lost_fps[sig.id])
            return
        _, conn = await pool.outgoing_get(sig.id, ctx.tunables.pool_get_timeout)
        fp = peer_certificate_fingerprint(conn.transport)
        if fp:
            ctx.log.info("TLS cert verified: %s", fp)
        else:
            ctx.log.warn("TLS verify signal, but pool connection %s has no peer certificate", sig.id)
        conn.transport.loseConnection()

    async def stop(self) -> None:
        self.stopping = True
        self._open_gate()
        for conn in list(self._dialing):
            if conn.transport is not None:
                conn.transport.abortConnection()
            elif conn.connector is not None:
                conn.connector.stopConnecting()
        await self.stop_common()
        if self.quic_client is not None:
            await self.quic_client.close()
        if self.control_proto is not None:
            self.control_proto.machine.close()


def _remember_session(conn: ClientPoolConn, creator: ResumingClient) -> ClientPoolConn:
    # The ID follows the server's session tickets, so the session is
    # resumable by now.
    if conn.transport is not None:
        creator.remember(conn.transport)
    return conn


def _forget(result: _T, dialing: set[ClientPoolConn], conn: ClientPoolConn) -> _T:
    dialing.discard(conn)
    return result


def _looks_like_tls_failure(exc: BaseException) -> bool:
    value = getattr(exc, "value", exc)
    name = type(value).__name__
    mod = type(value).__module__
    return "SSL" in mod or "service_identity" in mod or "Verification" in name or "certificate" in str(value).lower()
