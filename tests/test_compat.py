"""The library internals nodepass relies on are still there, in the shape
``nodepass/compat/`` expects.

Each library nodepass reaches into (Twisted, pyOpenSSL, aioquic) has one
compatibility module; these tests look at every name those modules use --
present, callable or of the expected kind, still called where we hook in --
against the *installed* library, and a failure names the library and its
version, so that an upgrade that moved an internal says so in one line
instead of as a relay that silently stopped working."""

from __future__ import annotations

import inspect
from typing import Any

import aioquic
import OpenSSL
import twisted
from twisted.trial import unittest

from nodepass.compat import aioquic_internals, openssl_internals, twisted_internals, twisted_tls

_MISSING = object()


class InternalsCase(unittest.TestCase):
    """``need*`` checks that fail naming the library, its version and the
    compat module that relies on the internal (no tests of its own)."""

    library = ""
    version = ""
    module = ""

    def need(self, ok: bool, what: str) -> None:
        if not ok:
            self.fail(
                f"{self.library} {self.version}: {what} -- relied on by nodepass/compat/{self.module}.py; "
                f"adapt that module to this version (or keep {self.library} below it in pyproject.toml)"
            )

    def need_attr(self, obj: Any, name: str, kind: Any = None, where: str = "") -> Any:
        """``obj.name`` exists (and is an instance of ``kind``, or callable
        when ``kind`` is ``callable``); returns it."""
        where = where or getattr(obj, "__name__", type(obj).__name__)
        value = getattr(obj, name, _MISSING)
        self.need(value is not _MISSING, f"{where}.{name} is missing")
        if kind is callable:
            self.need(callable(value), f"{where}.{name} is no longer callable (it is {type(value).__name__})")
        elif kind is not None:
            self.need(
                isinstance(value, kind),
                f"{where}.{name} is a {type(value).__name__}, expected {getattr(kind, '__name__', kind)}",
            )
        return value

    def need_parameters(self, func: Any, names: tuple[str, ...], where: str) -> None:
        params = tuple(inspect.signature(func).parameters)
        self.need(params[: len(names)] == names, f"{where} takes {params}, expected {names}")


class TwistedInternalsTests(InternalsCase):
    library, version, module = "Twisted", twisted.__version__, "twisted_internals"

    def test_write_buffers_of_a_file_descriptor(self) -> None:
        from twisted.internet.abstract import FileDescriptor

        fd = FileDescriptor()
        temp = self.need_attr(fd, "_tempDataLen", int, "FileDescriptor()")
        self.need_attr(fd, "dataBuffer", bytes, "FileDescriptor()")
        offset = self.need_attr(fd, "offset", int, "FileDescriptor()")
        self.need((temp, offset) == (0, 0), f"a fresh FileDescriptor holds {temp} bytes at offset {offset}")
        self.assertEqual(twisted_internals.queued_bytes(fd), 0)
        self.assertEqual(twisted_internals.queued_bytes(None), 0)

    def test_tcp_connection(self) -> None:
        import socket

        from twisted.internet import reactor, tcp
        from twisted.internet.protocol import Protocol

        self.need_attr(tcp.Connection, "doRead", callable)
        self.need_attr(tcp.Connection, "doWrite", callable)
        self.need_attr(tcp.Connection, "startWriting", callable)
        self.need(getattr(tcp.Connection, "TLS", None) is False, "tcp.Connection.TLS (False until startTLS) is gone")
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        conn = tcp.Connection(ours, Protocol(), reactor)
        self.need(getattr(conn, "socket", None) is ours, "tcp.Connection no longer keeps its socket as .socket")
        self.need_attr(conn, "_tempDataLen", int, "tcp.Connection")
        self.need_attr(conn, "bufferSize", int, "tcp.Connection")
        self.assertTrue(twisted_internals.is_plain_tcp(conn))
        self.assertIs(twisted_internals.socket_of(conn), ours)
        conn.connected = True  # as the reactor marks it once connected
        twisted_internals.write_through(conn, memoryview(b"through"))
        self.assertEqual(twisted_internals.queued_bytes(conn), 0)
        self.assertEqual(theirs.recv(16), b"through")

    def test_read_results_and_raw_write(self) -> None:
        from twisted.internet import error
        from twisted.internet.abstract import FileDescriptor

        self.need(isinstance(twisted_internals.CONNECTION_DONE, error.ConnectionDone), "main.CONNECTION_DONE changed")
        self.need(isinstance(twisted_internals.CONNECTION_LOST, error.ConnectionLost), "main.CONNECTION_LOST changed")
        self.need_parameters(FileDescriptor.write, ("self", "data"), "FileDescriptor.write")

    def test_reactor_exit_signal(self) -> None:
        from twisted.internet.base import ReactorBase

        self.need("_exitSignal" in vars(ReactorBase), "ReactorBase._exitSignal (the signal twistd re-raises) is gone")

    def test_twistd_runner_keeps_its_options(self) -> None:
        from twisted.application.app import ApplicationRunner

        config = {"profile": None, "profiler": "cprofile", "debug": False, "savestats": False}
        runner = ApplicationRunner(config)
        self.need(getattr(runner, "config", None) is config, "ApplicationRunner no longer keeps its options as .config")
        code = ApplicationRunner.createOrGetApplication.__code__
        self.need(
            "getApplication" in code.co_names,
            "ApplicationRunner.createOrGetApplication no longer loads the .tac file itself (the stack walk finds no runner)",
        )

        class Runner(ApplicationRunner):
            def load(self) -> Any:
                return twisted_internals.running_twistd_config()

        self.assertIs(Runner(config).load(), config)
        self.assertIsNone(twisted_internals.running_twistd_config())


    def test_http_channel(self) -> None:
        """The master's HTTP site: the channel behind ``Site``'s proxy, its
        flow-control flag, and the hook it calls to refuse a request head
        (``nodepass.master.site.MasterChannel`` overrides it to answer 431
        instead of closing)."""
        from twisted.internet.testing import StringTransport
        from twisted.web import http, server

        site = server.Site(None)
        proto = site.buildProtocol(None)
        proto.makeConnection(StringTransport())
        channel = self.need_attr(proto, "_channel", http.HTTPChannel, "_GenericHTTPChannelProtocol")
        self.assertIs(twisted_internals.http_channel_transport(proto), channel.transport)
        channel.setTimeout(None)
        self.need(
            isinstance(getattr(channel, "_waitingForTransport", None), bool),
            "HTTPChannel._waitingForTransport (a bool) is gone",
        )
        self.assertFalse(twisted_internals.http_channel_paused(channel))
        hook = self.need_attr(http.HTTPChannel, "_respondToBadRequestAndDisconnect", callable, "HTTPChannel")
        self.need_parameters(hook, ("self",), "HTTPChannel._respondToBadRequestAndDisconnect")
        self.need(
            "_respondToBadRequestAndDisconnect" in http.HTTPChannel.lineReceived.__code__.co_names
            or "_respondToBadRequestAndDisconnect" in http.HTTPChannel.headerReceived.__code__.co_names,
            "HTTPChannel no longer calls _respondToBadRequestAndDisconnect for a bad request head",
        )
        proto.connectionLost(None)


