"""The parts of Twisted below its public API that nodepass relies on.

Each one buys speed or a behaviour the public API does not offer (see
docs/benchmarks.md for the figures); ``tests/test_compat.py`` checks every
name here against the installed Twisted:

* a ``FileDescriptor``'s write buffers -- ``_tempDataLen`` (bytes waiting to
  be joined), ``dataBuffer`` and ``offset`` (the send buffer and how much of
  it went out): when all are empty, the relay may ``send`` on the socket
  itself instead of waiting a reactor turn for Twisted's ``doWrite``;
* the ``socket`` of a TCP connection (present until it is closed) or of a
  UDP port (``send``, ``sendmsg`` and ``recv_into`` on it);
* replacing a connection's ``doRead``/``doWrite``: the reactor calls the
  instance attribute; a replacement returns None, :data:`CONNECTION_DONE`
  or :data:`CONNECTION_LOST`, as Twisted's own do;
* ``FileDescriptor.write`` called on a TCP connection that runs TLS
  (``startTLS``): it queues raw bytes under the TLS layer, where the
  connection's own ``write`` would encrypt them again;
* ``reactor._exitSignal``, the signal twistd re-raises at exit;
* the ``ApplicationRunner`` of a running twistd, found up the call stack;
* ``twisted.web``'s HTTP channel: the real ``HTTPChannel`` behind the
  ``_GenericHTTPChannelProtocol`` proxy a ``Site`` builds (``_channel``),
  and its ``_waitingForTransport`` flag (the transport's buffer is full
  and the channel has paused its producers already).

The TLS layer's internals are in :mod:`nodepass.compat.twisted_tls`: this
module imports nothing of TLS, so that a process without TLS (see
:mod:`nodepass.compat.tls_less`) can use it.

Hot paths bind what they need once per connection; the per-chunk checks
are :func:`operator.attrgetter` objects, which read several attributes in
one C call (no Python frame)."""

from __future__ import annotations

import sys
from operator import attrgetter
from types import FrameType, MethodType
from typing import Any, Callable, Mapping, Optional, Sequence

from twisted.internet import main, tcp
from twisted.internet.abstract import FileDescriptor

#: What a ``doRead``/``doWrite`` returns when the peer closed cleanly ...
CONNECTION_DONE = main.CONNECTION_DONE
#: ... and when the connection failed.
CONNECTION_LOST = main.CONNECTION_LOST

# -- TCP connections ---------------------------------------------------------

#: ``(joined-later bytes, offset, send buffer)`` of a ``FileDescriptor``:
#: nothing is queued when the first is 0 and the offset is the buffer's length.
write_buffers: Callable[[Any], tuple[int, int, bytes]] = attrgetter("_tempDataLen", "offset", "dataBuffer")


def queued_bytes(transport: Any) -> int:
    """Bytes a Twisted ``FileDescriptor`` holds in user space, not yet
    written (0 for anything else)."""
    if not isinstance(transport, FileDescriptor):
        return 0
    temp, offset, buffer = write_buffers(transport)
    return temp + len(buffer) - offset


def is_plain_tcp(transport: Any) -> bool:
    """An open TCP connection without TLS: its socket can be used directly."""
    return isinstance(transport, tcp.Connection) and not getattr(transport, "TLS", False) and hasattr(transport, "socket")


def socket_of(transport: Any) -> Any:
    """The socket of an open TCP connection or UDP port, else None."""
    return getattr(transport, "socket", None)


def unsent(transport: Any, data: Any) -> Any:
    """Send ``data`` straight to a TCP connection's socket when Twisted holds
    nothing queued ahead of it; what the socket did not take (all of it
    when something was queued), for Twisted's buffer."""
    temp, offset, buffer = write_buffers(transport)
    if not temp and offset == len(buffer) and transport.connected and not transport.disconnecting:
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0  # EAGAIN, or an error Twisted's write path will report
        return data[sent:]
    return data


