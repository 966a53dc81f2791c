"""The NodePass 1.14 handshake and signals, sans I/O (SPEC-1.14 §3).

Pure functions and small frozen attrs classes over bytes, used by the
server's tunnel port (:mod:`nodepass.modes.tunnel_port`), the client's
handshake (:mod:`nodepass.modes.handshake114`) and the control channel's
1.14 dialect (:mod:`nodepass.wire.dialect`):

* the client's ``GET /`` request with ``Authorization: Bearer TOKEN``
  (§3.2.2), where TOKEN is HMAC-SHA256 of an empty message under the tunnel
  key, as 64 lowercase hex digits;
* the server's reading of such a request (§3.2.3): the accepted request, or
  the :class:`Refusal` (405, 404, 401 or one of the two 400s) to answer with;
* the success answer with its JSON body (§3.2.4), built and parsed;
* the JSON signals (§3.4) on the unchanged line codec, ``verify`` with its
  fingerprint included (§3.5);
* :func:`sniff`: which generation a connection's first bytes belong to.

Every parser bounds what it reads and raises nothing but :class:`V114Error`
(or a subclass) on garbage.  Error messages never quote received bytes.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import functools
import hashlib
import hmac
import json
import re
from enum import Enum, StrEnum
from typing import Any, Optional, Union

import attrs

from nodepass.base.kinds import Flow, TLSCode
from nodepass.wire.codec import MAX_LINE, KeyStream

#: Longest request head (request line and headers) the server reads.  The
#: Go client's request is 173 bytes with a 4-letter host; Go's own limit is
#: 1 MiB, ours refuses anything longer than this with a plain 400.
MAX_REQUEST_HEAD = 8192

#: Longest answer (head and body) the client reads.  Real ones are < 200 bytes.
MAX_ANSWER = 8192

#: The host a Go client sends when its tunnel host is an IP and ``sni=`` is unset.
DEFAULT_HOST = "none"

#: Largest ``max`` a Go peer can decode (a Go ``int`` on 64-bit).
MAX_INT = 2**63 - 1

#: Longest signal member a decoded signal may carry (real ones: < 110).
MAX_FIELD = 255


class V114Error(ValueError):
    """Bytes that are not what the 1.14 wire format says.  The message never
    quotes them (see :func:`nodepass.wire.codec.describe`)."""


class SignalDecodeError(V114Error):
    """A signal line that is not strict base64 (Go: ``decode signal failed``)."""


class SignalUnmarshalError(V114Error):
    """A signal payload that is not a JSON signal object (Go: ``unmarshal
    signal failed``)."""


class Incomplete(Enum):
    """A parser's answer when the bytes so far cannot decide yet."""

    NEED_MORE = "need more bytes"


NEED_MORE = Incomplete.NEED_MORE


# ---------------------------------------------------------------------------
# Token and request (§3.2.2)


def _key_bytes(key: Union[str, bytes]) -> bytes:
    return key.encode("utf-8") if isinstance(key, str) else bytes(key)


def token(key: Union[str, bytes]) -> str:
    """The Bearer token of a tunnel key: HMAC-SHA256 with the key's UTF-8
    bytes as HMAC key and an empty message, 64 lowercase hex digits."""
    return hmac.new(_key_bytes(key), b"", hashlib.sha256).hexdigest()


_HOST_OK = re.compile(rb"[!-~]+\Z")  # visible ASCII, no spaces or controls


def build_request(key: Union[str, bytes], host: str = DEFAULT_HOST) -> bytes:
    """The client's handshake request, byte for byte as the Go client sends
    it.  ``host`` is the client's server name (``none`` for an IP tunnel
    host without ``sni=``), without a port."""
    raw = host.encode("utf-8", "replace")
    if not _HOST_OK.match(raw):
        raise V114Error("request host is empty or has spaces or control characters")
    return (
        b"GET / HTTP/1.1\r\n"
        b"Host: " + raw + b"\r\n"
        b"User-Agent: Go-http-client/1.1\r\n"
        b"Authorization: Bearer " + token(key).encode("ascii") + b"\r\n"
        b"Accept-Encoding: gzip\r\n"
        b"\r\n"
    )


# ---------------------------------------------------------------------------
# HTTP heads, read the way Go's net/http reads them


