"""The control-channel wire format (SPEC §3.1, §3.3, §3.2 step 4).

Every control message is one line: ``base64_std_padded(payload XOR key)``
followed by ``\\n``.  Payloads are small URLs whose fragment names the
signal.  Go NodePass peers build these with ``net/url``; the functions here
produce the same bytes so either implementation can sit on either end.
"""

from __future__ import annotations

import base64
import binascii
from typing import Optional, Union
from urllib.parse import quote, unquote

import attrs

from nodepass.base.kinds import Flow, PoolType, TLSCode

#: Longest control line accepted (handshake key or signal).  Real lines are
#: well under 200 bytes; anything longer is garbage and is refused rather
#: than buffered.
MAX_LINE = 4096

# Fragments of the signals (SPEC §3.3).
TCP_LAUNCH = "1"
UDP_LAUNCH = "2"
VERIFY = "v"
FLUSH = "f"
PING = "i"
PONG = "o"


class CodecError(ValueError):
    """A line that does not decode (bad base64, or not a signal URL).

    The message never quotes the line: a line that does not decode may be
    anything (a peer with another key, a misdirected client's secret), and
    messages end up in logs.  Use :func:`describe` for a debug trace."""


#: Most received bytes :func:`describe` shows (as hex).
DESCRIBE_PREFIX = 8


def describe(data: Union[bytes, str]) -> str:
    """``"23 bytes, starting 6e703a2f2f302f40"``: what a log line may say
    about received bytes -- their length and a short hex prefix (at most
    :data:`DESCRIBE_PREFIX` bytes), never the bytes themselves."""
    if isinstance(data, str):
        data = data.encode("utf-8", "replace")
    if not data:
        return "0 bytes"
    return f"{len(data)} bytes, starting {data[:DESCRIBE_PREFIX].hex()}"


