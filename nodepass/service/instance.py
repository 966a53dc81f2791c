"""One ``server://`` or ``client://`` instance as a Twisted service.

The service owns the lifecycle that SPEC §7 gives every tunnel: start a
*runner* (the mode-specific machinery), and when the runner reports a fatal
error, log ``Server error: ...``, tear everything down, wait
``NP_SERVICE_COOLDOWN``, log ``Server restart`` and start again -- for as long
as the service runs.  The master runs many of these in one reactor; the
``nodepass`` command and ``twistd nodepass`` run exactly one.
"""

from __future__ import annotations

from typing import Callable, Optional

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.defer import Deferred, ensureDeferred

from nodepass.base.logs import NodeLog
from nodepass.base.stats import Checkpoint, InstanceStats
from nodepass.config.urls import TunnelConfig, Tunables
from nodepass.modes.base import InstanceContext, Runner, WireMemo
from nodepass.modes.single import SingleEndRunner, tunnel_address_binds
from nodepass.relay.core import TokenBucket


async def make_runner(ctx: InstanceContext) -> Runner:
    """Pick the runner for the configured (or auto-detected) mode (SPEC §2)."""
    # The dual-end runners are imported when one is needed: they bring TLS,
    # which a single-end forwarder does without (nodepass.tap.tls_unused).
    cfg = ctx.config
    if cfg.is_server:
        from nodepass.modes.server import ServerRunner

        return ServerRunner(ctx)
    if cfg.mode == 1 or (cfg.mode == 0 and await tunnel_address_binds(cfg, ctx.reactor)):
        return SingleEndRunner(ctx)
    from nodepass.modes.client import ClientRunner

    return ClientRunner(ctx)


class TunnelService(service.Service):
    """Runs one tunnel instance, restarting it after fatal errors."""

    def __init__(
        self,
        config: TunnelConfig,
        tunables: Optional[Tunables] = None,
        reactor=None,
        log: Optional[NodeLog] = None,
        stats: Optional[InstanceStats] = None,
    ):
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.config = config
        self.tunables = tunables or Tunables.from_environ()
        self.reactor = reactor
        self.log = log or NodeLog(config.log)
        self.stats = stats or InstanceStats(config.slot)
        self.stats.slot_limit = config.slot
        self.checkpoint_listeners: list[Callable[[Checkpoint], None]] = []
        self.status_listeners: list[Callable[[str, str], None]] = []
        self.runner: Optional[Runner] = None
        self._loop: Optional[Deferred] = None
        self._stopping = False
        self._sleep: Optional[Deferred] = None
        self.started: Deferred = Deferred()  # fires once the first run is up (tests await it)
        self.memo = WireMemo()  # the client's server generation, across restarts

    @property
    def name_word(self) -> str:
        return self.config.title

    def _report(self, ping: int, pool: int) -> None:
        mode = self.runner.mode if self.runner is not None else 0
        cp = self.stats.checkpoint(mode, ping, pool)
        self.log.event(cp.line())
        for listener in list(self.checkpoint_listeners):
            listener(cp)

    def _status(self, status: str, message: str = "") -> None:
        for listener in list(self.status_listeners):
            listener(status, message)

    def _context(self) -> InstanceContext:
        cfg = self.config
        limiter = TokenBucket(cfg.rate * 125000, self.reactor) if cfg.rate else None
        return InstanceContext(
            config=cfg,
            tunables=self.tunables,
            reactor=self.reactor,
            log=self.log,
            stats=self.stats,
            limiter=limiter,
            report=self._report,
            memo=self.memo,
        )

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        for w in self.config.warnings:
            self.log.warn(w)
        for e in self.config.errors:
            self.log.error(e)
        self._loop = ensureDeferred(self._run())
        self._loop.addErrback(lambda f: self.log.error("%s loop crashed: %s", self.name_word, f.getErrorMessage()))

    async def _run(self) -> None:
        word = self.name_word
        announced = False
        last_mode: int = self.config.mode
        while not self._stopping:
            runner = None
            try:
                runner = await make_runner(self._context())
                self.runner = runner
                await runner.start()
                if self._stopping:
                    break
                if not announced:
                    # Once, at the first start that works (the process tests
                    # and operators take it as "up"); a later recovery is
                    # told by the restart line before it.
                    announced = True
                    self.log.info("%s started: %s", word, self.config.start_url(runner.mode))
                runner.after_start()
                self._status("running", "")
                if not self.started.called:
                    self.started.callback(runner)
                await runner.failed
                break  # runner ended cleanly (stop requested)
            except defer.CancelledError:
                break
            except Exception as e:  # noqa: BLE001 - any fatal error means restart
                if self._stopping:
                    break
                self.log.error("%s error: %s", word, e)
                self._status("error", f"{word} error: {e}")
                if runner is not None:
                    last_mode = runner.mode
                    await runner.stop()
                self.runner = None
                self._sleep = task.deferLater(self.reactor, self.tunables.service_cooldown, lambda: None)
                try:
                    await self._sleep
                except defer.CancelledError:
                    break
                finally:
                    self._sleep = None
                if self._stopping:
                    break
                # As Go does: the start line's URL again, before the new
                # attempt (SPEC §7), with the mode the last run settled on.
                self.log.info("%s restart: %s", word, self.config.start_url(last_mode))

    def stopService(self) -> Deferred:
        super().stopService()
        self._stopping = True
        return ensureDeferred(self._shutdown())

    async def _shutdown(self) -> None:
        if self._sleep is not None:
            self._sleep.cancel()
        runner, self.runner = self.runner, None
        if runner is not None:
            d = ensureDeferred(runner.stop())
            timeout = self.tunables.shutdown_timeout
            if timeout > 0:
                d.addTimeout(timeout, self.reactor)
            try:
                await d
            except Exception as e:  # noqa: BLE001
                self.log.warn("%s shutdown incomplete: %s", self.name_word, e)
            if not runner.failed.called:
                runner.failed.callback(None)
        if self._loop is not None:
            try:
                await self._loop
            except Exception:  # noqa: BLE001 - already logged
                pass
        self._status("stopped", "")
