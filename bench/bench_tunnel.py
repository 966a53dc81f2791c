#!/usr/bin/env python3
"""Dual-end tunnel benchmark (not a test).

A nodepass server and a nodepass client run as two separate processes
(``python3 -m nodepass.cli URL``), the server in reverse mode
(``server://127.0.0.1:T/127.0.0.1:E?mode=1&tls=N``: users connect to E) and
the client dialling the benchmark's target (``client://127.0.0.1:T/
127.0.0.1:TARGET?mode=2``).  Measured in the same run against a direct
connection to the same target:

* download throughput, 1 and 8 streams, for ``tls=0`` and ``tls=1``;
* new connections per second (20 concurrent clients: connect, 32-byte
  request, 32-byte answer, close) for ``tls=0`` and ``tls=1``;
* first-byte latency of a new connection (connect, 1 byte, answer; median
  of sequential tries);
* RSS per idle pool connection (a tunnel with ``min=1`` against one with
  ``min=1001``, both ends);
* CPU of the two tunnel processes per GB and per relayed connection.

Ratios are computed within each round and the median over rounds is shown.

    python3 bench/bench_tunnel.py [--seconds 2] [--rounds 3] [--modes tls=0,tls=1] [--no-rss] [--json]

``--modes quic=1`` measures the QUIC pool the same way; ``--modes
tls=0&wire=1.12,tls=0`` compares the 1.12 and 1.14 generations (a mode's
``wire=`` pins both ends; without it both ends settle on 1.14).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_single import (  # noqa: E402 - sibling script
    ROOT,
    AnswerServer,
    SourceServer,
    _conn_rate,
    download,
    free_port,
    stop,
    wait_listening,
)

PROFILE = os.environ.get("NP_BENCH_PROFILE", "").split()


class Tunnel:
    """A server process and a client process carrying one target."""

    def __init__(self, target: int, query: str, min_pool: int = 64, report: str = "5s", target_host: str = "127.0.0.1"):
        self.tunnel = free_port()
        self.entry = free_port()
        env = dict(os.environ, NP_REPORT_INTERVAL=report, PYTHONPATH=ROOT)
        server_url = f"server://127.0.0.1:{self.tunnel}/127.0.0.1:{self.entry}?mode=1&{query}&log=event"
        client_url = f"client://127.0.0.1:{self.tunnel}/{target_host}:{target}?mode=2&min={min_pool}&log=event"
        # A mode naming a wire generation pins both ends to it (the default,
        # auto at both ends, settles on 1.14).
        client_url += "".join(f"&{p}" for p in query.split("&") if p.startswith("wire="))
        self.lines = {"server": [], "client": []}
        self.server = self._spawn("server", server_url, env)
        wait_listening(self.entry)
        self.client = self._spawn("client", client_url, env)

    def _spawn(self, name: str, url: str, env: dict) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, *(a.replace("{name}", f"{name}{self.entry}") for a in PROFILE), "-m", "nodepass.cli", url],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        threading.Thread(target=self._collect, args=(name, proc), daemon=True).start()
        return proc

    def _collect(self, name: str, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.lines[name].append(line)
            del self.lines[name][:-50]

    def pool(self, name: str) -> int:
        for line in reversed(self.lines[name]):
            m = re.search(r"POOL=(\d+)", line)
            if m:
                return int(m.group(1))
        return -1

    def wait_up(self, timeout: float = 20.0) -> None:
        """Until a request goes through (the client has joined)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                s = socket.create_connection(("127.0.0.1", self.entry), timeout=2)
                s.settimeout(2)
                s.sendall(b"?")
                if s.recv(1):
                    s.close()
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("tunnel did not come up:\n" + "".join(self.lines["server"] + self.lines["client"]))

    def cpu(self) -> float:
        """CPU seconds used so far by both processes."""
        return sum(sum(psutil.Process(p.pid).cpu_times()[:2]) for p in (self.server, self.client))

    def rss(self) -> tuple[int, int]:
        return psutil.Process(self.server.pid).memory_info().rss, psutil.Process(self.client.pid).memory_info().rss

    def close(self) -> None:
        stop(self.client)
        stop(self.server)


class _NoRSS(Exception):
    pass


