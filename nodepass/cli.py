"""The ``nodepass`` console script: one instance URL, run in the foreground
exactly like the Go binary (``nodepass "client://..."``)."""

from __future__ import annotations

import sys
from typing import Any, Optional, Sequence

from nodepass import __version__
from nodepass.config.urls import URLError, parse_url

USAGE = """usage: nodepass [--state-dir DIR] URL

  nodepass "server://[KEY@]HOST:PORT/TARGET[,TARGET...]?log=info&tls=0..."
  nodepass "client://[KEY@]HOST:PORT/TARGET[,TARGET...]?min=64&mode=0..."
  nodepass "master://127.0.0.1:9090/api?log=info"
"""


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    state_dir = None
    urls = []
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help", "help"):
            sys.stdout.write(USAGE)
            return 0
        if arg in ("-v", "--version", "version"):
            sys.stdout.write(f"nodepass-py {__version__}\n")
            return 0
        if arg == "--state-dir":
            if not args:
                sys.stderr.write("nodepass: --state-dir needs a directory\n")
                return 2
            state_dir = args.pop(0)
        elif arg.startswith("--state-dir="):
            state_dir = arg.split("=", 1)[1]
        else:
            urls.append(arg)
    if len(urls) != 1:
        sys.stderr.write("nodepass: expected exactly one instance URL (see --help)\n")
        return 2
    try:
        config = parse_url(urls[0])
    except URLError as e:
        sys.stderr.write(f"nodepass: {e}\n")
        return 2

    from nodepass.tap import drop_tls_if_unused

    drop_tls_if_unused(config)  # before the reactor is imported

    from twisted.internet import reactor as installed

    from nodepass.base.logs import start_console_logging

    reactor: Any = installed  # mypy cannot call the zope interfaces it is typed with
    from nodepass.tap import build_service, own_process

    own_process(reactor, config)

    observer = start_console_logging(config.log)
    root = build_service(config, state_dir=state_dir, observer=observer)
    reactor.callWhenRunning(root.startService)
    reactor.addSystemEventTrigger("before", "shutdown", root.stopService)
    reactor.run()
    return root.exit_status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