@attrs.frozen
class _Head:
    start: bytes  # request or status line
    headers: tuple[tuple[bytes, bytes], ...]  # (lowercased name, trimmed value)
    end: int  # offset just past the blank line


# A header name is an RFC 7230 token; a value holds no control byte but tab.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def _lines(buf: bytes, limit: int) -> Union[list[tuple[bytes, int]], Incomplete]:
    """The complete lines of ``buf`` up to the first empty one, each with the
    offset past its ``\\n`` (one ``\\r`` before it is dropped, as Go's reader
    does), or NEED_MORE.  Raises V114Error past ``limit`` bytes."""
    out: list[tuple[bytes, int]] = []
    pos = 0
    while True:
        nl = buf.find(b"\n", pos, limit)
        if nl < 0:
            if len(buf) >= limit:
                raise V114Error(f"head longer than {limit} bytes")
            return NEED_MORE
        line = buf[pos:nl]
        if line.endswith(b"\r"):
            line = line[:-1]
        pos = nl + 1
        out.append((line, pos))
        if not line:
            return out


def _head(buf: bytes, limit: int) -> Union[_Head, Incomplete]:
    """Raises V114Error on a malformed or oversize head."""
    lines = _lines(buf, limit)
    if isinstance(lines, Incomplete):
        return lines
    if len(lines) < 2:
        raise V114Error("head without a start line")
    headers = []
    for line, _ in lines[1:-1]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name):
            raise V114Error("malformed header line")
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value):
            raise V114Error("header value with control characters")
        headers.append((name.lower(), value))
    return _Head(lines[0][0], tuple(headers), lines[-1][1])


def _header(head: _Head, name: bytes) -> Optional[bytes]:
    """The first value of a header (names compare case-insensitively)."""
    for key, value in head.headers:
        if key == name:
            return value
    return None


# ---------------------------------------------------------------------------
# Server side (§3.2.3)


@attrs.frozen
class HandshakeRequest:
    """A request the server accepts: ``host`` as sent (never checked),
    ``size`` the bytes of its head."""

    host: str
    size: int


@attrs.frozen
class Refusal:
    """An error answer of §3.2.3: ``reason`` is what follows the status code
    on the status line, ``body`` the text after the headers."""

    status: int
    reason: str
    body: bytes
    #: True for the two 400s Go's HTTP library writes itself: only
    #: ``Content-Type`` and ``Connection``, no Date or Content-Length.
    library: bool = False

    def answer(self, date: str, with_body: bool = True) -> bytes:
        """The full answer; ``date`` as :func:`http_date` writes it.
        ``with_body=False`` for a HEAD request (the headers stay)."""
        status = f"HTTP/1.1 {self.status} {self.reason}\r\n".encode("ascii")
        body = self.body if with_body else b""
        if self.library:
            return status + b"Content-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n" + body
        return (
            status + b"Connection: close\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"X-Content-Type-Options: nosniff\r\n"
            b"Date: " + date.encode("ascii") + b"\r\n"
            b"Content-Length: " + str(len(self.body)).encode("ascii") + b"\r\n\r\n" + body
        )


METHOD_NOT_ALLOWED = Refusal(405, "Method Not Allowed", b"Method Not Allowed\n")
NOT_FOUND = Refusal(404, "Not Found", b"Not Found\n")
UNAUTHORIZED = Refusal(401, "Unauthorized", b"Unauthorized\n")
MISSING_HOST = Refusal(
    400,
    "Bad Request: missing required Host header",
    b"400 Bad Request: missing required Host header",
    library=True,
)
TOO_MANY_HOSTS = Refusal(
    400, "Bad Request: too many Host headers", b"400 Bad Request: too many Host headers", library=True
)
BAD_REQUEST = Refusal(400, "Bad Request", b"400 Bad Request", library=True)


def http_date(when: Optional[float] = None) -> str:
    """``Mon, 30 Nov 2026 02:41:40 GMT`` (RFC 1123, GMT) of a POSIX time
    (now when None)."""
    return email.utils.formatdate(when, usegmt=True)


_VERSION = re.compile(rb"HTTP/1\.[0-9]\Z")
_ESCAPES = re.compile(rb"%(?![0-9A-Fa-f]{2})")


