"""Interop with a peer on Go's TLS stack: ``tests/gopeer/main.go``, a small
dual-end peer written in Go from SPEC.md (not Go NodePass, and sharing no
code with ours), built here with the Go toolchain (``.ci/run`` installs
Debian's ``golang-go``).  Our server with a Go client and our client with a
Go server, both flows, over TLS 1.3 from ``crypto/tls`` and over plain TCP;
and the QUIC pool against quic-go (Debian's ``golang-github-lucas-clemente-
quic-go-dev``, the library Go NodePass's QUIC pool is built on, here an older
release)."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil

from twisted.internet import utils
from twisted.trial import unittest

from tests.helpers import free_port, service_up, wait_for
from tests.procs import REPO, spawn
from tests.test_tunnel import FAST, TunnelMixin, d, echo_roundtrip, udp_roundtrip

KEY = "g0peer"
GOPATH = "/usr/share/gocode"  # where Debian's Go library packages put their sources
QUIC_GO = os.path.join(GOPATH, "src", "github.com", "lucas-clemente", "quic-go")
SOURCES = os.path.join(REPO, "tests", "gopeer")
#: Built peers, shared by every test process of a run (and later runs):
#: one folder per hash of the peer's sources, so a changed peer is rebuilt.
CACHE = os.path.join(REPO, ".test-cache")
_built: dict[str, str] = {}


def _find_go():
    for candidate in (shutil.which("go"), "/usr/lib/go/bin/go"):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


def _missing(quic: bool) -> list[str]:
    """Debian packages the peer needs that this machine lacks."""
    missing = [] if _find_go() else ["golang-go"]
    if quic and not os.path.isdir(QUIC_GO):
        missing.append("golang-github-lucas-clemente-quic-go-dev")
    return missing


def _sources_hash(files: list[str], tags: list[str]) -> str:
    h = hashlib.sha256(" ".join(tags).encode())
    for path in files:
        with open(path, "rb") as f:
            h.update(os.path.basename(path).encode() + b"\0" + f.read())
    return h.hexdigest()[:16]


async def gopeer(quic: bool = False) -> str:
    """The peer's binary (with the QUIC pool when ``quic``), built once per
    version of its sources into ``.test-cache``; the test workers of a run
    take turns with a file lock, so only the first one builds.  The Go
    toolchain and quic-go come from Debian's packages, which ``.ci/run``
    installs; a test never installs packages itself."""
    name = "gopeer-quic" if quic else "gopeer"
    if name in _built:
        return _built[name]
    missing = _missing(quic)
    if missing:
        raise AssertionError(
            f"the Go peer needs Debian's {' and '.join(missing)}: run .ci/run once (it installs them with apt-get)"
        )
    files = [os.path.join(SOURCES, "main.go")]
    tags = []
    if quic:
        files.append(os.path.join(SOURCES, "quic.go"))
        tags = ["quic"]
    out_dir = os.path.join(CACHE, f"{name}-{_sources_hash(files, tags)}")
    exe = os.path.join(out_dir, name)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(CACHE, "build.lock"), "w") as lock:
        # Blocking here is brief and only ever waits for the other worker's
        # build of the same peer (a few seconds, once per source version).
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(exe):
            env = dict(os.environ, GOCACHE=os.path.join(CACHE, "go-build"), GO111MODULE="off", CGO_ENABLED="0",
                       GOPATH=GOPATH)
            env.setdefault("HOME", CACHE)
            args = ["build", "-o", exe + ".tmp"] + (["-tags", ",".join(tags)] if tags else []) + files
            out, err, code = await utils.getProcessOutputAndValue(_find_go(), args, env=env, path=REPO)
            if code != 0:
                raise AssertionError(f"go build failed ({code}): {err.decode(errors='replace')}")
            os.replace(exe + ".tmp", exe)
    _built[name] = exe
    return exe


class GoPeerTests(TunnelMixin, unittest.TestCase):
    # The first test of a run builds the peer (about 10 s for the QUIC one).
    timeout = 120

    async def go(self, *args: str, quic: bool = False):
        return spawn(self, list(args), executable=await gopeer(quic))

    async def py_server(self, target: str, query: str):
        return await self.start_server(target, query, key=KEY)

    async def py_client(self, target: str, key: str = KEY, wait: bool = True, name: str = "client"):
        svc = self._service(
            "client", f"client://{key}@127.0.0.1:{self.tunnel_port}/{target}?mode=2&min=8&log=debug", FAST
        )
        if wait:
            await service_up(svc, name)
        return svc

    async def _echo(self, entry: int, size: int = 1 << 20) -> None:
        payload = os.urandom(size)
        got = await echo_roundtrip(entry, payload, timeout=20)
        self.assertEqual(hashlib.sha256(got).hexdigest(), hashlib.sha256(payload).hexdigest())

    # -- our server, Go client ---------------------------------------------------
    @d
    async def test_our_server_go_client_reverse_tls1(self):
        tport, uport = self.echo_targets()
        entry = free_port()
        server = await self.py_server(f"127.0.0.1:{entry}", "&mode=1&tls=1")
        peer = await self.go("client", "-tunnel", f"127.0.0.1:{self.tunnel_port}", "-key", KEY,
                             "-target", f"127.0.0.1:{tport}")
        await peer.wait_for(r"CONFIG np://0@1024/-#1")
        # Go's crypto/tls sees the certificate our server logs
        m = await peer.wait_for(r"VERIFIED (sha256:[0-9A-F:]+)")
        self.assertEqual(m.group(1), server.runner.creds.fingerprint)
        self.assertTrue(self.logged("server", f"TLS cert verified: {m.group(1)}"))
        await self._echo(entry)
        self.assertEqual(await udp_roundtrip(entry, [b"go-1", b"go-2"]), [b"go-1", b"go-2"])
        # pongs from the Go peer become CHECK_POINT lines
        await wait_for(lambda: self.logged("server", "CHECK_POINT|MODE=1|PING="), what="checkpoint")
        self.assertNotIn("ERROR", peer.text())

    @d
    async def test_our_server_go_client_forward_plain(self):
        tport, _ = self.echo_targets()
        entry = free_port()
        await self.py_server(f"127.0.0.1:{tport}", "&mode=2&tls=0")
        peer = await self.go("client", "-tunnel", f"127.0.0.1:{self.tunnel_port}", "-key", KEY,
                             "-entry", f"127.0.0.1:{entry}")
        await peer.wait_for(r"CONFIG np://0@1024/\+#0")
        await peer.wait_for("READY")
        await wait_for(lambda: _listening(entry), what="Go entry listening")
        await self._echo(entry)
        for i in range(20):
            self.assertEqual(await echo_roundtrip(entry, b"short-%d" % i), b"short-%d" % i)

    @d
    async def test_our_server_denies_go_client_with_wrong_key(self):
        tport, _ = self.echo_targets()
        await self.py_server(f"127.0.0.1:{free_port()}", "&mode=1&tls=1")
        peer = await self.go("client", "-tunnel", f"127.0.0.1:{self.tunnel_port}", "-key", "wrong",
                             "-target", f"127.0.0.1:{tport}")
        self.assertEqual(await peer.ended, 1)
        self.assertIn("ERROR handshake", peer.text())
        await wait_for(lambda: self.logged("server", "Tunnel access denied: 127.0.0.1:"), what="denied line")

    # -- Go server, our client ---------------------------------------------------
    @d
    async def test_go_server_our_client_reverse_tls1(self):
        tport, _ = self.echo_targets()
        entry = free_port()
        self.tunnel_port = free_port()
        peer = await self.go("server", "-tunnel", f"127.0.0.1:{self.tunnel_port}", "-key", KEY, "-flow", "-",
                             "-tls", "1", "-entry", f"127.0.0.1:{entry}")
        cert = (await peer.wait_for(r"CERT (sha256:[0-9A-F:]+)")).group(1)
        await peer.wait_for("LISTENING")
        client = await self.py_client(f"127.0.0.1:{tport}")
        self.assertEqual(client.runner.tls_code, 1)
        await wait_for(lambda: self.logged("client", f"TLS cert verified: {cert}"), what="client verify line")
        await self._echo(entry)
        await self._echo(entry, 64 * 1024)
        await wait_for(lambda: self.logged("client", "CHECK_POINT|MODE=2|PING="), what="checkpoint")
        self.assertNotIn("ERROR", peer.text())

    @d
    async def test_go_server_our_client_forward_tls1(self):
        tport, _ = self.echo_targets()
        entry = free_port()
        self.tunnel_port = free_port()
        peer = await self.go("server", "-tunnel", f"127.0.0.1:{self.tunnel_port}", "-key", KEY, "-flow", "+",
                             "-tls", "1", "-target", f"127.0.0.1:{tport}")
        await peer.wait_for("LISTENING")
        client = await self.py_client(f"127.0.0.1:{entry}")
        self.assertEqual(client.runner.flow, "+")
        await self._echo(entry)
        for i in range(20):
            self.assertEqual(await echo_roundtrip(entry, b"short-%d" % i), b"short-%d" % i)
        # our pool connections resumed Go's TLS 1.3 session tickets
        from nodepass.compat.openssl_internals import session_reused

        idle = list(client.runner.pool.idle.values())
        self.assertTrue(idle)
        self.assertGreater(sum(session_reused(c.transport.getHandle()) for c in idle), 0)

    @d
    async def test_go_server_refuses_our_wrong_key(self):
        self.tunnel_port = free_port()
        peer = await self.go("server", "-tunnel", f"127.0.0.1:{self.tunnel_port}", "-key", KEY, "-flow", "+",
                             "-tls", "0", "-target", "127.0.0.1:9")
        await peer.wait_for("LISTENING")
        await self.py_client(f"127.0.0.1:{free_port()}", key="wrong", wait=False)
        await wait_for(lambda: self.logged("client", "refused our tunnel key"), timeout=10, what="refusal")
        await peer.wait_for("DENIED 127.0.0.1:")


    # -- QUIC pool against quic-go -----------------------------------------------
    @d
    async def test_our_quic_server_quic_go_client(self):
        """Our server's QUIC pool (aioquic) with a quic-go client: ALPN,
        TLS 1.3, the 0x00 byte and 4-byte IDs, verify, TCP and UDP."""
        tport, _ = self.echo_targets()
        entry = free_port()
        server = await self.py_server(f"127.0.0.1:{entry}", "&mode=1&quic=1")
        peer = await self.go("client", "-tunnel", f"127.0.0.1:{self.tunnel_port}", "-key", KEY,
                             "-target", f"127.0.0.1:{tport}", quic=True)
        await peer.wait_for(r"CONFIG np://1@1024/-#1")
        await peer.wait_for(r"QUIC np-quic")
        m = await peer.wait_for(r"VERIFIED (sha256:[0-9A-F:]+)")
        self.assertEqual(m.group(1), server.runner.creds.fingerprint)
        await self._echo(entry)
        for i in range(20):
            self.assertEqual(await echo_roundtrip(entry, b"q-%d" % i), b"q-%d" % i)
        self.assertEqual(await udp_roundtrip(entry, [b"quic-udp"]), [b"quic-udp"])
        self.assertNotIn("ERROR", peer.text())

    @d
    async def test_quic_go_server_our_quic_client(self):
        """A quic-go server's pool with our client (aioquic): both flows'
        exit and entry roles over QUIC streams."""
        tport, _ = self.echo_targets()
        entry = free_port()
        self.tunnel_port = free_port()
        peer = await self.go("server", "-tunnel", f"127.0.0.1:{self.tunnel_port}", "-key", KEY, "-flow", "+",
                             "-tls", "1", "-quic", "-target", f"127.0.0.1:{tport}", quic=True)
        cert = (await peer.wait_for(r"CERT (sha256:[0-9A-F:]+)")).group(1)
        await peer.wait_for("LISTENING")
        client = await self.py_client(f"127.0.0.1:{entry}")
        self.assertTrue(client.runner.quic)
        await wait_for(lambda: self.logged("client", f"TLS cert verified: {cert}"), what="client verify line")
        await self._echo(entry)
        for i in range(20):
            self.assertEqual(await echo_roundtrip(entry, b"q-%d" % i), b"q-%d" % i)
        self.assertNotIn("ERROR", peer.text())

    @d
    async def test_quic_go_server_reverse_our_quic_client(self):
        tport, _ = self.echo_targets()
        entry = free_port()
        self.tunnel_port = free_port()
        peer = await self.go("server", "-tunnel", f"127.0.0.1:{self.tunnel_port}", "-key", KEY, "-flow", "-",
                             "-tls", "1", "-quic", "-entry", f"127.0.0.1:{entry}", quic=True)
        await peer.wait_for("LISTENING")
        client = await self.py_client(f"127.0.0.1:{tport}")
        await wait_for(lambda: client.runner.pool.idle_count() > 0, what="QUIC pool up")
        await wait_for(lambda: _listening(entry), what="Go entry listening")
        await self._echo(entry)
        self.assertNotIn("ERROR", peer.text())


def _listening(port: int) -> bool:
    import socket

    s = socket.socket()
    try:
        s.settimeout(0.2)
        s.connect(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()
