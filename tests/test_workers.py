"""A master's instances in worker processes (``master://...?workers=N``).

Real worker processes, real sockets: instances created over the API run in
the workers, pass traffic, report counters and log lines as in-process
instances do; a worker killed with SIGKILL is replaced and its instances
come back; a master that stops (SIGTERM, or in-process) or is killed with
SIGKILL leaves no worker behind.
"""

from __future__ import annotations

import os
import re
import signal
from types import SimpleNamespace
from typing import Any

import psutil
from twisted.internet import reactor
from twisted.trial import unittest

from tests.helpers import free_port, wait_for
from tests.master_helpers import Api, LogCapture, SSEClient, start_master
from tests.procs import TWISTD, child_env, spawn
from tests.test_master_state import echo_server, send_through
from tests.test_metrics import scrape, value
from tests.test_tunnel import d
from nodepass.workers import pool


def gone(pid: int) -> bool:
    """No such process (or only its zombie, which its parent will reap)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def tls_loaded(pid: int) -> bool:
    """Whether a process has cryptography's compiled core mapped (pyOpenSSL
    is built on it): read from the kernel, not from the process."""
    with open(f"/proc/{pid}/maps") as f:
        return "/cryptography/" in f.read()


def listening_pids(port: int) -> set[int]:
    return {c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port and c.status == "LISTEN"}


class WorkerMasterTests(unittest.TestCase):
    async def _master(self, workers: int = 2):
        self.capture = LogCapture(self, "debug")
        master = await start_master(self, query=f"workers={workers}")
        await wait_for(lambda: len(master.worker_pids) == workers, what=f"{workers} worker processes")
        return master

    async def _up(self, rid: str, word: str) -> None:
        await wait_for(
            lambda: f"[{rid}] {word} started: " in self.capture.text(), timeout=15, what=f"{rid}'s '{word} started' line"
        )

    async def _forwarder(self, api: Any, target: int) -> tuple[str, int]:
        """A single-end forwarder instance to ``target``, created through the
        API and started: (its id, its entry port)."""
        entry = free_port()
        _code, inst, _ = await api.call("POST", "/instances", {"url": f"client://127.0.0.1:{entry}/127.0.0.1:{target}?mode=1"})
        await self._up(inst["id"], "Client")
        return inst["id"], entry

    @d
    async def test_pair_runs_in_two_workers_and_reports(self):
        """A tls=1 server and its client land on different workers (placed by
        load), carry traffic between the processes, and their counters and
        log lines reach the master as if they ran in it."""
        master = await self._master(2)
        api = Api(master, self)
        sse = await SSEClient(api).connect()
        logs = await SSEClient(api).connect()
        target = await echo_server(self)
        tunnel, entry = free_port(), free_port()
        code, srv, _ = await api.call("POST", "/instances", {"url": f"server://127.0.0.1:{tunnel}/127.0.0.1:{target}?tls=1&mode=2"})
        self.assertEqual(code, 201)
        code, cli, _ = await api.call("POST", "/instances", {"url": f"client://127.0.0.1:{tunnel}/127.0.0.1:{entry}?mode=2"})
        self.assertEqual(code, 201)
        await self._up(srv["id"], "Server")
        await self._up(cli["id"], "Client")
        await wait_for(lambda: "Marking tunnel handshake as complete" in self.capture.text(), timeout=15, what="the handshake")

        runs = master.instances
        self.assertNotEqual(runs[srv["id"]].worker.slot, runs[cli["id"]].worker.slot)
        workers = set(master.worker_pids)
        self.assertNotIn(os.getpid(), workers)
        self.assertEqual({p.pid for p in psutil.Process().children()} & workers, workers)
        self.assertEqual(listening_pids(tunnel), {runs[srv["id"]].worker.pid})
        self.assertEqual(listening_pids(entry), {runs[cli["id"]].worker.pid})

        payload = os.urandom(300_000)
        self.assertEqual(await send_through(entry, payload), payload)
        ev = await sse.event(
            lambda e: e["type"] == "update" and e["instance"]["id"] == cli["id"] and e["instance"]["tcprx"] >= len(payload),
            timeout=10,
            what="an update carrying the client's relayed bytes",
        )
        self.assertEqual(ev["instance"]["status"], "running")
        code, got, _ = await api.call("GET", "/instances/" + srv["id"])
        await wait_for(
            lambda: master.records[srv["id"]].tcptx >= len(payload), timeout=10, what="the server's counters"
        )
        # Lines come through the master's log with the instance tag, and as
        # SSE log events.
        self.assertRegex(self.capture.text(), rf"INFO  \[{cli['id']}\] Starting exchange: ")
        log_event = await logs.event(lambda e: e["type"] == "log" and e["instance"]["id"] == srv["id"], timeout=10, what="a log event")
        self.assertRegex(log_event["logs"], r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}  INFO  ")

    @d
    async def test_placement_weighs_traffic(self):
        """With one instance on each worker, a new one goes where less
        traffic flows (by count alone it would tie and take worker 1)."""
        master = await self._master(2)
        api = Api(master, self)
        target = await echo_server(self)
        ids, entries = [], []
        for _ in range(2):
            rid, entry = await self._forwarder(api, target)
            ids.append(rid)
            entries.append(entry)
        busy, quiet = (master.instances[i] for i in ids)
        self.assertNotEqual(busy.worker.slot, quiet.worker.slot)
        payload = os.urandom(4_000_000)
        deadline = reactor.seconds() + 15
        while busy.rate < 1_000_000:  # two reports with traffic between them
            self.assertLess(reactor.seconds(), deadline, "no traffic rate reported for the busy instance")
            self.assertEqual(await send_through(entries[0], payload), payload)
        code, third, _ = await api.call("POST", "/instances", {"url": f"client://127.0.0.1:{free_port()}/127.0.0.1:{target}?mode=1"})
        self.assertEqual(master.instances[third["id"]].worker.slot, quiet.worker.slot)

    @d
    async def test_reset_stop_start(self):
        """``reset`` zeroes the worker's counters too; ``stop`` keeps them and
        frees the port; ``start`` runs it again on a worker."""
        master = await self._master(1)
        api = Api(master, self)
        target = await echo_server(self)
        rid, entry = await self._forwarder(api, target)
        first = b"a" * 50_000
        self.assertEqual(await send_through(entry, first), first)
        await wait_for(lambda: master.records[rid].tcprx >= len(first), timeout=10, what="counters after the first send")

        code, _, _ = await api.call("PATCH", "/instances/" + rid, {"action": "reset"})
        self.assertEqual(code, 200)
        code, got, _ = await api.call("GET", "/instances/" + rid)
        self.assertEqual((got["tcprx"], got["tcptx"]), (0, 0))
        second = b"b" * 7_000
        self.assertEqual(await send_through(entry, second), second)
        await wait_for(lambda: master.records[rid].tcprx == len(second), timeout=10, what="counters from zero after reset")

        code, got, _ = await api.call("PATCH", "/instances/" + rid, {"action": "stop"})
        self.assertEqual(got["status"], "stopped")
        self.assertEqual(got["tcprx"], len(second))
        self.assertEqual(listening_pids(entry), set())
        code, got, _ = await api.call("PATCH", "/instances/" + rid, {"action": "start"})
        self.assertEqual(got["status"], "running")
        await wait_for(lambda: listening_pids(entry) == set(master.worker_pids), timeout=10, what="the port held again")
        self.assertEqual(await send_through(entry, first), first)
        code, _, _ = await api.call("DELETE", "/instances/" + rid)
        self.assertEqual(code, 204)
        await wait_for(lambda: not listening_pids(entry), timeout=10, what="the port freed at delete")

    @d
    async def test_killed_worker_is_replaced_and_instances_recover(self):
        master = await self._master(2)
        api = Api(master, self)
        sse = await SSEClient(api).connect()
        target = await echo_server(self)
        rid, entry = await self._forwarder(api, target)
        payload = b"x" * 20_000
        self.assertEqual(await send_through(entry, payload), payload)
        await wait_for(lambda: master.records[rid].tcprx >= len(payload), timeout=10, what="counters before the kill")

        victim = master.instances[rid].worker.pid
        other = set(master.worker_pids) - {victim}
        os.kill(victim, signal.SIGKILL)
        await sse.event(
            lambda e: e["type"] == "update" and e["instance"]["id"] == rid and e["instance"]["status"] == "error",
            timeout=10,
            what="an update saying the instance is in error",
        )
        await sse.event(
            lambda e: e["type"] == "update" and e["instance"]["id"] == rid and e["instance"]["status"] == "running",
            timeout=10,
            what="an update saying it runs again",
        )
        await wait_for(lambda: len(master.worker_pids) == 2 and victim not in master.worker_pids, timeout=10, what="a new worker")
        self.assertTrue(other <= set(master.worker_pids), "the other worker was left alone")
        await wait_for(lambda: bool(listening_pids(entry)), timeout=10, what="the instance listening again")
        self.assertEqual(await send_through(entry, payload), payload)
        await wait_for(
            lambda: master.records[rid].tcprx >= 2 * len(payload), timeout=10, what="counters continuing after the restart"
        )
        self.assertRegex(self.capture.text(), rf"WARN  Worker \d \(pid {victim}\) ended: killed by signal 9")
        samples = await scrape(api)
        self.assertEqual(value(samples, "nodepass_worker_processes"), 2)
        self.assertEqual(value(samples, "nodepass_worker_restarts_total"), 1)
        slot = str(master.instances[rid].worker.slot)
        self.assertEqual(value(samples, "nodepass_worker_instances", worker=slot), 1)
        for w in ("1", "2"):
            self.assertGreater(value(samples, "nodepass_worker_resident_memory_bytes", worker=w), 10_000_000)
            self.assertGreater(value(samples, "nodepass_worker_cpu_seconds_total", worker=w), 0)

    @d
    async def test_stopped_master_leaves_no_worker(self):
        master = await self._master(2)
        pids = list(master.worker_pids)
        await master.stopService()
        for pid in pids:
            await wait_for(lambda pid=pid: gone(pid), timeout=10, what=f"worker {pid} to exit")


class WorkerProcessTests(unittest.TestCase):
    """The master as a real process: ``nodepass`` and ``twistd nodepass``."""

    async def _workers(self, proc) -> list[int]:
        m = await proc.wait_for(r"Workers: 2 processes \(pids (\d+), (\d+)\)", timeout=20)
        pids = [int(m.group(1)), int(m.group(2))]
        for pid in pids:
            self.addCleanup(lambda pid=pid: gone(pid) or os.kill(pid, signal.SIGKILL))
        return pids

    @d
    async def test_sigterm_stops_every_worker(self):
        proc = spawn(self, ["-m", "nodepass.cli", "master://127.0.0.1:0?log=info&workers=2", "--state-dir", os.path.abspath(self.mktemp())])
        pids = await self._workers(proc)
        proc.signal(signal.SIGTERM)
        await proc.ended.addTimeout(20, reactor)
        for pid in pids:
            await wait_for(lambda pid=pid: gone(pid), timeout=10, what=f"worker {pid} to exit")
        self.assertIn("Master shutdown complete", proc.text())

    @d
    async def test_sigkill_of_the_master_ends_its_workers(self):
        """Workers notice the closed pipe: no orphan keeps ports or CPU."""
        proc = spawn(self, ["-m", "nodepass.cli", "master://127.0.0.1:0?log=info&workers=2", "--state-dir", os.path.abspath(self.mktemp())])
        pids = await self._workers(proc)
        proc.signal(signal.SIGKILL)
        await proc.ended.addTimeout(20, reactor)
        for pid in pids:
            await wait_for(lambda pid=pid: gone(pid), timeout=10, what=f"orphaned worker {pid} to exit")

    @d
    async def test_a_plain_master_runs_without_tls(self):
        """A master with workers and a plain HTTP API does without pyOpenSSL
        and cryptography (12 MB of RSS, ``nodepass.compat.tls_less``); its
        workers have them, and a tls=1 pair created through it carries
        traffic."""
        proc = spawn(self, ["-m", "nodepass.cli", "master://127.0.0.1:0?log=debug&workers=2", "--state-dir", os.path.abspath(self.mktemp())])
        pids = await self._workers(proc)
        key = (await proc.wait_for(r"API Key created: ([0-9a-f]+)")).group(1)
        where = await proc.wait_for(r"Console: http://127\.0\.0\.1:(\d+)(/\S*)/$")
        self.assertFalse(tls_loaded(proc.transport.pid), "the master loaded TLS")
        master = SimpleNamespace(scheme="http", port=int(where.group(1)), config=SimpleNamespace(prefix=where.group(2)), api_key=key)
        api = Api(master, self)
        target = await echo_server(self)
        tunnel, entry = free_port(), free_port()
        code, srv, _ = await api.call("POST", "/instances", {"url": f"server://127.0.0.1:{tunnel}/127.0.0.1:{target}?tls=1&mode=2"})
        self.assertEqual(code, 201, srv)
        code, cli, _ = await api.call("POST", "/instances", {"url": f"client://127.0.0.1:{tunnel}/127.0.0.1:{entry}?mode=2"})
        self.assertEqual(code, 201, cli)
        await proc.wait_for(re.escape(f"[{cli['id']}] ") + r".*Marking tunnel handshake as complete", timeout=20)
        payload = os.urandom(100_000)
        self.assertEqual(await send_through(entry, payload), payload)
        self.assertFalse(tls_loaded(proc.transport.pid), "the master loaded TLS while hosting a tls=1 pair")
        for pid in pids:
            self.assertTrue(tls_loaded(pid), f"worker {pid} has no TLS")
        self.assertNotIn("Traceback", proc.text())

    @d
    async def test_twistd_master_with_workers(self):
        state = os.path.abspath(self.mktemp())
        env = child_env()
        proc = spawn(
            self,
            ["-c", TWISTD, "-n", "--pidfile=", "nodepass", "--state-dir", state, "master://127.0.0.1:0?log=info&workers=2"],
            env=env,
        )
        pids = await self._workers(proc)
        m = await proc.wait_for(r"API Key created: ([0-9a-f]+)")
        self.assertTrue(re.fullmatch("[0-9a-f]{32}", m.group(1)))
        # twistd parses its options before it installs its reactor: the
        # plain master does without TLS there too.
        self.assertFalse(tls_loaded(proc.transport.pid), "the twistd master loaded TLS")
        proc.signal(signal.SIGTERM)
        await proc.ended.addTimeout(20, reactor)
        for pid in pids:
            await wait_for(lambda pid=pid: gone(pid), timeout=10, what=f"worker {pid} to exit")
        self.assertNotIn("Traceback", proc.text())


class WorkerBackOffTests(unittest.TestCase):
    @d
    async def test_a_worker_dying_young_is_replaced_after_a_pause(self):
        """A worker that dies within 2 s of its start is replaced after a
        pause (0.5 s the first time), so a crashing instance cannot make the
        master spin; an instance created meanwhile waits for it."""
        capture = LogCapture(self, "debug")
        master = await start_master(self, query="workers=1")
        await wait_for(lambda: len(master.worker_pids) == 1, what="the worker process")
        victim = master.worker_pids[0]
        os.kill(victim, signal.SIGKILL)
        await wait_for(lambda: "a new worker process starts in 0.5s" in capture.text(), timeout=10, what="the back-off line")
        api = Api(master, self)
        target = await echo_server(self)
        entry = free_port()
        code, inst, _ = await api.call("POST", "/instances", {"url": f"client://127.0.0.1:{entry}/127.0.0.1:{target}?mode=1"})
        self.assertEqual(code, 201)
        await wait_for(lambda: len(master.worker_pids) == 1 and victim not in master.worker_pids, timeout=10, what="the new worker")
        await wait_for(lambda: bool(listening_pids(entry)), timeout=10, what="the instance started in the new worker")
        payload = b"after the pause"
        self.assertEqual(await send_through(entry, payload), payload)

    @d
    async def test_stop_while_the_worker_is_not_started_yet(self):
        """An instance stopped before its worker process exists is simply
        forgotten, and a master stopping meanwhile does not wait for it."""
        self.patch(pool, "FIRST_PAUSE", 30.0)  # the window below, however slow the machine
        capture = LogCapture(self, "debug")
        master = await start_master(self, query="workers=1")
        await wait_for(lambda: len(master.worker_pids) == 1, what="the worker process")
        os.kill(master.worker_pids[0], signal.SIGKILL)
        await wait_for(lambda: "a new worker process starts in 30s" in capture.text(), timeout=10, what="the back-off line")
        api = Api(master, self)
        code, inst, _ = await api.call("POST", "/instances", {"url": f"client://127.0.0.1:{free_port()}/127.0.0.1:{free_port()}?mode=1"})
        self.assertEqual(master.worker_pids, [])
        code, got, _ = await api.call("PATCH", "/instances/" + inst["id"], {"action": "stop"})
        self.assertEqual((code, got["status"]), (200, "stopped"))
        started = reactor.seconds()
        await master.stopService()
        # Waiting for the never-started worker would take the shutdown
        # timeout (2 s here) + 3 s.
        self.assertLess(reactor.seconds() - started, 4.0, "the stop waited for a worker that never started")
        self.assertEqual(master.worker_pids, [])


class FittingTests(unittest.TestCase):
    """What a worker sends as log text always fits an AMP value."""

    def test_any_text_fits(self):
        from hypothesis import given, strategies as st

        from nodepass.workers.commands import MAX_TEXT, fitting

        @given(st.text(min_size=0, max_size=30000), st.integers(min_value=0, max_value=3))
        def check(text, repeat):
            text = text * (repeat + 1) + "\ud800"  # a lone surrogate too
            out = fitting(text)
            encoded = out.encode("utf-8")  # strict: what AMP does
            self.assertLessEqual(len(encoded), MAX_TEXT + len(" [cut]"))
            if len(text.encode("utf-8", "replace")) <= MAX_TEXT:
                self.assertEqual(out, text.encode("utf-8", "replace").decode("utf-8"))
            else:
                self.assertTrue(out.endswith(" [cut]"))

        check()
