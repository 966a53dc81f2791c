"""The 1.14 certificate-fingerprint exchange and the entry gate (SPEC-1.14 §3.5).

With ``tls`` 1 or 2, each end names one idle pool connection in a
``verify`` signal together with the SHA-256 fingerprint of the tunnel
certificate as it sees it on that connection (the server: its own; the
client: the one the server presented).  The receiver compares it with its
own view.  The *entry* side accepts user traffic only once that check
passed: a man in the middle who terminates the client's TLS with another
certificate is caught there.

Where Go v1.14.0 is fragile we keep its wire behaviour but not its defects:

* we send our own ``verify`` as soon as the control channel is up, so a Go
  peer (whose task fires a report interval later) never picks the same
  pool connection (the "verify collision" of §3.5);
* we never send an empty fingerprint;
* the ID a ``verify`` names is looked up leniently: the comparison needs
  only a certificate view, which the control connection itself offers (in
  1.14 it is a TLS pool connection too), so a missing ID is logged and the
  tunnel stays up;
* a client on ``tls=2`` has already checked the server's certificate
  against its roots; it waits for the server's ``verify`` before sending its
  own and accepts an empty one, which is how a Go ``tls=2`` server (that
  cannot send a fingerprint) and our client still carry traffic;
* the entry gate is bounded: no verified ``verify`` within
  ``3 x NP_REPORT_INTERVAL + NP_POOL_GET_TIMEOUT`` tears the tunnel down
  with a line that says so, instead of a tunnel that silently never
  carries traffic.
"""

from __future__ import annotations

import typing
from typing import Any, Optional

from twisted.internet import defer
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.python.failure import Failure

from nodepass.base.kinds import Role, TLSCode
from nodepass.base.logs import NodeLog
from nodepass.modes.base import TunnelError
from nodepass.pools.tcp import IdlePool
from nodepass.wire import codec
from nodepass.wire.codec import Signal


class GateClosed(TunnelError):
    """The tunnel ended (or the wait ran out) before the gate opened."""


class VerifyGate:
    """Entry-side gate: user connections wait on :meth:`wait` until the
    peer's fingerprint checked out (:meth:`open`) or the tunnel ends
    (:meth:`close`)."""

    def __init__(self, clock: Any):
        self.clock = clock
        self.opened = False
        self.closed_reason = ""
        self._waiters: list[Deferred[None]] = []

    def wait(self, timeout: float) -> Deferred[None]:
        if self.opened:
            return defer.succeed(None)
        if self.closed_reason:
            return defer.fail(GateClosed(self.closed_reason))
        d: Deferred[None] = Deferred(lambda _d: self._waiters.remove(_d) if _d in self._waiters else None)
        self._waiters.append(d)

        def timed_out(failure: Failure) -> None:
            failure.trap(defer.TimeoutError)
            raise GateClosed(f"TLS fingerprint of the peer not verified within {timeout:g}s")

        return d.addTimeout(timeout, self.clock).addErrback(timed_out)

    def open(self) -> None:
        if self.opened or self.closed_reason:
            return
        self.opened = True
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if not d.called:
                d.callback(None)

    def close(self, reason: str) -> None:
        if self.opened or self.closed_reason:
            return
        self.closed_reason = reason
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if not d.called:
                d.errback(GateClosed(reason))


class ExchangeOwner(typing.Protocol):
    """What the exchange needs from its runner (checked structurally)."""

    role: Role
    tls_code: TLSCode
    pool: Optional[IdlePool]

    def own_view(self, conn: Any) -> str:
        """The fingerprint of the tunnel certificate as this end sees it on
        pool connection ``conn`` (None: on the control connection); '' if
        there is none."""

    def send_signal(self, sig: Signal) -> bool:
        """Send on the control channel; False when there is none."""

    def fail(self, message: str) -> None:
        """Tear the tunnel down (the service restarts it)."""


