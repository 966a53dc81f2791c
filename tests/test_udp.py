"""UDP sessions (SPEC §5): the session listener with its pluggable backend,
the connected target socket, and single-end UDP forwarding end to end."""

from __future__ import annotations

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from nodepass.config.urls import Tunables
from nodepass.base.logs import NodeLog
from nodepass.base.stats import InstanceStats
from nodepass.base.timers import IdleTimer
from nodepass.relay.refusals import DropReport
from nodepass.relay.udp import UDPSessionListener, open_target_udp
from tests.helpers import UDPClient, UDPEcho, dead_port, listen_udp, sleep, wait_for
from tests.test_single import ForwarderMixin, d


class IdleTimerTests(unittest.TestCase):
    def test_expires_after_idle(self) -> None:
        clock = task.Clock()
        fired = []
        timer = IdleTimer(clock, 10.0, lambda: fired.append(clock.seconds()))
        clock.advance(6)
        timer.touch()
        clock.advance(6)  # 12s since start, 6s since the touch
        self.assertEqual(fired, [])
        clock.advance(4)
        self.assertEqual(fired, [16.0])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_cancel(self) -> None:
        clock = task.Clock()
        fired = []
        timer = IdleTimer(clock, 1.0, lambda: fired.append(True))
        timer.cancel()
        clock.advance(5)
        self.assertEqual(fired, [])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_zero_means_never(self) -> None:
        clock = task.Clock()
        IdleTimer(clock, 0, lambda: None)
        self.assertEqual(clock.getDelayedCalls(), [])


class _UpperBackend:
    """A session backend that answers each datagram upper-cased (stands in
    for a pool connection: the pluggable side of the API)."""

    def __init__(self, session):
        self.session = session
        self.sent: list[bytes] = []
        self.closed = 0

    def send(self, datagram: bytes) -> None:
        self.sent.append(datagram)
        self.session.reply(datagram.upper())

    def close(self) -> None:
        self.closed += 1


class SessionListenerTests(unittest.TestCase):
    def make(self, open_backend, idle: float = 30.0, slot: int = 0, count: bool = False):
        self.stats = InstanceStats(slot)
        listener = UDPSessionListener(open_backend, self.stats, reactor, NodeLog("none"), idle_timeout=idle, count_traffic=count)
        port = listen_udp(listener)
        self.addCleanup(port.stopListening)
        self.addCleanup(listener.close_all)
        client = UDPClient()
        cport = listen_udp(client)
        self.addCleanup(cport.stopListening)
        return listener, port.getHost().port, client, cport

    @d
    async def test_backend_opened_later_gets_queued_datagrams(self) -> None:
        opening: defer.Deferred = defer.Deferred()
        backends = []

        async def open_backend(session):
            await opening
            b = _UpperBackend(session)
            backends.append(b)
            return b

        listener, lport, client, cport = self.make(open_backend, count=True)
        cport.write(b"one", ("127.0.0.1", lport))
        cport.write(b"two", ("127.0.0.1", lport))
        await wait_for(lambda: self.stats.udps == 1 and self.stats.udp_rx == 6, what="datagrams queued")
        self.assertEqual(backends, [])
        opening.callback(None)
        self.assertEqual(await client.next(), b"ONE")
        await wait_for(lambda: len(client.received) == 2)
        self.assertEqual(client.received, [b"ONE", b"TWO"])
        self.assertEqual(backends[0].sent, [b"one", b"two"])
        self.assertEqual((self.stats.udp_rx, self.stats.udp_tx), (6, 6))
        (session,) = listener.sessions.values()
        self.assertEqual(session.addr, ("127.0.0.1", cport.getHost().port))
        session.close()
        session.close()
        self.assertEqual(backends[0].closed, 1)
        self.assertEqual(self.stats.udps, 0)
        self.assertEqual(listener.sessions, {})

    @d
    async def test_sync_backend_and_close_all(self) -> None:
        made = []

        def open_backend(session):
            b = _UpperBackend(session)
            made.append(b)
            return b

        listener, lport, client, cport = self.make(open_backend)
        cport.write(b"abc", ("127.0.0.1", lport))
        self.assertEqual(await client.next(), b"ABC")
        self.assertEqual(self.stats.udp_rx, 0)  # count_traffic off
        listener.close_all()
        self.assertEqual((self.stats.udps, made[0].closed), (0, 1))
        # Closed listener takes no new sessions.
        cport.write(b"late", ("127.0.0.1", lport))
        await sleep(0.05)
        self.assertEqual(self.stats.udps, 0)

    @d
    async def test_failed_open_releases_slot(self) -> None:
        async def open_backend(session):
            raise RuntimeError("no pool connection")

        listener, lport, client, cport = self.make(open_backend)
        cport.write(b"x", ("127.0.0.1", lport))
        await sleep(0.05)
        self.assertEqual((self.stats.udps, listener.sessions), (0, {}))

    @d
    async def test_slot_limit_drops_new_sources(self) -> None:
        listener, lport, client, cport = self.make(_UpperBackend, slot=1)
        other = UDPClient()
        oport = listen_udp(other)
        self.addCleanup(oport.stopListening)
        cport.write(b"first", ("127.0.0.1", lport))
        self.assertEqual(await client.next(), b"FIRST")
        oport.write(b"second", ("127.0.0.1", lport))
        await sleep(0.1)
        self.assertEqual(other.received, [])
        self.assertEqual(self.stats.udps, 1)

    @d
    async def test_idle_session_expires(self) -> None:
        made = []

        def open_backend(session):
            b = _UpperBackend(session)
            made.append(b)
            return b

        listener, lport, client, cport = self.make(open_backend, idle=0.2)
        cport.write(b"x", ("127.0.0.1", lport))
        await client.next()
        await wait_for(lambda: self.stats.udps == 0, timeout=3, what="session expiry")
        self.assertEqual(made[0].closed, 1)


