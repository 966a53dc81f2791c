"""``twistd nodepass URL``: options and the service tree.

The tree is the same for every entry point (twistd, the ``nodepass`` console
script, ``.tac`` files, tests)::

    NodePassRoot (MultiService)
      └── TunnelService | MasterService
            └── listeners, pools, instances ...
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from twisted.application import service
from twisted.logger import ILogObserver
from twisted.python import usage
from twisted.python.components import Componentized

from nodepass.config import InstanceConfig, MasterConfig, Tunables, URLError, parse_url
from nodepass.logs import NodeLog, NodePassObserver


class Options(usage.Options):
    synopsis = "[options] URL"
    longdesc = (
        "Run one NodePass instance: server://, client:// or master://. "
        "See docs/urls.md for every query parameter."
    )
    optParameters = [
        ["state-dir", None, None, "Master state directory (default: $NP_STATE_DIR or ~/.local/state/nodepass)."],
    ]

    def parseArgs(self, url: str) -> None:
        self["url"] = url

    def postOptions(self) -> None:
        try:
            self["config"] = parse_url(self["url"])
        except URLError as e:
            raise usage.UsageError(str(e)) from None


def default_state_dir() -> str:
    env = os.environ.get("NP_STATE_DIR")
    if env:
        return env
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "nodepass")


class NodePassRoot(service.MultiService):
    """The root of the tree: logs the shutdown line, and under twistd installs
    the NodePass log observer on the application so twistd's own output
    follows SPEC §7 as well."""

    def __init__(self, config: InstanceConfig, log: NodeLog, observer: Optional[NodePassObserver] = None):
        super().__init__()
        self.config = config
        self.log = log
        self.observer = observer

    def setServiceParent(self, parent):
        if isinstance(parent, Componentized) and self.observer is not None:
            if parent.getComponent(ILogObserver, None) is None:
                parent.setComponent(ILogObserver, self.observer)
        return super().setServiceParent(parent)

    exit_status = 0

    def startService(self) -> None:
        super().startService()
        for child in self:
            ready = getattr(child, "ready", None)
            if ready is not None:
                ready.addErrback(self._start_failed)

    def _start_failed(self, failure) -> None:
        """A master that cannot serve (port in use, unreadable state) must not
        linger as a process with no API: stop with a non-zero status.  The
        master has already logged ``Master error: ...``."""
        from twisted.internet import reactor

        self.exit_status = 1
        # Under twistd this can fire while the reactor is still starting up
        # (reactor.running is not yet true): stop from the main loop.
        reactor.callLater(0, self._exit_failed, reactor)

    def _exit_failed(self, reactor) -> None:
        if getattr(self, "under_twistd", False):
            # twistd has no way to report a failure status after the reactor
            # stopped cleanly; leave once shutdown has finished.
            reactor.addSystemEventTrigger("after", "shutdown", os._exit, 1)
        if reactor.running:
            reactor.stop()

    def stopService(self):
        d = super().stopService()

        def done(result):
            self.log.info("%s shutdown complete", self.config.title)
            # twistd re-raises the stopping signal at exit (status 128+N);
            # NodePass reports a graceful SIGINT/SIGTERM stop as exit 0
            # (SPEC §7), which is what supervisors expect of a clean stop.
            from twisted.internet import reactor

            if getattr(reactor, "_exitSignal", None) is not None:
                reactor._exitSignal = None
            return result

        return d.addBoth(done)


def build_service(
    config: InstanceConfig,
    tunables: Optional[Tunables] = None,
    state_dir: Optional[str] = None,
    reactor=None,
    observer: Optional[NodePassObserver] = None,
) -> NodePassRoot:
    """The whole service tree for one instance URL."""
    tunables = tunables or Tunables.from_environ()
    log = NodeLog(config.log)
    root = NodePassRoot(config, log, observer)
    for w in tunables.warnings:
        log.warn(w)
    if isinstance(config, MasterConfig):
        from nodepass.master.service import MasterService

        child = MasterService(config, state_dir or default_state_dir(), tunables=tunables, reactor=reactor, log=log)
    else:
        from nodepass.instance import TunnelService

        child = TunnelService(config, tunables=tunables, reactor=reactor, log=log)
    child.setServiceParent(root)
    return root


def application_for(url: str, state_dir: Optional[str] = None) -> service.Application:
    """A twistd application for one instance URL, for ``.tac`` files (see
    ``tap/``).  Raises :class:`URLError` for a bad URL."""
    config = parse_url(url)
    application = service.Application("nodepass")
    observer = NodePassObserver(lambda: sys.__stdout__, config.log)
    root = build_service(config, state_dir=state_dir, observer=observer)
    root.under_twistd = True
    root.setServiceParent(application)
    return application


def _twistd_observer(options: Options) -> NodePassObserver:
    """Where twistd would have logged: stdout with ``-n`` and no logfile,
    else the logfile (``twistd.log`` by default), in NodePass format."""
    parent = getattr(options, "parent", None)
    level = options["config"].log
    logfile = parent.get("logfile") if parent is not None else None
    nodaemon = parent.get("nodaemon") if parent is not None else True
    if logfile == "-" or (not logfile and nodaemon):
        # sys.__stdout__: twistd redirects sys.stdout into the log system itself
        return NodePassObserver(lambda: sys.__stdout__, level)
    from twisted.python.logfile import LogFile

    return NodePassObserver(LogFile.fromFullPath(logfile or "twistd.log"), level, colour=False)


def makeService(options: Options) -> service.IService:
    root = build_service(options["config"], state_dir=options["state-dir"], observer=_twistd_observer(options))
    root.under_twistd = True
    return root
