"""Small async helpers shared by the test modules: real servers and clients on
127.0.0.1 with ports from the OS.  Keep this a plain module of small,
independent helpers; every listener a helper opens is returned so the test
can close it (trial fails on a dirty reactor)."""

from __future__ import annotations

import collections
import contextlib
import gc
import hashlib
import inspect
import os
import socket
import time
import types
from typing import Any, Callable, Iterator, Optional

from twisted.internet import defer, reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import ClientFactory, DatagramProtocol, Factory, Protocol
from zope.interface import implementer

from nodepass.compat.twisted_internals import queued_bytes


def _describe(predicate: Callable[[], bool]) -> str:
    """The source line of a predicate (a lambda, usually), for messages."""
    try:
        return inspect.getsource(predicate).strip()
    except (OSError, TypeError):
        return repr(predicate)


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01, what: str = "") -> None:
    """Poll ``predicate`` until it is true; raise AssertionError naming
    ``what`` (or the predicate's source) after ``timeout`` seconds.  Only
    for conditions that have no event to await."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or _describe(predicate)}")
        await task.deferLater(reactor, interval, lambda: None)


async def until_still(value: Callable[[], Any], quiet: float = 0.3, timeout: float = 20.0, what: str = "") -> Any:
    """Wait until ``value()`` has not changed for ``quiet`` seconds and
    return it; raise AssertionError naming ``what`` if it still changes
    after ``timeout`` seconds.  For "it stopped" checks (a paused writer's
    byte count): buffers on the way may take a while to fill on a loaded
    machine, so one fixed pause is not enough."""
    deadline = time.monotonic() + timeout
    last = value()
    since = time.monotonic()
    while True:
        await task.deferLater(reactor, 0.02, lambda: None)
        now = value()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return now
        if time.monotonic() > deadline:
            raise AssertionError(f"still changing after {timeout}s: {what or _describe(value)} (last {last!r})")


class PortTaken(AssertionError):
    """A service could not bind the port it was given: something took it
    between the test choosing it and the service binding it."""


def service_up(svc, what: str = "service", timeout: float = 20.0) -> Deferred:
    """Fires with the runner once a ``TunnelService`` is up (its first run
    started).  Fails at once with :class:`PortTaken` when a start fails
    because its port is in use (the caller may choose another), and after
    ``timeout`` seconds with the service's last error; other start errors
    are retried by the service itself, so they only count towards the
    timeout."""
    d: Deferred = Deferred()
    errors: list[str] = []

    def on_status(status: str, message: str) -> None:
        if status != "error" or d.called:
            return
        errors.append(message)
        if "in use" in message:
            d.errback(PortTaken(f"{what}: {message}"))

    def on_started(runner):
        if not d.called:
            d.callback(runner)
        return runner

    def too_late(failure, seconds):
        raise AssertionError(f"{what} did not start within {seconds}s (last error: {errors[-1] if errors else 'none'})")

    def done(result):
        if on_status in svc.status_listeners:
            svc.status_listeners.remove(on_status)
        return result

    svc.status_listeners.append(on_status)
    svc.started.addCallback(on_started)
    d.addTimeout(timeout, reactor, onTimeoutCancel=too_late)
    d.addBoth(done)
    return d


async def sleep(seconds: float) -> None:
    """Let the reactor run for a while (only for 'nothing happens' checks)."""
    await task.deferLater(reactor, seconds, lambda: None)


def _ephemeral_low() -> int:
    """Lowest port the kernel hands out on its own (outgoing connections,
    binds to port 0)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _worker_index() -> int:
    """Which ``trial -jN`` worker runs this process (its working directory
    is ``_trial_temp/N``); 0 outside a worker pool."""
    here = os.getcwd()
    name, parent = os.path.basename(here), os.path.basename(os.path.dirname(here))
    if name.isdigit() and parent.startswith("_trial_temp"):
        return int(name)
    return 0


