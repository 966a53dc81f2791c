"""The master's record of one instance, and how a URL given to the API
becomes the ``url``/``config`` pair dashboards show.

A record outlives every run of its instance: it owns the
:class:`~nodepass.base.stats.InstanceStats` handed to each new
:class:`~nodepass.service.instance.TunnelService`, so traffic counters stay
cumulative across restarts (and, through the state file, across master
restarts).  Records are instances only: the API key's ``********`` record is
the wire form of :class:`~nodepass.master.identity.MasterIdentity`.
"""

from __future__ import annotations

import json
import secrets
from typing import Any, Iterable, Optional
from urllib.parse import quote_from_bytes, unquote_to_bytes, urlsplit

import attrs

from nodepass.config.urls import MasterConfig, TunnelConfig, URLError, parse_url, text_problem
from nodepass.base.kinds import Status
from nodepass.base.logs import escape_controls
from nodepass.base.stats import Checkpoint, InstanceStats
from nodepass.master.errors import InvalidRequest, InvalidURL

MAX_TEXT = 256
PEER_FIELDS = ("sid", "type", "alias")


def json_utf8(obj: Any) -> bytes:
    """``obj`` as compact UTF-8 JSON.

    Text is validated before it is stored and repaired when a state file
    holds bad text, so the fallback should never run; it is here because a
    lone surrogate that slipped through would otherwise turn every answer
    holding it into a 500 (``\\ud800`` escapes are valid JSON text).
    """
    try:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, separators=(",", ":")).encode("ascii")


def repaired_text(value: object, where: str, problems: list[str]) -> str:
    """``value`` from a state file as storable text: a non-string becomes
    its ``str()``; control characters and lone surrogates (a file written
    by an older version, or edited by hand) become visible escapes, and the
    repair is noted in ``problems`` (``where`` names the field)."""
    text = value if isinstance(value, str) else str(value)
    if text_problem(text):
        fixed = escape_controls(text)
        problems.append(f"{where} {fixed[:60]!r} held control characters or invalid UTF-8; escaped")
        return fixed
    return text


def new_instance_id(taken: Iterable[str]) -> str:
    """8 random hex digits no instance in ``taken`` has."""
    while True:
        candidate = secrets.token_hex(4)
        if candidate not in taken:
            return candidate


def empty_meta() -> dict[str, dict[str, str]]:
    return {"peer": {"sid": "", "type": "", "alias": ""}, "tags": {}}


def _scheme_of(text: str) -> str:
    if "://" not in text:
        raise InvalidURL()
    try:
        return urlsplit(text).scheme.lower()
    except ValueError:
        raise InvalidURL() from None


def go_query_pairs(query: str) -> list[tuple[bytes, bytes]]:
    """``query`` parsed as Go's ``url.ParseQuery`` does: ``&``-separated,
    empty parts skipped, ``+`` is a space, ``%XX`` decoded (to bytes: Go
    strings are bytes).

    Go drops a part holding ``;`` or a malformed ``%`` escape; here such a
    part is kept as our own URL parser reads it (``;`` and a lone ``%`` as
    themselves), so re-encoding never changes what the instance runs with.
    """
    pairs = []
    for part in query.split("&"):
        if not part:
            continue
        key, _, value = part.partition("=")
        pairs.append((unquote_to_bytes(key.replace("+", " ")), unquote_to_bytes(value.replace("+", " "))))
    return pairs


def go_query_encode(pairs: list[tuple[bytes, bytes]]) -> str:
    """Go's ``url.Values.Encode``: keys sorted (bytewise), each key's
    values in their order, everything but ``A-Za-z0-9-_.~`` percent-escaped
    with upper-case hex and a space written ``+`` (so ``/`` is ``%2F`` and
    ``:`` is ``%3A``)."""
    grouped: dict[bytes, list[bytes]] = {}
    for key, value in pairs:
        grouped.setdefault(key, []).append(value)
    return "&".join(
        f"{_go_escape(key)}={_go_escape(value)}" for key in sorted(grouped) for value in grouped[key]
    )


def _go_escape(raw: bytes) -> str:
    return quote_from_bytes(raw, safe=" ").replace(" ", "+")



