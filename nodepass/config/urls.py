"""Instance URLs (``server://``, ``client://``, ``master://``) and the
environment tunables, parsed once into frozen attrs objects.

Everything downstream takes these objects, never raw strings, so a bad URL is
refused in one place with one readable message (``URLError``) and a bad
parameter value is replaced by its default with a warning the caller logs.
"""

from __future__ import annotations

import ipaddress
import os
import re
from enum import IntEnum
from typing import Any, Callable, Mapping, Optional, TypeVar, Union
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import attrs

from nodepass.config.durations import DurationError, format_duration, parse_duration
from nodepass.base.kinds import BlockedProtocol, ClientMode, PoolType, Role, ServerMode, TLSCode, Wire
from nodepass.base.logs import CONTROL_CHARS

LOG_LEVELS = ("none", "debug", "info", "warn", "error", "event")

# Go's time.Duration is an int64 of nanoseconds: nothing longer parses there,
# and nothing longer can be printed back in Go form here.
MAX_DURATION = (2**63 - 1) / 1e9
_SURROGATE = re.compile("[\ud800-\udfff]")
_ASCII_INT = re.compile(r"[+-]?[0-9]+")
_SHOWN_MAX = 120


class URLError(ValueError):
    """An instance URL that cannot be run at all (exit status 2)."""


def text_problem(text: str) -> Optional[str]:
    """Why ``text`` may not be stored, logged or sent as is, or None.

    A lone surrogate (JSON's ``"\\ud800"``, or undecodable bytes in argv)
    cannot be encoded as UTF-8, so every later answer or log line holding it
    would fail; a control character or line separator lets its author forge
    log lines and break line-based parsers.
    """
    if text.isprintable():  # the common case, checked in C
        return None
    found = _SURROGATE.search(text)
    if found:
        return f"not valid UTF-8 text (lone surrogate U+{ord(found.group()):04X})"
    found = CONTROL_CHARS.search(text)
    if found:
        return f"control character U+{ord(found.group()):04X} not allowed"
    return None


def shown(text: str) -> str:
    """``text`` quoted for an error message: ``repr`` (so one line, control
    characters escaped) and cut short, so a 5,000-digit port does not make a
    5,000-character message."""
    if len(text) > _SHOWN_MAX:
        return repr(text[:_SHOWN_MAX]) + f"... ({len(text)} characters)"
    return repr(text)


def ascii_int(text: str) -> Optional[int]:
    """``text`` as an integer if it is one written in ASCII digits (an
    optional sign, then digits), else None.

    ``int()`` alone also takes other scripts' digits, underscores and
    surrounding spaces, and raises once past 4,300 digits; ``isdigit()``
    is true for ``"²"``, which ``int()`` then refuses.  Values bigger than
    any parameter allows keep their sign but are capped, so range checks
    still refuse them without converting thousands of digits.
    """
    if not _ASCII_INT.fullmatch(text):
        return None
    sign = -1 if text[0] == "-" else 1
    digits = text.lstrip("+-").lstrip("0") or "0"
    if len(digits) > 30:
        return sign * 10**30
    return sign * int(digits)


def default_key(port: int) -> str:
    """The tunnel key used when the URL gives none: the 32-bit FNV-1a hash of
    the tunnel port as decimal text, as 8 lowercase hex digits.  Both peers
    derive it the same way, so a keyless server and client still agree."""
    h = 0x811C9DC5
    for byte in str(port).encode("ascii"):
        h ^= byte
        h = (h * 0x01000193) & 0xFFFFFFFF
    return f"{h:08x}"


def join_host_port(host: str, port: int) -> str:
    """``host:port`` with IPv6 literals bracketed, the way Go's
    ``net.JoinHostPort`` writes it."""
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def parse_port(text: str, allow_zero: bool = False) -> int:
    """A TCP/UDP port written in ASCII digits, 1-65535 (0 too when
    ``allow_zero``: let the OS choose, only for addresses we listen on).
    Raises ``URLError``."""
    value = ascii_int(text) if text[:1].isascii() and text[:1].isdigit() else None
    low = 0 if allow_zero else 1
    if value is None or not low <= value <= 65535:
        raise URLError(f"invalid port {shown(text)} (expected a number from {low} to 65535)")
    return value


