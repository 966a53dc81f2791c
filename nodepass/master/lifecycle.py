"""Running the master's instances: one
:class:`~nodepass.service.instance.TunnelService` per running record, and
the Go master's rules for an instance's ``status``.

The rules, as dashboards know them from Go:

* ``running`` once started; ``stopped`` once stopped, with the live figures
  (ping, pool, tcps, udps) zeroed and the byte counters kept;
* ``error`` when the instance writes a ``Server error:``/``Client error:``
  line (figures zeroed), or when it reported a CHECK_POINT in this run but
  none for 3 report intervals (figures kept: the watchdog);
* back to ``running`` at the next CHECK_POINT, not merely at a restart.

The supervisor changes records and publishes events; it never writes the
state file (the domain decides when a change is durable).

Where a run happens is a *host*'s business: :class:`LocalHost` runs each
instance as a service in the master's own reactor (``workers=0``), and
:class:`~nodepass.workers.pool.WorkerPool` runs it in a worker process.
Either way the supervisor sees the same things -- a run with a ``log``,
``stats`` and checkpoint and status listeners -- and applies the same rules.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, Union

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.defer import ensureDeferred

from nodepass.base.kinds import Status
from nodepass.base.logs import NodeLog
from nodepass.base.stats import Checkpoint
from nodepass.config.urls import Tunables, TunnelConfig
from nodepass.master.events import EventHub
from nodepass.master.records import InstanceRecord
from nodepass.workers.pool import RemoteRun, WorkerPool

if TYPE_CHECKING:
    # Imported when a run is created here: a master whose instances all run
    # in workers never loads the tunnel code (nor TLS, see
    # nodepass.compat.tls_less).
    from nodepass.service.instance import TunnelService

#: One run of an instance, in this process or in a worker.
Run = Union["TunnelService", RemoteRun]

#: Substrings of an instance's log line that put it in ``error`` (Go's master
#: parses its children's output for them).
ERROR_MARKERS = ("Server error:", "Client error:")


class Host(Protocol):
    """Where runs happen (see the module docstring)."""

    def open(self) -> None: ...

    async def close(self) -> None: ...

    def create(self, rid: str, config: TunnelConfig, stats: Any, log: NodeLog, lost: Callable[[str], None]) -> Any: ...

    def begin(self, run: Any) -> None: ...

    async def halt(self, run: Any) -> None: ...

    def reset_traffic(self, run: Any) -> None: ...


class LocalHost:
    """Instances as child services of the master, in its reactor: the run
    shares the record's stats, so there is nothing to copy back."""

    def __init__(self, parent: service.MultiService, tunables: Tunables, reactor: Any) -> None:
        self.parent = parent
        self.tunables = tunables
        self.reactor = reactor

    def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def create(self, rid: str, config: TunnelConfig, stats: Any, log: NodeLog, lost: Callable[[str], None]) -> TunnelService:
        from nodepass.service.instance import TunnelService

        return TunnelService(config, tunables=self.tunables, reactor=self.reactor, log=log, stats=stats)

    def begin(self, run: TunnelService) -> None:
        run.setServiceParent(self.parent)

    async def halt(self, svc: TunnelService) -> None:
        if svc.parent is self.parent:
            if self.parent.running:
                d = svc.disownServiceParent()
            else:
                d = svc.stopService() if svc.running else None
                svc.disownServiceParent()
            if d is not None:
                await d
        elif svc.running:
            await svc.stopService()

    def reset_traffic(self, run: TunnelService) -> None:
        pass  # the run counts into the record's own stats


def make_host(workers: int, parent: service.MultiService, tunables: Tunables, reactor: Any, log: NodeLog) -> Host:
    """The host a master with ``workers`` worker processes uses."""
    if workers > 0:
        return WorkerPool(workers, reactor, log, tunables)
    return LocalHost(parent, tunables, reactor)