def _request_line(line: bytes) -> Union[tuple[bytes, bytes, bool], Refusal]:
    """``(method, path, is_http11)`` of a request line, or BAD_REQUEST, split
    as Go does (at the first two spaces)."""
    method, sp1, rest = line.partition(b" ")
    target, sp2, proto = rest.partition(b" ")
    if not (sp1 and sp2 and _TOKEN.match(method) and _VERSION.match(proto) and target):
        return BAD_REQUEST
    if re.search(rb"[\x00-\x20\x7f]", target):
        return BAD_REQUEST  # Go's url package refuses control characters
    if target.startswith(b"/"):
        path = target.partition(b"?")[0]
    elif target == b"*":
        path = target
    else:
        # The absolute form (``http://host/path?q``) is read for its path.
        match = re.match(rb"[A-Za-z][A-Za-z0-9+.\-]*://[^/?]*([^?]*)", target)
        if not match:
            return BAD_REQUEST
        path = match.group(1)
    if _ESCAPES.search(path):
        return BAD_REQUEST  # a bad %-escape in the path (the query is not unescaped)
    return method, path, proto == b"HTTP/1.1" or proto > b"HTTP/1.1"


def parse_request(data: bytes, key: Union[str, bytes]) -> Union[HandshakeRequest, Refusal, Incomplete]:
    """Read the bytes a connection sent so far, as a 1.14 server does.

    NEED_MORE until the head is complete (a first line that is not an HTTP
    request line is refused at once, as Go does with a 1.12 key line).  Then
    the Go library's checks (the 400s) and the handler's: method (405), path
    (404, a query is ignored), ``Authorization: Bearer TOKEN`` with the exact
    token of ``key`` (401).  Never raises: anything malformed or longer than
    :data:`MAX_REQUEST_HEAD` is :data:`BAD_REQUEST`."""
    data = bytes(data)
    first_nl = data.find(b"\n", 0, MAX_REQUEST_HEAD)
    if first_nl >= 0:
        line = data[:first_nl].removesuffix(b"\r")
        if isinstance(_request_line(line), Refusal):
            return BAD_REQUEST
    try:
        head = _head(data, MAX_REQUEST_HEAD)
    except V114Error:
        return BAD_REQUEST
    if isinstance(head, Incomplete):
        return head
    parsed = _request_line(head.start)
    if isinstance(parsed, Refusal):
        return parsed
    method, path, http11 = parsed
    hosts = [value for name, value in head.headers if name == b"host"]
    if len(hosts) > 1:
        return TOO_MANY_HOSTS
    if http11 and not hosts:
        return MISSING_HOST
    if method != b"GET":
        return METHOD_NOT_ALLOWED
    if path != b"/":
        return NOT_FOUND
    auth = _header(head, b"authorization")
    if auth is None or not auth.startswith(b"Bearer "):
        return UNAUTHORIZED
    if not hmac.compare_digest(auth[len(b"Bearer ") :], token(key).encode("ascii")):
        return UNAUTHORIZED
    host = hosts[0].decode("utf-8", "replace") if hosts else ""
    return HandshakeRequest(host, head.end)


# ---------------------------------------------------------------------------
# The success answer (§3.2.4)


@attrs.frozen
class TunnelConfig:
    """The server's JSON answer.  ``pool_type`` stays the text on the wire
    (``"0"`` … ``"3"`` in 1.14; another number is a type this end may not
    know, which the caller names as sent)."""

    flow: Flow = attrs.field(converter=Flow)
    max: int
    tls: TLSCode = attrs.field(converter=TLSCode)
    pool_type: str

    def body(self) -> bytes:
        """``{"flow":"-","max":1024,"tls":"1","type":"0"}\\n``: keys in
        alphabetical order, ``max`` a number, the rest strings."""
        if not _number(self.pool_type) or not 1 <= self.max <= MAX_INT:
            raise V114Error("tunnel config with an invalid pool type or max")
        text = f'{{"flow":"{self.flow}","max":{self.max},"tls":"{int(self.tls)}","type":"{self.pool_type}"}}\n'
        return text.encode("ascii")

    def log_fields(self) -> str:
        """``FLOW=-|MAX=1024|TLS=1|TYPE=0`` as both Go peers log them."""
        return f"FLOW={self.flow}|MAX={self.max}|TLS={int(self.tls)}|TYPE={self.pool_type}"


