"""Server mode (``server://``, SPEC §2-§4, SPEC-1.14 §3-§4).

One TCP listener on the tunnel address carries everything that arrives
there, for both wire generations (``wire=auto``, the default; ``wire=1.12``
or ``wire=1.14`` serves one only):

* 1.12: the client's key line, whose connection then carries the control
  channel, and "what is my IP" HTTP probes;
* 1.14: the client's ``GET /`` with ``Authorization: Bearer``, answered with
  the tunnel config in JSON and closed; the first pool connection after it
  (ID ``00000000``) carries the control channel;
* after either handshake, only from the handshake's IP, pool connections,
  which get TLS (``tls>=1``) and a random 4-byte ID.

Anything else (wrong keys, garbage, half-open sockets) is logged and closed
without disturbing a running tunnel.  Each of those connections runs the
state machine of :mod:`nodepass.modes.tunnel_port`; :class:`ServerRunner`
is its :class:`~nodepass.modes.tunnel_port.PortOwner`.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Any, Optional

from twisted.internet import defer
from twisted.internet.protocol import Factory

from nodepass.base.kinds import Flow, PoolType, Role, ServerMode, TLSCode, Wire
from nodepass.wire import codec, v114
from nodepass.wire.codec import Signal
from nodepass.wire.control import ControlChannel
from nodepass.pools.tcp import ServerPool
from nodepass.net.tls import ServerCredentials, host_certificate_fingerprint
from nodepass.compat.twisted_fastpath import lean_accepts
from nodepass.modes.base import InstanceContext
from nodepass.modes.dualend import ControlSink, DualEndRunner, PoolEnd, addr_text
from nodepass.modes.tunnel_port import (
    Admission,
    Adopted,
    PortSettings,
    PortState,
    TunnelPortMachine,
    TunnelPortProtocol,
)
from nodepass.modes.verify import VerifyGate

#: The pool ID of the 1.14 control connection (SPEC-1.14 §3.3).
CONTROL_ID = b"\x00\x00\x00\x00"

if TYPE_CHECKING:
    from nodepass.pools.quic import QuicPoolServer


class QuicPoolStream(PoolEnd):
    """A stream the client opened on its QUIC pool connection: one
    handshake byte from the client, then the pool ID from us (SPEC §4).
    Its whole life is NEW -> POOLED (or CLOSED when the pool refuses it)."""

    def __init__(self, runner: "ServerRunner"):
        super().__init__()
        self.runner = runner
        self.state = PortState.NEW

    def dataReceived(self, data: bytes | memoryview) -> None:
        if self.state is PortState.NEW:
            self.state = PortState.POOLED
            if self.runner.adopt(self) is Adopted.REFUSED:
                self.state = PortState.CLOSED
                self.transport.loseConnection()
                return
            data = data[1:]
            if not data:
                return
        if self.state is PortState.POOLED:
            PoolEnd.dataReceived(self, data)


class StreamPoolEnd(PoolEnd):
    """A WebSocket of the 1.14 WebSocket pool: once attached, the pool (or
    the control channel) takes it and writes its ID as the first message."""

    def __init__(self, runner: "ServerRunner"):
        super().__init__()
        self.runner = runner

    def connectionMade(self) -> None:
        super().connectionMade()
        if self.runner.adopt(self) is Adopted.REFUSED:
            self.transport.loseConnection()


class _TunnelPortFactory(Factory):
    noisy = False

    def __init__(self, runner: "ServerRunner", settings: PortSettings):
        self.runner = runner
        self.settings = settings

    def buildProtocol(self, addr: Any) -> Optional[TunnelPortProtocol]:
        if self.runner.stopping:
            return None
        return TunnelPortProtocol(self.runner, self.settings)


class ServerRunner(DualEndRunner):
    """``server://``: listens on the tunnel address, waits for one client.

    It is the :class:`~nodepass.modes.tunnel_port.PortOwner` of every
    connection on its tunnel port: it admits them by source IP, keeps the
    pool they register in, and tells them when a rival won the handshake,
    when the control candidate is gone and when it stops."""

    role = Role.SERVER
    mode: int = ServerMode.FORWARD  # until start() has tried the target address
    pool: Optional[ServerPool]

    def __init__(self, ctx: InstanceContext):
        super().__init__(ctx)
        self.creds: Optional[ServerCredentials] = None
        self.tunnel_port: Any = None  # IListeningPort
        self.control_ip: Optional[str] = None
        self.control_peer = ""
        self.port_conns: set[TunnelPortMachine] = set()
        self._verified = False
        self._verify_conn: Optional[PoolEnd] = None
        self._verify_timer: Any = None  # IDelayedCall
        self.quic_port: Any = None  # IListeningPort
        self.quic_server: Optional[QuicPoolServer] = None  # with quic=1
        # 1.14: answered, waiting for the first pool connection (the control).
        self._answered_at: Optional[float] = None
        self._control_timer: Any = None  # IDelayedCall
        self._bearer_value: Optional[bytes] = None  # see _bearer()

    @property
    def tunnel_port_number(self) -> int:
        return self.tunnel_port.getHost().port if self.tunnel_port is not None else 0

    async def start(self) -> None:
        ctx = self.ctx
        cfg = ctx.config
        self.pool_type = PoolType(cfg.quic)
        self.creds = creds = ServerCredentials.from_config(
            cfg.tls, cfg.crt, cfg.key, ctx.log, ctx.tunables.reload_interval, ctx.reactor,
            common_name=cfg.tunnel.host or "nodepass",
        )
        self.tls_code = TLSCode(creds.tls_code)
        # The pool exists from the start so that user connections arriving
        # before the client joins wait for it (up to NP_POOL_GET_TIMEOUT).
        self.pool = ServerPool(cfg.max, ctx.reactor, ctx.log)
        if cfg.mode == ServerMode.REVERSE:
            self.bind_entry()
            self.flow, self.mode = Flow.REVERSE, ServerMode.REVERSE
        elif cfg.mode == ServerMode.FORWARD:
            self.flow, self.mode = Flow.FORWARD, ServerMode.FORWARD
        else:
            try:
                self.bind_entry()
            except Exception as e:  # noqa: BLE001 - cannot bind: forward mode
                ctx.log.debug("Target %s does not bind locally (%s): forward mode", cfg.targets[0], e)
                self.flow, self.mode = Flow.FORWARD, ServerMode.FORWARD
            else:
                self.flow, self.mode = Flow.REVERSE, ServerMode.REVERSE
        if self.tls_code and self.flow is Flow.REVERSE and cfg.effective_wire is not Wire.V112:
            # Users who arrive before a 1.14 client verified wait here; a
            # 1.12 handshake opens it at once (1.12 has no entry gate).
            self.gate = VerifyGate(ctx.reactor)
        settings = PortSettings(
            clock=ctx.reactor,
            log=ctx.log,
            codec=self.codec,
            handshake_timeout=ctx.tunables.handshake_timeout,
            pool_get_timeout=ctx.tunables.pool_get_timeout,
            wire=cfg.effective_wire,
        )
        try:
            self.tunnel_port = ctx.reactor.listenTCP(
                cfg.tunnel.port, _TunnelPortFactory(self, settings), backlog=1024, interface=cfg.tunnel.host
            )
            # Pool connections arrive one per relayed connection: lean
            # transports (nodepass.compat.twisted_fastpath).
            lean_accepts(self.tunnel_port)
        except Exception:
            await defer.DeferredList(self._unbind_entry())
            raise
        # A QUIC pool: 1.12's (quic=1, which serves 1.12 only) or 1.14's (type=1).
        quic_114 = cfg.type is PoolType.QUIC and cfg.effective_wire is not Wire.V112
        stream_pool = cfg.type in (PoolType.QUIC, PoolType.HTTP2) and cfg.effective_wire is not Wire.V112
        if self.quic or quic_114:
            try:
                self._listen_quic(creds, peer_streams=cfg.max if quic_114 else None)
            except Exception:
                await defer.DeferredList(self._unbind_entry() + [defer.maybeDeferred(self.tunnel_port.stopListening)])
                self.tunnel_port = None
                raise
        level, line = creds.code_line(quic=self.quic, stream_pool=stream_pool)
        getattr(ctx.log, level)(line)
        if self.tls_code:
            ctx.log.debug("TLS certificate: %s", creds.fingerprint)

    def after_start(self) -> None:
        if self.ctx.config.effective_wire is not Wire.V112:
            self.ctx.log.info("Pending tunnel handshake...")

    def _listen_quic(self, creds: ServerCredentials, peer_streams: Optional[int] = None) -> None:
        """The tunnel's UDP port for the QUIC pool (same number as the TCP
        port); it answers only the control connection's IP.  A 1.14 client
        gets ``max`` streams on its one connection, a 1.12 client 128 on
        each of several (SPEC-1.14 §4.3)."""
        # Imported here: aioquic is only loaded by tunnels that use QUIC.
        from nodepass.pools.quic import MAX_STREAMS_PER_CONN, QuicPoolServer

        ctx = self.ctx
        self.quic_server = QuicPoolServer(
            ctx.reactor,
            ctx.log,
            creds.quic_material,
            lambda: self.control_ip,
            self._quic_stream,
            ctx.tunables.report_interval,
            peer_streams=peer_streams or MAX_STREAMS_PER_CONN,
        )
        self.quic_port = ctx.reactor.listenUDP(
            self.tunnel_port_number, self.quic_server, interface=ctx.config.tunnel.host, maxPacketSize=65535
        )

    def _quic_stream(self, transport: Any) -> None:
        # QuicPoolStream turns it away when stopping or the pool is full.
        transport.attach(QuicPoolStream(self))

    def _ws_stream(self, transport: Any) -> None:
        """An upgraded WebSocket or an accepted HTTP/2 stream: a pool
        connection, its ID written at once."""
        transport.attach(StreamPoolEnd(self))

    # -- PortOwner: what tunnel-port connections ask --------------------------
    def admit(self, port: TunnelPortMachine, peer_host: str) -> Admission:
        """A new connection on the tunnel port.  After the handshake, the
        control connection's IP opens pool connections (SPEC §3.2 step 6)
        -- over TCP only with a TCP pool; anyone else is a newcomer."""
        self.port_conns.add(port)
        pool = self.pool
        if self.stream_pool and pool is not None:
            # SPEC-1.14 §3.2.1: WebSocket and HTTP/2 pool connections are
            # checked by their own protocol (an upgrade's token, each
            # HTTP/2 request's source IP), not on connect.
            return Admission.STREAM_HOST_TLS if self.tls_code else Admission.STREAM_HOST
        if self.control_ip is None or peer_host != self.control_ip or self.quic or pool is None:
            return Admission.NEWCOMER
        if pool.idle_count() >= pool.max:
            self.ctx.log.debug("Pool full (%d), closing pool connection from %s", pool.max, port.peer)
            return Admission.POOL_FULL
        return Admission.POOL_TLS if self.tls_code else Admission.POOL

    def forget(self, port: TunnelPortMachine) -> None:
        self.port_conns.discard(port)

    @property
    def stream_pool(self) -> bool:
        """Whether this 1.14 run's pool connections are WebSockets or
        HTTP/2 connections on the tunnel port."""
        return self.generation is Wire.V114 and self.pool_type in (PoolType.WEBSOCKET, PoolType.HTTP2)

    def tls_context(self) -> Any:
        assert self.creds is not None  # made in start(), before listening
        if self.generation is Wire.V114 and self.pool_type is PoolType.HTTP2:
            from nodepass.pools.h2pool import h2_server_context

            return h2_server_context(self.creds.context_factory())  # ALPN h2
        return self.creds.context_factory()

    def adopt(self, conn: PoolEnd) -> Adopted:
        """Register a pool connection (TCP, or a QUIC stream): the pool
        writes its ID.  With 1.14 the first one after the handshake is the
        control connection instead: ID ``00000000``, not pooled."""
        pool = self.pool
        if self.stopping or pool is None:
            return Adopted.REFUSED
        if self._answered_at is not None and self.control is None:
            self._cancel_control_timer()
            conn.transport.write(CONTROL_ID)
            conn.pool_id = CONTROL_ID.hex()
            if not isinstance(conn, TunnelPortProtocol):
                # A stream of a stream pool (QUIC, WebSocket, HTTP/2): no
                # tunnel-port machine to carry the channel; the stream's
                # bytes go to it.
                channel = self._control_114(conn.transport, addr_text(conn.transport.getPeer()))
                conn.attach(ControlSink(channel))
                channel.start()
            return Adopted.CONTROL
        if pool.register(conn) is None:
            return Adopted.REFUSED
        self.pool_ready()
        return Adopted.POOLED

    def is_idle(self, conn: PoolEnd) -> bool:
        return self.pool is not None and self.pool.holds(conn.pool_id, conn)

    def unpool(self, conn: PoolEnd) -> None:
        if self.pool is not None:
            self.pool.discard(conn.pool_id, conn)

    def tunnel_taken(self) -> bool:
        return self.control is not None or self._answered_at is not None

    # -- 1.14 handshake (SPEC-1.14 §3.2) ---------------------------------------
    def accept_request(self, port: TunnelPortMachine) -> bool:
        """A valid 1.14 request: answer with the tunnel config, then serve
        pool connections from the requester's IP; the first one becomes the
        control channel within NP_HANDSHAKE_TIMEOUT."""
        if self.tunnel_taken():
            return False
        ctx = self.ctx
        cfg = ctx.config
        self.generation = Wire.V114
        self.pool_type = cfg.type
        self.control_ip = port.conn.peer_host
        self.control_peer = port.peer
        for other in list(self.port_conns):
            if other is not port:
                other.rival_won()
        assert self.flow is not None  # decided in start(), before listening
        config = v114.TunnelConfig(self.flow, cfg.max, self.tls_code, str(int(self.pool_type)))
        port.conn.write(v114.build_answer(config, v114.http_date(ctx.reactor.seconds())))
        ctx.log.info("Sending tunnel config: %s", config.log_fields())
        ctx.log.info("Getting tunnel pool ready...")
        self._answered_at = ctx.reactor.seconds()
        self._control_timer = ctx.reactor.callLater(ctx.tunables.handshake_timeout, self._no_control)
        return True

    def _cancel_control_timer(self) -> None:
        timer, self._control_timer = self._control_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _no_control(self) -> None:
        """No pool connection came after our answer (Go: ``setControlConn:
        handshake timeout``, and a restart).  The tunnel never depended on
        that client: forget it and wait for the next handshake."""
        self._control_timer = None
        if self.control is not None or self.stopping:
            return
        self.ctx.log.warn(
            "setControlConn: handshake timeout: no pool connection from %s within %gs; waiting for a new handshake",
            self.control_peer, self.ctx.tunables.handshake_timeout,
        )
        self._answered_at = None
        self._forget_client()

    def _bearer(self) -> bytes:
        """The ``Authorization`` value that lets a WebSocket upgrade in from
        an address other than the handshake's: computed once per run (an
        HMAC), only when such an upgrade comes."""
        if self._bearer_value is None:
            self._bearer_value = ("Bearer " + v114.token(self.ctx.config.tunnel_key)).encode()
        return self._bearer_value

    def stream_host(self, port: TunnelPortMachine) -> Any:
        """The WebSocket (SPEC-1.14 §4.4) or HTTP/2 (§4.5) pool's protocol
        for a connection of the tunnel port.

        Go accepts any upgrade from anyone, so a stranger's connection can
        become a pool connection and be handed user traffic.  Here an
        upgrade is accepted from the handshake's IP, or from elsewhere
        (a proxy, a CDN edge) when it carries the handshake's Bearer token,
        which our client sends and a Go server ignores; others get ``403``."""
        from nodepass.pools.ws import WebSocketUpgradeProtocol

        ctx = self.ctx
        pool = self.pool
        assert pool is not None  # made in start()
        if self.pool_type is PoolType.HTTP2:
            from nodepass.pools.h2pool import H2PoolServerProtocol

            # SPEC-1.14 §4.5: each request is checked for the handshake's IP.
            return H2PoolServerProtocol(
                ctx.reactor, ctx.log, self._ws_stream, lambda: pool.idle_count() >= pool.max,
                lambda ip: ip == self.control_ip, ctx.config.max, ctx.tunables.report_interval,
            )
        from_client = port.conn.peer_host == self.control_ip
        # The closure takes the peer's name, not ``port``: the machine holds
        # the protocol (its ``delegate``), which holds this closure, and a
        # closure over the machine would leave the three in a reference
        # cycle per pool connection, for the garbage collector.
        peer = port.peer

        def authorize(headers: dict[str, list[str]]) -> bool:
            if from_client:
                return True
            given = headers.get("authorization", [])
            if len(given) == 1 and hmac.compare_digest(given[0].encode(), self._bearer()):
                return True
            ctx.log.warn(
                "Tunnel access denied: %s (WebSocket upgrade from an address other than the handshake's, "
                "without the tunnel's token)", peer,
            )
            return False

        return WebSocketUpgradeProtocol(
            ctx.reactor, ctx.log, self._ws_stream, lambda: pool.idle_count() >= pool.max, authorize=authorize
        )

    def pool_control(self, port: TunnelPortMachine) -> ControlChannel:
        """The 1.14 control connection is here (its ID written)."""
        channel = self._control_114(port.transport, port.peer)
        channel.start()
        return channel

    def _control_114(self, transport: Any, peer: str) -> ControlChannel:
        """The control channel on the first pool connection after our
        answer, and the fingerprint exchange, made before any of its bytes
        are read (they may hold the client's verify already)."""
        started = self._answered_at
        assert started is not None  # adopt() made it the control connection
        self.control_peer = peer
        channel = self.make_control(transport)
        self.control_up_114(started)
        return channel

    def own_view(self, conn: Any) -> str:
        """Our certificate as presented on ``conn`` (what a reload put there),
        else the current one."""
        fp = host_certificate_fingerprint(conn.transport) if conn is not None else ""
        if not fp and self.creds is not None:
            fp = self.creds.fingerprint
        return fp

    def accept_control(self, port: TunnelPortMachine) -> ControlChannel:
        """A handshake line that decodes to our key: answer it, and make
        the connection the control channel -- on probation.

        The key line is the key XORed with itself, so a client whose key
        differs but has the same length passes here too; only afterwards,
        when it cannot decode our answer, does it leave.  So the channel
        counts as *working* only once the client shows it speaks our key:
        its first pool connection (sent right after the handshake) or its
        first signal that decodes.  Losing a channel that never worked is
        a refused stranger (:meth:`_drop_candidate`), not a fatal error."""
        ctx = self.ctx
        transport = port.transport
        self.generation = Wire.V112
        self.pool_type = PoolType(ctx.config.quic)
        if self.gate is not None:
            self.gate.open()  # 1.12 has no entry gate
        self.control_ip = transport.getPeer().host
        self.control_peer = port.peer
        for other in list(self.port_conns):
            if other is not port:
                other.rival_won()
        assert self.flow is not None  # decided in start(), before listening
        info = codec.handshake_config(self.pool_type, ctx.config.max, self.flow, self.tls_code)
        transport.write(self.codec.encode(info))
        # Go's lines: the answer sent, then the control connection's ends.
        ctx.log.info("Tunnel signal -> : %s -> %s", info, port.peer)
        ctx.log.info("Tunnel handshaked: %s <-> %s", addr_text(transport.getHost()), port.peer)
        channel = self.make_control(transport, working=False)
        peer = port.peer
        channel.on_working = lambda: ctx.log.debug("Tunnel connection: client %s is working", peer)
        channel.start()
        return channel

    # -- the control channel ------------------------------------------------
    def control_broken(self, channel: ControlChannel, reason: str) -> None:
        if channel is self.control and not channel.working and not self.stopping:
            self._drop_candidate(reason)
            return
        super().control_broken(channel, reason)

    def _drop_candidate(self, reason: str) -> None:
        """The control connection ended before it ever worked: the peer
        passed the key check but never used the tunnel -- typically a
        client whose key differs from ours but has the same length.  Forget
        it and keep serving; the tunnel never depended on it."""
        ctx = self.ctx
        ctx.log.warn(
            "Tunnel access denied: %s (it passed the key check but never used the tunnel -- %s; most likely "
            "a client whose tunnel key differs from ours but has the same length)",
            self.control_peer, reason,
        )
        self._forget_client()

    def _forget_client(self) -> None:
        self.control = None
        self.control_ip = None
        self.control_peer = ""
        self.generation = Wire.V112
        self.pool_type = PoolType(self.ctx.config.quic)
        for port in list(self.port_conns):
            port.candidate_dropped()

    def pool_ready(self) -> None:
        """A pool connection registered: the control channel works (only a
        client that decoded our answer opens one); the first one also sends
        the TLS verify signal."""
        control = self.control
        if control is not None and not control.working:
            control.mark_working()
        if self._verified or not self.tls_code or self.generation is not Wire.V112:
            return
        self._verified = True
        defer.ensureDeferred(self._send_verify()).addErrback(
            lambda f: self.ctx.log.error("TLS verify failed: %s", f.getErrorMessage())
        )

    async def _send_verify(self) -> None:
        ctx = self.ctx
        assert self.pool is not None and self.creds is not None  # both made in start()
        pool_id, conn = await self.pool.incoming_get(ctx.tunables.pool_get_timeout)
        if self.control is None or self.control.broken:
            conn.transport.loseConnection()
            return
        self.control.send(Signal(codec.VERIFY, self.control_peer, pool_id))
        ctx.log.info("TLS cert verified: %s", self.creds.fingerprint)
        # The client closes it once it has logged the fingerprint; close it
        # ourselves if it does not.
        self._verify_conn = conn
        self._verify_timer = ctx.reactor.callLater(ctx.tunables.pool_get_timeout, self._drop_verify_conn)

    def _drop_verify_conn(self) -> None:
        timer, self._verify_timer = self._verify_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        conn, self._verify_conn = self._verify_conn, None
        if conn is not None and not conn.lost:
            conn.transport.loseConnection()

    async def stop(self) -> None:
        self.stopping = True
        self._cancel_control_timer()
        ds = []
        if self.tunnel_port is not None:
            ds.append(defer.maybeDeferred(self.tunnel_port.stopListening))
            self.tunnel_port = None
        for port in list(self.port_conns):
            port.shutdown()
        self._drop_verify_conn()
        if self.quic_server is not None:
            self.quic_server.close_all()
        if self.quic_port is not None:
            ds.append(defer.maybeDeferred(self.quic_port.stopListening))
            self.quic_port = None
        await self.stop_common()
        if ds:
            await defer.DeferredList(ds)