def first_byte_ms(port: int, tries: int) -> float:
    samples = []
    for _ in range(tries):
        t0 = time.perf_counter()
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"x")
        s.recv(16)
        samples.append((time.perf_counter() - t0) * 1000)
        s.close()
    return statistics.median(samples)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best of each is kept")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--latency-tries", type=int, default=200)
    ap.add_argument("--pool", type=int, default=1000, help="extra idle pool connections for the RSS figure")
    ap.add_argument("--modes", default="tls=0,tls=1",
                    help="comma-separated server queries to compare with direct, e.g. tls=0,tls=1,quic=1")
    ap.add_argument("--no-rss", action="store_true", help="skip the RSS per idle pool connection figure")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    source = SourceServer()
    loop = asyncio.new_event_loop()
    answer = AnswerServer(loop)
    # The answer server runs on ``loop``; keep it serving in a thread so the
    # blocking latency probe and tunnel start-up probes get answers.
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def rate(port: int) -> tuple[float, int]:
        return asyncio.run_coroutine_threadsafe(_conn_rate(port, args.seconds, args.clients), loop).result()

    tunnels = {}
    results: dict[str, dict[str, float]] = {}
    keys = ("1 stream MB/s", "8 streams MB/s", "conn/s", "first byte ms")
    try:
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        for mode in modes:
            tunnels[mode] = (Tunnel(source.port, mode), Tunnel(answer.port, mode))
        for src, ans in tunnels.values():
            ans.wait_up()
            s = socket.create_connection(("127.0.0.1", src.entry))
            s.recv(1)
            s.close()
        paths = {"direct": (source.port, answer.port)}
        paths.update({name: (src.entry, ans.entry) for name, (src, ans) in tunnels.items()})
        per_round: dict[str, list] = {}
        cpu_gb: dict[str, float] = {}
        cpu_conn: dict[str, float] = {}
        for rnd in range(args.rounds):
            for name, (src_port, ans_port) in paths.items():
                r = results.setdefault(name, {k: 0.0 for k in keys})
                pair = tunnels.get(name)
                c0 = pair[0].cpu() if pair else 0.0
                one = download(src_port, args.seconds, 1)
                if pair and one:
                    cpu_gb[name] = min(cpu_gb.get(name, 1e9), (pair[0].cpu() - c0) / (one * args.seconds / 1e9))
                got = {
                    "1 stream MB/s": one / 1e6,
                    "8 streams MB/s": download(src_port, args.seconds, 8) / 1e6,
                }
                c0 = pair[1].cpu() if pair else 0.0
                got["conn/s"], errors = rate(ans_port)
                if pair and got["conn/s"]:
                    used = pair[1].cpu() - c0
                    cpu_conn[name] = min(cpu_conn.get(name, 1e9), used / (got["conn/s"] * args.seconds))
                got["first byte ms"] = first_byte_ms(ans_port, args.latency_tries)
                per_round.setdefault(name, []).append(dict(got))
                for k in keys[:3]:
                    r[k] = max(r[k], got[k])
                r["first byte ms"] = got["first byte ms"] if rnd == 0 else min(r["first byte ms"], got["first byte ms"])
                print(
                    f"round {rnd + 1} {name:8s} " + "  ".join(f"{k} {got[k]:,.2f}" for k in keys) + f"  errors {errors}",
                    flush=True,
                )
    finally:
        for pair in tunnels.values():
            for t in pair:
                t.close()

    # RSS per idle pool connection: min=1 against min=1+N, both processes.
    small = big = None
    try:
        if args.no_rss:
            raise _NoRSS
        small = Tunnel(answer.port, "tls=0", min_pool=1, report="1s")
        big = Tunnel(answer.port, "tls=0", min_pool=1 + args.pool, report="1s")
        small.wait_up()
        big.wait_up()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (big.pool("client") >= args.pool and big.pool("server") >= args.pool):
            time.sleep(0.5)
        time.sleep(1.0)
        (s_srv, s_cli), (b_srv, b_cli) = small.rss(), big.rss()
        pools = (small.pool("server"), small.pool("client"), big.pool("server"), big.pool("client"))
    except _NoRSS:
        pools, s_srv, s_cli, b_srv, b_cli = (0, 0, 0, 0), 0, 0, 0, 0
    finally:
        for t in (small, big):
            if t is not None:
                t.close()
    extra = max(1, pools[2] - pools[0])
    per_server = (b_srv - s_srv) / extra
    per_client = (b_cli - s_cli) / extra

    # Loopback "direct" throughput swings from round to round (CPU frequency,
    # cache, other load), so ratios are taken within each round -- tunnel and
    # direct measured seconds apart -- and the median over rounds is shown.
    def ratio(name: str, k: str) -> float:
        return statistics.median(
            t[k] / dr[k] for t, dr in zip(per_round[name], per_round["direct"]) if dr[k]
        )

    d = results["direct"]
    print()
    head = "| measure | direct (best) |" + "".join(f" {m} (best) | {m}/direct (median of rounds) |" for m in modes)
    print(head)
    print("|---|---|" + "---|---|" * len(modes))
    for k in keys:
        cells = "".join(f" {results[m][k]:,.2f} | {ratio(m, k):.2f} |" for m in modes)
        print(f"| {k} | {d[k]:,.2f} |{cells}")
    for name in cpu_gb:
        print(
            f"{name}: server+client CPU {cpu_gb[name]:.2f} s per GB relayed (one stream); "
            f"{cpu_conn.get(name, 0) * 1e6:.0f} us per relayed connection"
        )
    if not args.no_rss:
        print(
            f"\nRSS per idle pool connection (pools {pools}): server {per_server / 1024:.1f} KiB, "
            f"client {per_client / 1024:.1f} KiB; min=1 tunnel: server {s_srv / 2**20:.1f} MiB, "
            f"client {s_cli / 2**20:.1f} MiB"
        )
    if args.json:
        print(json.dumps({"results": results, "cpu_s_per_gb": cpu_gb, "cpu_s_per_conn": cpu_conn, "rss_per_pool_conn": [per_server, per_client], "pools": pools}))
    loop.call_soon_threadsafe(loop.stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
