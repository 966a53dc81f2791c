"""Durable master state: restart on the same state directory, SIGKILL in the
middle of API writes, a damaged main file falling back to the backup."""

from __future__ import annotations

import json
import os
import signal
import stat

import treq
from twisted.internet import defer, protocol, reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool

from nodepass.config.urls import Tunables, parse_url
from nodepass.base.logs import NodeLog
from nodepass.master.identity import API_KEY_ID
from nodepass.master.service import MasterService
from nodepass.master.store import StateStore

from tests.master_helpers import in_process, FAST, Api, start_master, wait_for
from tests.helpers import free_port
from tests.procs import child_env, spawn


class Echo(protocol.Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


class OneShot(protocol.Protocol):
    """Sends a payload, collects the echo, closes."""

    def __init__(self, payload: bytes):
        self.payload = payload
        self.got = b""
        self.done = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.payload)

    def dataReceived(self, data):
        self.got += data
        if len(self.got) >= len(self.payload):
            self.transport.loseConnection()

    def connectionLost(self, reason):
        self.done.callback(self.got)


async def echo_server(case) -> int:
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(protocol.Factory.forProtocol(Echo))
    case.addCleanup(port.stopListening)
    return port.getHost().port


async def send_through(port: int, payload: bytes) -> bytes:
    proto = OneShot(payload)
    await TCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(protocol.Factory.forProtocol(lambda: proto))
    return await proto.done


class RestartTests(unittest.TestCase):
    def test_state_survives_master_restart(self):
        async def go():
            state_dir = self.mktemp()
            master = await start_master(self, state_dir=state_dir)
            api = Api(master, self)
            target = await echo_server(self)
            entry = free_port()
            code, a, _ = await api.call(
                "POST", "/instances",
                {"url": f"client://127.0.0.1:{entry}/127.0.0.1:{target}?mode=1", "alias": "alpha"},
            )
            self.assertEqual(code, 201)
            code, b, _ = await api.call("POST", "/instances", {"url": "client://127.0.0.1:0/127.0.0.1:9?mode=1"})
            await api.call("PATCH", "/instances/" + b["id"], {"restart": False, "action": "stop"})
            await api.call(
                "PATCH", "/instances/" + a["id"],
                {"meta": {"peer": {"sid": "peer-1", "type": "0", "alias": "p"}, "tags": {"env": "test"}}},
            )
            await api.call("POST", "/info", {"alias": "master-one"})
            await wait_for(lambda: master.instances[a["id"]].started.called)
            payload = b"z" * 5000
            self.assertEqual(await send_through(entry, payload), payload)
            await wait_for(lambda: master.records[a["id"]].tcprx >= 5000)
            code, before, _ = await api.call("GET", "/instances/" + a["id"])
            key, mid = master.api_key, master.master_id
            await master.stopService()
            mode = stat.S_IMODE(os.stat(os.path.join(state_dir, "nodepass.json")).st_mode)
            self.assertEqual(mode, 0o600)

            again = await start_master(self, state_dir=state_dir)
            self.assertEqual((again.api_key, again.master_id), (key, mid))
            api2 = Api(again, self)
            code, items, _ = await api2.call("GET", "/instances")
            by_id = {i["id"]: i for i in items}
            self.assertEqual(set(by_id), {API_KEY_ID, a["id"], b["id"]})
            self.assertEqual(by_id[API_KEY_ID]["alias"], "master-one")
            ra, rb = by_id[a["id"]], by_id[b["id"]]
            self.assertEqual((ra["alias"], ra["restart"], ra["status"]), ("alpha", True, "running"))
            self.assertEqual((rb["restart"], rb["status"]), (False, "stopped"))
            self.assertEqual(ra["meta"], {"peer": {"sid": "peer-1", "type": "0", "alias": "p"}, "tags": {"env": "test"}})
            self.assertEqual(ra["url"], before["url"])
            self.assertGreaterEqual(ra["tcprx"], 5000)
            self.assertEqual((ra["tcprx"], ra["tcptx"]), (before["tcprx"], before["tcptx"]))
            # the restored instance runs again and counts on top
            await wait_for(lambda: again.instances[a["id"]].started.called)
            self.assertEqual(await send_through(entry, payload), payload)
            await wait_for(lambda: again.records[a["id"]].tcprx >= before["tcprx"] + 5000)
            code, info, _ = await api2.call("GET", "/info")
            self.assertEqual((info["mid"], info["alias"]), (mid, "master-one"))

        return ensureDeferred(go())

    def test_corrupt_main_file_uses_backup(self):
        async def go():
            state_dir = self.mktemp()
            tun = Tunables(**{**{k: getattr(FAST, k) for k in ("report_interval", "service_cooldown", "shutdown_timeout")}, "reload_interval": 0.2})
            master = await start_master(self, state_dir=state_dir, tunables=tun)
            api = Api(master, self)
            code, inst, _ = await api.call("POST", "/instances", {"url": "client://127.0.0.1:0/127.0.0.1:9?mode=1", "alias": "kept", "restart": False})
            store = StateStore(state_dir)
            await wait_for(lambda: os.path.exists(store.backup_path) and inst["id"] in open(store.backup_path).read())
            self.assertEqual(stat.S_IMODE(os.stat(store.backup_path).st_mode), 0o600)
            key = master.api_key
            await master.stopService()
            with open(store.path, "wb") as f:
                f.write(b'{"instances": [tru')  # torn/garbage

            lines = []
            log = NodeLog("info")
            log.listeners.append(lambda level, line: lines.append((level, line)))
            again = MasterService(in_process(parse_url("master://127.0.0.1:0")), state_dir, tunables=FAST, log=log)
            again.startService()
            self.addCleanup(again.stopService)
            await again.ready
            self.assertEqual(again.api_key, key)
            self.assertEqual(again.records[inst["id"]].alias, "kept")
            self.assertTrue(any(level == "ERROR" and "backup" in line for level, line in lines), lines)
            # the good state was written back over the damaged file
            with open(store.path) as f:
                self.assertIn(inst["id"], json.load(f)["instances"][0]["id"])

        return ensureDeferred(go())

    def test_bad_state_without_backup_refuses_to_start(self):
        async def go():
            state_dir = self.mktemp()
            os.makedirs(state_dir)
            with open(os.path.join(state_dir, "nodepass.json"), "w") as f:
                f.write("not json")
            svc = MasterService(in_process(parse_url("master://127.0.0.1:0")), state_dir, tunables=FAST, log=NodeLog("none"))
            svc.startService()
            with self.assertRaises(RuntimeError):
                await svc.ready
            self.assertIsNone(svc.listening)
            with open(os.path.join(state_dir, "nodepass.json")) as f:
                self.assertEqual(f.read(), "not json")  # not overwritten
            await svc.stopService()
            with open(os.path.join(state_dir, "nodepass.json")) as f:
                self.assertEqual(f.read(), "not json")  # nor at stop

        return ensureDeferred(go())

    def test_unreadable_instance_is_kept_aside(self):
        async def go():
            state_dir = self.mktemp()
            os.makedirs(state_dir)
            good = {"id": "0a0b0c0d", "url": "client://127.0.0.1:0/127.0.0.1:9?mode=1&log=info", "alias": "ok", "restart": False}
            bad = {"id": "0e0e0e0e", "url": "nonsense"}
            with open(os.path.join(state_dir, "nodepass.json"), "w") as f:
                json.dump({"api_key": "ab" * 16, "master_id": "cd" * 8, "instances": [good, bad]}, f)
            master = await start_master(self, state_dir=state_dir)
            self.assertEqual(master.api_key, "ab" * 16)
            self.assertEqual(master.records["0a0b0c0d"].alias, "ok")
            self.assertNotIn("0e0e0e0e", master.records)
            await master.stopService()
            with open(os.path.join(state_dir, "nodepass.json")) as f:
                saved = json.load(f)
            self.assertEqual(saved["unreadable"], [bad])
            self.assertEqual([i["id"] for i in saved["instances"]], ["0a0b0c0d"])

        return ensureDeferred(go())