def build_answer(config: TunnelConfig, date: str) -> bytes:
    """The server's 200 answer; ``date`` as :func:`http_date` writes it."""
    body = config.body()
    return (
        b"HTTP/1.1 200 OK\r\n"
        b"Connection: close\r\n"
        b"Content-Type: application/json\r\n"
        b"Date: " + date.encode("ascii") + b"\r\n"
        b"Content-Length: " + str(len(body)).encode("ascii") + b"\r\n"
        b"\r\n" + body
    )


_STATUS = re.compile(rb"HTTP/1\.[0-9] ([0-9]{3})(?: |\Z)")


def parse_answer(data: bytes, eof: bool = False) -> Union[TunnelConfig, Incomplete]:
    """The tunnel config of the server's answer, as far as received.

    NEED_MORE while the head or the ``Content-Length`` body is incomplete
    (an answer without ``Content-Length`` ends at ``eof``).  Raises
    :class:`V114Error` for a status other than 200 (``status 401``), a
    malformed head, or a body that is not the JSON object with string
    ``flow``/``tls``/``type`` and number ``max`` (member names match
    case-insensitively, unknown ones are ignored, as in Go).  Unlike the
    Go client, values are checked: flow ``-``/``+``, tls 0-2, a numeric
    pool type, max ≥ 1."""
    data = bytes(data)
    if len(data) > MAX_ANSWER:
        raise V114Error(f"answer longer than {MAX_ANSWER} bytes")
    first_nl = data.find(b"\n")
    if first_nl >= 0:
        status = _STATUS.match(data[:first_nl].removesuffix(b"\r"))
        if not status:
            raise V114Error("answer without an HTTP status line")
        if status.group(1) != b"200":
            raise V114Error(f"status {int(status.group(1))}")
    head = _head(data, MAX_ANSWER)
    if isinstance(head, Incomplete):
        if eof:
            raise V114Error("answer ends inside its head")
        return head
    if _header(head, b"transfer-encoding") is not None:
        raise V114Error("answer with a Transfer-Encoding (expected Content-Length)")
    length = _header(head, b"content-length")
    if length is not None:
        if not (0 < len(length) <= 5 and length.isdigit()):
            raise V114Error("answer with an invalid Content-Length")
        body = data[head.end : head.end + int(length)]
        if len(body) < int(length):
            if eof:
                raise V114Error("answer ends inside its body")
            return NEED_MORE
    elif not eof:
        return NEED_MORE
    else:
        body = data[head.end :]
    return parse_config(body)


def _json_value(text: str, whole: bool) -> Any:
    """The first JSON value of ``text`` (the only one when ``whole``), read
    as Go reads JSON: no NaN or Infinity.  Raises V114Error."""

    def no_constant(name: str) -> Any:
        raise V114Error(f"{name} is not JSON")

    decoder = json.JSONDecoder(parse_constant=no_constant)
    start = len(text) - len(text.lstrip(" \t\r\n"))
    try:
        value, end = decoder.raw_decode(text, start)
    except V114Error:
        raise
    except (ValueError, RecursionError):
        # ValueError includes JSONDecodeError and too-long integer literals.
        raise V114Error("not a JSON value") from None
    if whole and text[end:].strip(" \t\r\n"):
        raise V114Error("data after the JSON value")
    return value


def _members(value: Any, names: tuple[str, ...]) -> dict[str, Any]:
    """The members of a JSON object that ``names`` list, matched as Go
    matches struct fields (exact or case-insensitive, the last one wins;
    null sets nothing).  Raises V114Error if ``value`` is no object."""
    if value is None:
        return {}  # Go's Unmarshal of a top-level null sets nothing
    if not isinstance(value, dict):
        raise V114Error("JSON value is not an object")
    out: dict[str, Any] = {}
    for key, member in value.items():
        name = key if key in names else key.lower()
        if name in names and member is not None:
            out[name] = member
    return out


