"""Dual-end tunnels end to end (SPEC §2-§5, §7): a server and a client
``TunnelService`` in one reactor, real sockets on loopback, real TLS, short
tunables."""

from __future__ import annotations

import datetime
import hashlib
import os
import socket

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer, reactor, task
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.trial import unittest

from nodepass.config.urls import Tunables, parse_url
from nodepass.service.instance import TunnelService
from nodepass.base.logs import NodeLog
from nodepass.pools.tcp import (
    GONE_MEMORY,
    REFILL_DELAY,
    ClientPool,
    IdlePool,
    PoolConnectionGone,
    PoolTimeout,
    adjust_capacity,
    adjust_interval,
)
from tests.helpers import (
    Client,
    HashingClient,
    PortTaken,
    UDPClient,
    UDPEcho,
    close,
    connect,
    free_port,
    listen_echo,
    listen_udp,
    service_up,
    sleep,
    wait_for,
)

MiB = 1024 * 1024

FAST = Tunables(
    handshake_timeout=1.0,
    pool_get_timeout=2.0,
    report_interval=0.5,
    service_cooldown=0.2,
    shutdown_timeout=2.0,
    min_pool_interval=0.1,
    max_pool_interval=0.5,
)


def d(coro_fn):
    def wrapper(self, *a):
        return defer.ensureDeferred(coro_fn(self, *a))

    wrapper.__name__ = coro_fn.__name__
    wrapper.__doc__ = coro_fn.__doc__
    return wrapper


