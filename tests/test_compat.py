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

from nodepass.compat import aioquic_internals, openssl_internals, twisted_internals

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
        self.assertIs(twisted_internals.tls_layer(tls), tls)
        self.assertIsNone(twisted_internals.tls_connection_when_ready(tls))  # no handshake yet
        self.assertEqual(twisted_internals.tls_blockers(tls), (False, []))
        self.assertFalse(twisted_internals.tls_aborted(tls))
        slow_write, slow_received, flush = twisted_internals.install_tls_data_path(tls, print, print)
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
        twisted_internals.unregister_producer_on_tls_shutdown(tls)
        tls._tlsShutdownFinished(None)
        self.need(tls._lostTLSConnection, "TLSMemoryBIOProtocol._tlsShutdownFinished no longer marks the TLS connection lost")
        self.need(getattr(tls, "_producer", None) is None, "the producer is still registered after a TLS shutdown")

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


class WsprotoInternalsTests(InternalsCase):
    import wsproto as _wsproto
    import websockets as _websockets

    library = "wsproto/websockets"
    version = f"{_wsproto.__version__}/{_websockets.__version__}"
    module = "wsproto_internals"

    def test_masker_class_and_c_mask(self) -> None:
        import os

        from wsproto import frame_protocol

        from nodepass.compat import wsproto_internals

        self.need(wsproto_internals._apply_mask is not None, "websockets.speedups.apply_mask (the C function) is missing")
        self.need("XorMaskerSimple" in frame_protocol.FrameDecoder.process_buffer.__code__.co_names
                  or "XorMaskerSimple" in frame_protocol.FrameDecoder.parse_header.__code__.co_names,
                  "wsproto's FrameDecoder no longer builds its masker by the name XorMaskerSimple")
        self.need("XorMaskerSimple" in frame_protocol.FrameProtocol._serialize_frame.__code__.co_names,
                  "wsproto's _serialize_frame no longer builds its masker by the name XorMaskerSimple")
        key = os.urandom(4)
        ours, theirs = wsproto_internals.FastXorMasker(key), wsproto_internals._Simple(key)
        for size in (0, 1, 3, 4, 5, 1000, 65536, 7):  # pieces of one message: the key rotates
            data = bytearray(os.urandom(size))
            self.need(ours.process(data) == theirs.process(data), f"masking differs from wsproto's for {size} bytes")
