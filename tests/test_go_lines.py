"""Contract tests: the log lines that Go NodePass writes and that dashboards
show and operators grep for, with Go's wording and levels -- per relayed
connection (``Starting exchange`` / ``Exchange complete``), per handshake
(``Tunnel signal``, ``Tunnel handshaked``), at start (``TLS code-N``) and
on restart (``Server restart: URL``).  They pin the shape so that a change
cannot drift from Go's silently.  Real services on loopback."""

from __future__ import annotations

import re

from twisted.trial import unittest

from tests.helpers import Client, PortTaken, close, connect, free_port, listen_tcp, service_up, wait_for
from tests.test_tunnel import FAST, CAMixin, TunnelMixin, d, echo_roundtrip, make_leaf

ADDR = r"(?:\d+\.\d+\.\d+\.\d+|\[[0-9a-f:]+\]):\d+"


class GoLinesMixin:
    def levelled(self, name: str, level: str, pattern: str) -> list[re.Match]:
        """Matches of ``pattern`` in ``name``'s lines logged at ``level``."""
        rx = re.compile(rf"  {level}  {pattern}$")
        return [m for m in (rx.search(line) for line in self.lines.get(name, [])) if m]


class ExchangeLineTests(GoLinesMixin, TunnelMixin, unittest.TestCase):
    async def _exchange(self, flow: str) -> None:
        server, client, entry, (tport, _) = await self.tunnel(flow, "&tls=1")
        self.assertEqual(await echo_roundtrip(entry, b"ping"), b"ping")
        entry_side, exit_side = ("server", "client") if flow == "-" else ("client", "server")
        for name in (entry_side, exit_side):
            await wait_for(lambda: self.levelled(name, "INFO", "Exchange complete: EOF"),
                           what=f"{name}: Exchange complete")
            started = self.levelled(name, "INFO", rf"Starting exchange: ({ADDR}) <-> ({ADDR})")
            self.assertEqual(len(started), 1, self.lines[name])
        # The entry names the user first; the exit names its target first.
        user = self.levelled(entry_side, "INFO", rf"Starting exchange: ({ADDR}) <-> ({ADDR})")[0]
        self.assertNotEqual(user.group(1), f"127.0.0.1:{entry}")
        target = self.levelled(exit_side, "INFO", rf"Starting exchange: ({ADDR}) <-> ({ADDR})")[0]
        self.assertEqual(target.group(1), f"127.0.0.1:{tport}")

    @d
    async def test_reverse_flow(self):
        await self._exchange("-")

    @d
    async def test_forward_flow(self):
        await self._exchange("+")

    @d
    async def test_single_end(self):
        echo, _ = listen_tcp(Client)
        self.addCleanup(echo.stopListening)
        svc = self._service("single", f"client://127.0.0.1:0/127.0.0.1:{echo.getHost().port}?mode=1&log=info", FAST)
        await service_up(svc, "single-end forwarder")
        user = await connect(svc.runner.tcp_port.getHost().port)
        await wait_for(lambda: self.levelled("single", "INFO", rf"Starting exchange: ({ADDR}) <-> ({ADDR})"),
                       what="Starting exchange")
        m = self.levelled("single", "INFO", rf"Starting exchange: ({ADDR}) <-> ({ADDR})")[0]
        self.assertEqual(m.group(2), f"127.0.0.1:{echo.getHost().port}")
        self.assertEqual(m.group(1), f"127.0.0.1:{user.transport.getHost().port}")
        await close(user)
        await wait_for(lambda: self.levelled("single", "INFO", "Exchange complete: EOF"), what="Exchange complete")

    @d
    async def test_quiet_at_warn(self):
        """Below INFO nothing is logged per connection (no cost either): a
        reverse tunnel whose server runs at ``log=warn``."""
        tport, _ = self.echo_targets()
        entry = free_port()
        for attempt in range(5):
            self.tunnel_port = free_port()
            url = f"server://127.0.0.1:{self.tunnel_port}/127.0.0.1:{entry}?log=warn&mode=1&tls=0"
            server = self._service("server", url, FAST)
            try:
                await service_up(server, "server")
                break
            except PortTaken:
                await server.stopService()
                if attempt == 4:
                    raise
        await self.start_client(f"127.0.0.1:{tport}")
        self.assertEqual(server.runner.flow, "-")
        self.assertEqual(await echo_roundtrip(entry, b"ping"), b"ping")
        await wait_for(lambda: server.stats.tcps == 0, what="relay released")
        self.assertFalse(any("exchange" in line for line in self.lines["server"]))