class OpenSSLInternalsTests(InternalsCase):
    library, version, module = "pyOpenSSL", OpenSSL.__version__, "openssl_internals"

    def test_cffi_binding(self) -> None:
        ffi, lib = openssl_internals.ffi, openssl_internals.lib
        for name in ("new", "from_buffer", "buffer", "typeof"):
            self.need_attr(ffi, name, callable, "OpenSSL._util.ffi")
        self.need_attr(ffi, "NULL", None, "OpenSSL._util.ffi")
        for name in openssl_internals.LIB_NAMES:
            if name.isupper() or name.startswith("SSL_MODE_"):
                self.need_attr(lib, name, int, "OpenSSL._util.lib")
            else:
                self.need_attr(lib, name, callable, "OpenSSL._util.lib")

    def test_session_reused(self) -> None:
        from OpenSSL import SSL

        self.need_attr(openssl_internals.lib, "SSL_session_reused", callable, "OpenSSL._util.lib")
        conn = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
        self.assertFalse(openssl_internals.session_reused(conn))

    def test_memory_bio_connection(self) -> None:
        from OpenSSL import SSL

        ffi = openssl_internals.ffi
        conn = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
        for name, ctype in (("_ssl", "SSL *"), ("_from_ssl", "BIO *"), ("_into_ssl", "BIO *")):
            value = self.need_attr(conn, name, None, "Connection")
            try:
                cname = ffi.typeof(value).cname
            except TypeError:
                cname = type(value).__name__
            self.need(cname == ctype, f"Connection.{name} is a {cname}, expected {ctype}")
        access = openssl_internals.memory_bio_access(conn)
        self.need(access is not None, "a memory-BIO Connection lacks _ssl, _from_ssl or _into_ssl")
        assert access is not None
        ssl, output, pending, set_input = access
        self.assertEqual(openssl_internals.mem_pending(output), 0)
        self.assertEqual(pending(), 0)
        conn.bio_write(b"ciphertext")
        self.assertEqual(pending(), len(b"ciphertext"))
        # After a swap, pyOpenSSL's own calls use the new BIO.
        lib = openssl_internals.lib
        fresh = lib.BIO_new(lib.BIO_s_mem())
        set_input(fresh)
        self.need(conn._into_ssl == fresh, "Connection._into_ssl can no longer be replaced")
        conn.bio_write(b"more")
        self.assertEqual(pending(), len(b"more"))
        lib.SSL_set_bio(ssl, fresh, output)  # frees the old input BIO, as the fast path does
        self.assertIsNone(openssl_internals.memory_bio_access(None))


