"""The master's side of its worker processes.

:class:`WorkerPool` keeps ``N`` worker processes (:mod:`nodepass.workers.child`)
alive and places each instance on the least loaded one.  An instance in a
worker is a :class:`RemoteRun`: to the master's supervisor it looks like a
:class:`~nodepass.service.instance.TunnelService` in its own reactor -- the
same log lines, CHECK_POINT reports and status changes, through the same
listeners -- so the API, SSE and ``/info`` cannot tell where it runs.

Why processes and AMP: Python runs one thread of bytecode at a time, so the
only way a master uses more than one core is more processes; Twisted's
``spawnProcess`` gives the child pipes the reactor watches, and AMP gives
typed, ordered commands over them with no extra dependency.

What happens when a worker dies (a crash, the OOM killer, ``kill -9``):
its instances' runs are lost; the pool starts a new process in its place
(at once, or after a back-off when processes keep dying young) and tells the
supervisor, which marks each instance ``error`` and starts it again.  Counters
continue from the instance's last CHECK_POINT.
"""

from __future__ import annotations

import os
import pickle
import sys
from typing import Any, Callable, Optional

from twisted.internet import address, defer, error, protocol
from twisted.internet.defer import Deferred
from twisted.protocols import amp
from twisted.python.failure import Failure

import nodepass
from nodepass.base.logs import NodeLog
from nodepass.base.stats import Checkpoint, InstanceStats
from nodepass.config.urls import Tunables, TunnelConfig
from nodepass.workers import commands as cmd

#: Bytes per second of traffic that weigh as much as one more instance
#: when placing a new instance: an idle forwarder costs little, a tunnel
#: moving tens of MB/s takes a core's share.
BYTES_PER_INSTANCE = 10_000_000

#: A worker that ends sooner than this after it started is "dying young";
#: each such death in a row doubles the wait before the next process.
YOUNG = 2.0
FIRST_PAUSE = 0.5
MAX_BACKOFF = 30.0

#: The child's pipe ends (see :mod:`nodepass.workers.child`).
TO_CHILD, FROM_CHILD = 3, 4


class RemoteRun:
    """One run of an instance in a worker process (the supervisor's view)."""

    def __init__(self, rid: str, config: TunnelConfig, stats: InstanceStats, log: NodeLog, lost: Callable[[str], None]) -> None:
        self.rid = rid
        self.config = config
        self.stats = stats
        self.log = log
        self.lost = lost
        self.checkpoint_listeners: list[Callable[[Checkpoint], None]] = []
        self.status_listeners: list[Callable[[str, str], None]] = []
        self.worker: Optional[WorkerProcess] = None
        #: Bytes per second between reports, smoothed (placement weight).
        self.rate = 0.0
        self._last: Optional[tuple[float, int]] = None
        #: Reports sent before a reset reached the worker carry the old
        #: counters: dropped while a reset is on its way.
        self.resets_pending = 0

    def report(self, cp: Checkpoint, now: float) -> None:
        if self.resets_pending:
            return
        s = self.stats
        s.tcp_rx, s.tcp_tx, s.udp_rx, s.udp_tx = cp.tcprx, cp.tcptx, cp.udprx, cp.udptx
        s.tcps, s.udps = cp.tcps, cp.udps
        total = cp.tcprx + cp.tcptx + cp.udprx + cp.udptx
        if self._last is not None and now > self._last[0]:
            # Smoothed (half the weight to the newest report), so one quiet
            # report interval does not make a busy worker look idle.
            latest = max(0.0, (total - self._last[1]) / (now - self._last[0]))
            self.rate = (self.rate + latest) / 2
        self._last = (now, total)
        for listener in list(self.checkpoint_listeners):
            listener(cp)

    def status(self, status: str, message: str) -> None:
        for listener in list(self.status_listeners):
            listener(status, message)


