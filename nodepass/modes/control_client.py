"""The client's control connection (SPEC §3.2), as a state machine.

The client dials the server's tunnel address, writes its key line and
waits, within ``NP_HANDSHAKE_TIMEOUT``, for one answer line; once the
runner has built the control channel on the connection, the connection
carries signals.  :class:`ClientControlMachine` moves::

    NEW          --CONNECTED-------> HANDSHAKING  key line sent, handshake timer
    HANDSHAKING  --ANSWER----------> ANSWERED     answer handed to the runner
    HANDSHAKING  --FAILED, TIMEOUT-> CLOSED       aborted
    ANSWERED     --CHANNEL---------> CONTROL      bytes go to the control channel
    any          --LOST------------> CLOSED       (CLOSE closes cleanly, in place)

The outcome of the handshake reaches the runner as the machine's
``answer`` Deferred: ``(TunnelInfo, bytes after the answer line)``, or a
:class:`~nodepass.modes.base.TunnelError` that says, as far as the client
can tell, why there is no answer: refused key, key mismatch, silence, a
reset, or our own shutdown.

:class:`ClientControlProtocol` is the thin Twisted side; the machine
reaches its runner only through :class:`ControlOwner`.  See
:mod:`nodepass.modes.machine` for why a table rather than ``automat``.
"""

from __future__ import annotations

import typing
from enum import Enum, auto
from typing import Any, ClassVar, Optional

import attrs
from twisted.internet import error as terror
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure

from nodepass.base.logs import NodeLog
from nodepass.base.timers import ClockLike
from nodepass.modes.base import TunnelError
from nodepass.modes.machine import Table, TableMachine
from nodepass.wire import codec
from nodepass.wire.codec import Codec, CodecError, TunnelInfo
from nodepass.wire.control import ControlChannel, LineBuffer


class HandshakeRefused(TunnelError):
    """The server read our key line and closed the connection cleanly
    without answering: how NodePass servers refuse a key (SPEC §3.2)."""


class Server114(TunnelError):
    """The server answered our key line with an HTTP status line: a 1.14
    server refusing a 1.12 handshake (SPEC-1.14 §3.2.5)."""


class KeyMismatch(TunnelError):
    """The server answered, but the answer does not decode with our key."""


#: Why a server that answers nothing may close: said once, in every refusal.
REFUSED = (
    "the server refused our tunnel key (it closed the connection without answering the handshake: "
    "our key differs from the server's, or another client already holds the tunnel)"
)


class ClientState(Enum):
    NEW = "new"  # dialling
    HANDSHAKING = "handshaking"  # key line sent, waiting for the answer line
    ANSWERED = "answered"  # answer handed to the runner, which builds the control channel
    CONTROL = "control"  # the control channel reads the connection
    CLOSED = "closed"  # failed, refused or lost


class ClientInput(Enum):
    CONNECTED = auto()  # connectionMade
    DATA = auto()  # bytes received
    ANSWER = auto()  # the answer line decoded to a handshake config
    FAILED = auto()  # the answer line is too long or does not decode
    TIMEOUT = auto()  # no answer within NP_HANDSHAKE_TIMEOUT
    CHANNEL = auto()  # the runner built the control channel on the connection
    CLOSE = auto()  # the runner closes the connection (stopping, or the tunnel cannot start)
    LOST = auto()  # connectionLost


_S, _I = ClientState, ClientInput  # short names for the table


@attrs.frozen
class HandshakeSettings:
    """What the handshake needs to know, fixed for one start."""

    clock: ClockLike
    log: NodeLog
    codec: Codec
    tunnel_key: str
    server: str  # the tunnel address as the URL names it, for messages
    handshake_timeout: float


class ControlOwner(typing.Protocol):
    """What the client's control connection needs from its runner (a
    ``typing.Protocol``: checked structurally by mypy)."""

    @property
    def stopping(self) -> bool:
        """Whether the runner is stopping: a lost handshake is then nobody's refusal."""


