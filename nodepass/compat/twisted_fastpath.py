"""Lean TCP transports: Twisted's ``tcp.Connection`` without its
per-connection machinery, for the short connections a tunnel relays.

A relayed request/answer connection costs far more in setting up and tearing
down than in moving its bytes (docs/benchmarks.md, run R): Twisted builds a
``tcp.Server`` per accepted socket (log strings, a read registration that
the relay undoes at once), dials through a ``Connector`` and ``tcp.Client``
that connect one reactor turn later, writes on the next turn after a write
registration, and closes on the next turn after two more registration
changes.  The transports here are still Twisted transports -- subclasses of
``tcp.Connection`` registered with the reactor (``addReader``/``addWriter``),
serving ordinary ``Protocol`` objects built by factories, with Twisted's
producer/consumer flow control (``IPushProducer``, ``IConsumer``) and its own
write buffer, ``doRead``, ``doWrite`` and ``connectionLost`` -- and differ
only where that machinery costs and buys nothing:

* :func:`lean_accepts`: a listening port (``reactor.listenTCP``) whose
  accepted sockets become :class:`LeanConnection` transports;
* :func:`lean_connect`: a dial that connects in the caller's turn (loopback
  connections are established by the time ``connect`` returns; others wait
  for writability with a timeout), with Twisted's connect errors; inside a
  :class:`DialBatch` (an accept loop, a read of launch signals, a pool's
  refill) the ``connect`` calls
  are made back to back when the batch ends, so that one wake-up of the
  target's process serves them all;
* a transport starts reading after its protocol's ``makeConnection`` unless
  the protocol paused it (no register-then-unregister), and keeps track of
  its read registration (a pause of a transport that is not reading costs
  nothing);
* it writes straight to its socket when nothing is queued (only the rest is
  buffered, which still pauses the producer as Twisted's buffer does);
* once a relay reads it (:meth:`LeanConnection.relay_reads`), it reads into
  the relay's shared buffer, and a short read of an answer is followed by
  one more ``recv``, which often finds the peer's close in the same reactor
  turn.  An accepted connection does not try to read before the reactor
  says it is readable: under load (``bench/bench_http.py``) that read mostly
  found nothing yet, and reading the requests of a batch of accepted
  connections in the reactor's next turn, together, cost 20 % less CPU per
  request, most of it in the kernel (fewer wake-ups of the target's
  process, each of which interrupts the other core);
* ``loseConnection`` with nothing queued closes without a write
  registration, after the code that asked is done: at the end of the lean
  ``connectionLost`` that asked (one end of a relay went, so the relay
  closes the other), else at the end of the reactor turn;
* ``connectionLost`` closes the socket without ``shutdown`` first and, under
  the epoll reactor, without unregistering it first (closing it does), and
  drops the handlers a relay installed, so that no reference cycle is left
  per connection for the garbage collector; a relay's read that finds the
  peer's close (or an error) ends the connection itself, rather than
  returning the reason for the reactor to unregister the socket first;
* :func:`lean_dispatch`: the epoll reactor of a process nodepass owns
  hands each readiness event to its selectable without building Twisted's
  log context around it (``log.callWithLogger``, about a microsecond per
  event: a tenth of the Python time of a relayed short connection).

This reaches below Twisted's API (it subclasses ``tcp.Connection`` and uses
its buffers, ``tcp.Port``'s socket, factory and ``doRead``); it lives in
``nodepass.compat`` for that reason, and ``tests/test_compat_fastpath.py``
checks what it relies on against the installed Twisted.
"""

from __future__ import annotations

import _socket
import errno
import os
import socket
import struct
import sys
from typing import Any, Callable, Optional

from twisted.internet import address, error, main, tcp
from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.logger import Logger
from twisted.python import failure, log

try:
    from twisted.internet.epollreactor import EPollReactor as _EPOLL
except ImportError:  # no epoll on this platform
    _EPOLL = None  # type: ignore[assignment, misc]

_LINGER_RESET = struct.pack("ii", 1, 0)
#: A socket created non-blocking (no ``ioctl`` after ``socket``).
_STREAM_NONBLOCK = socket.SOCK_STREAM | getattr(socket, "SOCK_NONBLOCK", 0)

_CONNECTION_DONE = failure.Failure(main.CONNECTION_DONE)

