#!/usr/bin/env python3
"""Master API benchmark (not a test).

Runs a real master (``python3 -m nodepass.cli master://...``) in a
subprocess pinned to one core, gives it 100 single-end client instances
(each forwarding an OS-chosen port to a local TCP listener), and from this
process (pinned to the other core) measures:

* ``GET /api/v1/instances`` requests/s and latency percentiles with ``wrk``
  (``apt-get install wrk``; a Python keep-alive load generator is used when
  wrk is missing), compared with a *baseline* measured in the same run: a
  bare Twisted Web server (same Python, same reactor, one process) answering
  the same 100-instance JSON body as a precomputed static resource -- the
  ceiling any Twisted JSON API can reach on this machine;
* SSE fan-out to 50 subscribers of ``/api/v1/events``: latency from a PATCH
  being sent until all 50 subscribers hold its ``update`` event (one at a
  time), and delivered events/s for a burst of PATCHes;
* the master's RSS with 100 running instances, and with none (so the
  per-instance cost shows).

    python3 bench/bench_master.py [--seconds 5] [--instances 100]
        [--subscribers 50] [--json]

With ``--workers N`` it compares instead, in one run with rounds
interleaved, a master running its instances in its own process
(``workers=0``) with one running them in ``N`` worker processes: the
aggregate throughput of two ``tls=1`` dual-end tunnels (both ends
instances of the master) run flat out, ``GET /instances`` latency while
they run, and the memory of the master with 100 single-end instances
summed over all its processes:

    python3 bench/bench_master.py --workers 2 [--rounds 2] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import http.client

import psutil

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_single import free_port, wait_listening  # noqa: E402 - sibling script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pin(pid: int, cpu: int) -> None:
    try:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) >= 2:
            os.sched_setaffinity(pid, {cpus[cpu % len(cpus)]})
    except (AttributeError, OSError):
        pass


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, int(round(p / 100 * (len(ordered) - 1)))))
    return ordered[index]


# -- processes -----------------------------------------------------------------


class Master:
    """A master subprocess; learns its API key from the log."""

    def __init__(self, state_dir: str, workers: int = 0, pinned: bool = True):
        self.port = free_port()
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nodepass.cli", "--state-dir", state_dir,
             f"master://127.0.0.1:{self.port}/api?log=info&workers={workers}"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        if pinned:
            pin(self.proc.pid, 0)
        self.key = ""
        deadline = time.monotonic() + 20
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline().decode("utf-8", "replace")
            if not line:
                raise RuntimeError("master exited during start")
            m = re.search(r"API Key (?:created|loaded): ([0-9a-f]{32})", line)
            if m:
                self.key = m.group(1)
            if "Master started" in line:
                break
        if not self.key:
            raise RuntimeError("master printed no API key")
        threading.Thread(target=self._drain, daemon=True).start()
        wait_listening(self.port)

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for _ in self.proc.stdout:
            pass

    def request(self, method: str, path: str, body=None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            headers = {"X-API-Key": self.key}
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            conn.request(method, "/api/v1" + path, body=data, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss

    def processes(self) -> list[psutil.Process]:
        """The master and its worker processes."""
        me = psutil.Process(self.proc.pid)
        return [me, *me.children(recursive=True)]

    def memory(self) -> dict:
        """RSS and PSS summed over the master and its workers, in MB (RSS
        counts the shared libraries once per process; PSS splits them)."""
        rss = pss = 0
        procs = self.processes()
        for p in procs:
            info = p.memory_full_info()
            rss += info.rss
            pss += info.pss
        return {"processes": len(procs), "rss_mb": rss / 2**20, "pss_mb": pss / 2**20}

    def cpu_seconds(self) -> float:
        total = 0.0
        for p in self.processes():
            t = p.cpu_times()
            total += t.user + t.system
        return total

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


BASELINE_SERVER = r"""
import sys
from twisted.internet import reactor
from twisted.web import resource, server
body = open(sys.argv[2], "rb").read()
class Instances(resource.Resource):
    isLeaf = True
    def render_GET(self, request):
        request.setHeader(b"content-type", b"application/json")
        return body
