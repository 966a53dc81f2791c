"""The master (``master://``): a REST API, SSE and durable state in front of
many tunnel instances, all in one reactor.

Tree::

    MasterService (MultiService)
      ├── the HTTP(S) listener (owned directly: its bound port is needed)
      └── TunnelService per running instance (added on start, removed on stop)

Every operation the API offers is a method here; ``nodepass.master.app`` only
decodes requests and encodes answers.  Each method that changes anything
writes the state file before returning, so the API answers 2xx only once the
change is durable.
"""

from __future__ import annotations

import re
import secrets
import time
from functools import partial
from typing import Optional

from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.defer import Deferred, DeferredLock, ensureDeferred
from twisted.internet.interfaces import IOpenSSLContextFactory
from zope.interface import implementer

from nodepass import __version__
from nodepass.config.urls import MasterConfig, Tunables
from nodepass.service.instance import TunnelService
from nodepass.base.logs import NodeLog
from nodepass.master import sysinfo
from nodepass.master.events import EventHub
from nodepass.master.records import (
    API_KEY_ID,
    InstanceRecord,
    RequestError,
    instance_url,
    new_instance_id,
    repaired_text,
)
from nodepass.master.store import StateError, StateStore
from nodepass.base.stats import Checkpoint, InstanceStats

TCPING_LIMIT = 10
TCPING_QUEUE_WAIT = 1.0
_API_KEY = re.compile(r"[0-9a-f]{32}")
_MASTER_ID = re.compile(r"[0-9a-f]{16}")

#: ``/info`` ``ver``: the newest Go NodePass release whose master API this
#: master implements, in Go's form (its release tag).  Dashboards show it
#: and may enable features by it; our own version is ``nodepass_py``.
GO_API_VERSION = "v1.12.0"
#: Substrings of an instance's log line that put it in ``error`` (Go's master
#: parses its children's output for them).
ERROR_MARKERS = ("Server error:", "Client error:")


@implementer(IOpenSSLContextFactory)
class _ReloadingContext:
    """Old-style context factory asking the credentials for each new
    connection, so a ``tls=2`` certificate renewed on disk is picked up."""

    def __init__(self, credentials):
        self.credentials = credentials

    def getContext(self):
        return self.credentials.context_factory().getContext()


