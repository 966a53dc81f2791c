"""Protocol blocking, ``block=`` (SPEC-1.14 §5.1): the classifier's vectors
and its agreement with SPEC's 8-byte rule, the screen's timeout on a
``task.Clock``, and real sockets on loopback through a single-end forwarder
and both dual-end flows."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import error, task
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from nodepass.base.kinds import BlockedProtocol
from nodepass.config.urls import Address, parse_url
from nodepass.relay.block import DETECT_TIMEOUT, PROBE_LENGTH, Blocked, Decision, ScreenedEnd, Verdict, classify
from tests import examples
from tests.helpers import Client, close, connect, ipv6_available, listen_tcp, wait_for
from tests.test_single import ForwarderMixin, d
from tests.test_tunnel import TunnelMixin

SOCKS, HTTP, TLS = BlockedProtocol.SOCKS, BlockedProtocol.HTTP, BlockedProtocol.TLS
ALL = frozenset(BlockedProtocol)

SOCKS4_CONNECT = b"\x04\x01\x00\x50\x7f\x00\x00\x01user\x00"
SOCKS5_GREETING = b"\x05\x01\x00"  # 3 bytes: Go would hold it, undecided
HTTP_GET = b"GET / HTTP/1.1\r\nHost: example\r\n\r\n"
TLS_HELLO = b"\x16\x03\x01\x00\x2f\x01\x00\x00\x2b\x03\x03" + bytes(32)
BANNER = b"220 hello\r\n"


def spec_rule(first8: bytes, flags: frozenset[BlockedProtocol]) -> Decision:
    """SPEC-1.14 §5.1's table, as written, on exactly 8 bytes."""
    assert len(first8) == 8
    b0, b1 = first8[0], first8[1]
    if SOCKS in flags:
        if b0 == 0x04 and b1 in (0x01, 0x02):
            return Blocked(SOCKS, "SOCKS4")
        if b0 == 0x05 and 0x01 <= b1 <= 0x03:
            return Blocked(SOCKS, "SOCKS5")
    if HTTP in flags and re.match(rb"[A-Z]{1,7} ", first8):
        return Blocked(HTTP, "HTTP")
    if TLS in flags and b0 == 0x16:
        return Blocked(TLS, "TLS")
    return Verdict.ALLOW


def flags_of(block: str) -> frozenset[BlockedProtocol]:
    """What an instance URL's ``block=`` enables."""
    return parse_url(f"client://127.0.0.1:1/127.0.0.1:2?block={block}").blocked


# Bytes that make the rules' interesting cases likely, and any byte at all.
_interesting = st.sampled_from(list(b"\x00\x01\x02\x03\x04\x05\x16 AGTZ@[a"))
_byte = st.one_of(_interesting, st.integers(0, 255))
_flags = st.frozensets(st.sampled_from(list(BlockedProtocol)))


