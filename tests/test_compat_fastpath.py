"""Lean TCP transports (``nodepass/compat/twisted_fastpath.py``).

First what the module relies on in Twisted, checked against the installed
version (a failure names it, as ``tests/test_compat.py`` does for the other
compat modules); then the transports themselves on real loopback sockets:
accepting, dialling (at once, later, refused, timed out, cancelled, a
source address that cannot be bound), writing, flow control, every way of
closing, half-close, and relayed pairs leaving no reference cycles behind.
"""

from __future__ import annotations

import gc
import socket
import weakref
from typing import Any, Optional

import twisted
from twisted.internet import error, reactor, tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer, ITCPTransport
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from nodepass.compat import twisted_fastpath
from nodepass.compat.twisted_fastpath import LeanConnection, lean_accepts, lean_connect
from nodepass.relay.core import RelayEnd
from tests.helpers import (
    Blackhole,
    Client,
    PushSender,
    close,
    connect,
    dead_port,
    listen_echo,
    listen_tcp,
    sleep,
    transport_buffered,
    wait_for,
)
from tests.test_compat import InternalsCase
from tests.test_single import ForwarderMixin, _port, d

MiB = 1024 * 1024


class TwistedFastpathInternalsTests(InternalsCase):
    library, version, module = "Twisted", twisted.__version__, "twisted_fastpath"

    def test_connection_state(self) -> None:
        """The ``tcp.Connection`` state a lean connection reads and sets."""
        from twisted.internet.abstract import FileDescriptor

        for name in ("connected", "disconnected", "disconnecting", "_writeDisconnected", "dataBuffer", "offset"):
            self.need(hasattr(FileDescriptor, name), f"FileDescriptor.{name} (a class default) is gone")
        for name in ("producer", "producerPaused", "streamingProducer"):
            self.need(hasattr(FileDescriptor, name), f"FileDescriptor.{name} (the consumer's producer) is gone")
        self.need(getattr(tcp.Connection, "TLS", None) is False, "tcp.Connection.TLS (False until startTLS) is gone")
        for name in ("doRead", "doWrite", "write", "loseConnection", "readConnectionLost", "registerProducer",
                     "unregisterProducer", "startTLS", "setTcpNoDelay", "abortConnection"):
            self.need_attr(tcp.Connection, name, callable)
        self.need_attr(tcp, "_resolveIPv6", callable)
        self.need_attr(error, "getConnectError", callable)
        self.need(ITCPTransport.implementedBy(LeanConnection), "tcp.Connection no longer implements ITCPTransport")
        self.need(IPushProducer.implementedBy(LeanConnection), "tcp.Connection no longer implements IPushProducer")

    def test_listening_port(self) -> None:
        """A ``tcp.Port`` keeps its socket, factory and reactor, and the
        reactor calls the ``doRead`` found on the instance."""
        port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.need(isinstance(port, tcp.Port), f"listenTCP made a {type(port).__name__}, not a tcp.Port")
        self.need_attr(port, "socket", socket.socket, "tcp.Port")
        self.need_attr(port, "factory", None, "tcp.Port")
        self.need_attr(port, "reactor", None, "tcp.Port")
        self.need_attr(port, "doRead", callable, "tcp.Port")
        self.need_attr(port.socket, "_accept", callable, "socket.socket")

    def test_epoll_reactor_bookkeeping(self) -> None:
        """Under the epoll reactor a closing lean connection leaves its
        ``_selectables``, ``_reads`` and ``_writes`` itself."""
        from twisted.internet.epollreactor import EPollReactor

        self.need(twisted_fastpath._EPOLL is EPollReactor, "twisted.internet.epollreactor.EPollReactor is gone")
        if isinstance(reactor, EPollReactor):
            self.need_attr(reactor, "_selectables", dict, "EPollReactor")
            self.need_attr(reactor, "_reads", set, "EPollReactor")
            self.need_attr(reactor, "_writes", set, "EPollReactor")

    def test_epoll_reactor_dispatch(self) -> None:
        """What ``lean_dispatch`` replaces and calls: ``doPoll`` (and
        ``doIteration``, the same function) polling ``_poller`` with
        ``len(_selectables)`` events at most, ``_doReadOrWrite`` and
        ``_disconnectSelectable`` for the rest, ``_POLL_IN`` for a plain read."""
        import inspect

        from twisted.internet.epollreactor import EPollReactor

        self.need(EPollReactor.doIteration is EPollReactor.doPoll, "EPollReactor.doIteration is no longer doPoll")
        self.need_parameters(EPollReactor.doPoll, ("self", "timeout"), "EPollReactor.doPoll")
        source = inspect.getsource(EPollReactor.doPoll)
        for part in ("self._poller.poll(timeout, len(self._selectables))", "callWithLogger", "_doReadOrWrite"):
            self.need(part in source, f"EPollReactor.doPoll no longer does {part}")
        self.need_parameters(EPollReactor._doReadOrWrite, ("self", "selectable", "fd", "event"), "EPollReactor._doReadOrWrite")
        self.need_parameters(
            EPollReactor._disconnectSelectable, ("self", "selectable", "why", "isRead"), "EPollReactor._disconnectSelectable"
        )
        import select

        self.need(EPollReactor._POLL_IN == select.EPOLLIN, "EPollReactor._POLL_IN is not EPOLLIN")