class AioquicInternalsTests(InternalsCase):
    library, version, module = "aioquic", aioquic.__version__, "aioquic_internals"

    def test_stream_limit_hook(self) -> None:
        from aioquic.quic.connection import QuicConnection

        hook = self.need_attr(QuicConnection, "_write_stream_limits", callable)
        self.need_parameters(hook, ("self", "builder", "space", "stream"), "QuicConnection._write_stream_limits")
        self.need(
            "_write_stream_limits" in QuicConnection._write_application.__code__.co_names,
            "QuicConnection._write_application no longer calls _write_stream_limits (the sliding window is ignored)",
        )
        delivery = self.need_attr(QuicConnection, "_on_max_stream_data_delivery", callable)
        self.need_parameters(delivery, ("self", "delivery", "stream"), "QuicConnection._on_max_stream_data_delivery")
        from aioquic.quic import connection, packet

        self.need_attr(connection, "MAX_STREAM_DATA_FRAME_CAPACITY", int, "aioquic.quic.connection")
        self.need_attr(packet.QuicFrameType, "MAX_STREAM_DATA", None, "QuicFrameType")

    def test_connection_state(self) -> None:
        from aioquic.quic.configuration import QuicConfiguration
        from aioquic.quic.connection import QuicConnection

        conn = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=["np-quic"]))
        limit = self.need_attr(conn, "_local_max_streams_bidi", None, "QuicConnection")
        self.need_attr(limit, "value", int, "QuicConnection._local_max_streams_bidi")
        self.need_attr(conn, "_remote_max_streams_bidi", int, "QuicConnection")
        self.need_attr(conn, "_streams", dict, "QuicConnection")
        aioquic_internals.allow_peer_streams(conn, 7)
        self.assertEqual(limit.value, 7)
        self.assertIs(aioquic_internals.stream_table(conn), conn._streams)
        self.assertFalse(aioquic_internals.has_stream_credit(conn))  # nothing granted before the handshake
        conn.connect(("127.0.0.1", 4433), now=0.0)
        tls = self.need_attr(conn, "tls", None, "QuicConnection")
        self.need_attr(tls, "_peer_certificate", None, "QuicConnection.tls")
        self.need_attr(tls, "_peer_certificate_chain", list, "QuicConnection.tls")
        self.assertEqual(aioquic_internals.peer_certificates(conn), (None, []))

    def test_stream_state(self) -> None:
        from aioquic.quic.stream import QuicStream

        stream = QuicStream(stream_id=0, max_stream_data_local=1024, max_stream_data_remote=1024)
        self.need_attr(stream, "max_stream_data_local", int, "QuicStream")
        self.need_attr(stream, "max_stream_data_local_sent", int, "QuicStream")
        receiver = self.need_attr(stream, "receiver", None, "QuicStream")
        self.need_attr(receiver, "highest_offset", int, "QuicStreamReceiver")
        self.need_attr(receiver, "is_finished", bool, "QuicStreamReceiver")
        sender = self.need_attr(stream, "sender", None, "QuicStream")
        self.need_attr(sender, "_buffer_start", int, "QuicStreamSender")
        self.need_attr(sender, "_buffer_stop", int, "QuicStreamSender")
        stream.sender.write(b"x" * 10)
        self.need(aioquic_internals.sender_offsets(stream) == (10, 0), "QuicStreamSender no longer counts written bytes")
        try:
            aioquic_internals.hold(stream, True)
            first = aioquic_internals.claim(stream)
        except AttributeError:
            self.need(False, "QuicStream no longer accepts attributes of ours (__slots__?)")
        self.assertTrue(first)
        self.assertFalse(aioquic_internals.claim(stream))
        self.assertFalse(aioquic_internals.receive_finished(stream))


