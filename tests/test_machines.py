"""The connection state machines without sockets (SPEC §3.2, §4).

:mod:`nodepass.modes.tunnel_port` (a connection on the server's tunnel
port) and :mod:`nodepass.modes.control_client` (the client's control
connection) driven through their thin protocols over
``StringTransport``, with ``task.Clock`` for every timer and fake owners
in place of the runners: every state and every input, the hostile cases
included.  The same paths over real sockets are the integration tests of
test_tunnel, test_hostile_tunnel and test_interop."""

from __future__ import annotations

import attrs

from typing import Any, Optional

from twisted.internet import error
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from nodepass.base.kinds import Flow, ServerMode, TLSCode, Wire
from nodepass.base.logs import NodeLog
from nodepass.base.stats import InstanceStats
from nodepass.config.urls import Tunables, parse_url
from nodepass.modes.base import InstanceContext, TunnelError
from nodepass.modes.control_client import (
    REFUSED,
    ClientControlProtocol,
    ClientInput,
    ClientState,
    HandshakeRefused,
    HandshakeSettings,
    KeyMismatch,
)
from nodepass.modes.machine import TableMachine
from nodepass.modes.server import QuicPoolStream, ServerRunner
from nodepass.modes.tunnel_port import (
    MAX_PROBE,
    Admission,
    Adopted,
    PortInput,
    PortSettings,
    PortState,
    TunnelPortMachine,
    TunnelPortProtocol,
)
from nodepass.net.tls import ServerCredentials
from nodepass.pools.tcp import ServerPool
from nodepass.wire import codec, v114
from nodepass.wire.codec import Codec

KEY = "tunnelkey1"
WRONG = "wrongkey12"  # same length as KEY: its key line decodes to KEY
HANDSHAKE = 5.0
POOL_GET = 2.0
PEER = "192.0.2.7"


class Transport(StringTransport):
    """A StringTransport that also takes ``startTLS`` (the server starts
    TLS on a pool connection) and says how it was closed."""

    tls: Any = None

    def startTLS(self, context: Any) -> None:
        self.tls = context

    @property
    def how_closed(self) -> Optional[str]:
        if self.disconnected:
            return "abort"
        return "close" if self.disconnecting else None


class Lines:
    """Log lines of a NodeLog at debug level, as ``(LEVEL, text)``."""

    def __init__(self) -> None:
        self.log = NodeLog("debug")
        self.seen: list[tuple[str, str]] = []
        self.log.listeners.append(lambda level, line: self.seen.append((level, line)))

    def has(self, level: str, text: str) -> bool:
        return any(lv == level and text in line for lv, line in self.seen)

    def text(self) -> str:
        return "\n".join(line for _lv, line in self.seen)


