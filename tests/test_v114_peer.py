"""Byte-level interoperability with Go NodePass **1.14** (SPEC-1.14 §3, §4.1-4.2, §7).

The 1.14 sibling of ``tests/test_interop.py``: each test plays a Go 1.14 peer
with raw sockets against our real server or client, in-process, on 127.0.0.1
with real TLS.  It writes the bytes a Go peer writes and checks the bytes we
answer.  Every expected byte is built here -- the Bearer token from the HMAC
definition spelled out with ``hashlib``, the JSON signals by hand, the line
codec with a separate XOR/base64 -- never with ``nodepass.wire``, so a codec
bug cannot hide itself.

* ``GoClientAgainstOurServer``: a fake Go client (raw sockets) against our
  ``server://`` (SPEC-1.14 §3.2-§3.5, §3.6's capture).
* ``OurClientAgainstGoServer`` / ``OurTLS2ClientAgainstGoServer``: our
  ``client://`` against a fake Go 1.14 server written here (a Twisted
  factory), including the tls=2 defect of §3.5 and the 1.12 fallback.
* ``MixedGenerations``: our own peers of both generations on one port.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import time
from typing import Optional

import attrs
from OpenSSL import crypto
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.trial import unittest
from zope.interface import implementer

from nodepass.net.tls import generate_self_signed
from tests.helpers import Client, close, connect, free_port, service_up, sleep, wait_for
from tests.test_tunnel import FAST, CAMixin, TunnelMixin, d, echo_roundtrip, make_leaf

KEY = "secret"
#: SPEC-1.14 §3.2.2's vector for the key ``secret`` (sent by the Go client).
SPEC_TOKEN = "f9e66e179b6747ae54108f82f8ade8b3c25d76fd30afde6c395822c530196169"
ZERO_ID = b"\x00\x00\x00\x00"
PING = b'{"action":"ping"}'
PONG = b'{"action":"pong"}'
#: SPEC-1.14 §3.4's captured lines for the key ``secret``.
PING_LINE = b"CEcCEREdHAtBSEcEGgsEUBg=\n"
PONG_LINE = b"CEcCEREdHAtBSEcEHAsEUBg=\n"
#: RFC 1123 in GMT, as Go's net/http writes ``Date``.
DATE = (rb"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), [0-9]{2} (?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) "
        rb"[0-9]{4} [0-9]{2}:[0-9]{2}:[0-9]{2} GMT")


# -- the bytes, built by hand --------------------------------------------


def hmac_token(key: str) -> str:
    """The Bearer token as SPEC-1.14 §3.2.2 spells HMAC-SHA256 out:
    ``SHA256((K' XOR 0x5c..) || SHA256(K' XOR 0x36..))`` of an empty message,
    K' the key zero-padded to 64 bytes (hashed first when longer)."""
    k = key.encode("utf-8")
    if len(k) > 64:
        k = hashlib.sha256(k).digest()
    k = k.ljust(64, b"\x00")
    inner = hashlib.sha256(bytes(b ^ 0x36 for b in k)).digest()
    return hashlib.sha256(bytes(b ^ 0x5C for b in k) + inner).hexdigest()


TOKEN = hmac_token(KEY)


def go_request(host: str = "none", token: str = TOKEN, method: str = "GET", target: str = "/",
               auth: str = "Bearer ", proto: str = "HTTP/1.1", with_host: bool = True) -> bytes:
    """The Go client's handshake request (SPEC-1.14 §3.2.2), or a variant."""
    head = f"{method} {target} {proto}\r\n"
    if with_host:
        head += f"Host: {host}\r\n"
    head += f"User-Agent: Go-http-client/1.1\r\nAuthorization: {auth}{token}\r\nAccept-Encoding: gzip\r\n\r\n"
    return head.encode("ascii")


def go_line(payload: bytes, key: str = KEY) -> bytes:
    """What Go's encode() writes: std base64 (padded) of payload XOR key, then LF."""
    k = key.encode()
    return base64.standard_b64encode(bytes(b ^ k[i % len(k)] for i, b in enumerate(payload))) + b"\n"


def go_decode(line: bytes, key: str = KEY) -> bytes:
    k = key.encode()
    raw = base64.standard_b64decode(line.removesuffix(b"\n"))
    return bytes(b ^ k[i % len(k)] for i, b in enumerate(raw))


def fp_text(der: bytes) -> str:
    """``sha256:AA:BB:...`` of a DER certificate."""
    digest = hashlib.sha256(der).hexdigest().upper()
    return "sha256:" + ":".join(digest[i : i + 2] for i in range(0, 64, 2))


def config_body(flow: str = "-", max_: int = 4, tls: str = "0", type_: str = "0") -> bytes:
    return b'{"flow":"%s","max":%d,"tls":"%s","type":"%s"}\n' % (flow.encode(), max_, tls.encode(), type_.encode())


def tcp_launch(remote: str, pool_id: str) -> bytes:
    return b'{"action":"tcp","remote":"%s","id":"%s"}' % (remote.encode(), pool_id.encode())


def verify_signal(pool_id: str, fp: Optional[str]) -> bytes:
    """Go's verify payload; ``fp=None`` is the tls=2 server's one without fp."""
    if fp is None:
        return b'{"action":"verify","id":"%s"}' % pool_id.encode()
    return b'{"action":"verify","id":"%s","fp":"%s"}' % (pool_id.encode(), fp.encode())


def ok_answer(body: bytes, date: str = "Mon, 30 Nov 2026 02:41:40 GMT") -> bytes:
    """The Go server's 200 answer (SPEC-1.14 §3.2.4)."""
    return (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Type: application/json\r\nDate: " + date.encode()
            + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


def ok_answer_re(body: bytes) -> re.Pattern:
    return re.compile(
        rb"HTTP/1\.1 200 OK\r\nConnection: close\r\nContent-Type: application/json\r\nDate: " + DATE
        + rb"\r\nContent-Length: " + str(len(body)).encode() + rb"\r\n\r\n" + re.escape(body) + rb"\Z"
    )


def handler_error_re(status: bytes, body: bytes, with_body: bool = True) -> re.Pattern:
    """An error answer of Go's handler (``http.Error``), SPEC-1.14 §3.2.3."""
    return re.compile(
        rb"HTTP/1\.1 " + re.escape(status) + rb"\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8\r\n"
        rb"X-Content-Type-Options: nosniff\r\nDate: " + DATE + rb"\r\nContent-Length: " + str(len(body)).encode()
        + rb"\r\n\r\n" + (re.escape(body) if with_body else b"") + rb"\Z"
    )


def library_error(reason: bytes) -> bytes:
    """One of the two 400s Go's HTTP library writes itself."""
    return (b"HTTP/1.1 400 " + reason + b"\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n"
            b"400 " + reason)


GO_401 = (b"HTTP/1.1 401 Unauthorized\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8\r\n"
          b"X-Content-Type-Options: nosniff\r\nDate: Mon, 30 Nov 2026 02:41:40 GMT\r\nContent-Length: 13\r\n\r\n"
          b"Unauthorized\n")
#: A 1.12 server's answer to an HTTP GET: its "what is my IP" probe.
PROBE_112 = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 10\r\n"
             b"Connection: close\r\n\r\n127.0.0.1\n")