class MasterService(service.MultiService):
    """See the module docstring.  ``ready`` fires (with the service) once the
    API listens; ``port``, ``api_key`` and ``base_url`` are valid from then."""

    def __init__(
        self,
        config: MasterConfig,
        state_dir: str,
        tunables: Optional[Tunables] = None,
        reactor=None,
        log: Optional[NodeLog] = None,
    ):
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.config = config
        self.tunables = tunables or Tunables.from_environ()
        self.reactor = reactor
        self.log = log or NodeLog(config.log)
        self.store = StateStore(state_dir)
        self.hub = EventHub(self.log)
        self.records: dict[str, InstanceRecord] = {}
        self.instances: dict[str, TunnelService] = {}
        self.api_key = ""
        self.master_id = ""
        self.port: Optional[int] = None
        self.base_url = ""
        self.scheme = "http"
        self.tls_code = 0
        self.credentials = None
        self.listening = None
        self.site = None
        self.started_at = 0.0
        self.ready: Deferred = Deferred()
        self.stopped: Deferred = Deferred()
        self.counter_save_interval = max(self.tunables.report_interval * 12, 0.5)
        self._locks: dict[str, DeferredLock] = {}
        self._watchdogs: dict[str, task.LoopingCall] = {}
        self._loops: list[task.LoopingCall] = []
        self._counters_dirty = False
        self._loaded = False  # never write a state we did not manage to read
        self._tcping_sem = defer.DeferredSemaphore(TCPING_LIMIT)
        self.tcping_queue_wait = TCPING_QUEUE_WAIT

    # ------------------------------------------------------------------ lifecycle

    def startService(self) -> None:
        service.Service.startService(self)  # children are started by _start
        if self.ready.called:
            self.ready = Deferred()
        d = ensureDeferred(self._start())

        def ok(_):
            self.ready.callback(self)

        def failed(f):
            self.log.error("Master error: %s", f.getErrorMessage())
            self.ready.errback(f)

        d.addCallbacks(ok, failed)

    async def _start(self) -> None:
        self.started_at = time.time()
        sysinfo.prime_cpu()
        self._load_state()
        await self._listen()
        from nodepass.net.tls import UNENCRYPTED_LINE

        level, line = self.credentials.code_line() if self.credentials is not None else UNENCRYPTED_LINE
        getattr(self.log, level)(line)
        self.log.info(
            "Master started: master://%s%s?log=%s&tls=%d",
            _hostport(self.config.api.host or "", self.port),
            self.config.prefix,
            self.config.log,
            self.tls_code,
        )
        for rec in list(self.records.values()):
            if not rec.is_key and rec.restart:
                self._start_instance(rec)
        self._loops = []
        for interval, fn in (
            (self.tunables.reload_interval, self._reload_tick),
            (self.counter_save_interval, self._counter_tick),
        ):
            if interval > 0:
                loop = task.LoopingCall(fn)
                loop.clock = self.reactor
                loop.start(interval, now=False).addErrback(
                    lambda f: self.log.error("Master periodic task failed: %s", f.getErrorMessage())
                )
                self._loops.append(loop)

    def _load_state(self) -> None:
        self.store.ensure_dir()
        try:
            state = self.store.load(self.log)
        except StateError as e:
            # Neither file loads: refuse to start over a state we would
            # overwrite (and lose) rather than silently forgetting instances.
            raise RuntimeError(f"cannot load state: {e}") from None
        created = state is None
        state = state or {}
        key = state.get("api_key")
        mid = state.get("master_id")
        # Anything but hex would break the key check (and every request).
        if not (isinstance(key, str) and _API_KEY.fullmatch(key)):
            if not created:
                self.log.error("State: API key unusable (not 32 lowercase hex digits), making a new one")
            key, created = secrets.token_hex(16), True
        if not (isinstance(mid, str) and _MASTER_ID.fullmatch(mid)):
            if not created:
                self.log.error("State: master ID unusable (not 16 lowercase hex digits), making a new one")
            mid = secrets.token_hex(8)
        self.api_key, self.master_id = key, mid
        problems: list[str] = []
        alias = repaired_text(state.get("alias", ""), "alias", problems)
        for problem in problems:
            self.log.error("State: instance %s: %s", API_KEY_ID, problem)
        # Go creates this record with its ID and URL only: status "" and
        # restart false, as dashboards know it.
        key_rec = InstanceRecord(id=API_KEY_ID, url=key, config=None, alias=alias, restart=False, status="")
        key_rec.master_id = mid
        self.records = {API_KEY_ID: key_rec}
        previous = state.get("unreadable")
        self._unreadable: list = list(previous) if isinstance(previous, list) else []
        self._loaded = True
        for item in state.get("instances", []):
            problems = []
            try:
                rec = InstanceRecord.from_state(item, problems)
            except Exception as e:  # noqa: BLE001 - one bad item must not lose the rest
                self.log.error("State: skipping unreadable instance %r: %s", item.get("id") if isinstance(item, dict) else item, e)
                self._unreadable.append(item)  # kept in the file, for a human to repair
                continue
            for problem in problems:
                self.log.error("State: instance %s: %s", rec.id, problem)
            if rec.id in self.records:
                continue
            self.records[rec.id] = rec
        self._save()
        self.log.info("API Key %s: %s", "created" if created else "loaded", self.api_key)

    async def _listen(self) -> None:
        from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint

        from nodepass.master.app import MasterSite, make_resource

        cfg = self.config
        site = MasterSite(make_resource(self), self)
        factory = site
        if cfg.tls:
            from twisted.protocols.tls import TLSMemoryBIOFactory

            from nodepass.net.tls import ServerCredentials

            self.credentials = ServerCredentials.from_config(
                cfg.tls,
                cfg.crt,
                cfg.key,
                self.log,
                self.tunables.reload_interval,
                self.reactor,
                common_name=cfg.api.host or "localhost",
            )
            self.tls_code = self.credentials.tls_code
            factory = TLSMemoryBIOFactory(_ReloadingContext(self.credentials), False, site)
            self.scheme = "https"
        host = cfg.api.host
        if ":" in host:
            endpoint = TCP6ServerEndpoint(self.reactor, cfg.api.port, interface=host)
        else:
            endpoint = TCP4ServerEndpoint(self.reactor, cfg.api.port, interface=host)
        self.site = site
        self.listening = await endpoint.listen(factory)
        self.port = self.listening.getHost().port
        shown = host if host and host not in ("0.0.0.0", "::") else "127.0.0.1"
        self.base_url = f"{self.scheme}://{_hostport(shown, self.port)}{cfg.prefix}"

    def stopService(self) -> Deferred:
        service.Service.stopService(self)
        d = ensureDeferred(self._stop())

        def done(result):
            if not self.stopped.called:
                self.stopped.callback(None)
            return result

        return d.addBoth(done)

    async def _stop(self) -> None:
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        self.hub.shutdown()
        if self.listening is not None:
            listening, self.listening = self.listening, None
            await listening.stopListening()
        if self.site is not None:
            await self.site.close_connections(self.reactor)
        running = [rec for rec in self.records.values() if rec.id in self.instances]
        await defer.gatherResults([ensureDeferred(self._stop_instance(rec, publish=False)) for rec in running])
        self._save_quietly()

    # ------------------------------------------------------------------ state

    def state(self) -> dict:
        key_rec = self.records.get(API_KEY_ID)
        return {
            "master_id": self.master_id,
            "api_key": self.api_key,
            "alias": key_rec.alias if key_rec else "",
            "instances": [rec.to_state() for rec in self.records.values() if not rec.is_key],
            **({"unreadable": self._unreadable} if getattr(self, "_unreadable", None) else {}),
        }

    def _save(self) -> None:
        """Write the state; raises ``RequestError(500)`` if the disk refuses."""
        if not self._loaded:
            return
        try:
            self.store.save(self.state())
        except OSError as e:
            self.log.error("State save failed: %s", e)
            raise RequestError(500, f"Failed to save state: {e.strerror or e}") from None
        self._counters_dirty = False

    def _save_quietly(self) -> None:
        try:
            self._save()
        except RequestError:
            pass

    def _reload_tick(self) -> None:
        try:
            self.store.backup()
        except (OSError, StateError) as e:
            self.log.error("State backup failed: %s", e)
        for rec in list(self.records.values()):
            if rec.status == "error" and rec.id in self.instances:
                self.log.info("Restarting instance %s after error", rec.id)
                ensureDeferred(self._locked(rec.id, self._restart_instance(rec))).addErrback(
                    lambda f: self.log.error("Restart failed: %s", f.getErrorMessage())
                )

    def _counter_tick(self) -> None:
        """Counters move without API calls; save them now and then (the
        state file takes the live values)."""
        if self._counters_dirty:
            self._save_quietly()

    # ------------------------------------------------------------------ instances

    def _lock(self, rid: str) -> DeferredLock:
        lock = self._locks.get(rid)
        if lock is None:
            lock = self._locks[rid] = DeferredLock()
        return lock

    async def _locked(self, rid: str, coro):
        async with self._lock(rid):
            return await coro

    def _publish(self, kind: str, rec: InstanceRecord) -> None:
        self.hub.publish(kind, rec.to_json())

    def _start_instance(self, rec: InstanceRecord) -> None:
        if rec.id in self.instances or rec.config is None:
            return
        log = NodeLog(rec.config.log, instance_id=rec.id)
        svc = TunnelService(rec.config, tunables=self.tunables, reactor=self.reactor, log=log, stats=rec.stats)
        log.listeners.append(partial(self._on_log, rec, svc))
        svc.checkpoint_listeners.append(partial(self._on_checkpoint, rec, svc))
        svc.status_listeners.append(partial(self._on_status, rec, svc))
        self.instances[rec.id] = svc
        rec.status = "running"
        # Silence counts from this run's first report only: a server waiting
        # for its first client stays running (see _watch).
        rec.last_report = None
        self._arm_watchdog(rec)
        svc.setServiceParent(self)
        self._publish("update", rec)

    async def _stop_instance(self, rec: InstanceRecord, publish: bool = True) -> None:
        svc = self.instances.pop(rec.id, None)
        self._disarm_watchdog(rec)
        if svc is not None:
            if svc.parent is self:
                if self.running:
                    d = svc.disownServiceParent()
                else:
                    d = svc.stopService() if svc.running else None
                    svc.disownServiceParent()
                if d is not None:
                    await d
            elif svc.running:
                await svc.stopService()
        rec.sync_counters()
        rec.status = "stopped"
        rec.clear_figures()  # as Go: ping, pool, tcps, udps 0; byte counters kept
        if publish:
            self._publish("update", rec)

    async def _restart_instance(self, rec: InstanceRecord) -> None:
        await self._stop_instance(rec, publish=False)
        if rec.id in self.records:
            self._start_instance(rec)

    def _is_current(self, rec: InstanceRecord, svc: TunnelService) -> bool:
        return self.instances.get(rec.id) is svc and self.records.get(rec.id) is rec

    def _on_log(self, rec: InstanceRecord, svc: TunnelService, level: str, line: str) -> None:
        if level == "EVENT" and "CHECK_POINT|" in line:
            return  # becomes an update event instead
        if any(marker in line for marker in ERROR_MARKERS) and self._is_current(rec, svc):
            # As Go's master does with its children's output: the line's own
            # log event carries the new status, and no update is sent.
            self._mark_error(rec)
        if self.hub.streams:
            self.hub.publish("log", rec.to_json(), line)

    def _mark_error(self, rec: InstanceRecord) -> bool:
        """``error`` with the live figures zeroed (Go: ping, pool, tcps,
        udps); False if it already was."""
        if rec.status == "error":
            return False
        rec.status = "error"
        rec.clear_figures()
        return True

    def _on_checkpoint(self, rec: InstanceRecord, svc: TunnelService, cp: Checkpoint) -> None:
        if not self._is_current(rec, svc):
            return
        rec.apply_checkpoint(cp)
        rec.status = "running"
        rec.last_report = self.reactor.seconds()
        self._counters_dirty = True
        self._publish("update", rec)

    def _on_status(self, rec: InstanceRecord, svc: TunnelService, status: str, message: str) -> None:
        """The tunnel's own lifecycle.  Only ``error`` matters here: it comes
        right after the ``Server error:``/``Client error:`` line, which has
        normally set the status already (the update is for an instance whose
        ``log=`` hides that line).  As in Go, an instance leaves ``error``
        at its next CHECK_POINT, not when it has merely restarted."""
        if status != "error" or not self._is_current(rec, svc):
            return
        if self._mark_error(rec):
            self._publish("update", rec)

    def _arm_watchdog(self, rec: InstanceRecord) -> None:
        """Go's monitor: every report interval, an instance that has reported
        but not for 3 intervals is ``error`` (figures kept), and an update
        says so at every such tick."""
        self._disarm_watchdog(rec)
        interval = self.tunables.report_interval
        if interval > 0:
            loop = self._watchdogs[rec.id] = task.LoopingCall(self._watch, rec)
            loop.clock = self.reactor
            loop.start(interval, now=False)

    def _disarm_watchdog(self, rec: InstanceRecord) -> None:
        loop = self._watchdogs.pop(rec.id, None)
        if loop is not None and loop.running:
            loop.stop()

    def _watch(self, rec: InstanceRecord) -> None:
        if rec.id not in self.instances or rec.last_report is None:
            return
        limit = 3 * self.tunables.report_interval
        if self.reactor.seconds() - rec.last_report <= limit:
            return
        if rec.status != "error":
            rec.status = "error"
            self.log.warn("Instance %s sent no CHECK_POINT for %ss", rec.id, limit)
        self._publish("update", rec)

    # ------------------------------------------------------------------ API operations

    def check_key(self, given) -> None:
        """Constant-time check of an ``X-API-Key`` value (bytes or str)."""
        if isinstance(given, str):
            given = given.encode("utf-8", "replace")
        if not given:
            raise RequestError(401, "Unauthorized: API key required")
        if not secrets.compare_digest(given, self.api_key.encode("ascii")):
            raise RequestError(401, "Unauthorized: Invalid API key")

    def get(self, rid: str) -> InstanceRecord:
        rec = self.records.get(rid)
        if rec is None:
            raise RequestError(404, "Instance not found")
        return rec

    def list_json_bytes(self) -> bytes:
        """``GET /instances``'s body, from each record's cached encoding."""
        return b"[" + b",".join(rec.json_bytes() for rec in self.records.values()) + b"]"

    def list_json(self) -> list[dict]:
        return [rec.to_json() for rec in self.records.values()]

    async def create(self, url: str, alias: Optional[str], restart: Optional[bool], meta: Optional[dict]) -> InstanceRecord:
        full, config = instance_url(url, self.config)
        rid = new_instance_id(self.records)
        rec = InstanceRecord(id=rid, url=full, config=config, stats=InstanceStats(config.slot))
        _apply_fields(rec, alias, restart, meta)
        self.records[rid] = rec
        try:
            self._save()
        except RequestError:
            del self.records[rid]
            raise
        self.log.info("Instance created: %s %s", rid, full)
        self.hub.publish("create", rec.to_json())
        self._start_instance(rec)
        return rec

    async def patch(self, rid: str, alias, action, restart, meta) -> InstanceRecord:
        rec = self.get(rid)
        if rec.is_key:
            if action == "restart":
                await self.rotate_key()
            return self.records[API_KEY_ID]
        async with self._lock(rid):
            if self.records.get(rid) is not rec:
                raise RequestError(404, "Instance not found")
            old = (rec.alias, rec.restart, _copy_meta(rec.meta))
            _apply_fields(rec, alias, restart, meta)
            if (rec.alias, rec.restart, rec.meta) != old:
                try:
                    self._save()
                except RequestError:
                    rec.alias, rec.restart, rec.meta = old
                    raise
                self._publish("update", rec)
            if action is not None:
                await self._act(rec, action)
        return rec

    async def _act(self, rec: InstanceRecord, action: str) -> None:
        if action == "start":
            self._start_instance(rec)
        elif action == "stop":
            await self._stop_instance(rec)
            self._save()
        elif action == "restart":
            await self._stop_instance(rec, publish=False)
            self._save()
            self._start_instance(rec)
        elif action == "reset":
            rec.reset_counters()
            self._save()
            self._publish("update", rec)
        else:  # validated before; kept for safety
            raise RequestError(400, f"Invalid action: {action}")

    async def put(self, rid: str, url: Optional[str], action: Optional[str]) -> InstanceRecord:
        rec = self.get(rid)
        if rec.is_key:
            raise RequestError(403, "Forbidden: API Key")
        if url is None:
            return await self.patch(rid, None, action, None, None)
        full, config = instance_url(url, self.config)
        async with self._lock(rid):
            if self.records.get(rid) is not rec:
                raise RequestError(404, "Instance not found")
            if full == rec.url:
                raise RequestError(409, "Instance URL conflict")
            await self._stop_instance(rec, publish=False)
            old = (rec.url, rec.config)
            rec.url, rec.config = full, config
            rec.stats.slot_limit = config.slot
            try:
                self._save()
            except RequestError:
                rec.url, rec.config = old
                raise
            self.log.info("Instance updated: %s %s", rid, full)
            self._start_instance(rec)
        return rec

    async def delete(self, rid: str) -> None:
        rec = self.get(rid)
        if rec.is_key:
            raise RequestError(403, "Forbidden: API Key")
        async with self._lock(rid):
            if self.records.get(rid) is not rec:
                raise RequestError(404, "Instance not found")
            await self._stop_instance(rec, publish=False)
            del self.records[rid]
            try:
                self._save()
            except RequestError:
                self.records[rid] = rec
                raise
            self._locks.pop(rid, None)
            self.log.info("Instance deleted: %s", rid)
            self.hub.publish("delete", rec.to_json())

    async def rotate_key(self) -> None:
        key_rec = self.records[API_KEY_ID]
        old = self.api_key
        self.api_key = key_rec.url = secrets.token_hex(16)
        try:
            self._save()
        except RequestError:
            self.api_key = key_rec.url = old
            raise
        # The new key is in the answer to whoever asked for it; it is not
        # logged (only the start-up line names the key, as SPEC §8 asks).
        self.log.info("API Key reset: old key refused from now on")
        self.hub.shutdown()

    def set_alias(self, alias: str) -> None:
        key_rec = self.records[API_KEY_ID]
        old, key_rec.alias = key_rec.alias, alias
        try:
            self._save()
        except RequestError:
            key_rec.alias = old
            raise
        self._publish("update", key_rec)

    def info(self) -> dict:
        cfg = self.config
        out = {"mid": self.master_id, "alias": self.records[API_KEY_ID].alias}
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

    async def tcping(self, target: str) -> dict:
        from nodepass.master.probe import probe

        result = {"target": target, "connected": False, "latency": 0, "error": None}
        acquired = self._tcping_sem.acquire()
        if not acquired.called:
            timer = self.reactor.callLater(self.tcping_queue_wait, acquired.cancel)
            try:
                await acquired
            except defer.CancelledError:
                result["error"] = "too many requests"
                return result
            if timer.active():
                timer.cancel()
        try:
            return await probe(self.reactor, target, self.tunables.tcp_dial_timeout, result)
        finally:
            self._tcping_sem.release()


def _hostport(host: str, port) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
    only mean to change the peer).  ``meta`` is already validated."""
    new = _copy_meta(rec.meta)
    peer = meta.get("peer")
    if peer:
        new["peer"].update(peer)
    if meta.get("tags"):
        new["tags"] = dict(meta["tags"])
    rec.meta = new
