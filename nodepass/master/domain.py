"""What a master does, with no HTTP in sight: its instances, its identity
and its state file.

:class:`Master` is the one object the API talks to.  Each operation either
completes (and is on disk before it returns) or raises a
:class:`~nodepass.master.errors.MasterError` and leaves things as they
were; :mod:`nodepass.master.api` turns those errors into statuses.

It holds the registry of instance records (in creation order, as ``GET
/instances`` lists them) and delegates the rest: running them to
:class:`~nodepass.master.lifecycle.Supervisor`, the state document to
:class:`~nodepass.master.state.MasterState`, probes to
:class:`~nodepass.master.probe.TCPing`, events to the SSE hub.  Changes to
one instance are serialised by a per-instance lock, so two requests racing
on it apply one after the other.
"""

from __future__ import annotations

import time
from typing import Any, Awaitable, Optional, TypeVar

from twisted.application import service
from twisted.internet.defer import DeferredLock, ensureDeferred

from nodepass import __version__
from nodepass.base.logs import NodeLog
from nodepass.base.stats import InstanceStats
from nodepass.config.urls import MasterConfig, Tunables
from nodepass.master import sysinfo
from nodepass.master.errors import InstanceNotFound, InvalidRequest, StateNotSaved, URLConflict
from nodepass.master.events import EventHub
from nodepass.master.identity import MasterIdentity
from nodepass.master.lifecycle import Supervisor, make_host
from nodepass.master.probe import TCPing
from nodepass.master.records import InstanceRecord, instance_url, new_instance_id
from nodepass.master.state import MasterState
from nodepass.master.store import StateStore

#: ``/info`` ``ver``: the newest Go NodePass release whose master API this
#: master implements, in Go's form (its release tag).  Dashboards show it
#: and may enable features by it; our own version is ``nodepass_py``.
GO_API_VERSION = "v1.12.0"
#: What ``action`` may ask of an instance.
ACTIONS = ("start", "stop", "restart", "reset")

T = TypeVar("T")