WRONG_FP = "sha256:" + ":".join(["AB"] * 32)

#: The error answers of SPEC-1.14 §3.2.3.
R405_HEAD = handler_error_re(b"405 Method Not Allowed", b"Method Not Allowed\n", with_body=False)
R405 = handler_error_re(b"405 Method Not Allowed", b"Method Not Allowed\n")
R404 = handler_error_re(b"404 Not Found", b"Not Found\n")
R401 = handler_error_re(b"401 Unauthorized", b"Unauthorized\n")
R400_HOST = re.compile(re.escape(library_error(b"Bad Request: missing required Host header")) + rb"\Z")
R400 = re.compile(re.escape(library_error(b"Bad Request")) + rb"\Z")


@attrs.frozen
class Heard:
    """One control line: when it arrived, the line, its decoded payload."""

    at: float
    line: bytes
    payload: bytes

    @property
    def action(self) -> str:
        try:
            return json.loads(self.payload).get("action", "")
        except ValueError:
            return ""


def _tls_options(cert_pem: bytes, key_pem: bytes) -> tuple[CertificateOptions, str]:
    cert = crypto.load_certificate(crypto.FILETYPE_PEM, cert_pem)
    options = CertificateOptions(
        privateKey=crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem),
        certificate=cert,
        raiseMinimumTo=TLSVersion.TLSv1_3,
    )
    return options, fp_text(crypto.dump_certificate(crypto.FILETYPE_ASN1, cert))


# -- a Go 1.14 client, played with raw sockets -----------------------------


@implementer(IHandshakeListener)
class GoConn(Client):
    """One connection of the fake Go client.  Records what arrives; once its
    first 4 bytes are ``00000000`` it is the control connection: it decodes
    the lines that follow and, like Go, answers each ping with a pong."""

    def __init__(self) -> None:
        super().__init__()
        self.shaken: Deferred = Deferred()
        self.peer_der = b""
        self.tls_version = ""
        self.id_at: Optional[float] = None
        self.signals: list[Heard] = []
        self.auto_pong = True
        self._pos = 4

    @property
    def pool_id(self) -> str:
        data = self.data()
        return data[:4].hex() if len(data) >= 4 else ""

    def payloads(self) -> list[bytes]:
        return [h.payload for h in self.signals]

    def handshakeCompleted(self) -> None:
        cert = self.transport.getPeerCertificate()
        self.peer_der = crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)
        self.tls_version = self.transport.getHandle().get_protocol_version_name()
        self.shaken.callback(self)

    def dataReceived(self, data: bytes) -> None:
        # Record and decode first, then wake a ``wait_bytes`` waiter: its
        # coroutine resumes inside this call.
        self.chunks.append(data)
        self.received += len(data)
        buf = self.data()
        if self.id_at is None and len(buf) >= 4:
            self.id_at = time.monotonic()
        if buf[:4] == ZERO_ID:
            self._lines(buf)
        self._check()

    def _lines(self, buf: bytes) -> None:
        while True:
            nl = buf.find(b"\n", self._pos)
            if nl < 0:
                return
            line = buf[self._pos : nl + 1]
            self._pos = nl + 1
            payload = go_decode(line)
            self.signals.append(Heard(time.monotonic(), line, payload))
            if payload == PING and self.auto_pong:
                self.transport.write(PONG_LINE)


async def connect_tls(port: int, timeout: float = 5.0) -> GoConn:
    """Go's tls=1 pool dial: TLS 1.3 from the first byte, no verification,
    no SNI, no ALPN.  Fires once the TLS handshake completed."""
    done: Deferred = Deferred()

    class F(ClientFactory):
        noisy = False

        def buildProtocol(self, addr):
            p = GoConn()
            p.shaken.addCallback(lambda _: done.called or done.callback(p))
            p.lost.addCallback(lambda _: done.called or done.errback(AssertionError("closed before the TLS handshake")))
            return p

        def clientConnectionFailed(self, connector, reason):
            if not done.called:
                done.errback(reason)

    reactor.connectSSL("127.0.0.1", port, F(), CertificateOptions(verify=False, raiseMinimumTo=TLSVersion.TLSv1_3))
    done.addTimeout(timeout, reactor)
    return await done


async def connect_from(source: str, port: int) -> Client:
    """A plain connection to 127.0.0.1:port from another loopback address."""
    done: Deferred = Deferred()

    class F(ClientFactory):
        noisy = False

        def buildProtocol(self, addr):
            p = Client()
            made = p.connectionMade

            def connection_made():
                made()
                done.callback(p)

            p.connectionMade = connection_made
            return p

        def clientConnectionFailed(self, connector, reason):
            done.errback(reason)

    reactor.connectTCP("127.0.0.1", port, F(), bindAddress=(source, 0))
    return await done


async def _abort_all(conns: list) -> None:
    for c in conns:
        if not c.lost.called and c.transport is not None:
            c.transport.abortConnection()
    for c in conns:
        if not c.lost.called:
            await c.lost