#: A read this short, of an answer, is tried once more for the peer's close
#: (bulk transfers read more at a time, and a second ``recv`` would mostly
#: find nothing).
_ANSWER_SIZE = 16384

#: accept(2) errors that are not about one connection: Twisted's own
#: ``doRead`` handles them (it keeps a spare descriptor for EMFILE).
_ACCEPT_RETRY = frozenset((errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR))
#: accept(2) errors of a process out of descriptors (or of kernel memory):
#: Twisted's ``doRead`` closes such a pending connection at once and says
#: so only at INFO; operators get an ERROR line (:func:`_out_of_descriptors`).
_OUT_OF_DESCRIPTORS = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))
#: At most one such line per listening port in this many seconds.
OUT_OF_DESCRIPTORS_EVERY = 5.0
_IN_PROGRESS = frozenset((errno.EINPROGRESS, errno.EALREADY, errno.EWOULDBLOCK))


class _Closer:
    """Closes the connections whose ``loseConnection`` found nothing to
    flush, once their caller's code is done: at the end of the lean
    ``connectionLost`` that asked (the usual case: one end of a relay went,
    so the relay closes the other), else at the end of the reactor turn
    (one ``callLater(0)`` for all of a turn's closes).  Either way there is
    no write registration per connection, and ``connectionLost`` never runs
    inside ``loseConnection``, as with Twisted's own transports."""

    __slots__ = ("reactor", "pending", "call", "depth")

    def __init__(self, reactor: Any):
        self.reactor = reactor
        self.pending: list[LeanConnection] = []
        self.call: Any = None
        #: How many lean ``connectionLost`` calls are running (nested).
        self.depth = 0

    def add(self, conn: "LeanConnection") -> None:
        self.pending.append(conn)
        if self.call is None and not self.depth:
            self.call = self.reactor.callLater(0, self.flush)

    def flush(self) -> None:
        self.call = None
        while self.pending:
            pending, self.pending = self.pending, []
            for conn in pending:
                try:
                    conn._lean_close_now()
                except Exception:  # noqa: BLE001 - one protocol's bug must not keep the others open
                    log.err(None, "closing a lean TCP connection")


_CLOSERS: dict[int, _Closer] = {}


def _closer(reactor: Any) -> _Closer:
    closer = _CLOSERS.get(id(reactor))
    if closer is None or closer.reactor is not reactor:
        closer = _CLOSERS[id(reactor)] = _Closer(reactor)
    return closer


