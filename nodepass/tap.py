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
from typing import IO, Any, Mapping, Optional, cast

from twisted.application import service
from twisted.logger import ILogObserver
from twisted.python import usage
from twisted.python.components import Componentized
from twisted.python.failure import Failure

from nodepass.base.kinds import ClientMode
from nodepass.base.logs import NodeLog, NodePassObserver
from nodepass.compat.tls_less import without_tls
from nodepass.config.urls import InstanceConfig, MasterConfig, Tunables, URLError, parse_url

# Nothing imported at module level here imports the reactor (nor, through
# it, TLS): twistd imports this module to parse its options, and
# drop_tls_if_unused must run before the reactor is imported.


class Options(usage.Options):
    synopsis = "[options] URL"
    longdesc = (
        "Run one NodePass instance: server://, client:// or master://. "
        "See docs/urls.md for every query parameter."
    )
    optParameters = [
        ["state-dir", None, None, "Master state directory (default: $NP_STATE_DIR or ~/.local/state/nodepass)."],
    ]

    def parseArgs(self, url: str) -> None:  # type: ignore[override]  # Twisted types the base without the arguments subclasses take
        self["url"] = url

    def postOptions(self) -> None:
        try:
            self["config"] = parse_url(self["url"])
        except URLError as e:
            raise usage.UsageError(str(e)) from None
        if getattr(self, "parent", None) is not None:
            # A subcommand of twistd, which installs its reactor after
            # parsing its options and runs nothing else in its process (a
            # script parsing these options may go on to use TLS).
            drop_tls_if_unused(self["config"])


def tls_unused(config: InstanceConfig) -> bool:
    """Whether the process running ``config`` makes no TLS connection: a
    master whose instances all run in worker processes (``workers`` of 1
    or more) and whose API is plain HTTP (``tls=0``), or a client forced
    into single-end forwarding (``mode=1``).  Anything else may (a
    dual-end client learns its TLS mode from its server, and ``mode=0``
    may turn out dual-end)."""
    if isinstance(config, MasterConfig):
        return not config.tls and config.workers > 0
    return not config.is_server and config.mode == ClientMode.SINGLE_END


def drop_tls_if_unused(config: InstanceConfig) -> bool:
    """Run this process without pyOpenSSL and cryptography when
    :func:`tls_unused` says it may: about 12 MB of RSS less
    (docs/benchmarks.md, run U).  Must be called before the reactor is
    imported; returns whether TLS was dropped (not when it is too late)."""
    if tls_unused(config):
        why = (
            "a master whose instances run in worker processes and whose API is plain HTTP (tls=0) makes no TLS connection"
            if isinstance(config, MasterConfig)
            else "a single-end forwarder (mode=1) makes no TLS connection"
        )
        return without_tls(why)
    return False


def default_state_dir() -> str:
    env = os.environ.get("NP_STATE_DIR")
    if env:
        return env
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "nodepass")


class StartFailed(Exception):
    """An instance that cannot serve at all (a master whose port is taken):
    raised out of ``startService`` under twistd, so that twistd reports the
    failure (a daemon's parent exits non-zero) and removes its pidfile."""


class NodePassRoot(service.MultiService):
    """The root of the tree: logs the shutdown line, and under twistd installs
    the NodePass log observer on the application so twistd's own output
    follows SPEC §7 as well."""

    #: Set by :func:`makeService` / :func:`application_for`.
    under_twistd = False
    #: twistd's pidfile (absolute), removed when we end the process ourselves.
    pidfile = ""

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
            if ready is None:
                continue
            if self.under_twistd and ready.called and isinstance(ready.result, Failure):
                # Failed already (a master listens synchronously): tell twistd
                # while it can still act on it -- its daemon parent reports
                # the error and exits non-zero, and it removes the pidfile.
                why = ready.result.getErrorMessage()
                ready.addErrback(lambda _f: None)  # reported by the raise
                sys.excepthook = _without_traceback(sys.excepthook)
                raise StartFailed(f"{self.config.title} did not start: {why}")
            ready.addErrback(self._start_failed)

    def _start_failed(self, failure) -> None:
        """A master that cannot serve (port in use, unreadable state) must not
        linger as a process with no API: stop with a non-zero status.  The
        master has already logged ``Master error: ...``."""
        reactor = _global_reactor()
        self.exit_status = 1
        # Under twistd this can fire while the reactor is still starting up
        # (reactor.running is not yet true): stop from the main loop.
        reactor.callLater(0, self._exit_failed, reactor)

    def _exit_failed(self, reactor) -> None:
        if self.under_twistd:
            # twistd has no way to report a failure status after the reactor
            # stopped cleanly; leave once shutdown has finished -- without
            # the pidfile twistd would have removed on its way out.
            reactor.addSystemEventTrigger("after", "shutdown", self._exit_now, 1)
        if reactor.running:
            reactor.stop()

    def _exit_now(self, status: int) -> None:
        remove_own_pidfile(self.pidfile)
        os._exit(status)

    def stopService(self):
        d = super().stopService()

        def done(result):
            self.log.info("%s shutdown complete", self.config.title)
            # twistd re-raises the stopping signal at exit (status 128+N);
            # NodePass reports a graceful SIGINT/SIGTERM stop as exit 0
            # (SPEC §7), which is what supervisors expect of a clean stop.
            from nodepass.compat.twisted_internals import forget_exit_signal

            forget_exit_signal(_global_reactor())
            return result

        return d.addBoth(done)


def _global_reactor() -> Any:
    """The installed reactor.  (Typed loosely: mypy cannot call the methods
    of the zope interfaces Twisted types it with.)"""
    from twisted.internet import reactor

    return reactor