class HandshakeLineTests(GoLinesMixin, TunnelMixin, unittest.TestCase):
    wire = "1.12"

    @d
    async def test_signal_and_handshaked_lines_both_sides(self):
        server, client, entry, _ = await self.tunnel("-", "&tls=0")
        sent = self.levelled("server", "INFO", rf"Tunnel signal -> : np://0@1024/-#0 -> ({ADDR})")
        self.assertEqual(len(sent), 1, self.lines["server"])
        hs = self.levelled("server", "INFO", rf"Tunnel handshaked: ({ADDR}) <-> ({ADDR})")
        self.assertEqual(hs[0].group(1), f"127.0.0.1:{self.tunnel_port}")
        self.assertEqual(hs[0].group(2), sent[0].group(1))
        self.assertTrue(self.levelled("client", "INFO", rf"Tunnel signal <- : np://0@1024/-#0 <- 127\.0\.0\.1:{self.tunnel_port}"))
        chs = self.levelled("client", "INFO", rf"Tunnel handshaked: ({ADDR}) <-> ({ADDR})")
        self.assertEqual((chs[0].group(1), chs[0].group(2)), (hs[0].group(2), f"127.0.0.1:{self.tunnel_port}"))


class HandshakeLines114Tests(GoLinesMixin, CAMixin, unittest.TestCase):
    """SPEC-1.14 §7: the new INFO lines, in order, on both sides."""

    @d
    async def test_lines_in_order_both_sides(self):
        server, client, entry, _ = await self.tunnel("-", "&tls=1")
        await wait_for(lambda: self.logged("server", "TLS certificate fingerprint verified: "), what="server verified")
        await wait_for(lambda: self.logged("client", "TLS certificate fingerprint verified: "), what="client verified")
        config = r"FLOW=-\|MAX=1024\|TLS=1\|TYPE=0"
        for name, word in (("server", "Sending"), ("client", "Loading")):
            order = [
                r"Pending tunnel handshake\.\.\.",
                rf"{word} tunnel config: {config}",
                r"Getting tunnel pool ready\.\.\.",
                r"Marking tunnel handshake as complete in \d+ms",
                r"TLS certificate fingerprint verifying\.\.\.",
                r"TLS certificate fingerprint verified: sha256:(?:[0-9A-F]{2}:){31}[0-9A-F]{2}",
            ]
            positions = []
            for pattern in order:
                found = [i for i, ln in enumerate(self.lines[name]) if re.search(r"\bINFO  " + pattern + "$", ln)]
                self.assertTrue(found, (name, pattern, self.lines[name]))
                positions.append(found[0])
            self.assertEqual(positions, sorted(positions), name)
        # 1.12's lines are gone (SPEC-1.14 §7 "Removed lines").
        for name in ("server", "client"):
            self.assertFalse(self.logged(name, "Tunnel handshaked:"))
            self.assertFalse(self.logged(name, "TLS cert verified:"))
        self.assertTrue(self.logged("client", "Tunnel generation: 1.14"))


class TLSCodeLineTests(GoLinesMixin, CAMixin, unittest.TestCase):
    async def _code_line(self, query: str) -> list[str]:
        await self.start_server("127.0.0.1:9", f"&mode=2{query}")
        return [line for line in self.lines["server"] if "TLS code-" in line]

    @d
    async def test_tls0_warns_unencrypted(self):
        lines = await self._code_line("&tls=0")
        self.assertEqual(len(lines), 1)
        self.assertRegex(lines[0], r"  WARN  TLS code-0: unencrypted$")

    @d
    async def test_tls1_ram_cert(self):
        lines = await self._code_line("&tls=1")
        self.assertRegex(lines[0], r"  INFO  TLS code-1: RAM cert with TLS 1\.3$")

    @d
    async def test_tls1_quic(self):
        lines = await self._code_line("&tls=1&quic=1")
        self.assertRegex(lines[0], r"  INFO  TLS code-1: RAM cert with TLS 1\.3 for QUIC$")

    @d
    async def test_tls2_names_the_certificate(self):
        crt, key = make_leaf(self.dir, self.ca, self.ca_key, "tunnel.example")
        lines = await self._code_line(f"&tls=2&crt={crt}&key={key}")
        self.assertRegex(lines[0], r"  INFO  TLS code-2: tunnel\.example with TLS 1\.3$")

    @d
    async def test_logged_before_the_start_line(self):
        await self._code_line("&tls=1")
        text = "\n".join(self.lines["server"])
        self.assertLess(text.index("TLS code-1"), text.index("Server started: "))