def split_host_port(text: str, allow_zero: bool = False) -> tuple[str, int]:
    """Inverse of :func:`join_host_port`; raises ``URLError``.  Port 0 (let
    the OS choose) is allowed only for addresses we listen on."""
    problem = text_problem(text)
    if problem:
        raise URLError(f"invalid address {shown(text)}: {problem}")
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise URLError(f"invalid address {shown(text)}: expected [IPv6]:port")
        host, port_text = text[1:end], text[end + 2 :]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise URLError(f"invalid address {shown(text)}: missing port")
        if ":" in host:
            raise URLError(f"invalid address {shown(text)}: IPv6 literals need brackets")
    try:
        port = parse_port(port_text, allow_zero)
    except URLError as e:
        raise URLError(f"{e} in address {shown(text)}") from None
    return host, port


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_unspecified(host: str) -> bool:
    if host == "":
        return True
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


@attrs.frozen
class Address:
    """One ``host:port``; ``host`` carries no brackets."""

    host: str
    port: int

    def __str__(self) -> str:
        return join_host_port(self.host, self.port)

    @classmethod
    def parse(cls, text: str, allow_zero: bool = False) -> "Address":
        return cls(*split_host_port(text, allow_zero))


# Defaults of every query parameter, as typed values.
_TUNNEL_DEFAULTS: dict[str, object] = {
    "log": "info",
    "tls": TLSCode.NONE,
    "crt": "",
    "key": "",
    "dns": 300.0,
    "min": 64,
    "max": 1024,
    "mode": 0,  # ServerMode.AUTO or ClientMode.AUTO, by the role
    "quic": PoolType.TCP,
    "type": PoolType.TCP,
    "sni": "",  # by the tunnel host: see TunnelConfig.server_name
    "block": "0",
    "wire": Wire.AUTO,
    "dial": "auto",
    "read": 0.0,
    "rate": 0,
    "slot": 65536,
    "proxy": 0,
    "notcp": 0,
    "noudp": 0,
}

# Order of the start line (SPEC §7, SPEC-1.14 §7); the config URL sorts instead.
SERVER_START_KEYS = ("dns", "max", "mode", "quic", "dial", "read", "rate", "slot", "proxy", "notcp", "noudp")
CLIENT_START_KEYS = ("dns", "min", "mode", "quic", "dial", "read", "rate", "slot", "proxy", "notcp", "noudp")
SERVER_CONFIG_KEYS = ("dns", "max", "mode", "quic", "dial", "read", "rate", "slot", "proxy", "notcp", "noudp")
CLIENT_CONFIG_KEYS = ("dns", "min", "mode", "dial", "read", "rate", "slot", "proxy", "notcp", "noudp")
SERVER_START_KEYS_114 = (
    "dns", "max", "mode", "type", "dial", "read", "rate", "slot", "proxy", "block", "notcp", "noudp"
)
CLIENT_START_KEYS_114 = (
    "dns", "sni", "min", "mode", "dial", "read", "rate", "slot", "proxy", "block", "notcp", "noudp"
)
SERVER_CONFIG_KEYS_114 = (
    "dns", "max", "mode", "type", "dial", "read", "rate", "slot", "proxy", "block", "notcp", "noudp"
)
CLIENT_CONFIG_KEYS_114 = ("dns", "sni", "min", "mode", "dial", "read", "rate", "slot", "proxy", "block", "notcp", "noudp")

_DURATION_KEYS = {"dns", "read"}


def _int_param(name: str, lo: int, hi: int) -> Callable[[str], int]:
    def check(raw: str) -> int:
        value = ascii_int(raw)
        if value is None:
            raise ValueError(f"{name} must be a whole number")
        if not lo <= value <= hi:
            raise ValueError(f"{name} must be between {lo} and {hi}")
        return value

    return check


