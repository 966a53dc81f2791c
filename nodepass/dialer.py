"""Target groups (SPEC §6): round robin with failover, the ``dns`` cache, and
the ``dial`` source address with its one-way fallback to automatic."""

from __future__ import annotations

import socket
from typing import Callable, Optional, Sequence

from twisted.internet import defer
from twisted.internet import error as terror
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.threads import deferToThreadPool

from nodepass.config import Address, is_ip_literal, is_unspecified
from nodepass.logs import NodeLog


class AllTargetsFailed(Exception):
    """Every target of the group refused or timed out."""


class DNSCache:
    """Resolved addresses kept for ``ttl`` seconds; literal IPs bypass it.
    When a refresh fails, the last good address is used (SPEC §6)."""

    def __init__(self, ttl: float, reactor, family: int = 0):
        self.ttl = ttl
        self.reactor = reactor
        self._entries: dict[str, tuple[float, str]] = {}

    def _lookup(self, host: str) -> str:
        infos = socket.getaddrinfo(host, None, 0, socket.SOCK_STREAM)
        # Prefer IPv4, as Go's dialer tends to for dual-stack loopback names.
        infos.sort(key=lambda i: 0 if i[0] == socket.AF_INET else 1)
        return infos[0][4][0]

    async def resolve(self, host: str) -> str:
        if host == "" or is_unspecified(host):
            return "127.0.0.1" if ":" not in host else "::1"
        if is_ip_literal(host):
            return host
        now = self.reactor.seconds()
        cached = self._entries.get(host)
        if cached is not None and now - cached[0] < self.ttl:
            return cached[1]
        try:
            ip = await deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self._lookup, host)
        except OSError:
            if cached is not None:
                return cached[1]
            raise
        self._entries[host] = (now, ip)
        return ip


def _bind_failure(exc: BaseException) -> bool:
    return isinstance(exc, (terror.ConnectBindError, terror.BindError)) or (
        isinstance(exc, terror.ConnectError) and "bind" in str(exc).lower()
    )


class TargetGroup:
    """The targets of one instance.  Each new outbound dial starts at the
    next index and fails over through the rest."""

    def __init__(
        self,
        targets: Sequence[Address],
        reactor,
        log: NodeLog,
        dns_ttl: float = 300.0,
        dial: str = "auto",
        timeout: float = 5.0,
    ):
        self.targets = list(targets)
        self.reactor = reactor
        self.log = log
        self.dns = DNSCache(dns_ttl, reactor)
        self.source = None if dial == "auto" else dial
        self.timeout = timeout
        self._next = 0

    def next_index(self) -> int:
        i = self._next % len(self.targets)
        self._next = i + 1
        return i

    def _connect(self, ip: str, port: int, factory: Factory) -> Deferred:
        connector = None

        def cancel(_d: Deferred) -> None:
            # Cancelling a dial (e.g. at shutdown) must not leave a socket
            # connecting in the reactor.
            if connector is not None:
                connector.stopConnecting()

        d = Deferred(cancel)

        class _Wrap(ClientFactory):
            def buildProtocol(self_inner, addr):
                proto = factory.buildProtocol(addr)
                orig = proto.connectionMade

                def made():
                    orig()
                    if not d.called:
                        d.callback(proto)

                proto.connectionMade = made
                return proto

            def clientConnectionFailed(self_inner, connector, reason):
                if not d.called:
                    d.errback(reason)

        bind = (self.source, 0) if self.source else None
        connector = self.reactor.connectTCP(ip, port, _Wrap(), timeout=self.timeout, bindAddress=bind)
        return d

    async def connect_one(self, target: Address, factory: Factory) -> Protocol:
        ip = await self.dns.resolve(target.host)
        try:
            return await self._connect(ip, target.port, factory)
        except defer.CancelledError:
            raise
        except Exception as e:
            if self.source and _bind_failure(e):
                self.log.error("Dial source %s unusable (%s), falling back to auto", self.source, e)
                self.source = None
                return await self._connect(ip, target.port, factory)
            raise

    async def connect(self, factory: Factory, on_fail: Optional[Callable[[Address, Exception], None]] = None) -> Protocol:
        """Connect to the next target, failing over through all of them.
        Raises :class:`AllTargetsFailed` naming how many failed."""
        start = self.next_index()
        n = len(self.targets)
        last: Optional[Exception] = None
        for k in range(n):
            target = self.targets[(start + k) % n]
            try:
                return await self.connect_one(target, factory)
            except defer.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - every failure means "try the next"
                last = e
                if on_fail is not None:
                    on_fail(target, e)
                else:
                    self.log.debug("Dial %s failed: %s", target, e)
        raise AllTargetsFailed(f"all {n} target(s) failed, last error: {last}")

    async def resolve_next(self) -> tuple[str, int, Address]:
        """Resolve the next target (round robin) for a UDP session."""
        target = self.targets[self.next_index()]
        ip = await self.dns.resolve(target.host)
        return ip, target.port, target