def parse_config(body: bytes) -> TunnelConfig:
    """The tunnel config of an answer's JSON body (see :func:`parse_answer`)."""
    members = _members(_json_value(body.decode("utf-8", "replace"), whole=False), ("flow", "max", "tls", "type"))
    flow, tls, pool_type = (members.get(name, "") for name in ("flow", "tls", "type"))
    max_pool = members.get("max", 0)
    if not all(isinstance(v, str) for v in (flow, tls, pool_type)):
        raise V114Error("tunnel config: flow, tls and type must be JSON strings")
    if isinstance(max_pool, bool) or not isinstance(max_pool, int) or max_pool > MAX_INT:
        raise V114Error("tunnel config: max must be a JSON integer")
    if flow not in (Flow.REVERSE, Flow.FORWARD):
        raise V114Error("tunnel config has an unknown flow (not - or +)")
    if tls not in ("0", "1", "2"):
        raise V114Error("tunnel config has an unknown TLS code (not 0, 1 or 2)")
    if not _number(pool_type):
        raise V114Error("tunnel config has an invalid pool type (not a number)")
    if max_pool < 1:
        raise V114Error("tunnel config has an invalid max (not a positive number)")
    return TunnelConfig(flow, max_pool, int(tls), pool_type)


def _number(text: str) -> bool:
    return 0 < len(text) <= 10 and text.isascii() and text.isdigit()


# ---------------------------------------------------------------------------
# Signals (§3.4, §3.5)


class Action(StrEnum):
    """The signal actions 1.14 knows.  A decoded :class:`Signal` keeps any
    other action as its text (the receiver ignores it)."""

    TCP = "tcp"
    UDP = "udp"
    VERIFY = "verify"
    FLUSH = "flush"
    PING = "ping"
    PONG = "pong"


_FIELDS = ("action", "remote", "id", "fp")

#: ``sha256:`` and 32 uppercase hex pairs separated by ``:``.
_FINGERPRINT = re.compile(r"sha256:[0-9A-F]{2}(?::[0-9A-F]{2}){31}\Z")


def fingerprint(der: bytes) -> str:
    """``sha256:AA:BB:…`` of a DER certificate, as both Go peers write it."""
    digest = hashlib.sha256(der).hexdigest().upper()
    return "sha256:" + ":".join(digest[i : i + 2] for i in range(0, 64, 2))


def _go_json_string(text: str) -> str:
    """``text`` as a JSON string the way Go's encoding/json writes it: UTF-8
    as is, ``<``, ``>``, ``&``, U+2028 and U+2029 as ``\\u`` escapes."""
    out = json.dumps(text, ensure_ascii=False)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        out = out.replace(char, escape)
    return out


def _payload(action: str, remote: str, pool_id: str, fp: str) -> bytes:
    """The general encoder behind :meth:`Signal.payload` (any text)."""
    if action == Action.VERIFY and not _FINGERPRINT.match(fp):
        raise V114Error("verify signal without a well-formed fingerprint")
    parts = []
    for name, value in zip(_FIELDS, (action, remote, pool_id, fp)):
        if value:
            if any("\ud800" <= c <= "\udfff" for c in value):
                raise V114Error(f"signal {name} is not valid Unicode")
            parts.append(f'"{name}":{_go_json_string(value)}')
    return ("{" + ",".join(parts) + "}").encode("utf-8")


def _plain(text: str) -> bool:
    """True if Go writes ``text`` as a JSON string without any escape:
    printable ASCII other than ``"``, ``\\``, ``<``, ``>`` and ``&``
    (then ``'"' + text + '"'`` is exactly :func:`_go_json_string`)."""
    return (
        text.isascii()
        and text.isprintable()
        and '"' not in text
        and "\\" not in text
        and "<" not in text
        and ">" not in text
        and "&" not in text
    )


@attrs.frozen
class Signal:
    """A control signal: ``action`` (an :class:`Action` or any other text),
    and the members that action carries; empty ones are not sent."""

    action: str
    remote: str = ""
    id: str = ""
    fp: str = ""

    def payload(self) -> bytes:
        """The compact JSON object, members in the order ``action``,
        ``remote``, ``id``, ``fp``, empty ones left out.  A ``verify``
        without a well-formed fingerprint raises :class:`V114Error`: this
        end never sends an empty one."""
        return _payload(self.action, self.remote, self.id, self.fp)

    def line(self, key: Union[str, bytes]) -> bytes:
        """The wire line: ``base64(payload XOR key) + "\\n"``."""
        return signal_key(key).line(self.action, self.remote, self.id, self.fp)


def tcp_launch(remote: str, pool_id: str) -> Signal:
    return Signal(Action.TCP, remote, pool_id)


def udp_launch(remote: str, pool_id: str) -> Signal:
    return Signal(Action.UDP, remote, pool_id)


