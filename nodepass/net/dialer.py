"""Target groups (SPEC §6): round robin with failover, the ``dns`` cache, and
the ``dial`` source address with its one-way fallback to automatic."""

from __future__ import annotations

import socket
from typing import Any, Callable, Optional, Sequence

from twisted.internet import defer
from twisted.internet import error as terror
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import ClientFactory, Factory
from twisted.python.failure import Failure

from nodepass.base.logs import NodeLog
from nodepass.compat.twisted_fastpath import lean_connect
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

    def cached(self, host: str) -> Optional[str]:
        """The address of ``host`` when the cache holds a fresh one, else
        None: a dial to a name takes this path at every connection, without
        the coroutine and Deferred of :meth:`resolve` (a tenth of the
        requests per second through a tunnel to ``localhost:PORT``)."""
        entry = self._entries.get(host)
        if entry is not None and self.reactor.seconds() - entry[0] < self.ttl:
            return entry[1]
        return None

    async def resolve(self, host: str) -> str:
        if host == "" or is_unspecified(host):
            return "127.0.0.1" if ":" not in host else "::1"
        if is_ip_literal(host):
            return host
        fresh = self.cached(host)
        if fresh is not None:
            return fresh
        now = self.reactor.seconds()
        try:
            ip = await self._lookup(host)
        except (OSError, UnicodeError) as e:  # UnicodeError: not a valid IDNA name
            last = self._entries.get(host)
            if last is not None:
                return last[1]
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
        #: The address given to the factory for each (ip, port) dialled.
        self._addresses: dict[tuple[str, int], Any] = {}
        # Literal IPs skip the DNS cache (and its coroutine) entirely.
        self._literal = frozenset(
            t.host for t in self.targets if is_ip_literal(t.host) and not is_unspecified(t.host)
        )

    def next_index(self) -> int:
        i = self._next % len(self.targets)
        self._next = i + 1
        return i

    def connect(
        self,
        factory: Factory,
        done: Callable[[Any], None],
        failed: Callable[[Failure], None],
        on_fail: Optional[Callable[[Address, BaseException], None]] = None,
        targets: Optional[Sequence[Address]] = None,
    ) -> "GroupDial":
        """Connect to the next target, failing over through all of them
        (or through ``targets``, in order): ``done(protocol)`` once one is
        connected (after the protocol's ``connectionMade``), else
        ``failed(failure)`` with :class:`AllTargetsFailed` naming how many
        failed.  Callback style (no Deferred) because it runs once per
        relayed connection; either callback may run before this returns.
        ``cancel()`` on the result stops the attempt in progress (then
        neither runs)."""
        return GroupDial(self, factory, done, failed, on_fail, targets)

    def dial(
        self, factory: Factory, on_fail: Optional[Callable[[Address, BaseException], None]] = None
    ) -> Deferred[Any]:
        """:meth:`connect` as a Deferred; cancelling it stops the attempt in
        progress (no failover) and fails it with ``CancelledError``."""
        handle: list[GroupDial] = []
        result: Deferred[Any] = Deferred(lambda _d: handle[0].cancel() if handle else None)

        def done(proto: Any) -> None:
            if not result.called:
                result.callback(proto)
            else:  # cancelled meanwhile: nobody wants this connection
                proto.transport.loseConnection()

        def failed(failure: Failure) -> None:
            if not result.called:
                result.errback(failure)

        handle.append(self.connect(factory, done, failed, on_fail))
        return result

    def dial_target(self, target: Address, factory: Factory) -> Deferred[Any]:
        """Connect to one target (resolved through the DNS cache); fires
        with the connected protocol, or fails with the connect error
        (``CancelledError`` when cancelled)."""
        handle: list[GroupDial] = []
        result: Deferred[Any] = Deferred(lambda _d: handle[0].cancel() if handle else None)

        def done(proto: Any) -> None:
            if not result.called:
                result.callback(proto)
            else:
                proto.transport.loseConnection()

        def failed(failure: Failure) -> None:
            if not result.called:
                result.errback(failure)

        handle.append(GroupDial(self, factory, done, failed, None, [target], single=True))
        return result

    async def connect_one(self, target: Address, factory: Factory) -> Any:
        """:meth:`dial_target` as a coroutine; cancelled, it raises
        ``CancelledError`` (as :meth:`dial` fails)."""
        try:
            return await self.dial_target(target, factory)
        except (terror.ConnectingCancelledError, CancelledError):
            raise CancelledError() from None

    async def resolve_next(self) -> tuple[str, int, Address]:
        """Resolve the next target (round robin) for a UDP session."""
        target = self.targets[self.next_index()]
        ip = await self.dns.resolve(target.host)
        return ip, target.port, target


