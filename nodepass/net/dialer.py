"""Target groups (SPEC §6): round robin with failover, the ``dns`` cache, and
the ``dial`` source address with its one-way fallback to automatic."""

from __future__ import annotations

import socket
from typing import Any, Callable, Optional, Sequence

from twisted.internet import defer
from twisted.internet import error as terror
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import ClientFactory, Factory
from twisted.python.failure import Failure

from nodepass.base.logs import NodeLog
from nodepass.config.urls import Address, is_ip_literal, is_unspecified
from nodepass.net.resolve import getaddrinfo, prefer_ipv4


class OneProtocolFactory(ClientFactory):
    """The factory of one given protocol, for one ``connectTCP``/``connectSSL``
    (or an endpoint's ``connect``): ``failed(reason)`` runs when the dial
    fails.

    Pool connections are dialled with it rather than through an endpoint:
    one is dialled for every relayed connection, and an endpoint would add
    its wrapping factory, wrapping protocol and Deferred to each of them.
    Not noisy: no "Starting factory" line per dial."""

    noisy = False

    def __init__(self, proto: Any, failed: Optional[Callable[[Failure], None]] = None):
        self.proto = proto
        self.failed = failed

    def buildProtocol(self, addr: Any) -> Any:
        return self.proto

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if self.failed is not None:
            self.failed(reason)


class AllTargetsFailed(Exception):
    """Every target of the group refused or timed out."""


class ResolveError(OSError):
    """A host name that does not resolve.  The message names the host:
    ``[Errno -2] Name or service not known`` alone leaves an operator
    guessing which of the instance's names is wrong."""

    def __init__(self, host: str, error: BaseException):
        why = getattr(error, "strerror", None) or str(error) or type(error).__name__
        super().__init__(f"cannot resolve host name {host}: {why}")
        self.host = host


class DNSCache:
    """Resolved addresses kept for ``ttl`` seconds; literal IPs bypass it.
    When a refresh fails, the last good address is used (SPEC §6).  Names
    are looked up in the reactor's thread pool (:mod:`nodepass.net.resolve`)."""

    def __init__(self, ttl: float, reactor: Any, family: int = 0):
        self.ttl = ttl
        self.reactor = reactor
        self._entries: dict[str, tuple[float, str]] = {}

    async def _lookup(self, host: str) -> str:
        infos = await getaddrinfo(self.reactor, host, None, 0, socket.SOCK_STREAM)
        # Prefer IPv4, as Go's dialer tends to for dual-stack loopback names.
        return str(prefer_ipv4(infos)[0][4][0])

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
            ip = await self._lookup(host)
        except (OSError, UnicodeError) as e:  # UnicodeError: not a valid IDNA name
            if cached is not None:
                return cached[1]
            raise ResolveError(host, e) from None
        self._entries[host] = (now, ip)
        return ip


def _bind_failure(exc: BaseException) -> bool:
    return isinstance(exc, (terror.ConnectBindError, terror.BindError)) or (
        isinstance(exc, terror.ConnectError) and "bind" in str(exc).lower()
    )