class FakeChannel:
    """Records what a control channel is fed."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.lost: list[str] = []

    def data_received(self, data: bytes) -> None:
        self.data.append(data)

    def connection_lost(self, why: str) -> None:
        self.lost.append(why)


class FakePortOwner:
    """A :class:`~nodepass.modes.tunnel_port.PortOwner` that records."""

    def __init__(self, admission: Admission = Admission.NEWCOMER, flow: Flow = Flow.FORWARD):
        self.admission = admission
        self.flow: Optional[Flow] = flow
        self.ports: set[TunnelPortMachine] = set()
        self.idle: set[Any] = set()
        self.adopt_ok = True
        self.adopted: list[Any] = []
        self.unpooled: list[Any] = []
        self.taken = False
        self.accepted: list[TunnelPortMachine] = []
        self.channel = FakeChannel()
        self.as_control = False  # 1.14: the next adopted connection is the control
        self.controls: list[TunnelPortMachine] = []
        self.requests: list[TunnelPortMachine] = []

    def admit(self, port: TunnelPortMachine, peer_host: str) -> Admission:
        self.ports.add(port)
        return self.admission

    def forget(self, port: TunnelPortMachine) -> None:
        self.ports.discard(port)

    def tls_context(self) -> Any:
        return "server-context"

    def adopt(self, conn: Any) -> Adopted:
        if not self.adopt_ok:
            return Adopted.REFUSED
        if self.as_control:
            conn.transport.write(b"\x00\x00\x00\x00")
            self.adopted.append(conn)
            return Adopted.CONTROL
        conn.transport.write(b"\x01\x02\x03\x04")  # what the pool writes: the ID
        conn.pool_id = "01020304"
        self.adopted.append(conn)
        self.idle.add(conn)
        return Adopted.POOLED

    def pool_control(self, port: TunnelPortMachine) -> Any:
        self.controls.append(port)
        return self.channel

    def accept_request(self, port: TunnelPortMachine) -> bool:
        self.requests.append(port)
        return not self.taken

    def is_idle(self, conn: Any) -> bool:
        return conn in self.idle

    def unpool(self, conn: Any) -> None:
        self.idle.discard(conn)
        self.unpooled.append(conn)

    def tunnel_taken(self) -> bool:
        return self.taken

    def accept_control(self, port: TunnelPortMachine) -> Any:
        self.accepted.append(port)
        return self.channel


class _PortCase(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.lines = Lines()
        self.codec = Codec(KEY)
        self.settings = PortSettings(
            clock=self.clock, log=self.lines.log, codec=self.codec,
            handshake_timeout=HANDSHAKE, pool_get_timeout=POOL_GET,
        )

    def port(self, owner: Any, connect: bool = True) -> tuple[TunnelPortProtocol, Transport]:
        proto = TunnelPortProtocol(owner, self.settings)
        transport = Transport(peerAddress=_addr(PEER, 40000))
        if connect:
            proto.makeConnection(transport)
        return proto, transport

    def lose(self, proto: TunnelPortProtocol, why: type[Exception] = error.ConnectionDone) -> None:
        proto.connectionLost(Failure(why()))


def _addr(host: str, port: int) -> Any:
    from twisted.internet.address import IPv4Address

    return IPv4Address("TCP", host, port)


class PortTableTests(_PortCase):
    """The table itself: every input some row acts on, every state
    reachable, and every pair no row lists leaves the connection alone."""

    def test_every_input_and_state_has_a_row(self) -> None:
        table = TunnelPortMachine.TABLE
        self.assertEqual({i for _s, i in table}, set(PortInput))
        self.assertEqual({s for s, _i in table} | {n for n, _o in table.values()}, set(PortState))

    def test_unlisted_pairs_are_ignored(self) -> None:
        args = {PortInput.DATA: (b"x",), PortInput.HTTP_PROBE: (b"GET",), PortInput.KEY_ACCEPTED: (b"",),
                PortInput.DENIED: ("why", True), PortInput.STRAY: (b"x",), PortInput.ANSWERED: (None, False),
                PortInput.LOST: (Failure(error.ConnectionDone()),)}
        ignored = 0
        for state in PortState:
            for event in PortInput:
                if (state, event) in TunnelPortMachine.TABLE:
                    continue
                owner = FakePortOwner()
                proto, transport = self.port(owner)
                machine = proto.machine
                machine.state = state
                machine._fire(event, *args.get(event, ()))
                self.assertIs(machine.state, state, (state, event))
                self.assertEqual((transport.value(), transport.how_closed), (b"", None), (state, event))
                ignored += 1
        self.assertGreater(ignored, 0)


class V114PortTests(_PortCase):
    """The 1.14 handshake on the tunnel port (SPEC-1.14 §3.2, §3.3)."""

    def pinned(self, wire: Wire) -> None:
        self.settings = attrs.evolve(self.settings, wire=wire)

    def test_request_answered_and_closed(self) -> None:
        owner = FakePortOwner()
        proto, transport = self.port(owner)
        request = v114.build_request(KEY)
        proto.dataReceived(request[:40])  # "GET / HTTP/1.1 ... Authorization: Bea" -- undecided
        self.assertIs(proto.machine.state, PortState.SNIFFING)
        proto.dataReceived(request[40:])
        self.assertIs(proto.machine.state, PortState.CLOSED)
        self.assertEqual(owner.requests, [proto.machine])
        self.assertEqual(transport.how_closed, "close")

    def test_wrong_token_gets_401(self) -> None:
        owner = FakePortOwner()
        proto, transport = self.port(owner)
        proto.dataReceived(v114.build_request("another key"))
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 401 Unauthorized\r\nConnection: close\r\n"))
        self.assertTrue(transport.value().endswith(b"\r\n\r\nUnauthorized\n"))
        self.assertEqual((transport.how_closed, owner.requests), ("close", []))
        self.assertTrue(self.lines.has("WARN", f"Tunnel access denied: {PEER}:40000 (1.14 handshake answered 401"))

    def test_tunnel_taken_closes_without_answer(self) -> None:
        owner = FakePortOwner()
        owner.taken = True
        proto, transport = self.port(owner)
        proto.dataReceived(v114.build_request(KEY))
        self.assertEqual((transport.value(), transport.how_closed), (b"", "close"))
        self.assertTrue(self.lines.has("WARN", "a client is already connected"))

    def test_slow_request_times_out(self) -> None:
        owner = FakePortOwner()
        proto, transport = self.port(owner)
        proto.dataReceived(v114.build_request(KEY)[:-2])
        self.assertIs(proto.machine.state, PortState.HTTP_114)
        self.clock.advance(HANDSHAKE)
        self.assertEqual((proto.machine.state, transport.how_closed), (PortState.CLOSED, "abort"))

    def test_pinned_114_answers_a_key_line_with_400(self) -> None:
        """What a 1.12 client meets at a 1.14 server (SPEC-1.14 §3.2.5)."""
        self.pinned(Wire.V114)
        owner = FakePortOwner()
        proto, transport = self.port(owner)
        proto.dataReceived(self.codec.encode(KEY))
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 Bad Request\r\n"))
        self.assertEqual(owner.accepted, [])

    def test_pinned_112_takes_a_bearer_request_for_the_ip_probe(self) -> None:
        """What a 1.14 client meets at a 1.12 server (SPEC-1.14 §3.2.5)."""
        self.pinned(Wire.V112)
        owner = FakePortOwner()
        proto, transport = self.port(owner)
        proto.dataReceived(v114.build_request(KEY))
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"))
        self.assertTrue(transport.value().endswith(PEER.encode() + b"\n"))
        self.assertEqual(owner.requests, [])

    def test_first_pool_connection_is_the_control(self) -> None:
        owner = FakePortOwner(Admission.POOL)
        owner.as_control = True
        proto, transport = self.port(owner)
        self.assertIs(proto.machine.state, PortState.CONTROL)
        self.assertEqual(transport.value(), b"\x00\x00\x00\x00")
        self.assertEqual(owner.controls, [proto.machine])
        proto.dataReceived(b"signal line\n")
        self.assertEqual(owner.channel.data, [b"signal line\n"])


class NewcomerTests(_PortCase):
    """SNIFFING: what a stranger's first bytes lead to."""

    def test_key_line_becomes_the_control_channel(self) -> None:
        owner = FakePortOwner()
        proto, transport = self.port(owner)
        self.assertIs(proto.machine.state, PortState.SNIFFING)
        self.assertTrue(proto.machine.timer_running)
        signal = self.codec.encode("np:#i")
        for byte in self.codec.encode(KEY)[:-1]:  # one byte at a time
            proto.dataReceived(bytes([byte]))
        self.assertIs(proto.machine.state, PortState.SNIFFING)
        proto.dataReceived(b"\n" + signal)
        self.assertIs(proto.machine.state, PortState.CONTROL)
        self.assertEqual(owner.accepted, [proto.machine])
        self.assertEqual(owner.channel.data, [signal])  # the bytes after the key line
        self.assertFalse(proto.machine.timer_running)
        self.clock.advance(HANDSHAKE * 2)
        self.assertIsNone(transport.how_closed)
        proto.dataReceived(b"more")
        self.assertEqual(owner.channel.data[-1], b"more")

    def test_garbage_without_a_line_is_aborted(self) -> None:
        """A TLS ClientHello (or any binary) on the plain tunnel port:
        no line within MAX_LINE bytes."""
        owner = FakePortOwner()
        proto, transport = self.port(owner)
        proto.dataReceived(b"\x16\x03\x01\x02\x00\x01" + b"\xff" * codec.MAX_LINE)
        self.assertIs(proto.machine.state, PortState.CLOSED)
        self.assertEqual(transport.how_closed, "abort")
        self.assertTrue(self.lines.has("WARN", f"Tunnel access denied: {PEER}:40000 (handshake line too long)"))

    def test_bad_encoding_is_refused_cleanly(self) -> None:
        owner = FakePortOwner()
        proto, transport = self.port(owner)
        proto.dataReceived(b"\x00\x01not base64 at all!\n")
        self.assertEqual(transport.how_closed, "close")  # a judged refusal: FIN, not reset
        self.assertTrue(self.lines.has("WARN", "(bad handshake encoding)"))
        self.assertEqual(owner.accepted, [])

    def test_wrong_key_of_another_length_is_refused_cleanly(self) -> None:
        owner = FakePortOwner()
        proto, transport = self.port(owner)
        proto.dataReceived(Codec("short").encode("short"))
        self.assertIs(proto.machine.state, PortState.CLOSED)
        self.assertEqual(transport.how_closed, "close")
        self.assertTrue(self.lines.has("WARN", "(wrong tunnel key)"))

    def test_same_length_wrong_key_passes_the_key_check(self) -> None:
        """The key line is the key XORed with itself: any key of the same
        length decodes to ours.  The runner's probation handles it (see
        CandidateTests)."""
        owner = FakePortOwner()
        proto, _transport = self.port(owner)
        proto.dataReceived(Codec(WRONG).encode(WRONG))
        self.assertIs(proto.machine.state, PortState.CONTROL)

    def test_tunnel_taken(self) -> None:
        owner = FakePortOwner()
        owner.taken = True
        proto, transport = self.port(owner)
        proto.dataReceived(self.codec.encode(KEY))
        self.assertEqual(transport.how_closed, "close")
        self.assertTrue(self.lines.has("WARN", "(a client is already connected)"))

    def test_handshake_timeout(self) -> None:
        owner = FakePortOwner()
        proto, transport = self.port(owner)
        proto.dataReceived(b"half a line")
        self.clock.advance(HANDSHAKE - 0.01)
        self.assertIsNone(transport.how_closed)
        self.clock.advance(0.02)
        self.assertIs(proto.machine.state, PortState.CLOSED)
        self.assertEqual(transport.how_closed, "abort")
        self.assertTrue(self.lines.has("WARN", "(handshake timeout)"))

    def test_http_get_probe(self) -> None:
        owner = FakePortOwner()
        proto, transport = self.port(owner)
        proto.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n")
        self.assertEqual(transport.value(), b"")
        proto.dataReceived(b"\r\n")
        body = PEER.encode() + b"\n"
        self.assertEqual(
            transport.value(),
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (len(body), body),
        )
        self.assertEqual(transport.how_closed, "close")
        self.assertTrue(self.lines.has("DEBUG", f"HTTP probe GET from {PEER}:40000 answered"))
        self.clock.advance(HANDSHAKE)  # the handshake timer went with SNIFFING
        self.assertFalse(self.lines.has("WARN", "Tunnel access denied"))

    def test_http_other_method_probe(self) -> None:
        owner = FakePortOwner()
        proto, transport = self.port(owner)
        proto.dataReceived(b"DEL /x HTTP/1.1\n\n")
        self.assertEqual(
            transport.value(),
            b"HTTP/1.1 405 Method Not Allowed\r\nAllow: GET\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        self.assertTrue(self.lines.has("DEBUG", "HTTP probe with another method from"))
        self.assertNotIn("DEL", self.lines.text())  # received bytes stay out of log lines

    def test_http_probe_without_end_is_answered_past_max_probe(self) -> None:
        owner = FakePortOwner()
        proto, transport = self.port(owner)
        proto.dataReceived(b"GET /" + b"a" * MAX_PROBE)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK"))

    def test_rival_won(self) -> None:
        owner = FakePortOwner()
        winner, _t1 = self.port(owner)
        loser, t2 = self.port(owner)
        winner.dataReceived(self.codec.encode(KEY))
        for port in list(owner.ports):
            port.rival_won()
        self.assertIs(winner.machine.state, PortState.CONTROL)
        self.assertIs(loser.machine.state, PortState.CLOSED)
        self.assertEqual(t2.how_closed, "close")
        self.assertTrue(self.lines.has("WARN", "(another client won the handshake)"))

    def test_shutdown(self) -> None:
        owner = FakePortOwner()
        control, t1 = self.port(owner)
        control.dataReceived(self.codec.encode(KEY))
        sniffing, t2 = self.port(owner)
        for port in list(owner.ports):
            port.shutdown()
        self.assertEqual((t1.how_closed, t2.how_closed), ("close", "abort"))

    def test_lost_forgets_and_reaches_the_channel(self) -> None:
        owner = FakePortOwner()
        sniffing, _t = self.port(owner)
        control, _t2 = self.port(owner)
        control.dataReceived(self.codec.encode(KEY))
        self.assertEqual(len(owner.ports), 2)
        self.lose(sniffing, error.ConnectionLost)
        self.lose(control)
        self.assertEqual(owner.ports, set())
        self.assertEqual((sniffing.machine.state, control.machine.state), (PortState.CLOSED, PortState.CLOSED))
        self.assertEqual(owner.channel.lost, ["control connection lost: Connection was closed cleanly."])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class PoolConnectionTests(_PortCase):
    """From the connected client's IP: POOL_TLS, POOLED and strays."""

    def test_plain_pool_connection(self) -> None:
        owner = FakePortOwner(Admission.POOL)
        proto, transport = self.port(owner)
        self.assertIs(proto.machine.state, PortState.POOLED)
        self.assertEqual(owner.adopted, [proto])
        self.assertEqual(transport.value(), b"\x01\x02\x03\x04")
        self.assertFalse(proto.machine.timer_running)

    def test_pool_refused(self) -> None:
        owner = FakePortOwner(Admission.POOL)
        owner.adopt_ok = False
        proto, transport = self.port(owner)
        self.assertIs(proto.machine.state, PortState.CLOSED)
        self.assertEqual(transport.how_closed, "close")

    def test_pool_full(self) -> None:
        owner = FakePortOwner(Admission.POOL_FULL)
        proto, transport = self.port(owner)
        self.assertIs(proto.machine.state, PortState.CLOSED)
        self.assertEqual(transport.how_closed, "close")
        self.assertEqual(owner.adopted, [])

    def test_tls_pool_connection(self) -> None:
        owner = FakePortOwner(Admission.POOL_TLS)
        proto, transport = self.port(owner)
        self.assertIs(proto.machine.state, PortState.POOL_TLS)
        self.assertEqual(transport.tls, "server-context")
        proto.dataReceived(b"early")  # held until a relay takes it
        self.assertEqual(transport.producerState, "paused")
        proto.handshakeCompleted()
        self.assertIs(proto.machine.state, PortState.POOLED)
        self.assertEqual(owner.adopted, [proto])
        self.clock.advance(HANDSHAKE * 2)
        self.assertIsNone(transport.how_closed)
        self.assertEqual(proto.take_early(), b"early")

    def test_tls_handshake_timeout(self) -> None:
        owner = FakePortOwner(Admission.POOL_TLS)
        proto, transport = self.port(owner)
        self.clock.advance(HANDSHAKE)
        self.assertIs(proto.machine.state, PortState.CLOSED)
        self.assertEqual(transport.how_closed, "abort")
        self.assertTrue(self.lines.has("DEBUG", f"Pool connection from {PEER}:40000: TLS handshake timed out"))
        proto.handshakeCompleted()  # too late: nothing happens
        self.assertEqual(owner.adopted, [])

    def test_candidate_dropped(self) -> None:
        owner = FakePortOwner(Admission.POOL_TLS)
        half, t1 = self.port(owner)
        owner.admission = Admission.POOL
        pooled, t2 = self.port(owner)
        for port in list(owner.ports):
            port.candidate_dropped()
        self.assertEqual((half.machine.state, t1.how_closed), (PortState.CLOSED, "abort"))
        self.assertEqual((pooled.machine.state, t2.how_closed), (PortState.POOLED, None))

    def test_stray_bytes_in_reverse_flow_are_judged_like_a_newcomer(self) -> None:
        """Flow "-": our client never writes on an idle pool connection,
        so bytes there come from someone else on its host."""
        owner = FakePortOwner(Admission.POOL, flow=Flow.REVERSE)
        proto, transport = self.port(owner)
        transport.clear()
        proto.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        self.assertEqual(owner.unpooled, [proto])
        self.assertTrue(self.lines.has("DEBUG", f"Unexpected data on idle pool connection from {PEER}:40000"))
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK"))
        self.assertEqual(transport.producerState, "producing")

    def test_early_bytes_in_forward_flow_wait_for_their_launch(self) -> None:
        """Flow "+": the client writes right after its launch signal; a
        launch that takes the connection in time keeps its bytes."""
        owner = FakePortOwner(Admission.POOL, flow=Flow.FORWARD)
        proto, transport = self.port(owner)
        proto.dataReceived(b"user bytes")
        self.assertTrue(proto.machine.timer_running)
        self.assertEqual(transport.producerState, "paused")
        owner.idle.discard(proto)  # a launch took it
        self.clock.advance(POOL_GET)
        self.assertIs(proto.machine.state, PortState.POOLED)
        self.assertEqual(proto.take_early(), b"user bytes")

    def test_unclaimed_bytes_in_forward_flow_are_a_newcomer(self) -> None:
        owner = FakePortOwner(Admission.POOL, flow=Flow.FORWARD)
        proto, transport = self.port(owner)
        proto.dataReceived(self.codec.encode(KEY)[:4])
        self.clock.advance(POOL_GET)
        self.assertIs(proto.machine.state, PortState.SNIFFING)
        self.assertEqual(owner.unpooled, [proto])
        proto.dataReceived(self.codec.encode(KEY)[4:])  # the rest of a key line
        self.assertIs(proto.machine.state, PortState.CONTROL)

    def test_relayed_bytes_bypass_the_machine(self) -> None:
        owner = FakePortOwner(Admission.POOL, flow=Flow.REVERSE)
        proto, _transport = self.port(owner)
        got: list[bytes] = []

        class Sink:
            def forward(self, end: Any, data: bytes) -> None:
                got.append(data)

            def end_lost(self, end: Any) -> None:
                pass

        owner.idle.discard(proto)
        proto.attach(Sink())
        proto.dataReceived(b"chunk")
        self.assertEqual(got, [b"chunk"])
        self.assertIs(proto.machine.state, PortState.POOLED)
        self.assertEqual(owner.unpooled, [])


class QuicStreamTests(unittest.TestCase):
    """A QUIC pool stream: our handshake byte first, then a pool end."""

    class Runner:
        def __init__(self, ok: bool) -> None:
            self.ok = ok
            self.adopted: list[Any] = []

        def adopt(self, conn: Any) -> Adopted:
            self.adopted.append(conn)
            return Adopted.POOLED if self.ok else Adopted.REFUSED

    def test_adopted_and_first_byte_dropped(self) -> None:
        runner = self.Runner(True)
        stream = QuicPoolStream(runner)  # type: ignore[arg-type]
        stream.makeConnection(StringTransport())
        stream.dataReceived(b"\x00held")
        self.assertIs(stream.state, PortState.POOLED)
        self.assertEqual(stream.take_early(), b"held")

    def test_refused(self) -> None:
        stream = QuicPoolStream(self.Runner(False))  # type: ignore[arg-type]
        transport = StringTransport()
        stream.makeConnection(transport)
        stream.dataReceived(b"\x00")
        self.assertIs(stream.state, PortState.CLOSED)
        self.assertTrue(transport.disconnecting)


class CandidateTests(_PortCase):
    """The same-length wrong key against the real runner: it passes the
    key check, never becomes a working client, and is dropped without
    failing the tunnel."""

    def runner(self) -> ServerRunner:
        cfg = parse_url(f"server://{KEY}@127.0.0.1:10101/127.0.0.1:10102?mode=2&log=debug")
        tunables = Tunables(handshake_timeout=HANDSHAKE, pool_get_timeout=POOL_GET, report_interval=1.0)
        ctx = InstanceContext(
            config=cfg, tunables=tunables, reactor=self.clock, log=self.lines.log,
            stats=InstanceStats(cfg.slot), limiter=None, report=lambda _ms, _pool: None,
        )
        runner = ServerRunner(ctx)
        runner.flow, runner.mode = Flow.FORWARD, ServerMode.FORWARD
        runner.creds = ServerCredentials.from_config(0, "", "", self.lines.log, 3600.0, self.clock)
        runner.pool = ServerPool(cfg.max, self.clock, self.lines.log)
        return runner

    def stranger(self, runner: ServerRunner) -> tuple[TunnelPortProtocol, Transport]:
        proto, transport = self.port(runner)
        proto.dataReceived(Codec(WRONG).encode(WRONG))
        self.assertIs(proto.machine.state, PortState.CONTROL)
        self.assertEqual(Codec(KEY).decode(transport.value()), b"np://0@1024/+#%d" % runner.tls_code)
        return proto, transport

    def test_silent_stranger_is_dropped_not_fatal(self) -> None:
        runner = self.runner()
        proto, transport = self.stranger(runner)
        self.assertFalse(runner.control.working)
        proto.dataReceived(b"garbage that never decodes\n")
        self.clock.advance(2.9)
        self.assertIsNotNone(runner.control)
        self.assertIsNone(transport.how_closed)
        self.clock.advance(0.2)  # 3 x report_interval without a valid signal
        self.assertIsNone(runner.control)
        self.assertEqual(transport.how_closed, "close")
        self.assertTrue(self.lines.has("WARN", "it passed the key check but never used the tunnel"))
        self.assertTrue(self.lines.has("WARN", "no valid signal from the peer within 3.1s"))  # Clock time at 2.9 + 0.2
        self.assertFalse(runner.failed.called)
        # The tunnel is free again: a real client gets in.
        client, t2 = self.port(runner)
        client.dataReceived(self.codec.encode(KEY))
        self.assertIs(client.machine.state, PortState.CONTROL)
        runner.control.stop()

    def test_stranger_that_leaves_is_dropped_not_fatal(self) -> None:
        """What a real client with the other key does: it cannot decode
        the answer and closes.  Its half-open TLS pool connections go too."""
        runner = self.runner()
        runner.tls_code = TLSCode.RAM_CERT
        runner.creds = ServerCredentials.from_config(1, "", "", self.lines.log, 3600.0, self.clock)
        proto, _transport = self.stranger(runner)
        half, t2 = self.port(runner)  # from the control IP: a pool connection starting TLS
        self.assertIs(half.machine.state, PortState.POOL_TLS)
        self.lose(proto)
        self.assertIsNone(runner.control)
        self.assertIsNone(runner.control_ip)
        self.assertEqual(t2.how_closed, "abort")
        self.assertFalse(runner.failed.called)

    def test_working_client_loss_is_fatal(self) -> None:
        runner = self.runner()
        proto, _transport = self.stranger(runner)  # a right key looks the same here
        owner_failures: list[Failure] = []
        runner.failed.addErrback(owner_failures.append)
        proto.dataReceived(self.codec.encode("np:#i"))  # a signal that decodes: working
        self.assertTrue(runner.control.working)
        self.lose(proto, error.ConnectionLost)
        self.assertEqual(len(owner_failures), 1)
        self.assertIn("control connection lost", str(owner_failures[0].value))


class FakeControlOwner:
    stopping = False


class _ClientCase(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.lines = Lines()
        self.codec = Codec(KEY)
        self.owner = FakeControlOwner()
        self.settings = HandshakeSettings(
            clock=self.clock, log=self.lines.log, codec=self.codec, tunnel_key=KEY,
            server="server.example:10101", handshake_timeout=HANDSHAKE,
        )
        self.proto = ClientControlProtocol(self.owner, self.settings)
        self.machine = self.proto.machine
        self.transport = Transport()
        self.outcome: list[Any] = []
        self.machine.answer.addBoth(self.outcome.append)

    def connect(self) -> None:
        self.proto.makeConnection(self.transport)

    def lose(self, why: type[Exception] = error.ConnectionDone) -> None:
        self.proto.connectionLost(Failure(why()))

    def failure(self) -> BaseException:
        self.assertEqual(len(self.outcome), 1)
        self.assertIsInstance(self.outcome[0], Failure)
        return self.outcome[0].value


class ClientTableTests(_ClientCase):
    def test_every_input_and_state_has_a_row(self) -> None:
        table = self.machine.TABLE
        self.assertEqual({i for _s, i in table}, set(ClientInput))
        self.assertEqual({s for s, _i in table} | {n for n, _o in table.values()}, set(ClientState))

    def test_unlisted_pairs_are_ignored(self) -> None:
        info = codec.parse_handshake_config("np://0@8/-#0")
        args = {ClientInput.DATA: (b"x",), ClientInput.ANSWER: (info, b""), ClientInput.FAILED: (TunnelError("x"),),
                ClientInput.CHANNEL: (FakeChannel(),), ClientInput.LOST: (Failure(error.ConnectionDone()),)}
        for state in ClientState:
            for event in ClientInput:
                if (state, event) in self.machine.TABLE:
                    continue
                proto = ClientControlProtocol(self.owner, self.settings)
                transport = Transport()
                proto.transport = transport
                proto.machine.state = state
                proto.machine._fire(event, *args.get(event, ()))
                self.assertIs(proto.machine.state, state, (state, event))
                self.assertEqual((transport.value(), transport.how_closed), (b"", None), (state, event))
                self.assertFalse(proto.machine.answer.called, (state, event))


class ClientHandshakeTests(_ClientCase):
    def test_key_line_on_connect(self) -> None:
        self.assertIs(self.machine.state, ClientState.NEW)
        self.connect()
        self.assertIs(self.machine.state, ClientState.HANDSHAKING)
        self.assertEqual(self.transport.value(), self.codec.encode(KEY))
        self.assertTrue(self.machine.timer_running)

    def test_answer_then_channel(self) -> None:
        self.connect()
        answer = self.codec.encode("np://0@1024/-#1")
        signal = self.codec.encode("np:#i")
        self.proto.dataReceived(answer[:5])
        self.assertEqual(self.outcome, [])
        self.proto.dataReceived(answer[5:] + signal + b"par")
        self.assertIs(self.machine.state, ClientState.ANSWERED)
        [(info, rest)] = self.outcome
        self.assertEqual((info.pool_type, info.max, info.flow, info.tls_code), ("0", 1024, Flow.REVERSE, TLSCode.RAM_CERT))
        self.assertEqual(rest, signal + b"par")  # for the channel, which the runner feeds
        self.assertFalse(self.machine.timer_running)
        channel = FakeChannel()
        self.assertTrue(self.machine.channel_ready(channel))  # type: ignore[arg-type]
        self.assertIs(self.machine.state, ClientState.CONTROL)
        self.proto.dataReceived(b"tial")
        self.assertEqual(channel.data, [b"tial"])
        self.clock.advance(HANDSHAKE * 2)
        self.assertIsNone(self.transport.how_closed)
        self.lose(error.ConnectionLost)
        self.assertEqual(channel.lost, ["control connection lost: Connection to the other side was lost in a non-clean fashion."])

    def test_answer_too_long(self) -> None:
        self.connect()
        self.proto.dataReceived(b"A" * (codec.MAX_LINE + 1))
        self.assertIsInstance(self.failure(), TunnelError)
        self.assertIn("answer line too long", str(self.failure()))
        self.assertEqual(self.transport.how_closed, "abort")
        self.assertIs(self.machine.state, ClientState.CLOSED)

    def test_same_length_other_key_is_a_key_mismatch(self) -> None:
        """A server whose key differs but has the same length answers; the
        answer decodes to noise under our key."""
        self.connect()
        self.proto.dataReceived(Codec(WRONG).encode("np://0@1024/-#1"))
        self.assertIsInstance(self.failure(), KeyMismatch)
        self.assertIn("tunnel keys most likely differ", str(self.failure()))
        self.assertEqual(self.transport.how_closed, "abort")
        self.assertTrue(self.lines.has("DEBUG", "Handshake answer from server.example:10101: "))

    def test_echo_of_our_key_is_not_logged(self) -> None:
        """Pointed at an echo service, the client reads its own key line
        back, which decodes to its key: no log line may show it."""
        self.connect()
        self.proto.dataReceived(self.transport.value())
        self.assertIsInstance(self.failure(), KeyMismatch)
        self.assertNotIn(KEY, self.lines.text())

    def test_silence_times_out(self) -> None:
        self.connect()
        self.clock.advance(HANDSHAKE - 0.01)
        self.assertEqual(self.outcome, [])
        self.clock.advance(0.02)
        self.assertIn("tunnel handshake timed out: the server sent no answer within 5s", str(self.failure()))
        self.assertEqual(self.transport.how_closed, "abort")
        self.lose(error.ConnectionAborted)  # what the abort leads to: nothing more
        self.assertEqual(len(self.outcome), 1)

    def test_clean_close_is_a_refusal(self) -> None:
        self.connect()
        self.lose(error.ConnectionDone)
        self.assertIsInstance(self.failure(), HandshakeRefused)
        self.assertEqual(str(self.failure()), REFUSED)

    def test_reset_is_no_refusal(self) -> None:
        self.connect()
        self.lose(error.ConnectionLost)
        failure = self.failure()
        self.assertNotIsInstance(failure, HandshakeRefused)
        self.assertIn("closed before the handshake completed", str(failure))
        self.assertIn("the server may be restarting", str(failure))

    def test_own_shutdown_during_the_handshake(self) -> None:
        self.connect()
        self.owner.stopping = True
        self.machine.close()
        self.assertEqual(self.transport.how_closed, "close")
        self.lose(error.ConnectionDone)  # a clean close, but ours
        failure = self.failure()
        self.assertNotIsInstance(failure, HandshakeRefused)
        self.assertEqual(str(failure), "handshake abandoned: the client is stopping")

    def test_close_while_dialling_does_nothing(self) -> None:
        self.machine.close()
        self.assertIs(self.machine.state, ClientState.NEW)
        self.assertEqual(self.outcome, [])

    def test_channel_after_loss_is_refused(self) -> None:
        self.connect()
        self.proto.dataReceived(self.codec.encode("np://0@8/+#0"))
        self.lose()
        self.assertIs(self.machine.state, ClientState.CLOSED)
        self.assertFalse(self.machine.channel_ready(FakeChannel()))  # type: ignore[arg-type]

    def test_bytes_after_a_failure_are_ignored(self) -> None:
        self.connect()
        self.proto.dataReceived(b"!!\n")
        self.assertIsInstance(self.failure(), KeyMismatch)
        self.proto.dataReceived(self.codec.encode("np://0@8/+#0"))
        self.assertEqual(len(self.outcome), 1)
        self.assertIs(self.machine.state, ClientState.CLOSED)


class TimerOwnershipTests(unittest.TestCase):
    """A machine's timer belongs to the state that started it."""

    def test_leaving_the_state_cancels_its_timer(self) -> None:
        from enum import Enum

        class St(Enum):
            A = 1
            B = 2

        class In(Enum):
            GO = 1
            TICK = 2

        fired: list[str] = []

        class M(TableMachine[St, In]):
            TABLE = {(St.A, In.GO): (St.B, None), (St.A, In.TICK): (St.A, lambda m: fired.append("A")),
                     (St.B, In.TICK): (St.B, lambda m: fired.append("B"))}

        clock = Clock()
        m = M(M.TABLE, St.A, clock)
        m._start_timer(1.0, In.TICK)
        m._fire(In.GO)
        clock.advance(2)
        self.assertEqual(fired, [])
        self.assertEqual(clock.getDelayedCalls(), [])