class TargetUDPTests(unittest.TestCase):
    @d
    async def test_roundtrip_counts_and_close(self) -> None:
        echo = UDPEcho()
        eport = listen_udp(echo)
        self.addCleanup(eport.stopListening)
        stats = InstanceStats()
        got: defer.Deferred = defer.Deferred()
        closed = []
        t = open_target_udp(
            reactor, "127.0.0.1", eport.getHost().port, got.callback, lambda: closed.append(1), stats, NodeLog("none")
        )
        t.send(b"hello")
        self.assertEqual(await got.addTimeout(5, reactor), b"hello")
        self.assertEqual((stats.udp_tx, stats.udp_rx), (5, 5))
        t.close()
        t.close()
        self.assertEqual(closed, [1])
        await t.released
        t.send(b"ignored")  # closed: a no-op, not an error

    @d
    async def test_idle_timeout(self) -> None:
        closed: defer.Deferred = defer.Deferred()
        t = open_target_udp(
            reactor,
            "127.0.0.1",
            dead_port(),
            lambda data: None,
            lambda: closed.callback(None),
            InstanceStats(),
            NodeLog("none"),
            idle_timeout=0.1,
        )
        await closed.addTimeout(5, reactor)
        await t.released

    @d
    async def test_refused_target_closes(self) -> None:
        closed: defer.Deferred = defer.Deferred()
        t = open_target_udp(
            reactor, "127.0.0.1", dead_port(), lambda data: None, lambda: closed.callback(None), InstanceStats(), NodeLog("none")
        )
        self.addCleanup(t.close)
        # Loopback answers ICMP port unreachable; a second send sees it.
        for _ in range(20):
            t.send(b"anyone?")
            if closed.called:
                break
            await sleep(0.02)
        await closed.addTimeout(5, reactor)
        await t.released