class ClassifierTests(unittest.TestCase):
    def test_each_protocol_blocked(self) -> None:
        cases = [
            (b"\x04\x01", SOCKS, "SOCKS4"),
            (b"\x04\x02", SOCKS, "SOCKS4"),
            (SOCKS4_CONNECT, SOCKS, "SOCKS4"),
            (b"\x05\x01", SOCKS, "SOCKS5"),
            (b"\x05\x03\x00\x01\x02", SOCKS, "SOCKS5"),
            (SOCKS5_GREETING, SOCKS, "SOCKS5"),
            (HTTP_GET, HTTP, "HTTP"),
            (b"POST /x", HTTP, "HTTP"),
            (b"CONNECT host:443", HTTP, "HTTP"),
            (b"OPTIONS *", HTTP, "HTTP"),
            (b"A ", HTTP, "HTTP"),
            (b"\x16", TLS, "TLS"),
            (TLS_HELLO, TLS, "TLS"),
        ]
        for data, protocol, label in cases:
            self.assertEqual(classify(data, ALL), Blocked(protocol, label), data)
            self.assertEqual(classify(data, frozenset({protocol})), Blocked(protocol, label), data)
            # its own flag off, the others on: allowed
            self.assertEqual(classify(data, ALL - {protocol}), Verdict.ALLOW, data)

    def test_near_misses_allowed(self) -> None:
        for data in (
            b"\x04\x03\x00\x00",  # SOCKS4 with an unknown command
            b"\x05\x00\x00",  # SOCKS5 with no methods
            b"\x05\x04\x00",
            b"get / HTTP/1.1\r\n",  # lowercase method
            b"PROPFIND / HTTP/1.1",  # 8 letters: the space is the 9th byte
            b"GET/ HTTP/1.1",
            b" GET / ",
            b"\x17\x03\x03\x00\x10",  # TLS application data, not a handshake
            b"SSH-2.0-OpenSSH_9.6\r\n",
            b"\x00\x00\x00\x00\x00\x00\x00\x00",
        ):
            self.assertEqual(classify(data, ALL), Verdict.ALLOW, data)

    def test_flag_spellings(self) -> None:
        """``block=13``, ``31`` and ``1,3`` all mean SOCKS + TLS."""
        for block in ("13", "31", "1,3"):
            flags = flags_of(block)
            self.assertEqual(flags, frozenset({SOCKS, TLS}), block)
            self.assertEqual(classify(SOCKS5_GREETING, flags), Blocked(SOCKS, "SOCKS5"))
            self.assertEqual(classify(TLS_HELLO, flags), Blocked(TLS, "TLS"))
            self.assertEqual(classify(HTTP_GET, flags), Verdict.ALLOW)
        self.assertEqual(flags_of("0"), frozenset())
        self.assertEqual(flags_of("123"), ALL)

    def test_no_flags_allow_everything(self) -> None:
        for data in (b"", b"\x05", SOCKS5_GREETING, HTTP_GET, TLS_HELLO):
            self.assertEqual(classify(data, frozenset()), Verdict.ALLOW)

    def test_short_prefixes(self) -> None:
        """Decided as soon as the bytes so far settle it, never later than
        the 8th byte."""
        self.assertEqual(classify(b"", ALL), Verdict.NEED_MORE)
        self.assertEqual(classify(b"\x05", ALL), Verdict.NEED_MORE)
        self.assertEqual(classify(b"\x04", ALL), Verdict.NEED_MORE)
        self.assertEqual(classify(b"\x05", frozenset({HTTP, TLS})), Verdict.ALLOW)
        self.assertEqual(classify(b"G", ALL), Verdict.NEED_MORE)
        self.assertEqual(classify(b"GET", ALL), Verdict.NEED_MORE)
        self.assertEqual(classify(b"GET ", ALL), Blocked(HTTP, "HTTP"))
        self.assertEqual(classify(b"GETX", ALL), Verdict.NEED_MORE)
        self.assertEqual(classify(b"GETXXXX", ALL), Verdict.NEED_MORE)
        self.assertEqual(classify(b"GETXXXX ", ALL), Blocked(HTTP, "HTTP"))
        self.assertEqual(classify(b"GETXXXXX", ALL), Verdict.ALLOW)
        self.assertEqual(classify(b"GET", frozenset({SOCKS, TLS})), Verdict.ALLOW)
        self.assertEqual(classify(b"\x00", ALL), Verdict.ALLOW)
        self.assertEqual(classify(b"\x16", frozenset({TLS})), Blocked(TLS, "TLS"))

    @settings(max_examples=examples(1000))
    @given(st.lists(_byte, min_size=PROBE_LENGTH, max_size=PROBE_LENGTH + 8).map(bytes), _flags)
    def test_agrees_with_the_8_byte_rule(self, data: bytes, flags: frozenset[BlockedProtocol]) -> None:
        """With 8 bytes or more the answer is SPEC's; on any shorter prefix
        it is NEED_MORE or already that same answer."""
        expected = spec_rule(data[:PROBE_LENGTH], flags)
        self.assertEqual(classify(data, flags), expected)
        for k in range(PROBE_LENGTH):
            early = classify(data[:k], flags)
            self.assertIn(early, (Verdict.NEED_MORE, expected), (data[:k], flags))


