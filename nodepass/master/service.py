"""The master (``master://``) as a Twisted service: a REST API, SSE and
durable state in front of many tunnel instances.

Tree with ``workers=0`` (everything in one reactor)::

    MasterService (MultiService)
      ├── the HTTP(S) listener (owned directly: its bound port is needed)
      └── TunnelService per running instance (added on start, removed on stop)

With ``workers=N`` (the default: one per core) the instances run in ``N``
worker processes instead (:mod:`nodepass.workers`), and the master's
reactor serves only the API, SSE and state.

The parts, each in its own module:

* :class:`~nodepass.master.domain.Master` -- what the master does
  (instances, identity, state file), raising domain errors;
* :class:`~nodepass.master.api.MasterAPI` -- the Klein app mapping HTTP to
  it, and domain errors to statuses;
* :class:`~nodepass.master.events.EventHub` -- the SSE streams.

This service owns them and their order: load the state, listen, start the
instances, run the periodic reload and counter saves; and in reverse at
stop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Union

from twisted.application import service
from twisted.internet import task
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IOpenSSLContextFactory, IProtocolFactory
from zope.interface import implementer

from nodepass.base.logs import UNENCRYPTED_LINE, NodeLog
from nodepass.config.urls import MasterConfig, Tunables
from nodepass.master import sysinfo
from nodepass.master.api import MasterAPI
from nodepass.master.domain import Master
from nodepass.master.events import EventHub
from nodepass.master.records import InstanceRecord
from nodepass.master.site import MasterSite
from nodepass.master.store import StateStore
from nodepass.master.lifecycle import Run
from nodepass.workers.pool import WorkerPool

if TYPE_CHECKING:
    from OpenSSL.SSL import Context

    from nodepass.net.tls import ServerCredentials


@implementer(IOpenSSLContextFactory)
class _ReloadingContext:
    """Old-style context factory asking the credentials for each new
    connection, so a ``tls=2`` certificate renewed on disk is picked up."""

    def __init__(self, credentials: ServerCredentials) -> None:
        self.credentials = credentials

    def getContext(self) -> Context:
        return self.credentials.context_factory().getContext()


class MasterService(service.MultiService):
    """See the module docstring.  ``ready`` fires (with the service) once the
    API listens; ``port``, ``api_key`` and ``base_url`` are valid from then."""

    def __init__(
        self,
        config: MasterConfig,
        state_dir: str,
        tunables: Optional[Tunables] = None,
        reactor: Any = None,
        log: Optional[NodeLog] = None,
    ) -> None:
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.config = config
        self.tunables = tunables or Tunables.from_environ()
        self.reactor = reactor
        self.log = log or NodeLog(config.log)
        self.hub = EventHub(self.log)
        self.domain = Master(config, state_dir, self, self.tunables, reactor, self.log, self.hub)
        self.port: Optional[int] = None
        self.base_url = ""
        self.scheme = "http"
        self.credentials: Optional[ServerCredentials] = None
        self.listening: Any = None  # the IListeningPort once listening
        self.site: Optional[MasterSite] = None
        self.ready: Deferred = Deferred()
        self.stopped: Deferred = Deferred()
        self.counter_save_interval = max(self.tunables.report_interval * 12, 0.5)
        self._loops: list[task.LoopingCall] = []

    # -- what tools and tests look at -----------------------------------------

    @property
    def api_key(self) -> str:
        return self.domain.identity.api_key

    @property
    def master_id(self) -> str:
        return self.domain.identity.master_id

    @property
    def records(self) -> dict[str, InstanceRecord]:
        """The instances by ID (the API key is not one of them)."""
        return self.domain.records

    @property
    def instances(self) -> dict[str, Run]:
        """The running tunnels by instance ID (a
        :class:`~nodepass.service.instance.TunnelService` each with
        ``workers=0``, a :class:`~nodepass.workers.pool.RemoteRun` each in
        worker processes)."""
        return self.domain.supervisor.instances

    @property
    def worker_pids(self) -> list[int]:
        """The worker processes' IDs (none with ``workers=0``)."""
        host = self.domain.supervisor.host
        return host.pids() if isinstance(host, WorkerPool) else []

    @property
    def store(self) -> StateStore:
        return self.domain.store

    @property
    def tls_code(self) -> int:
        return self.domain.tls_code

    # ------------------------------------------------------------------ lifecycle

    def startService(self) -> None:
        service.Service.startService(self)  # children are started by _start
        if self.ready.called:
            self.ready = Deferred()
        d = ensureDeferred(self._start())

        def ok(_: object) -> None:
            self.ready.callback(self)

        def failed(f: Any) -> None:
            self.log.error("Master error: %s", f.getErrorMessage())
            self.ready.errback(f)

        d.addCallbacks(ok, failed)

    async def _start(self) -> None:
        sysinfo.prime_cpu()
        self.domain.load()
        await self._listen()
        level, line = self.credentials.code_line() if self.credentials is not None else UNENCRYPTED_LINE
        getattr(self.log, level)(line)
        self.log.info(
            "Master started: master://%s%s?log=%s&tls=%d",
            _hostport(self.config.api.host or "", self.port),
            self.config.prefix,
            self.config.log,
            self.tls_code,
        )
        self._log_locations()
        self.domain.start_instances()
        self._loops = []
        for interval, fn in (
            (self.tunables.reload_interval, self.domain.reload),
            (self.counter_save_interval, self.domain.save_counters),
        ):
            if interval > 0:
                loop = task.LoopingCall(fn)
                loop.clock = self.reactor
                loop.start(interval, now=False).addErrback(
                    lambda f: self.log.error("Master periodic task failed: %s", f.getErrorMessage())
                )
                self._loops.append(loop)

    def _log_locations(self) -> None:
        """Where to point a browser and where the state lives, once at start:
        the start line gives ``master://`` (what was asked for), not the
        URLs a person opens, and the state file's path depends on the state
        directory the process was given, which the start line does not
        show.  ``base_url`` names 127.0.0.1 for a wildcard listener, which is
        what works from the master's own host.  The API key stays in its own
        start-up line only."""
        self.log.info("Console: %s/", self.base_url)
        self.log.info("API docs: %s/v1/docs", self.base_url)
        self.log.info("State file: %s", self.store.path)

    async def _listen(self) -> None:
        cfg = self.config
        site = MasterSite(MasterAPI(self.domain).resource())
        factory = IProtocolFactory(site)
        if cfg.tls:
            from twisted.protocols.tls import TLSMemoryBIOFactory

            from nodepass.net.tls import ServerCredentials

            credentials = self.credentials = ServerCredentials.from_config(
                cfg.tls,
                cfg.crt,
                cfg.key,
                self.log,
                self.tunables.reload_interval,
                self.reactor,
                common_name=cfg.api.host or "localhost",
            )
            self.domain.tls_code = credentials.tls_code
            factory = IProtocolFactory(TLSMemoryBIOFactory(IOpenSSLContextFactory(_ReloadingContext(credentials)), False, factory))
            self.scheme = "https"
        host = cfg.api.host
        endpoint: Union[TCP4ServerEndpoint, TCP6ServerEndpoint]
        if ":" in host:
            endpoint = TCP6ServerEndpoint(self.reactor, cfg.api.port, interface=host)
        else:
            endpoint = TCP4ServerEndpoint(self.reactor, cfg.api.port, interface=host)
        self.site = site
        self.listening = await endpoint.listen(factory)
        self.port = self.listening.getHost().port
        shown = host if host and host not in ("0.0.0.0", "::") else "127.0.0.1"
        self.base_url = f"{self.scheme}://{_hostport(shown, self.port)}{cfg.prefix}"

    def stopService(self) -> Deferred:
        service.Service.stopService(self)
        d = ensureDeferred(self._stop())

        def done(result: object) -> object:
            if not self.stopped.called:
                self.stopped.callback(None)
            return result

        return d.addBoth(done)

    async def _stop(self) -> None:
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        self.hub.shutdown()
        if self.listening is not None:
            listening, self.listening = self.listening, None
            await listening.stopListening()
        if self.site is not None:
            await self.site.close_connections(self.reactor)
        await self.domain.stop()


def _hostport(host: str, port: object) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
