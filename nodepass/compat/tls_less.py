"""A process that needs no TLS runs without pyOpenSSL and cryptography.

Importing ``twisted.internet.reactor`` loads pyOpenSSL and cryptography
(``tcp`` -> ``_newtls`` -> ``twisted.protocols.tls`` -> ``OpenSSL``): about
12 MB of RSS per process here, a quarter of a worker's (docs/benchmarks.md,
run U).  A master whose instances all run in worker processes and whose API
is plain HTTP never makes a TLS connection, nor does a single-end forwarder
(``nodepass.tap.tls_unused`` decides), so they need not carry them.

Twisted supports this: when ``twisted.internet._newtls`` cannot be imported,
``twisted.internet.tcp`` builds its connections without ``startTLS``
(``ITLSTransport`` is not provided) and the reactor's ``listenSSL`` and
``connectSSL`` are unavailable.  :func:`without_tls` makes that import fail
on purpose, before the reactor is imported, and keeps failing any later
import of pyOpenSSL or cryptography with an error that says why (so nothing
runs half with TLS).  ``tests/test_tls_less.py`` checks that fallback
against the installed Twisted.
"""

from __future__ import annotations

import importlib.abc
import sys
from typing import Any, Optional, Sequence

#: Top-level packages a TLS-less process refuses to import.
REFUSED = ("OpenSSL", "cryptography", "service_identity")

#: Modules whose presence means TLS is loaded already (or the reactor,
#: which loads it): too late to do without.
_TOO_LATE = ("OpenSSL", "twisted.internet.tcp")


class TLSRefused(ImportError):
    """Raised by an import of pyOpenSSL or cryptography in a TLS-less
    process: some code path needs TLS that this process was started
    without."""


class _RefuseTLS(importlib.abc.MetaPathFinder):
    """A meta path finder that fails the import of :data:`REFUSED`."""

    def __init__(self, why: str) -> None:
        self.why = why

    def find_spec(self, fullname: str, path: Optional[Sequence[str]], target: Any = None) -> None:
        if fullname.partition(".")[0] in REFUSED:
            raise TLSRefused(f"{fullname} is not loaded in this process: {self.why}", name=fullname)
        return None


def without_tls(why: str) -> bool:
    """Run this process without TLS: call before anything imports the
    reactor.  ``why`` is said by the error any later import of pyOpenSSL or
    cryptography raises.  Returns False (and changes nothing) when it is too
    late, because TLS or the reactor is loaded already; True when it is
    in force already."""
    if is_tls_less():
        return True
    if any(name in sys.modules for name in _TOO_LATE):
        return False
    sys.meta_path.insert(0, _RefuseTLS(why))
    return True


def is_tls_less() -> bool:
    """Whether :func:`without_tls` is in force in this process."""
    return any(isinstance(finder, _RefuseTLS) for finder in sys.meta_path)
