"""The master's domain (nodepass.master.domain) without HTTP: a ``Master``
under a plain ``MultiService``, its state in a temporary directory, real
tunnels on 127.0.0.1.  Operations either complete (on disk) or raise the
domain's errors and change nothing; the state file keeps its format byte
for byte."""

from __future__ import annotations

import json
import os

from twisted.application import service
from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.trial import unittest

from nodepass.base.kinds import Status
from nodepass.base.logs import NodeLog
from tests.master_helpers import in_process
from nodepass.config.urls import Tunables, parse_url
from nodepass.master.domain import Master
from nodepass.master.errors import (
    InstanceNotFound,
    InvalidRequest,
    InvalidURL,
    KeyInvalid,
    KeyMissing,
    StateNotSaved,
    URLConflict,
)
from nodepass.master.events import EventHub
from nodepass.master.identity import API_KEY_ID, MasterIdentity
from nodepass.master.state import MasterState
from nodepass.master.store import StateStore

# No CHECK_POINT, watchdog or counter save moves the state during a test.
QUIET = Tunables(report_interval=30.0, service_cooldown=0.1, shutdown_timeout=2.0, tcp_dial_timeout=1.0)
SINGLE = "client://127.0.0.1:0/127.0.0.1:9?mode=1"  # a single-end client: runs with no peer

#: A state file exactly as the previous version wrote it (made by it, from
#: a file holding one unreadable entry, which it keeps aside).
PREVIOUS_STATE = """{
 "master_id": "cdcdcdcdcdcdcdcd",
 "api_key": "abababababababababababababababab",
 "alias": "edge-1",
 "instances": [
  {
   "id": "0a0b0c0d",
   "url": "client://127.0.0.1:0/127.0.0.1:9?log=info&mode=1",
   "alias": "web",
   "restart": false,
   "meta": {
    "peer": {
     "sid": "s1",
     "type": "t",
     "alias": "peer"
    },
    "tags": {
     "env": "prod",
     "\\u00fcn\\u00ef": "c\\u00f8d\\u00e9"
    }
   },
   "counters": {
    "tcprx": 10,
    "tcptx": 20,
    "udprx": 30,
    "udptx": 40
   },
   "mode": 1
  },
  {
   "id": "1a1b1c1d",
   "url": "server://127.0.0.1:0/127.0.0.1:9?log=warn&tls=1",
   "alias": "",
   "restart": true,
   "meta": {
    "peer": {
     "sid": "",
     "type": "",
     "alias": ""
    },
    "tags": {}
   },
   "counters": {
    "tcprx": 0,
    "tcptx": 0,
    "udprx": 0,
    "udptx": 0
   },
   "mode": 0
  }
 ],
 "unreadable": [
  {
   "id": "0e0e0e0e",
   "url": "nonsense"
  }
 ],
 "version": 1
}
"""


def _d(coro_fn):
    def wrapper(self):
        return ensureDeferred(coro_fn(self))

    wrapper.__name__ = coro_fn.__name__
    wrapper.__doc__ = coro_fn.__doc__
    return wrapper


class RecordingHub(EventHub):
    """The SSE hub, noting what the domain publishes."""

    def __init__(self, log):
        super().__init__(log)
        self.events: list[tuple[str, dict]] = []
        self.shutdowns = 0

    def publish(self, kind, instance, logs=""):
        self.events.append((kind, instance))
        super().publish(kind, instance, logs)

    def shutdown(self):
        self.shutdowns += 1
        super().shutdown()

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.events]


def make_master(case, state_dir=None) -> tuple[Master, RecordingHub, list[str]]:
    """A loaded domain whose tunnels run under a started MultiService;
    stopped (tunnels, then the parent) at cleanup.  Also the master's log
    lines."""
    parent = service.MultiService()
    parent.startService()
    case.addCleanup(parent.stopService)
    log = NodeLog("info")
    lines: list[str] = []
    log.listeners.append(lambda level, line: lines.append(line))
    hub = RecordingHub(log)
    config = in_process(parse_url("master://127.0.0.1:0/api?log=info"))
    master = Master(config, state_dir or case.mktemp(), parent, QUIET, reactor, log, hub)
    master.load()
    case.addCleanup(lambda: ensureDeferred(master.stop()))
    return master, hub, lines


def saved(master: Master) -> dict:
    with open(master.store.path, encoding="utf-8") as f:
        return json.load(f)


def file_bytes(master: Master) -> bytes:
    with open(master.store.path, "rb") as f:
        return f.read()


