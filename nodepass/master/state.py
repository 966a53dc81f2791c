"""The master's state document: what :class:`~nodepass.master.store.StateStore`
writes, built from the identity and the instance records, and read back
into them.

The format (``version`` 1) is shared with every earlier release, both ways::

    {"master_id": "...", "api_key": "...", "alias": "...",
     "instances": [{"id", "url", "alias", "restart", "meta", "counters", "mode"}, ...],
     "unreadable": [...],          # only when some entry could not be restored
     "version": 1}

Reading is forgiving (one bad entry must not cost the others, bad text is
repaired); writing is strict (a save that fails raises
:class:`~nodepass.master.errors.StateNotSaved` so the caller can undo its
change, and a state that was never read is never written over).
"""

from __future__ import annotations

from typing import Any, Iterable

import attrs

from nodepass.base.logs import NodeLog
from nodepass.master.errors import StateNotSaved
from nodepass.master.identity import API_KEY_ID, MasterIdentity
from nodepass.master.records import InstanceRecord
from nodepass.master.store import StateError, StateStore


@attrs.frozen
class Restored:
    """What :meth:`MasterState.load` found: ``created`` is true when the
    API key is new (first start, or the saved one was unusable)."""

    identity: MasterIdentity
    records: dict[str, InstanceRecord]
    created: bool


class MasterState:
    """Loads and saves the master's state through ``store``, logging on
    ``log``.  ``dirty`` says the live counters moved since the last save."""

    def __init__(self, store: StateStore, log: NodeLog) -> None:
        self.store = store
        self.log = log
        #: Entries of the file that could not be restored, written back as
        #: they were for a human to repair.
        self.unreadable: list[Any] = []
        self.loaded = False  # never write a state we did not manage to read
        self.dirty = False

    def load(self) -> Restored:
        """The saved state (a new identity and no instances on first start).
        Raises ``RuntimeError`` when neither the file nor its backup can be
        read: starting over would overwrite (and lose) them."""
        self.store.ensure_dir()
        try:
            state = self.store.load(self.log)
        except StateError as e:
            raise RuntimeError(f"cannot load state: {e}") from None
        identity, created = MasterIdentity.from_state(state, self.log)
        state = state or {}
        previous = state.get("unreadable")
        self.unreadable = list(previous) if isinstance(previous, list) else []
        self.loaded = True
        records: dict[str, InstanceRecord] = {}
        for item in state.get("instances", []):
            problems: list[str] = []
            try:
                rec = InstanceRecord.from_state(item, problems)
            except Exception as e:  # noqa: BLE001 - one bad item must not lose the rest
                self.log.error("State: skipping unreadable instance %r: %s", item.get("id") if isinstance(item, dict) else item, e)
                self.unreadable.append(item)  # kept in the file, for a human to repair
                continue
            for problem in problems:
                self.log.error("State: instance %s: %s", rec.id, problem)
            # The first of two entries with one ID wins; an entry claiming
            # the key's ID would shadow the key on the wire.
            if rec.id in records or rec.id == API_KEY_ID:
                continue
            records[rec.id] = rec
        return Restored(identity, records, created)

    def document(self, identity: MasterIdentity, records: Iterable[InstanceRecord]) -> dict[str, Any]:
        """The document to write (``StateStore.save`` adds ``version``)."""
        return {
            **identity.to_state(),
            "instances": [rec.to_state() for rec in records],
            **({"unreadable": self.unreadable} if self.unreadable else {}),
        }

    def save(self, identity: MasterIdentity, records: Iterable[InstanceRecord]) -> None:
        """Write the state durably; raises :class:`StateNotSaved` if the
        disk refuses."""
        if not self.loaded:
            return
        try:
            self.store.save(self.document(identity, records))
        except OSError as e:
            self.log.error("State save failed: %s", e)
            raise StateNotSaved(f"Failed to save state: {e.strerror or e}") from None
        self.dirty = False

    def save_quietly(self, identity: MasterIdentity, records: Iterable[InstanceRecord]) -> None:
        """Save when nobody waits for the answer (counters, shutdown); a
        failure is already logged."""
        try:
            self.save(identity, records)
        except StateNotSaved:
            pass

    def backup(self) -> None:
        """Copy the state file to its backup; a failure is logged."""
        try:
            self.store.backup()
        except (OSError, StateError) as e:
            self.log.error("State backup failed: %s", e)