def instance_url(given: str, master: MasterConfig) -> tuple[str, TunnelConfig]:
    """The stored ``url`` of an instance created from ``given``, built as
    Go's master builds it (``enhanceURL``): the master's ``log`` when the URL
    names none (or an empty one), for a server the master's ``tls`` (and
    ``crt``/``key`` for tls 2) likewise, then the whole query re-encoded the
    way Go's ``url.Values.Encode`` does -- keys in alphabetical order, values
    query-escaped -- even when nothing was added.  An empty query stays
    empty.  Scheme, key, host, path and fragment are kept as given.

    Raises :class:`~nodepass.master.errors.InvalidURL` (or
    :class:`~nodepass.master.errors.InvalidRequest` for no URL at all) with
    SPEC §8's messages.
    """
    if not isinstance(given, str) or not given.strip():
        raise InvalidRequest("Invalid request body")
    if text_problem(given):  # before strip(), which would hide a trailing newline
        raise InvalidURL()
    given = given.strip()
    scheme = _scheme_of(given)
    if scheme not in ("server", "client"):
        raise InvalidURL("Invalid URL scheme")
    try:
        parse_url(given)
    except (URLError, ValueError):
        raise InvalidURL() from None
    base, hash_, fragment = given.partition("#")
    head, _, query = base.partition("?")
    pairs = go_query_pairs(query)

    def first(name: str) -> bytes:
        return next((v for k, v in pairs if k == name.encode()), b"")

    def set_default(name: str, value: str) -> None:
        # Go: ``if query.Get(name) == "" { query.Set(name, value) }``
        nonlocal pairs
        if value and not first(name):
            pairs = [p for p in pairs if p[0] != name.encode()] + [(name.encode(), value.encode())]

    set_default("log", master.log)
    if scheme == "server" and master.tls:
        set_default("tls", str(master.tls))
        if master.tls == 2:
            set_default("crt", master.crt)
            set_default("key", master.key)
    encoded = go_query_encode(pairs)
    url = head + ("?" + encoded if encoded else "") + (hash_ + fragment if hash_ else "")
    try:
        config = parse_url(url)
    except URLError:
        raise InvalidURL() from None
    if not isinstance(config, TunnelConfig):  # the scheme was checked above
        raise InvalidURL("Invalid URL scheme")
    return url, config