class GroupDial:
    """One dial through a :class:`TargetGroup` (see :meth:`TargetGroup.connect`).

    Each target is dialled with :func:`lean_connect`: the connection is a
    Twisted transport whose protocol comes from the caller's factory, made
    in this reactor turn.  Host names go through the DNS cache first; the
    ``dial`` source address falls back to automatic (SPEC §1) when it cannot
    be bound, logged once."""

    __slots__ = ("group", "factory", "done", "failed", "on_fail", "targets", "start", "k", "current", "over", "single")

    def __init__(
        self,
        group: TargetGroup,
        factory: Factory,
        done: Callable[[Any], None],
        failed: Callable[[Failure], None],
        on_fail: Optional[Callable[[Address, BaseException], None]],
        targets: Optional[Sequence[Address]] = None,
        single: bool = False,
    ):
        self.group = group
        self.factory = factory
        self.done = done
        self.failed = failed
        self.on_fail = on_fail
        self.single = single
        if targets is None:
            self.targets: Sequence[Address] = group.targets
            self.start = group.next_index()
        else:
            self.targets = targets
            self.start = 0
        self.k = 0
        #: The attempt in progress: a lean dial, or a DNS lookup's Deferred.
        self.current: Any = None
        self.over = False
        self._attempt()

    def cancel(self) -> None:
        """Stop the attempt in progress; no failover, no callback."""
        if self.over:
            return
        self.over = True
        current, self.current = self.current, None
        if current is not None:
            current.cancel()

    def _attempt(self) -> None:
        targets = self.targets
        target = targets[(self.start + self.k) % len(targets)]
        group = self.group
        if target.host in group._literal:
            self._dial_ip(target.host, target.port)
            return
        ip = group.dns.cached(target.host)
        if ip is not None:
            self._dial_ip(ip, target.port)
            return
        d = defer.ensureDeferred(group.dns.resolve(target.host))
        self.current = d
        d.addCallbacks(self._resolved, self._one_failed, callbackArgs=(target.port,))

    def _resolved(self, ip: str, port: int) -> None:
        self.current = None
        if not self.over:
            self._dial_ip(ip, port)

    def _dial_ip(self, ip: str, port: int) -> None:
        group = self.group
        key = (ip, port)
        addr: Any = group._addresses.get(key)
        if addr is None:
            if len(group._addresses) >= 256:
                group._addresses.clear()  # names that resolve anew: keep it small
            addr = group._addresses[key] = IPv6Address("TCP", ip, port) if ":" in ip else IPv4Address("TCP", ip, port)
        proto = self.factory.buildProtocol(addr)
        if proto is None:
            self._one_failed(Failure(terror.ConnectError(string="the factory built no protocol")))
            return
        source = group.source
        handle = lean_connect(
            group.reactor,
            ip,
            port,
            proto,
            self._connected,
            lambda failure: self._ip_failed(failure, ip, port, source),
            timeout=group.timeout,
            bind=(source, 0) if source else None,
        )
        if handle is not None:
            self.current = handle

    def _ip_failed(self, failure: Failure, ip: str, port: int, source: Optional[str]) -> None:
        group = self.group
        if source and group.source == source and not self.over and _bind_failure(failure.value):
            group.log.error("Dial source %s unusable (%s), falling back to auto", source, failure.value)
            group.source = None
            self.current = None
            self._dial_ip(ip, port)
            return
        self._one_failed(failure)

    def _connected(self, proto: Any) -> None:
        self.current = None
        if self.over:  # cancelled meanwhile: nobody wants this connection
            proto.transport.loseConnection()
            return
        self.over = True
        self.done(proto)

    def _one_failed(self, failure: Failure) -> None:
        self.current = None
        if self.over:
            return  # cancelled
        if self.single:
            self.over = True
            self.failed(failure)
            return
        targets = self.targets
        target = targets[(self.start + self.k) % len(targets)]
        group = self.group
        if self.on_fail is not None:
            self.on_fail(target, failure.value)
        elif group.log.enabled("debug"):
            group.log.debug("Dial %s failed: %s", target, failure.getErrorMessage())
        self.k += 1
        if self.k < len(targets):
            self._attempt()
            return
        self.over = True
        n = len(targets)
        self.failed(Failure(AllTargetsFailed(f"all {n} target(s) failed, last error: {failure.getErrorMessage()}")))