# -- certificates made by the test (tls=2) -------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(directory: str) -> tuple[str, object, object]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("nodepass test CA"))
        .issuer_name(_name("nodepass test CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(key, hashes.SHA256())
    )
    path = os.path.join(directory, "ca.pem")
    with open(path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return path, cert, key


def make_leaf(directory: str, ca_cert, ca_key, dns_name: str) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(dns_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    crt = os.path.join(directory, f"{dns_name}.crt")
    key_path = os.path.join(directory, f"{dns_name}.key")
    with open(crt, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return crt, key_path


class TunnelMixin:
    """Starts servers and clients in-process and cleans them up.

    ``wire`` pins both ends to one generation; the default (auto at both
    ends) settles on 1.14."""

    wire = ""

    def verified_line(self, server: TunnelService) -> str:
        """The INFO line of a checked TLS fingerprint in the generation the
        tunnel of ``server`` settled on."""
        return "TLS cert verified: " if server.runner.generation == "1.12" else "TLS certificate fingerprint verified: "

    def setUp(self):
        self.lines: dict[str, list[str]] = {}

    def _service(self, name: str, url: str, tunables: Tunables) -> TunnelService:
        if self.wire and "wire=" not in url:
            url += ("&" if "?" in url else "?") + "wire=" + self.wire
        config = parse_url(url)
        log = NodeLog(config.log)
        lines = self.lines.setdefault(name, [])
        log.listeners.append(lambda level, line: lines.append(line))
        svc = TunnelService(config, tunables=tunables, log=log)
        svc.startService()
        self.addCleanup(svc.stopService)
        return svc

    async def start_server(self, target: str, query: str = "", tunables: Tunables = FAST, port: int = 0,
                           name: str = "server", host: str = "127.0.0.1", key: str = "") -> TunnelService:
        """A server on ``port`` (by default a free port of its own, chosen
        again if something takes it before the server binds it)."""
        for attempt in range(5):
            tunnel_port = port or free_port(host)
            self.tunnel_port = tunnel_port
            userinfo = f"{key}@" if key else ""
            svc = self._service(name, f"server://{userinfo}{host}:{tunnel_port}/{target}?log=debug{query}", tunables)
            try:
                await service_up(svc, name)
                return svc
            except PortTaken:
                await svc.stopService()
                if port or attempt == 4:
                    raise
        raise AssertionError("unreachable")

    async def start_client(self, target: str, query: str = "", tunables: Tunables = FAST, name: str = "client",
                           host: str = "127.0.0.1", key: str = "", wait: bool = True, min_size: int = 8) -> TunnelService:
        userinfo = f"{key}@" if key else ""
        svc = self._service(
            name, f"client://{userinfo}{host}:{self.tunnel_port}/{target}?mode=2&log=debug&min={min_size}{query}", tunables
        )
        if wait:
            await service_up(svc, name)
        return svc

    async def carries_tcp_and_udp(self, flow: str, query: str, size: int = 100_000):
        """A server and client (``query`` on the server) carry TCP and UDP
        in ``flow``; both count it, TLS ends log one fingerprint, and a
        CHECK_POINT reports the pool.  Returns (server, client)."""
        server, client, entry, _ = await self.tunnel(flow, query)
        payload = os.urandom(size)
        self.assertEqual(await echo_roundtrip(entry, payload), payload)
        self.assertEqual(await echo_roundtrip(entry, b"again"), b"again")
        dgs = [b"dgram-%d" % i for i in range(3)]
        self.assertEqual(await udp_roundtrip(entry, dgs), dgs)
        # both ends counted what they carried on their target side
        for svc in (server, client):
            self.assertGreaterEqual(svc.stats.tcp_rx, len(payload))
            self.assertGreaterEqual(svc.stats.udp_tx, sum(map(len, dgs)))
        if server.runner.tls_code:
            line = self.verified_line(server)
            await wait_for(lambda: self.logged("client", line + "sha256:"), what="client verify line")
            fp = server.runner.creds.fingerprint
            await wait_for(lambda: self.logged("server", line + fp), what="server verify line")
            self.assertTrue(self.logged("client", line + fp))
        # a CHECK_POINT arrives on pong, with the pool size
        seen = []
        client.checkpoint_listeners.append(seen.append)
        await wait_for(lambda: seen, timeout=3, what="checkpoint")
        self.assertEqual(seen[0].mode, 2)
        self.assertGreater(seen[0].pool, 0)
        self.assertTrue(self.logged("server", "CHECK_POINT|MODE=%d|PING=" % server.runner.mode))
        return server, client

    async def stalled_target_pushes_back(self, query: str, timeout: float, limit: int) -> None:
        """A target that never reads stops the user's sender within
        ``timeout``; at most ``limit`` bytes were taken before it stopped."""
        from tests.helpers import PushSender, Stalled, listen_tcp

        stalled, _ = listen_tcp(Stalled)
        self.addCleanup(stalled.stopListening)
        self.tunnel_port = free_port()
        entry = free_port()
        await self.start_server(f"127.0.0.1:{entry}", f"&mode=1{query}")
        await self.start_client(f"127.0.0.1:{stalled.getHost().port}")
        c = await connect(entry)
        sender = PushSender(c.transport)
        self.addCleanup(sender.stopProducing)
        await wait_for(lambda: sender.paused, timeout=timeout, what="sender pushed back")
        await sleep(0.5)
        written = sender.written
        await sleep(0.5)
        self.assertLess(sender.written - written, 4 * MiB)  # stays (nearly) stopped
        self.assertLess(written, limit)
        sender.stopProducing()
        c.transport.abortConnection()  # a clean close would wait for the stalled target
        await c.lost

    def logged(self, name: str, text: str) -> bool:
        return any(text in line for line in self.lines.get(name, []))

    def echo_targets(self):
        """TCP and UDP echo servers on the same port (a target address serves
        both protocols)."""
        for _ in range(20):
            tcp, _ = listen_echo()
            port = tcp.getHost().port
            if _udp_free(port):
                break
            tcp.stopListening()
        self.addCleanup(tcp.stopListening)
        udp = listen_udp(UDPEcho(), port=port)
        self.addCleanup(udp.stopListening)
        return port, port

    async def tunnel(self, flow: str, query: str = "", client_query: str = "", server_host: str = "127.0.0.1",
                     client_host: str = "127.0.0.1", client_min: int = 8):
        """Server + client carrying ``flow``; returns (server, client, user
        entry port, (tcp target port, udp target port))."""
        tport, uport = self.echo_targets()
        entry = free_port()
        if flow == "-":
            # reverse: the server listens on its target, the client dials ours
            server = await self.start_server(f"127.0.0.1:{entry}", f"&mode=1{query}", host=server_host)
            client = await self.start_client(f"127.0.0.1:{tport}", client_query, host=client_host, min_size=client_min)
        else:
            # forward: the client listens, the server dials the echo target
            server = await self.start_server(f"127.0.0.1:{tport}", f"&mode=0{query}", host=server_host)
            client = await self.start_client(f"127.0.0.1:{entry}", client_query, host=client_host, min_size=client_min)
        self.assertEqual(server.runner.flow, flow)
        self.assertEqual(server.runner.mode, 1 if flow == "-" else 2)
        return server, client, entry, (tport, uport)


class _AnswerAndClose(Protocol):
    """A target that answers and closes at once (HTTP with ``Connection:
    close``)."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"answer:" + data)
        self.transport.loseConnection()


def _udp_free(port: int) -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def _foreign_session(cctx):
    """A TLS 1.3 session (with its ticket) of the client context ``cctx``
    with another server: one no tunnel server can resume."""
    from OpenSSL import SSL

    from nodepass.net.tls import _server_options, generate_self_signed

    sctx = _server_options(*generate_self_signed("localhost")).getContext()
    c = SSL.Connection(cctx, None)
    c.set_connect_state()
    srv = SSL.Connection(sctx, None)
    srv.set_accept_state()

    def pump(a, b) -> None:
        try:
            b.bio_write(a.bio_read(65536))
        except SSL.WantReadError:
            pass

    for _ in range(10):
        for conn in (c, srv):
            try:
                conn.do_handshake()
            except SSL.WantReadError:
                pass
        pump(c, srv)
        pump(srv, c)
    srv.send(b"x")  # the tickets go out with it
    pump(srv, c)
    c.recv(16)
    return c.get_session()


async def echo_roundtrip(port: int, payload: bytes, timeout: float = 10.0) -> bytes:
    c = await connect(port)
    c.transport.write(payload)
    got = await c.wait_bytes(len(payload), timeout=timeout)
    await close(c)
    return got


async def udp_roundtrip(port: int, datagrams: list[bytes]) -> list[bytes]:
    proto = UDPClient()
    p = reactor.listenUDP(0, proto, interface="127.0.0.1")
    try:
        got = []
        for dg in datagrams:
            nxt = proto.next(timeout=5)
            p.write(dg, ("127.0.0.1", port))
            got.append(await nxt)
        return got
    finally:
        await p.stopListening()


class FlowTests(TunnelMixin, unittest.TestCase):
    """Both flows x TCP and UDP x tls 0/1 (tls 2 below)."""

    async def _both(self, flow: str, tls: int) -> None:
        await self.carries_tcp_and_udp(flow, f"&tls={tls}")

    @d
    async def test_reverse_plain(self):
        await self._both("-", 0)

    @d
    async def test_forward_plain(self):
        await self._both("+", 0)

    @d
    async def test_reverse_tls1(self):
        await self._both("-", 1)

    @d
    async def test_forward_tls1(self):
        await self._both("+", 1)

    async def _large_transfer(self, tls: int) -> None:
        """16 MiB each way arrive intact (tls=0 relays with splice(2), tls=1
        through the TLS fast path)."""
        server, client, entry, _ = await self.tunnel("-", f"&tls={tls}")
        payload = os.urandom(16 * MiB)
        c = await connect(entry, protocol_class=HashingClient)
        c.transport.write(payload)
        digest = await c.wait_bytes(len(payload), timeout=60)
        self.assertEqual(digest, hashlib.sha256(payload).hexdigest())
        self.assertEqual(client.stats.tcp_tx, len(payload))  # written to the echo target
        self.assertEqual(client.stats.tcp_rx, len(payload))
        await close(c)
        await wait_for(lambda: server.stats.tcps == 0 and client.stats.tcps == 0, what="slots released")

    @d
    async def test_sessions_resume_under_load_and_after_a_ticket_is_refused(self):
        """Under load (many short connections, every used pool connection
        replaced) the replacements resume; and when the server stops
        taking the remembered ticket (expired, or another server), the
        client keeps the session of the next full handshake instead of
        paying a full handshake for every pool connection from then on."""
        from nodepass.compat.openssl_internals import session_reused

        server, client, entry, _ = await self.tunnel("-", "&tls=1")
        pool = client.runner.pool
        for _ in range(4):
            got = await defer.gatherResults([defer.ensureDeferred(echo_roundtrip(entry, b"x%d" % i)) for i in range(20)])
            self.assertEqual(len(got), 20)
        await wait_for(lambda: pool.idle_count() >= 8, what="pool refilled")
        reused = [session_reused(c.transport.getHandle()) for c in pool.idle.values()]
        self.assertGreaterEqual(sum(reused), len(reused) - 1, reused)
        # A ticket this server cannot resume (another server's session).
        creator = client.runner._tls_creator
        stale = _foreign_session(creator.inner.getContext())
        self.assertIsNotNone(stale)
        creator.session = stale
        for i in range(3):
            self.assertEqual(await echo_roundtrip(entry, b"y%d" % i), b"y%d" % i)
        await wait_for(lambda: creator.session is not stale, what="a fresh session kept")
        for i in range(12):
            self.assertEqual(await echo_roundtrip(entry, b"z%d" % i), b"z%d" % i)
        await wait_for(lambda: pool.idle_count() >= 8, what="pool refilled")
        reused = [session_reused(c.transport.getHandle()) for c in pool.idle.values()]
        self.assertGreater(sum(reused), len(reused) // 2, reused)

    @d
    async def test_large_transfer_sha256_plain(self):
        await self._large_transfer(0)

    @d
    async def test_large_transfer_sha256_tls(self):
        await self._large_transfer(1)

    @d
    async def test_backpressure_through_tunnel(self):
        """A target that never reads stops the user's sender: nothing in the
        tunnel buffers without bound (socket and pipe buffers only)."""
        await self.stalled_target_pushes_back("", timeout=10, limit=64 * MiB)

    async def _endless_download_then_close(self, flow: str) -> None:
        """The user of a relayed download from an endless source goes away:
        both ends let go of the connection (TLS shutdown must not leave the
        exit side pumping its target forever)."""
        from tests.helpers import Endless, listen_tcp

        src, _ = listen_tcp(Endless)
        self.addCleanup(src.stopListening)
        self.tunnel_port = free_port()
        entry = free_port()
        if flow == "-":
            server = await self.start_server(f"127.0.0.1:{entry}", "&mode=1&tls=1")
            client = await self.start_client(f"127.0.0.1:{src.getHost().port}")
        else:
            server = await self.start_server(f"127.0.0.1:{src.getHost().port}", "&mode=0&tls=1")
            client = await self.start_client(f"127.0.0.1:{entry}")
        for _ in range(2):
            c = await connect(entry)
            await c.wait_bytes(4 * MiB)
            await close(c)
        await wait_for(lambda: server.stats.tcps == 0 and client.stats.tcps == 0, what="both ends released")

    @d
    async def test_lean_transports_and_splice_for_bulk(self):
        """tls=0: the user, the target and the pool connections at both ends
        are lean transports; a relay that outlives a short exchange moves
        to splice(2) (one timer for all relays), and a short one is over
        before it would."""
        from nodepass.compat.twisted_fastpath import LeanConnection
        from nodepass.relay import splice

        server, client, entry, _ = await self.tunnel("-", "&tls=0")
        self.assertEqual(await echo_roundtrip(entry, b"short"), b"short")  # over before DELAY
        c = await connect(entry)
        c.transport.write(b"first")
        await c.wait_bytes(5)
        await wait_for(lambda: len(server.runner.relays) == 1 and len(client.runner.relays) == 1, what="relays up")
        (entry_relay,) = server.runner.relays
        (exit_relay,) = client.runner.relays
        for relay in (entry_relay, exit_relay):
            for end in (relay.target, relay.tunnel):
                self.assertIsInstance(end.transport, LeanConnection)
        if splice.AVAILABLE and not os.environ.get("NP_NO_SPLICE"):
            def spliced(relay) -> bool:
                return all("doRead" in end.transport.__dict__ for end in (relay.target, relay.tunnel))

            await wait_for(lambda: spliced(entry_relay) and spliced(exit_relay), what="relays moved to splice(2)")
        payload = os.urandom(MiB)
        c.transport.write(payload)
        self.assertEqual(await c.wait_bytes(5 + len(payload)), b"first" + payload)
        await close(c)
        await wait_for(lambda: server.stats.tcps == 0 and client.stats.tcps == 0, what="slots released")

    @d
    async def test_target_answers_and_closes_at_once(self):
        """An exit target that answers and closes at once (HTTP with
        ``Connection: close``): the user gets the whole answer, then EOF."""
        from tests.helpers import listen_tcp

        class Answer(Protocol):
            def dataReceived(self, data):
                self.transport.write(b"answer:" + data)
                self.transport.loseConnection()

        target, _ = listen_tcp(Answer)
        self.addCleanup(target.stopListening)
        entry = free_port()
        server = await self.start_server(f"127.0.0.1:{entry}", "&mode=1")
        client = await self.start_client(f"127.0.0.1:{target.getHost().port}")
        for i in range(20):
            c = await connect(entry)
            c.transport.write(b"q%d" % i)
            self.assertEqual(await c.lost, b"answer:q%d" % i)
        await wait_for(lambda: server.stats.tcps == 0 and client.stats.tcps == 0, what="slots released")

    async def _answering_tls_tunnel(self):
        """A tls=1 tunnel (reverse flow) to a target that answers and closes
        at once, as HTTP with ``Connection: close`` does; returns (server,
        client, user entry port) once the client's pool is full."""
        from tests.helpers import listen_tcp

        target, _ = listen_tcp(_AnswerAndClose)
        self.addCleanup(target.stopListening)
        entry = free_port()
        self.tunnel_port = free_port()
        server = await self.start_server(f"127.0.0.1:{entry}", "&mode=1&tls=1")
        client = await self.start_client(f"127.0.0.1:{target.getHost().port}")
        await wait_for(lambda: client.runner.pool.idle_count() >= 8, what="pool filled")
        return server, client, entry

    async def _ask(self, entry: int, server: TunnelService, client: TunnelService, n: int) -> None:
        """``n`` users one after another, each answered; then every slot is
        released and the client's pool is full again."""
        for i in range(n):
            c = await connect(entry)
            c.transport.write(b"q%d" % i)
            self.assertEqual(await c.lost, b"answer:q%d" % i)
        await wait_for(lambda: server.stats.tcps == 0 and client.stats.tcps == 0, what="slots released")
        await wait_for(lambda: client.runner.pool.idle_count() >= 8, what="pool refilled")

    @d
    async def test_tls_pool_connections_close_cleanly_at_both_ends(self):
        """A tls=1 pool connection that carried an exchange ends with
        close_notify sent and received at both ends (no TLS error, no
        unexpected EOF, no Failure logged), and both relays end with Go's
        ``EOF``.  The client dials its pool connections lean and runs TLS
        over them (startTLS), as the server accepts them."""
        from OpenSSL import SSL
        from twisted.internet.error import ConnectionDone

        from nodepass.compat.twisted_fastpath import LeanConnection
        from nodepass.compat.twisted_tls import tls_layer

        server, client, entry = await self._answering_tls_tunnel()
        client_ends = list(client.runner.pool.idle.values())
        server_ends = list(server.runner.pool.idle.values())
        for end in client_ends + server_ends:
            self.assertIs(type(end.transport), LeanConnection)
            self.assertTrue(end.transport.TLS)
        # (The TLS layer lets go of its OpenSSL connection once lost.)
        handles = [(end, end.transport.getHandle()) for end in client_ends + server_ends]
        self.assertTrue(all(tls_layer(end.transport) is not None for end, _ in handles))
        await self._ask(entry, server, client, 6)
        used = [(end, handle) for end, handle in handles if end.relay is not None]
        self.assertGreaterEqual(len(used), 12, "both ends of six exchanges")
        # (A relay is over once one end is lost; the other may still be
        # finishing its TLS shutdown.)
        await wait_for(lambda: all(end.lost for end, _ in used), what="pool connections closed")
        both = SSL.SENT_SHUTDOWN | SSL.RECEIVED_SHUTDOWN
        for end, handle in used:
            self.assertIsInstance(end.lost_reason.value, ConnectionDone)
            self.assertEqual(handle.get_shutdown(), both)
        for name in ("server", "client"):
            outcomes = [line for line in self.lines[name] if "Exchange complete: " in line]
            self.assertEqual(len(outcomes), 6, outcomes)
            self.assertTrue(all(line.endswith("Exchange complete: EOF") for line in outcomes), outcomes)

    @d
    async def test_tls_pool_connection_lost_without_close_notify(self):
        """A tls=1 pool connection whose TCP connection goes away without a
        close_notify (the client's end aborted mid-exchange) still ends the
        exchange at the server: the user is closed, both ends release their
        slots, and the pool carries the next user as usual."""
        server, client, entry, _ = await self.tunnel("-", "&tls=1")
        c = await connect(entry)
        c.transport.write(b"before")
        self.assertEqual(await c.wait_bytes(6), b"before")
        relays = list(client.runner.relays)
        self.assertEqual(len(relays), 1)
        relays[0].tunnel.transport.abortConnection()  # a reset, no close_notify
        await c.lost
        await wait_for(lambda: server.stats.tcps == 0 and client.stats.tcps == 0, what="slots released")
        self.assertEqual(await echo_roundtrip(entry, b"after"), b"after")

    @d
    async def test_tls_connections_leave_no_garbage(self):
        """Relayed tls=1 connections are freed by reference counting at both
        ends: nothing of theirs (pool ends, lean connections, TLS layers,
        the fast path's closures) is left for the garbage collector."""
        from tests.helpers import collector_off, garbage_names, garbage_of_ours

        server, client, entry = await self._answering_tls_tunnel()
        await self._ask(entry, server, client, 3)  # (module-level caches filled)
        with collector_off():
            ends = list(client.runner.pool.idle.values()) + list(server.runner.pool.idle.values())
            await self._ask(entry, server, client, 10)
            used = [end for end in ends if end.relay is not None]
            self.assertGreaterEqual(len(used), 10)
            await wait_for(lambda: all(end.lost for end in used), what="pool connections closed")
            ends = used = []  # (theirs is the only reference that counts)
            left = garbage_of_ours()
        self.assertEqual(left, [], garbage_names(left))

    @d
    async def test_tls_pool_connections_reset_leave_no_garbage(self):
        """Idle tls=1 pool connections that the peer resets (no
        close_notify: a server that was killed) are freed by reference
        counting.  Twisted's TLS layer keeps the Failure of the SSL error it
        then catches, whose traceback held the layer and the SSL connection
        in a cycle: a client whose server kept restarting grew by its whole
        pool each time (``LeanTLSProtocol._tlsShutdownFinished``)."""
        from tests.helpers import collector_off, garbage_names, garbage_of_ours

        server, client, entry, _ = await self.tunnel("-", "&tls=1")
        self.assertEqual(await echo_roundtrip(entry, b"warm"), b"warm")
        pool = client.runner.pool
        await wait_for(lambda: pool.idle_count() >= 4, what="idle pool connections")
        with collector_off():
            theirs = [end for end in list(pool.idle.values()) if end.pool_id in server.runner.pool.idle][:4]
            self.assertEqual(len(theirs), 4)
            for end in theirs:
                server.runner.pool.idle[end.pool_id].transport.abortConnection()  # a reset
            await wait_for(lambda: all(end.lost for end in theirs), what="the client saw the resets")
            theirs = []  # (the test's references are the only ones that count)
            left = garbage_of_ours()
        self.assertEqual(left, [], garbage_names(left))

    @d
    async def test_endless_download_closed_reverse(self):
        await self._endless_download_then_close("-")

    @d
    async def test_endless_download_closed_forward(self):
        await self._endless_download_then_close("+")

    @d
    async def test_ipv6_tunnel(self):
        """Tunnel and entry on ::1 (pool connections from the control IP ::1)."""
        from tests.helpers import ipv6_available

        self.assertTrue(ipv6_available(), "this test needs ::1")
        tport, _ = self.echo_targets()
        self.tunnel_port = free_port("::1")
        entry = free_port("::1")
        server = await self.start_server(f"[::1]:{entry}", "&mode=1&tls=1", host="[::1]", port=self.tunnel_port)
        await self.start_client(f"127.0.0.1:{tport}", host="[::1]")
        c = await connect(entry, host="::1")
        c.transport.write(b"over v6")
        self.assertEqual(await c.wait_bytes(7), b"over v6")
        await close(c)
        self.assertTrue(server.runner.control_peer.startswith("[::1]:"), server.runner.control_peer)

    @d
    async def test_proxy_header(self):
        """proxy=1 at the exit: PROXY v1 with the user's address first."""
        from tests.helpers import Sink, listen_tcp

        sink_port, factory = listen_tcp(Sink)
        self.addCleanup(sink_port.stopListening)
        self.tunnel_port = free_port()
        entry = free_port()
        await self.start_server(f"127.0.0.1:{entry}", "&mode=1")
        await self.start_client(f"127.0.0.1:{sink_port.getHost().port}", "&proxy=1")
        c = await connect(entry)
        c.transport.write(b"payload")
        await wait_for(lambda: factory.connections and factory.connections[0].received >= 7, what="data at target")
        src = c.transport.getHost()
        data = factory.connections[0].data()
        self.assertTrue(data.startswith(f"PROXY TCP4 127.0.0.1 127.0.0.1 {src.port} ".encode()), data)
        self.assertTrue(data.endswith(b"\r\npayload"))
        await close(c)


class FlowTests112(FlowTests):
    """The same, both ends pinned to the 1.12 generation."""

    wire = "1.12"


class CAMixin(TunnelMixin):
    """tls=2: a CA made here, the client trusts it through SSL_CERT_FILE."""

    def setUp(self):
        super().setUp()
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.ca_path, self.ca, self.ca_key = make_ca(self.dir)
        old = os.environ.get("SSL_CERT_FILE")
        os.environ["SSL_CERT_FILE"] = self.ca_path
        self.addCleanup(lambda: os.environ.__setitem__("SSL_CERT_FILE", old) if old else os.environ.pop("SSL_CERT_FILE", None))

    async def wrong_host_name_refused(self, query: str) -> None:
        """A certificate for another host name: the client refuses it with a
        clear line, keeps no pool, and users get nothing through."""
        crt, key = make_leaf(self.dir, self.ca, self.ca_key, "other.example")
        tport, _ = self.echo_targets()
        entry = free_port()
        await self.start_server(f"127.0.0.1:{entry}", f"&mode=1&tls=2&crt={crt}&key={key}{query}")
        # A 1.14 client never gets its control connection (the first pool
        # connection): it does not start.  A 1.12 one starts without a pool.
        client = await self.start_client(f"127.0.0.1:{tport}", host="localhost", wait=self.wire == "1.12")
        await wait_for(lambda: self.logged("client", "TLS verification of the server"), timeout=10,
                       what="refusal logged")
        self.assertTrue(client.runner is None or client.runner.pool is None or client.runner.pool.idle_count() == 0)
        c = await connect(entry)
        c.transport.write(b"never")
        await c.lost  # no pool connection: the entry gives up
        self.assertEqual(c.data(), b"")


class TLSVerifyTests(CAMixin, unittest.TestCase):

    async def _tls2(self, flow: str) -> None:
        crt, key = make_leaf(self.dir, self.ca, self.ca_key, "localhost")
        server, client, entry, _ = await self.tunnel(flow, f"&tls=2&crt={crt}&key={key}", client_host="localhost")
        self.assertEqual(server.runner.tls_code, 2)
        self.assertEqual(client.runner.tls_code, 2)
        self.assertEqual(await echo_roundtrip(entry, b"x" * 5000), b"x" * 5000)
        self.assertEqual(await udp_roundtrip(entry, [b"u1", b"u2"]), [b"u1", b"u2"])
        line = self.verified_line(server)
        await wait_for(lambda: self.logged("client", line + "sha256:"), what="client verify line")

    @d
    async def test_reverse_tls2(self):
        await self._tls2("-")

    @d
    async def test_forward_tls2(self):
        await self._tls2("+")

    @d
    async def test_pool_connections_resume_tls_sessions(self):
        """After the first pool connection, the client resumes the server's
        session ticket instead of a full handshake (still verified, tls=2)."""
        from nodepass.compat.openssl_internals import session_reused

        crt, key = make_leaf(self.dir, self.ca, self.ca_key, "localhost")
        server, client, entry, _ = await self.tunnel("-", f"&tls=2&crt={crt}&key={key}", client_host="localhost")
        for i in range(5):
            self.assertEqual(await echo_roundtrip(entry, b"r%d" % i), b"r%d" % i)
        pool = client.runner.pool
        await wait_for(lambda: pool.idle_count() >= 8, what="pool refilled")
        reused = [session_reused(c.transport.getHandle()) for c in pool.idle.values()]
        self.assertGreater(sum(reused), 0, reused)

    @d
    async def test_wrong_host_name_refused(self):
        await self.wrong_host_name_refused("")

    @d
    async def test_bad_files_fall_back_to_tls1(self):
        tport, _ = self.echo_targets()
        server = await self.start_server(f"127.0.0.1:{tport}", "&tls=2&crt=/nonexistent.crt&key=/nonexistent.key")
        self.assertEqual(server.runner.tls_code, 1)
        self.assertTrue(self.logged("server", "falling back to tls=1"))


class SNITests(CAMixin, unittest.TestCase):
    """SPEC-1.14 §4.6: ``sni=`` names the server for tls=2 on an IP tunnel
    host, and is the handshake's ``Host``."""

    @d
    async def test_sni_names_the_server_of_an_ip_tunnel_host(self):
        crt, key = make_leaf(self.dir, self.ca, self.ca_key, "localhost")
        server, client, entry, _ = await self.tunnel("+", f"&tls=2&crt={crt}&key={key}", client_query="&sni=localhost")
        self.assertEqual(await echo_roundtrip(entry, b"named"), b"named")
        self.assertIn("&sni=localhost&", client.config.start_url())

    @d
    async def test_without_sni_an_ip_host_verifies_the_name_none(self):
        """The default ``none`` matches no certificate: refused, clearly."""
        crt, key = make_leaf(self.dir, self.ca, self.ca_key, "localhost")
        tport, _ = self.echo_targets()
        await self.start_server(f"127.0.0.1:{free_port()}", f"&mode=1&tls=2&crt={crt}&key={key}")
        await self.start_client(f"127.0.0.1:{tport}", wait=False)
        await wait_for(lambda: self.logged("client", "TLS verification of the server"), timeout=10,
                       what="refusal logged")

    @d
    async def test_sni_is_the_handshake_host(self):
        from tests.helpers import listen_tcp

        class Recorder(Protocol):
            def dataReceived(self, data: bytes) -> None:
                self.factory.got.append(data)

        port, factory = listen_tcp(Recorder)
        factory.got = []
        self.addCleanup(port.stopListening)
        self.tunnel_port = port.getHost().port
        await self.start_client("127.0.0.1:9", "&sni=cdn.example", wait=False)
        await wait_for(lambda: b"\r\n\r\n" in b"".join(factory.got), what="handshake request")
        self.assertIn(b"\r\nHost: cdn.example\r\n", b"".join(factory.got))


class WebSocketPoolTests(CAMixin, unittest.TestCase):
    """type=2 (SPEC-1.14 §4.4): both flows x TCP and UDP over WebSockets,
    ws:// (tls=0) and wss:// (tls 1 and 2); datagram boundaries kept."""

    async def _both(self, flow: str, query: str) -> None:
        server, client = await self.carries_tcp_and_udp(flow, f"&type=2{query}", size=300_000)
        self.assertEqual((server.runner.pool_type, client.runner.pool_type), (2, 2))
        self.assertTrue(getattr(client.runner.control.transport, "websocket_stream", False))
        idle = list(server.runner.pool.idle.values())
        self.assertTrue(idle and all(getattr(c.transport, "websocket_stream", False) for c in idle))

    @d
    async def test_reverse_ws(self):
        await self._both("-", "&tls=0")

    @d
    async def test_forward_wss(self):
        await self._both("+", "&tls=1")

    @d
    async def test_wss_verified_tls2(self):
        crt, key = make_leaf(self.dir, self.ca, self.ca_key, "localhost")
        server, client, entry, _ = await self.tunnel("-", f"&type=2&tls=2&crt={crt}&key={key}", client_host="localhost")
        self.assertEqual(await echo_roundtrip(entry, b"z" * 70000), b"z" * 70000)
        await wait_for(lambda: self.logged("server", "TLS certificate fingerprint verified: sha256:"),
                       what="server verify line")

    @d
    async def test_stranger_upgrade_refused(self):
        """A WebSocket upgrade from another address without our token is
        refused (Go would pool it and could hand it user traffic)."""
        server, client, entry, _ = await self.tunnel("-", "&type=2&tls=0")
        pooled = server.runner.pool.idle_count()
        c = await _connect_from("127.0.0.2", self.tunnel_port)
        c.transport.write(
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nSec-Websocket-Key: OabYU+AjCv/nJYpuwpfMRA==\r\n"
            b"Sec-Websocket-Version: 13\r\nUpgrade: websocket\r\n\r\n"
        )
        await c.lost
        self.assertTrue(c.data().startswith(b"HTTP/1.1 403 Forbidden\r\n"), c.data()[:60])
        self.assertLessEqual(server.runner.pool.idle_count(), max(pooled, 8))
        self.assertEqual(await echo_roundtrip(entry, b"still"), b"still")


class HTTP2PoolTests(CAMixin, unittest.TestCase):
    """type=3 (SPEC-1.14 §4.5): both flows x TCP and UDP over streams of one
    HTTP/2 connection (TLS with ALPN h2), closes both ways, tls=2 by sni."""

    async def _both(self, flow: str, query: str) -> tuple[TunnelService, TunnelService]:
        server, client = await self.carries_tcp_and_udp(flow, f"&type=3{query}", size=300_000)
        self.assertEqual((server.runner.pool_type, client.runner.pool_type), (3, 3))
        self.assertTrue(getattr(client.runner.control.transport, "h2_stream", False))
        self.assertEqual(client.runner.h2_client.dials, 1)  # one connection carries every stream
        self.assertTrue(self.logged("server", "TLS code-1: RAM cert with TLS 1.3 for stream pool"))
        return server, client

    @d
    async def test_reverse_tls0_raised_to_tls1(self):
        await self._both("-", "&tls=0")

    @d
    async def test_forward_many_concurrent_connections(self):
        server, client = await self._both("+", "&tls=1")
        entry = client.runner.entry_port
        payloads = [os.urandom(50_000 + i) for i in range(16)]
        got = await defer.gatherResults([defer.ensureDeferred(echo_roundtrip(entry, p)) for p in payloads])
        self.assertEqual(got, payloads)
        self.assertEqual(client.runner.h2_client.dials, 1)

    @d
    async def test_target_close_reaches_the_user(self):
        """Unlike Go v1.14.0, a stream the server side closes ends for the
        client's user too (flow +: the target hangs up)."""
        from tests.helpers import listen_tcp

        class HangUp(Protocol):
            def connectionMade(self) -> None:
                self.transport.write(b"bye")
                self.transport.loseConnection()

        port, _ = listen_tcp(HangUp)
        self.addCleanup(port.stopListening)
        self.tunnel_port = free_port()
        await self.start_server(f"127.0.0.1:{port.getHost().port}", "&mode=2&type=3")
        entry = free_port()
        await self.start_client(f"127.0.0.1:{entry}")
        c = await connect(entry)
        await c.lost
        self.assertEqual(c.data(), b"bye")

    @d
    async def test_tls2_verified_by_sni(self):
        crt, key = make_leaf(self.dir, self.ca, self.ca_key, "localhost")
        server, client, entry, _ = await self.tunnel(
            "-", f"&type=3&tls=2&crt={crt}&key={key}", client_query="&sni=localhost"
        )
        self.assertEqual(await echo_roundtrip(entry, b"q" * 70000), b"q" * 70000)
        await wait_for(lambda: self.logged("server", "TLS certificate fingerprint verified: sha256:"),
                       what="server verify line")


class TLSVerifyTests112(TLSVerifyTests):
    """The same, both ends pinned to the 1.12 generation."""

    wire = "1.12"


class ResilienceTests(TunnelMixin, unittest.TestCase):
    @d
    async def test_server_restart_client_recovers(self):
        server, client, entry, (tport, _) = await self.tunnel("+")
        self.assertEqual(await echo_roundtrip(entry, b"before"), b"before")
        await server.stopService()
        await wait_for(lambda: self.logged("client", "Client error:"), what="client notices")
        await sleep(0.5)  # the client retries while the server is down
        self.assertTrue(self.logged("client", "Client restart"))
        await self.start_server(f"127.0.0.1:{tport}", "&mode=0", port=self.tunnel_port, name="server2")
        await wait_for(lambda: client.runner is not None and client.runner.control is not None
                       and not client.runner.control.broken and client.runner.pool_idle() > 0,
                       timeout=10, what="client reconnected")
        self.assertEqual(await echo_roundtrip(entry, b"after"), b"after")

    @d
    async def test_wrong_key_rejected_right_key_keeps_working(self):
        server, client, entry, (tport, _) = await self.tunnel("-")
        bad = await self.start_client(f"127.0.0.1:{tport}", name="bad", key="wrongkey", wait=False)
        await wait_for(lambda: self.logged("bad", "refused our tunnel key"), what="bad client told")
        self.assertTrue(self.logged("bad", "Client error:"))
        self.assertTrue(self.logged("server", "access denied: 127.0.0.1:"))
        await bad.stopService()
        for i in range(5):
            self.assertEqual(await echo_roundtrip(entry, b"ok%d" % i), b"ok%d" % i)
        self.assertFalse(self.logged("server", "Server error"))

    @d
    async def test_wrong_key_same_host_forward_flow(self):
        """Flow "+": a wrong-key client on the real client's host first looks
        like a pool connection; unclaimed, it is judged and refused."""
        server, client, entry, (tport, _) = await self.tunnel("+")
        bad = await self.start_client("127.0.0.1:1", name="bad", key="wrongkey", wait=False)
        await wait_for(lambda: self.logged("server", "access denied: 127.0.0.1:"), what="refusal")
        await wait_for(lambda: self.logged("bad", "Client error:"), what="bad client fails")
        await bad.stopService()
        for i in range(3):
            self.assertEqual(await echo_roundtrip(entry, b"ok%d" % i), b"ok%d" % i)
        self.assertFalse(self.logged("server", "Server error"))

    @d
    async def test_tunnel_port_abuse_while_traffic_flows(self):
        """Garbage, HTTP probes and half-open sockets on the tunnel port do
        not disturb a running tunnel (they come from another loopback IP,
        as they would from another host)."""
        server, client, entry, _ = await self.tunnel("-", "", server_host="0.0.0.0")
        half_open = []
        for _ in range(5):
            half_open.append(await _connect_from("127.0.0.2", self.tunnel_port))
        got = []
        for i in range(20):
            garbage = await _connect_from("127.0.0.2", self.tunnel_port)
            garbage.transport.write(os.urandom(3000) + b"\n")
            probe = await _connect_from("127.0.0.2", self.tunnel_port)
            probe.transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            got.append(await echo_roundtrip(entry, b"t%d" % i))
            answer = await probe.lost
            self.assertTrue(answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer)
            self.assertIn(b"Content-Type: text/plain", answer)
            self.assertTrue(answer.endswith(b"\r\n\r\n127.0.0.2\n"), answer)
            await garbage.lost
        self.assertEqual(got, [b"t%d" % i for i in range(20)])
        put = await _connect_from("127.0.0.2", self.tunnel_port)
        put.transport.write(b"PUT / HTTP/1.1\r\n\r\n")
        answer = await put.lost
        self.assertTrue(answer.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n"), answer)
        self.assertIn(b"Allow: GET\r\n", answer)
        for h in half_open:  # closed by the handshake timeout, tunnel unharmed
            await h.lost
        self.assertEqual(await echo_roundtrip(entry, b"still"), b"still")
        self.assertFalse(self.logged("server", "Server error"))
        self.assertTrue(self.logged("server", "access denied: 127.0.0.2:"))

    @d
    async def test_first_valid_handshake_wins(self):
        """Handshakes in flight when a client gets in are closed."""
        tport, _ = self.echo_targets()
        entry = free_port()
        await self.start_server(f"127.0.0.1:{entry}", "&mode=1", host="0.0.0.0")
        pending = [await _connect_from("127.0.0.2", self.tunnel_port) for _ in range(3)]
        for p in pending:
            p.transport.write(b"QUJD")  # a line that never ends
        await self.start_client(f"127.0.0.1:{tport}")
        for p in pending:
            await p.lost
        self.assertTrue(self.logged("server", "(another client won the handshake)"))
        self.assertEqual(await echo_roundtrip(entry, b"winner"), b"winner")

    @d
    async def test_http_probe_before_handshake(self):
        tport, _ = self.echo_targets()
        await self.start_server(f"127.0.0.1:{tport}")
        probe = await connect(self.tunnel_port)
        probe.transport.write(b"GET /ip HTTP/1.0\r\n\r\n")
        answer = await probe.lost
        self.assertTrue(answer.endswith(b"\r\n\r\n127.0.0.1\n"), answer)

    @d
    async def test_thousand_short_connections(self):
        server, client, entry, _ = await self.tunnel("+")
        for i in range(1000):
            msg = b"m%04d" % i
            self.assertEqual(await echo_roundtrip(entry, msg), msg)
        await wait_for(lambda: server.stats.tcps == 0 and client.stats.tcps == 0, what="slots released")
        self.assertFalse(self.logged("client", "ERROR"))

    async def _users_leave_at_once(self, query: str, flow: str) -> None:
        """Users that connect and leave at once (health checks, port scans):
        the entry names a pool connection in its launch and closes it, and
        the exit may see that close before the launch (separate connections,
        or frames of one QUIC packet in stream order).  The exit's control
        connection is held still while the users come and go, so every
        launch arrives after its pool connection closed.  Each settles at
        once, without a pool error or an error line, and the tunnel goes on
        carrying traffic.  (Before, such a launch waited ``pool_get_timeout``
        for a connection that was gone, then logged an ERROR and counted a
        pool error; enough of them flushed the pool.)"""
        patient = Tunables(**{**_fields(FAST), "pool_get_timeout": 60.0, "report_interval": 5.0})
        tport, _ = self.echo_targets()
        entry = free_port()
        if flow == "-":
            server = await self.start_server(f"127.0.0.1:{entry}", f"&mode=1{query}", tunables=patient)
            client = await self.start_client(f"127.0.0.1:{tport}", tunables=patient, min_size=16)
            exit_ = client
        else:
            server = await self.start_server(f"127.0.0.1:{tport}", f"&mode=0{query}", tunables=patient)
            client = await self.start_client(f"127.0.0.1:{entry}", tunables=patient, min_size=16)
            exit_ = server
        self.assertEqual(await echo_roundtrip(entry, b"first"), b"first")
        runner = exit_.runner
        names = ("server", "client") if exit_ is client else ("client", "server")

        def launches(name: str, arrow: str) -> int:
            return sum('"action":"tcp"' in line and arrow in line for line in self.lines[name])

        sent, read = launches(names[0], "->"), launches(names[1], "<-")
        control = runner.control.transport
        control.pauseProducing()
        try:
            for i in range(1, 11):
                user = await connect(entry)
                await close(user)
                await wait_for(lambda: launches(names[0], "->") - sent == i, what=f"the entry's launch for user {i}")
            await wait_for(lambda: len(runner.pool._gone) >= 10, what="the exit saw the named pool connections closed")
        finally:
            control.resumeProducing()
        await wait_for(lambda: launches(names[1], "<-") - read == 10, what="the exit read the 10 launches")
        await wait_for(
            lambda: runner.launching == 0 and server.stats.tcps == 0 and client.stats.tcps == 0,
            timeout=20,
            what=f"every launch settled ({query}, flow {flow}; a missed one would wait 60 s)",
        )
        self.assertEqual(runner.pool.errors, 0)
        name = "client" if exit_ is client else "server"
        self.assertFalse(self.logged(name, "did not arrive"), self.lines.get(name))
        self.assertFalse(self.logged(name, "ERROR"), self.lines.get(name))
        self.assertEqual(await echo_roundtrip(entry, b"after"), b"after")

    @d
    async def test_slot_refusals_logged_once_then_summed(self):
        """Users beyond ``slot`` are refused with one ERROR line for the
        first and one summary line per report interval for the rest, not
        a line each (under overload that was thousands of lines a second),
        and the tunnel serves again once slots are free."""
        server, client, entry, _ = await self.tunnel("-", "&slot=2")
        held = []
        for i in range(2):
            user = await connect(entry)
            user.transport.write(b"held%d" % i)
            self.assertEqual(await user.wait_bytes(5), b"held%d" % i)
            held.append(user)
        for _ in range(20):
            user = await connect(entry)
            await user.lost  # refused
        await wait_for(lambda: self.logged("server", "more connections in the last"), what="the summary line")
        lines = self.lines["server"]
        self.assertEqual(len([ln for ln in lines if "TCP slot limit reached (2), refusing 127.0.0.1:" in ln]), 1, lines)
        summary = [ln for ln in lines if "more connections in the last" in ln]
        self.assertEqual(len(summary), 1, lines)
        self.assertRegex(summary[0], r"ERROR  TCP slot limit reached \(2\), refused 19 more connections in the last \S+ \(the last from 127\.0\.0\.1:\d+\)")
        for user in held:
            await close(user)
        await wait_for(lambda: server.stats.tcps == 0, what="the held slots released")
        self.assertEqual(await echo_roundtrip(entry, b"after"), b"after")

    @d
    async def test_users_that_leave_at_once_tls_pool(self):
        await self._users_leave_at_once("&tls=1", "-")
        await self._users_leave_at_once("&tls=1", "+")

    @d
    async def test_users_that_leave_at_once_quic_pool(self):
        await self._users_leave_at_once("&type=1", "-")
        await self._users_leave_at_once("&type=1", "+")

    @d
    async def test_users_that_leave_at_once_plain_pool(self):
        await self._users_leave_at_once("&tls=0", "-")

    @d
    async def test_pool_refills_after_use_without_waiting_for_rounds(self):
        slow = Tunables(**{**_fields(FAST), "min_pool_interval": 30.0, "max_pool_interval": 30.0})
        tport, _ = self.echo_targets()
        entry = free_port()
        await self.start_server(f"127.0.0.1:{entry}", "&mode=1", tunables=slow)
        client = await self.start_client(f"127.0.0.1:{tport}", tunables=slow)
        pool = client.runner.pool
        await wait_for(lambda: pool.idle_count() == 8, what="first round done (min=8)")
        for i in range(5):
            self.assertEqual(await echo_roundtrip(entry, b"r%d" % i), b"r%d" % i)
        # rounds are 30 s apart: only the refill-on-use brings it back
        await wait_for(lambda: pool.idle_count() == 8, timeout=3, what="pool refilled")
        self.assertLessEqual(pool.idle_count() + pool.inflight, pool.capacity)

    @d
    async def test_pool_errors_trigger_flush(self):
        """Launches naming unknown pool IDs are pool errors at the exit; when
        they exceed half its idle connections it flushes both pools (SPEC
        §3.3) and the tunnel carries on."""
        from nodepass.wire import codec

        server, client, entry, _ = await self.tunnel("-")
        pool = client.runner.pool
        await wait_for(lambda: pool.idle_count() >= 8, what="pool filled")
        for i in range(20):  # as a confused or malicious entry might
            server.runner.control.send(codec.Signal(codec.TCP_LAUNCH, "192.0.2.1:1000", f"{i:08x}"))
        await wait_for(lambda: self.logged("client", "Pool errors (20) exceed half the idle connections"),
                       timeout=6, what="flush decided")
        await wait_for(lambda: self.logged("server", "Pool flushed on request"), what="flush signal received")
        self.assertEqual(pool.errors, 0)
        self.assertEqual(await echo_roundtrip(entry, b"after flush"), b"after flush")

    @d
    async def test_client_retries_while_server_down(self):
        self.tunnel_port = free_port()
        client = await self.start_client("127.0.0.1:9", wait=False)
        await wait_for(lambda: sum("Client restart" in x for x in self.lines["client"]) >= 2, what="retries")
        self.assertTrue(self.logged("client", "Client error: cannot reach the server"))
        tport, _ = self.echo_targets()
        await self.start_server(f"127.0.0.1:{tport}", port=self.tunnel_port)
        await service_up(client, "client")


def _fields(t: Tunables) -> dict:
    import attrs

    return {k: v for k, v in attrs.asdict(t).items() if k != "warnings"}


async def _connect_from(source: str, port: int) -> Client:
    d: defer.Deferred = defer.Deferred()

    class F(ClientFactory):
        noisy = False

        def buildProtocol(self, addr):
            p = Client()
            made = p.connectionMade

            def connection_made():
                made()
                d.callback(p)

            p.connectionMade = connection_made
            return p

        def clientConnectionFailed(self, connector, reason):
            d.errback(reason)

    reactor.connectTCP("127.0.0.1", port, F(), bindAddress=(source, 0))
    return await d


# -- pool sizing with a fake clock ---------------------------------------


class _Transport:
    def __init__(self):
        self.closed = False

    def loseConnection(self):
        self.closed = True


class _Conn:
    """Stands in for a pool connection in sizing tests (no network)."""

    _n = 0

    def __init__(self):
        _Conn._n += 1
        self.pool_id = f"{_Conn._n:08x}"
        self.transport = _Transport()
        self.lost = False

    def on_lost(self, cb):
        pass


class GoneConnectionTests(unittest.TestCase):
    """A get for an idle connection its peer closed ends at once
    (:class:`PoolConnectionGone`), without a wait or a pool error."""

    def _pool(self):
        clock = task.Clock()
        return IdlePool(clock, NodeLog("none")), clock

    def _offer(self, pool, pool_id):
        conn = _Conn()
        lost = []
        conn.on_lost = lost.append  # the pool's discard callback
        self.assertTrue(pool._offer(pool_id, conn))
        return conn, lost

    def _peer_closes(self, conn, lost):
        conn.lost = True
        for cb in lost:
            cb(None)

    def test_get_after_the_peer_closed_it_fails_at_once(self):
        pool, clock = self._pool()
        conn, lost = self._offer(pool, "aaaa0001")
        self._peer_closes(conn, lost)
        self.assertEqual(pool.idle_count(), 0)
        failure = self.failureResultOf(pool.outgoing_get("aaaa0001", 5.0), PoolConnectionGone)
        self.assertIn("aaaa0001", failure.getErrorMessage())
        self.assertEqual(clock.getDelayedCalls(), [])  # no wait
        self.assertEqual(pool.errors, 0)
        # once: a second launch naming it is a miss like any other
        d = pool.outgoing_get("aaaa0001", 5.0)
        self.assertNoResult(d)
        clock.advance(5.0)
        self.failureResultOf(d, PoolTimeout)
        self.assertEqual(pool.errors, 1)

    def test_lenient_take_of_a_lost_connection_remembers_it(self):
        pool, clock = self._pool()
        conn, _lost = self._offer(pool, "aaaa0002")
        conn.lost = True  # lost, and no callback yet
        self.assertIsNone(pool.take("aaaa0002"))
        self.failureResultOf(pool.outgoing_get("aaaa0002", 5.0), PoolConnectionGone)
        self.assertEqual(pool.errors, 0)

    def test_unknown_ids_still_wait_and_count(self):
        pool, clock = self._pool()
        d = pool.outgoing_get("bbbb0001", 2.0)
        self.assertNoResult(d)
        conn, _lost = self._offer(pool, "bbbb0001")
        self.assertEqual(self.successResultOf(d), ("bbbb0001", conn))
        self.assertEqual(pool.errors, 0)

    def test_memory_is_bounded(self):
        pool, clock = self._pool()
        for i in range(GONE_MEMORY + 1):
            conn, lost = self._offer(pool, f"{i:08x}")
            self._peer_closes(conn, lost)
        self.assertEqual(len(pool._gone), GONE_MEMORY)
        oldest = pool.outgoing_get(f"{0:08x}", 1.0)  # forgotten: waits
        self.assertNoResult(oldest)
        self.failureResultOf(pool.outgoing_get(f"{GONE_MEMORY:08x}", 1.0), PoolConnectionGone)
        clock.advance(1.0)
        self.failureResultOf(oldest, PoolTimeout)

    def test_a_new_connection_under_a_gone_id_is_handed_out(self):
        pool, clock = self._pool()
        conn, lost = self._offer(pool, "cccc0001")
        self._peer_closes(conn, lost)
        again, _lost = self._offer(pool, "cccc0001")
        self.assertEqual(self.successResultOf(pool.outgoing_get("cccc0001", 1.0)), ("cccc0001", again))


class PoolSizingTests(unittest.TestCase):
    def test_rules(self):
        self.assertEqual(adjust_capacity(10, 9, 4, 20), 11)  # 90% recreated: grow
        self.assertEqual(adjust_capacity(10, 1, 4, 20), 9)  # 10%: shrink
        self.assertEqual(adjust_capacity(10, 5, 4, 20), 10)
        self.assertEqual(adjust_capacity(20, 20, 4, 20), 20)  # at MAX
        self.assertEqual(adjust_capacity(4, 0, 4, 20), 4)  # at min
        self.assertEqual(adjust_interval(0.5, 1, 10, 0.1, 1.0), 0.4)  # idle < 20%: faster
        self.assertEqual(adjust_interval(0.5, 9, 10, 0.1, 1.0), 0.6)  # idle > 80%: slower
        self.assertEqual(adjust_interval(1.0, 9, 10, 0.1, 1.0), 1.0)
        self.assertEqual(adjust_interval(0.1, 0, 10, 0.1, 1.0), 0.1)

    def _pool(self, clock, fail=lambda: False, min_size=4, max_size=8):
        dials = []

        def dial():
            dials.append(1)
            if fail():
                return defer.fail(ConnectionRefusedError("refused"))
            return defer.succeed(_Conn())

        pool = ClientPool(dial, min_size, max_size, clock, NodeLog("none"), min_interval=0.1, max_interval=1.0)
        return pool, dials

    def test_grows_under_use_and_shrinks_when_idle(self):
        clock = task.Clock()
        pool, dials = self._pool(clock)
        pool.start()
        clock.advance(0)
        self.assertEqual(pool.idle_count(), 4)
        self.assertEqual(pool.capacity, 5)  # 4 of 4 created in the first round
        # drain it every round: capacity climbs to MAX
        for _ in range(10):
            for _ in range(pool.capacity):
                pool.incoming_get(1)  # each use is refilled at once
            clock.advance(pool.interval)
        self.assertEqual(pool.capacity, 8)
        self.assertLessEqual(pool.idle_count(), 8)
        # left alone: nothing created per round, capacity back to min,
        # interval stretched to the maximum
        for _ in range(20):
            clock.advance(pool.interval)
        self.assertEqual(pool.capacity, 4)
        self.assertEqual(pool.interval, 1.0)
        pool.close()
        self.assertEqual(pool.idle_count(), 0)

    def test_refill_on_use_is_bounded(self):
        clock = task.Clock()
        pool, dials = self._pool(clock)
        pool.start()
        clock.advance(0)
        before = len(dials)
        for _ in range(3):
            pool.incoming_get(1)
        # Not on the launch's own turn: replaced together, right after.
        self.assertEqual(len(dials), before)
        clock.advance(REFILL_DELAY)
        self.assertEqual(len(dials), before + 3)  # one replacement per use
        self.assertEqual(pool.idle_count(), 4)  # never beyond capacity
        pool.close()

    def test_take_any_is_incoming_get_without_a_deferred(self):
        clock = task.Clock()
        pool, dials = self._pool(clock)
        pool.start()
        clock.advance(0)
        before = len(dials)
        got = pool.take_any()
        self.assertIsNotNone(got)
        pool_id, conn = got
        self.assertEqual(conn.pool_id, pool_id)
        self.assertEqual(pool.idle_count(), 3)
        clock.advance(REFILL_DELAY)
        self.assertEqual(len(dials), before + 1)  # replaced as any use is
        while pool.take_any() is not None:
            pass
        self.assertIsNone(pool.take_any())
        pool.close()

    def test_waiters_time_out_and_count_errors(self):
        clock = task.Clock()
        pool, _ = self._pool(clock, fail=lambda: True)
        pool.start()
        clock.advance(0)
        self.assertEqual(pool.idle_count(), 0)
        for _ in range(5):
            clock.advance(pool.interval)
        self.assertEqual(pool.interval, 0.1)  # empty pool: rounds as fast as allowed
        self.assertEqual(pool.capacity, 4)  # nothing created: never above min
        d1 = pool.outgoing_get("deadbeef", 2.0)
        d2 = pool.incoming_get(2.0)
        clock.advance(2.0)
        self.failureResultOf(d1)
        self.failureResultOf(d2)
        self.assertEqual(pool.errors, 1)  # outgoing misses are pool errors
        self.assertTrue(pool.needs_flush())
        pool.flush()
        self.assertEqual(pool.errors, 0)
        pool.close()