class ScreenClockTests(unittest.TestCase):
    """The screen of one end, with a ``task.Clock`` for time."""

    def end(self) -> tuple[ScreenedEnd, StringTransport]:
        transport = StringTransport()
        end = ScreenedEnd()
        end.makeConnection(transport)
        end.hold()
        return end, transport

    def test_timeout_allows_what_was_read(self) -> None:
        clock = task.Clock()
        end, transport = self.end()
        got: list[Decision] = []
        end.screen(ALL, clock).addCallback(got.append)
        self.assertEqual(transport.producerState, "producing")  # reading to judge
        end.dataReceived(b"\x05")  # a SOCKS5 version byte, then silence
        self.assertEqual(transport.producerState, "producing")
        clock.advance(DETECT_TIMEOUT - 0.01)
        self.assertEqual(got, [])
        clock.advance(0.01)
        self.assertEqual(got, [Verdict.ALLOW])
        self.assertEqual(transport.producerState, "paused")  # held for the splice
        self.assertEqual(end.take_early(), b"\x05")
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertFalse(IHalfCloseableProtocol.providedBy(end))

    def test_silent_client_allowed_after_timeout(self) -> None:
        clock = task.Clock()
        end, transport = self.end()
        d = end.screen(ALL, clock)
        self.assertFalse(d.called)
        clock.advance(DETECT_TIMEOUT)
        self.assertEqual(self.successResultOf(d), Verdict.ALLOW)
        self.assertEqual(end.screened_bytes, 0)

    def test_decided_in_pieces_cancels_the_timer(self) -> None:
        clock = task.Clock()
        end, transport = self.end()
        d = end.screen(ALL, clock)
        end.dataReceived(b"GE")
        self.assertFalse(d.called)
        end.dataReceived(b"T / HTTP/1.1\r\n")
        self.assertEqual(self.successResultOf(d), Blocked(HTTP, "HTTP"))
        self.assertEqual(end.screened_bytes, 16)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(transport.producerState, "paused")

    def test_half_close_allows(self) -> None:
        clock = task.Clock()
        end, _transport = self.end()
        d = end.screen(ALL, clock)
        self.assertTrue(IHalfCloseableProtocol.providedBy(end))
        end.dataReceived(b"GET")
        end.readConnectionLost()
        self.assertEqual(self.successResultOf(d), Verdict.ALLOW)
        self.assertFalse(end.lost)
        self.assertFalse(IHalfCloseableProtocol.providedBy(end))
        self.assertEqual(end.take_early(), b"GET")
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_lost_connection_ends_the_screen(self) -> None:
        clock = task.Clock()
        end, _transport = self.end()
        d = end.screen(ALL, clock)
        end.connectionLost(Failure(error.ConnectionLost()))
        self.assertEqual(self.successResultOf(d), Verdict.ALLOW)
        self.assertTrue(end.lost)
        self.assertEqual(clock.getDelayedCalls(), [])


# -- real sockets ---------------------------------------------------------


class CloseRecorder(Client):
    """A client that also keeps how its connection ended."""

    reason = None

    def connectionLost(self, reason) -> None:
        self.reason = reason
        super().connectionLost(reason)


class BannerEcho(Protocol):
    """A target that sends ``banner`` (set on the factory's attributes) as
    soon as it accepts, then echoes: an SMTP-like server-first protocol."""

    banner = b""

    def connectionMade(self) -> None:
        self.received = b""
        if self.banner:
            self.transport.write(self.banner)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self.transport.write(data)


