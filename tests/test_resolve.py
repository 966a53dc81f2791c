"""Host names are resolved off the reactor thread.

Every instance of a master shares one reactor: a ``getaddrinfo`` that waits
on a slow DNS server there would stall all of them.  These tests put a slow
resolver in place of the system's (it sleeps in whatever thread calls it)
and show that the reactor keeps running a timer while a name is resolved --
for the single-end probe of the tunnel address, the listen address, and the
targets' DNS cache -- and that IP literals never reach the resolver."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from twisted.internet import reactor, task
from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest

from nodepass.base.logs import NodeLog
from nodepass.config.urls import Tunables, parse_url
from nodepass.modes.single import tunnel_address_binds
from nodepass.net import resolve
from nodepass.config.urls import Address
from nodepass.net.dialer import DNSCache, ResolveError, TargetGroup
from nodepass.service.instance import TunnelService
from tests.helpers import close, connect, free_port, listen_echo, service_up
from tests.test_single import d

SLOW = 0.4  # seconds a lookup of a name takes
TICK = 0.01  # the timer that must keep running meanwhile


class SlowResolver:
    """Stands in for ``socket.getaddrinfo``: ``*.example`` names resolve to
    127.0.0.1 after ``SLOW`` seconds, ``*.invalid`` fail after as long;
    records when each lookup ran and in which thread."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float, float, int]] = []

    def __call__(self, host: str, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0) -> list:
        started = time.monotonic()
        time.sleep(SLOW)
        self.calls.append((host, started, time.monotonic(), threading.get_ident()))
        if host.endswith(".invalid"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", port or 0))]


class ResolveTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.resolver = SlowResolver()
        self.patch(resolve, "blocking_getaddrinfo", self.resolver)
        self.ticks: list[float] = []
        loop = task.LoopingCall(lambda: self.ticks.append(time.monotonic()))
        loop.start(TICK)
        self.addCleanup(loop.stop)

    def assert_reactor_ran_during_lookups(self) -> None:
        """Each lookup ran outside the reactor thread, and the timer kept
        ticking while it slept."""
        self.assertTrue(self.resolver.calls, "nothing was resolved")
        for host, started, ended, thread in self.resolver.calls:
            self.assertNotEqual(thread, threading.get_ident(), f"{host} was resolved on the reactor thread")
            during = [t for t in self.ticks if started < t < ended]
            # SLOW / TICK = 40 ticks if nothing waits; a loaded machine gets fewer.
            self.assertGreaterEqual(len(during), 5, f"the reactor stalled while {host} was resolved")


class ResolveTests(ResolveTestCase):
    @d
    async def test_name_resolved_in_a_thread(self) -> None:
        infos = await resolve.getaddrinfo(reactor, "slow.example", 80, 0, socket.SOCK_STREAM)
        self.assertEqual(infos[0][4], ("127.0.0.1", 80))
        self.assert_reactor_ran_during_lookups()

    @d
    async def test_failure_is_the_resolvers(self) -> None:
        with self.assertRaises(socket.gaierror) as caught:
            await resolve.getaddrinfo(reactor, "nowhere.invalid", 80)
        self.assertEqual(caught.exception.strerror, "Name or service not known")
        self.assert_reactor_ran_during_lookups()

    def test_literals_never_reach_the_resolver(self) -> None:
        for host in ("127.0.0.1", "::1", None, ""):
            d = resolve.getaddrinfo(reactor, host, 80, 0, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
            self.assertTrue(d.called, f"{host!r} waited for an answer")
            self.assertTrue(self.successResultOf(d))
        self.assertEqual(self.resolver.calls, [])

    def test_bad_literal_fails_at_once(self) -> None:
        d = resolve.getaddrinfo(reactor, "::1", "no-such-service", 0, socket.SOCK_STREAM)
        self.failureResultOf(d, socket.gaierror)
        self.assertEqual(self.resolver.calls, [])


class DNSCacheTests(ResolveTestCase):
    @d
    async def test_target_name_resolved_in_a_thread(self) -> None:
        cache = DNSCache(60.0, reactor)
        self.assertEqual(await cache.resolve("slow.example"), "127.0.0.1")
        self.assert_reactor_ran_during_lookups()
        self.assertEqual(await cache.resolve("slow.example"), "127.0.0.1")  # cached
        self.assertEqual(len(self.resolver.calls), 1)

    @d
    async def test_fresh_name_dials_at_once(self) -> None:
        """A target name the cache holds fresh is dialled from the cache
        (``DNSCache.cached``, the path of every connection of a tunnel to
        ``localhost:PORT``) without another lookup; a stale one is looked up
        again."""
        echo, _ = listen_echo()
        self.addCleanup(echo.stopListening)
        clock_offset = [0.0]

        class Later:
            """The reactor, with its clock moved on by ``clock_offset``."""

            def __getattr__(self, name: str) -> Any:
                return getattr(reactor, name)

            def seconds(self) -> float:
                return reactor.seconds() + clock_offset[0]

        group = TargetGroup([Address("slow.example", echo.getHost().port)], Later(), NodeLog("none"), dns_ttl=60.0)
        factory = Factory.forProtocol(Protocol)
        first = await group.dial(factory)
        first.transport.loseConnection()
        self.assertEqual(len(self.resolver.calls), 1)
        self.assertEqual(group.dns.cached("slow.example"), "127.0.0.1")
        connected: list[Any] = []
        group.connect(factory, connected.append, lambda f: connected.append(f))
        await wait_until(lambda: connected)
        self.assertIsInstance(connected[0], Protocol)
        connected[0].transport.loseConnection()
        self.assertEqual(len(self.resolver.calls), 1)
        clock_offset[0] = 61.0  # past the TTL
        self.assertIsNone(group.dns.cached("slow.example"))
        again = await group.dial(factory)
        again.transport.loseConnection()
        self.assertEqual(len(self.resolver.calls), 2)

    @d
    async def test_unresolved_name_is_named(self) -> None:
        with self.assertRaises(ResolveError) as caught:
            await DNSCache(60.0, reactor).resolve("nowhere.invalid")
        self.assertEqual(str(caught.exception), "cannot resolve host name nowhere.invalid: Name or service not known")


class SingleEndTests(ResolveTestCase):
    @d
    async def test_tunnel_address_probe(self) -> None:
        port = free_port()
        self.assertTrue(await tunnel_address_binds(parse_url(f"client://slow.example:{port}/127.0.0.1:1"), reactor))
        self.assertFalse(await tunnel_address_binds(parse_url(f"client://nowhere.invalid:{port}/127.0.0.1:1"), reactor))
        self.assert_reactor_ran_during_lookups()

    @d
    async def test_forwarder_on_a_slow_name(self) -> None:
        """``mode=0`` on a name: the probe and the listeners resolve it
        without stalling the reactor, and the forwarder works."""
        echo, _ = listen_echo()
        self.addCleanup(echo.stopListening)
        port = free_port()
        url = f"client://slow.example:{port}/127.0.0.1:{echo.getHost().port}?mode=0"
        svc = TunnelService(parse_url(url), tunables=Tunables(report_interval=60), log=NodeLog("none"))
        svc.startService()
        self.addCleanup(svc.stopService)
        runner = await service_up(svc, "single-end forwarder")
        self.assertEqual(runner.mode, 1)
        self.assertEqual([call[0] for call in self.resolver.calls], ["slow.example", "slow.example"])
        self.assert_reactor_ran_during_lookups()
        c = await connect(port)
        c.transport.write(b"hello")
        self.assertEqual(await c.wait_bytes(5), b"hello")
        await close(c)


async def wait_until(predicate: Any) -> None:
    from tests.helpers import wait_for

    await wait_for(predicate, timeout=10, what="the dial's outcome")