class InstanceTests(unittest.TestCase):
    @_d
    async def test_create_completes_the_url_starts_and_saves(self):
        master, hub, lines = make_master(self)
        rec = await master.create(SINGLE, alias="a", restart=False, meta={"peer": {"sid": "s"}, "tags": {"k": "v"}})
        self.assertRegex(rec.id, r"^[0-9a-f]{8}$")
        self.assertEqual(rec.url, "client://127.0.0.1:0/127.0.0.1:9?log=info&mode=1")  # the master's log=, Go's order
        self.assertIs(rec.status, Status.RUNNING)
        self.assertIn(rec.id, master.supervisor.instances)
        self.assertIs(master.get(rec.id), rec)
        self.assertEqual((rec.alias, rec.restart, rec.meta["peer"]["sid"], rec.meta["tags"]), ("a", False, "s", {"k": "v"}))
        self.assertEqual(hub.kinds(), ["create", "update"])  # created stopped, then running
        self.assertEqual([i["id"] for i in saved(master)["instances"]], [rec.id])
        self.assertIn(f"  INFO  Instance created: {rec.id} {rec.url}", "\n".join(lines))
        listing = master.listing()
        self.assertEqual([i["id"] for i in listing], [API_KEY_ID, rec.id])
        self.assertEqual(json.loads(master.listing_bytes()), listing)

    @_d
    async def test_invalid_urls_raise_and_change_nothing(self):
        master, hub, _ = make_master(self)
        before = file_bytes(master)
        for url, message in (
            ("http://127.0.0.1:1/127.0.0.1:2", "Invalid URL scheme"),
            ("client://", "Invalid URL format"),
            ("nonsense", "Invalid URL format"),
            (SINGLE + "\n", "Invalid URL format"),
        ):
            with self.assertRaises(InvalidURL) as caught:
                await master.create(url)
            self.assertEqual(caught.exception.message, message, url)
        with self.assertRaises(InvalidRequest):
            await master.create("   ")
        self.assertEqual((master.records, hub.events), ({}, []))
        self.assertEqual(file_bytes(master), before)

    @_d
    async def test_unknown_ids_raise_instance_not_found(self):
        master, _, _ = make_master(self)
        await master.create(SINGLE)
        for rid in ("00000000", API_KEY_ID):  # the key is no instance of the domain
            with self.assertRaises(InstanceNotFound) as caught:
                master.get(rid)
            self.assertEqual(caught.exception.message, "Instance not found")
            with self.assertRaises(InstanceNotFound):
                await master.update(rid, alias="x")
            with self.assertRaises(InstanceNotFound):
                await master.replace_url(rid, SINGLE)
            with self.assertRaises(InstanceNotFound):
                await master.delete(rid)

    @_d
    async def test_update_fields_then_actions(self):
        master, hub, _ = make_master(self)
        rec = await master.create(SINGLE, meta={"peer": {"sid": "s"}, "tags": {"k": "v"}})
        hub.events.clear()
        # Absent fields stay; "tags": {} keeps the tags, peer fields merge.
        await master.update(rec.id, alias="b", restart=False, meta={"peer": {"alias": "p"}, "tags": {}})
        self.assertEqual((rec.alias, rec.restart), ("b", False))
        self.assertEqual(rec.meta, {"peer": {"sid": "s", "type": "", "alias": "p"}, "tags": {"k": "v"}})
        self.assertEqual(saved(master)["instances"][0]["alias"], "b")
        self.assertEqual(hub.kinds(), ["update"])
        await master.update(rec.id, alias="b")  # no change: no save, no event
        self.assertEqual(hub.kinds(), ["update"])

        await master.update(rec.id, action="stop")
        self.assertIs(rec.status, Status.STOPPED)
        self.assertNotIn(rec.id, master.supervisor.instances)
        await master.update(rec.id, action="start")
        self.assertIs(rec.status, Status.RUNNING)
        await master.update(rec.id, action="restart")
        self.assertIs(rec.status, Status.RUNNING)
        rec.stats.tcp_rx = rec.tcprx = 5
        await master.update(rec.id, action="reset")
        self.assertEqual((rec.tcprx, rec.stats.tcp_rx, saved(master)["instances"][0]["counters"]["tcprx"]), (0, 0, 0))
        with self.assertRaises(InvalidRequest) as caught:
            await master.update(rec.id, action="bogus")
        self.assertEqual(caught.exception.message, "Invalid action: bogus")

    @_d
    async def test_replace_url(self):
        master, _, lines = make_master(self)
        rec = await master.create(SINGLE)
        with self.assertRaises(URLConflict) as caught:
            await master.replace_url(rec.id, SINGLE)  # completed, it is the URL the instance has
        self.assertEqual(caught.exception.message, "Instance URL conflict")
        with self.assertRaises(InvalidURL):
            await master.replace_url(rec.id, "client://")
        new = "client://127.0.0.1:0/127.0.0.1:9?mode=1&log=warn"
        same = await master.replace_url(rec.id, new)
        self.assertIs(same, rec)
        self.assertEqual(rec.url, "client://127.0.0.1:0/127.0.0.1:9?log=warn&mode=1")
        self.assertEqual(rec.config.log, "warn")
        self.assertIs(rec.status, Status.RUNNING)
        self.assertEqual(saved(master)["instances"][0]["url"], rec.url)
        self.assertIn(f"  INFO  Instance updated: {rec.id} {rec.url}", "\n".join(lines))

    @_d
    async def test_delete(self):
        master, hub, _ = make_master(self)
        keep = await master.create(SINGLE)
        gone = await master.create(SINGLE)
        await master.delete(gone.id)
        self.assertEqual(list(master.records), [keep.id])
        self.assertNotIn(gone.id, master.supervisor.instances)
        self.assertEqual([i["id"] for i in saved(master)["instances"]], [keep.id])
        self.assertEqual(hub.events[-1], ("delete", gone.to_json()))
        self.assertEqual(hub.events[-1][1]["status"], "stopped")
        with self.assertRaises(InstanceNotFound):
            await master.delete(gone.id)