def write_through(transport: Any, data: Any) -> None:
    """Write ``data`` (bytes or a view that must not outlive the call) on a
    plain TCP connection: straight to the socket when Twisted holds nothing
    queued ahead of it, and only what the socket did not take is copied into
    Twisted's buffer (whose size still drives the producer pause)."""
    rest = unsent(transport, data)
    if rest:
        transport.write(bytes(rest))


def write_parts_through(transport: Any, parts: Sequence[Any]) -> None:
    """:func:`write_through` for several pieces (bytes or views that must
    not outlive the call) that go out together, as one ``sendmsg`` when
    Twisted holds nothing queued ahead of them."""
    temp, offset, buffer = write_buffers(transport)
    if not temp and offset == len(buffer) and transport.connected and not transport.disconnecting:
        try:
            sent = transport.socket.sendmsg(parts)
        except OSError:
            sent = 0  # EAGAIN, or an error Twisted's write path will report
        if sent:
            rest = []
            for part in parts:
                size = len(part)
                if sent >= size:
                    sent -= size
                    continue
                rest.append(part[sent:] if sent else part)
                sent = 0
            parts = rest
    for part in parts:
        transport.write(bytes(part))


def write_under_tls(transport: Any) -> Callable[[bytes], None]:
    """``FileDescriptor.write`` bound to a TCP connection that runs TLS:
    queues ciphertext we made ourselves without encrypting it again."""
    return MethodType(FileDescriptor.write, transport)


def read_into(transport: Any, view: memoryview, deliver: Callable[[Any, memoryview], None], source: Any) -> None:
    """Take over the reading of an open TCP connection: each time it is
    readable, read up to its ``bufferSize`` into ``view`` (not a new
    ``bytes`` per read, as Twisted's ``doRead`` makes) and call
    ``deliver(source, chunk)`` with a view of what came, which must not be
    kept past the call.  End of stream and errors end the connection as
    Twisted's own ``doRead`` would."""
    recv_into = transport.socket.recv_into
    size = min(transport.bufferSize, len(view))

    def doRead() -> object:
        try:
            n = recv_into(view, size)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return CONNECTION_LOST
        if not n:
            return CONNECTION_DONE
        deliver(source, view[:n])
        return None

    transport.doRead = doRead


def replace_do_read(transport: Any, do_read: Callable[[], object]) -> None:
    """Have the reactor call ``do_read`` when ``transport`` is readable."""
    transport.doRead = do_read


def replace_do_write(transport: Any, make: Callable[[Callable[[], object]], Callable[[], object]]) -> None:
    """Have the reactor call ``make(original)`` when ``transport`` is
    writable; ``original`` is Twisted's own ``doWrite``, which the
    replacement calls for Twisted's buffer and bookkeeping."""
    transport.doWrite = make(transport.doWrite)


# -- the reactor and twistd --------------------------------------------------


def forget_exit_signal(reactor: Any) -> None:
    """Make twistd exit 0 after a signal-initiated stop: twistd re-raises the
    stopping signal it recorded at exit (status 128+N)."""
    if getattr(reactor, "_exitSignal", None) is not None:
        reactor._exitSignal = None


def running_twistd_config() -> Optional[Mapping]:
    """The options of the twistd run executing our caller, or None.

    twistd gives a ``.tac`` file nothing; its ``ApplicationRunner`` is a
    ``self`` up the stack, and its ``config`` holds the options."""
    from twisted.application.app import ApplicationRunner

    frame: Optional[FrameType] = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, ApplicationRunner):
            return candidate.config
        frame = frame.f_back
    return None


def http_channel_transport(proto: Any) -> Any:
    """The transport of an HTTP connection a ``Site`` built: the proxy
    ``Site`` hands out has none of its own; the channel behind it has."""
    transport = getattr(proto, "transport", None)
    if transport is None:
        transport = getattr(getattr(proto, "_channel", None), "transport", None)
    return transport


def http_channel_paused(channel: Any) -> bool:
    """Whether an HTTP channel is waiting for its transport to drain: a
    producer registered now is told only of *later* changes, so it must
    start paused."""
    return bool(getattr(channel, "_waitingForTransport", False))