class Supervisor:
    """Starts and stops the tunnels of the records in ``records`` (the
    registry, shared with the domain, which alone adds and removes) as child
    services of ``parent``, keeps each record's status, and publishes every
    change on ``hub``.  ``on_report`` is called at each CHECK_POINT: the
    counters moved and the state file is behind."""

    def __init__(
        self,
        parent: service.MultiService,
        records: Mapping[str, InstanceRecord],
        hub: EventHub,
        tunables: Tunables,
        reactor: Any,  # IReactorTime and what the tunnels need (mypy sees no zope interfaces)
        log: NodeLog,
        on_report: Callable[[], None],
        host: Host | None = None,
    ) -> None:
        self.host: Host = host if host is not None else LocalHost(parent, tunables, reactor)
        self.records = records
        self.hub = hub
        self.tunables = tunables
        self.reactor = reactor
        self.log = log
        self.on_report = on_report
        self.instances: dict[str, Run] = {}
        self._watchdogs: dict[str, task.LoopingCall] = {}

    def publish(self, kind: str, rec: InstanceRecord) -> None:
        self.hub.publish(kind, rec.to_json())

    def is_running(self, rec: InstanceRecord) -> bool:
        return rec.id in self.instances

    # ------------------------------------------------------------------ runs

    def start(self, rec: InstanceRecord) -> None:
        """Start ``rec``'s tunnel (nothing if it runs already)."""
        if rec.id in self.instances:
            return
        log = NodeLog(rec.config.log, instance_id=rec.id)
        svc = self.host.create(rec.id, rec.config, rec.stats, log, lost=lambda why: self._on_lost(rec, svc, why))
        log.listeners.append(partial(self._on_log, rec, svc))
        svc.checkpoint_listeners.append(partial(self._on_checkpoint, rec, svc))
        svc.status_listeners.append(partial(self._on_status, rec, svc))
        self.instances[rec.id] = svc
        rec.status = Status.RUNNING
        # Silence counts from this run's first report only: a server waiting
        # for its first client stays running (see _watch).
        rec.last_report = None
        self._arm_watchdog(rec)
        self.host.begin(svc)
        self.publish("update", rec)

    async def stop(self, rec: InstanceRecord, publish: bool = True) -> None:
        """Stop ``rec``'s tunnel and wait for it; ``rec`` is ``stopped``
        afterwards (with its counters copied in) even if it was not running."""
        svc = self.instances.pop(rec.id, None)
        self._disarm_watchdog(rec)
        if svc is not None:
            await self.host.halt(svc)
        rec.sync_counters()
        rec.status = Status.STOPPED
        rec.clear_figures()  # as Go: ping, pool, tcps, udps 0; byte counters kept
        if publish:
            self.publish("update", rec)

    async def restart(self, rec: InstanceRecord) -> None:
        """Stop, then start again unless the record was removed meanwhile."""
        await self.stop(rec, publish=False)
        if rec.id in self.records:
            self.start(rec)

    async def stop_all(self) -> None:
        """Stop every tunnel (the master is stopping: no events)."""
        running = [rec for rec in self.records.values() if rec.id in self.instances]
        await defer.gatherResults([ensureDeferred(self.stop(rec, publish=False)) for rec in running])
        await self.host.close()

    def reset_counters(self, rec: InstanceRecord) -> None:
        """The API's ``reset``: zero the record's byte counters and the
        running instance's."""
        rec.reset_counters()
        svc = self.instances.get(rec.id)
        if svc is not None:
            self.host.reset_traffic(svc)

    def failed(self) -> list[InstanceRecord]:
        """Running instances in ``error``: the ones a reload restarts."""
        return [rec for rec in self.records.values() if rec.status == Status.ERROR and rec.id in self.instances]

    # ------------------------------------------------------------------ what the tunnels say

    def _on_lost(self, rec: InstanceRecord, svc: Run, why: str) -> None:
        """The worker process running ``svc`` ended: the instance is in
        ``error`` (an update says so) and starts again on a live worker."""
        if not self._is_current(rec, svc):
            return
        self.instances.pop(rec.id, None)
        self._disarm_watchdog(rec)
        self.log.warn("Instance %s restarting: %s", rec.id, why)
        rec.sync_counters()  # as far as its last CHECK_POINT
        self._mark_error(rec)
        self.publish("update", rec)
        self.start(rec)

    def _is_current(self, rec: InstanceRecord, svc: Run) -> bool:
        """Whether ``svc`` is still ``rec``'s run: a stopped or replaced run
        may still be speaking while it shuts down."""
        return self.instances.get(rec.id) is svc and self.records.get(rec.id) is rec

    def _on_log(self, rec: InstanceRecord, svc: Run, level: str, line: str) -> None:
        if level == "EVENT" and "CHECK_POINT|" in line:
            return  # becomes an update event instead
        if any(marker in line for marker in ERROR_MARKERS) and self._is_current(rec, svc):
            # As Go's master does with its children's output: the line's own
            # log event carries the new status, and no update is sent.
            self._mark_error(rec)
        if self.hub.streams:
            self.hub.publish("log", rec.to_json(), line)

    def _mark_error(self, rec: InstanceRecord) -> bool:
        """``error`` with the live figures zeroed (Go: ping, pool, tcps,
        udps); False if it already was."""
        if rec.status == Status.ERROR:
            return False
        rec.status = Status.ERROR
        rec.clear_figures()
        return True

    def _on_checkpoint(self, rec: InstanceRecord, svc: Run, cp: Checkpoint) -> None:
        if not self._is_current(rec, svc):
            return
        rec.apply_checkpoint(cp)
        rec.status = Status.RUNNING
        rec.last_report = self.reactor.seconds()
        self.on_report()
        self.publish("update", rec)

    def _on_status(self, rec: InstanceRecord, svc: Run, status: str, message: str) -> None:
        """The tunnel's own lifecycle.  Only ``error`` matters here: it comes
        right after the ``Server error:``/``Client error:`` line, which has
        normally set the status already (the update is for an instance whose
        ``log=`` hides that line).  As in Go, an instance leaves ``error``
        at its next CHECK_POINT, not when it has merely restarted."""
        if status != Status.ERROR or not self._is_current(rec, svc):
            return
        if self._mark_error(rec):
            self.publish("update", rec)

    # ------------------------------------------------------------------ watchdog

    def _arm_watchdog(self, rec: InstanceRecord) -> None:
        """Go's monitor: every report interval, an instance that has reported
        but not for 3 intervals is ``error`` (figures kept), and an update
        says so at every such tick."""
        self._disarm_watchdog(rec)
        interval = self.tunables.report_interval
        if interval > 0:
            loop = self._watchdogs[rec.id] = task.LoopingCall(self._watch, rec)
            loop.clock = self.reactor
            loop.start(interval, now=False)

    def _disarm_watchdog(self, rec: InstanceRecord) -> None:
        loop = self._watchdogs.pop(rec.id, None)
        if loop is not None and loop.running:
            loop.stop()

    def _watch(self, rec: InstanceRecord) -> None:
        if rec.id not in self.instances or rec.last_report is None:
            return
        limit = 3 * self.tunables.report_interval
        if self.reactor.seconds() - rec.last_report <= limit:
            return
        if rec.status != Status.ERROR:
            rec.status = Status.ERROR
            self.log.warn("Instance %s sent no CHECK_POINT for %ss", rec.id, limit)
        self.publish("update", rec)