class _ChildPipe:
    """The transport AMP writes through: the child's fd 3."""

    def __init__(self, process: Any) -> None:  # IProcessTransport (zope: not callable for mypy)
        self.process = process

    def write(self, data: bytes) -> None:
        self.process.writeToChild(TO_CHILD, data)

    def writeSequence(self, data: list[bytes]) -> None:
        self.process.writeToChild(TO_CHILD, b"".join(data))

    def loseConnection(self) -> None:
        self.process.closeChildFD(TO_CHILD)

    def getPeer(self) -> address.UNIXAddress:
        return address.UNIXAddress(None)

    getHost = getPeer


class _MasterSide(amp.AMP):
    """The master's end of one worker's pipe: reports in, commands out."""

    def __init__(self, worker: "WorkerProcess") -> None:
        super().__init__()
        self.worker = worker

    @cmd.Log.responder
    def log(self, instance: str, level: str, text: str, when: float) -> dict:
        self.worker.on_log(instance, level, text, when)
        return {}

    @cmd.Report.responder
    def report(self, instance: str, **fields: int) -> dict:
        run = self.worker.runs.get(instance)
        if run is not None:
            run.report(Checkpoint(**fields), self.worker.pool.reactor.seconds())
        return {}

    @cmd.Status.responder
    def status(self, instance: str, status: str, message: str) -> dict:
        run = self.worker.runs.get(instance)
        if run is not None:
            run.status(status, message)
        return {}


