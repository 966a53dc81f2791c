#!/usr/bin/env python3
"""Single-end forwarding benchmark (not a test).

Measures, in one run and against the same target servers:

* throughput of 1 and 8 concurrent download streams,
* new connections per second (20 concurrent clients doing connect, 32-byte
  request, 32-byte answer, close),

for a direct connection, ``socat TCP-LISTEN:P,fork,reuseaddr TCP:127.0.0.1:T``
and the nodepass single-end forwarder (``python3 -m nodepass.cli
"client://127.0.0.1:P/127.0.0.1:T?mode=1&log=warn"``), and prints ratios;
then the forwarder's RSS with 1,000 idle forwarded connections.

Layout on a 2-core machine: the forwarder under test (nodepass or socat) is a
separate process pinned to one core; this process -- the load generator and
the target servers -- is pinned to the other.  Throughput uses blocking
sockets in threads (1 MiB sends / recv_into, so the load side is mostly
kernel time); connection rate uses one asyncio loop for clients and target.

    python3 bench/bench_single.py [--seconds 2] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHUNK = 1 << 20
ME = psutil.Process()
# e.g. NP_BENCH_PROFILE="-m cProfile -o /tmp/np-{name}.prof" to profile the
# forwarder ({name}: "single" and its port, so each process has its own file)
PROFILE = os.environ.get("NP_BENCH_PROFILE", "").split()


try:
    CPUS = sorted(os.sched_getaffinity(0))  # read once: pin() narrows our own set
except AttributeError:  # not Linux
    CPUS = []


PIN = False  # --pin


def pin(pid: int, cpu: int) -> None:
    """With --pin, pin ``pid`` (0 = this process) to one core of two."""
    if PIN and len(CPUS) >= 2:
        try:
            os.sched_setaffinity(pid, {CPUS[cpu % len(CPUS)]})
        except OSError:
            pass


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_listening(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


# -- targets -----------------------------------------------------------------


class SourceServer:
    """Streams zeros to every connection until the peer goes away."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        self.buf = bytes(CHUNK)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._send, args=(conn,), daemon=True).start()

    def _send(self, conn: socket.socket) -> None:
        view = memoryview(self.buf)
        try:
            while True:
                conn.sendall(view)
        except OSError:
            pass
        finally:
            conn.close()


def download(port: int, seconds: float, streams: int) -> float:
    """Bytes/s summed over ``streams`` concurrent downloads."""
    totals = [0] * streams
    start_barrier = threading.Barrier(streams + 1)
    go = threading.Event()
    stop_at = [0.0]

    def run(i: int) -> None:
        s = socket.create_connection(("127.0.0.1", port))
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        s.recv_into(view)  # first bytes: the path is up
        start_barrier.wait()
        go.wait()
        n = 0
        while time.monotonic() < stop_at[0]:
            got = s.recv_into(view)
            if not got:
                break
            n += got
        totals[i] = n
        s.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    start_barrier.wait()
    t0 = time.monotonic()
    stop_at[0] = t0 + seconds
    go.set()
    for t in threads:
        t.join()
    return sum(totals) / (time.monotonic() - t0)


class _Answer(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)


class _Ask(asyncio.Protocol):
    def __init__(self, done: asyncio.Future, size: int):
        self.done = done
        self.size = size
        self.got = 0

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.got += len(data)
        if self.got >= self.size and not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc):
        if not self.done.done():
            self.done.set_exception(ConnectionError("closed early"))


async def _conn_rate(port: int, seconds: float, clients: int) -> tuple[float, int]:
    loop = asyncio.get_running_loop()
    request = b"q" * 32
    count = 0
    errors = 0
    stop_at = loop.time() + seconds

    async def client() -> None:
        nonlocal count, errors
        while loop.time() < stop_at:
            done = loop.create_future()
            try:
                transport, _ = await loop.create_connection(lambda: _Ask(done, len(request)), "127.0.0.1", port)
            except OSError:
                errors += 1
                await asyncio.sleep(0.01)
                continue
            transport.write(request)
            try:
                await asyncio.wait_for(done, 5)
                count += 1
            except (ConnectionError, asyncio.TimeoutError):
                errors += 1
            transport.close()

    t0 = loop.time()
    await asyncio.gather(*(client() for _ in range(clients)))
    return count / (loop.time() - t0), errors


async def _hold(port: int, n: int):
    """Open ``n`` connections, check each answers once, keep them open."""
    loop = asyncio.get_running_loop()
    held = []
    for _ in range(n):
        done = loop.create_future()
        transport, _ = await loop.create_connection(lambda: _Ask(done, 1), "127.0.0.1", port)
        transport.write(b"h")
        held.append((transport, done))
    await asyncio.gather(*(d for _, d in held))
    return [t for t, _ in held]