class GoClientAgainstOurServer(TunnelMixin, unittest.TestCase):
    """A Go 1.14 client's bytes against our server (tunnel key ``secret``)."""

    def setUp(self):
        super().setUp()
        self.conns: list = []
        self.addCleanup(_abort_all, self.conns)  # runs after the services stopped

    async def _server(self, query: str = "", tunables=FAST, name: str = "server", log: str = "debug"):
        if log == "debug":
            svc = await self.start_server(f"127.0.0.1:{free_port()}", "&mode=1&max=4" + query, tunables=tunables,
                                          name=name, key=KEY)
        else:
            self.tunnel_port = free_port()
            svc = self._service(name, f"server://{KEY}@127.0.0.1:{self.tunnel_port}/127.0.0.1:{free_port()}"
                                      f"?log={log}&mode=1&max=4{query}", tunables)
            await service_up(svc, name)
        return svc, svc.runner.entry_port

    async def _go(self, tls: bool = False, port: int = 0) -> GoConn:
        port = port or self.tunnel_port
        c = await (connect_tls(port) if tls else connect(port, protocol_class=GoConn))
        self.conns.append(c)
        return c

    async def _ask(self, request: bytes, source: str = "") -> bytes:
        """One request on its own connection; the bytes until the server closed it."""
        c = await (connect_from(source, self.tunnel_port) if source else self._go())
        if source:
            self.conns.append(c)
        c.transport.write(request)
        await c.lost.addTimeout(5, reactor)
        return c.data()

    async def _handshake(self, body: bytes, request: bytes = go_request()) -> None:
        self.assertRegex(await self._ask(request), ok_answer_re(body))

    async def _control(self, tls: bool = False) -> GoConn:
        ctrl = await self._go(tls)
        await ctrl.wait_bytes(4)
        self.assertEqual(ctrl.data()[:4], ZERO_ID)
        return ctrl

    @d
    async def test_token_vector_and_exact_success_answer(self):
        """SPEC-1.14 §3.2.2/§3.2.4: the Go request (173 bytes, Host ``none``,
        the HMAC token of the SPEC vector) gets exactly the 200 answer with
        ``{"flow":"-","max":4,"tls":"0","type":"0"}``, and the server closes
        the connection and logs the two INFO lines in Go's order."""
        self.assertEqual(TOKEN, SPEC_TOKEN)
        self.assertEqual(TOKEN, hmac.new(KEY.encode(), b"", hashlib.sha256).hexdigest())
        self.assertEqual(hmac_token("e68be2b4"), "8940572756af096447802f92b4c843ac61de93b80af9d37a85ed994508656d7e")
        request = go_request()
        self.assertEqual(len(request), 173)  # as in the §3.6 capture
        await self._server()
        answer = await self._ask(request)  # returns once the server closed
        self.assertRegex(answer, ok_answer_re(b'{"flow":"-","max":4,"tls":"0","type":"0"}\n'))
        self.assertIn(b"Content-Length: 42\r\n", answer)
        lines = self.lines["server"]
        sending = [i for i, x in enumerate(lines) if x.endswith("Sending tunnel config: FLOW=-|MAX=4|TLS=0|TYPE=0")]
        getting = [i for i, x in enumerate(lines) if x.endswith("Getting tunnel pool ready...")]
        self.assertEqual(len(sending), 1, lines)
        self.assertEqual(len(getting), 1, lines)
        self.assertLess(sending[0], getting[0])

    @d
    async def test_control_00000000_ping_at_once_pong_launch_and_raw_relay(self):
        """SPEC-1.14 §3.3/§3.6: the first pool connection gets ``00000000`` and
        is the control channel; the server's first ping (the captured line)
        follows at once, not after a report interval (3 s here); a later pool
        connection gets a random ID; our ping is answered with the pong line;
        a user at the entry makes the server launch that pool connection with
        a compact JSON ``tcp`` signal, and bytes relay raw both ways."""
        self.assertEqual(go_line(PING), PING_LINE)
        self.assertEqual(go_line(PONG), PONG_LINE)
        slow = attrs.evolve(FAST, report_interval=3.0)
        svc, entry = await self._server(tunables=slow)
        await self._handshake(config_body())
        ctrl = await self._control()
        await wait_for(lambda: ctrl.signals, timeout=2.0, what="the server's first ping")
        first = ctrl.signals[0]
        self.assertEqual((first.line, first.payload), (PING_LINE, PING))
        self.assertEqual(ctrl.data()[: 4 + len(PING_LINE)], ZERO_ID + PING_LINE)
        self.assertLess(first.at - ctrl.id_at, 1.0)  # report interval: 3 s
        self.assertTrue(self.logged("server", "Marking tunnel handshake as complete in "))
        self.assertTrue(any(re.search(r"Marking tunnel handshake as complete in \d+ms$", x) for x in self.lines["server"]))

        pool = await self._go()
        raw_id = (await pool.wait_bytes(4))[:4]
        self.assertEqual(len(raw_id), 4)
        self.assertNotEqual(raw_id, ZERO_ID)

        # The Go client answers the ping (auto_pong did) and pings itself.
        ctrl.transport.write(PING_LINE)
        await wait_for(lambda: PONG in ctrl.payloads(), what="the server's pong")
        self.assertIn(PONG_LINE, ctrl.data())
        await wait_for(lambda: self.logged("server", "CHECK_POINT|MODE=1|PING="), what="our pong counted")

        user = await connect(entry)
        self.conns.append(user)
        launch = tcp_launch(f"127.0.0.1:{user.transport.getHost().port}", raw_id.hex())
        await wait_for(lambda: any(h.action == "tcp" for h in ctrl.signals), what="the launch signal")
        heard = next(h for h in ctrl.signals if h.action == "tcp")
        self.assertEqual(heard.payload, launch)
        self.assertEqual(heard.line, go_line(launch))
        remote = f"127.0.0.1:{user.transport.getHost().port}"
        self.assertEqual(json.loads(heard.payload), {"action": "tcp", "remote": remote, "id": raw_id.hex()})
        self.assertEqual(set(ctrl.payloads()), {PING, PONG, launch})
        user.transport.write(b"PING-DATA\n")
        self.assertEqual(await pool.wait_bytes(4 + 10), raw_id + b"PING-DATA\n")
        pool.transport.write(b"PONG-DATA\n")
        self.assertEqual(await user.wait_bytes(10), b"PONG-DATA\n")

    @d
    async def test_error_answers_byte_exact(self):
        """SPEC-1.14 §3.2.3 on a ``wire=1.14`` server (the Go 1.14 server's
        behaviour): each bad request on its own connection gets Go's exact
        error answer and is closed; the server keeps waiting, and a valid
        handshake afterwards still succeeds.  (``wire=auto`` serves a request
        without ``Bearer`` and a base64 line as 1.12 -- see the next test.)"""
        svc, _ = await self._server("&wire=1.14")
        cases = [
            ("HEAD", go_request(method="HEAD"), R405_HEAD),
            ("POST", go_request(method="POST"), R405),
            ("GET /x", go_request(target="/x"), R404),
            ("wrong token", go_request(token=hmac_token("other")), R401),
            ("uppercase hex", go_request(token=TOKEN.upper()), R401),
            ("bearer lowercase", go_request(auth="bearer "), R401),
            ("no Authorization", b"GET / HTTP/1.1\r\nHost: none\r\n\r\n", R401),
            ("no Host", go_request(with_host=False), R400_HOST),
            ("1.12 key line", go_line(KEY.encode()), R400),
        ]
        self.assertEqual(go_line(KEY.encode()), b"AAAAAAAA\n")
        for what, request, expected in cases:
            answer = await self._ask(request)
            self.assertRegex(answer, expected, what)
        # A query string is ignored: GET /?a=b passes, and it is the handshake.
        await self._handshake(config_body(), go_request(target="/?a=b"))
        ctrl = await self._control()
        await wait_for(lambda: PING in ctrl.payloads(), what="a ping on the control connection")
        self.assertFalse(self.logged("server", "Server error"))

    @d
    async def test_error_answers_for_go_clients_on_auto_wire(self):
        """The default ``wire=auto`` server tells the generations apart by
        ``Authorization: Bearer``: every request a (misconfigured) Go 1.14
        client can send -- wrong key, wrong path, no Host -- still gets Go's
        exact error answer, and the right one then gets the 200."""
        await self._server()
        cases = [
            ("wrong key", go_request(token=hmac_token("wrongkey")), R401),
            ("uppercase hex", go_request(token=TOKEN.upper()), R401),
            ("GET /x", go_request(target="/x"), R404),
            ("no Host", go_request(with_host=False), R400_HOST),
        ]
        for what, request, expected in cases:
            self.assertRegex(await self._ask(request), expected, what)
        await self._handshake(config_body())
        self.assertFalse(self.logged("server", "HTTP probe"))

    @d
    async def test_concurrent_handshakes_exactly_one_answered(self):
        """SPEC-1.14 §3.2.4 concurrency: two complete valid requests at the
        same moment get exactly one 200, the other connection is closed
        without a byte; valid requests after the answer (from the client's
        IP, where the pool listens, and from another IP) get no HTTP answer
        and are closed; the tunnel neither restarts nor logs an error."""
        svc, _ = await self._server()
        runner = svc.runner
        a, b = await self._go(), await self._go()
        await wait_for(lambda: len(runner.port_conns) >= 2, what="both connections accepted by the server")
        a.transport.write(go_request())
        b.transport.write(go_request())
        await a.lost.addTimeout(5, reactor)
        await b.lost.addTimeout(5, reactor)
        loser, winner = sorted((a.data(), b.data()), key=len)
        self.assertEqual(loser, b"")
        self.assertRegex(winner, ok_answer_re(config_body()))
        self.assertEqual(sum("Sending tunnel config" in x for x in self.lines["server"]), 1)

        ctrl = await self._control()
        pool = await self._go()
        self.assertNotEqual((await pool.wait_bytes(4))[:4], ZERO_ID)
        pings = len([p for p in ctrl.payloads() if p == PING])

        late = await self._ask(go_request())  # from the client's IP: taken for a pool connection
        self.assertNotIn(b"HTTP/", late)
        self.assertIn(len(late), (0, 4), late)  # at most the pool ID a Go server writes too
        stranger = await self._ask(go_request(), source="127.0.0.2")
        self.assertEqual(stranger, b"")

        # The tunnel is untouched: the server keeps pinging the same control.
        await wait_for(lambda: ctrl.payloads().count(PING) >= pings + 2, timeout=3, what="more pings")
        self.assertFalse(ctrl.lost.called)
        self.assertIs(svc.runner, runner)
        self.assertFalse(self.logged("server", "Server error"))
        self.assertFalse(self.logged("server", "Server restart"))

    async def _tls_tunnel(self, log: str = "debug"):
        """Server with tls=1, flow "-": the handshake, a TLS control
        connection and three TLS pool connections.  Returns (svc, entry,
        control, pools, the server's fingerprint as presented)."""
        svc, entry = await self._server("&tls=1", log=log)
        await self._handshake(config_body(tls="1"))
        ctrl = await self._control(tls=True)
        self.assertEqual(ctrl.tls_version, "TLSv1.3")
        pools = [await self._go(tls=True) for _ in range(3)]
        for p in pools:
            self.assertEqual(p.tls_version, "TLSv1.3")
            await p.wait_bytes(4)
            self.assertNotEqual(p.data()[:4], ZERO_ID)
        fps = {fp_text(c.peer_der) for c in [ctrl] + pools}
        self.assertEqual(len(fps), 1)
        return svc, entry, ctrl, pools, fps.pop()

    def _their_verify(self, ctrl: GoConn) -> Optional[Heard]:
        return next((h for h in ctrl.signals if h.action == "verify"), None)

    @d
    async def test_tls1_verify_sent_promptly_and_entry_gated_until_ours(self):
        """SPEC-1.14 §3.3/§3.5, tls=1, our server is the entry: pool
        connections are TLS 1.3 from the first byte (``00000000`` inside
        TLS); the server sends its ``verify`` within one report interval of
        the first pool connection, with its certificate's fingerprint and the
        ID of one of our idle pool connections, which it then closes.  A user
        who arrives before our own ``verify`` gets no launch; once we send a
        correct one, the launch comes and bytes flow."""
        svc, entry, ctrl, pools, server_fp = await self._tls_tunnel()
        first_pool = min(p.id_at for p in pools)
        await wait_for(lambda: self._their_verify(ctrl), timeout=2, what="the server's verify")
        theirs = self._their_verify(ctrl)
        self.assertLess(theirs.at - first_pool, FAST.report_interval)
        sig = json.loads(theirs.payload)
        self.assertEqual(theirs.payload, verify_signal(sig["id"], server_fp))
        named = next((p for p in pools if p.pool_id == sig["id"]), None)
        self.assertIsNotNone(named, f"verify names {sig['id']}, not one of {[p.pool_id for p in pools]}")
        self.assertEqual(sig["fp"], fp_text(named.peer_der))
        await named.lost.addTimeout(3, reactor)  # the server closes the connection it named
        self.assertEqual(named.data(), bytes.fromhex(sig["id"]))

        user = await connect(entry)
        self.conns.append(user)
        user.transport.write(b"early")
        await sleep(0.3)
        self.assertNotIn("tcp", [h.action for h in ctrl.signals])
        idle = [p for p in pools if p is not named]
        self.assertEqual([p.data() for p in idle], [bytes.fromhex(p.pool_id) for p in idle])

        ours = idle[0]
        ctrl.transport.write(go_line(verify_signal(ours.pool_id, server_fp)))
        await wait_for(lambda: "tcp" in [h.action for h in ctrl.signals], what="the launch after our verify")
        launch = next(h for h in ctrl.signals if h.action == "tcp")
        self.assertEqual(launch.payload, tcp_launch(f"127.0.0.1:{user.transport.getHost().port}", idle[1].pool_id))
        await ours.lost.addTimeout(3, reactor)  # the server took the named connection and closed it
        self.assertEqual(await idle[1].wait_bytes(4 + 5), bytes.fromhex(idle[1].pool_id) + b"early")
        idle[1].transport.write(b"reply")
        self.assertEqual(await user.wait_bytes(5), b"reply")
        self.assertTrue(self.logged("server", "TLS certificate fingerprint verified: " + server_fp))
        self.assertFalse(self.logged("server", "Server error"))

    @d
    async def test_tls1_wrong_fingerprint_from_client_tears_down(self):
        """SPEC-1.14 §3.5: a ``verify`` whose fp is not the server's
        certificate gives Go's mismatch line (server's fp, then ours) and a
        restart."""
        svc, entry, ctrl, pools, server_fp = await self._tls_tunnel()
        await wait_for(lambda: self._their_verify(ctrl), timeout=2, what="the server's verify")
        named = json.loads(self._their_verify(ctrl).payload)["id"]
        ours = next(p for p in pools if p.pool_id != named)
        ctrl.transport.write(go_line(verify_signal(ours.pool_id, WRONG_FP)))
        line = f"outgoingVerify: certificate fingerprint mismatch: server: {server_fp} - client: {WRONG_FP}"
        await wait_for(lambda: self.logged("server", line), what="the mismatch line")
        await wait_for(lambda: self.logged("server", "Server error: " + line), what="the server error")
        await wait_for(lambda: self.logged("server", "Server restart"), what="the restart")
        self.assertFalse(self.logged("server", "TLS certificate fingerprint verified"))


    async def _verify_without_fp(self, log: str) -> None:
        svc, entry, ctrl, pools, server_fp = await self._tls_tunnel(log)
        await wait_for(lambda: self._their_verify(ctrl), timeout=2, what="the server's verify")
        named = json.loads(self._their_verify(ctrl).payload)["id"]
        ours = next(p for p in pools if p.pool_id != named)
        ctrl.transport.write(go_line(verify_signal(ours.pool_id, None)))
        await wait_for(lambda: self.logged("server", "Server error: "), what="the error line")
        errors = [x for x in self.lines["server"] if "Server error: " in x]
        self.assertTrue(errors[0].endswith("Server error: outgoingVerify: no fingerprint in signal"), errors)
        self.assertFalse(self.logged("server", "TLS certificate fingerprint verified"))

    @d
    async def test_tls1_verify_without_fp_from_client_tears_down(self):
        """SPEC-1.14 §3.5: a ``verify`` without ``fp`` received by the server
        (``log=debug``) is ``outgoingVerify: no fingerprint in signal`` and a
        restart (a server has no peer certificate to fall back on)."""
        await self._verify_without_fp("debug")

    @d
    async def test_tls1_verify_without_fp_from_client_at_info_level(self):
        """The same at ``log=info``, where the debug line of each received
        signal is not written (it tells the previous test's failure apart)."""
        await self._verify_without_fp("info")


