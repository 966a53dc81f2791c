"""Single-end forwarding (client ``mode=1``), SPEC §2, §5, §6, §7: real
sockets on loopback, the service run in-process with short tunables."""

from __future__ import annotations

import hashlib
import os
import socket
import time

from twisted.internet import defer, reactor, task
from twisted.internet.protocol import Factory
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from nodepass.base.stats import InstanceStats
from nodepass.config.urls import Address, Tunables, parse_url
from nodepass.net.dialer import AllTargetsFailed, TargetGroup
from nodepass.relay.core import PauseGate, Relay, RelayEnd
from nodepass.service.instance import TunnelService
from nodepass.base.logs import NodeLog
from nodepass.modes.single import SingleEndRunner, tunnel_address_binds
from tests.helpers import (
    Blackhole,
    Client,
    HashingClient,
    PushSender,
    Source,
    Stalled,
    UDPClient,
    UDPEcho,
    close,
    connect,
    dead_port,
    free_port,
    ipv6_available,
    listen_echo,
    listen_sink,
    listen_tcp,
    service_up,
    listen_udp,
    sleep,
    transport_buffered,
    wait_for,
)

MiB = 1024 * 1024


def _port(listening) -> int:
    return listening.getHost().port


class ForwarderMixin:
    """Starts a single-end forwarder in-process and cleans it up."""

    def start_forwarder(
        self,
        targets: str,
        query: str = "",
        host: str = "127.0.0.1",
        tunables: Tunables | None = None,
        wait: bool = True,
        mode: str = "1",
    ):
        port = free_port(host)
        url = f"client://{Address(host, port)}/{targets}?mode={mode}&log=debug{query}"
        config = parse_url(url)
        log = NodeLog(config.log)
        self.lines: list[str] = []
        log.listeners.append(lambda level, line: self.lines.append(line))
        svc = TunnelService(config, tunables=tunables or Tunables(report_interval=60), log=log)
        svc.startService()
        self.addCleanup(svc.stopService)
        self.service = svc
        self.fport = port
        if wait:
            return svc.started.addCallback(lambda _r: port)
        return defer.succeed(port)

    def logged(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def target(self, factory_result):
        port, factory = factory_result
        self.addCleanup(port.stopListening)
        return _port(port), factory


def d(coro_fn):
    """Run an ``async def`` test method as a Deferred."""

    def wrapper(self):
        return defer.ensureDeferred(coro_fn(self))

    wrapper.__name__ = coro_fn.__name__
    wrapper.__doc__ = coro_fn.__doc__
    return wrapper


class TCPForwardingTests(ForwarderMixin, unittest.TestCase):
    @d
    async def test_64mib_sha256(self) -> None:
        """64 MiB through the forwarder and back (echo target) arrive intact."""
        tport, _ = self.target(listen_echo())
        fport = await self.start_forwarder(f"127.0.0.1:{tport}")
        payload = os.urandom(64 * MiB)
        client = await connect(fport, protocol_class=HashingClient)
        client.transport.write(payload)
        digest = await client.wait_bytes(len(payload), timeout=60)
        self.assertEqual(digest, hashlib.sha256(payload).hexdigest())
        self.assertEqual(client.received, len(payload))
        stats = self.service.stats
        self.assertEqual(stats.tcp_tx, len(payload))  # written to the target
        self.assertEqual(stats.tcp_rx, len(payload))  # read from the target
        self.assertEqual(stats.tcps, 1)
        await close(client)
        await wait_for(lambda: stats.tcps == 0, what="slot released")

    @d
    async def test_200_concurrent_connections(self) -> None:
        tport, _ = self.target(listen_echo())
        fport = await self.start_forwarder(f"127.0.0.1:{tport}")
        payloads = [os.urandom(16384 + i) for i in range(200)]
        clients = await defer.gatherResults([defer.ensureDeferred(connect(fport)) for _ in payloads])
        for c, p in zip(clients, payloads):
            c.transport.write(p)
        results = await defer.gatherResults([c.wait_bytes(len(p), timeout=30) for c, p in zip(clients, payloads)])
        for got, p in zip(results, payloads):
            self.assertEqual(got, p)
        self.assertEqual(self.service.stats.tcps, 200)
        await defer.gatherResults([defer.ensureDeferred(close(c)) for c in clients])
        await wait_for(lambda: self.service.stats.tcps == 0, what="all slots released")

    @d
    async def test_backpressure(self) -> None:
        """A receiver that stops reading stops the relay reading from the
        sender: the relay's user-space buffers stay small."""
        tport, _ = self.target(listen_tcp(Stalled))
        fport = await self.start_forwarder(f"127.0.0.1:{tport}")
        client = await connect(fport)
        sender = PushSender(client.transport)
        self.addCleanup(sender.stopProducing)
        runner = self.service.runner
        await wait_for(lambda: len(runner.relays) == 1, what="relay up")
        (relay,) = runner.relays

        def relay_buffered() -> int:
            return transport_buffered(relay.target.transport) + transport_buffered(relay.tunnel.transport)

        # Wait until the sender is stuck: paused, and no progress for a while.
        last = [-1]
        peak = [0]

        def stuck() -> bool:
            peak[0] = max(peak[0], relay_buffered())
            if sender.paused and sender.written == last[0]:
                return True
            last[0] = sender.written
            return False

        await wait_for(stuck, timeout=20, interval=0.2, what="sender blocked")
        self.assertTrue(relay.tunnel.gate.paused, "relay still reading from the sender")
        self.assertLess(peak[0], 4 * MiB)
        # The sender keeps trying; nothing moves and nothing piles up.
        before = sender.written
        for _ in range(5):
            await sleep(0.05)
            sender.resumeProducing()
            peak[0] = max(peak[0], relay_buffered())
        await sleep(0.1)
        self.assertLess(peak[0], 4 * MiB)
        self.assertLess(sender.written - before, 4 * MiB)
        self.assertLess(self.service.stats.tcp_tx, 32 * MiB)
        sender.stopProducing()
        client.transport.abortConnection()
        await client.lost

    @d
    async def test_rate_limit(self) -> None:
        """rate=8 (1,000,000 bytes/s) holds a download near 1 MB/s."""
        size = 1_200_000
        tport, _ = self.target(listen_tcp(Source, payload=os.urandom(size)))
        fport = await self.start_forwarder(f"127.0.0.1:{tport}", "&rate=8")
        started = time.monotonic()
        client = await connect(fport)
        data = await client.lost
        elapsed = time.monotonic() - started
        self.assertEqual(len(data), size)
        rate = size / elapsed
        self.assertGreater(rate, 0.5e6)
        self.assertLess(rate, 1.6e6)

    @d
    async def test_slot_limit(self) -> None:
        tport, _ = self.target(listen_echo())
        fport = await self.start_forwarder(f"127.0.0.1:{tport}", "&slot=2")
        a = await connect(fport)
        b = await connect(fport)
        for c in (a, b):
            c.transport.write(b"ping")
            self.assertEqual(await c.wait_bytes(4), b"ping")
        third = await connect(fport)
        third.transport.write(b"ping")
        self.assertEqual(await third.lost, b"")
        self.assertTrue(self.logged("slot limit reached (2)"))
        self.assertEqual(self.service.stats.tcps, 2)
        await close(a)
        await wait_for(lambda: self.service.stats.tcps == 1, what="slot released")
        fourth = await connect(fport)
        fourth.transport.write(b"pong")
        self.assertEqual(await fourth.wait_bytes(4), b"pong")
        await close(b)
        await close(fourth)

    async def _proxy_header(self, host: str, family: str) -> None:
        tlisten, tfactory = listen_sink(host)
        self.addCleanup(tlisten.stopListening)
        tport = _port(tlisten)
        fport = await self.start_forwarder(str(Address(host, tport)), "&proxy=1", host=host)
        client = await connect(fport, host=host)
        client.transport.write(b"hello")
        await wait_for(lambda: tfactory.connections and tfactory.connections[0].received >= 5, what="data at target")
        sink = tfactory.connections[0]
        cport = client.transport.getHost().port
        expected = f"PROXY {family} {host} {host} {cport} {tport}\r\nhello".encode()
        self.assertEqual(sink.data(), expected)
        await close(client)

    @d
    async def test_proxy_v1_ipv4(self) -> None:
        await self._proxy_header("127.0.0.1", "TCP4")

    @d
    async def test_proxy_v1_ipv6(self) -> None:
        self.assertTrue(ipv6_available(), "this test needs ::1")
        await self._proxy_header("::1", "TCP6")

    @d
    async def test_no_proxy_header_by_default(self) -> None:
        tlisten, tfactory = listen_sink()
        self.addCleanup(tlisten.stopListening)
        fport = await self.start_forwarder(f"127.0.0.1:{_port(tlisten)}")
        client = await connect(fport)
        client.transport.write(b"hello")
        await wait_for(lambda: tfactory.connections and tfactory.connections[0].received >= 5)
        self.assertEqual(tfactory.connections[0].data(), b"hello")
        await close(client)

    @d
    async def test_failover_skips_dead_target(self) -> None:
        tport, factory = self.target(listen_echo())
        dead = dead_port()
        fport = await self.start_forwarder(f"127.0.0.1:{dead},127.0.0.1:{tport}")
        for i in range(3):
            c = await connect(fport)
            c.transport.write(b"x%d" % i)
            self.assertEqual(await c.wait_bytes(2), b"x%d" % i)
            await close(c)
        self.assertEqual(factory.accepted, 3)

    @d
    async def test_all_targets_failed(self) -> None:
        fport = await self.start_forwarder(f"127.0.0.1:{dead_port()},127.0.0.1:{dead_port()}")
        c = await connect(fport)
        self.assertEqual(await c.lost, b"")
        self.assertTrue(self.logged("all 2 target(s) failed"))
        await wait_for(lambda: self.service.stats.tcps == 0, what="slot released")

    @d
    async def test_dial_source_address(self) -> None:
        tlisten, tfactory = listen_sink()
        self.addCleanup(tlisten.stopListening)
        fport = await self.start_forwarder(f"127.0.0.1:{_port(tlisten)}", "&dial=127.0.0.2")
        c = await connect(fport)
        c.transport.write(b"src")
        await wait_for(lambda: tfactory.connections and tfactory.connections[0].received >= 3)
        self.assertEqual(tfactory.connections[0].transport.getPeer().host, "127.0.0.2")
        self.assertFalse(self.logged("falling back"))
        await close(c)

    @d
    async def test_dial_source_fallback(self) -> None:
        tport, factory = self.target(listen_echo())
        fport = await self.start_forwarder(f"127.0.0.1:{tport}", "&dial=192.0.2.55")
        for _ in range(2):
            c = await connect(fport)
            c.transport.write(b"fb")
            self.assertEqual(await c.wait_bytes(2), b"fb")
            await close(c)
        self.assertEqual(sum("Dial source 192.0.2.55 unusable" in line for line in self.lines), 1)
        self.assertEqual(factory.accepted, 2)

    @d
    async def test_round_robin(self) -> None:
        p1, f1 = self.target(listen_echo())
        p2, f2 = self.target(listen_echo())
        fport = await self.start_forwarder(f"127.0.0.1:{p1},127.0.0.1:{p2}")
        for i in range(6):
            c = await connect(fport)
            c.transport.write(b"rr")
            await c.wait_bytes(2)
            await close(c)
        self.assertEqual((f1.accepted, f2.accepted), (3, 3))

    @d
    async def test_read_timeout_closes_idle_pair(self) -> None:
        tport, factory = self.target(listen_echo())
        fport = await self.start_forwarder(f"127.0.0.1:{tport}", "&read=300ms")
        started = time.monotonic()
        c = await connect(fport)
        c.transport.write(b"hi")
        self.assertEqual(await c.wait_bytes(2), b"hi")
        await c.lost
        elapsed = time.monotonic() - started
        self.assertGreaterEqual(elapsed, 0.25)
        self.assertLess(elapsed, 3.0)
        await wait_for(lambda: not factory.connections, what="target side closed")
        self.assertEqual(self.service.stats.tcps, 0)

    @d
    async def test_stop_closes_live_connections(self) -> None:
        tport, factory = self.target(listen_echo())
        fport = await self.start_forwarder(f"127.0.0.1:{tport}")
        c = await connect(fport)
        c.transport.write(b"hi")
        await c.wait_bytes(2)
        await self.service.stopService()
        await c.lost
        await wait_for(lambda: not factory.connections, what="target side closed")
        with self.assertRaises(Exception):
            await connect(fport)


class LifecycleTests(ForwarderMixin, unittest.TestCase):
    @d
    async def test_checkpoint(self) -> None:
        tport, _ = self.target(listen_echo())
        seen: list = []
        got = defer.Deferred()
        fport = await self.start_forwarder(f"127.0.0.1:{tport}", tunables=Tunables(report_interval=0.1))

        def listener(cp):
            seen.append(cp)
            if len(seen) == 2 and not got.called:
                got.callback(None)

        self.service.checkpoint_listeners.append(listener)
        c = await connect(fport)
        c.transport.write(b"abc")
        await c.wait_bytes(3)
        await got.addTimeout(5, reactor)
        cp = seen[-1]
        self.assertEqual((cp.mode, cp.pool, cp.tcps, cp.tcprx, cp.tcptx), (1, 0, 1, 3, 3))
        self.assertGreaterEqual(cp.ping, 0)
        self.assertTrue(
            any(
                f"CHECK_POINT|MODE=1|PING={cp.ping}ms|POOL=0|TCPS=1|UDPS=0|TCPRX=3|TCPTX=3|UDPRX=0|UDPTX=0" in line
                for line in self.lines
            ),
            self.lines,
        )
        self.assertTrue(self.logged(f"Client started: client://{self.service.config.tunnel_key}@127.0.0.1:{fport}/"))
        await close(c)

    @d
    async def test_notcp(self) -> None:
        fport = await self.start_forwarder(f"127.0.0.1:{dead_port()}", "&notcp=1")
        # Nothing holds the TCP port; UDP is taken.
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", fport))
        s.close()
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with self.assertRaises(OSError):
            u.bind(("127.0.0.1", fport))
        u.close()

    @d
    async def test_noudp(self) -> None:
        echo = UDPEcho()
        uport = listen_udp(echo)
        self.addCleanup(uport.stopListening)
        fport = await self.start_forwarder(f"127.0.0.1:{uport.getHost().port}", "&noudp=1")
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind(("127.0.0.1", fport))
        u.close()
        with self.assertRaises(OSError):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind(("127.0.0.1", fport))
            finally:
                s.close()

    @d
    async def test_udp_through_service(self) -> None:
        echo = UDPEcho()
        uport = listen_udp(echo)
        self.addCleanup(uport.stopListening)
        fport = await self.start_forwarder(f"127.0.0.1:{uport.getHost().port}")
        client = UDPClient()
        cport = listen_udp(client)
        self.addCleanup(cport.stopListening)
        cport.write(b"datagram", ("127.0.0.1", fport))
        self.assertEqual(await client.next(), b"datagram")
        self.assertEqual(self.service.stats.udps, 1)
        self.assertEqual((self.service.stats.udp_tx, self.service.stats.udp_rx), (8, 8))

    @d
    async def test_bind_failure_is_client_error(self) -> None:
        blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        self.addCleanup(blocker.close)
        port = blocker.getsockname()[1]
        config = parse_url(f"client://127.0.0.1:{port}/127.0.0.1:{dead_port()}?mode=1")
        log = NodeLog("info")
        lines: list[str] = []
        log.listeners.append(lambda level, line: lines.append(line))
        svc = TunnelService(config, tunables=Tunables(service_cooldown=60), log=log)
        svc.startService()
        self.addCleanup(svc.stopService)
        await wait_for(lambda: any("Client error:" in l for l in lines), what="Client error line")
        line = next(l for l in lines if "Client error:" in l)
        self.assertIn(f"cannot listen on TCP 127.0.0.1:{port}", line)
        self.assertIn("in use", line)
        self.assertFalse(svc.started.called)

    @d
    async def test_mode0_binds_locally_is_single_end(self) -> None:
        tport, _ = self.target(listen_echo())
        fport = await self.start_forwarder(f"127.0.0.1:{tport}", mode="0")
        self.assertIsInstance(self.service.runner, SingleEndRunner)
        self.assertEqual(self.service.runner.mode, 1)
        self.assertTrue(self.logged("mode=1&"))
        c = await connect(fport)
        c.transport.write(b"auto")
        self.assertEqual(await c.wait_bytes(4), b"auto")
        await close(c)

    @d
    async def test_tunnel_host_name(self) -> None:
        """A host name as tunnel host is resolved for both listeners."""
        tport, _ = self.target(listen_echo())
        echo = UDPEcho()
        uport = listen_udp(echo)
        self.addCleanup(uport.stopListening)
        port = free_port()
        config = parse_url(f"client://localhost:{port}/127.0.0.1:{tport},127.0.0.1:{uport.getHost().port}?mode=1")
        svc = TunnelService(config, tunables=Tunables(report_interval=60), log=NodeLog("none"))
        svc.startService()
        self.addCleanup(svc.stopService)
        await service_up(svc)
        c = await connect(port)
        c.transport.write(b"name")
        self.assertEqual(await c.wait_bytes(4), b"name")
        await close(c)
        u = UDPClient()
        cport = listen_udp(u)
        self.addCleanup(cport.stopListening)
        cport.write(b"udp", ("127.0.0.1", port))
        self.assertEqual(await u.next(), b"udp")

    @d
    async def test_tunnel_address_binds(self) -> None:
        busy = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        self.addCleanup(busy.close)
        taken = busy.getsockname()[1]
        free = free_port()
        self.assertFalse(await tunnel_address_binds(parse_url(f"client://127.0.0.1:{taken}/127.0.0.1:1"), reactor))
        self.assertTrue(await tunnel_address_binds(parse_url(f"client://127.0.0.1:{free}/127.0.0.1:1"), reactor))
        # A remote address cannot be bound here: dual-end.
        self.assertFalse(await tunnel_address_binds(parse_url("client://192.0.2.1:10101/127.0.0.1:1"), reactor))
        # The probe released the port.
        again = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        again.bind(("127.0.0.1", free))
        again.close()


class RelayIdleTests(unittest.TestCase):
    """``read=``: each direction has its own read deadline (as Go's relay
    sets one per copying goroutine); the relay's idle timers on a fake clock."""

    def pair(self, idle: float) -> tuple[task.Clock, Relay, RelayEnd, RelayEnd]:
        clock = task.Clock()
        target, tunnel = RelayEnd(), RelayEnd()
        target.makeConnection(StringTransport())
        tunnel.makeConnection(StringTransport())
        relay = Relay(target, tunnel, InstanceStats(), clock, idle=idle)
        relay.start()
        return clock, relay, target, tunnel

    def test_one_silent_direction_times_out(self) -> None:
        clock, relay, target, _tunnel = self.pair(10.0)
        for _ in range(3):
            clock.advance(4)
            target.dataReceived(b"x")  # only target -> tunnel moves
        self.assertEqual(relay.outcome, "i/o timeout")
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_traffic_both_ways_keeps_the_pair(self) -> None:
        clock, relay, target, tunnel = self.pair(10.0)
        for _ in range(10):
            clock.advance(4)
            target.dataReceived(b"x")
            tunnel.dataReceived(b"y")
        self.assertEqual(relay.outcome, "")
        clock.advance(10)
        self.assertEqual(relay.outcome, "i/o timeout")
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_no_idle_no_timer(self) -> None:
        clock, relay, _target, _tunnel = self.pair(0.0)
        self.assertEqual(clock.getDelayedCalls(), [])


class PauseGateTests(unittest.TestCase):
    """A relay end's transport reads only while no reason holds it paused;
    each reason is released on its own."""

    def gate(self) -> tuple[StringTransport, PauseGate]:
        transport = StringTransport()
        return transport, PauseGate(transport)

    def test_reasons_hold_independently(self) -> None:
        transport, gate = self.gate()
        gate.pause("splice")
        gate.pause("rate")
        gate.pause("rate")  # twice is once
        self.assertEqual(transport.producerState, "paused")
        gate.resume("splice")
        self.assertEqual(transport.producerState, "paused", "rate still holds it")
        gate.resume("consumer")  # never held: nothing
        self.assertEqual(transport.producerState, "paused")
        gate.resume("rate")
        self.assertEqual(transport.producerState, "producing")
        self.assertFalse(gate.paused)

    def test_release_drops_every_reason(self) -> None:
        transport, gate = self.gate()
        for reason in ("splice", "consumer", "rate", "pipe"):
            gate.pause(reason)
        gate.release()
        self.assertEqual(transport.producerState, "producing")
        self.assertFalse(gate.paused)
        gate.release()  # nothing held: nothing to resume
        self.assertEqual(transport.producerState, "producing")

    def test_producer_interface_is_the_consumer_reason(self) -> None:
        """As the peer's producer, a full peer pauses it for "consumer"."""
        transport, gate = self.gate()
        gate.pauseProducing()
        gate.pause("splice")
        gate.resumeProducing()
        self.assertEqual(transport.producerState, "paused")
        gate.resume("splice")
        self.assertEqual(transport.producerState, "producing")

    def test_unknown_reason_is_refused(self) -> None:
        transport, gate = self.gate()
        with self.assertRaises(ValueError) as e:
            gate.pause("sleepy")
        self.assertIn("sleepy", str(e.exception))
        self.assertEqual(transport.producerState, "producing")


class DialerTests(unittest.TestCase):
    """TargetGroup.dial: failover, and cancellation without failover."""

    def group(self, *ports, timeout: float = 5.0) -> TargetGroup:
        targets = [Address("127.0.0.1", p) for p in ports]
        return TargetGroup(targets, reactor, NodeLog("none"), timeout=timeout)

    @d
    async def test_cancel_stops_attempt_without_failover(self) -> None:
        hole = Blackhole()
        self.addCleanup(hole.close)
        live, factory = listen_echo()
        self.addCleanup(live.stopListening)
        dial = self.group(hole.port, _port(live)).dial(Factory.forProtocol(Client))
        await sleep(0.2)
        self.assertFalse(dial.called)
        dial.cancel()
        with self.assertRaises(defer.CancelledError):
            await dial
        await sleep(0.1)
        self.assertEqual(factory.accepted, 0)

    @d
    async def test_timeout_fails_over(self) -> None:
        hole = Blackhole()
        self.addCleanup(hole.close)
        live, factory = listen_echo()
        self.addCleanup(live.stopListening)
        proto = await self.group(hole.port, _port(live), timeout=0.2).dial(Factory.forProtocol(Client))
        self.assertEqual(proto.transport.getPeer().port, _port(live))
        await close(proto)

    @d
    async def test_cancelled_probe_dial_is_cancelled_error(self) -> None:
        """The CHECK_POINT probe's dial, cancelled at shutdown, fails as
        cancelled (not as an unreachable target)."""
        hole = Blackhole()
        self.addCleanup(hole.close)
        group = self.group(hole.port)
        probe = defer.ensureDeferred(group.connect_one(group.targets[0], Factory.forProtocol(Client)))
        await sleep(0.1)
        probe.cancel()
        with self.assertRaises(defer.CancelledError):
            await probe

    @d
    async def test_all_failed_names_count(self) -> None:
        with self.assertRaises(AllTargetsFailed) as e:
            await self.group(dead_port(), dead_port(), dead_port()).dial(Factory.forProtocol(Client))
        self.assertIn("all 3 target(s) failed", str(e.exception))


class StopDuringDialTests(ForwarderMixin, unittest.TestCase):
    @d
    async def test_stop_with_dial_in_flight(self) -> None:
        hole = Blackhole()
        self.addCleanup(hole.close)
        fport = await self.start_forwarder(f"127.0.0.1:{hole.port}")
        c = await connect(fport)
        await wait_for(lambda: self.service.stats.tcps == 1 and self.service.runner._dialing, what="dial in flight")
        started = time.monotonic()
        await self.service.stopService()
        self.assertLess(time.monotonic() - started, 2.0)
        await c.lost
        self.assertEqual(self.service.stats.tcps, 0)