class IdentityTests(unittest.TestCase):
    @_d
    async def test_rotate_key(self):
        master, hub, lines = make_master(self)
        old = master.identity
        master.authenticate(old.api_key)
        master.authenticate(old.api_key.encode())
        new = master.rotate_key()
        self.assertIs(master.identity, new)
        self.assertRegex(new.api_key, r"^[0-9a-f]{32}$")
        self.assertNotEqual(new.api_key, old.api_key)
        self.assertEqual((new.master_id, new.alias), (old.master_id, old.alias))
        with self.assertRaises(KeyInvalid) as caught:
            master.authenticate(old.api_key)
        self.assertEqual(caught.exception.message, "Unauthorized: Invalid API key")
        for missing in (None, "", b""):
            with self.assertRaises(KeyMissing) as caught:
                master.authenticate(missing)
            self.assertEqual(caught.exception.message, "Unauthorized: API key required")
        master.authenticate(new.api_key)
        self.assertEqual(saved(master)["api_key"], new.api_key)
        self.assertEqual(hub.shutdowns, 1)  # every stream was opened with the old key
        self.assertEqual([line for line in lines if new.api_key in line], [])  # not logged
        self.assertIn("API Key reset: old key refused from now on", "\n".join(lines))

    @_d
    async def test_key_record_exists_on_the_wire_only(self):
        master, hub, _ = make_master(self)
        rec = await master.create(SINGLE)
        key = master.identity.to_json()
        self.assertEqual(list(key), list(rec.to_json()))  # the instance object's fields, in its order
        self.assertEqual(
            {k: key[k] for k in ("id", "type", "status", "url", "config", "restart", "mode", "ping", "tcprx")},
            {"id": API_KEY_ID, "type": "", "status": "", "url": master.identity.api_key,
             "config": master.identity.master_id, "restart": False, "mode": 0, "ping": 0, "tcprx": 0},
        )
        self.assertNotIn(API_KEY_ID, master.records)
        master.set_alias("edge-1")
        self.assertEqual(hub.events[-1], ("update", master.identity.to_json()))
        self.assertEqual((hub.events[-1][1]["id"], hub.events[-1][1]["alias"]), (API_KEY_ID, "edge-1"))
        self.assertEqual(master.info()["alias"], "edge-1")
        self.assertEqual(saved(master)["alias"], "edge-1")

    def test_identity_is_a_value(self):
        identity = MasterIdentity(api_key="ab" * 16, master_id="cd" * 8)
        renamed = identity.with_alias("x")
        self.assertEqual((identity.alias, renamed.alias), ("", "x"))
        rotated = identity.with_new_key()
        self.assertNotEqual(rotated.api_key, identity.api_key)
        self.assertEqual(rotated.master_id, identity.master_id)


class FailedSaveTests(unittest.TestCase):
    @_d
    async def test_a_failed_save_raises_and_undoes_the_change(self):
        master, hub, lines = make_master(self)
        rec = await master.create(SINGLE, alias="a")
        identity = master.identity
        before = file_bytes(master)
        events = len(hub.events)

        def full(state):
            raise OSError(28, "No space left on device")

        self.patch(master.store, "save", full)
        attempts = [
            master.create(SINGLE),
            master.update(rec.id, alias="b"),
            master.replace_url(rec.id, SINGLE + "&log=warn"),
            master.delete(rec.id),
        ]
        for attempt in attempts:
            with self.assertRaises(StateNotSaved) as caught:
                await attempt
            self.assertEqual(caught.exception.message, "Failed to save state: No space left on device")
        for change in (master.rotate_key, lambda: master.set_alias("x")):
            with self.assertRaises(StateNotSaved):
                change()
        self.assertEqual(list(master.records), [rec.id])
        self.assertIs(master.records[rec.id], rec)
        self.assertEqual((rec.alias, rec.url), ("a", "client://127.0.0.1:0/127.0.0.1:9?log=info&mode=1"))
        self.assertIs(master.identity, identity)
        master.authenticate(identity.api_key)
        self.assertEqual(hub.kinds()[events:].count("create"), 0)
        self.assertEqual(hub.shutdowns, 0)
        self.assertEqual(file_bytes(master), before)
        self.assertIn("  ERROR  State save failed: [Errno 28] No space left on device", "\n".join(lines))