# -- helpers -----------------------------------------------------------------


class _Server(Protocol):
    """An accepted connection that records what happens to it."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.made: Deferred = Deferred()
        self.lost: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.made.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(bytes(data))

    def connectionLost(self, reason: Failure) -> None:
        self.lost.callback(reason.value)  # the exception: a Failure would errback


@implementer(IHalfCloseableProtocol)
class _HalfCloseServer(_Server):
    """Answers once the peer half-closed: what it read, then ``done``."""

    def __init__(self) -> None:
        super().__init__()
        self.read_closed: Deferred = Deferred()

    def readConnectionLost(self) -> None:
        self.read_closed.callback(None)
        self.transport.write(b"got " + b"".join(self.chunks))
        self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass


class _ServerFactory(Factory):
    noisy = False

    def __init__(self, make: Any = _Server, refuse: bool = False) -> None:
        self.make = make
        self.refuse = refuse
        self.protocols: list[_Server] = []
        self.addresses: list[Any] = []

    def buildProtocol(self, addr: Any) -> Optional[Protocol]:
        self.addresses.append(addr)
        if self.refuse:
            return None
        p = self.make()
        p.factory = self
        self.protocols.append(p)
        return p


class _Dialled(Protocol):
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.lost: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(bytes(data))

    def connectionLost(self, reason: Failure) -> None:
        self.lost.callback(reason.value)  # the exception: a Failure would errback


def _dial(ip: str, port: int, proto: Protocol, **kw: Any) -> tuple[Deferred, Any]:
    """``lean_connect`` as a Deferred (fires with the protocol) and its handle."""
    result: Deferred = Deferred()
    handle = lean_connect(reactor, ip, port, proto, result.callback, result.errback, **kw)
    return result, handle


def _raw_client(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.settimeout(5)
    return s


async def _eof_later(s: socket.socket) -> bytes:
    """What ``s`` reads until EOF, letting the reactor run meanwhile."""
    s.setblocking(False)
    got = [b""]

    def at_eof() -> bool:
        try:
            chunk = s.recv(65536)
        except BlockingIOError:
            return False
        got[0] += chunk
        return not chunk

    await wait_for(at_eof, what="EOF")
    s.settimeout(5)
    return got[0]


def _readable(sock: Any) -> bool:
    """Whether ``sock`` has something to read (bytes or an end of stream)."""
    import select

    return bool(select.select([sock], [], [], 0)[0])


def _read_to_eof(s: socket.socket) -> bytes:
    got = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return got
        got += chunk


class LeanAcceptTests(unittest.TestCase):
    def listen(self, factory: Factory) -> int:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.assertTrue(lean_accepts(port))
        return port.getHost().port

    async def accepted(self, make: Any = _Server) -> tuple[Any, socket.socket]:
        """A lean listener with one raw client connected and accepted:
        (the accepted connection's protocol, the client's socket)."""
        factory = _ServerFactory(make)
        s = _raw_client(self.listen(factory))
        self.addCleanup(s.close)
        await wait_for(lambda: factory.protocols, what="accepted")
        return factory.protocols[0], s

    @d
    async def test_accepted_transport_is_lean(self) -> None:
        factory = _ServerFactory()
        pnum = self.listen(factory)
        client = await connect(pnum)
        await wait_for(lambda: factory.protocols, what="accepted")
        server = factory.protocols[0]
        t = server.transport
        self.assertIsInstance(t, LeanConnection)
        self.assertTrue(ITCPTransport.providedBy(t))
        host, cport = client.transport.getHost().host, client.transport.getHost().port
        self.assertEqual((t.getPeer().host, t.getPeer().port), (host, cport))
        self.assertEqual(factory.addresses[0].port, cport)
        self.assertEqual(t.getHost().port, pnum)
        client.transport.write(b"hello")
        await wait_for(lambda: b"".join(server.chunks) == b"hello", what="bytes at the server")
        t.write(memoryview(b"back"))  # views are accepted too
        await client.wait_bytes(4)
        await close(client)
        self.assertIsInstance(await server.lost, error.ConnectionDone)

    @d
    async def test_no_protocol_refuses(self) -> None:
        pnum = self.listen(_ServerFactory(refuse=True))
        s = _raw_client(pnum)
        self.addCleanup(s.close)
        await sleep(0.05)  # the accept
        self.assertEqual(_read_to_eof(s), b"")

    @d
    async def test_protocol_that_fails_at_connection_made_is_dropped(self) -> None:
        """A protocol raising in ``connectionMade`` costs that connection
        only: it is logged, the connection aborted, the listener goes on."""

        class Broken(_Server):
            def connectionMade(self) -> None:
                raise RuntimeError("broken protocol")

        factory = _ServerFactory(Broken)
        pnum = self.listen(factory)
        s = _raw_client(pnum)
        self.addCleanup(s.close)
        await wait_for(lambda: factory.protocols, what="accepted")
        await factory.protocols[0].lost
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        with self.assertRaises(ConnectionResetError):
            while s.recv(16):
                pass
        factory.make = _Server  # the listener still accepts
        s2 = _raw_client(pnum)
        self.addCleanup(s2.close)
        await wait_for(lambda: len(factory.protocols) == 2, what="the next connection accepted")

    @d
    async def test_write_then_close_flushes_then_ends(self) -> None:
        """``loseConnection`` with nothing queued: the peer gets every byte
        written before it, then EOF; the protocol hears ConnectionDone."""
        server, s = await self.accepted()
        server.transport.write(b"answer")
        server.transport.loseConnection()
        server.transport.loseConnection()  # twice is harmless
        self.assertIsInstance(await server.lost, error.ConnectionDone)
        self.assertEqual(_read_to_eof(s), b"answer")

    @d
    async def test_write_after_lose_connection_is_flushed(self) -> None:
        factory = _ServerFactory()
        pnum = self.listen(factory)
        s = _raw_client(pnum)
        self.addCleanup(s.close)
        await wait_for(lambda: factory.protocols, what="accepted")
        t = factory.protocols[0].transport
        t.loseConnection()
        t.write(b"late")
        await factory.protocols[0].lost
        self.assertEqual(_read_to_eof(s), b"late")

    @d
    async def test_queued_bytes_go_out_before_the_close(self) -> None:
        """More than the socket takes at once: the rest waits in Twisted's
        buffer, and the close waits for it."""
        factory = _ServerFactory()
        pnum = self.listen(factory)
        client = await connect(pnum)
        client.transport.pauseProducing()
        await wait_for(lambda: factory.protocols, what="accepted")
        t = factory.protocols[0].transport
        payload = bytes(range(256)) * (32 * 1024)  # 8 MiB
        t.write(payload)
        self.assertGreater(transport_buffered(t), 0)
        t.loseConnection()
        await sleep(0.05)
        self.assertFalse(factory.protocols[0].lost.called, "closed with bytes still queued")
        client.transport.resumeProducing()
        data = await client.lost
        self.assertEqual(data, payload)

    @d
    async def test_abort_resets(self) -> None:
        factory = _ServerFactory()
        pnum = self.listen(factory)
        s = _raw_client(pnum)
        self.addCleanup(s.close)
        await wait_for(lambda: factory.protocols, what="accepted")
        factory.protocols[0].transport.write(b"x")
        factory.protocols[0].transport.abortConnection()
        self.assertIsInstance(await factory.protocols[0].lost, error.ConnectionAborted)
        with self.assertRaises(ConnectionResetError):
            while s.recv(16):
                pass

    @d
    async def test_peer_reset_is_connection_lost(self) -> None:
        factory = _ServerFactory()
        pnum = self.listen(factory)
        s = _raw_client(pnum)
        await wait_for(lambda: factory.protocols, what="accepted")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
        self.assertIsInstance(await factory.protocols[0].lost, error.ConnectionLost)

    @d
    async def test_half_close(self) -> None:
        """A half-closeable protocol hears the peer's FIN and still writes."""
        factory = _ServerFactory(_HalfCloseServer)
        pnum = self.listen(factory)
        s = _raw_client(pnum)
        self.addCleanup(s.close)
        s.sendall(b"question")
        s.shutdown(socket.SHUT_WR)
        await wait_for(lambda: factory.protocols, what="accepted")
        server = factory.protocols[0]
        await server.read_closed
        await server.lost
        self.assertEqual(_read_to_eof(s), b"got question")

    def _sink(self, server: _Server) -> list[bytes]:
        """Have ``server``'s transport read as a relay does (into a buffer,
        handed to a function), recording what it delivers."""
        seen: list[bytes] = []
        server.transport.relay_reads(memoryview(bytearray(4096)), lambda _src, chunk: seen.append(bytes(chunk)), None)
        return seen

    @d
    async def test_relay_read_end_of_stream_closes(self) -> None:
        """A relay's read that finds the peer's close ends the connection
        itself (``connectionLost``, the socket closed) and the reactor no
        longer holds it."""
        server, s = await self.accepted()
        transport = server.transport
        seen = self._sink(server)
        s.sendall(b"last words")
        s.close()
        why = await server.lost
        self.assertIsInstance(why, error.ConnectionDone)
        self.assertEqual(b"".join(seen), b"last words")
        self.assertNotIn(transport, reactor.getReaders())
        self.assertNotIn(transport, reactor.getWriters())

    @d
    async def test_read_now(self) -> None:
        """``read_now`` reads what is waiting without waiting for the
        reactor; with nothing waiting it reads nothing; a waiting end of
        stream ends the connection."""
        server, s = await self.accepted()
        seen = self._sink(server)
        t = server.transport
        t.read_now()
        self.assertEqual(seen, [])
        t.stopReading()  # (the reactor must not be the one reading them)
        s.sendall(b"first bytes")
        await wait_for(lambda: _readable(t.socket), what="bytes in the socket")
        self.assertEqual(seen, [])
        t.startReading()
        t.read_now()  # (in the same turn: before the reactor looks)
        self.assertEqual(b"".join(seen), b"first bytes")
        t.stopReading()
        s.close()
        await wait_for(lambda: _readable(t.socket), what="the end of stream in the socket")
        t.startReading()
        t.read_now()
        self.assertIsInstance(await server.lost, error.ConnectionDone)

    @d
    async def test_relay_read_end_of_stream_half_close(self) -> None:
        """A half-closeable protocol reading as a relay does is told of
        the end of its input and may still answer: the socket leaves the
        reactor's readers (else the end of stream would be reported again
        and again) and stays open for writing."""
        server, s = await self.accepted(_HalfCloseServer)
        seen = self._sink(server)
        server.chunks = seen  # what it answers with
        s.sendall(b"question")
        s.shutdown(socket.SHUT_WR)
        await wait_for(lambda: server.read_closed.called, what="readConnectionLost of the half-closeable protocol")
        await server.lost
        self.assertEqual(_read_to_eof(s), b"got question")

    @d
    async def test_relay_read_reset_with_bytes_queued(self) -> None:
        """A reset seen by a relay's read while the connection still holds
        bytes it could not send: the connection is lost once, as
        ``ConnectionLost``, and its queued bytes are dropped without a
        write to the closed socket."""
        factory = _ServerFactory()
        pnum = self.listen(factory)
        s = _raw_client(pnum)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await wait_for(lambda: factory.protocols, what="accepted")
        server = factory.protocols[0]
        transport = server.transport
        self._sink(server)
        transport.write(b"x" * (8 * MiB))  # far more than the socket takes
        self.assertTrue(transport_buffered(transport), "nothing queued: the test needs a full socket")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()  # a reset, with our bytes unread
        why = await server.lost
        self.assertIsInstance(why, error.ConnectionLost)
        self.assertNotIn(transport, reactor.getReaders())
        self.assertNotIn(transport, reactor.getWriters())

    @d
    async def test_lose_write_connection(self) -> None:
        """``loseWriteConnection``: the peer sees EOF, and reading goes on."""
        server, s = await self.accepted()
        server.transport.write(b"bye")
        server.transport.loseWriteConnection()
        self.assertEqual(await _eof_later(s), b"bye")
        s.sendall(b"still here")
        await wait_for(lambda: b"".join(server.chunks) == b"still here", what="reading after a half-close")
        s.close()
        await server.lost

    @d
    async def test_slow_reader_pauses_the_producer(self) -> None:
        """Flow control: a peer that stops reading fills the lean
        transport's buffer, which pauses its streaming producer; once the
        peer reads again the producer resumes; the buffer stays bounded."""
        factory = _ServerFactory()
        pnum = self.listen(factory)
        client = await connect(pnum)
        client.transport.pauseProducing()
        await wait_for(lambda: factory.protocols, what="accepted")
        t = factory.protocols[0].transport
        sender = PushSender(t)
        self.addCleanup(sender.stopProducing)
        await wait_for(lambda: sender.paused, timeout=10, what="producer paused by a full buffer")
        self.assertLess(transport_buffered(t), 2 * t.bufferSize + len(sender.chunk))
        written = sender.written
        client.transport.resumeProducing()
        await wait_for(lambda: sender.written > written, timeout=10, what="producer resumed")
        sender.stopProducing()
        t.unregisterProducer()
        await close(client)


