"""What every mode's runner shares: the context it is built with, the
:class:`Runner` interface the tunnel service drives, and the fatal error
that makes the service restart it.  Lives below the modes so that the
service layer above can import the runners without an import circle."""

from __future__ import annotations

import abc
from typing import Any, Callable, Optional

import attrs
from twisted.internet.defer import Deferred

from nodepass.base.kinds import Wire
from nodepass.base.logs import NodeLog
from nodepass.base.stats import InstanceStats
from nodepass.config.urls import TunnelConfig, Tunables
from nodepass.relay.core import TokenBucket


class TunnelError(Exception):
    """A fatal error of a running tunnel: the service restarts after cooldown."""


@attrs.define
class WireMemo:
    """What a client learnt about its server's generation, kept by the
    service across restarts of one instance (a new runner each time)."""

    generation: Optional[Wire] = None
    announced: Optional[Wire] = None


@attrs.define
class InstanceContext:
    """What every runner needs, built once per start."""

    config: TunnelConfig
    tunables: Tunables
    # Twisted describes the reactor with zope interfaces (IReactorTCP,
    # IReactorTime, ...), which mypy cannot check calls against without the
    # mypy-zope plugin: Any, rather than ``object``, which allows no call.
    reactor: Any
    log: NodeLog
    stats: InstanceStats
    limiter: Optional[TokenBucket]
    report: Callable[[int, int], None]  # (ping_ms, pool) -> emit CHECK_POINT
    memo: WireMemo = attrs.field(factory=WireMemo)


class Runner(abc.ABC):
    """Base of the mode-specific runners.

    ``start()`` brings the mode up (raises on failure); ``failed`` fires with
    a :class:`TunnelError` (as errback) when the running mode dies; ``stop()``
    tears everything down and is safe to call at any point, twice.
    """

    mode: int = 0

    def __init__(self, ctx: InstanceContext):
        self.ctx = ctx
        self.failed: Deferred[None] = Deferred()

    def fail(self, message: str) -> None:
        if not self.failed.called:
            self.failed.errback(TunnelError(message))

    @abc.abstractmethod
    async def start(self) -> None:
        """Bring the mode up; raise to report a start failure."""

    def after_start(self) -> None:
        """Runs once the service has logged the start (or restart) line:
        lines that Go prints after it (``Pending tunnel handshake...``)."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Tear everything down; idempotent."""

    def pool_idle(self) -> int:
        return 0