@attrs.define(eq=False)
class InstanceRecord:
    """One instance as the API shows it (SPEC §8 instance object).

    ``mode``/``ping``/``pool``/``tcps``/``udps`` and the byte counters are the
    latest CHECK_POINT's; ``stats`` is the live counter object the running
    tunnel adds to.
    """

    id: str
    url: str
    config: TunnelConfig
    alias: str = ""
    restart: bool = True
    meta: dict = attrs.Factory(empty_meta)
    status: Status = Status.STOPPED
    mode: int = 0
    ping: int = 0
    pool: int = 0
    tcps: int = 0
    udps: int = 0
    tcprx: int = 0
    tcptx: int = 0
    udprx: int = 0
    udptx: int = 0
    stats: InstanceStats = attrs.Factory(InstanceStats)
    # reactor time of this run's latest CHECK_POINT (None: none yet); the
    # master's silence rule needs one (not saved: Go's is not either)
    last_report: Optional[float] = attrs.field(default=None, repr=False)
    # (config, config_url()) of the last call: GET /instances builds every
    # record's JSON, and config_url() was most of its cost.
    _config_cache: Optional[tuple] = attrs.field(default=None, init=False, repr=False)
    # (to_json() dict, its encoding): encoding 100 instances for every
    # GET /instances cost more than building and comparing the dicts.
    _json_cache: Optional[tuple] = attrs.field(default=None, init=False, repr=False)

    @property
    def type(self) -> str:
        return self.config.role

    def config_text(self) -> str:
        cached = self._config_cache
        if cached is None or cached[0] is not self.config:
            cached = self._config_cache = (self.config, self.config.config_url())
        return cached[1]

    def to_json(self) -> dict[str, Any]:
        peer = self.meta.get("peer") or {}
        return {
            "id": self.id,
            "alias": self.alias,
            "type": self.type,
            "status": self.status.value,
            "url": self.url,
            "config": self.config_text(),
            "restart": self.restart,
            "meta": {
                "peer": {k: str(peer.get(k, "")) for k in PEER_FIELDS},
                "tags": dict(self.meta.get("tags") or {}),
            },
            "mode": self.mode,
            "ping": self.ping,
            "pool": self.pool,
            "tcps": self.tcps,
            "udps": self.udps,
            "tcprx": self.tcprx,
            "tcptx": self.tcptx,
            "udprx": self.udprx,
            "udptx": self.udptx,
        }

    def json_bytes(self) -> bytes:
        """``to_json()`` encoded (compact, UTF-8), re-encoded only when the
        object changed since the last call."""
        current = self.to_json()
        cached = self._json_cache
        if cached is None or cached[0] != current:
            cached = self._json_cache = (current, json_utf8(current))
        return cached[1]

    def apply_checkpoint(self, cp: Checkpoint) -> None:
        self.mode, self.ping, self.pool = cp.mode, cp.ping, cp.pool
        self.tcps, self.udps = cp.tcps, cp.udps
        self.tcprx, self.tcptx, self.udprx, self.udptx = cp.tcprx, cp.tcptx, cp.udprx, cp.udptx

    def clear_figures(self) -> None:
        """What Go's master zeroes when an instance stops or logs an error:
        the live figures.  ``mode`` and the byte counters stay."""
        self.ping = self.pool = self.tcps = self.udps = 0

    def sync_counters(self) -> None:
        """Copy the live counters into the record (at stop, before saving)."""
        s = self.stats
        self.tcprx, self.tcptx, self.udprx, self.udptx = s.tcp_rx, s.tcp_tx, s.udp_rx, s.udp_tx
        self.tcps, self.udps = s.tcps, s.udps

    def reset_counters(self) -> None:
        self.stats.reset_traffic()
        self.tcprx = self.tcptx = self.udprx = self.udptx = 0

    # -- persistence ------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "url": self.url,
            "alias": self.alias,
            "restart": self.restart,
            "meta": self.to_json()["meta"],
            "counters": {
                "tcprx": self.stats.tcp_rx,
                "tcptx": self.stats.tcp_tx,
                "udprx": self.stats.udp_rx,
                "udptx": self.stats.udp_tx,
            },
            "mode": self.mode,
        }

    @classmethod
    def from_state(cls, item: dict, problems: Optional[list[str]] = None) -> "InstanceRecord":
        """Raises ``ValueError``/``KeyError``/``TypeError``/``AttributeError``
        on an item that cannot be restored (the caller keeps it aside).

        Text fields that cannot be served as they are (control characters,
        lone surrogates) are repaired instead, each repair noted in
        ``problems``: one bad alias must not cost the instance, nor brick
        every later ``GET /instances``.
        """
        problems = [] if problems is None else problems
        url = item["url"]
        config = parse_url(url)  # refuses control characters and surrogates
        if not isinstance(config, TunnelConfig):
            raise ValueError(f"instance {item.get('id')!r}: not a tunnel URL")
        rid = str(item["id"])
        if len(rid) != 8 or text_problem(rid):
            raise ValueError(f"bad instance id {rid!r}")
        meta = item.get("meta") or {}
        peer = meta.get("peer") or {}
        tags = meta.get("tags") or {}
        counters = item.get("counters") or {}
        clean_tags: dict[str, str] = {}
        for k, v in tags.items():
            key = repaired_text(k, "tag key", problems)
            if key in clean_tags:
                problems.append(f"tag {key[:60]!r} dropped: same key as another tag once repaired")
                continue
            clean_tags[key] = repaired_text(v, f"tag {key[:40]!r}", problems)
        rec = cls(
            id=rid,
            url=url,
            config=config,
            alias=repaired_text(item.get("alias", ""), "alias", problems),
            restart=bool(item.get("restart", True)),
            meta={
                "peer": {k: repaired_text(peer.get(k, ""), f"meta.peer.{k}", problems) for k in PEER_FIELDS},
                "tags": clean_tags,
            },
            mode=int(item.get("mode", 0)),
        )
        rec.stats = InstanceStats(config.slot)
        rec.stats.tcp_rx = int(counters.get("tcprx", 0))
        rec.stats.tcp_tx = int(counters.get("tcptx", 0))
        rec.stats.udp_rx = int(counters.get("udprx", 0))
        rec.stats.udp_tx = int(counters.get("udptx", 0))
        rec.sync_counters()
        return rec