class TwistedTLSTransportTests(InternalsCase):
    """The TLS-layer internals the WebSocket and HTTP/2 pools' fast TLS
    path relies on (issue 12), and the TLS layer's state the TCP pool's."""

    library, version, module = "Twisted", twisted.__version__, "twisted_tls"

    def test_start_tls_marks_the_connection(self) -> None:
        from twisted.internet import _newtls

        source = inspect.getsource(_newtls.startTLS)
        self.need("transport.TLS = True" in source, "startTLS no longer sets transport.TLS")
        self.need("transport.protocol = tlsProtocol" in source, "startTLS no longer makes the TLS layer the protocol")

    def test_tls_layer_state(self) -> None:
        from OpenSSL import SSL
        from twisted.internet.protocol import Factory, Protocol
        from twisted.internet.ssl import optionsForClientTLS
        from twisted.internet.testing import StringTransport
        from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol

        factory = TLSMemoryBIOFactory(optionsForClientTLS("example.com"), True, Factory.forProtocol(Protocol))
        tls = factory.buildProtocol(None)
        tls.makeConnection(StringTransport())
        where = "TLSMemoryBIOProtocol"
        self.need_attr(tls, "_tlsConnection", SSL.Connection, where)
        self.need_attr(tls, "_handshakeDone", bool, where)
        self.need_attr(tls, "_lostTLSConnection", bool, where)
        self.need_attr(tls, "_appSendBuffer", list, where)
        self.need_attr(tls, "_aborted", bool, where)
        self.need_attr(tls, "_flushReceiveBIO", callable, where)
        self.need_attr(tls, "_tlsShutdownFinished", callable, where)
        self.need_parameters(TLSMemoryBIOProtocol._tlsShutdownFinished, ("self", "reason"), f"{where}._tlsShutdownFinished")
        self.assertIs(twisted_tls.tls_layer(tls), tls)
        self.assertIsNone(twisted_tls.tls_connection_when_ready(tls))  # no handshake yet
        self.assertEqual(twisted_tls.tls_blockers(tls), (False, []))
        self.assertFalse(twisted_tls.tls_aborted(tls))
        slow_write, slow_received, flush = twisted_tls.install_tls_data_path(tls, print, print)
        self.assertTrue(callable(slow_write) and callable(slow_received))
        self.assertEqual((slow_received.__self__, slow_received.__name__), (tls, "dataReceived"))
        self.assertEqual((flush.__self__, flush.__name__), (tls, "_flushReceiveBIO"))
        self.assertIs(tls.write, print)
        # The producer is let go after Twisted's own shutdown handling.
        seen = []

        class Producer:
            def stopProducing(self) -> None:
                seen.append("stopped")

        tls.registerProducer(Producer(), True)
        twisted_tls.unregister_producer_on_tls_shutdown(tls)
        tls._tlsShutdownFinished(None)
        self.need(tls._lostTLSConnection, "TLSMemoryBIOProtocol._tlsShutdownFinished no longer marks the TLS connection lost")
        self.need(getattr(tls, "_producer", None) is None, "the producer is still registered after a TLS shutdown")

    def _started_tls(self) -> tuple[Any, Any, Any]:
        """A TCP connection over one end of a socket pair that ran
        Twisted's own ``startTLS`` as the server side: (connection, its
        socket, its TLS layer)."""
        import socket

        from twisted.internet import reactor, tcp
        from twisted.internet.protocol import Protocol
        from twisted.internet.ssl import CertificateOptions

        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        conn = tcp.Connection(ours, Protocol(), reactor)
        conn._tlsClientDefault = False
        conn.startTLS(CertificateOptions())
        return conn, ours, twisted_tls.tls_layer(conn)

    def test_start_tls_layer_finds_its_connection(self) -> None:
        """Given the TLS layer of a ``startTLS`` connection (what a stream
        pool protocol gets as its transport), ``below_tls`` finds the TCP
        connection through Twisted's ``_BypassTLS`` wrapper."""
        from twisted.internet import _newtls

        self.need_attr(_newtls, "_BypassTLS", None, "twisted.internet._newtls")
        conn, ours, tls = self._started_tls()
        self.need(tls is conn.protocol, "startTLS no longer makes the TLS layer the connection's protocol")
        self.need(isinstance(tls.transport, _newtls._BypassTLS), "the TLS layer of startTLS no longer writes through _BypassTLS")
        self.need(getattr(tls.transport, "_connection", None) is conn, "_BypassTLS no longer keeps the connection as _connection")
        self.assertEqual(twisted_tls.below_tls(tls, tls), (conn, ours))
        self.assertEqual(twisted_tls.below_tls(conn, tls), (conn, ours))

    def test_start_tls_sends_its_records_at_once(self) -> None:
        """``start_tls`` gives ``_BypassTLS`` a base that sends the TLS
        layer's records at once: the ClientHello is on
        the wire when it returns, nothing queued and no write registration."""
        import socket

        from twisted.internet import _newtls, reactor, tcp
        from twisted.internet.protocol import Protocol
        from twisted.internet.ssl import CertificateOptions

        source = inspect.getsource(_newtls._BypassTLS.write)
        self.need("self._base.write(self._connection, data)" in source,
                  "_BypassTLS.write no longer writes through its base class with the connection")
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        conn = tcp.Connection(ours, Protocol(), reactor)
        conn.connected = True
        conn._tlsClientDefault = True
        twisted_tls.start_tls(conn, CertificateOptions())
        self.assertTrue(conn.TLS)
        self.assertEqual(twisted_internals.queued_bytes(conn), 0)
        self.assertNotIn(conn, reactor.getWriters())
        hello = theirs.recv(65536)
        self.assertEqual(hello[:1], b"\x16")  # a TLS handshake record
        conn.connected = False

    def test_start_tls_leaves_what_twisted_start_tls_leaves(self) -> None:
        """``start_tls`` (with ``LeanTLSProtocol``) takes ``_newtls.startTLS``'s
        and ``TLSMemoryBIOProtocol.makeConnection``'s steps itself: on both
        sides, it leaves the connection and its TLS layer with the same
        attributes, the same interface declarations, a registered layer, a
        re-registered producer and a handshake under way, as Twisted's own
        ``startTLS`` does."""
        import socket

        from OpenSSL import SSL
        from twisted.internet import reactor, tcp
        from twisted.internet.protocol import Protocol
        from twisted.internet.ssl import CertificateOptions
        from zope.interface import providedBy

        from nodepass.net.tls import _server_options, generate_self_signed

        class Producer:
            def pauseProducing(self) -> None: ...

            def resumeProducing(self) -> None: ...

            def stopProducing(self) -> None: ...

        from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory

        self.need(TLSMemoryBIOFactory.protocol is BufferingTLSTransport, "TLSMemoryBIOFactory no longer builds BufferingTLSTransport layers")
        cert, key = generate_self_signed()

        def started(client: bool, ours: bool) -> tuple[Any, Any, bytes]:
            a, b = socket.socketpair()
            self.addCleanup(a.close)
            self.addCleanup(b.close)
            proto = Protocol()
            conn = tcp.Connection(a, proto, reactor)
            # (Before the sockets close: the reactor must not keep the fd.)
            self.addCleanup(lambda: (reactor.removeReader(conn), reactor.removeWriter(conn)))
            conn.connected = True
            conn._tlsClientDefault = client
            producer = Producer()
            conn.registerProducer(producer, True)
            context = CertificateOptions() if client else _server_options(cert, key)
            if ours:
                twisted_tls.start_tls(conn, context)
            else:
                conn.startTLS(context)
            # (Re-registered through the TLS layer, which wraps it.)
            self.assertIs(getattr(conn.producer, "_producer", None), producer)
            self.assertTrue(conn.streamingProducer)
            layer = conn.protocol
            self.assertIs(layer.wrappedProtocol, proto)
            self.assertIn(layer, layer.factory.protocols)
            self.assertIsInstance(layer._tlsConnection, SSL.Connection)
            self.assertIs(conn.getHandle(), layer._tlsConnection)
            b.setblocking(False)
            try:
                sent = b.recv(65536)
            except BlockingIOError:
                sent = b""
            # What Twisted's own startTLS holds for its next turn.
            sent += conn.dataBuffer[conn.offset :] + b"".join(conn._tempDataBuffer)
            conn.unregisterProducer()
            conn.connected = False
            return conn, layer, sent

        for client in (True, False):
            side = "client" if client else "server"
            theirs_conn, theirs_layer, theirs_sent = started(client, ours=False)
            conn, layer, sent = started(client, ours=True)
            self.assertIsInstance(layer, twisted_tls.LeanTLSProtocol)
            self.assertIsInstance(theirs_layer, BufferingTLSTransport)
            self.need(
                sorted(vars(conn)) == sorted(vars(theirs_conn)),
                f"startTLS ({side}) leaves the connection with {sorted(vars(theirs_conn))}, start_tls with {sorted(vars(conn))}",
            )
            self.need(
                sorted(vars(layer)) == sorted(vars(theirs_layer)),
                f"TLSMemoryBIOProtocol.makeConnection ({side}) sets {sorted(vars(theirs_layer))}, LeanTLSProtocol {sorted(vars(layer))}",
            )
            self.assertEqual(list(providedBy(conn)), list(providedBy(theirs_conn)))
            self.assertEqual(list(providedBy(layer)), list(providedBy(theirs_layer)))
            self.assertIs(providedBy(layer), layer.__provides__)  # the cached declaration, not the class's
            # A client starts with its ClientHello (sent at once by
            # start_tls, queued for a turn by Twisted's); a server waits.
            self.assertEqual(sent[:1], b"\x16" if client else b"", side)
            self.assertEqual(theirs_sent[:1], sent[:1], side)

    def test_lean_layer_flushes_only_what_is_there(self) -> None:
        """``LeanTLSProtocol._flushSendBIO`` sends what the outgoing BIO
        holds (the ClientHello) and, with it empty, does nothing -- without
        the read that would raise ``WantReadError``."""
        from OpenSSL import SSL
        from twisted.internet.protocol import Protocol
        from twisted.internet.ssl import optionsForClientTLS
        from twisted.internet.testing import StringTransport
        from twisted.protocols.tls import TLSMemoryBIOFactory

        factory = TLSMemoryBIOFactory(optionsForClientTLS("example.com"), True, None)  # type: ignore[arg-type]
        layer = twisted_tls.LeanTLSProtocol(factory, Protocol(), False)
        transport = StringTransport()
        layer.makeConnection(transport)
        hello = transport.value()
        self.assertEqual(hello[:1], b"\x16")
        transport.clear()
        reads: list = []
        tls = layer._tlsConnection
        original = tls.bio_read

        def bio_read(size: int) -> bytes:
            reads.append(size)
            return original(size)

        tls.bio_read = bio_read
        layer._flushSendBIO()
        self.assertEqual((transport.value(), reads), (b"", []))
        with self.assertRaises(SSL.WantReadError):  # what it spared
            original(2**15)

    def test_unbuffered_tls_write_is_not_held_for_a_turn(self) -> None:
        """``write_unbuffered`` goes past ``BufferingTLSTransport``'s
        aggregator, after anything it holds."""
        from twisted.internet.protocol import Factory, Protocol
        from twisted.internet.ssl import optionsForClientTLS
        from twisted.internet.testing import StringTransport
        from twisted.protocols.tls import TLSMemoryBIOFactory

        factory = TLSMemoryBIOFactory(optionsForClientTLS("example.com"), True, Factory.forProtocol(Protocol))
        tls = factory.buildProtocol(None)
        tls.makeConnection(StringTransport())
        tls.write(b"held")
        twisted_tls.write_unbuffered(tls, b"now")
        self.assertEqual(tls._aggregator._buffer, [])
        self.assertEqual(tls._appSendBuffer, [b"held", b"now"])  # (no handshake yet: kept in order)

    def test_closed_start_tls_connection_lets_go_of_its_tls_layer(self) -> None:
        """What ``release_tls_layer`` drops once a startTLS connection is
        closed: the TLS layer's bound methods ``startTLS`` put on the
        connection, a relay's ``doRead``, and the fast path's instance
        attributes on the TLS layer -- and nothing while it is open."""
        import socket

        from twisted.internet import error, reactor, tcp
        from twisted.internet.protocol import Protocol
        from twisted.internet.ssl import CertificateOptions
        from twisted.python.failure import Failure

        ours, theirs = socket.socketpair()
        self.addCleanup(theirs.close)
        conn = tcp.Connection(ours, Protocol(), reactor)
        conn._tlsClientDefault = False
        conn.startTLS(CertificateOptions())
        tls = twisted_tls.tls_layer(conn)
        for name in ("getHandle", "getPeerCertificate"):
            bound = vars(conn).get(name)
            self.need(getattr(bound, "__self__", None) is tls, f"startTLS no longer sets the TLS layer's {name} on the connection")
        twisted_tls.install_tls_data_path(tls, print, print)
        twisted_tls.unregister_producer_on_tls_shutdown(tls)
        conn.doRead = print  # as a relay's read_into does
        twisted_tls.release_tls_layer(conn)  # open: kept
        self.assertIn("getHandle", vars(conn))
        self.assertIn("write", vars(tls))
        conn.connected = True
        conn.connectionLost(Failure(error.ConnectionDone()))
        self.need("socket" not in vars(conn), "tcp.Connection.connectionLost no longer lets go of .socket")
        twisted_tls.release_tls_layer(conn)
        for name in ("getHandle", "getPeerCertificate", "doRead", "doWrite"):
            self.assertNotIn(name, vars(conn))
        for name in ("write", "writeSequence", "dataReceived", "_tlsShutdownFinished", "connectionLost"):
            self.assertNotIn(name, vars(tls))
        twisted_tls.release_tls_layer(conn)  # twice: nothing left to do

    def test_tls_layers_interface_declarations_are_made_once(self) -> None:
        """``TLSMemoryBIOProtocol.makeConnection`` declares each interface of
        its transport with ``directlyProvides``; once kept, those
        declarations are zope.interface's cached ones (not built anew per
        connection)."""
        from twisted.internet import tcp
        from twisted.protocols.tls import TLSMemoryBIOProtocol
        from zope.interface import providedBy
        from zope.interface.declarations import Provides

        source = inspect.getsource(TLSMemoryBIOProtocol.makeConnection)
        self.need("directlyProvides(self, interface)" in source,
                  "TLSMemoryBIOProtocol.makeConnection no longer declares its transport's interfaces one by one")
        twisted_tls.keep_tls_declarations(tcp.Connection)
        conn, _ours, tls = self._started_tls()
        interfaces = list(providedBy(conn))
        self.assertTrue(interfaces)
        kept = twisted_tls._KEPT_DECLARATIONS
        for interface in interfaces:
            declaration = kept.get((type(tls), interface))
            self.assertIsNotNone(declaration, interface)
            self.need(Provides(type(tls), interface) is declaration, "zope.interface no longer caches Provides declarations")
        self.assertIs(tls.__provides__, kept[type(tls), interfaces[-1]])

    def test_buffered_tls_writes_are_flushed_before_the_fast_path(self) -> None:
        """Twisted's default TLS transport holds small writes for a reactor
        turn; installing the fast path sends them first, and its fallback
        write does not hold (nothing can be reordered)."""
        from twisted.internet.protocol import Factory, Protocol
        from twisted.internet.ssl import optionsForClientTLS
        from twisted.internet.testing import StringTransport
        from twisted.protocols import tls as tls_module
        from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol

        self.need_attr(tls_module, "BufferingTLSTransport", None, "twisted.protocols.tls")
        factory = TLSMemoryBIOFactory(optionsForClientTLS("example.com"), True, Factory.forProtocol(Protocol))
        tls = factory.buildProtocol(None)
        self.need(isinstance(tls, tls_module.BufferingTLSTransport), "TLSMemoryBIOFactory no longer builds BufferingTLSTransport")
        aggregator = self.need_attr(tls, "_aggregator", None, "BufferingTLSTransport")
        self.need_attr(aggregator, "flush", callable, "BufferingTLSTransport._aggregator")
        self.need_attr(aggregator, "_buffer", list, "BufferingTLSTransport._aggregator")
        wire = StringTransport()
        tls.makeConnection(wire)
        tls.write(b"held")  # before the handshake: held by the aggregator (then by the TLS layer)
        self.need(aggregator._buffer == [b"held"], "BufferingTLSTransport no longer holds small writes in _aggregator")
        written: list[bytes] = []
        slow_write, _, _ = twisted_tls.install_tls_data_path(tls, written.append, print)
        self.assertEqual(aggregator._buffer, [])  # flushed into the TLS layer, ahead of anything else
        self.assertEqual(tls._appSendBuffer, [b"held"])  # (no handshake yet: the TLS layer keeps it)
        self.assertEqual(slow_write.__func__, TLSMemoryBIOProtocol.write)
        tls.write(b"new")
        tls.writeSequence([b"a", b"b"])  # through the new path too, not the aggregator
        self.assertEqual(written, [b"new", b"ab"])
        self.assertEqual(aggregator._buffer, [])

    def test_write_parts_through_a_socket(self) -> None:
        import socket

        from twisted.internet import reactor, tcp
        from twisted.internet.protocol import Protocol

        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        self.need_attr(ours, "sendmsg", callable, "socket")
        conn = tcp.Connection(ours, Protocol(), reactor)
        conn.connected = True
        twisted_internals.write_parts_through(conn, (b"head", memoryview(b"-payload")))
        self.assertEqual(twisted_internals.queued_bytes(conn), 0)
        self.assertEqual(theirs.recv(64), b"head-payload")
        # What the socket does not take is queued, in order, as bytes.
        ours.setblocking(False)
        big = b"x" * (8 << 20)
        twisted_internals.write_parts_through(conn, (b"H", memoryview(big)))
        queued = twisted_internals.queued_bytes(conn)
        self.assertGreater(queued, 0)
        twisted_internals.write_parts_through(conn, (b"T", b"ail"))  # behind the queue, not through the socket
        self.assertEqual(twisted_internals.queued_bytes(conn), queued + 4)
        conn.stopWriting()  # (never let the reactor flush it)


