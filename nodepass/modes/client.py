"""Client dual-end mode (``client://`` with ``mode=2``, or ``mode=0`` when
the tunnel address does not bind locally; SPEC §2-§4, SPEC-1.14 §3-§4).

The client dials the server's tunnel address and shakes hands in one of two
generations: 1.12 (its key line; the answer ``np://…`` arrives on the same
connection, which then carries the control channel) or 1.14 (an HTTP
``GET /`` with a Bearer token; the JSON answer closes that connection and
the first pool connection, ID ``00000000``, carries the control channel).
``wire=auto`` (the default) tries 1.14 first and falls back to 1.12 when
the server answers like a 1.12 server; the choice is kept across restarts
of the instance and revised when the server's answer shows the other
generation.  Either way the client learns the pool type, pool maximum,
flow and TLS code, then keeps a pool of pre-opened connections to the same
address.  A lost or silent control connection is a fatal error: the
service logs ``Client error:``, cools down and tries again, for as long as
the server stays away.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Optional, TypeVar

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

from nodepass.base.errors import error_text
from nodepass.base.kinds import ClientMode, PoolType, Role, TLSCode, Wire
from nodepass.config.urls import POOL_TYPE_NAMES
from nodepass.wire import v114
from nodepass.wire.codec import Signal, TunnelInfo
from nodepass.net.dialer import DNSCache, OneProtocolFactory, ResolveError
from nodepass.modes.base import InstanceContext, TunnelError
from nodepass.modes.control_client import ClientControlProtocol, HandshakeSettings, Server114
from nodepass.modes.handshake114 import HandshakeProtocol, Server112, handshake_uses_tls
from nodepass.compat.openssl_internals import session_reused
from nodepass.compat.twisted_fastpath import lean_connect
from nodepass.compat.twisted_tls import start_tls
from nodepass.pools.tcp import ClientPool
from nodepass.relay.tls_fast import release_tls
from nodepass.net.tls import (
    ResumingClient,
    handshake_tls_options,
    TLSVerificationFailed,
    client_context_factory,
    explain_verification_failure,
    is_verification_failure,
    peer_certificate_chain,
    peer_certificate_fingerprint,
)
from nodepass.modes.dualend import ControlSink, DualEndRunner, PoolEnd, addr_text

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
        # The TLS layer is in reference cycles with the TCP connection
        # (startTLS's bound methods, the fast path's closures): broken now
        # that everyone who wanted its certificate has seen it.
        release_tls(self.transport)

    def dial_failed(self, reason: Failure) -> None:
        """The TCP dial failed: so does ``ready``."""
        if not self.ready.called:
            self.ready.errback(reason)


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
        self.control_conn: Optional[ClientPoolConn] = None  # 1.14: the 00000000 pool connection
        self.handshake_proto: Optional[HandshakeProtocol] = None  # 1.14: the HTTP exchange
        self.ws_client: Any = None  # WebSocketPoolClient, with a WebSocket pool
        self.h2_client: Any = None  # H2PoolClient, with an HTTP/2 pool

    async def start(self) -> None:
        ctx = self.ctx
        cfg = ctx.config
        dns = DNSCache(cfg.dns, ctx.reactor)
        try:
            self.server_ip = server_ip = await dns.resolve(cfg.tunnel.host)
        except ResolveError as e:
            raise TunnelError(f"cannot reach the server at {cfg.tunnel}: {e}") from None
        memo = ctx.memo
        first = cfg.wire if cfg.wire is not Wire.AUTO else (memo.generation or Wire.V114)
        try:
            if first is Wire.V114:
                await self._start_114(server_ip)
            else:
                await self._start_112(server_ip)
        except Server112:
            if cfg.wire is not Wire.AUTO:
                raise TunnelError(
                    f"the server at {cfg.tunnel} speaks the 1.12 generation, but this client has wire=1.14"
                ) from None
            ctx.log.info("Server at %s speaks the 1.12 generation: falling back to 1.12", cfg.tunnel)
            memo.generation = Wire.V112
            await self._start_112(server_ip)
        except Server114:
            if cfg.wire is not Wire.AUTO:
                raise TunnelError(
                    f"the server at {cfg.tunnel} speaks the 1.14 generation, but this client has wire=1.12"
                ) from None
            ctx.log.info("Server at %s speaks the 1.14 generation: switching to 1.14", cfg.tunnel)
            memo.generation = Wire.V114
            await self._start_114(server_ip)
        memo.generation = self.generation
        if memo.announced is not self.generation:
            memo.announced = self.generation
            ctx.log.info("Tunnel generation: %s", self.generation)

    # -- 1.14 (SPEC-1.14 §3.2-§3.5) -------------------------------------------
    async def _start_114(self, server_ip: str) -> None:
        ctx = self.ctx
        cfg = ctx.config
        reactor = ctx.reactor
        ctx.log.info("Pending tunnel handshake...")
        started = reactor.seconds()
        https = handshake_uses_tls(cfg.tunnel.port)
        proto = HandshakeProtocol(
            v114.build_request(cfg.tunnel_key, cfg.server_name), reactor, ctx.tunables.handshake_timeout,
            str(cfg.tunnel), https=https,
        )
        self.handshake_proto = proto
        try:
            await self._connect(proto, server_ip, tls=https)
        except Exception as e:  # noqa: BLE001
            raise TunnelError(f"cannot reach the server at {cfg.tunnel}: {error_text(e)}") from None
        config = await proto.result
        if self.stopping:
            raise TunnelError("handshake abandoned: the client is stopping")
        ctx.log.info("Loading tunnel config: %s", config.log_fields())
        available = {"0": PoolType.TCP, "1": PoolType.QUIC, "2": PoolType.WEBSOCKET, "3": PoolType.HTTP2}
        if config.pool_type not in available:
            try:
                name = POOL_TYPE_NAMES[PoolType(int(config.pool_type))] + " pool"
            except ValueError:
                name = "an unknown pool type"
            raise TunnelError(
                f"the server asked for pool type {config.pool_type} ({name}), which is not available yet "
                "in this client (types 0-3 are: TCP, QUIC, WebSocket and HTTP/2 pools)"
            )
        self.generation = Wire.V114
        self.flow, self.tls_code, self.pool_type = config.flow, config.tls, available[config.pool_type]
        if self.pool_type in (PoolType.QUIC, PoolType.HTTP2):
            # QUIC and HTTP/2 pools always encrypt (SPEC-1.14 §1): tls 0 means 1.
            self.tls_code = max(TLSCode.RAM_CERT, config.tls)
        if self.quic:
            self._open_quic(server_ip, config.max, one_connection=True)
        elif self.pool_type is PoolType.WEBSOCKET:
            self._open_websocket(server_ip)
        elif self.pool_type is PoolType.HTTP2:
            self._open_h2(server_ip)
        ctx.log.info("Getting tunnel pool ready...")
        t = ctx.tunables
        pool = self._make_pool(config.max)
        pool.start()
        wait = t.handshake_timeout + t.pool_get_timeout
        try:
            _, conn = await pool.outgoing_get(CONTROL_ID, wait)
        except Exception as e:  # noqa: BLE001
            raise TunnelError(f"setControlConn: handshake timeout: no control connection within {wait:g}s ({e})") from None
        control = self.make_control(conn.transport)
        self.control_conn = conn
        # The exchange exists before the first bytes are read: they may hold
        # the server's verify already.
        self.control_up_114(started)
        conn.attach(ControlSink(control))
        if conn.lost:
            raise TunnelError("control connection lost right after the handshake")
        control.start()
        if self.is_entry:
            self.bind_entry()

    def _make_pool(self, max_pool: int) -> ClientPool:
        """The client's pool, sized within ``[min, max_pool]`` (SPEC §4)."""
        ctx = self.ctx
        t = ctx.tunables
        self.pool = ClientPool(
            self._dial_pool,
            ctx.config.min,
            max_pool,
            ctx.reactor,
            ctx.log,
            min_interval=t.min_pool_interval,
            max_interval=t.max_pool_interval,
            on_dial_error=self._pool_dial_error,
        )
        return self.pool

    def own_view(self, conn: Any) -> str:
        """The server's certificate as presented on ``conn``, else on the
        control connection (in 1.14 a TLS pool connection too)."""
        if conn is None:
            conn = self.control_conn
        return peer_certificate_fingerprint(conn.transport) if conn is not None else ""

    async def _connect(self, proto: Protocol, server_ip: str, tls: bool = False) -> Any:
        """Dial the server's tunnel address for ``proto``; fires once it is
        connected (after its ``connectionMade``).  An address literal needs
        no resolving: TCP6ClientEndpoint connects an IPv6 literal at once,
        TCP4ClientEndpoint an IPv4 one.  ``tls``: HTTPS verified against the
        system roots with the tunnel host's name (the port-443 rule)."""
        reactor = self.ctx.reactor
        port, timeout = self.ctx.config.tunnel.port, self.ctx.tunables.tcp_dial_timeout
        endpoint_type = TCP6ClientEndpoint if ":" in server_ip else TCP4ClientEndpoint
        endpoint: Any = endpoint_type(reactor, server_ip, port, timeout=timeout)
        if tls:
            endpoint = wrapClientTLS(handshake_tls_options(self.ctx.config.tunnel.host), endpoint)
        return await endpoint.connect(OneProtocolFactory(proto))

    # -- 1.12 (SPEC §3.2) -------------------------------------------------------
    async def _start_112(self, server_ip: str) -> None:
        ctx = self.ctx
        cfg = ctx.config
        reactor = ctx.reactor
        self.generation = Wire.V112
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
            await self._connect(proto, server_ip)
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
                self._open_quic(server_ip, info.max)
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
        pool = self._make_pool(info.max)
        control = self.make_control(proto.transport)
        control.start()
        if not machine.channel_ready(control) or proto.transport is None:
            raise TunnelError("control connection lost right after the handshake")
        pool.start()
        if rest:
            control.data_received(rest)

    def _open_quic(self, server_ip: str, max_pool: int, one_connection: bool = False) -> None:
        """The QUIC pool connections: 1.12 spreads the pool over one per 128
        streams (as Go 1.12); 1.14 uses exactly one, re-dialled when it dies,
        with no SNI unless tls=2, which verifies the ``sni`` name
        (SPEC-1.14 §4.3, §4.6)."""
        # Imported here: aioquic is only loaded by tunnels that use QUIC.
        from nodepass.pools.quic import QuicPoolClient, connections_for

        ctx = self.ctx
        cfg = ctx.config
        if one_connection:
            name = cfg.server_name if self.tls_code == TLSCode.CERT_FILES else ""
        else:
            name = cfg.tunnel.host
        self.quic_client = QuicPoolClient(
            ctx.reactor,
            ctx.log,
            (server_ip, cfg.tunnel.port),
            self.tls_code,
            name,
            ctx.tunables.report_interval,
            max_conns=1 if one_connection else connections_for(max_pool),
        )

    def _tls_ctx(self) -> Optional[ResumingClient]:
        if not self.tls_code:
            return None
        if self._tls_creator is None:
            # tls=2 verifies the server's name: the tunnel host in 1.12, the
            # sni value in 1.14 (SPEC-1.14 §4.6).
            cfg = self.ctx.config
            name = cfg.server_name if self.generation is Wire.V114 else cfg.tunnel.host
            self._tls_creator = ResumingClient(client_context_factory(self.tls_code, name))
        return self._tls_creator

    def _dial_pool(self) -> Deferred[ClientPoolConn]:
        if self.stopping:
            return defer.fail(TunnelError("stopping"))
        reactor = self.ctx.reactor
        conn = ClientPoolConn(reactor.seconds())
        if self.quic:
            return self._dial_quic(conn)
        if self.pool_type is PoolType.WEBSOCKET:
            return self._dial_stream(conn, self.ws_client)
        if self.pool_type is PoolType.HTTP2:
            return self._dial_stream(conn, self.h2_client)
        timeout = self.ctx.tunables.tcp_dial_timeout
        tls_ctx = self._tls_ctx()
        ip, port = self.server_ip, self.ctx.config.tunnel.port
        assert ip is not None  # resolved before the pool starts
        # A lean dial (nodepass.compat.twisted_fastpath): connected in this
        # turn, one per relayed connection.  With TLS, the handshake starts
        # over it as soon as it is connected (``startTLS``, as the server's
        # side does) -- not Twisted's ``connectSSL``, whose client transport,
        # connector and factory cost a reactor turn and a tenth of the
        # client's CPU per connection, and left reference cycles behind.
        connected = self._start_pool_tls if tls_ctx is not None else _connected
        conn.connector = lean_connect(reactor, ip, port, conn, connected, conn.dial_failed, timeout=timeout)
        dialing = self._dialing
        dialing.add(conn)
        # Each add*() returns this same Deferred (typed anew by Twisted's
        # stubs): ``d`` keeps the type its callbacks preserve.
        d = conn.ready
        d.addBoth(_forget, dialing, conn)
        if self.tls_code == TLSCode.CERT_FILES:
            d.addErrback(self._explain_tls_failure, conn)
        if tls_ctx is not None:
            d.addCallback(_remember_session, tls_ctx)
            if not self._verify_seen and self.generation is Wire.V112:
                d.addCallback(self._watch_for_verify)
        return d

    def _start_pool_tls(self, conn: ClientPoolConn) -> None:
        """A TLS pool connection's TCP connection is up: its TLS handshake
        starts (resuming the remembered session, see ``ResumingClient``);
        the server's 4-byte ID arrives over TLS once it is done."""
        transport = conn.transport
        if transport is None or conn.lost:
            return  # lost already (``ready`` has failed)
        start_tls(transport, self._tls_creator)

    def _open_websocket(self, server_ip: str) -> None:
        """The WebSocket pool (SPEC-1.14 §4.4): ``ws://`` for tls 0 (on port
        443 verified ``wss://`` instead, §1), ``wss://`` for tls 1
        (unverified) and 2 (verified); ``Host`` and the verified name are the
        tunnel host, never ``sni`` (§4.6).  Our Bearer token rides along so that our
        server accepts the upgrade from any address (a Go server ignores it)."""
        from nodepass.pools.ws import WebSocketPoolClient

        ctx = self.ctx
        cfg = ctx.config
        host = cfg.tunnel.host
        tls: Any = None
        if handshake_uses_tls(cfg.tunnel.port) and not self.tls_code:
            tls = handshake_tls_options(host)
        elif self.tls_code:
            tls = client_context_factory(self.tls_code, host)
        self.ws_client = WebSocketPoolClient(
            ctx.reactor, ctx.log, server_ip, cfg.tunnel.port, host, tls,
            connect_timeout=ctx.tunables.tcp_dial_timeout, bearer=v114.token(cfg.tunnel_key),
        )

    def _open_h2(self, server_ip: str) -> None:
        """The HTTP/2 pool (SPEC-1.14 §4.5): one TLS connection with ALPN
        h2, a stream per pool connection; ``:authority`` and (tls=2) the
        verified name are the ``sni`` value, tls=1 sends no SNI (§4.6)."""
        from nodepass.pools.h2pool import H2PoolClient, h2_client_context

        ctx = self.ctx
        cfg = ctx.config
        self.h2_client = H2PoolClient(
            ctx.reactor, ctx.log, server_ip, cfg.tunnel.port, cfg.server_name,
            h2_client_context(self.tls_code, cfg.server_name), ctx.tunables.report_interval,
            ctx.tunables.tcp_dial_timeout,
        )

    def _dial_stream(self, conn: ClientPoolConn, client: Any) -> Deferred[ClientPoolConn]:
        """A new pool connection of a WebSocket or HTTP/2 pool: ``client``
        opens it (the upgrade; the stream's HEADERS and byte), then the
        server's 4-byte ID arrives as its first bytes."""
        dialing = self._dialing
        dialing.add(conn)
        d = client.open_stream(conn)
        d.addCallback(lambda _stream: conn.ready)
        d.addBoth(_forget, dialing, conn)
        if self.tls_code == TLSCode.CERT_FILES and self.pool_type is PoolType.WEBSOCKET:
            # (The HTTP/2 pool explains a refused certificate itself.)
            d.addErrback(self._explain_tls_failure, conn)
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
        cfg = self.ctx.config
        name = cfg.server_name if self.generation is Wire.V114 else cfg.tunnel.host
        by_sni = self.generation is Wire.V114 and self.pool_type is not PoolType.WEBSOCKET
        if not by_sni:
            name = cfg.tunnel.host  # 1.12, and the WebSocket pool (§4.6)
        text = explain_verification_failure(
            failure, name, peer_certificate_chain(conn.transport), sni=by_sni
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
        if self.generation is Wire.V114:
            return super().entry_wait()
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

    async def on_verify_112(self, sig: Signal) -> None:
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
        hs = self.handshake_proto
        if hs is not None and hs.transport is not None and not hs.result.called:
            hs.transport.abortConnection()
        for conn in list(self._dialing):
            if conn.transport is not None:
                conn.transport.abortConnection()
            elif conn.connector is not None:
                connector = conn.connector
                if hasattr(connector, "stopConnecting"):
                    connector.stopConnecting()
                else:
                    connector.cancel()  # a lean dial
        await self.stop_common()
        if self.quic_client is not None:
            await self.quic_client.close()
        if self.ws_client is not None:
            self.ws_client.close()
        if self.h2_client is not None:
            await self.h2_client.close()
        if self.control_proto is not None:
            self.control_proto.machine.close()


#: The pool ID of the 1.14 control connection (SPEC-1.14 §3.3).
CONTROL_ID = "00000000"


def _remember_session(conn: ClientPoolConn, creator: ResumingClient) -> ClientPoolConn:
    # The ID follows the server's session tickets, so the session is
    # resumable by now.  Kept from the first full handshake, and again from
    # any later one: when the server stops resuming ours (the ticket's two
    # hours are up, the server restarted), every pool connection after it
    # would otherwise pay a full handshake.
    transport = conn.transport
    if transport is not None and (creator.session is None or not session_reused(transport.getHandle())):
        creator.remember(transport)
    return conn


def _connected(_conn: ClientPoolConn) -> None:
    """A lean pool dial connected: the connection reads its ID from here."""


def _forget(result: _T, dialing: set[ClientPoolConn], conn: ClientPoolConn) -> _T:
    dialing.discard(conn)
    return result


def _looks_like_tls_failure(exc: BaseException) -> bool:
    value = getattr(exc, "value", exc)
    name = type(value).__name__
    mod = type(value).__module__
    return "SSL" in mod or "service_identity" in mod or "Verification" in name or "certificate" in str(value).lower()