def _without_traceback(previous):
    """An excepthook that ends the process on :class:`StartFailed` without
    a traceback: the error is already logged (``Master error: ...``), and
    the exit status stays 1."""

    def hook(kind, value, tb) -> None:
        if not issubclass(kind, StartFailed):
            previous(kind, value, tb)

    return hook


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

        child: service.Service
        # (A tunnel instance logs its own URL's complaints at each start.)
        for w in config.warnings:
            log.warn(w)
        for e in config.errors:
            log.error(e)

        child = MasterService(config, state_dir or default_state_dir(), tunables=tunables, reactor=reactor, log=log)
    else:
        from nodepass.service.instance import TunnelService

        child = TunnelService(config, tunables=tunables, reactor=reactor, log=log)
    child.setServiceParent(root)
    return root


def application_for(url: str, state_dir: Optional[str] = None) -> Componentized:
    """A twistd application for one instance URL, for ``.tac`` files (see
    ``tap/``).  Raises :class:`URLError` for a bad URL.

    Logs go where twistd's options say, as with ``twistd nodepass URL``:
    ``--logfile`` (``twistd.log`` for a daemon without one), or stdout
    with ``-n``."""
    config = parse_url(url)
    twistd = running_twistd_options()
    application = service.Application("nodepass")
    observer = twistd_observer(twistd, config.log)
    root = build_service(config, state_dir=state_dir, observer=observer)
    _mark_twistd(root, twistd)
    root.setServiceParent(application)
    return application


def running_twistd_options() -> Optional[Mapping]:
    """The options of the twistd run that is loading a ``.tac`` file, or
    None outside twistd.

    A ``.tac`` file is plain Python that twistd executes while it builds
    the application, before it sets up logging; it is handed nothing, so
    the options (``--logfile``, ``--nodaemon``, ``--pidfile``) are read from
    the twistd runner that is executing it -- the caller up the stack (no
    public API tells them; ``nodepass.compat.twisted_internals`` walks it)."""
    from nodepass.compat.twisted_internals import running_twistd_config

    return running_twistd_config()


def twistd_observer(twistd: Optional[Mapping], level: str) -> NodePassObserver:
    """Where twistd itself would log (``twistd``'s options, or None): stdout
    with ``-n`` and no logfile, else the logfile (``twistd.log`` by
    default), in NodePass format."""
    logfile = twistd.get("logfile") if twistd is not None else None
    nodaemon = twistd.get("nodaemon") if twistd is not None else True
    if logfile == "-" or (not logfile and nodaemon):
        # sys.__stdout__: twistd redirects sys.stdout into the log system itself
        return NodePassObserver(lambda: cast(IO[str], sys.__stdout__), level)
    from twisted.python.logfile import LogFile

    return NodePassObserver(LogFile.fromFullPath(logfile or "twistd.log"), level, colour=False)


def own_process(reactor: Any, config: InstanceConfig) -> None:
    """Set up a process nodepass owns (the console script's, twistd's) to
    run ``config``: its soft open-files limit is raised to the hard one, as
    Go does (:mod:`nodepass.base.limits`), a SIGTERM before its reactor runs
    stops it cleanly (:func:`stop_on_early_signals`), its epoll reactor dispatches
    without Twisted's per-event log context (``lean_dispatch``), and where
    tunnels run here, its garbage collector is paced for them
    (:mod:`nodepass.base.collector`, with a full collection once a minute
    when its own have stopped; not in a master whose instances run in
    workers, whose cycles are its API requests' and whose memory is what
    counts).  Worker processes do the same for themselves
    (``nodepass.workers.child``)."""
    from nodepass.base.collector import IdleSweep, pace_collector
    from nodepass.base.limits import raise_open_files_limit
    from nodepass.compat.twisted_fastpath import lean_dispatch

    raise_open_files_limit()
    stop_on_early_signals(reactor)
    lean_dispatch(reactor)
    if not (isinstance(config, MasterConfig) and config.workers > 0):
        pace_collector()
        IdleSweep(reactor).start()


def stop_on_early_signals(reactor: Any) -> None:
    """SIGTERM or SIGINT before the reactor runs stops the process the
    clean way, once the reactor runs, instead of ending it at once.

    twistd starts the service and tells its parent (and so a supervisor or
    an operator's script) that the daemon started before it runs the
    reactor, which is what installs Twisted's signal handlers: a SIGTERM
    in between met Python's default action, and the daemon died without
    stopping its workers or removing its pidfile.  The reactor's own
    handlers replace these when it runs."""
    import signal

    def early(_signum: int, _frame: Any) -> None:
        reactor.callWhenRunning(reactor.stop)

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            signal.signal(sig, early)
        except (ValueError, OSError):  # not the main thread: leave it
            pass


def _mark_twistd(root: NodePassRoot, twistd: Optional[Mapping]) -> None:
    root.under_twistd = True
    # (The reactor is installed by now: twistd installs it before it builds
    # the service.)
    own_process(_global_reactor(), root.config)
    pidfile = twistd.get("pidfile") if twistd is not None else ""
    root.pidfile = os.path.abspath(pidfile) if pidfile else ""


def remove_own_pidfile(path: str) -> None:
    """Remove twistd's pidfile if it names this process (what twistd does
    on a normal exit, skipped when we leave with ``os._exit``)."""
    if not path:
        return
    try:
        with open(path) as f:
            pid = int(f.read().strip() or 0)
        if pid == os.getpid():
            os.unlink(path)
    except (OSError, ValueError):
        pass


def makeService(options: Options) -> NodePassRoot:
    parent = getattr(options, "parent", None)
    observer = twistd_observer(parent, options["config"].log)
    root = build_service(options["config"], state_dir=options["state-dir"], observer=observer)
    _mark_twistd(root, parent)
    return root
