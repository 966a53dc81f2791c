"""Who the master is: its API key, its ID and its alias.

The Go master shows its key as a pseudo-instance, ``********``, in every
list of instances, and dashboards depend on that record.  Here the key is
modelled as what it is (a credential plus two names); the ``********``
record exists only in its wire form (:meth:`MasterIdentity.to_json`), which
the API, the SSE stream and the state file show where Go shows it.
"""

from __future__ import annotations

import re
import secrets
from typing import Any, Optional, Union

import attrs

from nodepass.base.kinds import Status
from nodepass.base.logs import NodeLog
from nodepass.master.errors import KeyInvalid, KeyMissing
from nodepass.master.records import PEER_FIELDS, json_utf8, repaired_text

#: The ID of the key's record on the wire.
API_KEY_ID = "********"

_API_KEY = re.compile(r"[0-9a-f]{32}")
_MASTER_ID = re.compile(r"[0-9a-f]{16}")


def new_api_key() -> str:
    return secrets.token_hex(16)


@attrs.frozen
class MasterIdentity:
    """The credential every request must carry (``api_key``, 32 lowercase
    hex digits), the master ID (16 hex digits, made once, never changes)
    and the master's alias (free text, set through ``POST /info``).

    A value: a new key or alias is a new identity, so undoing a change
    that could not be saved is putting the old one back."""

    api_key: str
    master_id: str
    alias: str = ""

    def with_new_key(self) -> "MasterIdentity":
        return attrs.evolve(self, api_key=new_api_key())

    def with_alias(self, alias: str) -> "MasterIdentity":
        return attrs.evolve(self, alias=alias)

    def check(self, given: Union[bytes, str, None]) -> None:
        """Constant-time check of an ``X-API-Key`` value: raises
        :class:`KeyMissing` or :class:`KeyInvalid`."""
        if isinstance(given, str):
            given = given.encode("utf-8", "replace")
        if not given:
            raise KeyMissing()
        if not secrets.compare_digest(given, self.api_key.encode("ascii")):
            raise KeyInvalid()

    def to_json(self) -> dict[str, Any]:
        """The ``********`` record, field for field as Go shows it: the key
        as its ``url``, the master ID as its ``config``, the alias as its
        ``alias``; ``status`` empty, ``restart`` false, every figure zero."""
        return {
            "id": API_KEY_ID,
            "alias": self.alias,
            "type": "",
            "status": Status.NONE.value,
            "url": self.api_key,
            "config": self.master_id,
            "restart": False,
            "meta": {"peer": {k: "" for k in PEER_FIELDS}, "tags": {}},
            "mode": 0,
            "ping": 0,
            "pool": 0,
            "tcps": 0,
            "udps": 0,
            "tcprx": 0,
            "tcptx": 0,
            "udprx": 0,
            "udptx": 0,
        }

    def json_bytes(self) -> bytes:
        return json_utf8(self.to_json())

    # -- persistence ------------------------------------------------------

    def to_state(self) -> dict[str, str]:
        """The state file's top-level fields for the identity (in the
        file's order: ``master_id``, ``api_key``, ``alias``)."""
        return {"master_id": self.master_id, "api_key": self.api_key, "alias": self.alias}

    @classmethod
    def from_state(cls, state: Optional[dict], log: NodeLog) -> tuple["MasterIdentity", bool]:
        """The identity saved in ``state`` (None on first start) and
        whether a new key was made.

        A key or ID that is not lowercase hex would break the key check
        (and so every request): it is replaced, with an ERROR line unless
        the state is new.  An alias that is not storable text is repaired
        (see :func:`~nodepass.master.records.repaired_text`), also logged.
        """
        created = state is None
        state = state or {}
        key = state.get("api_key")
        mid = state.get("master_id")
        if not (isinstance(key, str) and _API_KEY.fullmatch(key)):
            if not created:
                log.error("State: API key unusable (not 32 lowercase hex digits), making a new one")
            key, created = new_api_key(), True
        if not (isinstance(mid, str) and _MASTER_ID.fullmatch(mid)):
            if not created:
                log.error("State: master ID unusable (not 16 lowercase hex digits), making a new one")
            mid = secrets.token_hex(8)
        problems: list[str] = []
        alias = repaired_text(state.get("alias", ""), "alias", problems)
        for problem in problems:
            log.error("State: instance %s: %s", API_KEY_ID, problem)
        return cls(api_key=key, master_id=mid, alias=alias), created