class SingleEndUDPTests(ForwarderMixin, unittest.TestCase):
    @d
    async def test_two_sources_kept_apart(self) -> None:
        echo = UDPEcho()
        eport = listen_udp(echo)
        self.addCleanup(eport.stopListening)
        fport = await self.start_forwarder(f"127.0.0.1:{eport.getHost().port}")
        a, b = UDPClient(), UDPClient()
        aport, bport = listen_udp(a), listen_udp(b)
        self.addCleanup(aport.stopListening)
        self.addCleanup(bport.stopListening)
        for i in range(3):
            aport.write(b"from-a-%d" % i, ("127.0.0.1", fport))
            bport.write(b"from-b-%d" % i, ("127.0.0.1", fport))
            await defer.gatherResults([a.next(), b.next()])
        self.assertEqual(a.received, [b"from-a-%d" % i for i in range(3)])
        self.assertEqual(b.received, [b"from-b-%d" % i for i in range(3)])
        # Two sessions, each its own socket towards the target.
        self.assertEqual(len(set(echo.senders)), 2)
        self.assertEqual(self.service.stats.udps, 2)
        total = sum(len(x) for x in a.received + b.received)
        self.assertEqual((self.service.stats.udp_tx, self.service.stats.udp_rx), (total, total))

    @d
    async def test_session_expires_after_idle_timeout(self) -> None:
        echo = UDPEcho()
        eport = listen_udp(echo)
        self.addCleanup(eport.stopListening)
        fport = await self.start_forwarder(
            f"127.0.0.1:{eport.getHost().port}", tunables=Tunables(udp_read_timeout=0.3, report_interval=60)
        )
        c = UDPClient()
        cport = listen_udp(c)
        self.addCleanup(cport.stopListening)
        cport.write(b"one", ("127.0.0.1", fport))
        await c.next()
        stats = self.service.stats
        self.assertEqual(stats.udps, 1)
        await sleep(0.15)
        self.assertEqual(stats.udps, 1)
        await wait_for(lambda: stats.udps == 0, timeout=3, what="session expiry")
        self.assertEqual(self.service.runner._udp_targets, set())
        # A new datagram opens a new session with a new socket.
        cport.write(b"two", ("127.0.0.1", fport))
        self.assertEqual(await c.next(), b"two")
        self.assertEqual(len(set(echo.senders)), 2)

    @d
    async def test_large_datagram(self) -> None:
        echo = UDPEcho()
        eport = listen_udp(echo)
        self.addCleanup(eport.stopListening)
        fport = await self.start_forwarder(f"127.0.0.1:{eport.getHost().port}")
        c = UDPClient()
        cport = listen_udp(c)
        self.addCleanup(cport.stopListening)
        payload = bytes(range(256)) * 48  # 12288 bytes, above Twisted's 8192 default
        cport.write(payload, ("127.0.0.1", fport))
        self.assertEqual(await c.next(), payload)

    @d
    async def test_dial_source_and_fallback(self) -> None:
        echo = UDPEcho()
        eport = listen_udp(echo)
        self.addCleanup(eport.stopListening)
        fport = await self.start_forwarder(f"127.0.0.1:{eport.getHost().port}", "&dial=127.0.0.2")
        c = UDPClient()
        cport = listen_udp(c)
        self.addCleanup(cport.stopListening)
        cport.write(b"src", ("127.0.0.1", fport))
        await c.next()
        self.assertEqual(echo.senders[0][0], "127.0.0.2")

    @d
    async def test_unbindable_dial_source_falls_back(self) -> None:
        echo = UDPEcho()
        eport = listen_udp(echo)
        self.addCleanup(eport.stopListening)
        fport = await self.start_forwarder(f"127.0.0.1:{eport.getHost().port}", "&dial=192.0.2.55")
        c = UDPClient()
        cport = listen_udp(c)
        self.addCleanup(cport.stopListening)
        cport.write(b"fb", ("127.0.0.1", fport))
        self.assertEqual(await c.next(), b"fb")
        self.assertTrue(self.logged("Dial source 192.0.2.55 unusable"))
        self.assertEqual(echo.senders[0][0], "127.0.0.1")


class DropReportTests(unittest.TestCase):
    """Slot-limit refusals: a summary line per report interval, not one
    line per refusal (a flood of ERROR lines hides everything else, and a
    log written faster than its reader takes it stalls the reactor)."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.log = NodeLog("info")
        self.lines: list[str] = []
        self.log.listeners.append(lambda level, line: self.lines.append(line))

    def test_datagrams_summed_per_interval(self) -> None:
        report = DropReport(self.clock, self.log, 5.0)
        for i in range(100):
            self.assertFalse(report.drop(4, f"10.0.0.{i}:53"))
        self.assertEqual(self.lines, [])
        self.clock.advance(5.0)
        self.assertEqual(len(self.lines), 1)
        self.assertIn("UDP slot limit reached (4), dropped 100 datagrams in the last 5s (the last from 10.0.0.99:53)", self.lines[0])
        self.clock.advance(5.0)  # quiet: nothing more, and the timer ends
        self.assertEqual(len(self.lines), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_first_refusal_alone_then_one_summary(self) -> None:
        report = DropReport(self.clock, self.log, 5.0, "connections", kind="TCP", verb="refused", first_alone=True)
        self.assertTrue(report.drop(20, "1.2.3.4:1"))  # the caller logs this one
        for i in range(2183):
            self.assertFalse(report.drop(20, f"1.2.3.4:{i + 2}"))
        self.clock.advance(5.0)
        self.assertEqual(len(self.lines), 1)
        self.assertIn("TCP slot limit reached (20), refused 2183 more connections in the last 5s (the last from 1.2.3.4:2184)", self.lines[0])
        self.clock.advance(5.0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertTrue(report.drop(20, "1.2.3.4:9"))  # a quiet period later: alone again
        report.close()  # nothing counted after it: no summary at close
        self.assertEqual(len(self.lines), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_close_reports_what_is_counted(self) -> None:
        report = DropReport(self.clock, self.log, 5.0, "connections", kind="TCP", verb="refused", first_alone=True)
        report.drop(3, "a:1")
        report.drop(3, "a:2")
        report.close()
        self.assertEqual(len(self.lines), 1)
        self.assertIn("TCP slot limit reached (3), refused 1 more connections in the last 0s (the last from a:2)", self.lines[0])