class _PortPlan:
    """Ports for listeners that must be named before they bind (a tunnel
    port in a URL, an entry port that takes TCP and UDP alike).

    A port the OS picked for a socket we then close can be handed to any
    outgoing connection on the machine before our listener binds it.  So
    these ports come from *below* the kernel's ephemeral range, where the
    kernel never picks ports itself, and each trial worker walks its own
    slice, so two workers never choose the same port.  Every candidate is
    checked free (TCP and UDP) by binding it before it is handed out; where
    the range below is too small, we fall back to the OS's choice."""

    FLOOR = 10000
    SLICES = 8

    def __init__(self) -> None:
        top = min(_ephemeral_low(), 65536)
        width = (top - self.FLOOR) // self.SLICES
        self.usable = width >= 200
        index = _worker_index() % self.SLICES
        self.low = self.FLOOR + index * width
        self.width = max(width, 1)
        self.next = (os.getpid() * 7919) % self.width

    def candidates(self):
        for _ in range(self.width):
            port = self.low + self.next
            self.next = (self.next + 1) % self.width
            yield port


_PLAN = _PortPlan()


def _bindable(family: int, kind: int, host: str, port: int) -> int:
    """Bind ``port`` (0: let the OS choose); the port bound, or 0."""
    s = socket.socket(family, kind)
    try:
        s.bind((host, port))
        return s.getsockname()[1]
    except OSError:
        return 0
    finally:
        s.close()


def free_port(host: str = "127.0.0.1") -> int:
    """A port number free for both TCP and UDP on ``host``, for listeners
    that must be told their port before they bind (see :class:`_PortPlan`).
    Listeners the test opens itself bind port 0 instead."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if _PLAN.usable:
        for port in _PLAN.candidates():
            if _bindable(family, socket.SOCK_STREAM, host, port) and _bindable(family, socket.SOCK_DGRAM, host, port):
                return port
    for _ in range(50):
        port = _bindable(family, socket.SOCK_STREAM, host, 0)
        if port and _bindable(family, socket.SOCK_DGRAM, host, port):
            return port
    raise RuntimeError("no free port")


def dead_port(host: str = "127.0.0.1") -> int:
    """A port with nothing listening (connections are refused); taken from
    the same plan as :func:`free_port`, so no outgoing connection of the
    machine and no other worker is handed it meanwhile."""
    return free_port(host)


def ipv6_available() -> bool:
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.bind(("::1", 0))
        s.close()
        return True
    except OSError:
        return False


# -- servers -------------------------------------------------------------


class _TrackingFactory(Factory):
    """Keeps the live protocols so tests can inspect and close them."""

    noisy = False

    def __init__(self, protocol_class, **attrs):
        self.protocol = protocol_class
        self.attrs = attrs
        self.connections: list[Protocol] = []
        self.accepted = 0

    def buildProtocol(self, addr):
        p = self.protocol()
        p.factory = self
        for k, v in self.attrs.items():
            setattr(p, k, v)
        self.accepted += 1
        self.connections.append(p)
        return p


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def connectionLost(self, reason) -> None:
        if self in self.factory.connections:
            self.factory.connections.remove(self)


class Sink(Protocol):
    """Records what it receives; ``done`` fires with the bytes at close."""

    def connectionMade(self) -> None:
        self.chunks: list[bytes] = []
        self.received = 0
        self.done: Deferred = Deferred()
        self.arrived: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)
        self.received += len(data)
        if not self.arrived.called:
            self.arrived.callback(None)

    def data(self) -> bytes:
        return b"".join(self.chunks)

    def connectionLost(self, reason) -> None:
        if not self.done.called:
            self.done.callback(self.data())


class Stalled(Protocol):
    """Accepts and never reads: the slowest possible receiver."""

    def connectionMade(self) -> None:
        self.transport.pauseProducing()


class Source(Protocol):
    """Sends ``payload`` (set on the factory) and closes."""

    payload = b""

    def connectionMade(self) -> None:
        self.transport.write(self.payload)
        self.transport.loseConnection()


def listen_tcp(protocol_class, host: str = "127.0.0.1", **attrs):
    """Listen on an OS-chosen port; returns ``(port_object, factory)``.
    ``port_object.getHost().port`` is the number."""
    factory = _TrackingFactory(protocol_class, **attrs)
    port = reactor.listenTCP(0, factory, interface=host)
    return port, factory


def listen_echo(host: str = "127.0.0.1"):
    return listen_tcp(Echo, host)


def listen_sink(host: str = "127.0.0.1"):
    return listen_tcp(Sink, host)


class UDPEcho(DatagramProtocol):
    """Echoes each datagram to its sender; records the senders seen."""

    def __init__(self) -> None:
        self.senders: list[tuple[str, int]] = []

    def datagramReceived(self, data: bytes, addr) -> None:
        self.senders.append(addr)
        self.transport.write(data, addr)


class UDPClient(DatagramProtocol):
    """Collects datagrams; ``next()`` waits for the next one."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self._waiters: list[Deferred] = []

    def datagramReceived(self, data: bytes, addr) -> None:
        self.received.append(data)
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            w.callback(data)

    def next(self, timeout: float = 5.0) -> Deferred:
        d: Deferred = Deferred()
        self._waiters.append(d)
        d.addTimeout(timeout, reactor)
        return d