class FingerprintExchange:
    """One tunnel run's ``verify`` exchange; ``gate`` is set on the entry side."""

    def __init__(
        self,
        owner: ExchangeOwner,
        log: NodeLog,
        clock: Any,
        pool_get_timeout: float,
        deadline: float,
        gate: Optional[VerifyGate],
        peer: str = "",
    ):
        self.owner = owner
        self.peer = peer  # the control connection's far end, for debug lines
        self.log = log
        self.clock = clock
        self.pool_get_timeout = pool_get_timeout
        self.gate = gate
        self.sent = False
        self.sent_id = ""  # the pool connection our own verify named (and closed)
        self.verified = False
        self._deadline: Any = None
        if gate is not None and deadline > 0:
            self._deadline = clock.callLater(deadline, self._too_late, deadline)

    @property
    def _is_server(self) -> bool:
        return self.owner.role is Role.SERVER

    def start(self) -> None:
        """The control channel is up: send ours, unless we are a ``tls=2``
        client, which answers the server's first (see the module docstring)."""
        self.log.info("TLS certificate fingerprint verifying...")
        if self._is_server or self.owner.tls_code != TLSCode.CERT_FILES:
            self._send_soon()

    def stop(self, reason: str = "tunnel stopped") -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        if self.gate is not None:
            self.gate.close(reason)

    def _too_late(self, deadline: float) -> None:
        self._deadline = None
        if not self.verified:
            self.owner.fail(
                f"TLS certificate fingerprint not verified within {deadline:g}s: the peer sent no valid verify signal"
            )

    # -- ours -------------------------------------------------------------
    def _send_soon(self) -> None:
        if self.sent:
            return
        self.sent = True
        ensureDeferred(self._send()).addErrback(self._send_failed)

    async def _send(self) -> None:
        pool = self.owner.pool
        assert pool is not None  # made before the control channel
        try:
            pool_id, conn = await pool.incoming_get(self.pool_get_timeout)
        except Exception as e:  # noqa: BLE001
            self.owner.fail(f"incomingVerify: incomingGet failed: {e}")
            return
        fp = self.owner.own_view(conn)
        try:
            if not fp:
                self.owner.fail(f"incomingVerify: pool connection {pool_id} shows no TLS certificate")
                return
            self.sent_id = pool_id
            if self.owner.send_signal(Signal(codec.VERIFY, "", pool_id, fp)):
                self.log.debug("TLS verify signal: cid %s -> %s", pool_id, self.peer)
        finally:
            if conn.transport is not None and not conn.lost:
                conn.transport.loseConnection()

    def _send_failed(self, failure: Failure) -> None:
        self.log.error("TLS verify signal not sent: %s", failure.getErrorMessage())

    # -- theirs -----------------------------------------------------------
    def received(self, sig: Signal) -> None:
        """The peer's ``verify`` signal."""
        self.log.debug("TLS verify signal: cid %s <- %s", sig.id, self.peer)
        pool = self.owner.pool
        conn = pool.take(sig.id) if pool is not None and sig.id else None
        mine = self.owner.own_view(conn) if conn is not None else ""
        mine = mine or self.owner.own_view(None)
        try:
            self._check(sig.fp, mine)
        finally:
            if conn is not None:
                if conn.transport is not None and not conn.lost:
                    conn.transport.loseConnection()
            elif pool is not None and sig.id and sig.id != self.sent_id:
                # (Both ends may name the same connection when both send at
                # once: ours is closed already.)
                self._close_later(pool, sig.id)
        if not self._is_server and sig.fp:
            # A tls=2 client answers now.  Not after an empty one: a Go
            # tls=2 server tears its tunnel down on any verify it receives.
            self._send_soon()

    def _check(self, theirs: str, mine: str) -> None:
        tls2_client = not self._is_server and self.owner.tls_code == TLSCode.CERT_FILES
        if not theirs:
            if tls2_client:
                # A Go tls=2 server cannot name its certificate; ours was
                # already verified against the roots by the TLS handshake.
                self.log.warn(
                    "TLS verify signal without a fingerprint (a Go 1.14 server with tls=2): "
                    "relying on the certificate verification of tls=2"
                )
                self._passed("")
                return
            self.owner.fail("outgoingVerify: no fingerprint in signal")
            return
        if not mine:
            self.owner.fail("outgoingVerify: no local certificate")
            return
        if theirs != mine:
            server, client = (mine, theirs) if self._is_server else (theirs, mine)
            self.owner.fail(f"outgoingVerify: certificate fingerprint mismatch: server: {server} - client: {client}")
            return
        self._passed(mine)

    def _passed(self, fp: str) -> None:
        if not self.verified:
            self.verified = True
            if fp:
                self.log.info("TLS certificate fingerprint verified: %s", fp)
            if self._deadline is not None and self._deadline.active():
                self._deadline.cancel()
            self._deadline = None
        if self.gate is not None:
            self.gate.open()

    def _close_later(self, pool: IdlePool, pool_id: str) -> None:
        """The named connection is not (yet) idle here: close it when it
        comes; a miss is only worth a debug line (see the module docstring)."""
        d = pool.outgoing_get(pool_id, self.pool_get_timeout)

        def got(result: tuple[str, Any]) -> None:
            conn = result[1]
            if conn.transport is not None and not conn.lost:
                conn.transport.loseConnection()

        def missed(failure: Failure) -> None:
            self.log.debug("TLS verify signal names pool connection %s, which never came: %s", pool_id, failure.getErrorMessage())

        d.addCallbacks(got, missed)