site = server.Site(Instances())
site.log = lambda request: None
reactor.listenTCP(int(sys.argv[1]), site, interface="127.0.0.1")
reactor.run()
"""


class Baseline:
    def __init__(self, body: bytes):
        self.port = free_port()
        self._file = tempfile.NamedTemporaryFile(suffix=".json", delete=False)
        self._file.write(body)
        self._file.close()
        self.proc = subprocess.Popen([sys.executable, "-c", BASELINE_SERVER, str(self.port), self._file.name])
        pin(self.proc.pid, 0)
        wait_listening(self.port)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()
        os.unlink(self._file.name)


class AcceptAndClose:
    """The instances' target: accepts (for their CHECK_POINT connect probe)
    and closes."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.close()


# -- HTTP load -------------------------------------------------------------------


def run_wrk(url: str, key: str, seconds: float, connections: int) -> dict:
    out = subprocess.run(
        ["taskset", "-c", str(_load_cpu()), "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency",
         "-H", f"X-API-Key: {key}", url],
        capture_output=True, text=True, check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    lat = {}
    for pct in ("50", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        value = float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
        lat[pct] = value
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p50_ms": lat["50"], "p90_ms": lat["90"], "p99_ms": lat["99"],
            "non2xx": int(errors.group(1)) if errors else 0, "tool": "wrk"}


def run_python_load(port: int, path: str, key: str, seconds: float, connections: int) -> dict:
    """Fallback when wrk is missing: keep-alive clients in threads."""
    latencies: list[float] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port)
        mine = []
        while time.monotonic() < stop_at:
            t0 = time.perf_counter()
            conn.request("GET", path, headers={"X-API-Key": key})
            conn.getresponse().read()
            mine.append((time.perf_counter() - t0) * 1000)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"rps": len(latencies) / seconds, "p50_ms": percentile(latencies, 50),
            "p90_ms": percentile(latencies, 90), "p99_ms": percentile(latencies, 99), "non2xx": 0,
            "tool": "python"}


def _load_cpu() -> int:
    cpus = sorted(os.sched_getaffinity(0))
    return cpus[1 % len(cpus)]


def http_load(port: int, path: str, key: str, seconds: float, connections: int) -> dict:
    if shutil.which("wrk") and shutil.which("taskset"):
        return run_wrk(f"http://127.0.0.1:{port}{path}", key, seconds, connections)
    return run_python_load(port, path, key, seconds, connections)


# -- SSE fan-out -------------------------------------------------------------------


async def sse_fanout(master: Master, instance_id: str, subscribers: int, one_by_one: int, burst: int) -> dict:
    got: dict[str, list[float]] = {}
    done_events: dict[str, asyncio.Event] = {}
    ready = 0
    all_ready = asyncio.Event()

    async def subscriber() -> None:
        nonlocal ready
        reader, writer = await asyncio.open_connection("127.0.0.1", master.port, limit=1 << 22)
        writer.write(
            f"GET /api/v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {master.key}\r\n"
            "Accept: text/event-stream\r\n\r\n".encode()
        )
        await writer.drain()
        first = True
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                if first and line.startswith(b"retry:"):
                    first = False
                    ready += 1
                    if ready == subscribers:
                        all_ready.set()
                if not line.startswith(b"data: "):
                    continue
                event = json.loads(line[6:])
                alias = (event.get("instance") or {}).get("alias", "")
                if event.get("type") == "update" and alias.startswith("fan-"):
                    stamps = got.setdefault(alias, [])
                    stamps.append(time.perf_counter())
                    if len(stamps) == subscribers:
                        done_events.setdefault(alias, asyncio.Event()).set()
        finally:
            writer.close()

    tasks = [asyncio.create_task(subscriber()) for _ in range(subscribers)]
    await asyncio.wait_for(all_ready.wait(), 20)
    reader, writer = await asyncio.open_connection("127.0.0.1", master.port)

    async def patch(alias: str) -> None:
        body = json.dumps({"alias": alias}).encode()
        writer.write(
            f"PATCH /api/v1/instances/{instance_id} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {master.key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
        )
        await writer.drain()
        status = await reader.readline()
        length, chunked = 0, False
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
            elif name.lower() == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
        if not chunked:
            await reader.readexactly(length)
        else:
            while True:
                size = int((await reader.readline()).split(b";")[0], 16)
                await reader.readexactly(size + 2)
                if size == 0:
                    break
        if b" 200 " not in status:
            raise RuntimeError(f"PATCH failed: {status!r}")

    latencies, answers, spreads = [], [], []
    for i in range(one_by_one):
        alias = f"fan-1-{i}"
        done_events[alias] = asyncio.Event()
        t0 = time.perf_counter()
        await patch(alias)
        answers.append((time.perf_counter() - t0) * 1000)
        await asyncio.wait_for(done_events[alias].wait(), 10)
        latencies.append((got[alias][-1] - t0) * 1000)
        spreads.append((got[alias][-1] - got[alias][0]) * 1000)

    aliases = [f"fan-2-{i}" for i in range(burst)]
    for alias in aliases:
        done_events[alias] = asyncio.Event()
    t0 = time.perf_counter()
    for alias in aliases:
        await patch(alias)
    await asyncio.wait_for(asyncio.gather(*(done_events[a].wait() for a in aliases)), 60)
    elapsed = time.perf_counter() - t0
    writer.close()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "subscribers": subscribers,
        "all_delivered_p50_ms": statistics.median(latencies),
        "all_delivered_p99_ms": percentile(latencies, 99),
        "patch_answer_p50_ms": statistics.median(answers),
        "first_to_last_subscriber_p50_ms": statistics.median(spreads),
        "first_to_last_subscriber_p99_ms": percentile(spreads, 99),
        "burst_patches": burst,
        "burst_seconds": elapsed,
        "burst_events_per_s": burst * subscribers / elapsed,
    }