class BlockAssertions:
    """Checks shared by the single-end and dual-end tests; the test sets
    ``target_factory`` and implements ``side_lines``."""

    target_factory: object

    def side_lines(self, side: str) -> list[str]:
        """The log lines of ``side`` (``client`` or ``server``)."""
        raise NotImplementedError

    def blocked_lines(self, side: str) -> list[str]:
        return [line for line in self.side_lines(side) if "  WARN  " in line and ": blocked " in line]

    async def refused(self, port: int, payload: bytes, side: str, loop: str, label: str, host: str = "127.0.0.1"):
        """``payload`` on a new connection is refused: a clean close, no
        answer, the target never reached, and one exact WARN line."""
        accepted = self.target_factory.accepted
        before = len(self.blocked_lines(side))
        client = await connect(port, host=host, protocol_class=CloseRecorder)
        peer = str(Address(host, client.transport.getHost().port))
        client.transport.write(payload)
        self.assertEqual(await client.lost, b"")
        self.assertTrue(client.reason.check(error.ConnectionDone), client.reason)  # FIN, not RST
        self.assertEqual(self.target_factory.accepted, accepted)
        expected = f"  WARN  {loop}: blocked {label} protocol from {peer}"
        blocked = self.blocked_lines(side)
        self.assertEqual(len(blocked), before + 1, blocked)
        self.assertTrue(blocked[-1].endswith(expected), (blocked[-1], expected))

    async def echoed(self, port: int, payload: bytes) -> None:
        client = await connect(port)
        client.transport.write(payload)
        self.assertEqual(await client.wait_bytes(len(payload)), payload)
        await close(client)

    async def banner_first(self, port: int) -> None:
        """The client sends nothing until it has read the banner."""
        client = await connect(port)
        self.assertEqual(await client.wait_bytes(len(BANNER)), BANNER)
        client.transport.write(b"EHLO example\r\n")
        self.assertEqual(await client.wait_bytes(len(BANNER) + 14), BANNER + b"EHLO example\r\n")
        await close(client)


class SingleEndBlockTests(BlockAssertions, ForwarderMixin, unittest.TestCase):
    """The single-end client (``mode=1``) screens its users."""

    async def forwarder(self, block: str, banner: bytes = b"", host: str = "127.0.0.1") -> int:
        listening, self.target_factory = listen_tcp(BannerEcho, host=host, banner=banner)
        self.addCleanup(listening.stopListening)
        tport = listening.getHost().port
        return await self.start_forwarder(str(Address(host, tport)), f"&block={block}", host=host)

    def side_lines(self, side: str) -> list[str]:
        return self.lines

    async def _refused(self, payload: bytes, label: str) -> None:
        fport = await self.forwarder("123")
        await self.refused(fport, payload, "client", "singleTCPLoop", label)
        stats = self.service.stats
        self.assertEqual(stats.tcp_rx, len(payload))  # the bytes read count as RX
        self.assertEqual(stats.tcp_tx, 0)
        self.assertEqual(stats.tcps, 0)  # the slot is back

    @d
    async def test_socks5_blocked(self) -> None:
        await self._refused(SOCKS5_GREETING, "SOCKS5")

    @d
    async def test_socks4_blocked(self) -> None:
        await self._refused(SOCKS4_CONNECT, "SOCKS4")

    @d
    async def test_http_blocked(self) -> None:
        await self._refused(HTTP_GET, "HTTP")

    @d
    async def test_tls_blocked(self) -> None:
        await self._refused(TLS_HELLO, "TLS")

    @d
    async def test_ipv6_peer_bracketed(self) -> None:
        self.assertTrue(ipv6_available(), "this test needs ::1")
        fport = await self.forwarder("3", host="::1")
        await self.refused(fport, TLS_HELLO, "client", "singleTCPLoop", "TLS", host="::1")

    @d
    async def test_allowed_when_flag_off(self) -> None:
        fport = await self.forwarder("0")
        for payload in (SOCKS5_GREETING, HTTP_GET, TLS_HELLO):
            await self.echoed(fport, payload)
        self.assertEqual(self.blocked_lines("client"), [])

    @d
    async def test_only_enabled_flags(self) -> None:
        """``block=1,3``: SOCKS and TLS refused, HTTP relayed."""
        fport = await self.forwarder("1,3")
        await self.echoed(fport, HTTP_GET)
        self.assertEqual(self.target_factory.accepted, 1)
        await self.refused(fport, TLS_HELLO, "client", "singleTCPLoop", "TLS")
        self.assertEqual(self.target_factory.accepted, 1)

    @d
    async def test_server_speaks_first(self) -> None:
        fport = await self.forwarder("123", banner=BANNER)
        await self.banner_first(fport)
        self.assertEqual(self.blocked_lines("client"), [])

    @d
    async def test_half_close_forwards_short_prefix(self) -> None:
        """``GET`` and a FIN before the screen could judge it: the three
        bytes reach the target."""
        fport = await self.forwarder("123")
        client = await connect(fport)
        client.transport.write(b"GET")
        client.transport.loseWriteConnection()
        await wait_for(
            lambda: self.target_factory.connections and self.target_factory.connections[0].received == b"GET",
            what="short prefix at the target",
        )
        await client.lost
        self.assertEqual(self.blocked_lines("client"), [])


