"""The two signal dialects of the control channel, behind one interface.

Both generations frame signals the same way (``base64(payload XOR key)``
and a newline); what differs is the payload: a 1.12 ``np://ORIGIN/ID#1``
URL (SPEC §3.3) or a 1.14 compact JSON object (SPEC-1.14 §3.4).  The
runners speak in :class:`~nodepass.wire.codec.Signal` values (``kind``,
``host``, ``id``, ``fp``) and the control channel turns them into lines
through a :class:`Dialect`, so nothing above this module knows which
generation is on the wire.
"""

from __future__ import annotations

from typing import Protocol

from nodepass.base.kinds import Wire
from nodepass.wire import codec, v114
from nodepass.wire.codec import Codec, CodecError, Signal


class SignalError(CodecError):
    """A line that is not a signal of the dialect; ``line`` is the log text
    the generation uses for it (never the received bytes)."""

    def __init__(self, message: str, line: str):
        super().__init__(message)
        self.line = line


class Dialect(Protocol):
    """How one generation writes and reads signal lines."""

    generation: Wire

    def line(self, sig: Signal) -> bytes:
        """The wire line of ``sig``, newline included."""

    def read(self, line: bytes) -> Signal:
        """The signal of one line (without its newline); raises SignalError."""

    def text(self, sig: Signal) -> str:
        """``sig`` as a debug log line shows it."""


class V112Dialect:
    """``np://`` signal URLs (SPEC §3.3)."""

    generation = Wire.V112

    def __init__(self, key: Codec):
        self.codec = key

    def line(self, sig: Signal) -> bytes:
        return self.codec.encode(sig.payload())

    def read(self, line: bytes) -> Signal:
        try:
            return codec.parse_signal(self.codec.decode(line))
        except CodecError as e:
            raise SignalError(str(e), f"Undecodable control signal skipped: {e}") from None

    def text(self, sig: Signal) -> str:
        return sig.payload()


#: Our signal kinds and the 1.14 actions, both ways.
_ACTIONS = {
    codec.TCP_LAUNCH: v114.Action.TCP,
    codec.UDP_LAUNCH: v114.Action.UDP,
    codec.VERIFY: v114.Action.VERIFY,
    codec.FLUSH: v114.Action.FLUSH,
    codec.PING: v114.Action.PING,
    codec.PONG: v114.Action.PONG,
}
_KINDS = {str(action): kind for kind, action in _ACTIONS.items()}

#: The kind of a 1.14 action this end does not know (ignored, as Go does).
UNKNOWN_ACTION = "?"


class V114Dialect:
    """Compact JSON signals (SPEC-1.14 §3.4); ``verify`` carries ``fp``.

    Lines go straight between the runner's signals and the wire through
    the key's :class:`~nodepass.wire.v114.SignalKey` (its fast path for
    launch signals), without an intermediate :class:`v114.Signal`."""

    generation = Wire.V114

    def __init__(self, key: Codec):
        self.signals = v114.signal_key(key.key)

    def _json(self, sig: Signal) -> v114.Signal:
        return v114.Signal(self._action(sig), sig.host, sig.id, sig.fp)

    @staticmethod
    def _action(sig: Signal) -> v114.Action:
        action = _ACTIONS.get(sig.kind)
        if action is None:
            raise ValueError(f"signal kind {sig.kind!r} has no 1.14 action")
        return action

    def line(self, sig: Signal) -> bytes:
        return self.signals.line(self._action(sig), sig.host, sig.id, sig.fp)

    def read(self, line: bytes) -> Signal:
        try:
            action, remote, pool_id, fp = self.signals.fields(bytes(line))
        except v114.SignalDecodeError as e:
            raise SignalError(str(e), f"commonQueue: decode signal failed: {e}") from None
        except v114.SignalUnmarshalError as e:
            raise SignalError(str(e), f"commonQueue: unmarshal signal failed: {e}") from None
        return Signal(_KINDS.get(action, UNKNOWN_ACTION), remote, pool_id, fp)

    def text(self, sig: Signal) -> str:
        """Never raises: a received ``verify`` may carry no (or a malformed)
        fingerprint, which :meth:`line` refuses to send but a log shows."""
        try:
            return self._json(sig).payload().decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            action = _ACTIONS.get(sig.kind, UNKNOWN_ACTION)
            return f"{{action {action}, id {sig.id!r}, fp {sig.fp!r}}}"


def dialect(generation: Wire, key: Codec) -> Dialect:
    """The dialect of a settled generation (AUTO is not one)."""
    if generation is Wire.V114:
        return V114Dialect(key)
    if generation is Wire.V112:
        return V112Dialect(key)
    raise ValueError("a control channel speaks one generation, not auto")