def verify(pool_id: str, fp: str) -> Signal:
    """A verify signal; raises :class:`V114Error` unless ``fp`` is a
    fingerprint as :func:`fingerprint` writes it (never an empty one)."""
    sig = Signal(Action.VERIFY, id=pool_id, fp=fp)
    sig.payload()
    return sig


FLUSH = Signal(Action.FLUSH)
PING = Signal(Action.PING)
PONG = Signal(Action.PONG)


def _loggable(text: str) -> bool:
    return len(text) <= MAX_FIELD and text.isprintable()


#: What a decoded signal is before it becomes a :class:`Signal`: action,
#: remote, id, fp (the control channel's dialect builds its own kind of
#: signal from these, so nothing is built twice).
Fields = tuple[str, str, str, str]


def _parse_fields(payload: bytes) -> Fields:
    """The general reader behind :func:`parse_payload` (any JSON)."""
    try:
        members = _members(_json_value(bytes(payload).decode("utf-8", "replace"), whole=True), _FIELDS)
    except V114Error as e:
        raise SignalUnmarshalError(str(e)) from None
    if not all(isinstance(v, str) for v in members.values()):
        raise SignalUnmarshalError("signal members must be JSON strings")
    if not all(_loggable(v) for v in members.values()):
        raise SignalUnmarshalError("signal with a malformed member")
    return (members.get("action", ""), members.get("remote", ""), members.get("id", ""), members.get("fp", ""))


def parse_payload(payload: bytes) -> Signal:
    """A signal of its JSON payload, read as Go's ``json.Unmarshal`` does
    (any member order, whitespace, unknown members, case-insensitive
    names; exactly one JSON value).  Raises :class:`SignalUnmarshalError`.
    Members with control characters or longer than :data:`MAX_FIELD` are
    refused too: they end up in log lines, and Go peers never send such."""
    return Signal(*_parse_fields(payload))


#: The exact shape this end and Go peers write (members in order, compact),
#: with plain members: printable ASCII without ``"`` or ``\\``, at most
#: :data:`MAX_FIELD` long.  For such a payload the members are the JSON
#: strings' text as is, and :func:`_parse_fields` would return the same;
#: anything else goes to it.  Matched on the Latin-1 text of the payload,
#: so a non-ASCII byte simply does not match.
_PLAIN_MEMBER = r'"([ !#-\[\]-~]{0,%d})"' % MAX_FIELD
_WRITTEN_SHAPE = re.compile(
    r'\{"action":%s(?:,"remote":%s)?(?:,"id":%s)?(?:,"fp":%s)?\}' % ((_PLAIN_MEMBER,) * 4)
)


#: The payloads of the signals that carry nothing but their action.
_BARE_PAYLOADS = {str(action): _payload(action, "", "", "") for action in (Action.PING, Action.PONG, Action.FLUSH)}


class SignalKey:
    """Signal lines under one tunnel key: what depends only on the key is
    computed once (:class:`~nodepass.wire.codec.KeyStream`), and the
    launch signals -- one per short connection -- take a fast path.

    The fast paths only cover inputs where their result is provably the
    general one (plain ASCII text, the exact written shape); everything
    else goes through :func:`_payload` / :func:`_parse_fields`, so the
    bytes written and the verdicts (exceptions and messages included) are
    those of the general code for every input."""

    __slots__ = ("key", "stream")

    def __init__(self, key: bytes):
        self.key = key
        self.stream = KeyStream(key)

    def payload(self, action: str, remote: str, pool_id: str, fp: str) -> bytes:
        """Exactly ``Signal(action, remote, pool_id, fp).payload()``."""
        if not fp:
            if action == "tcp" or action == "udp":
                if remote and pool_id and _plain(remote) and _plain(pool_id):
                    return f'{{"action":"{action}","remote":"{remote}","id":"{pool_id}"}}'.encode("ascii")
            elif not remote and not pool_id:
                bare = _BARE_PAYLOADS.get(action)
                if bare is not None:
                    return bare
        return _payload(action, remote, pool_id, fp)

    def line(self, action: str, remote: str, pool_id: str, fp: str) -> bytes:
        """The wire line, ``\\n`` included; raises as :meth:`Signal.payload`."""
        return binascii.b2a_base64(self.stream.xor(self.payload(action, remote, pool_id, fp)), newline=True)

    def fields(self, line: bytes) -> Fields:
        """The members of one wire line; verdicts as :func:`decode_line`."""
        if len(line) > MAX_LINE:
            raise SignalDecodeError(f"signal line longer than {MAX_LINE} bytes")
        try:
            # What base64.b64decode(..., validate=True) does on bytes.
            raw = binascii.a2b_base64(line.removesuffix(b"\n"), strict_mode=True)
        except (binascii.Error, ValueError):
            raise SignalDecodeError("signal line is not base64") from None
        payload = self.stream.xor(raw)
        match = _WRITTEN_SHAPE.fullmatch(payload.decode("latin-1"))
        if match is not None:
            action, remote, pool_id, fp = match.groups("")
            return action, remote, pool_id, fp
        return _parse_fields(payload)