class LeanConnection(tcp.Connection):
    """A TCP connection of an accepted or dialled socket (see the module
    docstring).  ``peer`` is the socket address of the other end."""

    # Typed loosely: the reactor is an epoll reactor (its private sets are
    # used), the socket may be a ``_socket.socket``.
    reactor: Any
    socket: Any
    protocol: Any
    producer: Any

    logstr = "LeanConnection"
    _tlsClientDefault = False  # startTLS: the server side unless dialled
    #: Reading was stopped (by a pause or a close) before it ever started.
    _lean_no_read = False
    #: In the closer's list: nothing is flushed by a write registration.
    _lean_closing = False
    #: The dial in progress (a :class:`_Dial`), until it connected or failed.
    _lean_dial: Optional["_Dial"] = None

    def __init__(self, sock: Any, protocol: Any, reactor: Any, peer: tuple, family: int):
        # tcp.Connection.__init__, minus setblocking: the socket is
        # non-blocking already.
        self.reactor = reactor
        self._tempDataBuffer = []
        self._tempDataLen = 0
        self.socket = sock
        self.fileno = sock.fileno
        self.protocol = protocol
        self._lean_peer = peer
        self._lean_family = family

    # -- addresses -------------------------------------------------------
    def _address(self, sockaddr: tuple) -> Any:
        if self._lean_family == socket.AF_INET6:
            return address.IPv6Address("TCP", *sockaddr)
        return address.IPv4Address("TCP", sockaddr[0], sockaddr[1])

    _lean_peer_address: Any = None
    _lean_no_delay = False

    def getPeer(self) -> Any:
        peer = self._lean_peer_address
        if peer is None:
            peer = self._lean_peer_address = self._address(self._lean_peer)
        return peer

    def setTcpNoDelay(self, enabled: bool) -> None:
        if enabled and self._lean_no_delay:
            return  # set already (a lean dial sets it)
        tcp.Connection.setTcpNoDelay(self, enabled)
        self._lean_no_delay = bool(enabled)

    def getHost(self) -> Any:
        return self._address(self.socket.getsockname())

    def __repr__(self) -> str:
        return f"<LeanConnection to {self._lean_peer!r}>"

    # -- reading ---------------------------------------------------------
    #: Registered with the reactor for reading, as far as this transport
    #: knows (the reactor also lets go of it at end of stream).
    _lean_reading = False
    #: ``(deliver, source, view, size)`` once a relay reads this connection
    #: (:meth:`relay_reads`).
    _lean_sink: Optional[tuple] = None

    def startReading(self) -> None:
        self._lean_no_read = False
        if not self._lean_reading:
            self._lean_reading = True
            self.reactor.addReader(self)

    def stopReading(self) -> None:
        self._lean_no_read = True
        if self._lean_reading:
            self._lean_reading = False
            self.reactor.removeReader(self)

    def _lean_start(self, protocol: Any, done: Optional[Callable[[Any], None]] = None) -> None:
        """Connect ``protocol`` (then tell ``done``) and start reading,
        unless it paused the transport or closed it meanwhile."""
        self.connected = 1
        protocol.makeConnection(self)
        if done is not None:
            done(protocol)
        if self.connected and not self._lean_no_read and not self.disconnecting:
            self.startReading()

    def read_now(self) -> None:
        """Read once now, as if the reactor had found the connection
        readable: for a caller that knows bytes are likely waiting and that
        reading them in this turn pays (a dual-end entry that just sent a
        user's launch signal: the user's first bytes then follow it at
        once, docs/benchmarks.md run T).  Nothing there costs one ``recv``."""
        if self.connected and self._lean_reading and not self.disconnecting and "doRead" not in self.__dict__:
            why = self.doRead()
            if why is not None:
                self._lean_read_failed(why)

    def _lean_read_failed(self, why: Any) -> None:
        """What the reactor does when a ``doRead`` returns ``why`` (end of
        stream or an error): ``_disconnectSelectable``."""
        self.stopReading()
        if isinstance(why, error.ConnectionDone):
            self.readConnectionLost(_CONNECTION_DONE)
        else:
            self.reactor.removeWriter(self)
            self.connectionLost(failure.Failure(why))

    def _lean_ended(self, why: Any) -> Any:
        """End of stream or a read error, seen by a relay's read: what the
        reactor's ``_disconnectSelectable`` does with ``why`` returned by
        ``doRead``, minus its ``epoll_ctl`` that takes the socket out of the
        epoll set -- ``connectionLost`` closes the socket, which does that.
        Returns None when done here, or ``why`` for the reactor when the
        protocol keeps the connection open after the end of its input
        (``IHalfCloseableProtocol``: the socket must leave the set then) or
        when bytes wait to be written (the connection is registered for
        writing, and the reactor would go on to its ``doWrite`` after this
        read: it must see the reason)."""
        if self._tempDataLen or self.dataBuffer:
            return why
        if why is main.CONNECTION_DONE:
            if IHalfCloseableProtocol.providedBy(self.protocol):
                return why
            reason = _CONNECTION_DONE
        else:
            reason = failure.Failure(why)
        self._lean_reading = False
        self.connectionLost(reason)
        return None

    def relay_reads(self, view: memoryview, deliver: Callable[[Any, memoryview], None], source: Any) -> None:
        """From now on read into ``view`` (up to ``bufferSize``) and call
        ``deliver(source, chunk)`` with a view of each chunk, which must not
        be kept past the call (``nodepass.compat.twisted_internals.read_into``
        for this transport, without a closure per connection)."""
        self._lean_sink = (deliver, source, view, min(self.bufferSize, len(view)))

    #: Something was written on the connection (so what it reads now is
    #: an answer, which its peer may follow with a close at once).
    _lean_wrote = False

    def doRead(self) -> Any:
        """Twisted's ``doRead`` until a relay reads the connection; then
        read into the relay's buffer, and after a short read of an answer
        (at most :data:`_ANSWER_SIZE`, on a connection written to before)
        try once more: an answer is often followed by the peer's close,
        which is then seen in the same reactor turn instead of the next."""
        if self.disconnecting:
            return None  # closing at the end of this turn (loseConnection)
        sink = self._lean_sink
        if sink is None:
            return tcp.Connection.doRead(self)
        deliver, source, view, size = sink
        recv_into = self.socket.recv_into
        for _ in (1, 2):  # the second read only after a short answer
            try:
                n = recv_into(view, size)
            except (BlockingIOError, InterruptedError):
                return None
            except OSError:
                return self._lean_ended(main.CONNECTION_LOST)
            if not n:
                return self._lean_ended(main.CONNECTION_DONE)
            deliver(source, view[:n])
            if n > _ANSWER_SIZE or not self._lean_wrote or not self._lean_reading or self.disconnecting or not self.connected:
                return None
        return None

    # -- writing ---------------------------------------------------------
    def write(self, data: Any) -> None:
        """Send at once when nothing is queued; queue only what the socket
        did not take (Twisted's buffer, which pauses the producer).  Accepts
        bytes or a memoryview (copied if any of it has to wait)."""
        self._lean_wrote = True
        if self.TLS:
            tcp.Connection.write(self, data)
            return
        if not self._tempDataLen and not self.dataBuffer and self.connected and not self._writeDisconnected:
            try:
                sent = self.socket.send(data)
            except OSError:
                sent = 0  # EAGAIN, or an error Twisted's write path reports
            if sent == len(data):
                return
            data = data[sent:]
        if not isinstance(data, bytes):
            data = bytes(data)
        FileDescriptor.write(self, data)

    def loseConnection(self) -> None:
        """With nothing queued and no paused producer to wait for, close at
        the end of this turn (no write registration); otherwise Twisted's
        own: flush, then close."""
        if not self.connected or self.disconnecting:
            return
        if (
            self._tempDataLen
            or self.dataBuffer
            or self._writeDisconnected
            or self.TLS
            or (self.producer is not None and (not self.streamingProducer or self.producerPaused))
        ):
            tcp.Connection.loseConnection(self)
            return
        self.disconnecting = 1
        self._lean_closing = True
        self._lean_no_read = True
        if "doRead" in self.__dict__:
            self.stopReading()  # a reader of its own (splice) would read on
        # Else the socket stays registered until the closer closes it (which
        # unregisters it); what it reads meanwhile is ignored (doRead).
        _closer(self.reactor).add(self)

    def unregisterProducer(self) -> None:
        if self.TLS:
            tcp.Connection.unregisterProducer(self)
            return
        self.producer = None
        if self.connected and self.disconnecting and not self._lean_closing:
            self.startWriting()

    def _lean_close_now(self) -> None:
        self._lean_closing = False
        if not self.connected:
            return  # lost meanwhile (a read error, an abort)
        if self._tempDataLen or self.dataBuffer:
            self.stopReading()
            self.startWriting()  # written after loseConnection: flush first
            return
        self.connectionLost(_CONNECTION_DONE)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self.TLS:
            tcp.Connection.registerProducer(self, producer, streaming)
            return
        # FileDescriptor.registerProducer, in one call.
        if self.producer is not None:
            raise RuntimeError(f"Cannot register producer {producer}, because producer {self.producer} was never unregistered.")
        if self.disconnected:
            producer.stopProducing()
        else:
            self.producer = producer
            self.streamingProducer = streaming
            if not streaming:
                producer.resumeProducing()

    def readConnectionLost(self, reason: failure.Failure) -> None:
        self._lean_reading = False  # the reactor let go of it
        if IHalfCloseableProtocol.providedBy(self.protocol):
            tcp.Connection.readConnectionLost(self, reason)
        else:
            self.connectionLost(reason)

    def connectionLost(self, reason: failure.Failure) -> None:
        """Twisted's ``tcp.Connection.connectionLost`` (producer stopped,
        reactor let go, socket closed, protocol told), in fewer steps: the
        socket is closed without ``shutdown`` first (Twisted's own comment
        calls it unnecessary: the descriptor is ours alone) and, under the
        epoll reactor, without unregistering it first (closing it does)."""
        dial = self._lean_dial
        if dial is not None:
            # An error event while connecting (the reactor saw HUP/ERR).
            dial.check()
            return
        d = self.__dict__
        sock = d.get("socket")
        if sock is None:
            return  # lost already
        closer = _closer(self.reactor)
        closer.depth += 1
        try:
            self._lean_lost(d, sock, reason)
        finally:
            closer.depth -= 1
        if not closer.depth and closer.pending and closer.call is None:
            closer.flush()  # what this loss asked to close (the relay's other end)

    def _lean_lost(self, d: dict, sock: Any, reason: failure.Failure) -> None:
        self.disconnected = 1
        self.connected = 0
        producer = self.producer
        if producer is not None:
            producer.stopProducing()
            self.producer = None
        reactor = self.reactor
        if _EPOLL is not None and isinstance(reactor, _EPOLL):
            # The reactor's books only: closing the socket takes it out of
            # the epoll set (the reactor may have let go of it already, at
            # end of stream).
            fd = sock.fileno()
            selectables = reactor._selectables
            if selectables.get(fd) is self:
                del selectables[fd]
                reactor._reads.discard(fd)
                reactor._writes.discard(fd)
        else:
            self.reactor.removeReader(self)
            self.reactor.removeWriter(self)
        if reason.type is error.ConnectionAborted:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            except OSError:
                pass
        sock.close()
        protocol = self.protocol
        del self.protocol, self.socket, self.fileno
        self._lean_reading = False
        d.pop("doRead", None)
        d.pop("doWrite", None)
        d.pop("_lean_sink", None)
        protocol.connectionLost(reason)


