#!/usr/bin/env python3
"""Short connections through a real HTTP client and server (not a test).

``wrk -t1 -c20 -d4s -H 'Connection: close'`` against a local nginx serving
a 6-byte page, through each path, compared in the same run with a direct
connection to nginx:

* ``direct``: wrk -> nginx;
* ``single``: the single-end forwarder (``client://127.0.0.1:P/127.0.0.1:NGINX?mode=1``);
* ``tls=0`` / ``tls=1``: a dual-end tunnel, server in reverse mode with the
  default pool (``server://...?mode=1&tls=N`` + ``client://...?mode=2``),
  the same two processes as ``bench/bench_tunnel.py``.  Any other server
  query works the same way: ``type=1`` (QUIC), ``type=3`` (HTTP/2),
  ``tls=1&type=2`` (WebSocket), ``quic=1&wire=1.12``.

Then "one connection at a time": connect, ``GET /``, read to EOF, close,
for 200 tries per path (p50).  Rounds are interleaved (every path once per
round); ratios are taken within each round and the median over rounds is
shown, with the median absolute figures beside them.

    python3 bench/bench_http.py [--rounds 3] [--seconds 4] [--connections 20] [--tries 200]
                                [--paths direct,single,tls=0,tls=1] [--trees DIR,DIR]
                                [--target-host 127.0.0.1|localhost] [--json]

``--trees`` compares code: each directory holds a ``nodepass/`` package
(say ``git worktree add /tmp/before COMMIT``), every path but ``direct``
runs once per tree in each round (labelled ``path@DIR``), so the trees are
measured interleaved on the same machine state.

``wrk`` and nginx (``nginx-light``) are installed with apt-get when missing.
nginx runs on 127.0.0.1 with a configuration, document root, logs and
temporary paths in a temporary directory.  The tunnels are separate
processes (``python3 -m nodepass.cli URL``); to profile them set
``NP_BENCH_PROFILE``, e.g. ``NP_BENCH_PROFILE="-m cProfile -o /tmp/np-{name}.prof"``
(``{name}`` becomes the process's role and port, so each one writes its own
file when it is stopped).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_single  # noqa: E402 - sibling script
import bench_tunnel  # noqa: E402 - sibling script
from bench_single import free_port, start_nodepass, stop, wait_listening  # noqa: E402 - sibling script
from bench_tunnel import Tunnel  # noqa: E402 - sibling script

PAGE = b"hello\n"  # the 6-byte page
NGINX = "/usr/sbin/nginx"


def ensure_tools() -> None:
    """wrk and nginx from Debian, installed when missing (the benchmark may
    install; tests never do)."""
    missing = []
    if shutil.which("wrk") is None:
        missing.append("wrk")
    if not os.path.exists(NGINX):
        missing.append("nginx-light")
    if not missing:
        return
    print(f"installing {' '.join(missing)} with apt-get ...", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", *missing]
    if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL, check=True)
        subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, check=True)


class Nginx:
    """nginx on 127.0.0.1 (one worker), everything under a temporary dir."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="np-bench-nginx-")
        os.chmod(self.dir, 0o755)  # a worker may run as nobody
        root = os.path.join(self.dir, "www")
        os.mkdir(root)
        os.chmod(root, 0o755)
        with open(os.path.join(root, "index.html"), "wb") as f:
            f.write(PAGE)
        self.port = free_port()
        d = self.dir
        conf = f"""
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    default_type text/html;
    server {{
        listen 127.0.0.1:{self.port} backlog=4096;
        root {root};
        location / {{ index index.html; }}
    }}
}}
"""
        path = os.path.join(d, "nginx.conf")
        with open(path, "w") as f:
            f.write(conf)
        self.proc = subprocess.Popen([NGINX, "-p", d, "-c", path, "-e", f"{d}/error.log"], stderr=subprocess.DEVNULL)
        wait_listening(self.port)

    def close(self) -> None:
        stop(self.proc)
        shutil.rmtree(self.dir, ignore_errors=True)


_RPS = re.compile(r"Requests/sec:\s*([\d.]+)")
_ERRS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


def wrk(port: int, seconds: float, connections: int) -> tuple[float, int]:
    """Requests/s and errors (socket errors other than reads of a closed
    connection, which ``Connection: close`` makes normal, and non-2xx)."""
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "-H", "Connection: close", f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True, check=True,
    ).stdout
    m = _RPS.search(out)
    rps = float(m.group(1)) if m else 0.0
    errors = 0
    e = _ERRS.search(out)
    if e:
        errors += int(e.group(1)) + int(e.group(3)) + int(e.group(4))
    n = _NON2XX.search(out)
    if n:
        errors += int(n.group(1))
    return rps, errors


REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


def one_at_a_time(port: int, tries: int) -> float:
    """p50 in ms of: connect, ``GET /``, read to EOF, close."""
    samples = []
    for _ in range(tries):
        t0 = time.perf_counter()
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(REQUEST)
        got = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
        s.close()
        samples.append((time.perf_counter() - t0) * 1000)
        if not got.endswith(PAGE):
            raise RuntimeError(f"bad answer through port {port}: {got[:200]!r}")
    return statistics.median(samples)


def _cpu_split(pids: list[int]) -> tuple[float, float]:
    """(user, system) CPU seconds of the tunnel processes."""
    times = [psutil.Process(p).cpu_times() for p in pids]
    return sum(t.user for t in times), sum(t.system for t in times)