@functools.lru_cache(maxsize=64)
def _signal_key(key: bytes) -> SignalKey:
    return SignalKey(key)


def signal_key(key: Union[str, bytes]) -> SignalKey:
    """The (cached) :class:`SignalKey` of a tunnel key."""
    return _signal_key(_key_bytes(key))


def decode_line(line: bytes, key: Union[str, bytes]) -> Signal:
    """A signal of one wire line.  Exactly one trailing ``\\n`` is stripped
    (a ``\\r`` before it is a decode error, as in Go).  Raises
    :class:`SignalDecodeError` for bad base64 or an oversize line and
    :class:`SignalUnmarshalError` for a payload that is not a signal."""
    return Signal(*signal_key(key).fields(bytes(line)))


# ---------------------------------------------------------------------------
# Telling the generations apart (issue: one tunnel port, both generations)


class Generation(Enum):
    """What a connection's first bytes are."""

    NEED_MORE = "need more bytes"
    V114 = "1.14 handshake"  # an HTTP GET with Authorization: Bearer
    V112 = "1.12 key line"  # a base64 line
    V112_PROBE = "1.12 IP probe"  # an HTTP GET without Bearer
    UNKNOWN = "neither"


_B64_CHARS = re.compile(rb"[A-Za-z0-9+/=]*\Z")


def sniff(prefix: bytes) -> Generation:
    """The generation of a connection that has sent ``prefix`` so far.

    ``GET `` starts an HTTP request: a header ``Authorization: Bearer …``
    (name in any case, value starting with the exact bytes ``Bearer ``)
    makes it 1.14, whatever its path (the 1.14 parser then answers a wrong
    path with 404); the end of the head without one makes it the 1.12 IP
    probe, and so does a head longer than :data:`MAX_REQUEST_HEAD`.  A line
    of strict base64 (``\\r\\n`` or ``\\n``) is a 1.12 key line.  NEED_MORE
    while undecided; UNKNOWN for anything else (another method included)."""
    prefix = bytes(prefix[: MAX_REQUEST_HEAD + 1])
    if not prefix:
        return Generation.NEED_MORE
    if prefix[:4] == b"GET "[: len(prefix)] and len(prefix) < 4:
        return Generation.NEED_MORE  # "G", "GE", "GET" are base64 too
    if prefix.startswith(b"GET "):
        pos = prefix.find(b"\n") + 1  # headers start after the request line
        if pos == 0:
            return Generation.V112_PROBE if len(prefix) > MAX_REQUEST_HEAD else Generation.NEED_MORE
        while True:
            nl = prefix.find(b"\n", pos)
            if nl < 0:
                return Generation.V112_PROBE if len(prefix) > MAX_REQUEST_HEAD else Generation.NEED_MORE
            line = prefix[pos:nl].removesuffix(b"\r")
            if not line:
                return Generation.V112_PROBE
            name, colon, value = line.partition(b":")
            if colon and name.lower() == b"authorization" and value.lstrip(b" \t").startswith(b"Bearer "):
                return Generation.V114
            pos = nl + 1
    nl = prefix.find(b"\n")
    body = prefix if nl < 0 else prefix[:nl].removesuffix(b"\r")
    if not _B64_CHARS.match(body):
        return Generation.UNKNOWN
    if nl < 0:
        return Generation.NEED_MORE if len(prefix) <= MAX_LINE else Generation.UNKNOWN
    if not body or len(body) % 4:
        return Generation.UNKNOWN
    try:
        base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        return Generation.UNKNOWN
    return Generation.V112
