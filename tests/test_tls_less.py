"""A process without TLS (``nodepass.compat.tls_less``): which configs may
run so, what Twisted gives such a process (checked against the installed
Twisted in a fresh interpreter), and what a later import of TLS says.

The master processes that run so are tested in ``test_workers``
(``WorkerProcessTests``)."""

from __future__ import annotations

import importlib
import json
import sys

import twisted
from twisted.internet import reactor
from twisted.trial import unittest

from nodepass.compat import tls_less
from nodepass.config.urls import parse_url
from nodepass.tap import drop_tls_if_unused, tls_unused
from tests.procs import spawn
from tests.test_tunnel import d

#: Run in a fresh interpreter: TLS dropped, then the reactor and what a
#: plain master imports; prints what a TCP connection and the reactor offer.
PROBE = r"""
import json, sys
from nodepass.compat.tls_less import TLSRefused, is_tls_less, without_tls
first = without_tls("the probe says so")
from twisted.internet import reactor, tcp
from twisted.internet.interfaces import ITLSTransport
import nodepass.master.service, nodepass.tap, nodepass.workers.pool
try:
    import OpenSSL.SSL
    refused = ""
except TLSRefused as e:
    refused = str(e)
print(json.dumps({
    "first": first,
    "again": without_tls("twice"),
    "tls_less": is_tls_less(),
    "start_tls": hasattr(tcp.Connection, "startTLS"),
    "itls": ITLSTransport.implementedBy(tcp.Server),
    "loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("OpenSSL", "cryptography", "service_identity")),
    "refused": refused,
}))
"""


class TLSUnusedTests(unittest.TestCase):
    def test_only_a_plain_master_with_workers_or_a_single_end_forwarder(self) -> None:
        cases = {
            "master://127.0.0.1:0?workers=2": True,
            "master://127.0.0.1:0?workers=1&tls=0": True,
            "master://127.0.0.1:0?workers=0": False,  # instances run in the master
            "master://127.0.0.1:0?workers=2&tls=1": False,  # an HTTPS API
            "server://127.0.0.1:0/127.0.0.1:1": False,
            "client://127.0.0.1:1/127.0.0.1:2": False,  # learns TLS from its server
            "client://127.0.0.1:0/127.0.0.1:2?mode=1": True,  # single-end, forced
            "client://127.0.0.1:0/127.0.0.1:2?mode=0": False,  # may turn out dual-end
            "client://127.0.0.1:1/127.0.0.1:2?mode=2": False,
            "server://127.0.0.1:0/127.0.0.1:1?tls=0": False,  # (a QUIC pool is TLS whatever tls says)
        }
        for url, unused in cases.items():
            self.assertEqual(tls_unused(parse_url(url)), unused, url)

    def test_too_late_in_a_process_with_the_reactor(self) -> None:
        """This process has the reactor (and TLS) loaded: nothing changes."""
        self.assertIn("twisted.internet.tcp", sys.modules)
        self.assertFalse(drop_tls_if_unused(parse_url("master://127.0.0.1:0?workers=2")))
        self.assertFalse(tls_less.without_tls("too late"))
        self.assertFalse(tls_less.is_tls_less())
        self.assertEqual(importlib.import_module("OpenSSL.SSL").__name__, "OpenSSL.SSL")  # still importable here


class TLSLessProcessTests(unittest.TestCase):
    @d
    async def test_twisted_runs_tcp_without_tls(self) -> None:
        proc = spawn(self, ["-c", PROBE])
        status = await proc.ended.addTimeout(30, reactor)
        self.assertEqual(status, 0, proc.text())
        got = json.loads(proc.out.decode().strip().splitlines()[-1])
        where = f"Twisted {twisted.__version__}, relied on by nodepass/compat/tls_less.py"
        self.assertTrue(got["first"], "without_tls refused before the reactor was imported")
        self.assertTrue(got["again"] and got["tls_less"])
        self.assertEqual(got["loaded"], [], f"{where}: TLS loaded anyway")
        self.assertFalse(got["start_tls"], f"{where}: tcp.Connection has startTLS without TLS")
        self.assertFalse(got["itls"], f"{where}: tcp.Server provides ITLSTransport without TLS")
        self.assertEqual(
            got["refused"],
            "OpenSSL is not loaded in this process: the probe says so",
        )


class TLSLessForwarderTests(unittest.TestCase):
    @d
    async def test_a_single_end_forwarder_runs_without_tls(self) -> None:
        """``nodepass client://...?mode=1`` (a forwarder on its own) does
        without pyOpenSSL and cryptography, and forwards."""
        from tests.helpers import free_port
        from tests.test_master_state import echo_server, send_through
        from tests.test_workers import tls_loaded

        target = await echo_server(self)
        entry = free_port()
        proc = spawn(self, ["-m", "nodepass.cli", f"client://127.0.0.1:{entry}/127.0.0.1:{target}?mode=1&log=info"])
        await proc.wait_for(r"Client started: ", timeout=20)
        payload = b"through a forwarder without TLS" * 1000
        self.assertEqual(await send_through(entry, payload), payload)
        self.assertFalse(tls_loaded(proc.transport.pid), "the single-end forwarder loaded TLS")
        self.assertNotIn("Traceback", proc.text())