def forget_handlers(transport: Any) -> None:
    """Drop the ``doRead``/``doWrite`` a relay installed on a closed TCP
    connection (``nodepass.compat.twisted_internals.read_into`` and the
    splice path): they hold the relay, which holds the connection, and such
    a cycle would otherwise wait for the garbage collector -- per
    connection, a collection's worth of work."""
    d = getattr(transport, "__dict__", None)
    if d is not None and "socket" not in d:
        d.pop("doRead", None)
        d.pop("doWrite", None)


def _peer_tuple(addr: tuple) -> tuple:
    if len(addr) == 4:  # IPv6: Twisted's numeric form (scope as a name)
        host = socket.getnameinfo(addr, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
        return (host[0], *addr[1:])
    return addr


def _out_of_descriptors(port: Any, e: OSError) -> None:
    """An ERROR line for a listening port that cannot accept for want of
    descriptors (at most one per :data:`OUT_OF_DESCRIPTORS_EVERY` seconds,
    with the count of refusals since the last): users are being turned
    away, and the cause is a limit the operator sets."""
    now = port.reactor.seconds()
    last, count = getattr(port, "_np_out_of_fds", (None, 0))
    count += 1
    if last is not None and now - last < OUT_OF_DESCRIPTORS_EVERY:
        port._np_out_of_fds = (last, count)
        return
    port._np_out_of_fds = (now, 0)
    try:
        import resource

        limit = f" (open-files limit {resource.getrlimit(resource.RLIMIT_NOFILE)[0]})"
    except (ImportError, OSError, ValueError):  # pragma: no cover - not POSIX
        limit = ""
    host = port.getHost()
    more = f" ({count - 1} more since the last report)" if last is not None and count > 1 else ""
    _ACCEPT_LOG.error(
        "Accept on {where} failed: {why}{limit}; connections are refused until descriptors are free{more}",
        where=f"{host.host}:{host.port}",
        why=os.strerror(e.errno) if e.errno else str(e),
        limit=limit,
        more=more,
    )


_ACCEPT_LOG = Logger(namespace="nodepass.accept")


def lean_accepts(port: Any) -> bool:
    """Have a listening ``tcp.Port`` (from ``reactor.listenTCP``) make a
    :class:`LeanConnection` for every accepted socket, with a protocol from
    its factory (``buildProtocol(address)``; None refuses the connection).
    Returns False when the port cannot be taken over (then it keeps
    Twisted's own transports).  Errors other than "nothing to accept" are
    left to Twisted's own ``doRead`` (it handles EMFILE with a spare
    descriptor)."""
    if not isinstance(port, tcp.Port):
        return False
    lsock = getattr(port, "socket", None)
    if lsock is None:
        return False
    accept = lsock._accept
    family = lsock.family
    make = _socket.socket
    stream = socket.SOCK_STREAM
    reactor: Any = port.reactor
    factory: Any = port.factory
    twisted_do_read = port.doRead
    IPv4Address = address.IPv4Address
    IPv6Address = address.IPv6Address
    v6 = family == socket.AF_INET6
    state = [64]

    def doRead() -> None:
        with DialBatch():  # the accepted connections' dials connect together
            accept_some()

    def accept_some() -> None:
        limit = state[0]
        count = 0
        while count < limit:
            try:
                fd, addr = accept()
            except OSError as e:
                if e.errno in _ACCEPT_RETRY:
                    break
                if e.errno in _OUT_OF_DESCRIPTORS:
                    _out_of_descriptors(port, e)
                twisted_do_read()  # Twisted's own handling and logging
                break
            count += 1
            try:
                sock = make(family, stream, 0, fd)
            except OSError:
                os.close(fd)
                continue
            conn = None
            try:
                sock.setblocking(False)
                peer: Any
                if v6:
                    addr = _peer_tuple(addr)
                    peer = IPv6Address("TCP", *addr)
                else:
                    peer = IPv4Address("TCP", addr[0], addr[1])
                protocol = factory.buildProtocol(peer)
                if protocol is None:
                    sock.close()
                    continue
                conn = LeanConnection(sock, protocol, reactor, addr, family)
                conn._lean_peer_address = peer  # getPeer(): the same address
                conn._lean_start(protocol)
            except Exception:  # noqa: BLE001 - one connection's failure must not stop the listener
                log.err(None, "accepting a TCP connection")
                if conn is None:
                    sock.close()  # no transport took it
                else:
                    conn.abortConnection()  # not left open, unread and unregistered
        state[0] = limit + 20 if count == limit else max(16, count)

    setattr(port, "doRead", doRead)  # this port only
    return True


def _over(*_args: Any) -> None:
    """What an ended dial holds instead of its callbacks (see ``_let_go``)."""


class _Dial:
    """One connection attempt of :func:`lean_connect`."""

    __slots__ = ("conn", "protocol", "done", "failed", "timer", "addr", "over", "timeout")

    def __init__(
        self,
        conn: LeanConnection,
        protocol: Any,
        done: Callable[[Any], None],
        failed: Callable[[failure.Failure], None],
        addr: tuple,
        timeout: float = 0.0,
    ):
        self.conn = conn
        self.protocol = protocol
        self.done = done
        self.failed = failed
        self.timer: Any = None
        self.addr = addr
        self.over = False
        self.timeout = timeout

    def begin(self, err: int) -> None:
        """A batched dial (:class:`DialBatch`): ``err`` is what its
        ``connect`` answered; finish as :func:`lean_connect` would have."""
        conn = self.conn
        err = _settled(conn.socket, self.addr, err)
        if not err:
            self.over = True
            protocol, done = self.protocol, self.done
            self._let_go()
            conn._lean_start(protocol, done)
        elif err not in _IN_PROGRESS:
            self._fail(error.getConnectError((err, os.strerror(err))))
        else:
            self._wait()

    def _wait(self) -> None:
        """Connecting (not loopback): wait for writability, at most
        ``timeout`` seconds."""
        conn = self.conn
        conn._lean_dial = self
        conn.doWrite = conn.doRead = self.check  # type: ignore[method-assign]
        conn.reactor.addWriter(conn)
        if self.timeout:
            self.timer = conn.reactor.callLater(self.timeout, self.timed_out)

    def check(self) -> None:
        """The socket became writable (or failed): connected, or why not."""
        if self.over:
            return
        sock = self.conn.socket
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if not err:
            err = sock.connect_ex(self.addr)
            if err == errno.EISCONN:
                err = 0
            elif err in _IN_PROGRESS:
                return  # not yet
        self.conn.reactor.removeWriter(self.conn)
        if err:
            self._fail(error.getConnectError((err, os.strerror(err))))
        else:
            self._connected()

    def _connected(self) -> None:
        self.over = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        conn = self.conn
        conn.__dict__.pop("doWrite", None)
        conn.__dict__.pop("doRead", None)
        conn._lean_dial = None
        protocol, done = self.protocol, self.done
        self._let_go()
        conn._lean_start(protocol, done)

    def _let_go(self) -> None:
        """The dial is over: drop the protocol and the callbacks.  A caller
        may keep the handle on its protocol (to cancel the dial), and the
        handle holding them back would be a reference cycle per
        connection, for the garbage collector."""
        self.protocol = self.done = self.failed = _over

    def _fail(self, exc: BaseException) -> None:
        self.over = True
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        conn = self.conn
        conn._lean_dial = None
        conn.reactor.removeWriter(conn)
        try:
            conn.socket.close()
        except OSError:
            pass
        failed = self.failed
        self._let_go()
        failed(failure.Failure(exc))

    def timed_out(self) -> None:
        self.timer = None
        if not self.over:
            self._fail(error.TimeoutError())

    def cancel(self) -> None:
        """Stop the attempt: fails with ``ConnectingCancelledError``, as an
        endpoint's cancelled ``connect`` does."""
        if not self.over:
            host, port = self.addr[0], self.addr[1]
            kind = address.IPv6Address if self.conn._lean_family == socket.AF_INET6 else address.IPv4Address
            self._fail(error.ConnectingCancelledError(kind("TCP", host, port)))


def lean_connect(
    reactor: Any,
    ip: str,
    port: int,
    protocol: Any,
    done: Callable[[Any], None],
    failed: Callable[[failure.Failure], None],
    timeout: float = 30.0,
    bind: Optional[tuple[str, int]] = None,
) -> Optional[_Dial]:
    """Dial ``ip:port`` (an IP literal) for ``protocol``.  ``done(protocol)``
    runs after the protocol's ``makeConnection``; ``failed(failure)`` with
    Twisted's connect errors (``ConnectionRefusedError``, ``TimeoutError``
    after ``timeout`` seconds, ``ConnectBindError`` for ``bind``,
    ``ConnectingCancelledError`` once cancelled).  Either may run before
    this returns (a loopback dial is usually over at once); then the result
    is None, else a handle whose ``cancel()`` stops the attempt.  Inside a
    :class:`DialBatch` neither runs before the batch ends."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    addr: tuple
    if family == socket.AF_INET6:
        addr = tcp._resolveIPv6(ip, port)
    else:
        addr = (ip, port)
    try:
        sock = _socket.socket(family, _STREAM_NONBLOCK)
    except OSError as e:
        failed(failure.Failure(error.ConnectBindError(e.args[0], e.args[1])))
        return None
    try:
        if not _STREAM_NONBLOCK & ~socket.SOCK_STREAM:
            sock.setblocking(False)  # no SOCK_NONBLOCK on this platform
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if bind is not None:
            bind_addr = tcp._resolveIPv6(bind[0], bind[1]) if ":" in bind[0] else bind
            sock.bind(bind_addr)
    except OSError as e:
        sock.close()
        failed(failure.Failure(error.ConnectBindError(e.args[0], e.args[1])))
        return None
    conn = LeanConnection(sock, protocol, reactor, addr, family)
    conn._tlsClientDefault = True
    conn._lean_no_delay = True
    batch = _BATCH.pending
    if batch is not None:
        dial = _Dial(conn, protocol, done, failed, addr, timeout)
        batch.append(dial)
        return dial
    err = _settled(sock, addr, sock.connect_ex(addr))
    if not err:
        conn._lean_start(protocol, done)
        return None
    if err not in _IN_PROGRESS:
        sock.close()
        failed(failure.Failure(error.getConnectError((err, os.strerror(err)))))
        return None
    dial = _Dial(conn, protocol, done, failed, addr, timeout)
    dial._wait()
    return dial


def _settled(sock: Any, addr: tuple, err: int) -> int:
    """A non-blocking ``connect``'s answer, asked once more if it was "in
    progress": a loopback connection is established by the time the first
    ``connect`` returns (0 then, or the error)."""
    if err in _IN_PROGRESS:
        err = sock.connect_ex(addr)
        if err == errno.EISCONN:
            err = 0
    return err


class DialBatch:
    """Dials made inside ``with DialBatch():`` (by :func:`lean_connect`)
    connect together when the block ends: first every ``connect``, back to
    back, then each dial's completion (its protocol's ``makeConnection``,
    the caller's ``done``).

    Why: a ``connect`` wakes the process that listens at the target (the
    kernel runs the handshake inside the ``connect`` call and signals the
    target's listening socket).  Dialled one at a time, with a relay set up
    between two dials, every ``connect`` found that process asleep again,
    and waking a sleeping process on another core cost more than anything
    else per short connection (``bench/bench_http.py``: a sixth of the
    forwarder's CPU).  Back to back, one wake-up serves the batch.

    Used around a listening port's accept loop (:func:`lean_accepts`), one
    read of launch signals at a dual-end exit, and a pool's refill: the
    dials of one event, completed before the next event.  (Around a whole
    turn of the reactor, dials waited behind every other event of the turn:
    a sixth fewer requests per second, docs/benchmarks.md run T.)
    Blocks nest (the outermost connects); dials made while a batch
    completes are made at once.  A batched dial's callbacks run when the
    block ends, not before :func:`lean_connect` returns; its handle can be
    cancelled meanwhile."""

    __slots__ = ("outer",)

    def __enter__(self) -> "DialBatch":
        self.outer = _BATCH.pending is None
        if self.outer:
            _BATCH.pending = []
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.outer:
            pending, _BATCH.pending = _BATCH.pending, None
            if pending:
                _connect_all(pending)


class _Batch:
    """The open batch, if any (one reactor thread at a time: module state)."""

    pending: Optional[list[_Dial]] = None


_BATCH = _Batch()


def _connect_all(dials: list[_Dial]) -> None:
    live = [dial for dial in dials if not dial.over]  # (cancelled meanwhile)
    answers = []
    for dial in live:
        try:
            answers.append(dial.conn.socket.connect_ex(dial.addr))
        except OSError as e:  # an address the socket refuses outright
            answers.append(e.errno or errno.EINVAL)
    for dial, err in zip(live, answers):
        if dial.over:
            continue  # cancelled by an earlier dial's callbacks
        try:
            dial.begin(err)
        except Exception:  # noqa: BLE001 - one dial's protocol must not stop the others'
            log.err(None, "completing a TCP dial")
            conn = dial.conn
            if conn.connected and not conn.disconnecting:
                conn.abortConnection()


def lean_dispatch(reactor: Any) -> bool:
    """Have an epoll reactor dispatch readiness events without Twisted's
    per-event log context.  Returns False for any other reactor (left as
    it is).

    ``EPollReactor.doPoll`` wraps every event in ``log.callWithLogger``,
    which pushes the selectable's ``logPrefix()`` as the legacy log
    ``system`` for whatever the handler logs -- four function calls and a
    context dictionary per event, for a field NodePass's log format (SPEC
    §7) never shows.  The replacement polls exactly as ``doPoll`` does and
    calls the same ``_doReadOrWrite``; a plain read event (the common one)
    goes straight to ``doRead``, with ``_doReadOrWrite``'s handling of its
    result: an exception is logged and disconnects the selectable, a
    returned reason disconnects it.  Only processes nodepass owns use it
    (the console script, ``twistd nodepass``, worker processes), never a
    reactor nodepass is merely imported into."""
    if _EPOLL is None or not isinstance(reactor, _EPOLL):
        return False
    if reactor.__dict__.get("doIteration") is not None:
        return True  # done already
    poll_in = reactor._POLL_IN
    disconnect = reactor._disconnectSelectable
    read_or_write = reactor._doReadOrWrite
    eintr = errno.EINTR

    def doPoll(timeout: Optional[float]) -> None:
        if timeout is None:
            timeout = -1  # wait until something happens
        selectables = reactor._selectables
        try:
            events = reactor._poller.poll(timeout, len(selectables))
        except OSError as e:
            if e.errno == eintr:
                return
            raise
        get = selectables.get
        for fd, event in events:
            selectable = get(fd)
            if selectable is None:
                continue  # gone earlier in this batch
            if event != poll_in:
                read_or_write(selectable, fd, event)
                continue
            try:
                if selectable.fileno() == -1:
                    why: Any = _NO_FILEDESC
                else:
                    why = selectable.doRead()
            except BaseException:
                why = sys.exc_info()[1]
                log.err()
            if why:
                disconnect(selectable, why, True)

    reactor.doPoll = reactor.doIteration = doPoll  # type: ignore[method-assign]
    return True


_NO_FILEDESC = error.ConnectionFdescWentAway("File descriptor lost")