class LeanConnectTests(unittest.TestCase):
    @d
    async def test_loopback_dial_is_over_at_once(self) -> None:
        live, _factory = listen_echo()
        self.addCleanup(live.stopListening)
        proto = _Dialled()
        result, handle = _dial("127.0.0.1", _port(live), proto)
        self.assertIsNone(handle)  # connected in this turn
        self.assertTrue(result.called)
        self.assertIs(await result, proto)
        t = proto.transport
        self.assertIsInstance(t, LeanConnection)
        self.assertTrue(t.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        self.assertEqual(t.getPeer().port, _port(live))
        t.write(b"ping")
        await wait_for(lambda: b"".join(proto.chunks) == b"ping", what="echo")
        t.loseConnection()
        self.assertIsInstance(await proto.lost, error.ConnectionDone)

    @d
    async def test_refused(self) -> None:
        result, handle = _dial("127.0.0.1", dead_port(), _Dialled())
        self.assertIsNone(handle)
        with self.assertRaises(error.ConnectionRefusedError):
            await result

    @d
    async def test_dial_that_waits_then_connects(self) -> None:
        """A listener whose accept queue is full drops the SYN: the dial
        waits for writability (the path of a remote target) and connects
        once the queue has room and the SYN is sent again."""
        hole = Blackhole()
        self.addCleanup(hole.close)
        proto = _Dialled()
        result, handle = _dial("127.0.0.1", hole.port, proto, timeout=10)
        self.assertIsNotNone(handle)
        await sleep(0.1)
        self.assertFalse(result.called)
        for filler in hole.fillers:  # make room in the queue
            conn, _ = hole.sock.accept()
            conn.close()
        self.assertIs(await result, proto)
        self.assertIsInstance(proto.transport, LeanConnection)
        proto.transport.loseConnection()
        await proto.lost
        self.assertEqual([c for c in reactor.getDelayedCalls() if c.func == handle.timed_out], [])

    @d
    async def test_timeout(self) -> None:
        hole = Blackhole()
        self.addCleanup(hole.close)
        result, handle = _dial("127.0.0.1", hole.port, _Dialled(), timeout=0.2)
        self.assertIsNotNone(handle)
        with self.assertRaises(error.TimeoutError):
            await result
        self.assertNotIn(handle.conn, reactor.getWriters())

    @d
    async def test_cancel(self) -> None:
        hole = Blackhole()
        self.addCleanup(hole.close)
        result, handle = _dial("127.0.0.1", hole.port, _Dialled(), timeout=5)
        handle.cancel()
        with self.assertRaises(error.ConnectingCancelledError):
            await result
        self.assertNotIn(handle.conn, reactor.getWriters())
        self.assertEqual([c for c in reactor.getDelayedCalls() if c.func == handle.timed_out], [])
        handle.cancel()  # twice is harmless

    @d
    async def test_unbindable_source(self) -> None:
        result, handle = _dial("127.0.0.1", dead_port(), _Dialled(), bind=("192.0.2.1", 0))
        self.assertIsNone(handle)
        with self.assertRaises(error.ConnectBindError):
            await result


class _Failing(_Dialled):
    """A protocol whose ``connectionMade`` raises (a bug in one dial's
    protocol)."""

    def connectionMade(self) -> None:
        raise ZeroDivisionError("a bug in connectionMade")


class DialBatchTests(unittest.TestCase):
    """``DialBatch``: dials made inside the block connect when it ends."""

    def echo(self) -> int:
        """The port of a loopback echo listener for this test."""
        live, _factory = listen_echo()
        self.addCleanup(live.stopListening)
        return _port(live)

    @d
    async def test_dials_connect_when_the_block_ends(self) -> None:
        port = self.echo()
        protos = [_Dialled() for _ in range(3)]
        with twisted_fastpath.DialBatch():
            dials = [_dial("127.0.0.1", port, p) for p in protos]
            # Queued: nothing connected, nothing called back yet.
            self.assertTrue(all(handle is not None for _result, handle in dials))
            self.assertFalse(any(result.called for result, _handle in dials))
            self.assertTrue(all(p.transport is None for p in protos))
        for (result, _handle), proto in zip(dials, protos):
            self.assertTrue(result.called, "a loopback dial is over when the block ends")
            self.assertIs(await result, proto)
            self.assertIsInstance(proto.transport, LeanConnection)
        for i, proto in enumerate(protos):
            proto.transport.write(b"p%d" % i)
        for i, proto in enumerate(protos):
            await wait_for(lambda: b"".join(proto.chunks) == b"p%d" % i, what=f"echo on dial {i}")
            proto.transport.loseConnection()
            await proto.lost

    @d
    async def test_refused_and_live_in_one_batch(self) -> None:
        port = self.echo()
        with twisted_fastpath.DialBatch():
            refused, _h1 = _dial("127.0.0.1", dead_port(), _Dialled())
            proto = _Dialled()
            ok, _h2 = _dial("127.0.0.1", port, proto)
        with self.assertRaises(error.ConnectionRefusedError):
            await refused
        self.assertIs(await ok, proto)
        proto.transport.loseConnection()
        await proto.lost

    @d
    async def test_cancelled_while_queued(self) -> None:
        """A queued dial cancelled before the block ends fails with
        ``ConnectingCancelledError``, never connects, and leaves no socket."""
        port = self.echo()
        with twisted_fastpath.DialBatch():
            result, handle = _dial("127.0.0.1", port, _Dialled())
            sock = handle.conn.socket
            handle.cancel()
        with self.assertRaises(error.ConnectingCancelledError):
            await result
        self.assertEqual(sock.fileno(), -1, "the cancelled dial's socket is closed")
        handle.cancel()  # twice is harmless

    @d
    async def test_one_failing_protocol_does_not_stop_the_others(self) -> None:
        port = self.echo()
        bad = _Failing()
        good = _Dialled()
        with twisted_fastpath.DialBatch():
            _dial("127.0.0.1", port, bad)
            ok, _handle = _dial("127.0.0.1", port, good)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertIs(await ok, good)
        await wait_for(lambda: bad.lost.called, what="the failing dial aborted")
        good.transport.loseConnection()
        await good.lost

    @d
    async def test_nested_blocks_connect_at_the_outermost_end(self) -> None:
        port = self.echo()
        with twisted_fastpath.DialBatch():
            with twisted_fastpath.DialBatch():
                result, _handle = _dial("127.0.0.1", port, _Dialled())
            self.assertFalse(result.called, "the inner block does not connect")
        proto = await result
        proto.transport.loseConnection()
        await proto.lost

    @d
    async def test_dial_made_by_a_completing_dial_is_at_once(self) -> None:
        """A dial made from another's callback while the batch completes
        connects at once (the batch is over by then)."""
        port = self.echo()
        second: list[Any] = []

        def first_done(_proto: Any) -> None:
            second.append(_dial("127.0.0.1", port, _Dialled()))

        first = _Dialled()
        with twisted_fastpath.DialBatch():
            lean_connect(reactor, "127.0.0.1", port, first, first_done, lambda f: None)
        self.assertEqual(len(second), 1)
        result, handle = second[0]
        self.assertIsNone(handle)
        self.assertTrue(result.called)
        for proto in (first, await result):
            proto.transport.loseConnection()
            await proto.lost

    @d
    async def test_accepted_connections_dial_in_one_batch(self) -> None:
        """A listening port's accept loop is a batch: a dial made while a
        connection is accepted (a forwarder dialling its target) is queued,
        and connects once the loop is over."""
        target = self.echo()
        states: list[bool] = []
        results: list[Deferred] = []

        class _DialsOnAccept(Protocol):
            def connectionMade(self) -> None:
                result, handle = _dial("127.0.0.1", target, _Dialled())
                states.append(handle is not None and not result.called)
                results.append(result)

        port = reactor.listenTCP(0, Factory.forProtocol(_DialsOnAccept), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.assertTrue(lean_accepts(port))
        clients = [socket.create_connection(("127.0.0.1", port.getHost().port)) for _ in range(2)]
        for c in clients:
            self.addCleanup(c.close)
        await wait_for(lambda: len(results) == 2, what="both accepted")
        self.assertEqual(states, [True, True])
        for result in results:
            proto = await result
            proto.transport.loseConnection()
            await proto.lost


class _Answer(Protocol):
    """A target that answers each request with ``payload`` and closes."""

    payload = b""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(self.payload)
        self.transport.loseConnection()


class RelayedPairTests(ForwarderMixin, unittest.TestCase):
    """The single-end forwarder relays lean transports both ways."""

    @d
    async def test_answer_then_close(self) -> None:
        """The target answers and closes at once (an HTTP answer with
        ``Connection: close``): the user gets all of it, then EOF."""
        payload = bytes(range(256)) * 4096  # 1 MiB
        tport, _ = self.target(listen_tcp(_Answer, payload=payload))
        fport = await self.start_forwarder(f"127.0.0.1:{tport}")
        client = await connect(fport)
        client.transport.write(b"GET / HTTP/1.1\r\n\r\n")
        self.assertEqual(await client.lost, payload)
        await wait_for(lambda: not self.service.runner.relays and self.service.stats.tcps == 0, what="relay over")
        self.assertTrue(self.logged("Exchange complete: EOF"))

    @d
    async def test_user_closes_first(self) -> None:
        """The user sends and closes: the target gets every byte, then EOF."""
        tport, factory = self.target(listen_tcp(Client))
        fport = await self.start_forwarder(f"127.0.0.1:{tport}")
        client = await connect(fport)
        await wait_for(lambda: len(self.service.runner.relays) == 1, what="relay up")
        (relay,) = self.service.runner.relays
        self.assertIsInstance(relay.target.transport, LeanConnection)
        self.assertIsInstance(relay.tunnel.transport, LeanConnection)
        del relay
        client.transport.write(b"x" * 100_000)
        await close(client)
        target = factory.connections[0]
        self.assertEqual(len(await target.lost), 100_000)

    @d
    async def test_target_refuses(self) -> None:
        """A dial error while the user waits: the user is closed, the slot
        released, the error logged as Go words it."""
        fport = await self.start_forwarder(f"127.0.0.1:{dead_port()}")
        client = await connect(fport)
        await client.lost
        await wait_for(lambda: self.service.stats.tcps == 0, what="slot released")
        self.assertTrue(self.logged("dropped: all 1 target(s) failed"))

    @d
    async def test_no_reference_cycles_left(self) -> None:
        """A finished relay's transports, ends and relay are freed by
        reference counting alone: nothing per connection waits for the
        garbage collector."""
        tport, _ = self.target(listen_tcp(_Answer, payload=b"hi"))
        fport = await self.start_forwarder(f"127.0.0.1:{tport}")
        client = await connect(fport)
        await wait_for(lambda: len(self.service.runner.relays) == 1, what="relay up")
        refs = []
        for relay in list(self.service.runner.relays):
            refs += [weakref.ref(relay.target), weakref.ref(relay.tunnel)]
            refs += [weakref.ref(relay.target.transport), weakref.ref(relay.tunnel.transport)]
        del relay
        client.transport.write(b"request")
        self.assertEqual(await client.lost, b"hi")
        await wait_for(lambda: self.service.stats.tcps == 0, what="slot released")
        await sleep(0.01)  # the closer's turn
        gc.disable()
        try:
            alive = [r() for r in refs if r() is not None]
            self.assertEqual(alive, [])
        finally:
            gc.enable()


class DialCallbackTests(unittest.TestCase):
    """``TargetGroup.connect``: callbacks, failover, cancellation."""

    def group(self, *ports: int, timeout: float = 5.0) -> Any:
        from nodepass.base.logs import NodeLog
        from nodepass.config.urls import Address
        from nodepass.net.dialer import TargetGroup

        return TargetGroup([Address("127.0.0.1", p) for p in ports], reactor, NodeLog("none"), timeout=timeout)

    @d
    async def test_failover_from_refused_to_live(self) -> None:
        live, _ = listen_echo()
        self.addCleanup(live.stopListening)
        done: Deferred = Deferred()
        failures: list[Any] = []
        self.group(dead_port(), _port(live)).connect(
            Factory.forProtocol(RelayEnd), done.callback, done.errback, on_fail=lambda t, e: failures.append(e)
        )
        end = await done
        self.assertIsInstance(end, RelayEnd)
        self.assertEqual(end.transport.getPeer().port, _port(live))
        self.assertEqual(len(failures), 1)
        self.assertIsInstance(failures[0], error.ConnectionRefusedError)
        end.transport.loseConnection()

    @d
    async def test_cancel_calls_back_nothing(self) -> None:
        hole = Blackhole()
        self.addCleanup(hole.close)
        calls: list[Any] = []
        dial = self.group(hole.port, timeout=0.3).connect(Factory.forProtocol(RelayEnd), calls.append, calls.append)
        dial.cancel()
        dial.cancel()
        await sleep(0.5)
        self.assertEqual(calls, [])


class _Reader:
    """A bare ``IReadDescriptor`` on one end of a socket pair."""

    def __init__(self, sock: socket.socket, answer: Any = None):
        self.sock = sock
        self.answer = answer
        self.got: list[bytes] = []
        self.lost: list[Failure] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "reader"

    def doRead(self) -> Any:
        data = self.sock.recv(4096)
        self.got.append(data)
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer if data else error.ConnectionDone()

    def connectionLost(self, reason: Failure) -> None:
        self.lost.append(reason)

    def readConnectionLost(self, reason: Failure) -> None:
        self.lost.append(reason)


class LeanDispatchTests(unittest.TestCase):
    """``lean_dispatch`` on a reactor of its own (created, not installed,
    and stepped with ``doIteration``), so the suite's reactor is untouched."""

    def setUp(self) -> None:
        from twisted.internet.epollreactor import EPollReactor

        self.reactor: Any = EPollReactor()
        self.addCleanup(self._close_reactor)
        self.assertTrue(twisted_fastpath.lean_dispatch(self.reactor))

    def _close_reactor(self) -> None:
        r = self.reactor
        r.removeAll()
        waker = getattr(r, "waker", None)
        if waker is not None:
            r.removeReader(waker)
            waker.connectionLost(None)
        r._poller.close()

    def _pair(self, answer: Any = None) -> tuple[_Reader, socket.socket]:
        a, b = socket.socketpair()
        a.setblocking(False)
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        reader = _Reader(a, answer)
        self.reactor.addReader(reader)
        self.addCleanup(self.reactor.removeReader, reader)  # before the close (cleanups run last first)
        return reader, b

    def _step(self, until: Any, what: str) -> None:
        for _ in range(50):
            self.reactor.doIteration(0.1)
            if until():
                return
        self.fail(f"no {what} after 50 reactor iterations")

    def test_other_reactors_are_left_alone(self) -> None:
        from twisted.internet.selectreactor import SelectReactor

        other: Any = SelectReactor()
        self.addCleanup(other._preenDescriptors)
        self.assertFalse(twisted_fastpath.lean_dispatch(other))
        self.assertNotIn("doIteration", other.__dict__)

    def test_twice_is_once(self) -> None:
        first = self.reactor.doIteration
        self.assertTrue(twisted_fastpath.lean_dispatch(self.reactor))
        self.assertIs(self.reactor.doIteration, first)

    def test_read_event_reaches_do_read(self) -> None:
        reader, peer = self._pair()
        peer.send(b"hello")
        self._step(lambda: reader.got, "read")
        self.assertEqual(reader.got, [b"hello"])
        self.assertEqual(reader.lost, [])

    def test_no_log_context_per_event(self) -> None:
        """The point of it: ``doRead`` runs without the selectable's
        ``logPrefix()`` pushed as the legacy log ``system`` (Twisted's own
        ``doPoll`` builds that context for every event)."""
        from twisted.python import context
        from twisted.python import log as legacy_log

        reader, peer = self._pair()
        systems: list[str] = []
        plain = reader.doRead

        def read() -> Any:
            systems.append(context.get(legacy_log.ILogContext, {}).get("system", "-"))
            return plain()

        reader.doRead = read  # type: ignore[method-assign]
        peer.send(b"x")
        self._step(lambda: systems, "read")
        self.assertNotEqual(systems, ["reader"])

    def test_end_of_stream_disconnects_as_a_read(self) -> None:
        """A reason returned by ``doRead`` ends the selectable the way
        ``_doReadOrWrite`` does: ``readConnectionLost`` for a clean end
        of a reader that was reading."""
        reader, peer = self._pair()
        peer.close()
        self._step(lambda: reader.lost, "loss")
        self.assertIsInstance(reader.lost[0].value, error.ConnectionDone)
        self.assertNotIn(reader, self.reactor.getReaders())

    def test_exception_is_logged_and_disconnects(self) -> None:
        reader, peer = self._pair(answer=ZeroDivisionError("a bug"))
        peer.send(b"x")
        self._step(lambda: reader.lost, "loss")
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.assertNotIn(reader, self.reactor.getReaders())

    def test_writable_event_still_goes_through_twisted(self) -> None:
        """An event other than a plain read (here: writable) takes
        Twisted's own path."""
        reader, peer = self._pair()
        written: list[bool] = []
        reader.doWrite = lambda: written.append(True)  # type: ignore[attr-defined]
        self.reactor.addWriter(reader)
        self._step(lambda: written, "write event")
        self.reactor.removeWriter(reader)
        self.assertEqual(reader.got, [])

    def test_a_selectable_gone_earlier_in_the_batch_is_skipped(self) -> None:
        """When one handler removes another selectable whose event is in the
        same batch, the removed one is not called."""
        first, peer1 = self._pair()
        second, peer2 = self._pair()

        def read_and_drop_the_other(me: _Reader, other: _Reader) -> Any:
            me.got.append(me.sock.recv(10))
            self.reactor.removeReader(other)
            return None

        first.doRead = lambda: read_and_drop_the_other(first, second)  # type: ignore[method-assign]
        second.doRead = lambda: read_and_drop_the_other(second, first)  # type: ignore[method-assign]
        peer1.send(b"1")
        peer2.send(b"2")
        self._step(lambda: first.got or second.got, "read")
        self.reactor.doIteration(0)
        self.assertEqual(len(first.got) + len(second.got), 1)