# -- main ---------------------------------------------------------------------------


# -- worker processes (issue 13 part 2) ------------------------------------------

SOURCE = r"""
import socket, sys, threading
sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("127.0.0.1", 0))
sock.listen(64)
print(sock.getsockname()[1], flush=True)
buf = memoryview(bytes(1 << 20))
def send(conn):
    try:
        while True:
            conn.sendall(buf)
    except OSError:
        conn.close()
while True:
    conn, _ = sock.accept()
    threading.Thread(target=send, args=(conn,), daemon=True).start()
"""

DOWNLOAD = r"""
import socket, sys, time
port, warm, seconds = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
s = socket.create_connection(("127.0.0.1", port))
buf = bytearray(1 << 20)
view = memoryview(buf)
start = time.monotonic()
while time.monotonic() < start + warm:
    if not s.recv_into(view):
        raise SystemExit("closed during warm-up")
n = 0
t0 = time.monotonic()
while time.monotonic() < t0 + seconds:
    got = s.recv_into(view)
    if not got:
        break
    n += got
print(n / (time.monotonic() - t0), flush=True)
"""


def _tls_tunnels(master: Master, source_port: int, count: int, tls: int) -> list[int]:
    """``count`` dual-end tunnels (server and client both instances of
    ``master``) to ``source_port``; returns their entry ports once each
    carries bytes."""
    entries = []
    for i in range(count):
        tunnel, entry = free_port(), free_port()
        for url in (
            f"server://127.0.0.1:{tunnel}/127.0.0.1:{source_port}?tls={tls}&mode=2&log=warn",
            f"client://127.0.0.1:{tunnel}/127.0.0.1:{entry}?mode=2&log=warn",
        ):
            status, body = master.request("POST", "/instances", {"url": url, "alias": f"bulk{i}"})
            if status != 201:
                raise RuntimeError(f"create failed: {status} {body[:200]!r}")
        entries.append(entry)
    for entry in entries:
        wait_listening(entry, 20)
        deadline = time.monotonic() + 20
        while True:  # the pool may still be filling: until a byte comes through
            try:
                with socket.create_connection(("127.0.0.1", entry), timeout=2) as probe:
                    if probe.recv(1):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"no bytes through the tunnel at {entry}")
            time.sleep(0.2)
    return entries


def _bulk(entries: list[int], warm: float, seconds: float) -> float:
    """Aggregate bytes/s of one download per entry, all at once, each in
    its own process (no GIL shared with the load)."""
    procs = [
        subprocess.Popen([sys.executable, "-c", DOWNLOAD, str(port), str(warm), str(seconds)], stdout=subprocess.PIPE, text=True)
        for port in entries
    ]
    total = 0.0
    for p in procs:
        out, _ = p.communicate(timeout=warm + seconds + 30)
        total += float(out.strip())
    return total