class DualEndBlockTests(BlockAssertions, TunnelMixin, unittest.TestCase):
    """The dual-end entry screens its users, in both flows; the exit never
    does."""

    banner = b""

    def echo_targets(self):
        """The tunnel's TCP target: a :class:`BannerEcho` whose accepts are
        counted (the exit must never dial it for a refused user)."""
        listening, self.target_factory = listen_tcp(BannerEcho, banner=self.banner)
        self.addCleanup(listening.stopListening)
        port = listening.getHost().port
        return port, port

    def side_lines(self, side: str) -> list[str]:
        return self.lines.get(side, [])

    async def _refused(self, flow: str, payload: bytes, label: str) -> None:
        entry_side = "server" if flow == "-" else "client"
        query = "&block=123"
        server, client, entry, _ = await self.tunnel(
            flow, query if flow == "-" else "", client_query=query if flow == "+" else ""
        )
        entry_svc = server if flow == "-" else client
        exit_svc = client if flow == "-" else server
        await self.refused(entry, payload, entry_side, "commonTCPLoop", label)
        self.assertEqual(entry_svc.stats.tcp_rx, len(payload))
        self.assertEqual(entry_svc.stats.tcp_tx, 0)
        self.assertEqual(entry_svc.stats.tcps, 0)
        self.assertEqual((exit_svc.stats.tcp_rx, exit_svc.stats.tcp_tx, exit_svc.stats.tcps), (0, 0, 0))
        self.assertFalse(self.logged(entry_side, "Starting exchange"))

    @d
    async def test_reverse_socks5_blocked(self) -> None:
        await self._refused("-", SOCKS5_GREETING, "SOCKS5")

    @d
    async def test_reverse_http_blocked(self) -> None:
        await self._refused("-", HTTP_GET, "HTTP")

    @d
    async def test_reverse_tls_blocked(self) -> None:
        await self._refused("-", TLS_HELLO, "TLS")

    @d
    async def test_forward_socks5_blocked(self) -> None:
        await self._refused("+", SOCKS5_GREETING, "SOCKS5")

    @d
    async def test_forward_http_blocked(self) -> None:
        await self._refused("+", HTTP_GET, "HTTP")

    @d
    async def test_forward_tls_blocked(self) -> None:
        await self._refused("+", TLS_HELLO, "TLS")

    @d
    async def test_allowed_when_flag_off(self) -> None:
        """``block=2`` on the entry: SOCKS and TLS pass, HTTP does not."""
        _server, _client, entry, _ = await self.tunnel("-", "&block=2")
        await self.echoed(entry, SOCKS5_GREETING)
        await self.echoed(entry, TLS_HELLO)
        self.assertEqual(self.blocked_lines("server"), [])
        self.assertEqual(self.target_factory.accepted, 2)

    @d
    async def test_exit_side_never_screens(self) -> None:
        """Each side uses its own value: ``block=123`` on the exit (the
        client, flow ``-``) blocks nothing."""
        _server, _client, entry, _ = await self.tunnel("-", client_query="&block=123")
        for payload in (SOCKS5_GREETING, HTTP_GET, TLS_HELLO):
            await self.echoed(entry, payload)
        self.assertEqual(self.blocked_lines("client") + self.blocked_lines("server"), [])

    @d
    async def test_server_speaks_first(self) -> None:
        self.banner = BANNER
        _server, _client, entry, _ = await self.tunnel("-", "&block=123")
        await self.banner_first(entry)
        self.assertEqual(self.blocked_lines("server"), [])
