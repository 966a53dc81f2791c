"""Host names resolved without blocking the reactor.

``socket.getaddrinfo`` may wait seconds for a DNS server, and every
instance of a master shares one reactor thread: one instance's slow name
would stall them all.  So a name is looked up in the reactor's thread pool,
and only an IP literal (or no host at all) is answered on the reactor
thread -- with ``AI_NUMERICHOST``, which forbids asking any name service, so
that call cannot block (it is the same parsing ``socket.bind`` does).

Why not ``reactor.nameResolver``: Twisted's ``IHostnameResolver`` runs the
same ``getaddrinfo`` in the same thread pool, but reports a failed lookup as
an empty answer, and our error lines name the resolver's reason (``cannot
resolve host name example.invalid: Name or service not known``)."""

from __future__ import annotations

import socket
from typing import Any, Optional, Union

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool

from nodepass.config.urls import is_ip_literal

#: One answer of ``socket.getaddrinfo``: (family, type, proto, canonname, sockaddr).
AddrInfo = tuple[Any, Any, int, str, Any]

#: The blocking lookup, run in the reactor's thread pool (a test may replace
#: it with a slow one).
blocking_getaddrinfo = socket.getaddrinfo


def getaddrinfo(
    reactor: Any,
    host: Optional[str],
    port: Union[int, str, None],
    family: int = 0,
    type: int = 0,
    proto: int = 0,
    flags: int = 0,
) -> Deferred[list[AddrInfo]]:
    """``socket.getaddrinfo`` without blocking ``reactor``: fires with its
    answers, or fails with its error (``OSError``, or ``UnicodeError`` for a
    name that is not valid IDNA)."""
    if not host or is_ip_literal(host):
        try:
            return defer.succeed(socket.getaddrinfo(host or None, port, family, type, proto, flags | socket.AI_NUMERICHOST))
        except Exception:  # noqa: BLE001 - handed to the caller as a failure
            return defer.fail()
    return deferToThreadPool(
        reactor, reactor.getThreadPool(), _lookup, host, port, family, type, proto, flags
    )


def _lookup(host: str, port: Union[int, str, None], family: int, type: int, proto: int, flags: int) -> list[AddrInfo]:
    # Looked up at call time, so that a replacement takes effect.
    return blocking_getaddrinfo(host, port, family, type, proto, flags)


def prefer_ipv4(infos: list[AddrInfo]) -> list[AddrInfo]:
    """IPv4 answers first (stable), as Go's dialer tends to pick for
    dual-stack names such as ``localhost``."""
    return sorted(infos, key=lambda i: 0 if i[0] == socket.AF_INET else 1)
