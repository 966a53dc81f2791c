"""Relaying over TLS pool connections (Twisted's memory-BIO TLS layer).

Three things the relay core does not know about TLS:

* :func:`release_on_tls_shutdown` -- Twisted closes a TLS connection's socket
  only once no paused streaming producer is registered on it, and a TLS
  shutdown by the peer never reaches ``connectionLost`` while one is; so the
  relay's producer is let go when TLS ends.
* :func:`fast_tls` -- a quicker data path for a spliced TLS pool connection
  (whole chunks into ``SSL_write``, gathered ``SSL_read`` records), with
  Twisted's code still in charge of handshakes, shutdown and errors;
  :func:`install` puts the same path under any TLS transport, for a
  protocol that reads through it (the WebSocket pool's streams, the HTTP/2
  pool's connections).  ``NP_NO_FAST_TLS=1`` keeps Twisted's path (callers
  check :data:`ENABLED`).
* :func:`release_tls` -- once a TLS pool connection is lost, the reference
  cycles of its TLS layer (the fast path's closures, ``startTLS``'s bound
  methods) are broken, so that reference counting frees it.

All work under the public APIs of Twisted's TLS layer and of pyOpenSSL
(docs/benchmarks.md gives what the fast path buys: about a sixth of the CPU
per GB); what they touch lives in ``nodepass.compat.twisted_internals`` and
``nodepass.compat.openssl_internals``.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence

from OpenSSL.SSL import WantReadError as SSLWantReadError
from twisted.internet import tcp
from twisted.protocols.tls import TLSMemoryBIOProtocol

from nodepass.compat import openssl_internals as ossl
from nodepass.compat.twisted_fastpath import LeanConnection
from nodepass.compat.twisted_internals import read_into, write_buffers, write_under_tls
from nodepass.compat.twisted_tls import (
    below_tls,
    install_tls_data_path,
    keep_tls_declarations,
    release_tls_layer,
    tls_aborted,
    tls_blockers,
    tls_connection_when_ready,
    tls_layer,
    unregister_producer_on_tls_shutdown,
)
from nodepass.relay.core import RelayEnd

# TLS pool connections run over lean connections (startTLS) and Twisted's
# client connections: their TLS layers' interface declarations are made once.
keep_tls_declarations(LeanConnection, tcp.Client)


#: Whether the fast TLS data path is used: ``NP_NO_FAST_TLS=1``
#: (docs/tunnels.md) keeps Twisted's.  Read once per process, not for each
#: connection (an ``os.environ`` lookup encodes the name every time).
ENABLED = not os.environ.get("NP_NO_FAST_TLS")


def tls_protocol(end: RelayEnd) -> Optional[TLSMemoryBIOProtocol]:
    """The TLSMemoryBIOProtocol behind a relay end, if it talks TLS."""
    return tls_layer(end.transport)


def release_on_tls_shutdown(end: RelayEnd) -> None:
    """When the peer ends TLS (close_notify) or TLS fails, let go of the
    relay's producer so the socket can actually close.

    Twisted closes a TLS connection's socket only once no paused streaming
    producer is registered on it; the relay unregisters producers when it
    sees ``connectionLost`` -- which a TLS shutdown never reaches while the
    producer is registered.  Without this, a relayed download whose user
    went away kept the exit side reading its target forever."""
    tls = tls_layer(end.transport)
    if tls is not None:
        unregister_producer_on_tls_shutdown(tls)


def release_tls(transport: Any) -> None:
    """Once a TLS pool connection is lost (from its protocol's
    ``connectionLost``): break the reference cycles its TLS layer is in --
    the fast path's closures and ``startTLS``'s bound methods -- so that it
    is freed at once rather than by the garbage collector (whose work was
    about a tenth of a short tls=1 connection's CPU).  Nothing happens to
    a plain or still open connection."""
    if transport is not None:
        release_tls_layer(transport)


#: Read size (and write high-water mark) for both ends of a relay over a
#: fast-path TLS pool connection.  Larger than the plain relays' 256 KiB:
#: one chunk is one ``SSL_write`` and one ``send`` of its ciphertext, and
#: fewer, larger chunks cut the CPU per GB of both tunnel ends by about a
#: sixth (plain pairs move to ``splice(2)`` instead, whose chunk is 1 MiB).
TLS_RELAY_BUFFER_SIZE = 1 << 20

# Buffers for the TLS fast path: the reactor runs one callback at a time and
# every byte is copied out before a call returns, so one pair is enough.
# Twice the chunk size, so that a whole chunk's ciphertext (the chunk plus
# 22 bytes per record) leaves in one ``send`` and a whole read's plaintext is
# forwarded at once.
_TLS_BUF_SIZE = 2 * TLS_RELAY_BUFFER_SIZE
_tls_rbuf: Any = None
_tls_wbuf: Any = None
# Ciphertext is read from the socket into this buffer (instead of a new
# ``bytes`` per read, whose 1 MiB allocations glibc keeps returning to the
# kernel and faulting back in); OpenSSL decrypts straight out of it through a
# read-only memory BIO (see ``data_received``).
_tls_inbuf: Optional[memoryview] = None


def fast_tls(end: RelayEnd) -> None:
    """A quicker data path for a spliced TLS pool connection.

    Twisted's TLS wrapper hands OpenSSL 16 KiB at a time, flushes the
    ciphertext after each record and delivers each decrypted record on its
    own -- several Python round trips and, downstream, one ``send`` per
    16 KiB.  Here a relayed chunk goes to OpenSSL in one ``SSL_write`` and
    its ciphertext leaves in one write; received records are gathered into
    one buffer and forwarded as one chunk.  Anything unusual (shutdown,
    errors, buffered writes, a closing connection) goes back to Twisted's own
    code, which stays in charge of the TLS lifecycle.  Flow control is
    unchanged: ciphertext still goes through the underlying transport."""
    if install(end.transport, end.dataReceived) is None:
        return
    # ``write`` is done with a chunk when it returns (encrypted, or copied on
    # the slow path), so the relay may hand it a view of its read buffer
    # instead of a copy (``nodepass.relay.core._write_mode``).
    end.transport.takes_views = True


#: What :func:`install` gives back: ``write_parts(parts)`` encrypts each of
#: ``parts`` (bytes or views, done with when it returns) and sends the
#: ciphertext of all of them at once.
WriteParts = Callable[[Sequence[Any]], None]


def install(transport: Any, deliver: Callable[[Any], None]) -> Optional[WriteParts]:
    """Put the fast TLS data path under ``transport`` (a TLS transport:
    a ``TLSMemoryBIOProtocol``, or a TCP connection that ran ``startTLS``)
    once its handshake is done; None (and nothing changed) when it is not
    TLS, the handshake is not done, or pyOpenSSL's internals moved.

    From then on ``transport.write`` encrypts a whole chunk in one
    ``SSL_write``, and decrypted bytes go to ``deliver(data)`` -- a view of
    a shared buffer that must not be kept past the call -- instead of the
    TLS layer's protocol (a relay end, or a WebSocket or HTTP/2 connection
    that reads through it).  Twisted stays in charge of close_notify,
    errors and anything arriving while the path is blocked; those still
    reach the TLS layer's protocol (whose ``dataReceived`` must then do
    what ``deliver`` does)."""
    global _tls_rbuf, _tls_wbuf, _tls_inbuf
    tls = tls_layer(transport)
    if tls is None:
        return None
    conn = tls_connection_when_ready(tls)
    access = ossl.memory_bio_access(conn)
    if access is None:
        return None  # no handshake yet, or pyOpenSSL internals changed: keep Twisted's path
    ssl_ptr, out_bio, input_pending, set_into = access
    ffi, lib = ossl.ffi, ossl.lib
    if _tls_rbuf is None or _tls_inbuf is None:
        _tls_rbuf = ffi.new("char[]", _TLS_BUF_SIZE)
        _tls_wbuf = ffi.new("char[]", _TLS_BUF_SIZE)
        _tls_inbuf = memoryview(bytearray(_TLS_BUF_SIZE))
    rbuf, wbuf, size = _tls_rbuf, _tls_wbuf, _TLS_BUF_SIZE
    # One SSL_write takes a whole chunk (the memory BIO never blocks).
    lib.SSL_clear_mode(ssl_ptr, lib.SSL_MODE_ENABLE_PARTIAL_WRITE)
    raw: Any = tls.transport
    # The TCP connection under the TLS layer, written to directly when
    # Twisted holds nothing for it (a TCP or WebSocket pool connection, at
    # either end: the connection startTLS ran on, whose own write() would
    # encrypt again; an HTTP/2 pool's client connection: the transport
    # connectSSL wrapped).
    sock_conn, sock = below_tls(transport, tls)
    queue_raw = write_under_tls(sock_conn)
    ssl_write, ssl_read, bio_read = lib.SSL_write, lib.SSL_read, lib.BIO_read
    get_error, want_read = lib.SSL_get_error, lib.SSL_ERROR_WANT_READ
    from_buffer, buffer, null = ffi.from_buffer, ffi.buffer, ffi.NULL
    new_mem_buf, set_mem_eof_return, set_bio = lib.BIO_new_mem_buf, lib.BIO_set_mem_eof_return, lib.SSL_set_bio
    bio_new, s_mem, get_mem_data, bio_write = lib.BIO_new, lib.BIO_s_mem, lib.BIO_get_mem_data, lib.BIO_write
    left_ptr = ffi.new("char **")

    def drain() -> None:
        while True:
            n = bio_read(out_bio, wbuf, size)
            if n <= 0:
                return
            view = buffer(wbuf, n)
            if sock is not None:
                temp, offset, queued = write_buffers(sock_conn)
                if not temp and offset == len(queued) and sock_conn.connected and not sock_conn.disconnecting:
                    try:
                        sent = sock.send(view)
                    except OSError:
                        sent = 0  # EAGAIN, or an error the normal path reports
                    if sent == n:
                        continue
                    view = view[sent:]
                queue_raw(bytes(view))  # under TLS: no re-encryption
            else:
                raw.write(bytes(view))

    def write(data: Any) -> None:
        lost, waiting = tls_blockers(tls)
        if tls.disconnecting or lost or waiting or len(data) > 0x7FFFFFFF:
            slow_write(bytes(data))
            return
        with from_buffer(data) as cdata:
            n = ssl_write(ssl_ptr, cdata, len(data))
        if n != len(data):
            # Not expected with a memory BIO; let pyOpenSSL report/buffer it.
            drain()
            slow_write(bytes(data))
            return
        drain()

    def data_received(data: Any) -> None:
        lost, waiting = tls_blockers(tls)
        if lost or waiting:
            slow_received(bytes(data))
            return
        got = 0
        # Why ``SSL_read`` stopped, asked of OpenSSL right after it (no
        # pyOpenSSL exception per read): want-read is the normal case;
        # None when the buffer filled up first.
        status: Optional[int] = None
        fresh = null if input_pending() else bio_new(s_mem())
        if fresh != null:
            # OpenSSL reads the ciphertext where it lies (a read-only memory
            # BIO over ``data``) instead of a copy in the memory BIO, which
            # is zero-filled as it grows; what it leaves goes into a fresh
            # memory BIO, which pyOpenSSL and Twisted keep using.
            with from_buffer(data) as cdata:
                view_bio = new_mem_buf(cdata, len(data))
                if view_bio == null:
                    lib.BIO_free(fresh)
                    raise MemoryError("BIO_new_mem_buf")
                set_mem_eof_return(view_bio, -1)
                set_bio(ssl_ptr, view_bio, out_bio)  # frees the empty ``into``
                try:
                    while got < size - 16384:
                        n = ssl_read(ssl_ptr, rbuf + got, size - got)
                        if n <= 0:
                            status = get_error(ssl_ptr, n)
                            break
                        got += n
                finally:
                    left = get_mem_data(view_bio, left_ptr)
                    if left > 0:
                        bio_write(fresh, left_ptr[0], left)
                    set_bio(ssl_ptr, fresh, out_bio)  # frees ``view_bio``
                    set_into(fresh)
        else:
            conn.bio_write(data)
            while got < size - 16384:
                n = ssl_read(ssl_ptr, rbuf + got, size - got)
                if n <= 0:
                    status = get_error(ssl_ptr, n)
                    break
                got += n
        if got and not tls_aborted(tls):
            # A view of the shared buffer: ``deliver`` sends or copies it
            # before returning.
            deliver(memoryview(buffer(rbuf, got)))
        if status == want_read:
            drain()  # post-handshake messages may want an answer
            return
        if status is not None:
            # close_notify, or an error: Twisted's handling (its own
            # ``recv`` sees the same state and raises what it means).
            flush_receive()
            return
        # The buffer filled up: find out through pyOpenSSL whether more
        # records wait.
        try:
            record = conn.recv(16384)
        except SSLWantReadError:
            pass
        except Exception:  # noqa: BLE001
            flush_receive()
            return
        else:  # more records than the buffer held: the rest the slow way
            if not tls_aborted(tls):
                deliver(record)
            flush_receive()
            return
        drain()  # post-handshake messages may want an answer

    def write_parts(parts: Sequence[Any]) -> None:
        lost, waiting = tls_blockers(tls)
        if tls.disconnecting or lost or waiting:
            for part in parts:
                slow_write(bytes(part))
            return
        for i, part in enumerate(parts):
            n = len(part)
            if not n:
                continue
            if n > 0x7FFFFFFF:
                drain()
                for later in parts[i:]:
                    slow_write(bytes(later))
                return
            with from_buffer(part) as cdata:
                done = ssl_write(ssl_ptr, cdata, n)
            if done != n:
                drain()
                for later in parts[i:]:
                    slow_write(bytes(later))
                return
        drain()

    recv_into: Any = getattr(sock, "recv_into", None)

    slow_write, slow_received, flush_receive = install_tls_data_path(tls, write, data_received)
    if recv_into is not None and getattr(sock_conn, "protocol", None) is tls:
        # The socket under the TLS layer reads into the shared buffer
        # (``data_received`` is done with it, or has copied what OpenSSL
        # left, before it returns).
        read_into(sock_conn, _tls_inbuf, lambda _tls, chunk: data_received(chunk), tls)
    return write_parts