class RestartLineTests(GoLinesMixin, TunnelMixin, unittest.TestCase):
    @d
    async def test_restart_line_carries_the_url(self):
        """A client whose server is not there: error, then after the
        cooldown ``Client restart: URL`` with the same URL as the start
        line would have."""
        from tests.helpers import dead_port

        self.tunnel_port = dead_port()
        client = await self.start_client("127.0.0.1:9", wait=False)
        await wait_for(lambda: self.levelled("client", "INFO", "Client restart: (.*)"), what="restart line")
        url = self.levelled("client", "INFO", "Client restart: (.*)")[0].group(1)
        self.assertEqual(url, client.config.start_url(client.config.mode))
        self.assertTrue(url.startswith("client://"))
        self.assertIn(f"@127.0.0.1:{self.tunnel_port}/127.0.0.1:9?", url)
        self.assertFalse(self.levelled("client", "INFO", "Client started: .*"))


class MasterTLSCodeLineTests(unittest.TestCase):
    """A master logs its TLS code line before its start line, as Go's does."""

    async def _lines(self, query: str) -> list[str]:
        from nodepass.config.urls import parse_url
        from tests.master_helpers import in_process
        from nodepass.base.logs import NodeLog
        from nodepass.master.service import MasterService

        config = in_process(parse_url(f"master://127.0.0.1:0/api?log=info{query}"))
        log = NodeLog("info")
        lines: list[str] = []
        log.listeners.append(lambda level, line: lines.append(line))
        master = MasterService(config, self.mktemp(), tunables=FAST, log=log)
        master.startService()
        self.addCleanup(master.stopService)
        await master.ready
        return lines

    @d
    async def test_plain_master_warns(self):
        lines = await self._lines("")
        code = [i for i, line in enumerate(lines) if "TLS code-" in line]
        started = [i for i, line in enumerate(lines) if "Master started: " in line]
        self.assertEqual(len(code), 1)
        self.assertRegex(lines[code[0]], r"  WARN  TLS code-0: unencrypted$")
        self.assertLess(code[0], started[0])

    @d
    async def test_tls1_master(self):
        lines = await self._lines("&tls=1")
        self.assertTrue(any(line.endswith("  INFO  TLS code-1: RAM cert with TLS 1.3") for line in lines), lines)


class MasterLogEventTests(unittest.TestCase):
    """The exchange lines reach dashboards as SSE ``log`` events."""

    @d
    async def test_exchange_lines_in_sse_log_events(self):
        from tests.master_helpers import in_process, Api, SSEClient, start_master
        from tests.test_master_state import echo_server, send_through
        from tests.helpers import free_port

        master = await start_master(self)
        api = Api(master, self)
        sse = await SSEClient(api).connect()
        target = await echo_server(self)
        entry = free_port()
        code, inst, _ = await api.call(
            "POST", "/instances", {"url": f"client://127.0.0.1:{entry}/127.0.0.1:{target}?mode=1&log=info"}
        )
        self.assertEqual(code, 201, inst)
        await service_up(master.instances[inst["id"]], "instance")
        self.assertEqual(await send_through(entry, b"hello"), b"hello")
        for text in ("Starting exchange: ", "Exchange complete: EOF"):
            ev = await sse.event(
                lambda d, text=text: d["type"] == "log" and d["instance"]["id"] == inst["id"] and text in d["logs"],
                what=f"a log event with {text!r}",
            )
            self.assertRegex(ev["logs"], r"  INFO  " + re.escape(text))