class ClientControlMachine(TableMachine[ClientState, ClientInput]):
    """The life of the client's control connection; see the module docstring."""

    __slots__ = ("conn", "owner", "settings", "answer", "channel", "_lines")

    def __init__(self, conn: ClientControlProtocol, owner: ControlOwner, settings: HandshakeSettings):
        super().__init__(self.TABLE, ClientState.NEW, settings.clock)
        self.conn = conn
        self.owner = owner
        self.settings = settings
        #: Fires with ``(TunnelInfo, rest)`` or fails with a TunnelError.
        self.answer: Deferred[tuple[TunnelInfo, bytes]] = Deferred()
        self.channel: Optional[ControlChannel] = None
        self._lines = LineBuffer()

    # -- inputs: from the protocol ----------------------------------------
    def connected(self) -> None:
        self._fire(ClientInput.CONNECTED)

    def data(self, data: bytes) -> None:
        self._fire(ClientInput.DATA, data)

    def lost(self, reason: Failure) -> None:
        self._fire(ClientInput.LOST, reason)

    # -- inputs: from the runner ------------------------------------------
    def channel_ready(self, channel: ControlChannel) -> bool:
        """The control channel is built on this connection: hand it the
        bytes from now on.  False when the connection is already gone."""
        self._fire(ClientInput.CHANNEL, channel)
        return self.state is ClientState.CONTROL

    def close(self) -> None:
        """Close the connection (a dial still in progress is left alone)."""
        self._fire(ClientInput.CLOSE)

    # -- outputs ----------------------------------------------------------
    def _send_key(self) -> None:
        s = self.settings
        self.conn.write(s.codec.encode(s.tunnel_key))
        self._start_timer(s.handshake_timeout, ClientInput.TIMEOUT)

    def _read_answer(self, data: bytes) -> None:
        lines = self._lines.feed(data)
        if self._lines.overflow and not lines:
            self._fire(ClientInput.FAILED, TunnelError("tunnel handshake failed: answer line too long"))
            return
        if not lines:
            return
        rest = b"\n".join(lines[1:]) + (b"\n" if len(lines) > 1 else b"") + self._lines.rest()
        if lines[0].startswith(b"HTTP/1."):
            self._fire(ClientInput.FAILED, Server114(
                f"tunnelHandshake: the server at {self.settings.server} answered with HTTP: "
                "it speaks the 1.14 generation"
            ))
            return
        try:
            info = codec.parse_handshake_config(self.settings.codec.decode(lines[0]))
        except CodecError as e:
            self._undecodable(lines[0], e)
            return
        self._fire(ClientInput.ANSWER, info, rest)

    def _undecodable(self, line: bytes, error: CodecError) -> None:
        """The answer line does not decode to ``np://...`` under our key.
        A server with another key of the same length lets us this far (the
        key line is the key XORed with itself, so it cannot tell), and its
        answer then decodes to noise.  The line itself is never logged: it
        can hold anything, a secret included (a misdirected client talking
        to an echo service reads back its own key)."""
        s = self.settings
        s.log.debug("Handshake answer from %s: %s (%s)", s.server, codec.describe(line), error)
        self._fire(ClientInput.FAILED, KeyMismatch(
            "tunnel handshake failed: the server's answer could not be decoded with our tunnel key -- "
            "the tunnel keys most likely differ (check the KEY@ part of both URLs), "
            "or this address is not a NodePass server"
        ))

    def _deliver(self, info: TunnelInfo, rest: bytes) -> None:
        self.answer.callback((info, rest))

    def _fail(self, exc: TunnelError) -> None:
        if not self.answer.called:
            self.answer.errback(exc)
        self.conn.abort()

    def _timed_out(self) -> None:
        # A NodePass server answers or closes at once; silence means
        # something else listens there, or the server is overloaded.
        self._fail(TunnelError(
            "tunnel handshake timed out: the server sent no answer within "
            f"{self.settings.handshake_timeout:g}s (is a NodePass server listening at that address?)"
        ))

    def _unanswered(self, reason: Failure) -> None:
        """Why the connection ended before the answer, as far as we can
        tell.  Only a clean close after the server read our key line is a
        refusal (SPEC §3.2: it closes without answering); a reset is what a
        server that stops or restarts leaves behind, and our own shutdown
        is nobody's refusal."""
        if self.answer.called:
            return
        if self.owner.stopping:
            exc: TunnelError = TunnelError("handshake abandoned: the client is stopping")
        elif reason.check(terror.ConnectionDone):
            exc = HandshakeRefused(REFUSED)
        else:
            exc = TunnelError(
                "the connection to the server was closed before the handshake completed "
                f"({reason.getErrorMessage() or 'reset'}): the server may be restarting; retrying"
            )
        self.answer.errback(exc)

    def _attach(self, channel: ControlChannel) -> None:
        self.channel = channel

    def _to_channel(self, data: bytes) -> None:
        assert self.channel is not None  # set on entering CONTROL
        self.channel.data_received(data)

    def _close(self) -> None:
        self.conn.close()

    def _control_lost(self, reason: Failure) -> None:
        assert self.channel is not None  # set on entering CONTROL
        self.channel.connection_lost("control connection lost: " + (reason.getErrorMessage() or "closed"))

    # -- the table --------------------------------------------------------
    # (state, input) -> (next state, output); a pair not listed is ignored
    # (bytes after a failed handshake, a late timer).  Bytes that arrive
    # while ANSWERED find no channel yet: the runner builds it in the same
    # reactor turn as the answer, so only a runner that gave up (and is
    # closing the connection) leaves them unread.
    TABLE: ClassVar[Table[ClientState, ClientInput]] = {
        (_S.NEW, _I.CONNECTED): (_S.HANDSHAKING, _send_key),
        (_S.NEW, _I.LOST): (_S.CLOSED, _unanswered),
        (_S.HANDSHAKING, _I.DATA): (_S.HANDSHAKING, _read_answer),
        (_S.HANDSHAKING, _I.ANSWER): (_S.ANSWERED, _deliver),
        (_S.HANDSHAKING, _I.FAILED): (_S.CLOSED, _fail),
        (_S.HANDSHAKING, _I.TIMEOUT): (_S.CLOSED, _timed_out),
        (_S.HANDSHAKING, _I.CLOSE): (_S.HANDSHAKING, _close),
        (_S.HANDSHAKING, _I.LOST): (_S.CLOSED, _unanswered),
        (_S.ANSWERED, _I.CHANNEL): (_S.CONTROL, _attach),
        (_S.ANSWERED, _I.CLOSE): (_S.ANSWERED, _close),
        (_S.ANSWERED, _I.LOST): (_S.CLOSED, None),
        (_S.CONTROL, _I.DATA): (_S.CONTROL, _to_channel),
        (_S.CONTROL, _I.CLOSE): (_S.CONTROL, _close),
        (_S.CONTROL, _I.LOST): (_S.CLOSED, _control_lost),
    }


class ClientControlProtocol(Protocol):
    """The Twisted side of the client's control connection: events in,
    I/O out."""

    # Twisted types it Optional[ITransport], a zope interface whose methods
    # mypy cannot call without the mypy-zope plugin.
    transport: Any

    def __init__(self, owner: ControlOwner, settings: HandshakeSettings):
        self.machine = ClientControlMachine(self, owner, settings)

    def connectionMade(self) -> None:
        self.machine.connected()

    def dataReceived(self, data: bytes) -> None:
        self.machine.data(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.machine.lost(reason)

    # -- I/O for the machine ----------------------------------------------
    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def close(self) -> None:
        self.transport.loseConnection()

    def abort(self) -> None:
        self.transport.abortConnection()