class H2InternalsTests(InternalsCase):
    import h2 as _h2
    import hyperframe as _hyperframe

    library = "h2/hyperframe"
    version = f"{_h2.__version__}/{_hyperframe.__version__}"
    module = "h2_internals"

    def test_frames_pass_through_prepare_for_sending(self) -> None:
        from h2.connection import H2Connection

        from nodepass.compat import h2_internals

        hook = self.need_attr(H2Connection, "_prepare_for_sending", callable, "H2Connection")
        self.need_parameters(hook, ("self", "frames"), "H2Connection._prepare_for_sending")
        for name in ("send_data", "end_stream", "send_headers", "increment_flow_control_window", "reset_stream", "ping"):
            method = getattr(H2Connection, name)
            self.need("_prepare_for_sending" in method.__code__.co_names,
                      f"H2Connection.{name} no longer queues its frames through _prepare_for_sending")
        self.need("_data_to_send" in H2Connection.data_to_send.__code__.co_names,
                  "H2Connection.data_to_send no longer reads _data_to_send")
        self.need_attr(H2Connection, "clear_outbound_data_buffer", callable, "H2Connection")
        self.assertTrue(issubclass(h2_internals.LeanH2Connection, H2Connection))

    def test_lean_connection_sends_the_same_bytes(self) -> None:
        """Everything a pool connection does, through h2's own connection
        and through ours: the same bytes on the wire, in the same order."""
        import os

        from h2.config import H2Configuration
        from h2.connection import H2Connection
        from h2.errors import ErrorCodes

        from nodepass.compat import h2_internals

        payloads = [b"\x00", b"ping\n", os.urandom(1023), os.urandom(1024), os.urandom(16384), os.urandom(32767),
                    os.urandom(32768), os.urandom(300_000)]

        def script(conn: Any, take: Any) -> list[bytes]:
            out: list[bytes] = []
            conn.initiate_connection()
            conn.increment_flow_control_window(1 << 20)
            out.append(take(conn))
            for sid in (1, 3):
                conn.send_headers(sid, [(":method", "POST"), (":path", "/stream"), (":scheme", "https"),
                                        (":authority", "example")])
                for data in payloads:
                    conn.send_data(sid, memoryview(data) if len(data) > 1000 else data)
                    if len(data) == 1024:
                        conn.ping(b"12345678")
                        out.append(take(conn))
                conn.send_data(sid, b"y" * 2000, end_stream=True)
                out.append(take(conn))
            conn.send_headers(5, [(":method", "POST"), (":path", "/stream"), (":scheme", "https"), (":authority", "e")])
            conn.send_data(5, b"z" * 4096, pad_length=7)
            conn.reset_stream(5, ErrorCodes.CANCEL)
            out.append(take(conn))
            return out

        from h2.settings import SettingCodes, Settings

        config = dict(client_side=True, header_encoding="utf-8")
        plain = H2Connection(H2Configuration(**config))
        lean = h2_internals.LeanH2Connection(H2Configuration(**config))
        for conn in (plain, lean):
            # As if the peer allowed big frames and windows.
            conn.remote_settings = Settings(client=False, initial_values={SettingCodes.INITIAL_WINDOW_SIZE: 1 << 30})
            conn.max_outbound_frame_size = 1 << 20
            conn.outbound_flow_control_window = 1 << 30
        want = script(plain, lambda c: c.data_to_send())
        pieces: list[int] = []

        def take(c: Any) -> bytes:
            parts = c.output_parts()
            pieces.append(len(parts))
            return b"".join(parts)

        got = script(lean, take)
        self.need(got == want, "LeanH2Connection's frames differ from H2Connection's")
        self.assertGreater(max(pieces), 4)  # large DATA frames came as pieces of their own
        self.assertEqual(lean.output_parts(), [])
        # data_to_send still returns everything, joined, and amounts work.
        lean2 = h2_internals.LeanH2Connection(H2Configuration(**config))
        plain2 = H2Connection(H2Configuration(**config))
        for conn in (plain2, lean2):
            conn.max_outbound_frame_size = 1 << 20
            conn.initiate_connection()
            conn.send_headers(1, [(":method", "POST"), (":path", "/"), (":scheme", "https"), (":authority", "e")])
            conn.send_data(1, b"w" * 5000)
        whole = plain2.data_to_send()
        self.assertEqual(lean2.data_to_send(10) + lean2.data_to_send(), whole)
        lean2.send_data(1, b"v" * 5000)
        lean2.clear_outbound_data_buffer()
        self.assertEqual(lean2.output_parts(), [])

    def test_data_frame_repr_is_cheap(self) -> None:
        from hyperframe.frame import DataFrame, Frame

        from nodepass.compat import h2_internals

        self.need_attr(Frame, "_body_repr", callable, "hyperframe Frame")
        self.need("_body_repr" in Frame.__repr__.__code__.co_names, "hyperframe's Frame.__repr__ no longer calls _body_repr")
        h2_internals.install()
        frame = DataFrame(1, b"\xff" * (1 << 20))
        text = repr(frame)
        self.assertLess(len(text), 200)
        self.assertIn("1048576 bytes", text)