class AnswerServer:
    """asyncio request/answer target, run on a private loop per phase."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.server = loop.run_until_complete(loop.create_server(_Answer, "127.0.0.1", 0, backlog=4096))
        self.port = self.server.sockets[0].getsockname()[1]


# -- forwarders ----------------------------------------------------------------


def start_nodepass(target: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    url = f"client://127.0.0.1:{port}/127.0.0.1:{target}?mode=1&log=warn"
    proc = subprocess.Popen(
        [sys.executable, *(a.replace("{name}", f"single{port}") for a in PROFILE), "-m", "nodepass.cli", url],
        cwd=ROOT, stdout=subprocess.DEVNULL,
    )
    pin(proc.pid, 1)
    wait_listening(port)
    return proc, port


def start_socat(target: int) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen(["socat", f"TCP-LISTEN:{port},fork,reuseaddr,backlog=4096", f"TCP:127.0.0.1:{target}"],
        stderr=subprocess.DEVNULL,  # socat reports every reset peer
    )
    pin(proc.pid, 1)
    wait_listening(port)
    return proc, port


def _cpu(proc) -> float:
    """CPU seconds of a forwarder process and its children (socat forks)."""
    if proc is None:
        return 0.0
    try:
        p = psutil.Process(proc.pid)
        total = sum(p.cpu_times()[:4])
        for child in p.children(recursive=True):
            try:
                total += sum(child.cpu_times()[:2])
            except psutil.Error:
                pass
        return total
    except psutil.Error:
        return 0.0


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=2.0, help="duration of each measurement")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best of each is kept")
    ap.add_argument("--clients", type=int, default=20, help="concurrent clients for the connection rate")
    ap.add_argument("--idle", type=int, default=1000, help="idle connections for the RSS figure")
    ap.add_argument("--json", action="store_true", help="print the results as JSON too")
    ap.add_argument(
        "--pin",
        action="store_true",
        help="pin the forwarder to one core and this process to the other (only on an otherwise idle machine)",
    )
    args = ap.parse_args()
    global PIN
    PIN = args.pin
    if shutil.which("socat") is None:
        print("socat not found (apt-get install socat)", file=sys.stderr)
        return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the children inherit it
    pin(0, 0)

    source = SourceServer()
    loop = asyncio.new_event_loop()
    answer = AnswerServer(loop)
    secs = args.seconds
    keys = ("1 stream MB/s", "8 streams MB/s", "conn/s")
    results: dict[str, dict[str, float]] = {}
    cpu_per_conn: dict[str, float] = {}
    load_per_conn: dict[str, float] = {}  # this process: clients + target

    # Both forwarders stay up for the whole run; the measurements are
    # interleaved over --rounds so that load from elsewhere on the machine
    # hits all three alike, and the best of the rounds is kept.
    forwarders = {
        "socat": [start_socat(source.port), start_socat(answer.port)],
        "nodepass": [start_nodepass(source.port), start_nodepass(answer.port)],
    }
    ports = {"direct": (source.port, answer.port)}
    ports.update({name: (fs[0][1], fs[1][1]) for name, fs in forwarders.items()})
    try:
        for rnd in range(args.rounds):
            for name, (src_port, ans_port) in ports.items():
                r = results.setdefault(name, {k: 0.0 for k in keys})
                got = {
                    "1 stream MB/s": download(src_port, secs, 1) / 1e6,
                    "8 streams MB/s": download(src_port, secs, 8) / 1e6,
                }
                proc = forwarders[name][1][0] if name in forwarders else None
                cpu0, own0 = _cpu(proc), sum(ME.cpu_times()[:2])
                rate, errors = loop.run_until_complete(_conn_rate(ans_port, secs, args.clients))
                if rate:
                    own = (sum(ME.cpu_times()[:2]) - own0) / (rate * secs)
                    load_per_conn[name] = min(load_per_conn.get(name, 1e9), own)
                if proc is not None and rate:
                    cpu_per_conn[name] = min(cpu_per_conn.get(name, 1e9), (_cpu(proc) - cpu0) / (rate * secs))
                got["conn/s"] = rate
                for k in keys:
                    r[k] = max(r[k], got[k])
                print(
                    f"round {rnd + 1} {name:9s} " + "  ".join(f"{k} {got[k]:,.0f}" for k in keys) + f"  errors {errors}",
                    flush=True,
                )
    finally:
        for fs in forwarders.values():
            for p, _ in fs:
                stop(p)

    # RSS with idle forwarded connections.
    proc, port = start_nodepass(answer.port)
    try:
        ps = psutil.Process(proc.pid)
        time.sleep(0.3)
        rss_before = ps.memory_info().rss
        held = loop.run_until_complete(_hold(port, args.idle))
        time.sleep(0.5)
        rss_after = ps.memory_info().rss
        for t in held:
            t.close()
        loop.run_until_complete(asyncio.sleep(0.2))
    finally:
        stop(proc)

    d, s, n = results["direct"], results["socat"], results["nodepass"]
    print()
    print("| measure | direct | socat | nodepass | nodepass/direct | nodepass/socat |")
    print("|---|---|---|---|---|---|")
    for key in keys:
        print(f"| {key} | {d[key]:,.0f} | {s[key]:,.0f} | {n[key]:,.0f} | {n[key] / d[key]:.2f} | {n[key] / s[key]:.2f} |")
    for name, cost in cpu_per_conn.items():
        print(f"{name} CPU per forwarded connection: {cost * 1e6:.0f} us (one core: {1 / cost:,.0f} conn/s)")
    for name, cost in load_per_conn.items():
        print(f"load generator + target CPU per connection ({name}): {cost * 1e6:.0f} us")
    per_conn = (rss_after - rss_before) / args.idle
    print(
        f"\nnodepass RSS: {rss_before / 2**20:.1f} MiB idle, {rss_after / 2**20:.1f} MiB with {args.idle} "
        f"forwarded connections ({per_conn / 1024:.1f} KiB per connection)"
    )
    if args.json:
        print(json.dumps({"results": results, "rss_before": rss_before, "rss_after": rss_after}, indent=1))
    loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
