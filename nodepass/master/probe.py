"""``GET /tcping``: one TCP connect to ``host:port``, timed."""

from __future__ import annotations

import time

from twisted.internet import protocol
from twisted.internet.endpoints import HostnameEndpoint

from nodepass.config.urls import URLError, split_host_port


class _Probe(protocol.Protocol):
    def connectionMade(self) -> None:
        self.transport.abortConnection()


class _ProbeFactory(protocol.ClientFactory):
    protocol = _Probe
    noisy = False


async def probe(reactor, target: str, timeout: float, result: dict) -> dict:
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
        await endpoint.connect(_ProbeFactory())
    except Exception as e:  # noqa: BLE001 - any failure is the answer
        result["error"] = str(e.__class__.__name__ if not str(e) else e)
        return result
    result["connected"] = True
    result["latency"] = max(int(round((time.monotonic() - started) * 1000)), 0)
    return result