class Master:
    """The master's domain.  ``parent`` is the service its tunnels run
    under; ``hub`` carries the events dashboards follow."""

    def __init__(
        self,
        config: MasterConfig,
        state_dir: str,
        parent: service.MultiService,
        tunables: Tunables,
        reactor: Any,
        log: NodeLog,
        hub: EventHub,
    ) -> None:
        self.config = config
        self.reactor = reactor
        self.log = log
        self.hub = hub
        self.store = StateStore(state_dir)
        self.state = MasterState(self.store, log)
        #: A placeholder until :meth:`load` (no request is served before).
        self.identity = MasterIdentity(api_key="", master_id="")
        self.records: dict[str, InstanceRecord] = {}
        self.supervisor = Supervisor(
            parent,
            self.records,
            hub,
            tunables,
            reactor,
            log,
            on_report=self._counters_moved,
            host=make_host(config.workers, parent, tunables, reactor, log),
        )
        self.prober = TCPing(reactor, tunables.tcp_dial_timeout)
        #: The TLS code the API is served with, for ``/info``: the service
        #: sets it once listening (a ``tls=2`` master whose files do not
        #: load serves ``tls=1``).
        self.tls_code = 0
        self.started_at = 0.0
        self._locks: dict[str, DeferredLock] = {}

    # ------------------------------------------------------------------ start and stop

    def load(self) -> None:
        """Read the state (and write it back, repaired) before serving.
        Raises ``RuntimeError`` when it cannot be read."""
        self.started_at = time.time()
        restored = self.state.load()
        self.identity = restored.identity
        self.records.clear()
        self.records.update(restored.records)
        self._save()
        self.log.info("API Key %s: %s", "created" if restored.created else "loaded", self.identity.api_key)

    def start_instances(self) -> None:
        """Start every instance whose policy says so (``restart``)."""
        self.supervisor.host.open()
        for rec in list(self.records.values()):
            if rec.restart:
                self.supervisor.start(rec)

    async def stop(self) -> None:
        """Stop every instance and save the counters they reached."""
        await self.supervisor.stop_all()
        self._save_quietly()

    def reload(self) -> None:
        """The periodic reload: back the state file up, and restart the
        instances in ``error``."""
        self.state.backup()
        for rec in self.supervisor.failed():
            self.log.info("Restarting instance %s after error", rec.id)
            ensureDeferred(self._locked(rec.id, self.supervisor.restart(rec))).addErrback(
                lambda f: self.log.error("Restart failed: %s", f.getErrorMessage())
            )

    def save_counters(self) -> None:
        """Counters move without API calls; save them now and then (the
        state file takes the live values)."""
        if self.state.dirty:
            self._save_quietly()

    def _counters_moved(self) -> None:
        self.state.dirty = True

    # ------------------------------------------------------------------ reading

    def authenticate(self, given: bytes | str | None) -> None:
        """Raises :class:`~nodepass.master.errors.Unauthorized` unless
        ``given`` is the API key."""
        self.identity.check(given)

    def get(self, rid: str) -> InstanceRecord:
        rec = self.records.get(rid)
        if rec is None:
            raise InstanceNotFound()
        return rec

    def listing(self) -> list[dict[str, Any]]:
        """Every instance as dashboards see them: the key's ``********``
        record first, then the instances in creation order."""
        return [self.identity.to_json()] + [rec.to_json() for rec in self.records.values()]

    def listing_bytes(self) -> bytes:
        """:meth:`listing` encoded, from each record's cached encoding."""
        parts = [self.identity.json_bytes()] + [rec.json_bytes() for rec in self.records.values()]
        return b"[" + b",".join(parts) + b"]"

    def info(self) -> dict[str, Any]:
        cfg = self.config
        out: dict[str, Any] = {"mid": self.identity.master_id, "alias": self.identity.alias}
        out.update(sysinfo.host_info())
        out.update(
            {
                "ver": GO_API_VERSION,
                "nodepass_py": __version__,
                "name": cfg.api.host,
                "uptime": int(time.time() - self.started_at) if self.started_at else 0,
                "log": cfg.log,
                "tls": str(self.tls_code),
                "crt": cfg.crt,
                "key": cfg.key,
            }
        )
        return out

    async def tcping(self, target: str) -> dict[str, Any]:
        """One timed connect to ``target`` (``host:port``)."""
        return await self.prober(target)

    # ------------------------------------------------------------------ changing

    async def create(
        self,
        url: str,
        alias: Optional[str] = None,
        restart: Optional[bool] = None,
        meta: Optional[dict] = None,
    ) -> InstanceRecord:
        """Add an instance for ``url`` (completed as Go's master completes
        it) and start it."""
        full, config = instance_url(url, self.config)
        rid = new_instance_id(self.records)
        rec = InstanceRecord(id=rid, url=full, config=config, stats=InstanceStats(config.slot))
        _apply_fields(rec, alias, restart, meta)
        self.records[rid] = rec
        try:
            self._save()
        except StateNotSaved:
            del self.records[rid]
            raise
        self.log.info("Instance created: %s %s", rid, full)
        self.hub.publish("create", rec.to_json())
        self.supervisor.start(rec)
        return rec

    async def update(
        self,
        rid: str,
        alias: Optional[str] = None,
        restart: Optional[bool] = None,
        meta: Optional[dict] = None,
        action: Optional[str] = None,
    ) -> InstanceRecord:
        """Set the fields given (absent ones stay), then do ``action``."""
        rec = self.get(rid)
        async with self._lock(rid):
            self._still_there(rec)
            old = (rec.alias, rec.restart, _copy_meta(rec.meta))
            _apply_fields(rec, alias, restart, meta)
            if (rec.alias, rec.restart, rec.meta) != old:
                try:
                    self._save()
                except StateNotSaved:
                    rec.alias, rec.restart, rec.meta = old
                    raise
                self.supervisor.publish("update", rec)
            if action is not None:
                await self._act(rec, action)
        return rec

    async def _act(self, rec: InstanceRecord, action: str) -> None:
        if action == "start":
            self.supervisor.start(rec)
        elif action == "stop":
            await self.supervisor.stop(rec)
            self._save()
        elif action == "restart":
            await self.supervisor.stop(rec, publish=False)
            self._save()
            self.supervisor.start(rec)
        elif action == "reset":
            self.supervisor.reset_counters(rec)
            self._save()
            self.supervisor.publish("update", rec)
        else:  # validated by the caller; kept for safety
            raise InvalidRequest(f"Invalid action: {action}")

    async def replace_url(self, rid: str, url: str) -> InstanceRecord:
        """Run the instance with a new URL: same ID, fields and counters."""
        rec = self.get(rid)
        full, config = instance_url(url, self.config)
        async with self._lock(rid):
            self._still_there(rec)
            if full == rec.url:
                raise URLConflict()
            await self.supervisor.stop(rec, publish=False)
            old = (rec.url, rec.config)
            rec.url, rec.config = full, config
            rec.stats.slot_limit = config.slot
            try:
                self._save()
            except StateNotSaved:
                rec.url, rec.config = old
                raise
            self.log.info("Instance updated: %s %s", rid, full)
            self.supervisor.start(rec)
        return rec

    async def delete(self, rid: str) -> None:
        """Stop the instance and forget it."""
        rec = self.get(rid)
        async with self._lock(rid):
            self._still_there(rec)
            await self.supervisor.stop(rec, publish=False)
            del self.records[rid]
            try:
                self._save()
            except StateNotSaved:
                self.records[rid] = rec
                raise
            self._locks.pop(rid, None)
            self.log.info("Instance deleted: %s", rid)
            self.hub.publish("delete", rec.to_json())

    def rotate_key(self) -> MasterIdentity:
        """A new API key; the old one is refused from now on and every SSE
        stream (opened with it) is closed."""
        old = self.identity
        self.identity = old.with_new_key()
        try:
            self._save()
        except StateNotSaved:
            self.identity = old
            raise
        # The new key is in the answer to whoever asked for it; it is not
        # logged (only the start-up line names the key, as SPEC §8 asks).
        self.log.info("API Key reset: old key refused from now on")
        self.hub.shutdown()
        return self.identity

    def set_alias(self, alias: str) -> None:
        """The master's alias (shown by ``/info`` and on ``********``)."""
        old = self.identity
        self.identity = old.with_alias(alias)
        try:
            self._save()
        except StateNotSaved:
            self.identity = old
            raise
        self.hub.publish("update", self.identity.to_json())

    # ------------------------------------------------------------------ helpers

    def _save(self) -> None:
        """Write the state; raises :class:`StateNotSaved` if the disk refuses."""
        self.state.save(self.identity, self.records.values())

    def _save_quietly(self) -> None:
        self.state.save_quietly(self.identity, self.records.values())

    def _lock(self, rid: str) -> DeferredLock:
        lock = self._locks.get(rid)
        if lock is None:
            lock = self._locks[rid] = DeferredLock()
        return lock

    async def _locked(self, rid: str, work: Awaitable[T]) -> T:
        async with self._lock(rid):
            return await work

    def _still_there(self, rec: InstanceRecord) -> None:
        """After waiting for the lock: the instance may have been deleted
        (or deleted and its ID reused) meanwhile."""
        if self.records.get(rec.id) is not rec:
            raise InstanceNotFound()


def _apply_fields(rec: InstanceRecord, alias: Optional[str], restart: Optional[bool], meta: Optional[dict]) -> None:
    """The fields a create or PATCH body may set; absent ones stay."""
    if alias is not None:
        rec.alias = alias
    if restart is not None:
        rec.restart = restart
    if meta is not None:
        apply_meta(rec, meta)


def _copy_meta(meta: dict) -> dict:
    return {"peer": dict(meta.get("peer") or {}), "tags": dict(meta.get("tags") or {})}


def apply_meta(rec: InstanceRecord, meta: dict) -> None:
    """``peer`` fields present replace theirs (``{}`` keeps all); a
    non-empty ``tags`` replaces the whole tag map, ``{}`` keeps it (the Go
    master's documented behaviour: dashboards send ``"tags": {}`` when they
    only mean to change the peer); an explicit ``"tags": null`` (beyond Go)
    empties it.  ``meta`` is already validated."""
    new = _copy_meta(rec.meta)
    peer = meta.get("peer")
    if peer:
        new["peer"].update(peer)
    if meta.get("tags"):
        new["tags"] = dict(meta["tags"])
    elif meta.get("clear_tags"):
        new["tags"] = {}
    rec.meta = new