def workers_round(workers: int, args: argparse.Namespace) -> dict:
    """One master with ``workers``: two tls=1 bulk tunnels flat out, alone
    and with ``GET /instances`` load beside them."""
    source = subprocess.Popen([sys.executable, "-c", SOURCE], stdout=subprocess.PIPE, text=True)
    state_dir = tempfile.mkdtemp(prefix="np-bench-workers-")
    master = Master(state_dir, workers=workers, pinned=False)
    try:
        assert source.stdout is not None
        source_port = int(source.stdout.readline())
        entries = _tls_tunnels(master, source_port, 2, 1)
        cpu0 = master.cpu_seconds()
        t0 = time.monotonic()
        rate = _bulk(entries, 1.0, args.seconds)
        cpu = (master.cpu_seconds() - cpu0) / (time.monotonic() - t0)
        idle_api = http_load(master.port, "/api/v1/instances", master.key, min(args.seconds, 3), args.connections)
        # Bulk and API load together: the API's latency while the tunnels run.
        procs = [
            subprocess.Popen([sys.executable, "-c", DOWNLOAD, str(port), "1", str(args.seconds + 2)], stdout=subprocess.PIPE, text=True)
            for port in entries
        ]
        time.sleep(1.5)
        loaded_api = http_load(master.port, "/api/v1/instances", master.key, args.seconds, args.connections)
        during = sum(float(p.communicate(timeout=args.seconds + 40)[0].strip()) for p in procs)
        return {
            "workers": workers,
            "bulk_mb_s": rate / 1e6,
            "cpu_cores": cpu,
            "api_idle": idle_api,
            "api_loaded": loaded_api,
            "bulk_with_api_mb_s": during / 1e6,
            "memory": master.memory(),
        }
    finally:
        master.stop()
        source.kill()
        source.wait()
        shutil.rmtree(state_dir, ignore_errors=True)


def memory_round(workers: int, instances: int, target_port: int) -> dict:
    """RSS and PSS of a master with ``workers`` and ``instances`` running
    single-end instances, summed over all its processes."""
    state_dir = tempfile.mkdtemp(prefix="np-bench-workers-")
    master = Master(state_dir, workers=workers, pinned=False)
    try:
        time.sleep(1.0)
        empty = master.memory()
        for i in range(instances):
            status, body = master.request(
                "POST", "/instances", {"url": f"client://127.0.0.1:0/127.0.0.1:{target_port}?mode=1&log=warn", "alias": f"m{i}"}
            )
            if status != 201:
                raise RuntimeError(f"create failed: {status} {body[:200]!r}")
        time.sleep(6.0)  # every instance past its first CHECK_POINT
        status, body = master.request("GET", "/instances")
        running = sum(1 for inst in json.loads(body) if inst["status"] == "running")
        return {"workers": workers, "empty": empty, "full": master.memory(), "running": running}
    finally:
        master.stop()
        shutil.rmtree(state_dir, ignore_errors=True)


