"""Protocol blocking on the entry side, ``block=`` (SPEC-1.14 §5.1).

Two layers:

* :func:`classify` is sans-I/O: given the first bytes of a user connection
  and the enabled flags it answers :attr:`Verdict.NEED_MORE`,
  :attr:`Verdict.ALLOW` or :class:`Blocked`.  SPEC's rule looks at exactly
  8 bytes, and Go waits for them with no timeout.  We answer as soon as the
  bytes so far settle the question (``16`` is TLS, ``05 01`` is SOCKS5,
  ``GET `` is HTTP, a first byte no enabled protocol starts with is
  allowed), and for 8 bytes or more the answer is always the 8-byte rule's.
  So a client that sends a short greeting and then waits for the server
  (a SOCKS5 greeting is 3 bytes) is still judged.

* :class:`ScreenedEnd` is the Twisted side: an accepted user connection
  that reads, pre-splice, until :func:`classify` decides, the user
  half-closes or closes, or :data:`DETECT_TIMEOUT` passes.  An undecided
  prefix is allowed, so protocols where the server speaks first (SMTP, FTP,
  MySQL: the client sends nothing until it sees a banner) keep working
  with any flag set, where Go would hold them forever.  :func:`refuse`
  closes a blocked connection the way SPEC says.

UDP is never screened.
"""

from __future__ import annotations

import enum
from typing import Any, Callable, Collection, Optional, Union

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from zope.interface import alsoProvides, directlyProvidedBy, noLongerProvides

from nodepass.base.kinds import BlockedProtocol
from nodepass.base.logs import NodeLog
from nodepass.base.stats import InstanceStats
from nodepass.base.timers import ClockLike
from nodepass.config.urls import join_host_port
from nodepass.relay.core import RelayEnd

#: How many leading bytes SPEC's rule inspects.  No answer ever needs more.
PROBE_LENGTH = 8

#: Seconds an entry connection may stay undecided before it is allowed with
#: what it sent so far.  Clients of the blockable protocols send their first
#: bytes right after connecting, so a real SOCKS/HTTP/TLS client is judged
#: long before this; the timeout only matters for clients that wait for the
#: server to speak first (their banner is delayed by at most this much) or
#: that send fewer bytes than the rule needs and then wait.  Short, so such
#: users barely notice; long enough that a client's first segment after the
#: TCP handshake, even across a slow link, arrives in time.
DETECT_TIMEOUT = 0.5

_SPACE = 0x20
_A, _Z = 0x41, 0x5A


class Verdict(enum.Enum):
    """An answer of :func:`classify` that blocks nothing."""

    #: The bytes so far match the start of an enabled protocol: read more.
    NEED_MORE = "need more"
    #: No enabled protocol can match: relay the connection.
    ALLOW = "allow"


@attrs.frozen
class Blocked:
    """The connection speaks an enabled protocol and must be refused;
    ``label`` is how the WARN line names it (``SOCKS4``, ``SOCKS5``,
    ``HTTP``, ``TLS``)."""

    protocol: BlockedProtocol
    label: str


#: What :func:`classify` answers.
Decision = Union[Verdict, Blocked]


class _Match(enum.Enum):
    """One rule's answer on a (possibly short) prefix."""

    YES = "yes"
    NO = "no"
    UNKNOWN = "unknown"  # a longer prefix could still go either way


def _socks(p: bytes) -> tuple[_Match, str]:
    """``04`` then ``01|02`` (SOCKS4 CONNECT/BIND), or ``05`` then
    ``01..03`` (SOCKS5 greeting with 1-3 methods)."""
    if not p:
        return _Match.UNKNOWN, ""
    b0 = p[0]
    if b0 not in (4, 5):
        return _Match.NO, ""
    if len(p) < 2:
        return _Match.UNKNOWN, ""
    b1 = p[1]
    if b0 == 4:
        return (_Match.YES, "SOCKS4") if b1 in (1, 2) else (_Match.NO, "")
    return (_Match.YES, "SOCKS5") if 1 <= b1 <= 3 else (_Match.NO, "")


def _http(p: bytes) -> tuple[_Match, str]:
    """An uppercase method of 1-7 letters followed by a space within the
    first 8 bytes (``GET ``, ``CONNECT ``; not ``PROPFIND `` nor ``get ``)."""
    if not p:
        return _Match.UNKNOWN, ""
    if not _A <= p[0] <= _Z:
        return _Match.NO, ""
    for i in range(1, PROBE_LENGTH):
        if i >= len(p):
            return _Match.UNKNOWN, ""
        c = p[i]
        if c == _SPACE:
            return _Match.YES, "HTTP"
        if not _A <= c <= _Z:
            return _Match.NO, ""
    return _Match.NO, ""  # eight letters: no room left for the space


def _tls(p: bytes) -> tuple[_Match, str]:
    """A TLS handshake record (``16``)."""
    if not p:
        return _Match.UNKNOWN, ""
    return (_Match.YES, "TLS") if p[0] == 0x16 else (_Match.NO, "")


#: SPEC's order of the checks.
_RULES: tuple[tuple[BlockedProtocol, Callable[[bytes], tuple[_Match, str]]], ...] = (
    (BlockedProtocol.SOCKS, _socks),
    (BlockedProtocol.HTTP, _http),
    (BlockedProtocol.TLS, _tls),
)