class WsprotoApplyMaskTests(InternalsCase):
    import websockets as _websockets

    library, version, module = "websockets", _websockets.__version__, "wsproto_internals"

    def test_apply_mask_is_wsprotos_masking(self) -> None:
        import os

        from wsproto import frame_protocol

        from nodepass.compat import wsproto_internals

        self.need(wsproto_internals._apply_mask is not None, "websockets.speedups.apply_mask (the C function) is missing")
        for size in (0, 1, 3, 4, 5, 1000, 65536, 7):
            key, data = os.urandom(4), os.urandom(size)
            want = bytes(frame_protocol.XorMaskerSimple(bytearray(key)).process(bytearray(data)))
            self.need(wsproto_internals.apply_mask(data, key) == want, f"apply_mask differs from wsproto's for {size} bytes")
            self.need(wsproto_internals.apply_mask(memoryview(data), key) == want, "apply_mask no longer takes views")


class H2FrameBufferTests(InternalsCase):
    import h2 as _h2
    import hyperframe as _hyperframe

    library = "h2/hyperframe"
    version = f"{_h2.__version__}/{_hyperframe.__version__}"
    module = "h2_internals"

    def test_frame_buffer_internals(self) -> None:
        from h2.connection import H2Connection
        from h2.frame_buffer import FrameBuffer

        buf = FrameBuffer(server=True)
        for name in ("_data", "_preamble", "_preamble_len", "max_frame_size"):
            self.need_attr(buf, name, None, "FrameBuffer")
        self.need(isinstance(buf._data, bytearray), "FrameBuffer._data is no longer a bytearray")
        for name in ("_validate_frame_length", "_update_header_buffer"):
            self.need_attr(FrameBuffer, name, callable, "FrameBuffer")
        self.need_parameters(FrameBuffer._update_header_buffer, ("self", "f"), "FrameBuffer._update_header_buffer")
        self.need("incoming_buffer" in H2Connection.receive_data.__code__.co_names,
                  "H2Connection.receive_data no longer reads frames from self.incoming_buffer")
        self.need("FrameBuffer" in H2Connection.__init__.__code__.co_names,
                  "H2Connection.__init__ no longer makes its incoming_buffer a FrameBuffer")

    def _server_stream(self) -> tuple[bytes, bytes, bytes]:
        """(client preface + request, server answer with many frames, a big
        DATA frame) from plain h2 connections."""
        import os

        from h2.config import H2Configuration
        from h2.connection import H2Connection
        from h2.settings import SettingCodes, Settings

        client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        client.initiate_connection()
        client.send_headers(1, [(b":method", b"POST"), (b":path", b"/stream"), (b":scheme", b"https"),
                                (b":authority", b"example")])
        client.send_data(1, b"\x00")
        request = client.data_to_send()
        server = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        server.local_settings = Settings(client=False, initial_values={SettingCodes.MAX_FRAME_SIZE: 1 << 20})
        server.initiate_connection()
        server.receive_data(request)
        server.send_headers(1, [(b":status", b"200"), (b"x-long", b"v" * 300)])
        for size, pad in ((4, None), (0, None), (700, 9), (1, 0), (300, None)):
            server.send_data(1, os.urandom(size), pad_length=pad)
        server.ping(b"pingpong")
        server.increment_flow_control_window(1000)
        server.increment_flow_control_window(500, 1)
        answer = server.data_to_send()
        server.remote_settings = Settings(client=True, initial_values={SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20})
        server.outbound_flow_control_window = 1 << 20
        server.max_outbound_frame_size = 1 << 16
        server.send_data(1, os.urandom(60_000), end_stream=True)
        return request, answer, server.data_to_send()

    def _client_pair(self) -> tuple[Any, Any]:
        from h2.config import H2Configuration
        from h2.connection import H2Connection

        from nodepass.compat import h2_internals

        pair = []
        for cls in (H2Connection, h2_internals.LeanH2Connection):
            conn = cls(H2Configuration(client_side=True, header_encoding=None))
            conn.max_inbound_frame_size = 1 << 16
            conn.initiate_connection()
            conn.send_headers(1, [(b":method", b"POST"), (b":path", b"/stream"), (b":scheme", b"https"),
                                  (b":authority", b"example")])
            conn.data_to_send()
            pair.append(conn)
        return pair[0], pair[1]

    def test_lean_reader_splits_anywhere_like_h2(self) -> None:
        """The same bytes, cut anywhere (and given as views of a buffer that
        is overwritten afterwards): the same events as h2's own reader."""
        _, answer, big = self._server_stream()
        wire = answer + big
        cuts = list(range(0, len(answer) + 12)) + [len(answer) + 5000, len(wire) - 1, len(wire)]
        for cut in cuts:
            plain, lean = self._client_pair()
            want, got = [], []
            for piece in (wire[:cut], wire[cut:]):
                want += plain.receive_data(piece)
                scratch = bytearray(piece)
                got += lean.receive_data(memoryview(scratch))
                scratch[:] = b"\xee" * len(scratch)  # (the fast path reuses its buffer)
            self.need([repr(e) for e in got] == [repr(e) for e in want], f"LeanFrameBuffer's events differ (cut {cut})")
            self.assertEqual(lean.data_to_send(), plain.data_to_send())
        # One byte at a time.
        plain, lean = self._client_pair()
        want, got = [], []
        for i in range(len(answer)):
            want += plain.receive_data(answer[i : i + 1])
            got += lean.receive_data(answer[i : i + 1])
        self.assertEqual([repr(e) for e in got], [repr(e) for e in want])

    def test_lean_server_reads_the_preface_and_refuses_like_h2(self) -> None:
        from h2.config import H2Configuration
        from h2.connection import H2Connection
        from h2.exceptions import FrameTooLargeError, ProtocolError

        from nodepass.compat import h2_internals

        request, _, _ = self._server_stream()
        for cut in range(len(request) + 1):
            plain = H2Connection(H2Configuration(client_side=False, header_encoding=None))
            lean = h2_internals.LeanH2Connection(H2Configuration(client_side=False, header_encoding=None))
            want = plain.receive_data(request[:cut]) + plain.receive_data(request[cut:])
            got = lean.receive_data(request[:cut]) + lean.receive_data(request[cut:])
            self.assertEqual([repr(e) for e in got], [repr(e) for e in want], cut)
        # A frame over the limit: the same error, and the bytes are let go.
        lean = h2_internals.LeanH2Connection(H2Configuration(client_side=False, header_encoding=None))
        lean.receive_data(request)
        oversize = (20000).to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01" + b"z" * 20000
        with self.assertRaises((FrameTooLargeError, ProtocolError)):
            lean.receive_data(memoryview(bytearray(oversize)))
        self.assertIsNone(lean.incoming_buffer._np_view)