class TargetGroup:
    """The targets of one instance.  Each new outbound dial starts at the
    next index and fails over through the rest.

    (Not ``HostnameEndpoint``: SPEC §6 wants the ``dns`` cache with its TTL
    and last-good fallback, one address per target and failover across
    targets, where ``HostnameEndpoint`` resolves on every dial and races the
    addresses of one name.)"""

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
        # Literal IPs skip the DNS cache (and its coroutine) entirely.
        self._literal = frozenset(
            t.host for t in self.targets if is_ip_literal(t.host) and not is_unspecified(t.host)
        )

    def next_index(self) -> int:
        i = self._next % len(self.targets)
        self._next = i + 1
        return i

    def _connect(self, ip: str, port: int, factory: Factory) -> Deferred[Any]:
        """One TCP dial; fires with the connected protocol.  Cancelling it
        stops the connection attempt (no socket left connecting) and fails
        it with ``ConnectingCancelledError``.

        The endpoint is given the caller's own factory, which is quiet and
        built once: ``endpoints.connectProtocol`` makes a factory class per
        call, and a noisy one (two log events per connection) -- measured at
        about 1.5 times the CPU per dial (see "Dial path" in
        docs/benchmarks.md)."""
        bind = (self.source, 0) if self.source else None
        kind = TCP6ClientEndpoint if ":" in ip else TCP4ClientEndpoint
        endpoint = kind(self.reactor, ip, port, timeout=self.timeout, bindAddress=bind)
        return endpoint.connect(factory)  # type: ignore[arg-type]  # Factory provides IProtocolFactory; mypy cannot see zope's declarations

    def _connect_ip(self, ip: str, port: int, factory: Factory) -> Deferred[Any]:
        """:meth:`_connect` with the ``dial`` fallback (SPEC §1): when the
        source address cannot be bound, log it once and dial automatically
        from then on."""
        if not self.source:
            return self._connect(ip, port, factory)

        def fallback(failure: Failure) -> Any:
            if self.source and _bind_failure(failure.value):
                self.log.error("Dial source %s unusable (%s), falling back to auto", self.source, failure.value)
                self.source = None
                return self._connect(ip, port, factory)
            return failure

        return self._connect(ip, port, factory).addErrback(fallback)

    def dial_target(self, target: Address, factory: Factory) -> Deferred[Any]:
        """Connect to one target (resolved through the DNS cache)."""
        if target.host in self._literal:
            return self._connect_ip(target.host, target.port, factory)

        async def resolve_and_connect() -> Any:
            ip = await self.dns.resolve(target.host)
            return await self._connect_ip(ip, target.port, factory)

        return defer.ensureDeferred(resolve_and_connect())

    async def connect_one(self, target: Address, factory: Factory) -> Any:
        """:meth:`dial_target` as a coroutine; cancelled, it raises
        ``CancelledError`` (as :meth:`dial` fails)."""
        try:
            return await self.dial_target(target, factory)
        except terror.ConnectingCancelledError:
            raise CancelledError() from None

    def dial(
        self, factory: Factory, on_fail: Optional[Callable[[Address, BaseException], None]] = None
    ) -> Deferred[Any]:
        """Connect to the next target, failing over through all of them;
        fires with the connected protocol or fails with
        :class:`AllTargetsFailed` naming how many failed.  Callback style
        (no coroutine) because it runs once per relayed connection;
        cancelling it stops the attempt in progress."""
        start = self.next_index()
        n = len(self.targets)
        current: list[Optional[Deferred]] = [None]
        cancelled = [False]

        def cancel(_d: Deferred) -> None:
            cancelled[0] = True  # no failover from here on
            if current[0] is not None:
                current[0].cancel()

        result: Deferred[Any] = Deferred(cancel)

        def attempt(k: int) -> None:
            target = self.targets[(start + k) % n]
            d = current[0] = self.dial_target(target, factory)
            d.addCallbacks(succeeded, failed, errbackArgs=(k, target))

        def succeeded(proto: Any) -> None:
            current[0] = None
            if not result.called:
                result.callback(proto)
            else:  # cancelled meanwhile: nobody wants this connection
                proto.transport.loseConnection()

        def failed(failure: Failure, k: int, target: Address) -> None:
            current[0] = None
            if result.called or cancelled[0]:
                return  # cancelled
            if on_fail is not None:
                on_fail(target, failure.value)
            elif self.log.enabled("debug"):
                self.log.debug("Dial %s failed: %s", target, failure.getErrorMessage())
            if k + 1 < n:
                attempt(k + 1)
            else:
                result.errback(AllTargetsFailed(f"all {n} target(s) failed, last error: {failure.getErrorMessage()}"))

        attempt(0)
        return result

    async def resolve_next(self) -> tuple[str, int, Address]:
        """Resolve the next target (round robin) for a UDP session."""
        target = self.targets[self.next_index()]
        ip = await self.dns.resolve(target.host)
        return ip, target.port, target
