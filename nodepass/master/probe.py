"""``GET /tcping``: one TCP connect to ``host:port``, timed, with at most a
few probes in flight at once."""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IProtocolFactory

from nodepass.config.urls import URLError, split_host_port
from nodepass.master.errors import InvalidTarget

TCPING_LIMIT = 10
TCPING_QUEUE_WAIT = 1.0


class _Probe(protocol.Protocol):
    def connectionMade(self) -> None:
        # Connected is the whole answer: drop the connection at once.
        transport: Any = self.transport  # a TCP transport (ITCPTransport)
        transport.abortConnection()


class _ProbeFactory(protocol.ClientFactory):
    protocol = _Probe
    noisy = False


async def probe(reactor: Any, target: str, timeout: float, result: dict[str, Any]) -> dict[str, Any]:
    """Fill ``result`` (``connected``, ``latency`` ms, ``error``) for one
    connect to ``target``.  Raises ``URLError`` for a malformed target."""
    host, port = split_host_port(target)
    if not host:
        raise URLError(f"invalid address {target!r}: missing host")
    try:
        endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout or 5)
    except ValueError as e:  # a host name IDNA cannot encode (UnicodeError is one)
        raise URLError(f"invalid address {target!r}: {e}") from None
    started = time.monotonic()
    try:
        await endpoint.connect(IProtocolFactory(_ProbeFactory()))
    except Exception as e:  # noqa: BLE001 - any failure is the answer
        result["error"] = str(e.__class__.__name__ if not str(e) else e)
        return result
    result["connected"] = True
    result["latency"] = max(int(round((time.monotonic() - started) * 1000)), 0)
    return result


class TCPing:
    """Probes for the master: ``limit`` at once, so the API cannot be turned
    into a connection flood; one more waits up to ``queue_wait`` seconds for
    a free slot and is otherwise answered ``"too many requests"`` (a result,
    not a refusal, as Go's master answers)."""

    def __init__(self, reactor: Any, timeout: float, limit: int = TCPING_LIMIT, queue_wait: float = TCPING_QUEUE_WAIT) -> None:
        self.reactor = reactor
        self.timeout = timeout
        self.slots = defer.DeferredSemaphore(limit)
        self.queue_wait = queue_wait

    async def __call__(self, target: str) -> dict[str, Any]:
        """The probe's result; raises :class:`InvalidTarget` for a target
        that is not ``host:port``."""
        result: dict[str, Any] = {"target": target, "connected": False, "latency": 0, "error": None}
        acquired = self.slots.acquire()
        if not acquired.called:
            timer = self.reactor.callLater(self.queue_wait, acquired.cancel)
            try:
                await acquired
            except defer.CancelledError:
                result["error"] = "too many requests"
                return result
            if timer.active():
                timer.cancel()
        try:
            return await probe(self.reactor, target, self.timeout, result)
        except URLError as e:
            raise InvalidTarget(f"Invalid target address: {e}") from None
        finally:
            self.slots.release()