class _CodeFrom:
    """Within the block, tunnels and forwarders run the ``nodepass``
    package of ``tree`` (None: this checkout's)."""

    def __init__(self, tree: "str | None") -> None:
        self.tree = tree

    def __enter__(self) -> None:
        self.saved = (bench_single.ROOT, bench_tunnel.ROOT)
        if self.tree is not None:
            bench_single.ROOT = bench_tunnel.ROOT = self.tree

    def __exit__(self, *exc: object) -> None:
        bench_single.ROOT, bench_tunnel.ROOT = self.saved


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--connections", type=int, default=20)
    ap.add_argument("--tries", type=int, default=200, help="sequential connections per path and round")
    ap.add_argument("--paths", default="direct,single,tls=0,tls=1",
                    help="comma-separated: direct, single, or a dual-end server query such as tls=0")
    ap.add_argument("--trees", default="",
                    help="comma-separated directories, each holding a nodepass/ package: compare them, interleaved")
    ap.add_argument("--target-host", default="127.0.0.1",
                    help="how a dual-end exit names nginx: an IP, or a name such as localhost (the DNS cache's path)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    ensure_tools()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    kinds = [p.strip() for p in args.paths.split(",") if p.strip()]
    if "direct" not in kinds:
        kinds.insert(0, "direct")
    trees: list = [os.path.abspath(t) for t in args.trees.split(",") if t.strip()] or [None]
    for tree in trees:
        if tree is not None and not os.path.isdir(os.path.join(tree, "nodepass")):
            sys.stderr.write(f"bench_http: {tree} holds no nodepass/ package\n")
            return 2
    # (label, kind, tree): each path but direct once per tree
    plan = [("direct", "direct", None)] + [
        (k if tree is None else f"{k}@{tree}", k, tree) for k in kinds if k != "direct" for tree in trees
    ]
    paths = [label for label, _, _ in plan]
    nginx = Nginx()
    ports: dict[str, int] = {}
    pids: dict[str, list[int]] = {}
    procs: list = []
    tunnels: list[Tunnel] = []
    rows: dict[str, list[dict[str, float]]] = {p: [] for p in paths}
    try:
        for p, kind, tree in plan:
            if kind == "direct":
                ports[p] = nginx.port
                pids[p] = []
            elif kind == "single":
                with _CodeFrom(tree):
                    proc, port = start_nodepass(nginx.port)
                procs.append(proc)
                ports[p], pids[p] = port, [proc.pid]
            else:
                with _CodeFrom(tree):
                    t = Tunnel(nginx.port, kind, target_host=args.target_host)
                tunnels.append(t)
                t.wait_up()  # an HTTP error answer is an answer: the path is up
                ports[p], pids[p] = t.entry, [t.server.pid, t.client.pid]
        for p in paths:
            one_at_a_time(ports[p], 5)  # warm up: first connections, pools
        for rnd in range(args.rounds):
            for p in paths:
                u0, s0 = _cpu_split(pids[p])
                rps, errors = wrk(ports[p], args.seconds, args.connections)
                u1, s1 = _cpu_split(pids[p])
                used = (u1 - u0) + (s1 - s0)
                p50 = one_at_a_time(ports[p], args.tries)
                n = rps * args.seconds
                got = {"req/s": rps, "errors": errors, "p50 ms": p50,
                       "cpu us/req": used / n * 1e6 if rps and pids[p] else 0.0,
                       "user us/req": (u1 - u0) / n * 1e6 if rps and pids[p] else 0.0,
                       "sys us/req": (s1 - s0) / n * 1e6 if rps and pids[p] else 0.0}
                rows[p].append(got)
                print(
                    f"round {rnd + 1} {p:8s} {rps:9,.0f} req/s  errors {errors}  p50 {p50:.3f} ms"
                    + (f"  tunnel CPU {got['cpu us/req']:.0f} us/req "
                       f"(user {got['user us/req']:.0f}, system {got['sys us/req']:.0f})" if pids[p] else ""),
                    flush=True,
                )
    finally:
        for t in tunnels:
            t.close()
        for proc in procs:
            stop(proc)
        nginx.close()

    direct = rows["direct"]

    def med(p: str, k: str) -> float:
        return statistics.median(r[k] for r in rows[p])

    def ratio(p: str, k: str) -> float:
        return statistics.median(r[k] / d[k] for r, d in zip(rows[p], direct) if d[k])

    print()
    print(f"wrk -t1 -c{args.connections} -d{args.seconds:g}s -H 'Connection: close', 6-byte page; "
          f"{args.rounds} interleaved rounds, medians; one at a time: p50 of {args.tries} per round")
    print()
    print("| path | req/s | / direct | errors | one at a time p50 ms | / direct | tunnel CPU µs/req |")
    print("|---|---|---|---|---|---|---|")
    for p in paths:
        cpu = f"{min(r['cpu us/req'] for r in rows[p]):.0f}" if pids[p] else "—"
        print(
            f"| {p} | {med(p, 'req/s'):,.0f} | {ratio(p, 'req/s'):.2f} | {sum(r['errors'] for r in rows[p]):.0f} "
            f"| {med(p, 'p50 ms'):.3f} | {ratio(p, 'p50 ms'):.2f} | {cpu} |"
        )
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