class StateTests(unittest.TestCase):
    @_d
    async def test_round_trip_through_real_files(self):
        state_dir = self.mktemp()
        first, _, _ = make_master(self, state_dir)
        a = await first.create(SINGLE, alias="a", restart=False, meta={"peer": {"sid": "s"}, "tags": {"k": "v"}})
        b = await first.create(SINGLE)
        first.set_alias("edge")
        first.rotate_key()
        a.stats.tcp_rx, a.stats.udp_tx = 1234, 99  # live counters, saved at stop
        await first.stop()
        written = file_bytes(first)
        doc = json.loads(written)
        self.assertEqual(list(doc), ["master_id", "api_key", "alias", "instances", "version"])
        self.assertEqual(oct(os.stat(first.store.path).st_mode & 0o777), "0o600")  # it holds the key

        again, _, lines = make_master(self, state_dir)
        self.assertEqual(again.identity, first.identity)
        self.assertIn(f"  INFO  API Key loaded: {first.identity.api_key}", "\n".join(lines))
        self.assertEqual(list(again.records), [a.id, b.id])
        restored = again.records[a.id]
        self.assertEqual(
            (restored.url, restored.alias, restored.restart, restored.meta, restored.tcprx, restored.udptx),
            (a.url, "a", False, a.meta, 1234, 99),
        )
        self.assertIs(restored.status, Status.STOPPED)  # until start_instances
        again.start_instances()
        self.assertEqual((restored.status, again.records[b.id].status), (Status.STOPPED, Status.RUNNING))
        # Loading saved the state again: the same bytes.
        self.assertEqual(file_bytes(again), written)

    def test_previous_version_file_loads_and_is_written_back_identically(self):
        """An existing state file loads, and what is written for it is what
        the previous version wrote, byte for byte (so it loads there)."""
        state_dir = self.mktemp()
        os.makedirs(state_dir)
        path = os.path.join(state_dir, "nodepass.json")
        with open(path, "w", encoding="utf-8") as f:
            f.write(PREVIOUS_STATE)
        state = MasterState(StateStore(state_dir), NodeLog("none"))
        restored = state.load()
        self.assertEqual(restored.identity, MasterIdentity("ab" * 16, "cd" * 8, "edge-1"))
        self.assertFalse(restored.created)
        self.assertEqual(list(restored.records), ["0a0b0c0d", "1a1b1c1d"])
        web = restored.records["0a0b0c0d"]
        self.assertEqual((web.alias, web.restart, web.mode, web.tcprx, web.udptx), ("web", False, 1, 10, 40))
        self.assertEqual(web.meta["tags"], {"env": "prod", "ünï": "cødé"})
        self.assertEqual(state.unreadable, [{"id": "0e0e0e0e", "url": "nonsense"}])
        state.save(restored.identity, restored.records.values())
        with open(path, encoding="utf-8") as f:
            self.assertEqual(f.read(), PREVIOUS_STATE)

    def test_first_start_makes_an_identity(self):
        state = MasterState(StateStore(self.mktemp()), NodeLog("none"))
        restored = state.load()
        self.assertTrue(restored.created)
        self.assertRegex(restored.identity.api_key, r"^[0-9a-f]{32}$")
        self.assertRegex(restored.identity.master_id, r"^[0-9a-f]{16}$")
        self.assertEqual((restored.identity.alias, restored.records), ("", {}))

    def test_an_entry_claiming_the_key_id_is_not_an_instance(self):
        state_dir = self.mktemp()
        os.makedirs(state_dir)
        item = {"id": API_KEY_ID, "url": "client://127.0.0.1:0/127.0.0.1:9?mode=1"}
        with open(os.path.join(state_dir, "nodepass.json"), "w") as f:
            json.dump({"api_key": "ab" * 16, "master_id": "cd" * 8, "instances": [item]}, f)
        restored = MasterState(StateStore(state_dir), NodeLog("none")).load()
        self.assertEqual(restored.records, {})

    def test_nothing_is_written_over_a_state_never_read(self):
        state_dir = self.mktemp()
        state = MasterState(StateStore(state_dir), NodeLog("none"))
        state.save(MasterIdentity("ab" * 16, "cd" * 8), [])
        self.assertFalse(os.path.exists(os.path.join(state_dir, "nodepass.json")))