def listen_udp(protocol: DatagramProtocol, host: str = "127.0.0.1", port: int = 0, max_packet: int = 65536):
    return reactor.listenUDP(port, protocol, interface=host, maxPacketSize=max_packet)


# -- clients -------------------------------------------------------------


class Client(Protocol):
    """A client that records everything; ``lost`` fires with the bytes."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.received = 0
        self.lost: Deferred = Deferred()
        self._want: Optional[tuple[int, Deferred]] = None

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)
        self.received += len(data)
        self._check()

    def _check(self) -> None:
        if self._want is not None and self.received >= self._want[0]:
            _, d = self._want
            self._want = None
            d.callback(self._result())

    def _result(self):
        """What ``wait_bytes`` fires with."""
        return self.data()

    def wait_bytes(self, n: int, timeout: float = 10.0) -> Deferred:
        """Fires with all data so far once at least ``n`` bytes arrived."""
        d: Deferred = Deferred()
        self._want = (n, d)
        d.addTimeout(timeout, reactor)
        self._check()
        return d

    def data(self) -> bytes:
        return b"".join(self.chunks)

    def connectionLost(self, reason) -> None:
        if self._want is not None:
            _, d = self._want
            self._want = None
            d.errback(reason)
        if not self.lost.called:
            self.lost.callback(self.data())


class HashingClient(Client):
    """Hashes what it reads instead of keeping it (for large transfers)."""

    def __init__(self) -> None:
        super().__init__()
        self.sha = hashlib.sha256()

    def dataReceived(self, data: bytes) -> None:
        self.sha.update(data)
        self.received += len(data)
        self._check()

    def _result(self) -> str:
        return self.sha.hexdigest()

    def data(self) -> bytes:
        return b""


async def connect(port: int, host: str = "127.0.0.1", protocol_class=Client, timeout: float = 5.0):
    """Open a TCP connection; returns the connected protocol."""
    d: Deferred = Deferred()

    class F(ClientFactory):
        noisy = False

        def buildProtocol(self, addr):
            p = protocol_class()
            made = p.connectionMade

            def connection_made():
                made()
                if not d.called:
                    d.callback(p)

            p.connectionMade = connection_made
            return p

        def clientConnectionFailed(self, connector, reason):
            if not d.called:
                d.errback(reason)

    reactor.connectTCP(host, port, F(), timeout=timeout)
    return await d


async def close(proto: Protocol) -> None:
    """Close a connection and wait until it is gone."""
    if proto.transport is None or not proto.transport.connected:
        return
    lost: Deferred = Deferred()
    orig = proto.connectionLost

    def connection_lost(reason):
        orig(reason)
        if not lost.called:
            lost.callback(None)

    proto.connectionLost = connection_lost
    proto.transport.loseConnection()
    await lost


@implementer(IPushProducer)
class PushSender:
    """Writes ``chunk`` repeatedly on ``transport`` for as long as the
    transport does not pause it (streaming producer), counting the bytes
    handed over.  Stops after ``limit`` bytes when given."""

    def __init__(self, transport, chunk: bytes = b"x" * 65536, limit: Optional[int] = None):
        self.transport = transport
        self.chunk = chunk
        self.limit = limit
        self.written = 0
        self.paused = False
        self.stopped = False
        self._scheduled = None
        transport.registerProducer(self, True)
        self._schedule()

    def _schedule(self) -> None:
        if self._scheduled is None and not self.paused and not self.stopped:
            self._scheduled = reactor.callLater(0, self._run)

    def _run(self) -> None:
        self._scheduled = None
        for _ in range(16):
            if self.paused or self.stopped:
                return
            if self.limit is not None and self.written >= self.limit:
                self.stopped = True
                return
            self.transport.write(self.chunk)
            self.written += len(self.chunk)
        self._schedule()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._schedule()

    def stopProducing(self) -> None:
        self.stopped = True
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        self._scheduled = None


async def stop_listening(*ports) -> None:
    for p in ports:
        if p is not None:
            await defer.maybeDeferred(p.stopListening)


def transport_buffered(transport) -> int:
    """Bytes a Twisted FileDescriptor holds in user space, not yet written."""
    return queued_bytes(transport)


class Blackhole:
    """A TCP address where connects hang (SYNs dropped): a listener with a
    full accept queue that never accepts.  ``close()`` releases it."""

    def __init__(self, host: str = "127.0.0.1"):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(0)
        self.port = self.sock.getsockname()[1]
        self.fillers = []
        for _ in range(2):
            c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            c.setblocking(False)
            c.connect_ex((host, self.port))
            self.fillers.append(c)

    def close(self) -> None:
        for c in self.fillers:
            c.close()
        self.sock.close()


class Endless(Protocol):
    """Sends for as long as the peer takes it (a ``PushSender``, paused by
    flow control); every instance is recorded in ``Endless.senders``."""

    senders: list = []

    def connectionMade(self) -> None:
        self.sender = PushSender(self.transport)
        Endless.senders.append(self.sender)

    def connectionLost(self, reason) -> None:
        self.sender.stopProducing()


# -- reference cycles -------------------------------------------------------


@contextlib.contextmanager
def collector_off() -> Iterator[None]:
    """Collect once, then keep the garbage collector off for the block, so
    that what the block leaves in reference cycles is still there for
    :func:`garbage_of_ours` to find."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def garbage_of_ours() -> list[object]:
    """Collect with ``DEBUG_SAVEALL`` and return what of nodepass's own
    objects (and of the TLS layers it runs) only the collector could free:
    objects in reference cycles, which cost a collection's worth of work
    each when they are made per connection."""
    from OpenSSL import SSL
    from twisted.internet._newtls import _BypassTLS
    from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol

    tls_types = (TLSMemoryBIOProtocol, TLSMemoryBIOFactory, SSL.Connection, _BypassTLS)

    def ours(obj: object) -> bool:
        kind = type(obj)  # (never the object's own attributes: it may be a dead weak proxy)
        module = getattr(kind, "__module__", "") or ""
        if kind is types.FunctionType:
            module = obj.__module__ or ""  # type: ignore[attr-defined]
        return module.startswith("nodepass.") or issubclass(kind, tls_types)

    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        left = [obj for obj in gc.garbage if ours(obj)]
        gc.garbage.clear()
    finally:
        gc.set_debug(0)
    return left


def garbage_names(left: list[object]) -> dict[str, int]:
    """How many of each kind :func:`garbage_of_ours` found (for a failure
    message)."""
    return dict(collections.Counter(getattr(obj, "__qualname__", type(obj).__qualname__) for obj in left))