def classify(prefix: bytes, flags: Collection[BlockedProtocol]) -> Decision:
    """Judge the first bytes of a user connection against the enabled
    ``flags``.  Bytes past :data:`PROBE_LENGTH` are ignored.

    A rule that matches is only trusted once every rule checked before it
    has failed, so the label is always the one the 8-byte rule would give;
    an undecided rule (before any match) means :attr:`Verdict.NEED_MORE`.
    With :data:`PROBE_LENGTH` bytes or more no rule is undecided."""
    p = bytes(prefix[:PROBE_LENGTH])
    for protocol, rule in _RULES:
        if protocol not in flags:
            continue
        match, label = rule(p)
        if match is _Match.UNKNOWN:
            return Verdict.NEED_MORE
        if match is _Match.YES:
            return Blocked(protocol, label)
    return Verdict.ALLOW


# -- the Twisted side -----------------------------------------------------


class ScreenedEnd(RelayEnd):
    """An accepted user connection that ``block=`` may screen before it is
    relayed (the dual-end entry's users, the single-end client's users).

    :meth:`screen` reads while the end is not yet spliced: every chunk goes
    to :class:`RelayEnd`'s early buffer as usual (and is replayed in front
    of the stream once spliced), and is also shown to :func:`classify`.
    While screening, the end is half-closeable: a user's FIN ends screening
    (the connection is allowed) without closing the end, so the bytes read
    before it still reach the target; the relay sees the FIN once it reads
    again.  Outside screening the end behaves as a plain :class:`RelayEnd`.
    """

    def __init__(self) -> None:
        super().__init__()
        #: Bytes read while screening (the TCP RX of a refused connection).
        self.screened_bytes = 0
        self._prefix = b""
        self._flags: Collection[BlockedProtocol] = frozenset()
        self._screening: Optional[Deferred[Decision]] = None
        self._timer: Any = None  # IDelayedCall

    def screen(
        self, flags: Collection[BlockedProtocol], clock: ClockLike, timeout: float = DETECT_TIMEOUT
    ) -> Deferred[Decision]:
        """Read the user's first bytes until they are judged.

        Call it right after :meth:`RelayEnd.hold`.  Fires with a
        :class:`Blocked`, or with :attr:`Verdict.ALLOW` when no enabled
        protocol matched, the user half-closed, ``timeout`` seconds passed
        undecided, or the connection was lost (callers check
        :attr:`RelayEnd.lost`).  Reading is held again when it fires, with
        everything read kept for the splice."""
        assert self._screening is None, "screen() twice"
        early = b"".join(self._early)
        self._prefix = early[:PROBE_LENGTH]
        self.screened_bytes = len(early)
        first = classify(self._prefix, flags)
        if first is not Verdict.NEED_MORE or self.lost:
            return succeed(Verdict.ALLOW if self.lost else first)
        self._flags = flags
        d: Deferred[Decision] = Deferred()
        self._screening = d
        self._timer = clock.callLater(timeout, self._decide, Verdict.ALLOW)
        alsoProvides(self, IHalfCloseableProtocol)
        assert self.gate is not None
        self.gate.resume("splice")
        return d

    def _decide(self, decision: Decision) -> None:
        d, self._screening = self._screening, None
        if d is None:
            return
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if IHalfCloseableProtocol in directlyProvidedBy(self):
            noLongerProvides(self, IHalfCloseableProtocol)
        if not self.lost:
            self.hold()
        d.callback(decision)

    def dataReceived(self, data: bytes | memoryview) -> None:
        super().dataReceived(data)
        if self._screening is None or self.relay is not None:
            return
        self.screened_bytes += len(data)
        if len(self._prefix) < PROBE_LENGTH:
            self._prefix += bytes(data[: PROBE_LENGTH - len(self._prefix)])
        decision = classify(self._prefix, self._flags)
        if decision is Verdict.NEED_MORE:
            assert self.gate is not None
            self.gate.resume("splice")  # dataReceived paused it: read on
        else:
            self._decide(decision)

    # IHalfCloseableProtocol, provided only while screening.
    def readConnectionLost(self) -> None:
        """The user half-closed before the bytes were judged: allow them."""
        self._decide(Verdict.ALLOW)

    def writeConnectionLost(self) -> None:
        """Nothing to do: we never half-close our side."""

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)
        self._decide(Verdict.ALLOW)


def refuse(end: ScreenedEnd, blocked: Blocked, stats: InstanceStats, log: NodeLog, loop: str) -> None:
    """Close a connection :meth:`ScreenedEnd.screen` blocked, as SPEC-1.14
    §5.1 says: the bytes read count as TCP RX, one WARN line names the
    protocol and the user (``{loop}: blocked SOCKS5 protocol from
    127.0.0.1:46776``; ``loop`` is Go's function name, ``commonTCPLoop`` or
    ``singleTCPLoop``), the connection gets a normal close (FIN) and its
    slot is released.  Nothing is dialled and no pool connection is taken."""
    stats.tcp_rx += end.screened_bytes
    peer = end.transport.getPeer()
    log.warn("%s: blocked %s protocol from %s", loop, blocked.label, join_host_port(peer.host, peer.port))
    end.transport.loseConnection()
    stats.release_tcp()
