"""Zero-copy relaying of plain TCP pairs with Linux ``splice(2)``.

A relayed byte normally crosses user space twice per process: ``recv`` into
a Python buffer, ``send`` out of it.  For a pair of plain TCP sockets the
kernel can move the data itself: ``splice`` from the source socket into a
pipe, and from the pipe into the destination socket.  Each direction of a
spliced pair gets its own pipe.

Flow control stays Twisted's: while the pipe holds bytes the destination
did not take, the source stops reading (a ``PauseGate`` reason) and the
destination watches for writability; the destination's own Twisted buffer
(early data, a PROXY header) always goes out first, and a destination asked
to close does so only once its pipe is empty.

Used for dual-end tunnel relays without a rate limit or idle timeout (those
need to see each chunk); everything else keeps the relay core's path.
Set ``NP_NO_SPLICE=1`` to turn it off.  Taking over a connection's
``doRead``/``doWrite`` and looking into Twisted's write buffer reach under
Twisted's API: ``nodepass.compat.twisted_internals`` holds both.
"""

from __future__ import annotations

import fcntl
import os
from collections import deque
from typing import Any, Callable, Optional

from twisted.python import log

from nodepass.compat.twisted_internals import (
    CONNECTION_DONE,
    CONNECTION_LOST,
    is_plain_tcp,
    queued_bytes,
    replace_do_read,
    replace_do_write,
)
from nodepass.relay.core import Relay, RelayEnd

AVAILABLE = hasattr(os, "splice") and hasattr(os, "pipe2")
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20
CHUNK = 1 << 20
#: A relay switches to splice this long after it starts (callers schedule
#: it), so request/answer connections never pay for the pipes.
DELAY = 0.05


class _Direction:
    """Bytes from ``src`` to ``dst`` through one pipe."""

    __slots__ = ("src", "dst", "r", "w", "pending", "count")

    def __init__(self, src: RelayEnd, dst: RelayEnd, count: Callable[[int], None]):
        self.src = src
        self.dst = dst
        self.count = count
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.w, _F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass  # the default 64 KiB pipe still works, just more calls
        self.pending = 0

    def install(self) -> None:
        src_t, dst_t = self.src.transport, self.dst.transport
        src_fd = src_t.fileno()
        dst_fd = dst_t.fileno()
        splice, flags, w, r = os.splice, _FLAGS, self.w, self.r
        count = self.count
        gate = self.src.gate
        assert gate is not None, "splice of an unconnected end"

        def push() -> None:
            """Move what the pipe holds into ``dst`` (in order after any
            bytes Twisted still buffers for it)."""
            if queued_bytes(dst_t):
                gate.pause("pipe")
                dst_t.startWriting()
                return
            pending = self.pending
            while pending:
                try:
                    pending -= splice(r, dst_fd, pending, flags=flags)
                except BlockingIOError:
                    break
                except OSError:
                    pending = 0  # dst is gone; its connectionLost follows
            self.pending = pending
            if pending:
                gate.pause("pipe")
                dst_t.startWriting()
            else:
                gate.resume("pipe")

        def do_read() -> object:
            if self.pending:
                return None
            try:
                n = splice(src_fd, w, CHUNK, flags=flags)
            except BlockingIOError:
                return None
            except OSError:
                return CONNECTION_LOST
            if not n:
                return CONNECTION_DONE
            count(n)
            self.pending = n
            push()
            return None

        def writer(orig_write: Callable[[], object]) -> Callable[[], object]:
            def do_write() -> object:
                if queued_bytes(dst_t):
                    result = orig_write()
                    if result is not None or queued_bytes(dst_t):
                        return result
                if self.pending:
                    push()
                    if self.pending:
                        dst_t.startWriting()
                        return None
                # Nothing of ours left: Twisted's own bookkeeping (stop
                # writing, resume its producer, finish a requested close).
                return orig_write()

            return do_write

        replace_do_read(src_t, do_read)
        replace_do_write(dst_t, writer)

    def close(self) -> None:
        for fd in (self.r, self.w):
            try:
                os.close(fd)
            except OSError:
                pass


def try_splice(relay: Relay) -> bool:
    """Switch a started relay of two plain TCP sockets to ``splice``.
    Returns False (relay untouched) when it does not apply."""
    if not AVAILABLE or os.environ.get("NP_NO_SPLICE") or relay.limiter is not None or relay.idle:
        return False
    a, b = relay.target, relay.tunnel
    if relay.closed or a.lost or b.lost:
        return False
    if not (is_plain_tcp(a.transport) and is_plain_tcp(b.transport)):
        return False
    stats = relay.stats

    def rx(n: int) -> None:  # read from the target side
        stats.tcp_rx += n

    def tx(n: int) -> None:  # written to the target side
        stats.tcp_tx += n

    try:
        up = _Direction(a, b, rx)
    except OSError:
        return False
    try:
        down = _Direction(b, a, tx)
    except OSError:
        up.close()
        return False
    up.install()
    down.install()
    lost: list[int] = []

    def one_lost(_reason: object) -> None:
        lost.append(1)
        if len(lost) == 2:
            up.close()
            down.close()

    a.on_lost(one_lost)
    b.on_lost(one_lost)
    return True


class SpliceLater:
    """Calls :func:`try_splice` on each relay :data:`DELAY` after it was
    added, with one timer for all of them (not a delayed call per relayed
    connection, which short exchanges would set up and cancel for
    nothing).  Relays that are over by then are skipped."""

    def __init__(self, clock: Any):
        self.clock = clock
        self._queue: deque[tuple[float, Relay]] = deque()
        self._call: Optional[Any] = None
        self._stopped = False

    def add(self, relay: Relay) -> None:
        if self._stopped:
            return
        self._queue.append((self.clock.seconds() + DELAY, relay))
        if self._call is None:
            self._call = self.clock.callLater(DELAY, self._run)

    def _run(self) -> None:
        self._call = None
        now = self.clock.seconds()
        queue = self._queue
        while queue and queue[0][0] <= now:
            relay = queue.popleft()[1]
            if not relay.closed:
                try:
                    try_splice(relay)
                except Exception:  # noqa: BLE001 - one relay must not stop the others'
                    log.err(None, "switching a relay to splice(2)")
        if queue:
            self._call = self.clock.callLater(max(0.0, queue[0][0] - now), self._run)

    def stop(self) -> None:
        """Forget every relay and the timer (the runner stops)."""
        self._stopped = True
        self._queue.clear()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