class CrashTests(unittest.TestCase):
    timeout = 60

    def test_sigkill_during_writes(self):
        async def go():
            state_dir = os.path.abspath(self.mktemp())
            env = child_env(NP_REPORT_INTERVAL="200ms", NP_SERVICE_COOLDOWN="100ms")
            proc = spawn(self, ["-m", "nodepass.cli", "master://127.0.0.1:0?log=info", "--state-dir", state_dir], env)
            m = await proc.wait_for(r"Master started: master://127\.0\.0\.1:(\d+)/api")
            port = int(m.group(1))
            m = await proc.wait_for(r"API Key created: ([0-9a-f]{32})")
            key = m.group(1)
            store = StateStore(state_dir)
            pool = HTTPConnectionPool(reactor, persistent=False)
            self.addCleanup(pool.closeCachedConnections)
            client = treq.client.HTTPClient(Agent(reactor, pool=pool))
            root = f"http://127.0.0.1:{port}/api/v1"
            hdrs = {"X-API-Key": key}
            created: list[str] = []
            aliased: dict[str, str] = {}
            failures = [0]

            async def one(i: int):
                try:
                    r = await client.post(root + "/instances", json={"url": "client://127.0.0.1:0/127.0.0.1:9?mode=1", "restart": False}, headers=hdrs)
                    body = await r.json()
                    if r.code != 201:
                        return
                    created.append(body["id"])
                    r = await client.patch(root + "/instances/" + body["id"], json={"alias": f"a{i}"}, headers=hdrs)
                    await r.content()
                    if r.code == 200:
                        aliased[body["id"]] = f"a{i}"
                except Exception:  # noqa: BLE001 - the process dies mid-request
                    failures[0] += 1

            async def worker(start: int):
                for i in range(start, 400, 4):
                    if proc.status is not None:
                        return
                    await one(i)

            workers = [ensureDeferred(worker(n)) for n in range(4)]
            await wait_for(lambda: len(aliased) >= 12, timeout=30)
            proc.signal(signal.SIGKILL)
            await proc.ended
            if proc.status is None:  # killed by a signal: no exit code
                proc.status = -signal.SIGKILL
            await defer.DeferredList(workers)
            self.assertGreaterEqual(len(created), 12)

            restored = MasterService(in_process(parse_url("master://127.0.0.1:0?log=none")), state_dir, tunables=FAST, log=NodeLog("none"))
            restored.startService()
            self.addCleanup(restored.stopService)
            await restored.ready
            self.assertEqual(restored.api_key, key)
            for rid in created:
                self.assertIn(rid, restored.records)
            for rid, alias in aliased.items():
                self.assertEqual(restored.records[rid].alias, alias)
            with open(store.path) as f:
                json.load(f)

        return ensureDeferred(go())