_Kind = TypeVar("_Kind", bound=IntEnum)


def _kind_param(name: str, kind: type[_Kind], highest: Optional[_Kind] = None) -> Callable[[str], _Kind]:
    """A parameter whose values are the members of ``kind`` (``tls``,
    ``quic``, ``type``), up to ``highest``: checked as a whole number in
    their range, the same words."""
    values = [member.value for member in kind if highest is None or member.value <= highest]
    check = _int_param(name, min(values), max(values))

    def member(raw: str) -> _Kind:
        return kind(check(raw))

    return member


def _level(raw: str) -> str:
    if raw not in LOG_LEVELS:
        raise ValueError(f"log must be one of {', '.join(LOG_LEVELS)}")
    return raw


def _dial(raw: str) -> str:
    if raw == "auto" or is_ip_literal(raw):
        return raw
    raise ValueError("dial must be an IP address or auto")


_SNI = re.compile(r"[!-~]{1,253}\Z")  # visible ASCII: it is sent as an HTTP Host


def _sni(raw: str) -> str:
    if not _SNI.match(raw):
        raise ValueError("sni must be a host name (visible ASCII, no spaces, at most 253 characters)")
    return raw


_BLOCK = re.compile(r"[0-9, ]{1,32}\Z")


def _block(raw: str) -> str:
    """Go searches the value for the digits 1, 2 and 3; anything but digits
    and commas is refused here rather than silently meaning nothing."""
    if not _BLOCK.match(raw):
        raise ValueError("block must list the digits 1 (SOCKS), 2 (HTTP) and 3 (TLS), e.g. 13 or 1,3")
    return raw


def _wire(raw: str) -> Wire:
    try:
        return Wire(raw)
    except ValueError:
        raise ValueError("wire must be auto, 1.12 or 1.14") from None


def _duration(raw: str) -> float:
    if not raw.isascii():  # Go durations are ASCII; int()/float() are not
        raise ValueError(f"invalid duration {shown(raw)}")
    try:
        value = parse_duration(raw)
    except DurationError as e:
        raise ValueError(str(e)) from None
    if not value <= MAX_DURATION:  # also refuses inf and nan
        raise ValueError(f"duration {shown(raw)} out of range")
    return value


_VALIDATORS: dict[str, Callable[[str], object]] = {
    "log": _level,
    "tls": _kind_param("tls", TLSCode),
    "crt": str,
    "key": str,
    "dns": _duration,
    "min": _int_param("min", 1, 1 << 20),
    "max": _int_param("max", 1, 1 << 20),
    "mode": _int_param("mode", 0, 2),
    "quic": _kind_param("quic", PoolType, PoolType.QUIC),
    "type": _kind_param("type", PoolType),
    "sni": _sni,
    "block": _block,
    "wire": _wire,
    "dial": _dial,
    "read": _duration,
    "rate": _int_param("rate", 0, 1 << 40),
    "slot": _int_param("slot", 0, 1 << 31),
    "proxy": _int_param("proxy", 0, 1),
    "notcp": _int_param("notcp", 0, 1),
    "noudp": _int_param("noudp", 0, 1),
    "workers": _int_param("workers", 0, 256),
}


