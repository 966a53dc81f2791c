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
from typing import Optional

from twisted.internet import defer
from twisted.internet import error as terror
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Protocol

from nodepass.wire import codec
from nodepass.wire.codec import CodecError, TunnelInfo
from nodepass.wire.control import LineBuffer
from nodepass.net.dialer import DNSCache, ResolveError
from nodepass.modes.base import TunnelError
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

#: SPEC §4: the client reads the 4-byte pool ID within one minute.
POOL_ID_TIMEOUT = 60.0


class HandshakeRefused(TunnelError):
    """The server read our key line and closed the connection cleanly
    without answering: how NodePass servers refuse a key (SPEC §3.2)."""


class KeyMismatch(TunnelError):
    """The server answered, but the answer does not decode with our key."""


#: Why a server that answers nothing may close: said once, in every refusal.
REFUSED = (
    "the server refused our tunnel key (it closed the connection without answering the handshake: "
    "our key differs from the server's, or another client already holds the tunnel)"
)


class ClientControlProtocol(Protocol):
    """The client's control connection: handshake, then signals."""

    def __init__(self, runner: "ClientRunner"):
        self.runner = runner
        self.answer: Deferred = Deferred()
        self.lines = LineBuffer()
        self.state = "handshake"
        self._timer = None

    def connectionMade(self) -> None:
        r = self.runner
        self.transport.write(r.codec.encode(r.ctx.config.tunnel_key))
        self._timer = r.ctx.reactor.callLater(r.ctx.tunables.handshake_timeout, self._timeout)

    def _cancel(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timeout(self) -> None:
        self._timer = None
        if not self.answer.called:
            # A NodePass server answers or closes at once; silence means
            # something else listens there, or the server is overloaded.
            self.answer.errback(TunnelError(
                "tunnel handshake timed out: the server sent no answer within "
                f"{self.runner.ctx.tunables.handshake_timeout:g}s (is a NodePass server listening at that address?)"
            ))
            self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.state == "control":
            self.runner.control.data_received(data)
            return
        lines = self.lines.feed(data)
        if self.lines.overflow and not lines:
            self._fail(TunnelError("tunnel handshake failed: answer line too long"))
            return
        if not lines:
            return
        self._cancel()
        rest = b"\n".join(lines[1:]) + (b"\n" if len(lines) > 1 else b"") + self.lines.rest()
        try:
            info = codec.parse_handshake_config(self.runner.codec.decode(lines[0]))
        except CodecError as e:
            self._undecodable(lines[0], e)
            return
        self.state = "control"
        self.answer.callback((info, rest))

    def _undecodable(self, line: bytes, error: CodecError) -> None:
        """The answer line does not decode to ``np://...`` under our key.
        A server with another key of the same length lets us this far (the
        key line is the key XORed with itself, so it cannot tell), and its
        answer then decodes to noise.  The line itself is never logged: it
        can hold anything, a secret included (a misdirected client talking
        to an echo service reads back its own key)."""
        log = self.runner.ctx.log
        log.debug("Handshake answer from %s: %s (%s)", self.runner.ctx.config.tunnel, codec.describe(line), error)
        self._fail(KeyMismatch(
            "tunnel handshake failed: the server's answer could not be decoded with our tunnel key -- "
            "the tunnel keys most likely differ (check the KEY@ part of both URLs), "
            "or this address is not a NodePass server"
        ))

    def _fail(self, exc: Exception) -> None:
        self._cancel()
        self.state = "closed"
        if not self.answer.called:
            self.answer.errback(exc)
        self.transport.abortConnection()

    def connectionLost(self, reason) -> None:
        self._cancel()
        st, self.state = self.state, "closed"
        if not self.answer.called:
            self.answer.errback(self._unanswered(reason))
        elif st == "control" and self.runner.control is not None:
            self.runner.control.connection_lost("control connection lost: " + (reason.getErrorMessage() or "closed"))

    def _unanswered(self, reason) -> TunnelError:
        """Why the connection ended before the answer, as far as we can
        tell.  Only a clean close after the server read our key line is a
        refusal (SPEC §3.2: it closes without answering); a reset is what a
        server that stops or restarts leaves behind, and our own shutdown
        is nobody's refusal."""
        if self.runner.stopping:
            return TunnelError("handshake abandoned: the client is stopping")
        if reason.check(terror.ConnectionDone):
            return HandshakeRefused(REFUSED)
        return TunnelError(
            "the connection to the server was closed before the handshake completed "
            f"({reason.getErrorMessage() or 'reset'}): the server may be restarting; retrying"
        )


class ClientPoolConn(PoolEnd):
    """One pool connection: reads the 4-byte ID, then is a relay end.

    ``ready`` fires with the connection once its ID is in, or fails (dial
    error, closed early, or :meth:`expire` after the one-minute limit --
    checked by the runner's periodic sweep rather than a timer per
    connection, since this runs for every relayed connection)."""

    connector = None

    def __init__(self, started: float):
        super().__init__()
        self.ready: Deferred = Deferred()
        self.started = started
        self._id_buf = b""

    def expire(self) -> None:
        if not self.ready.called:
            self.ready.errback(TunnelError("pool ID not received in time"))
            if self.transport is not None:
                self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
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

    def connectionLost(self, reason) -> None:
        if not self.ready.called:
            self.ready.errback(reason)
        PoolEnd.connectionLost(self, reason)


class _PoolConnFactory(ClientFactory):
    """Connects one :class:`ClientPoolConn`; a failed dial fails its
    ``ready``."""

    noisy = False

    def __init__(self, conn: ClientPoolConn):
        self.conn = conn

    def buildProtocol(self, addr):
        return self.conn

    def clientConnectionFailed(self, connector, reason):
        if not self.conn.ready.called:
            self.conn.ready.errback(reason)


class ClientRunner(DualEndRunner):
    """``client://`` in dual-end mode."""

    role = "client"
    mode = 2

    def __init__(self, ctx):
        super().__init__(ctx)
        self.server_ip: Optional[str] = None
        self.info: Optional[TunnelInfo] = None
        self.control_proto: Optional[ClientControlProtocol] = None
        self._last_tls_error = 0.0
        self._dialing: set = set()
        self._verify_gate: Optional[Deferred] = None
        # Fingerprints of TLS pool connections that died idle before the
        # verify signal came: a Go server closes the connection it names in
        # that signal right after sending it, so the close may overtake it.
        self._lost_fps: dict[str, str] = {}
        self._verify_seen = False
        self.quic_client = None  # a nodepass.pools.quic.QuicPoolClient with quic=1

    async def start(self) -> None:
        ctx = self.ctx
        cfg = ctx.config
        reactor = ctx.reactor
        dns = DNSCache(cfg.dns, reactor)
        try:
            self.server_ip = await dns.resolve(cfg.tunnel.host)
        except ResolveError as e:
            raise TunnelError(f"cannot reach the server at {cfg.tunnel}: {e}") from None
        proto = ClientControlProtocol(self)
        self.control_proto = proto
        try:
            await self._connect(proto, None, ctx.tunables.tcp_dial_timeout)
        except Exception as e:  # noqa: BLE001
            raise TunnelError(f"cannot reach the server at {cfg.tunnel}: {_reason(e)}") from None
        info, rest = await proto.answer
        self.info = info
        ctx.log.info("Tunnel signal <- : %s <- %s", info.payload(), cfg.tunnel)
        if proto.transport is not None:
            ctx.log.info(
                "Tunnel handshaked: %s <-> %s", addr_text(proto.transport.getHost()), addr_text(proto.transport.getPeer())
            )
        if info.pool_type not in ("0", "1"):
            proto.transport.loseConnection()
            raise TunnelError(f"server asked for pool type {info.pool_type}, which this client does not know")
        self.flow, self.tls_code = info.flow, info.tls
        if info.pool_type == "1":
            # QUIC always encrypts: a server announcing tls 0 is treated as 1.
            self.quic, self.tls_code = True, max(1, info.tls)
            try:
                self._open_quic()
            except Exception:
                proto.transport.loseConnection()
                raise
        if self.tls_code and self.is_entry:
            self._verify_gate = Deferred()
        if self.is_entry:
            try:
                self.bind_entry()
            except Exception:
                proto.transport.loseConnection()
                raise
        t = ctx.tunables
        self.pool = ClientPool(
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
        if proto.state != "control" or proto.transport is None:
            raise TunnelError("control connection lost right after the handshake")
        self.pool.start()
        if rest:
            control.data_received(rest)

    def _open_quic(self) -> None:
        # Imported here: aioquic is only loaded by tunnels that use QUIC.
        from nodepass.pools.quic import QuicPoolClient, connections_for

        ctx = self.ctx
        self.quic_client = QuicPoolClient(
            ctx.reactor,
            ctx.log,
            (self.server_ip, ctx.config.tunnel.port),
            self.tls_code,
            ctx.config.tunnel.host,
            ctx.tunables.report_interval,
            max_conns=connections_for(self.info.max),
        )

    def _connect(self, proto, tls_ctx, timeout: float) -> Deferred:
        """Connect ``proto`` to the server; fires at connectionMade."""
        reactor = self.ctx.reactor
        ip, port = self.server_ip, self.ctx.config.tunnel.port
        factory = _OneShot(proto)
        if tls_ctx is not None:
            reactor.connectSSL(ip, port, factory, tls_ctx, timeout=timeout)
        else:
            reactor.connectTCP(ip, port, factory, timeout=timeout)
        return factory.made

    def _tls_ctx(self):
        if not self.tls_code:
            return None
        if getattr(self, "_ctx_cache", None) is None:
            self._ctx_cache = ResumingClient(client_context_factory(self.tls_code, self.ctx.config.tunnel.host))
        return self._ctx_cache

    def _dial_pool(self) -> Deferred:
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
        d = conn.ready.addBoth(_forget, dialing, conn)
        if self.tls_code == 2:
            d.addErrback(self._explain_tls_failure, conn)
        if tls_ctx is not None:
            if tls_ctx.session is None:
                d.addCallback(_remember_session, tls_ctx)
            if not self._verify_seen:
                d.addCallback(self._watch_for_verify)
        return d

    def _dial_quic(self, conn: ClientPoolConn) -> Deferred:
        """A new stream on the QUIC pool connection: our handshake byte,
        then the server's 4-byte ID (SPEC §4)."""
        dialing = self._dialing
        dialing.add(conn)

        def opened(transport):
            transport.write(b"\x00")
            return conn.ready

        d = self.quic_client.open_stream(conn)
        d.addCallback(opened)
        d.addBoth(_forget, dialing, conn)
        if not self._verify_seen:
            d.addCallback(self._watch_for_verify)
        return d

    def _explain_tls_failure(self, failure, conn: ClientPoolConn):
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
        text = _reason(exc)
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

    def entry_wait(self) -> Optional[Deferred]:
        gate = self._verify_gate
        if gate is None or gate.called:
            return None
        d = Deferred()
        gate.addBoth(lambda r: (None if d.called else d.callback(None), r)[1])
        d.addTimeout(self.ctx.tunables.pool_get_timeout, self.ctx.reactor)

        def timed_out(failure):
            failure.trap(defer.TimeoutError)
            self._open_gate()  # no verify signal: go on without it

        return d.addErrback(timed_out)

    def _open_gate(self) -> None:
        gate = self._verify_gate
        if gate is not None and not gate.called:
            gate.callback(None)

    async def on_verify(self, sig) -> None:
        try:
            await self._verify_conn(sig)
        finally:
            self._open_gate()

    async def _verify_conn(self, sig) -> None:
        ctx = self.ctx
        self._verify_seen = True
        lost_fps, self._lost_fps = self._lost_fps, {}
        if sig.id in lost_fps and sig.id not in self.pool.idle:
            # Already closed by the server (Go does that): still log it.
            ctx.log.info("TLS cert verified: %s", lost_fps[sig.id])
            return
        _, conn = await self.pool.outgoing_get(sig.id, ctx.tunables.pool_get_timeout)
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
        proto = self.control_proto
        if proto is not None and proto.transport is not None and proto.state != "closed":
            proto.transport.loseConnection()


class _OneShot(ClientFactory):
    """Connects one given protocol; ``made`` fires at connectionMade."""

    noisy = False

    def __init__(self, proto):
        self.proto = proto
        self.made: Deferred = Deferred()

    def buildProtocol(self, addr):
        proto = self.proto
        orig = proto.connectionMade
        made = self.made

        def connection_made():
            orig()
            if not made.called:
                made.callback(proto)

        proto.connectionMade = connection_made
        proto.factory = self
        return proto

    def clientConnectionFailed(self, connector, reason):
        if not self.made.called:
            self.made.errback(reason)


def _remember_session(conn, creator: ResumingClient):
    # The ID follows the server's session tickets, so the session is
    # resumable by now.
    if conn.transport is not None:
        creator.remember(conn.transport)
    return conn


def _forget(result, dialing: set, conn) -> object:
    dialing.discard(conn)
    return result


def _reason(e: BaseException) -> str:
    if hasattr(e, "getErrorMessage"):
        return e.getErrorMessage()
    value = getattr(e, "value", None)
    if value is not None and value is not e:
        return _reason(value)
    return str(e) or type(e).__name__


def _looks_like_tls_failure(exc: BaseException) -> bool:
    value = getattr(exc, "value", exc)
    name = type(value).__name__
    mod = type(value).__module__
    return "SSL" in mod or "service_identity" in mod or "Verification" in name or "certificate" in str(value).lower()
