"""Server mode (``server://``, SPEC §2-§4).

One TCP listener on the tunnel address carries everything that arrives
there: the client's handshake (which then becomes the control channel),
"what is my IP" HTTP probes, and -- after the handshake, only from the
control connection's IP -- pool connections, which get TLS (``tls>=1``) and
a random 4-byte ID.  Anything else (wrong keys, garbage, half-open sockets)
is logged and closed without disturbing a running tunnel.
"""

from __future__ import annotations

from typing import Optional

from twisted.internet import defer
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory
from zope.interface import implementer

from nodepass.wire import codec
from nodepass.wire.codec import CodecError
from nodepass.wire.control import ControlChannel
from nodepass.pools.tcp import ServerPool
from nodepass.net.tls import ServerCredentials
from nodepass.modes.dualend import DualEndRunner, PoolEnd, addr_text

#: Most bytes of an HTTP probe request we read before answering anyway.
MAX_PROBE = 8192


@implementer(IHandshakeListener)
class TunnelPortProtocol(PoolEnd):
    """A connection on the server's tunnel port: handshake, probe, control
    channel or pool connection, decided by who connects and what it sends."""

    def __init__(self, runner: "ServerRunner"):
        super().__init__()
        self.runner = runner
        self.state = "new"
        self._buf = b""
        self._timer = None
        self.peer = ""
        self.channel: Optional[ControlChannel] = None  # once this is the control connection

    # -- setup --------------------------------------------------------------
    def connectionMade(self) -> None:
        super().connectionMade()
        r = self.runner
        peer = self.transport.getPeer()
        self.peer = addr_text(peer)
        r.port_conns.add(self)
        clock = r.ctx.reactor
        if r.control_ip is not None and peer.host == r.control_ip and not r.quic:
            if r.pool.idle_count() >= r.pool.max:
                r.ctx.log.debug("Pool full (%d), closing pool connection from %s", r.pool.max, self.peer)
                self.transport.loseConnection()
                self.state = "closed"
                return
            if r.tls_code:
                self.state = "pool-tls"
                self.transport.startTLS(r.creds.context_factory())
                self._timer = clock.callLater(r.ctx.tunables.handshake_timeout, self._tls_timeout)
            else:
                self._register()
        else:
            self.state = "sniff"
            self._timer = clock.callLater(r.ctx.tunables.handshake_timeout, self._sniff_timeout)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def handshakeCompleted(self) -> None:
        if self.state == "pool-tls":
            self._cancel_timer()
            self._register()

    def _tls_timeout(self) -> None:
        self._timer = None
        if self.state == "pool-tls":
            self.runner.ctx.log.debug("Pool connection from %s: TLS handshake timed out", self.peer)
            self.state = "closed"
            self.transport.abortConnection()

    def _register(self) -> None:
        self.state = "pool"
        r = self.runner
        if r.pool is None or r.pool.register(self) is None:
            self.state = "closed"
            self.transport.loseConnection()
            return
        r.pool_ready()

    # -- data ---------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        st = self.state
        if st == "pool":
            r = self.runner
            if self.relay is None and r.pool.idle.get(self.pool_id) is self:
                if r.flow == "-":
                    # In flow "-" the client never writes on a pool
                    # connection before it has been launched: this is not our
                    # pool client but someone else on its host (a second
                    # client, a probe).  Judge it like any newcomer.
                    self._unpool(data)
                    return
                if self._timer is None:
                    # Flow "+": the client writes right after its launch
                    # signal, which may still be on its way.  If no launch
                    # claims this connection in time, it was not ours.
                    self._timer = r.ctx.reactor.callLater(r.ctx.tunables.pool_get_timeout, self._unclaimed)
            PoolEnd.dataReceived(self, data)
        elif st == "control":
            self.channel.data_received(data)
        elif st == "sniff":
            self._sniff(data)
        elif st == "pool-tls":
            PoolEnd.dataReceived(self, data)

    def _unpool(self, data: bytes) -> None:
        r = self.runner
        r.ctx.log.debug("Unexpected data on idle pool connection from %s", self.peer)
        r.pool.discard(self.pool_id, self)
        self._cancel_timer()
        if self.gate is not None:
            self.gate.resume("splice")  # held reading as a pool connection
        self.state = "sniff"
        self._timer = r.ctx.reactor.callLater(r.ctx.tunables.handshake_timeout, self._sniff_timeout)
        self._sniff(data)

    def _unclaimed(self) -> None:
        self._timer = None
        r = self.runner
        if self.state == "pool" and self.relay is None and r.pool.idle.get(self.pool_id) is self:
            self._unpool(self.take_early())

    def _sniff(self, data: bytes) -> None:
        buf = self._buf + data
        self._buf = buf
        if len(buf) >= 4 and buf[3:4] == b" ":
            if b"\r\n\r\n" in buf or b"\n\n" in buf or len(buf) > MAX_PROBE:
                self._http_probe(buf[:3])
            return
        nl = buf.find(b"\n")
        if nl < 0:
            if len(buf) > codec.MAX_LINE:
                self._deny("handshake line too long")
            return
        self._buf = b""
        self._handshake(buf[:nl], buf[nl + 1 :])

    def _http_probe(self, method: bytes) -> None:
        self._cancel_timer()
        self.state = "closed"
        if method == b"GET":
            body = (self.transport.getPeer().host + "\n").encode("ascii")
            head = (
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode("ascii")
            self.transport.write(head + body)
        else:
            # The exact bytes a Go NodePass server sends: no body.
            self.transport.write(
                b"HTTP/1.1 405 Method Not Allowed\r\nAllow: GET\r\n"
                b"Content-Length: 0\r\nConnection: close\r\n\r\n"
            )
        # The method is received bytes: named only when it is the one we know.
        what = "GET" if method == b"GET" else "with another method"
        self.runner.ctx.log.debug("HTTP probe %s from %s answered", what, self.peer)
        self.transport.loseConnection()

    def _sniff_timeout(self) -> None:
        self._timer = None
        if self.state == "sniff":
            self._deny("handshake timeout")

    def _deny(self, why: str, judged: bool = False) -> None:
        """Refuse this peer.  ``judged``: its handshake line was read and
        refused (wrong key, a client already connected): close cleanly, as a
        Go server does, so a client can tell a real refusal (FIN) from a
        connection lost while a server restarts (reset).  Peers that said
        nothing usable in time are aborted."""
        self._cancel_timer()
        self.state = "closed"
        self.runner.ctx.log.warn("Tunnel access denied: %s (%s)", self.peer, why)
        if judged:
            self.transport.loseConnection()
        else:
            self.transport.abortConnection()

    def _handshake(self, line: bytes, rest: bytes) -> None:
        r = self.runner
        try:
            key = r.codec.decode(line)
        except CodecError:
            self._deny("bad handshake encoding", judged=True)
            return
        if key != r.codec.key:
            self._deny("wrong tunnel key", judged=True)
            return
        if r.control is not None:
            self._deny("a client is already connected", judged=True)
            return
        self._cancel_timer()
        self.state = "control"
        self.channel = r.accept_control(self)
        if rest:
            self.channel.data_received(rest)

    def connectionLost(self, reason) -> None:
        self._cancel_timer()
        r = self.runner
        r.port_conns.discard(self)
        st, self.state = self.state, "closed"
        if st == "control" and self.channel is not None:
            self.channel.connection_lost("control connection lost: " + (reason.getErrorMessage() or "closed"))
        PoolEnd.connectionLost(self, reason)


class QuicPoolStream(PoolEnd):
    """A stream the client opened on its QUIC pool connection: one
    handshake byte from the client, then the pool ID from us (SPEC §4)."""

    def __init__(self, runner: "ServerRunner"):
        super().__init__()
        self.runner = runner
        self.state = "new"

    def dataReceived(self, data: bytes) -> None:
        if self.state == "new":
            r = self.runner
            self.state = "pool"
            if r.stopping or r.pool is None or r.pool.register(self) is None:
                self.state = "closed"
                self.transport.loseConnection()
                return
            r.pool_ready()
            data = data[1:]
            if not data:
                return
        if self.state == "pool":
            PoolEnd.dataReceived(self, data)


class _TunnelPortFactory(Factory):
    noisy = False
    def __init__(self, runner: "ServerRunner"):
        self.runner = runner

    def buildProtocol(self, addr):
        if self.runner.stopping:
            return None
        return TunnelPortProtocol(self.runner)


class ServerRunner(DualEndRunner):
    """``server://``: listens on the tunnel address, waits for one client."""

    role = "server"

    def __init__(self, ctx):
        super().__init__(ctx)
        self.creds: Optional[ServerCredentials] = None
        self.tunnel_port = None
        self.control_ip: Optional[str] = None
        self.control_peer = ""
        self.port_conns: set[TunnelPortProtocol] = set()
        self._verified = False
        self._verify_conn = None
        self._verify_timer = None
        self.quic_port = None
        self.quic_server = None  # a nodepass.pools.quic.QuicPoolServer with quic=1

    @property
    def tunnel_port_number(self) -> int:
        return self.tunnel_port.getHost().port if self.tunnel_port is not None else 0

    async def start(self) -> None:
        ctx = self.ctx
        cfg = ctx.config
        self.quic = bool(cfg.quic)
        self.creds = ServerCredentials.from_config(
            cfg.tls, cfg.crt, cfg.key, ctx.log, ctx.tunables.reload_interval, ctx.reactor,
            common_name=cfg.tunnel.host or "nodepass",
        )
        self.tls_code = self.creds.tls_code
        # The pool exists from the start so that user connections arriving
        # before the client joins wait for it (up to NP_POOL_GET_TIMEOUT).
        self.pool = ServerPool(cfg.max, ctx.reactor, ctx.log)
        if cfg.mode == 1:
            self.bind_entry()
            self.flow, self.mode = "-", 1
        elif cfg.mode == 2:
            self.flow, self.mode = "+", 2
        else:
            try:
                self.bind_entry()
            except Exception as e:  # noqa: BLE001 - cannot bind: forward mode
                ctx.log.debug("Target %s does not bind locally (%s): forward mode", cfg.targets[0], e)
                self.flow, self.mode = "+", 2
            else:
                self.flow, self.mode = "-", 1
        try:
            self.tunnel_port = ctx.reactor.listenTCP(
                cfg.tunnel.port, _TunnelPortFactory(self), backlog=1024, interface=cfg.tunnel.host
            )
        except Exception:
            await defer.DeferredList(self._unbind_entry())
            raise
        if self.quic:
            try:
                self._listen_quic()
            except Exception:
                await defer.DeferredList(self._unbind_entry() + [defer.maybeDeferred(self.tunnel_port.stopListening)])
                self.tunnel_port = None
                raise
        level, line = self.creds.code_line(quic=bool(self.quic))
        getattr(ctx.log, level)(line)
        if self.tls_code:
            ctx.log.debug("TLS certificate: %s", self.creds.fingerprint)

    def _listen_quic(self) -> None:
        """The tunnel's UDP port for the QUIC pool (same number as the TCP
        port); it answers only the control connection's IP."""
        # Imported here: aioquic is only loaded by tunnels that use QUIC.
        from nodepass.pools.quic import QuicPoolServer

        ctx = self.ctx
        self.quic_server = QuicPoolServer(
            ctx.reactor,
            ctx.log,
            self.creds.quic_material,
            lambda: self.control_ip,
            self._quic_stream,
            ctx.tunables.report_interval,
        )
        self.quic_port = ctx.reactor.listenUDP(
            self.tunnel_port_number, self.quic_server, interface=ctx.config.tunnel.host, maxPacketSize=65535
        )

    def _quic_stream(self, transport) -> None:
        # QuicPoolStream turns it away when stopping or the pool is full.
        transport.attach(QuicPoolStream(self))

    def accept_control(self, proto: TunnelPortProtocol) -> ControlChannel:
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
        self.control_ip = proto.transport.getPeer().host
        self.control_peer = proto.peer
        for other in list(self.port_conns):
            if other is not proto and other.state == "sniff":
                other._deny("another client won the handshake", judged=True)
        info = codec.handshake_config(1 if self.quic else 0, ctx.config.max, self.flow, self.tls_code)
        proto.transport.write(self.codec.encode(info))
        # Go's lines: the answer sent, then the control connection's ends.
        ctx.log.info("Tunnel signal -> : %s -> %s", info, proto.peer)
        ctx.log.info("Tunnel handshaked: %s <-> %s", addr_text(proto.transport.getHost()), proto.peer)
        channel = self.make_control(proto.transport, working=False)
        channel.on_working = lambda: ctx.log.debug("Tunnel connection: client %s is working", proto.peer)
        channel.start()
        return channel

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
        self.control = None
        self.control_ip = None
        self.control_peer = ""
        for p in list(self.port_conns):
            if p.state == "pool-tls":  # half-way into its pool: not ours to keep
                p.state = "closed"
                p.transport.abortConnection()

    def pool_ready(self) -> None:
        """A pool connection registered: the control channel works (only a
        client that decoded our answer opens one); the first one also sends
        the TLS verify signal."""
        control = self.control
        if control is not None and not control.working:
            control.mark_working()
        if self._verified or not self.tls_code:
            return
        self._verified = True
        defer.ensureDeferred(self._send_verify()).addErrback(
            lambda f: self.ctx.log.error("TLS verify failed: %s", f.getErrorMessage())
        )

    async def _send_verify(self) -> None:
        ctx = self.ctx
        pool_id, conn = await self.pool.incoming_get(ctx.tunables.pool_get_timeout)
        if self.control is None or self.control.broken:
            conn.transport.loseConnection()
            return
        self.control.send(codec.verify(self.control_peer, pool_id))
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
        ds = []
        if self.tunnel_port is not None:
            ds.append(defer.maybeDeferred(self.tunnel_port.stopListening))
            self.tunnel_port = None
        for p in list(self.port_conns):
            if p.transport is not None:
                p.transport.abortConnection() if p.state != "control" else p.transport.loseConnection()
        self._drop_verify_conn()
        if self.quic_server is not None:
            self.quic_server.close_all()
        if self.quic_port is not None:
            ds.append(defer.maybeDeferred(self.quic_port.stopListening))
            self.quic_port = None
        await self.stop_common()
        if ds:
            await defer.DeferredList(ds)