# -- a Go 1.14 server, played by the test ----------------------------------


class _FakeHandshake(Protocol):
    """Phase A of the fake Go server: record the request and answer it."""

    def __init__(self, fake: "FakeGoServer"):
        self.fake = fake
        self.buf = b""

    def connectionMade(self) -> None:
        self.fake.protos.add(self)
        self.index = len(self.fake.requests)
        self.fake.requests.append(b"")

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        self.fake.requests[self.index] = self.buf
        if b"\r\n\r\n" in self.buf:
            if self.fake.hold:
                self.fake.held.append(self)
            else:
                self.answer()
        elif b"\n" in self.buf and not self.buf.startswith(b"GET "):
            self.transport.loseConnection()  # a 1.12 key line: this is no 1.12 server

    def answer(self) -> None:
        self.transport.write(self.fake.answer)
        if self.fake.answer.startswith(b"HTTP/1.1 200 OK\r\n") and b"application/json" in self.fake.answer:
            self.fake.phase_b = True
        self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        self.fake.protos.discard(self)


@implementer(IHandshakeListener)
class _FakePoolConn(Protocol):
    """Phase B: a pool connection (TLS first when the fake has a cert); the
    first one gets ``00000000`` and carries the control channel."""

    def __init__(self, fake: "FakeGoServer"):
        self.fake = fake
        self.pool_id = ""
        self.received = b""
        self.lost = False
        self.launched = False
        self._buf = b""

    def connectionMade(self) -> None:
        self.fake.protos.add(self)
        if self.fake.tls is None:
            self.handshakeCompleted()
        else:
            self.transport.startTLS(self.fake.tls)

    def handshakeCompleted(self) -> None:
        fake = self.fake
        if not fake.phase_b:
            self.transport.abortConnection()
            return
        if fake.control is None:
            fake.control = self
            self.pool_id = ZERO_ID.hex()
            self.transport.write(ZERO_ID)
            self.transport.write(PING_LINE)  # Go pings as soon as the control exists
            fake.sent.append(Heard(time.monotonic(), PING_LINE, PING))
            fake.control_up()
            return
        raw = os.urandom(4)
        while raw == ZERO_ID or raw.hex() in fake.handed:
            raw = os.urandom(4)
        self.pool_id = raw.hex()
        fake.handed.append(self.pool_id)
        fake.pool.append(self)
        self.transport.write(raw)

    def dataReceived(self, data: bytes) -> None:
        fake = self.fake
        if self is not fake.control:
            self.received += data
            if fake.echo:
                self.transport.write(data)
            return
        self._buf += data
        while b"\n" in self._buf:
            line, self._buf = self._buf.split(b"\n", 1)
            payload = go_decode(line + b"\n")
            heard = Heard(time.monotonic(), line + b"\n", payload)
            fake.signals.append(heard)
            if payload == PING:
                self.transport.write(PONG_LINE)
            elif heard.action == "verify" and fake.refuse_verify:
                # A Go tls=2 server: "outgoingVerify: no local certificate", restart.
                self.transport.abortConnection()
                return

    def connectionLost(self, reason=None) -> None:
        self.lost = True
        fake = self.fake
        fake.protos.discard(self)
        if self is fake.control:
            fake.control_lost()