def xor(data: bytes, key: bytes) -> bytes:
    """``data[i] ^ key[i % len(key)]`` -- done on big integers, which is
    far faster in CPython than a per-byte loop."""
    if not key or not data:
        return bytes(data)
    n = len(data)
    reps = -(-n // len(key))
    pad = (key * reps)[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(pad, "big")).to_bytes(n, "big")


#: Longest payload whose key stream a :class:`KeyStream` keeps: launch
#: signals are < 100 bytes, a 1.14 verify about 140.  Longer (rare, or
#: hostile) payloads are XORed by :func:`xor` without caching, so a peer
#: cannot make the cache grow past about 32 KiB per key.
KEYSTREAM_CACHE = 256


class KeyStream:
    """:func:`xor` for one key, with the repeated key as an integer cached
    per payload length.

    Every signal line of a tunnel is XORed with the same key, and the
    lengths repeat (a launch signal's length varies only with its remote
    address), so building ``key * reps`` and converting it to an integer
    -- half the cost of :func:`xor` on a short payload -- is done once per
    length instead of once per signal."""

    __slots__ = ("key", "_streams")

    def __init__(self, key: bytes):
        self.key = bytes(key)
        self._streams: dict[int, int] = {}

    def _stream(self, n: int) -> int:
        key = self.key
        pad = (key * -(-n // len(key)))[:n] if key else b""
        stream = int.from_bytes(pad, "big")
        self._streams[n] = stream
        return stream

    def xor(self, data: bytes) -> bytes:
        """Exactly ``xor(data, self.key)``."""
        n = len(data)
        if n > KEYSTREAM_CACHE:
            return xor(data, self.key)
        stream = self._streams.get(n)
        if stream is None:
            stream = self._stream(n)
        return (int.from_bytes(data, "big") ^ stream).to_bytes(n, "big")


class Codec:
    """Line codec bound to one tunnel key."""

    __slots__ = ("key", "stream")

    def __init__(self, key: Union[str, bytes]):
        self.key = key.encode("utf-8") if isinstance(key, str) else bytes(key)
        self.stream = KeyStream(self.key)

    def encode(self, payload: Union[str, bytes]) -> bytes:
        """One wire line, newline included."""
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        return binascii.b2a_base64(self.stream.xor(payload), newline=True)

    def decode(self, line: bytes) -> bytes:
        """The payload of one line (trailing ``\\r``/``\\n`` ignored).
        Raises :class:`CodecError` for anything that is not strict base64."""
        line = line.rstrip(b"\r\n")
        try:
            raw = base64.b64decode(line, validate=True)
        except (binascii.Error, ValueError) as e:
            raise CodecError(f"invalid base64: {e}") from None
        return self.stream.xor(raw)


def path_escape(text: str) -> str:
    """Go's ``url.PathEscape``: everything but unreserved characters and
    ``$&+:=@`` is percent-encoded (``/``, ``;``, ``,`` and ``?`` included)."""
    if text.isascii() and text.isalnum():
        return text  # the usual 8 hex digits: nothing to escape
    return quote(text, safe="$&+:=@")


@attrs.frozen
class Signal:
    """A decoded control signal: ``kind`` is the fragment (``1``, ``2``,
    ``v``, ``f``, ``i``, ``o`` or anything unknown), ``host`` the URL host
    (ORIGIN / PEER), ``id`` the unescaped pool connection ID."""

    kind: str
    host: str = ""
    id: str = ""
    #: The certificate fingerprint a 1.14 ``verify`` carries (1.12 sends none).
    fp: str = ""

    def payload(self) -> str:
        if self.host or self.id:
            return f"np://{host_escape(self.host)}/{path_escape(self.id)}#{self.kind}"
        return f"np:#{self.kind}"


def host_escape(host: str) -> str:
    """The host part as Go's ``url.URL.String`` writes it: of the characters
    an ``ip:port`` can hold only ``%`` (an IPv6 zone, ``[fe80::1%eth0]``)
    is escaped, to ``%25``; a Go peer's ``url.Parse`` rejects a bare one."""
    return host.replace("%", "%25") if "%" in host else host


def tcp_launch(origin: str, pool_id: str) -> str:
    return Signal(TCP_LAUNCH, origin, pool_id).payload()


def udp_launch(origin: str, pool_id: str) -> str:
    return Signal(UDP_LAUNCH, origin, pool_id).payload()


def verify(peer: str, pool_id: str) -> str:
    return Signal(VERIFY, peer, pool_id).payload()


def simple(kind: str) -> str:
    """``np:#f`` / ``np:#i`` / ``np:#o``."""
    return f"np:#{kind}"


def _as_text(payload: Union[bytes, str], what: str) -> str:
    if isinstance(payload, bytes):
        try:
            return payload.decode("utf-8")
        except UnicodeDecodeError:
            raise CodecError(f"{what} is not UTF-8") from None
    return payload


def parse_signal(payload: Union[bytes, str]) -> Signal:
    """Parse a signal URL.  Raises :class:`CodecError` when it is not an
    ``np:`` URL with a fragment."""
    payload = _as_text(payload, "signal")
    if not payload.startswith("np:"):
        raise CodecError(f"not a signal URL ({len(payload)} characters)")
    rest, hash_, fragment = payload[3:].partition("#")
    if not hash_:
        raise CodecError("signal URL without a fragment")
    # Parsed the way Go's url.Parse reads it: a query is not part of the
    # path, and a URL without "//" (``np:ID#0``, as newer Go peers write
    # signals that carry only an ID) has the ID as its opaque part -- an
    # unknown fragment then, ignored by the caller.  Launch and verify
    # signals need their address, so without one they are malformed.
    rest = rest.partition("?")[0]
    host = ""
    if rest.startswith("//"):
        host, _, path = rest[2:].partition("/")
        host = unquote(host) if "%" in host else host
    elif fragment in (TCP_LAUNCH, UDP_LAUNCH, VERIFY):
        raise CodecError(f"signal #{fragment} without an address")
    else:
        path = rest
    sig = Signal(fragment, host, unquote(path))
    if not (_loggable(sig.host) and _loggable(sig.id) and _loggable(sig.kind)):
        # Addresses and IDs end up in log lines: no control characters
        # (forged lines), nothing huge.  Real peers never send such.
        raise CodecError("signal with a malformed address, ID or fragment")
    return sig


#: Longest address, ID or fragment a signal may carry (real ones: < 64).
MAX_FIELD = 255


def _loggable(text: str) -> bool:
    return len(text) <= MAX_FIELD and text.isprintable()


#: The pool types of the 1.12 handshake, by their exact wire text.
_POOL_TYPES = {str(p.value): p for p in (PoolType.TCP, PoolType.QUIC)}


@attrs.frozen
class TunnelInfo:
    """The server's handshake answer ``np://P@MAX/FLOW#TLS``.

    ``pool_type`` stays the text on the wire: a server may announce a pool
    type this end does not know (:attr:`known_pool_type` is then None), and
    the client names it as sent when it refuses it."""

    pool_type: str
    max: int
    flow: Flow = attrs.field(converter=Flow)
    tls_code: TLSCode = attrs.field(converter=TLSCode)

    @property
    def known_pool_type(self) -> Optional[PoolType]:
        return _POOL_TYPES.get(self.pool_type)

    def payload(self) -> str:
        return f"np://{self.pool_type}@{self.max}/{self.flow}#{self.tls_code}"


def handshake_config(pool_type: PoolType, max_pool: int, flow: Flow, tls_code: TLSCode) -> str:
    return TunnelInfo(str(pool_type), max_pool, flow, tls_code).payload()


def parse_handshake_config(payload: Union[bytes, str]) -> TunnelInfo:
    """Parse the server's config line; any empty or malformed part raises
    :class:`CodecError` (SPEC §3.2: the client rejects it)."""
    payload = _as_text(payload, "handshake answer")
    if not payload.startswith("np://"):
        raise CodecError(f"handshake answer is not an np:// URL ({len(payload)} characters)")
    rest, _, tls = payload[5:].partition("#")
    authority, _, flow = rest.partition("/")
    pool_type, at, max_text = authority.rpartition("@")
    parts = {"pool type": pool_type if at else "", "max": max_text, "flow": flow, "tls": tls}
    empty = [name for name, value in parts.items() if not value]
    if empty:
        raise CodecError(f"handshake answer has empty {', '.join(empty)}")
    if flow not in (Flow.REVERSE, Flow.FORWARD):
        raise CodecError("handshake answer has an unknown flow (not - or +)")
    if not _number(pool_type):
        raise CodecError("handshake answer has an invalid pool type (not a number)")
    if not _number(max_text) or int(max_text) < 1:
        raise CodecError("handshake answer has an invalid max (not a positive number)")
    if tls not in ("0", "1", "2"):
        raise CodecError("handshake answer has an unknown TLS code (not 0, 1 or 2)")
    return TunnelInfo(pool_type, int(max_text), flow, int(tls))


def _number(text: str) -> bool:
    """ASCII digits, at most 10 of them (``isdigit`` alone takes ``²``)."""
    return 0 < len(text) <= 10 and text.isascii() and text.isdigit()


def pool_id(raw: bytes) -> str:
    """The pool connection ID of the 4 raw bytes the server writes."""
    if len(raw) != 4:
        raise CodecError(f"pool ID needs 4 bytes, got {len(raw)}")
    return raw.hex()


def split_origin(origin: str) -> Optional[tuple[str, int]]:
    """``ip:port`` / ``[v6]:port`` of a launch signal as a tuple, or None."""
    host, sep, port = origin.rpartition(":")
    if not sep or not port.isdigit():
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)