class WorkerProcess(protocol.ProcessProtocol):
    """One worker process (or, while backing off, the one about to be)."""

    transport: Any  # IProcessTransport once spawned

    def __init__(self, pool: "WorkerPool", slot: int) -> None:
        self.pool = pool
        self.slot = slot
        self.amp = _MasterSide(self)
        self.runs: dict[str, RemoteRun] = {}
        self.pid: Optional[int] = None
        self.started_at = 0.0
        self.alive = False
        self.ended: Deferred = Deferred()
        #: Calls made before the process started: (command, fields, Deferred).
        self._queued: list[tuple[type[amp.Command], dict, Deferred]] = []

    def load(self) -> float:
        return len(self.runs) + sum(run.rate for run in self.runs.values()) / BYTES_PER_INSTANCE

    # -- the process ---------------------------------------------------------

    def spawn(self) -> None:
        pool = self.pool
        env = dict(os.environ)
        # The child imports nodepass from where this process did.
        root = os.path.dirname(os.path.dirname(os.path.abspath(nodepass.__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        pool.reactor.spawnProcess(
            self,
            sys.executable,
            [sys.executable, "-m", "nodepass.workers.child", pool.level],
            env=env,
            childFDs={1: 1, 2: 2, TO_CHILD: "w", FROM_CHILD: "r"},
        )

    def connectionMade(self) -> None:
        self.pid = self.transport.pid
        self.started_at = self.pool.reactor.seconds()
        self.alive = True
        self.amp.makeConnection(_ChildPipe(self.transport))
        self.pool.log.debug("Worker %d started: pid %s", self.slot, self.pid)
        queued, self._queued = self._queued, []
        for command, fields, d in queued:
            self.amp.callRemote(command, **fields).chainDeferred(d)

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == FROM_CHILD:
            self.amp.dataReceived(data)

    def processEnded(self, reason: Failure) -> None:
        self.alive = False
        # Calls still waiting for an answer fail with ConnectionLost, which
        # every caller expects of a worker that went away.
        self.amp.connectionLost(Failure(error.ConnectionLost(f"worker process ended: {_how_it_ended(reason)}")))
        if not self.ended.called:
            self.ended.callback(None)
        self.pool.worker_ended(self, reason)

    def close(self) -> None:
        """Close the pipe: the worker stops its instances and exits."""
        if self.alive and self.transport is not None:
            self.transport.closeChildFD(TO_CHILD)

    def kill(self) -> None:
        if self.alive and self.transport is not None:
            try:
                self.transport.signalProcess("KILL")
            except error.ProcessExitedAlready:
                pass

    # -- commands --------------------------------------------------------------

    def call(self, command: type[amp.Command], **fields: Any) -> Deferred:
        """``command`` now if the process runs, else once it does; a process
        that ends first fails the call with ``ConnectionLost``."""
        if self.alive:
            return self.amp.callRemote(command, **fields)
        if self.ended.called:
            return defer.fail(error.ConnectionLost("worker process ended"))
        d: Deferred = Deferred()
        self._queued.append((command, fields, d))
        return d

    def unqueue(self, instance: str) -> bool:
        """Forget the calls about ``instance`` still waiting for the process
        to start (its run stopped first); True if there were any."""
        mine = [item for item in self._queued if item[1].get("instance") == instance]
        self._queued = [item for item in self._queued if item[1].get("instance") != instance]
        for _, _, d in mine:
            d.errback(error.ConnectionLost("stopped before the worker process started"))
        return bool(mine)

    def abandon(self) -> None:
        """The process will not be started (the master is stopping)."""
        queued, self._queued = self._queued, []
        for _, _, d in queued:
            d.errback(error.ConnectionLost("the worker process was not started"))

    # -- reports ---------------------------------------------------------------

    def on_log(self, instance: str, level: str, text: str, when: float) -> None:
        run = self.runs.get(instance)
        if run is not None:
            run.log.replay(level, text, when)
        elif instance:
            NodeLog("debug", instance_id=instance).replay(level, text, when)
        else:
            self.pool.log.replay(level, f"Worker {self.slot}: {text}", when)


class WorkerPool:
    """``count`` worker processes and the instances placed on them."""

    def __init__(self, count: int, reactor: Any, log: NodeLog, tunables: Tunables) -> None:
        self.count = count
        self.reactor = reactor
        self.log = log
        self.level = log.level
        self._tunables_pickle = pickle.dumps(tunables)  # the same for every Start
        #: How long a worker may take to stop an instance or itself.
        self.grace = tunables.shutdown_timeout + 3.0
        self.workers: list[WorkerProcess] = []
        self.closing = False
        #: Workers that ended unexpectedly and were replaced (a metric).
        self.restarts = 0
        self._young_deaths: dict[int, int] = {}
        self._respawns: dict[int, Any] = {}

    # -- processes -------------------------------------------------------------

    def open(self) -> None:
        """Start the processes (the master calls this before placing instances)."""
        self.closing = False
        self.workers = []
        for slot in range(1, self.count + 1):
            worker = WorkerProcess(self, slot)
            self.workers.append(worker)
            worker.spawn()
        self.log.info("Workers: %d processes (pids %s)", self.count, ", ".join(str(w.pid) for w in self.workers))

    def pids(self) -> list[int]:
        return [w.pid for w in self.workers if w.alive and w.pid is not None]

    def worker_ended(self, worker: WorkerProcess, reason: Failure) -> None:
        runs = list(worker.runs.values())
        worker.runs.clear()
        if self.closing or worker not in self.workers:
            return
        self.restarts += 1
        how = _how_it_ended(reason)
        lived = self.reactor.seconds() - worker.started_at
        young = self._young_deaths[worker.slot] = self._young_deaths.get(worker.slot, 0) + 1 if lived < YOUNG else 0
        delay = min(MAX_BACKOFF, FIRST_PAUSE * 2 ** (young - 1)) if young else 0.0
        self.log.warn(
            "Worker %d (pid %s) ended: %s; a new worker process starts%s, and its %d instances start again",
            worker.slot,
            worker.pid,
            how,
            f" in {delay:g}s" if delay else "",
            len(runs),
        )
        fresh = WorkerProcess(self, worker.slot)
        self.workers[self.workers.index(worker)] = fresh
        if delay:
            self._respawns[worker.slot] = self.reactor.callLater(delay, self._respawn, fresh)
        else:
            fresh.spawn()
        for run in runs:
            run.lost(f"worker process {worker.slot} ended: {how}")

    def _respawn(self, worker: WorkerProcess) -> None:
        self._respawns.pop(worker.slot, None)
        if not self.closing and worker in self.workers:
            worker.spawn()

    async def close(self) -> None:
        """Stop every worker: close its pipe, wait for it to exit, kill it
        if it has not within the shutdown timeout."""
        self.closing = True
        for call in self._respawns.values():
            if call.active():
                call.cancel()
        self._respawns.clear()
        for worker in self.workers:
            if not worker.alive and not worker.ended.called:
                worker.abandon()
        waits = []
        for worker in self.workers:
            if worker.alive:
                worker.close()
                waits.append(worker.ended)
        if waits:
            everyone = defer.DeferredList(waits)
            everyone.addTimeout(self.grace, self.reactor)
            try:
                await everyone
            except defer.TimeoutError:
                for worker in self.workers:
                    if worker.alive:
                        self.log.warn("Worker %d (pid %s) did not stop; killing it", worker.slot, worker.pid)
                        worker.kill()
                await defer.DeferredList([w.ended for w in self.workers])
        self.workers = []

    # -- runs ------------------------------------------------------------------

    def create(self, rid: str, config: TunnelConfig, stats: InstanceStats, log: NodeLog, lost: Callable[[str], None]) -> RemoteRun:
        return RemoteRun(rid, config, stats, log, lost)

    def begin(self, run: RemoteRun) -> None:
        if not self.workers:  # only while the master stops
            run.log.error("%s", "no worker process to run the instance: the master is stopping")
            run.status("error", "the master is stopping")
            return
        worker = min(self.workers, key=lambda w: (w.load(), w.slot))
        run.worker = worker
        worker.runs[run.rid] = run
        s = run.stats
        d = worker.call(
            cmd.Start,
            instance=run.rid,
            config=pickle.dumps(run.config),
            tunables=self._tunables_pickle,
            slot_limit=s.slot_limit,
            tcp_rx=s.tcp_rx,
            tcp_tx=s.tcp_tx,
            udp_rx=s.udp_rx,
            udp_tx=s.udp_tx,
        )

        def refused(f: Failure) -> None:
            if f.check(error.ConnectionLost, error.ConnectionDone):
                return  # the worker died: worker_ended handles the run
            if worker.runs.get(run.rid) is run:
                message = f"worker {worker.slot} could not start the instance: {f.getErrorMessage()}"
                run.log.error("%s", message)
                run.status("error", message)

        d.addErrback(refused)

    async def halt(self, run: RemoteRun) -> None:
        """Stop ``run`` and take its final counters into its stats."""
        worker = run.worker
        if worker is None or worker.runs.get(run.rid) is not run:
            return
        if not worker.alive and not worker.ended.called and worker.unqueue(run.rid):
            del worker.runs[run.rid]  # never started: nothing to stop
            return
        d = worker.call(cmd.Stop, instance=run.rid)
        d.addTimeout(self.grace, self.reactor)
        try:
            answer = await d
        except (error.ConnectionLost, error.ConnectionDone, defer.TimeoutError) as e:
            self.log.warn("Instance %s: no final counters from worker %d (%s)", run.rid, worker.slot, e.__class__.__name__)
        else:
            s = run.stats
            if answer["known"]:
                s.tcp_rx, s.tcp_tx, s.udp_rx, s.udp_tx = answer["tcp_rx"], answer["tcp_tx"], answer["udp_rx"], answer["udp_tx"]
            s.tcps = s.udps = 0
        finally:
            if worker.runs.get(run.rid) is run:
                del worker.runs[run.rid]

    def reset_traffic(self, run: RemoteRun) -> None:
        worker = run.worker
        if worker is None or worker.runs.get(run.rid) is not run:
            return
        run.resets_pending += 1

        def done(result: object) -> object:
            run.resets_pending -= 1
            return None

        worker.call(cmd.ResetTraffic, instance=run.rid).addBoth(done)


def _how_it_ended(reason: Failure) -> str:
    value = reason.value
    signal_number = getattr(value, "signal", None)
    if signal_number:
        return f"killed by signal {signal_number}"
    code = getattr(value, "exitCode", None)
    return f"exit code {code}" if code is not None else str(value)