def default_workers() -> int:
    """The master's ``workers`` when the URL gives none: one worker process
    per core this process may run on (``sched_getaffinity``, so a master
    pinned by ``taskset`` or a container's CPU set uses what it was given)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


#: The master's own parameters beyond ``log``/``tls``/``crt``/``key``.
_MASTER_DEFAULTS: dict[str, object] = {
    "log": "info",
    "tls": TLSCode.NONE,
    "crt": "",
    "key": "",
    "workers": "the number of cores",
}


POOL_TYPE_NAMES = {
    PoolType.TCP: "TCP",
    PoolType.QUIC: "QUIC",
    PoolType.WEBSOCKET: "WebSocket",
    PoolType.HTTP2: "HTTP/2",
}


def _param_text(name: str, value: object) -> str:
    if name in _DURATION_KEYS:
        return format_duration(value)  # type: ignore[arg-type]
    return str(value)


@attrs.frozen
class TunnelConfig:
    """A parsed ``server://`` or ``client://`` URL with every parameter typed.

    ``given`` holds the names of query parameters the URL spelled out, so the
    master can tell a default from an explicit choice; ``warnings`` the
    messages about values that were replaced by defaults, ``errors`` those
    replacements logged at ERROR (an invalid ``tls`` means plaintext).

    ``role``, ``tls``, ``mode`` and ``quic`` are the kinds of
    :mod:`nodepass.base.kinds`, whose members are their URL values; given
    as plain values they are converted (``mode`` by the role: a server's
    is a :class:`ServerMode`, a client's a :class:`ClientMode`).
    """

    role: Role = attrs.field(converter=Role)  # SERVER or CLIENT
    tunnel: Address
    targets: tuple[Address, ...]
    tunnel_key: str
    key_given: bool = False
    log: str = "info"
    tls: TLSCode = attrs.field(default=TLSCode.NONE, converter=TLSCode)
    crt: str = ""
    key: str = ""
    dns: float = 300.0
    min: int = 64
    max: int = 1024
    mode: Union[ServerMode, ClientMode] = ServerMode.AUTO
    quic: PoolType = attrs.field(default=PoolType.TCP, converter=PoolType)
    type: PoolType = attrs.field(default=PoolType.TCP, converter=PoolType)
    sni: str = ""
    block: str = "0"
    wire: Wire = attrs.field(default=Wire.AUTO, converter=Wire)
    dial: str = "auto"
    read: float = 0.0
    rate: int = 0
    slot: int = 65536
    proxy: int = 0
    notcp: int = 0
    noudp: int = 0
    given: frozenset = frozenset()
    warnings: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()
    raw: str = ""

    def __attrs_post_init__(self) -> None:
        kind = ServerMode if self.is_server else ClientMode
        object.__setattr__(self, "mode", kind(self.mode))  # frozen: set once, here

    @property
    def is_server(self) -> bool:
        return self.role is Role.SERVER

    @property
    def title(self) -> str:
        """``Server``/``Client``, the word that starts lifecycle log lines."""
        return self.role.capitalize()

    def targets_text(self) -> str:
        return ",".join(str(t) for t in self.targets)

    @property
    def server_name(self) -> str:
        """The 1.14 client's server name (SPEC-1.14 §1 ``sni``): as given,
        else the tunnel host when it is a DNS name, else ``none``."""
        if self.sni:
            return self.sni
        host = self.tunnel.host
        return "none" if not host or is_ip_literal(host) else host

    @property
    def blocked(self) -> frozenset[BlockedProtocol]:
        """The protocols ``block=`` refuses (SPEC-1.14 §5.1)."""
        return frozenset(p for p in BlockedProtocol if str(p.value) in self.block)

    @property
    def effective_wire(self) -> Wire:
        """``wire`` as the instance applies it: a server with ``quic=1``
        (the 1.12 QUIC pool; 1.14 dropped ``quic=``) serves 1.12 only."""
        if self.wire is Wire.AUTO and self.is_server and self.quic == PoolType.QUIC:
            return Wire.V112
        return self.wire

    @property
    def speaks_112_lines(self) -> bool:
        """Whether the start line and the master's ``config`` follow 1.12
        (``quic=``) rather than 1.14 (``type=``, ``sni=``, ``block=``): for
        an instance pinned to 1.12 and for URLs that use ``quic=``."""
        return self.effective_wire is Wire.V112 or "quic" in self.given

    def _base(self, with_key: bool) -> str:
        userinfo = f"{quote(self.tunnel_key, safe='')}@" if with_key else ""
        return f"{self.role}://{userinfo}{self.tunnel}/{self.targets_text()}"

    def start_url(self, mode: Optional[int] = None) -> str:
        """The URL printed in the ``Server started:`` line: the key always
        shown, parameters in NodePass's fixed order."""
        keys: tuple[str, ...]
        if self.speaks_112_lines:
            keys = SERVER_START_KEYS if self.is_server else CLIENT_START_KEYS
        else:
            keys = SERVER_START_KEYS_114 if self.is_server else CLIENT_START_KEYS_114
        values = {k: getattr(self, k) for k in keys}
        if "sni" in values:
            values["sni"] = self.server_name
        if mode is not None:
            values["mode"] = mode
        query = "&".join(f"{k}={_param_text(k, values[k])}" for k in keys)
        return f"{self._base(True)}?{query}"

    def config_url(self) -> str:
        """The master's ``config`` field: every default written out, keys in
        alphabetical order, plus log/tls/crt/key where the URL named them."""
        if self.speaks_112_lines:
            keys = set(SERVER_CONFIG_KEYS if self.is_server else CLIENT_CONFIG_KEYS)
        else:
            keys = set(SERVER_CONFIG_KEYS_114 if self.is_server else CLIENT_CONFIG_KEYS_114)
        keys |= {k for k in ("log", "tls", "crt", "key", "wire", "quic") if k in self.given}
        values = {k: getattr(self, k) for k in keys}
        if "sni" in values:
            values["sni"] = self.server_name
        query = "&".join(f"{k}={quote(_param_text(k, values[k]), safe='/:,')}" for k in sorted(keys))
        return f"{self._base(self.key_given)}?{query}"

    def evolve(self, **changes: Any) -> "TunnelConfig":
        return attrs.evolve(self, **changes)


@attrs.frozen
class MasterConfig:
    """A parsed ``master://`` URL."""

    api: Address
    prefix: str = "/api"
    log: str = "info"
    tls: TLSCode = attrs.field(default=TLSCode.NONE, converter=TLSCode)
    crt: str = ""
    key: str = ""
    given: frozenset = frozenset()
    warnings: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()
    raw: str = ""
    role: Role = Role.MASTER
    #: Worker processes that run the instances; 0 runs them in the
    #: master's own reactor (see ``nodepass.workers``).
    workers: int = attrs.field(factory=default_workers)

    @property
    def title(self) -> str:
        return "Master"


InstanceConfig = Union[TunnelConfig, MasterConfig]


def _parse_query(
    query: str, allowed: tuple[str, ...], defaults: Mapping[str, object] = _TUNNEL_DEFAULTS
) -> tuple[dict, set, list, list]:
    """Typed values, the names given, warnings (values replaced by their
    defaults) and errors (replacements the operator must not miss: an
    invalid ``tls`` silently giving plaintext)."""
    values: dict[str, object] = {}
    given: set[str] = set()
    warnings: list[str] = []
    errors: list[str] = []
    seen: set[str] = set()
    for name, raw in parse_qsl(query, keep_blank_values=True):
        if name in seen:
            continue  # Go's Query().Get returns the first value
        seen.add(name)
        if name not in allowed:
            warnings.append(f"Unknown parameter {shown(name)} ignored")
            continue
        try:
            values[name] = _VALIDATORS[name](raw)
        except ValueError as e:
            default = defaults[name]
            fallback = _param_text(name, default) if default != "" else '""'
            if name == "tls":
                errors.append(f"Invalid tls={shown(raw)} ({e}), using tls={fallback}: traffic is NOT encrypted")
            else:
                warnings.append(f"Invalid {name}={shown(raw)} ({e}), using default {fallback}")
            continue
        given.add(name)
    return values, given, warnings, errors


def parse_url(text: str) -> InstanceConfig:
    """Parse an instance URL.  Raises :class:`URLError` when the URL cannot be
    run (unknown scheme, no tunnel address, no target, bad port, a loop)."""
    if not isinstance(text, str) or not text.strip():
        raise URLError("empty instance URL")
    # Refused as given and once percent-decoded (hosts, keys and query
    # values are decoded below): such text would reach log lines and the
    # master's answers.
    problem = text_problem(text) or text_problem(unquote(text))
    if problem:
        raise URLError(f"invalid URL {shown(text)}: {problem}")
    text = text.strip()
    if "://" not in text:
        raise URLError(f"invalid URL {shown(text)}: expected server://, client:// or master://")
    try:
        parts = urlsplit(text)
    except ValueError as e:
        raise URLError(f"invalid URL {shown(text)}: {e}") from None
    try:
        scheme = Role(parts.scheme.lower())
    except ValueError:
        raise URLError(f"unknown scheme {shown(parts.scheme)}: expected server, client or master") from None
    netloc = parts.netloc
    userinfo, at, hostport = netloc.rpartition("@")
    if not at:
        userinfo, hostport = "", netloc
    if not hostport:
        raise URLError(f"invalid URL {shown(text)}: no {'API' if scheme is Role.MASTER else 'tunnel'} address")
    try:
        address = Address.parse(hostport, allow_zero=True)
    except URLError as e:
        raise URLError(f"invalid URL {shown(text)}: {e}") from None

    if scheme is Role.MASTER:
        values, given, warnings, errors = _parse_query(parts.query, tuple(_MASTER_DEFAULTS), _MASTER_DEFAULTS)
        prefix = parts.path.rstrip("/") or "/api"
        if not prefix.startswith("/"):
            prefix = "/" + prefix
        return MasterConfig(
            api=address,
            prefix=prefix,
            given=frozenset(given),
            warnings=tuple(warnings),
            errors=tuple(errors),
            raw=text,
            **values,
        )

    path = unquote(parts.path.lstrip("/"))
    if not path:
        raise URLError(f"invalid URL {shown(text)}: no target address")
    targets = []
    for item in path.split(","):
        try:
            targets.append(Address.parse(item))
        except URLError as e:
            raise URLError(f"invalid URL {shown(text)}: target {e}") from None
    values, given, warnings, errors = _parse_query(parts.query, tuple(_TUNNEL_DEFAULTS))
    # A client learns tls/max/quic from the server and a server has no pool
    # minimum; Go peers ignore such parameters silently, and so do we.
    if scheme is Role.CLIENT:
        for name in ("max", "quic", "type", "tls", "crt", "key"):
            values.pop(name, None)
            given.discard(name)
        errors = []  # only ever about tls, which a client ignores
    else:
        values.pop("min", None)
        given.discard("min")
        if values.get("wire") is Wire.V114 and "quic" in values:
            values.pop("quic")
            given.discard("quic")
            warnings.append("quic= is a 1.12 parameter, ignored with wire=1.14 (use type=1 for a QUIC pool)")
        if values.get("wire") is Wire.V112 and "type" in values:
            values.pop("type")
            given.discard("type")
            warnings.append("type= is a 1.14 parameter, ignored with wire=1.12 (use quic=1 for a QUIC pool)")
    if scheme is Role.SERVER and values.get("quic") == PoolType.QUIC and values.get("tls", TLSCode.NONE) == TLSCode.NONE:
        values["tls"] = TLSCode.RAM_CERT
        warnings.append("quic=1 requires TLS, using tls=1")
    stream_pool = values.get("type") in (PoolType.QUIC, PoolType.HTTP2) and values.get("wire") is not Wire.V112
    if scheme is Role.SERVER and stream_pool and values.get("tls", TLSCode.NONE) == TLSCode.NONE:
        # SPEC-1.14 §1: QUIC and HTTP/2 pools always encrypt.
        values["tls"] = TLSCode.RAM_CERT
        warnings.append(f"type={int(values['type'])} requires TLS, using tls=1")
    for target in targets:
        if target.port == address.port and (is_loopback(target.host) or is_unspecified(address.host)):
            raise URLError(
                f"invalid URL {shown(text)}: target {target} uses the tunnel port {address.port} "
                "on this host, which would loop forever"
            )
    key = unquote(userinfo.partition(":")[0]) if userinfo else ""
    return TunnelConfig(
        role=scheme,
        tunnel=address,
        targets=tuple(targets),
        tunnel_key=key or default_key(address.port),
        key_given=bool(key),
        given=frozenset(given),
        warnings=tuple(warnings),
        errors=tuple(errors),
        raw=text,
        **values,
    )


def _env_duration(env: Mapping[str, str], name: str, default: float, warnings: list) -> float:
    raw = env.get(name)
    if raw is None:
        return default
    try:
        value = _duration(raw.strip())
    except ValueError:
        warnings.append(f"Invalid {name}={shown(raw)}, using default {format_duration(default)}")
        return default
    return value


def _env_int(env: Mapping[str, str], name: str, default: int, warnings: list) -> int:
    raw = env.get(name)
    if raw is None:
        return default
    value = ascii_int(raw.strip())
    if value is None or not 0 < value <= 1 << 31:
        warnings.append(f"Invalid {name}={shown(raw)}, using default {default}")
        return default
    return value


@attrs.frozen
class Tunables:
    """The ``NP_*`` environment tunables of SPEC §1, in seconds and bytes."""

    semaphore_limit: int = 65536
    tcp_data_buf_size: int = 16384
    udp_data_buf_size: int = 16384
    handshake_timeout: float = 5.0
    tcp_dial_timeout: float = 5.0
    udp_dial_timeout: float = 5.0
    udp_read_timeout: float = 30.0
    pool_get_timeout: float = 5.0
    min_pool_interval: float = 0.1
    max_pool_interval: float = 1.0
    report_interval: float = 5.0
    service_cooldown: float = 3.0
    shutdown_timeout: float = 5.0
    reload_interval: float = 3600.0
    warnings: tuple[str, ...] = ()

    @classmethod
    def from_environ(cls, env: Mapping[str, str] | None = None) -> "Tunables":
        env = os.environ if env is None else env
        w: list[str] = []
        d = cls()
        return cls(
            semaphore_limit=_env_int(env, "NP_SEMAPHORE_LIMIT", d.semaphore_limit, w),
            tcp_data_buf_size=_env_int(env, "NP_TCP_DATA_BUF_SIZE", d.tcp_data_buf_size, w),
            udp_data_buf_size=_env_int(env, "NP_UDP_DATA_BUF_SIZE", d.udp_data_buf_size, w),
            handshake_timeout=_env_duration(env, "NP_HANDSHAKE_TIMEOUT", d.handshake_timeout, w),
            tcp_dial_timeout=_env_duration(env, "NP_TCP_DIAL_TIMEOUT", d.tcp_dial_timeout, w),
            udp_dial_timeout=_env_duration(env, "NP_UDP_DIAL_TIMEOUT", d.udp_dial_timeout, w),
            udp_read_timeout=_env_duration(env, "NP_UDP_READ_TIMEOUT", d.udp_read_timeout, w),
            pool_get_timeout=_env_duration(env, "NP_POOL_GET_TIMEOUT", d.pool_get_timeout, w),
            min_pool_interval=_env_duration(env, "NP_MIN_POOL_INTERVAL", d.min_pool_interval, w),
            max_pool_interval=_env_duration(env, "NP_MAX_POOL_INTERVAL", d.max_pool_interval, w),
            report_interval=_env_duration(env, "NP_REPORT_INTERVAL", d.report_interval, w),
            service_cooldown=_env_duration(env, "NP_SERVICE_COOLDOWN", d.service_cooldown, w),
            shutdown_timeout=_env_duration(env, "NP_SHUTDOWN_TIMEOUT", d.shutdown_timeout, w),
            reload_interval=_env_duration(env, "NP_RELOAD_INTERVAL", d.reload_interval, w),
            warnings=tuple(w),
        )