class FakeGoServer(Factory):
    """A Go 1.14 server on one listener: phase A answers HTTP with
    ``answer`` (a 200 JSON answer switches to phase B); phase B gives
    ``00000000`` to the first pool connection (the control channel) and
    random IDs after.  On the control it pings at once, answers pings, and
    -- with ``verify_delay`` -- sends its ``verify`` that long after the
    control is up (Go: at a report-interval tick), naming an idle pool
    connection and closing it, with ``verify_fp`` (None: no fp, the tls=2
    defect).  Losing the control sends it back to phase A, as Go restarts."""

    noisy = False

    def __init__(self, answer: bytes, tls: Optional[CertificateOptions] = None, fp: str = "",
                 verify_delay: Optional[float] = None, verify_fp: Optional[str] = "", echo: bool = False,
                 hold: bool = False, refuse_verify: bool = False):
        self.answer = answer
        self.refuse_verify = refuse_verify
        self.hold = hold  # keep requests unanswered until release()
        self.held: list[_FakeHandshake] = []
        self.tls = tls
        self.fp = fp
        self.verify_delay = verify_delay
        self.verify_fp = fp if verify_fp == "" else verify_fp
        self.echo = echo
        self.phase_b = False
        self.requests: list[bytes] = []
        self.protos: set = set()
        self.control: Optional[_FakePoolConn] = None
        self.pool: list[_FakePoolConn] = []
        self.handed: list[str] = []
        self.signals: list[Heard] = []  # lines from the client on the control
        self.sent: list[Heard] = []  # lines the fake sent on the control
        self.verify_sent_at: Optional[float] = None
        self.client_verified_first: Optional[bool] = None
        self.listener = None
        self._timer = None

    def buildProtocol(self, addr):
        return _FakePoolConn(self) if self.phase_b else _FakeHandshake(self)

    def listen(self) -> int:
        self.listener = reactor.listenTCP(0, self, interface="127.0.0.1")
        return self.listener.getHost().port

    def release(self) -> None:
        """Answer the requests held so far."""
        self.hold = False
        held, self.held = self.held, []
        for h in held:
            h.answer()

    # -- control --------------------------------------------------------
    def client_signals(self, action: str) -> list[Heard]:
        return [h for h in self.signals if h.action == action]

    def send(self, payload: bytes) -> None:
        assert self.control is not None
        line = go_line(payload)
        self.control.transport.write(line)
        self.sent.append(Heard(time.monotonic(), line, payload))

    def idle(self) -> list[_FakePoolConn]:
        """Pool connections neither lost, launched nor named in a verify."""
        named = {json.loads(h.payload).get("id") for h in self.client_signals("verify")}
        return [c for c in self.pool if not c.lost and not c.launched and c.pool_id not in named]

    def control_up(self) -> None:
        if self.verify_delay is not None:
            self._timer = reactor.callLater(self.verify_delay, self.send_verify)

    def send_verify(self, fp: Optional[str] = "") -> str:
        """Go's verify task: name the first idle pool connection, then close it."""
        self._timer = None
        fp = self.verify_fp if fp == "" else fp
        conn = self.idle()[0]
        conn.launched = True
        self.client_verified_first = bool(self.client_signals("verify"))
        self.send(verify_signal(conn.pool_id, fp))
        self.verify_sent_at = time.monotonic()
        conn.transport.loseConnection()
        return conn.pool_id

    def launch(self, remote: str) -> _FakePoolConn:
        conn = self.idle()[0]
        conn.launched = True
        self.send(tcp_launch(remote, conn.pool_id))
        return conn

    def control_lost(self) -> None:
        self.control = None
        self.phase_b = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        for c in self.pool:
            if not c.lost:
                c.transport.abortConnection()

    async def shutdown(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self.listener is not None:
            await self.listener.stopListening()
        for p in list(self.protos):
            p.transport.abortConnection()
        await wait_for(lambda: not self.protos, what="the fake server's connections closed")


class _FakeServerMixin(TunnelMixin):
    def fake(self, answer: bytes, **kw) -> FakeGoServer:
        fake = FakeGoServer(answer, **kw)
        self.tunnel_port = fake.listen()
        self.addCleanup(fake.shutdown)  # after the client's own cleanup (LIFO)
        return fake

    async def client(self, target: str, query: str = "", wait: bool = True, name: str = "client", log: str = "debug"):
        svc = self._service(
            name, f"client://{KEY}@127.0.0.1:{self.tunnel_port}/{target}?mode=2&min=2&log={log}{query}", FAST
        )
        if wait:
            await service_up(svc, name)
        return svc

    def self_signed(self) -> tuple[CertificateOptions, str]:
        return _tls_options(*generate_self_signed("go-server"))


class OurClientAgainstGoServer(_FakeServerMixin, unittest.TestCase):
    """Our client against the bytes of a Go 1.14 server."""

    @d
    async def test_request_bytes_and_host_from_sni(self):
        """SPEC-1.14 §3.2.2/§4.6: with ``sni=tunnel.example`` the request is
        the Go request byte for byte with ``Host: tunnel.example``."""
        fake = self.fake(ok_answer(config_body()))
        await self.client(f"127.0.0.1:{free_port()}", "&sni=tunnel.example")
        self.assertEqual(fake.requests, [go_request("tunnel.example")])

    @d
    async def test_exit_for_go_server_control_00000000_and_launch(self):
        """SPEC-1.14 §3.2-§3.4, §3.6, tls=0, flow "-": the request is exactly
        Go's (Host ``none``); our client logs the loaded config, takes the
        ``00000000`` connection as control (its ping and its pong to our ping
        arrive there; the other pool connections stay silent), and a ``tcp``
        launch from the Go server makes it dial its target and relay."""
        tport, _ = self.echo_targets()
        fake = self.fake(ok_answer(config_body()))
        await self.client(f"127.0.0.1:{tport}")
        self.assertEqual(fake.requests, [go_request()])
        self.assertTrue(self.logged("client", "Loading tunnel config: FLOW=-|MAX=4|TLS=0|TYPE=0"))
        self.assertTrue(any(re.search(r"Marking tunnel handshake as complete in \d+ms$", x) for x in self.lines["client"]))
        await wait_for(lambda: fake.client_signals("pong") and fake.client_signals("ping"), what="pong and ping")
        self.assertEqual(fake.client_signals("pong")[0].line, PONG_LINE)
        self.assertEqual(fake.client_signals("ping")[0].line, PING_LINE)
        self.assertEqual(fake.control.pool_id, "00000000")
        await wait_for(lambda: len(fake.idle()) >= 1, what="a pool connection")
        self.assertTrue(all(c.pool_id != "00000000" and c.received == b"" for c in fake.pool))
        conn = fake.launch("127.0.0.1:57426")
        conn.transport.write(b"PING-DATA\n")
        await wait_for(lambda: conn.received == b"PING-DATA\n", what="the echo through our exit")
        self.assertTrue(self.logged("client", "Starting exchange:"))

    @d
    async def test_tls1_our_verify_comes_first(self):
        """SPEC-1.14 §3.5, tls=1: our client sends its ``verify`` on the
        control connection before the Go server's task (a report interval
        later) sends its own -- so the two never name the same connection --
        with the fingerprint of the Go server's certificate and one of the
        IDs the server handed out; the server's then checks out."""
        tls, fp = self.self_signed()
        tport, _ = self.echo_targets()
        fake = self.fake(ok_answer(config_body(tls="1")), tls=tls, fp=fp, verify_delay=FAST.report_interval)
        await self.client(f"127.0.0.1:{tport}")
        await wait_for(lambda: fake.verify_sent_at is not None, timeout=3, what="the Go server's verify")
        ours = fake.client_signals("verify")
        self.assertEqual(len(ours), 1, fake.signals)
        self.assertTrue(fake.client_verified_first)
        self.assertLess(ours[0].at, fake.verify_sent_at)
        sig = json.loads(ours[0].payload)
        self.assertEqual(ours[0].payload, verify_signal(sig["id"], fp))
        self.assertIn(sig["id"], fake.handed)
        await wait_for(lambda: self.logged("client", "TLS certificate fingerprint verified: " + fp), what="verified")
        self.assertFalse(self.logged("client", "Client error"))

    @d
    async def test_tls1_forward_entry_gated_until_go_verify(self):
        """SPEC-1.14 §2/§3.5, tls=1, flow "+": our client is the entry; a user
        who connects before the Go server's ``verify`` gets nothing launched
        (no ``tcp`` signal, no byte on a pool connection); after a correct
        ``verify`` the launch comes and traffic flows."""
        tls, fp = self.self_signed()
        fake = self.fake(ok_answer(config_body(flow="+", tls="1")), tls=tls, fp=fp, echo=True)
        client = await self.client(f"127.0.0.1:{free_port()}")
        entry = client.runner.entry_port
        await wait_for(lambda: fake.client_signals("verify"), what="our client's verify")
        await wait_for(lambda: len(fake.idle()) >= 2, what="idle pool connections")
        user = await connect(entry)
        self.addCleanup(close, user)
        user.transport.write(b"early bytes")
        await sleep(0.4)
        self.assertEqual(fake.client_signals("tcp"), [])
        self.assertTrue(all(c.received == b"" for c in fake.pool))
        fake.send_verify(fp)
        await wait_for(lambda: fake.client_signals("tcp"), what="the launch after the Go verify")
        launch = json.loads(fake.client_signals("tcp")[0].payload)
        self.assertEqual(fake.client_signals("tcp")[0].payload,
                         tcp_launch(f"127.0.0.1:{user.transport.getHost().port}", launch["id"]))
        self.assertIn(launch["id"], fake.handed)
        self.assertEqual(await user.wait_bytes(11), b"early bytes")
        self.assertTrue(self.logged("client", "TLS certificate fingerprint verified: " + fp))

    @d
    async def test_tls1_wrong_fingerprint_from_go_server_tears_down(self):
        """SPEC-1.14 §3.5: a Go ``verify`` with another fingerprint than the
        certificate our client saw gives the mismatch line (their fp as the
        server's, ours as the client's) and a restart."""
        tls, fp = self.self_signed()
        tport, _ = self.echo_targets()
        fake = self.fake(ok_answer(config_body(tls="1")), tls=tls, fp=fp)
        await self.client(f"127.0.0.1:{tport}")
        await wait_for(lambda: fake.client_signals("verify"), what="our client's verify")
        await wait_for(lambda: fake.idle(), what="an idle pool connection")
        fake.send_verify(WRONG_FP)
        line = f"outgoingVerify: certificate fingerprint mismatch: server: {WRONG_FP} - client: {fp}"
        await wait_for(lambda: self.logged("client", "Client error: " + line), what="the mismatch")
        await wait_for(lambda: self.logged("client", "Client restart"), what="the restart")
        # and the tunnel is back (the fake sends no verify this time)
        await wait_for(lambda: sum("Marking tunnel handshake as complete" in x for x in self.lines["client"]) == 2,
                       what="the tunnel up again")

    @d
    async def test_stop_during_handshake_leaves_nothing_running(self):
        """A client stopped while its 1.14 request is in flight (the answer
        comes after the stop) builds no pool: the stop leaves no pool timer
        in the reactor and does not wait for the control-connection
        timeout (handshake + pool-get timeouts, 3 s here)."""
        fake = self.fake(ok_answer(config_body()), hold=True)
        client = await self.client(f"127.0.0.1:{free_port()}", wait=False)
        await wait_for(lambda: fake.held, what="the request in flight")
        started = time.monotonic()
        stopping = client.stopService()
        fake.release()
        await stopping
        took = time.monotonic() - started
        leaked = [call for call in reactor.getDelayedCalls() if "ClientPool" in repr(call)]
        what = [repr(call) for call in leaked]
        for call in leaked:
            call.cancel()  # leave a clean reactor to the next test
        self.assertEqual(what, [], f"a client stopped in {took:.2f}s keeps its pool running")
        self.assertLess(took, 1.0)

    @d
    async def test_status_401_explained_and_retried(self):
        """SPEC-1.14 §3.2.5: a 401 (wrong key) is ``Client error:
        tunnelHandshake: status 401`` with the reason in words, then a
        restart that asks again with the same 1.14 request."""
        fake = self.fake(GO_401)
        await self.client(f"127.0.0.1:{free_port()}", wait=False)
        await wait_for(lambda: self.logged("client", "Client error: tunnelHandshake: status 401 ("), what="the error")
        self.assertTrue(self.logged("client", "tunnel key"))
        await wait_for(lambda: self.logged("client", "Client restart"), what="the restart")
        # (A connection is listed as it is accepted, its bytes when they come.)
        await wait_for(lambda: len(fake.requests) >= 2 and all(fake.requests), what="a second attempt, read")
        self.assertEqual(set(fake.requests), {go_request()})

    @d
    async def test_probe_answer_falls_back_to_112_on_auto(self):
        """SPEC-1.14 §3.2.5: a 1.12 server answers our GET with its IP probe;
        ``wire=auto`` says so, falls back, and the next connection carries
        a 1.12 key line -- and keeps doing so across restarts."""
        fake = self.fake(PROBE_112)
        await self.client(f"127.0.0.1:{free_port()}", wait=False)
        await wait_for(lambda: len(fake.requests) >= 3 and all(fake.requests[:3]),
                       what="three connections, each with its first bytes")
        self.assertEqual(fake.requests[0], go_request())
        self.assertEqual(fake.requests[1:3], [b"AAAAAAAA\n", b"AAAAAAAA\n"])
        self.assertEqual(go_line(KEY.encode()), b"AAAAAAAA\n")
        self.assertTrue(self.logged(
            "client", f"Server at 127.0.0.1:{self.tunnel_port} speaks the 1.12 generation: falling back to 1.12"))

    @d
    async def test_probe_answer_is_an_error_on_wire_114(self):
        """With ``wire=1.14`` the same answer is an error that names the
        generation; no key line is ever sent."""
        fake = self.fake(PROBE_112)
        await self.client(f"127.0.0.1:{free_port()}", "&wire=1.14", wait=False)
        await wait_for(lambda: len(fake.requests) >= 2 and all(fake.requests[:2]), what="a second attempt, read")
        self.assertTrue(self.logged("client", "Client error: "))
        self.assertTrue(self.logged("client", "speaks the 1.12 generation, but this client has wire=1.14"))
        self.assertEqual(set(fake.requests[:2]), {go_request()})
        self.assertFalse(self.logged("client", "falling back"))


class OurTLS2ClientAgainstGoServer(_FakeServerMixin, CAMixin, unittest.TestCase):
    """The Go v1.14.0 tls=2 defect (SPEC-1.14 §3.5), certificates from a CA
    the client trusts through SSL_CERT_FILE (as in ``TLSVerifyTests``)."""

    async def _verify_without_fp(self, log: str) -> None:
        crt, key = make_leaf(self.dir, self.ca, self.ca_key, "localhost")
        with open(crt, "rb") as f1, open(key, "rb") as f2:
            tls, fp = _tls_options(f1.read(), f2.read())
        fake = self.fake(ok_answer(config_body(flow="+", tls="2")), tls=tls, fp=fp,
                         verify_delay=FAST.report_interval, verify_fp=None, echo=True, refuse_verify=True)
        client = await self.client(f"127.0.0.1:{free_port()}", "&sni=localhost", log=log)
        self.assertEqual(fake.requests, [go_request("localhost")])
        await wait_for(lambda: fake.verify_sent_at is not None, timeout=3, what="the fp-less verify")
        self.assertFalse(fake.client_verified_first)  # tls=2: the client answers the server's
        self.assertRegex(fake.sent[-1].payload, rb'\A\{"action":"verify","id":"[0-9a-f]{8}"\}\Z')
        await wait_for(lambda: self.logged("client", "TLS verify signal without a fingerprint"), timeout=3,
                       what="the warning")
        self.assertEqual(await echo_roundtrip(client.runner.entry_port, b"through tls=2"), b"through tls=2")
        await sleep(2 * FAST.report_interval)
        self.assertEqual(fake.client_signals("verify"), [])  # a Go tls=2 server would tear down on one
        self.assertIsNotNone(fake.control)
        self.assertEqual(await echo_roundtrip(client.runner.entry_port, b"still"), b"still")
        self.assertFalse(self.logged("client", "Client error"))
        self.assertFalse(self.logged("client", "outgoingVerify"))

    @d
    async def test_verify_without_fp_tolerated_and_traffic_flows(self):
        """SPEC-1.14 §3.5: a Go tls=2 server sends ``{"action":"verify","id":ID}``
        without fp, and tears its tunnel down on any ``verify`` it receives
        (the fake does too).  Our tls=2 client (``sni=localhost``: the Host
        and the verified name; ``log=debug`` as everywhere here) waits for
        it, logs a warning instead of tearing down, sends no ``verify`` of
        its own, and with flow "+" carries traffic."""
        await self._verify_without_fp("debug")

    @d
    async def test_verify_without_fp_tolerated_at_info_level(self):
        """The same at ``log=info``: the debug line of each received signal
        is not written (it tells the previous test's failure apart)."""
        await self._verify_without_fp("info")


class MixedGenerations(TunnelMixin, unittest.TestCase):
    """Our own peers of both generations on one tunnel port."""

    @d
    async def test_auto_server_serves_112_then_114_client(self):
        """A ``wire=auto`` server carries a client pinned to 1.12 without a
        single 1.14 handshake line; when that client leaves, the server
        restarts, and a default (1.14) client on the same port carries
        traffic."""
        tport, _ = self.echo_targets()
        entry = free_port()
        server = await self.start_server(f"127.0.0.1:{entry}", "&mode=1", key=KEY)
        old = await self.start_client(f"127.0.0.1:{tport}", "&wire=1.12", name="old", key=KEY)
        self.assertEqual(await echo_roundtrip(entry, b"via 1.12"), b"via 1.12")
        self.assertEqual(server.runner.generation, "1.12")
        for text in ("Sending tunnel config", "Getting tunnel pool ready", "Marking tunnel handshake",
                     "TLS certificate fingerprint", "Tunnel access denied"):
            self.assertFalse(self.logged("server", text), text)
        self.assertTrue(self.logged("server", "Tunnel handshaked: "))
        await old.stopService()
        await wait_for(lambda: self.logged("server", "Server restart"), what="the server restart")
        new = await self.start_client(f"127.0.0.1:{tport}", name="new", key=KEY)
        self.assertEqual(await echo_roundtrip(entry, b"via 1.14"), b"via 1.14")
        self.assertEqual(server.runner.generation, "1.14")
        self.assertTrue(self.logged("server", "Sending tunnel config: FLOW=-|MAX=1024|TLS=0|TYPE=0"))
        self.assertTrue(self.logged("new", "Tunnel generation: 1.14"))
        self.assertIs(new.runner.generation, server.runner.generation)

    @d
    async def test_auto_client_falls_back_and_remembers_112(self):
        """A ``wire=auto`` client against a server pinned to 1.12 falls back
        after one probe answer, carries traffic and says ``Tunnel generation:
        1.12``; after the server restarts it reconnects with 1.12 at once:
        both servers together answered exactly one HTTP probe."""
        tport, _ = self.echo_targets()
        entry = free_port()
        server = await self.start_server(f"127.0.0.1:{entry}", "&mode=1&wire=1.12", key=KEY)
        port = self.tunnel_port
        client = await self.start_client(f"127.0.0.1:{tport}", key=KEY)
        self.assertEqual(await echo_roundtrip(entry, b"first"), b"first")
        self.assertTrue(self.logged("client", "falling back to 1.12"))
        self.assertTrue(self.logged("client", "Tunnel generation: 1.12"))
        await server.stopService()
        await wait_for(lambda: self.logged("client", "Client restart"), what="the client noticed")
        server2 = await self.start_server(f"127.0.0.1:{entry}", "&mode=1&wire=1.12", port=port, name="server2", key=KEY)
        await wait_for(lambda: self.logged("server2", "Tunnel handshaked: "), what="the client back")
        self.assertEqual(await echo_roundtrip(entry, b"second"), b"second")
        probes = [x for name in ("server", "server2") for x in self.lines.get(name, []) if "HTTP probe" in x]
        self.assertEqual(len(probes), 1, probes)
        self.assertEqual(sum("falling back" in x for x in self.lines["client"]), 1)
        self.assertEqual(sum("Tunnel generation:" in x for x in self.lines["client"]), 1)
        self.assertEqual(client.runner.generation, "1.12")
        self.assertIsNotNone(server2.runner)