def compare_workers(args: argparse.Namespace) -> int:
    """``--workers``: single-process mode against worker processes, rounds
    interleaved; ratios within the run."""
    modes = [0, args.workers]
    rounds: list[dict] = []
    for r in range(args.rounds):
        for w in modes:
            res = workers_round(w, args)
            rounds.append(res)
            print(
                f"round {r + 1} workers={w}: 2 tls=1 tunnels {res['bulk_mb_s']:.0f} MB/s aggregate "
                f"({res['cpu_cores']:.2f} cores in master+workers); GET /instances p99 idle "
                f"{res['api_idle']['p99_ms']:.2f} ms, under bulk {res['api_loaded']['p99_ms']:.2f} ms "
                f"({res['api_loaded']['rps']:.0f} req/s; bulk meanwhile {res['bulk_with_api_mb_s']:.0f} MB/s)",
                flush=True,
            )
    target = AcceptAndClose()
    memory = [memory_round(w, args.instances, target.port) for w in modes]
    best = {w: max(x["bulk_mb_s"] for x in rounds if x["workers"] == w) for w in modes}
    worst_p99 = {w: max(x["api_loaded"]["p99_ms"] for x in rounds if x["workers"] == w) for w in modes}
    print(f"bulk, best of {args.rounds}: workers=0 {best[0]:.0f} MB/s, workers={args.workers} {best[args.workers]:.0f} MB/s "
          f"-> {best[args.workers] / best[0]:.2f} x (target >= 1.5 x)")
    print(f"GET /instances p99 under bulk, worst of {args.rounds}: workers=0 {worst_p99[0]:.2f} ms, "
          f"workers={args.workers} {worst_p99[args.workers]:.2f} ms (target < 20 ms)")
    for m in memory:
        print(f"memory, workers={m['workers']}, {m['running']}/{args.instances} instances running: "
              f"{m['full']['processes']} processes, RSS {m['empty']['rss_mb']:.1f} -> {m['full']['rss_mb']:.1f} MB, "
              f"PSS {m['empty']['pss_mb']:.1f} -> {m['full']['pss_mb']:.1f} MB (target: <= 150 MB)")
    if args.json:
        print(json.dumps({"rounds": rounds, "memory": memory}, indent=2))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0, help="duration of each HTTP load run")
    ap.add_argument("--connections", type=int, default=10, help="concurrent keep-alive HTTP connections")
    ap.add_argument("--instances", type=int, default=100)
    ap.add_argument("--subscribers", type=int, default=50)
    ap.add_argument("--json", action="store_true", help="print the results as JSON too")
    ap.add_argument("--workers", type=int, default=0,
                    help="instead: compare workers=0 with workers=N (bulk tls=1 tunnels, API latency, memory)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of the --workers comparison")
    args = ap.parse_args()
    if args.workers:
        return compare_workers(args)
    pin(os.getpid(), 1)
    results: dict = {"cpus": os.cpu_count()}
    target = AcceptAndClose()
    state_dir = tempfile.mkdtemp(prefix="np-bench-master-")
    master = Master(state_dir)
    try:
        time.sleep(1.0)
        results["rss_empty_mb"] = master.rss() / 2**20
        t0 = time.perf_counter()
        ids = []
        for i in range(args.instances):
            status, body = master.request(
                "POST", "/instances",
                {"url": f"client://127.0.0.1:0/127.0.0.1:{target.port}?mode=1&log=warn", "alias": f"b{i}"},
            )
            if status != 201:
                raise RuntimeError(f"create failed: {status} {body[:200]!r}")
            ids.append(json.loads(body)["id"])
        results["create_per_s"] = args.instances / (time.perf_counter() - t0)
        time.sleep(6.0)  # every instance past its first CHECK_POINT
        status, body = master.request("GET", "/instances")
        listed = json.loads(body)
        running = sum(1 for inst in listed if inst["status"] == "running")
        results["instances_running"] = running
        results["instances_json_bytes"] = len(body)
        results["rss_100_mb"] = master.rss() / 2**20

        results["get_instances"] = http_load(master.port, "/api/v1/instances", master.key, args.seconds,
                                             args.connections)
        baseline = Baseline(body)
        try:
            results["baseline_static"] = http_load(baseline.port, "/", master.key, args.seconds, args.connections)
        finally:
            baseline.stop()
        results["ratio_rps"] = results["get_instances"]["rps"] / results["baseline_static"]["rps"]
        results["sse"] = asyncio.run(sse_fanout(master, ids[0], args.subscribers, 100, 200))
        results["rss_after_mb"] = master.rss() / 2**20
    finally:
        master.stop()
        shutil.rmtree(state_dir, ignore_errors=True)

    g, b, s = results["get_instances"], results["baseline_static"], results["sse"]
    print(f"master: {results['instances_running']}/{args.instances} instances running, "
          f"GET /instances body {results['instances_json_bytes']} bytes, created {results['create_per_s']:.0f}/s")
    print(f"GET /api/v1/instances ({g['tool']}, {args.connections} conns, {args.seconds:g}s): "
          f"{g['rps']:.0f} req/s, p50 {g['p50_ms']:.2f} ms, p90 {g['p90_ms']:.2f} ms, p99 {g['p99_ms']:.2f} ms, "
          f"non-2xx {g['non2xx']}")
    print(f"baseline static Twisted resource, same body: {b['rps']:.0f} req/s, p99 {b['p99_ms']:.2f} ms "
          f"-> master/baseline {results['ratio_rps']:.2f}")
    print(f"SSE fan-out to {s['subscribers']} subscribers: PATCH -> all hold the event p50 "
          f"{s['all_delivered_p50_ms']:.2f} ms, p99 {s['all_delivered_p99_ms']:.2f} ms (the PATCH itself: p50 "
          f"{s['patch_answer_p50_ms']:.2f} ms; first to last subscriber: p50 "
          f"{s['first_to_last_subscriber_p50_ms']:.2f} ms, p99 {s['first_to_last_subscriber_p99_ms']:.2f} ms); burst of "
          f"{s['burst_patches']} PATCHes: {s['burst_events_per_s']:.0f} events/s delivered "
          f"({s['burst_seconds']:.2f} s)")
    print(f"RSS: empty master {results['rss_empty_mb']:.1f} MB, with {args.instances} instances "
          f"{results['rss_100_mb']:.1f} MB ({(results['rss_100_mb'] - results['rss_empty_mb']) / max(1, args.instances) * 1024:.0f} KB/instance), "
          f"after the load {results['rss_after_mb']:.1f} MB")
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
