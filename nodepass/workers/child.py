"""The program a worker process runs: ``python -m nodepass.workers.child LEVEL``.

It hosts the instances its master hands it, each a
:class:`~nodepass.service.instance.TunnelService` exactly as the master
would run in its own reactor, and reports back on its AMP pipe (fd 3 from
the master, fd 4 to it) what the master needs to behave as if the instance
were its own: every log line, every CHECK_POINT, every status change.

Its life is tied to the master's: when the pipe closes (the master stopped,
or was killed with SIGKILL), it stops its instances and exits, so no worker
outlives its master.  Ctrl-C at a terminal reaches the whole process group;
a worker ignores SIGINT and lets its master decide.
"""

from __future__ import annotations

import pickle
import signal
import sys
from functools import partial
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.logger import LogLevel, formatEvent, globalLogBeginner
from twisted.protocols import amp
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure

from nodepass.base.logs import ORDER, NodeLog
from nodepass.base.stats import Checkpoint, InstanceStats
from nodepass.base.collector import IdleSweep, pace_collector
from nodepass.base.limits import raise_open_files_limit
from nodepass.compat.twisted_fastpath import lean_dispatch
from nodepass.service.instance import TunnelService
from nodepass.workers import commands as cmd

_TW_WORDS = {
    LogLevel.debug: "debug",
    LogLevel.info: "debug",  # as in the master: Twisted's plumbing is debug
    LogLevel.warn: "warn",
    LogLevel.error: "error",
    LogLevel.critical: "error",
}


class WorkerProtocol(amp.AMP):
    """The worker's end of the pipe: runs instances on the master's word."""

    def __init__(self, reactor: Any, level: str) -> None:
        super().__init__()
        self.reactor = reactor
        self.level = level
        self.services: dict[str, TunnelService] = {}
        self.closed: Deferred = Deferred()
        self._stopping: Deferred | None = None

    # -- reports to the master ---------------------------------------------------

    def _tell(self, command: type[amp.Command], **fields: Any) -> None:
        if self.transport is not None and not self.closed.called:
            self.callRemote(command, **fields)

    def observe(self, event: dict) -> None:
        """The worker's log observer: NodePass lines go to the master as they
        are (the instance filtered them by its ``log=`` already); Twisted's
        own events at the master's level, with any traceback."""
        level = event.get("np_level")
        if level is not None:
            text = event.get("np_text", "")
            instance = event.get("np_instance") or ""
        else:
            word = _TW_WORDS.get(event.get("log_level"), "debug")
            if ORDER[word] < ORDER.get(self.level, 1) or self.level == "none":
                return
            level = word.upper()
            instance = ""
            try:
                text = formatEvent(event)
                failure = event.get("log_failure")
                if failure is not None:
                    text = f"{text}\n{failure.getTraceback()}"
            except Exception:  # noqa: BLE001 - a log line must never raise
                text = repr(event.get("log_format"))
        self._tell(cmd.Log, instance=instance, level=level, text=cmd.fitting(str(text)), when=float(event.get("log_time") or 0.0))

    # -- what the master asks ----------------------------------------------------

    @cmd.Start.responder
    async def start(self, instance: str, config: bytes, tunables: bytes, slot_limit: int, tcp_rx: int, tcp_tx: int, udp_rx: int, udp_tx: int) -> dict:
        old = self.services.pop(instance, None)
        if old is not None:  # the master lost track of it: a clean slate
            await old.stopService()
        tunnel_config = pickle.loads(config)  # noqa: S301 - our own master's objects (commands docstring)
        stats = InstanceStats(slot_limit)
        stats.tcp_rx, stats.tcp_tx, stats.udp_rx, stats.udp_tx = tcp_rx, tcp_tx, udp_rx, udp_tx
        svc = TunnelService(
            tunnel_config,
            tunables=pickle.loads(tunables),  # noqa: S301 - as above
            reactor=self.reactor,
            log=NodeLog(tunnel_config.log, instance_id=instance),
            stats=stats,
        )
        svc.checkpoint_listeners.append(partial(self._report, instance, svc))
        svc.status_listeners.append(partial(self._status, instance, svc))
        self.services[instance] = svc
        svc.startService()
        return {}

    def _report(self, instance: str, svc: TunnelService, cp: Checkpoint) -> None:
        if self.services.get(instance) is svc:
            self._tell(cmd.Report, instance=instance, **attrs.asdict(cp))

    def _status(self, instance: str, svc: TunnelService, status: str, message: str) -> None:
        if self.services.get(instance) is svc:
            self._tell(cmd.Status, instance=instance, status=status, message=cmd.fitting(message))

    @cmd.Stop.responder
    async def stop(self, instance: str) -> dict:
        svc = self.services.pop(instance, None)
        if svc is None:
            return {"known": False, "tcp_rx": 0, "tcp_tx": 0, "udp_rx": 0, "udp_tx": 0}
        if svc.running:
            await svc.stopService()
        s = svc.stats
        return {"known": True, "tcp_rx": s.tcp_rx, "tcp_tx": s.tcp_tx, "udp_rx": s.udp_rx, "udp_tx": s.udp_tx}

    @cmd.ResetTraffic.responder
    def reset_traffic(self, instance: str) -> dict:
        svc = self.services.get(instance)
        if svc is not None:
            svc.stats.reset_traffic()
        return {}

    # -- the end -----------------------------------------------------------------

    def stop_all(self) -> Deferred:
        """Stop every instance (once; later calls share the first)."""
        if self._stopping is None:
            services = list(self.services.values())
            self.services.clear()
            self._stopping = defer.gatherResults(
                [ensureDeferred(_stopped(svc)) for svc in services], consumeErrors=True
            ).addBoth(lambda _: None)
        return self._stopping

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        if not self.closed.called:
            self.closed.callback(None)
        # The master is gone or done with us: stop the tunnels, then exit.
        self.stop_all().addBoth(lambda _: self.reactor.stop() if self.reactor.running else None)


async def _stopped(svc: TunnelService) -> None:
    if svc.running:
        await svc.stopService()


def _die_with_parent() -> None:
    """Linux: SIGTERM when the master dies, even if the pipe lingers (belt
    and braces; the closed pipe is what normally ends a worker)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def main(argv: list[str]) -> int:
    level = argv[1] if len(argv) > 1 and argv[1] in ORDER else "info"
    _die_with_parent()
    from twisted.internet import reactor as installed
    from twisted.internet import stdio as stdio_module

    reactor: Any = installed  # mypy cannot call the zope interfaces it is typed with
    raise_open_files_limit()  # this process is ours: the open-files limit as Go sets it,
    lean_dispatch(reactor)  # no per-event log context,
    pace_collector()  # and its collector's pace (nodepass.base.collector),
    IdleSweep(reactor).start()  # with a full collection when its own stop
    stdio: Any = stdio_module  # typed after the Windows variant, which has no fd arguments
    proto = WorkerProtocol(reactor, level)
    observer: Any = proto.observe
    globalLogBeginner.beginLoggingTo([observer], discardBuffer=True, redirectStandardIO=False)
    stdio.StandardIO(proto, stdin=3, stdout=4, reactor=reactor)
    reactor.addSystemEventTrigger("before", "shutdown", proto.stop_all)
    reactor.callWhenRunning(signal.signal, signal.SIGINT, signal.SIG_IGN)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
