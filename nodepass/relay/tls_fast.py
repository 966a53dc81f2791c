"""Relaying over TLS pool connections (Twisted's memory-BIO TLS layer).

Two things the relay core does not know about TLS:

* :func:`release_on_tls_shutdown` -- Twisted closes a TLS connection's socket
  only once no paused streaming producer is registered on it, and a TLS
  shutdown by the peer never reaches ``connectionLost`` while one is; so the
  relay's producer is let go when TLS ends.
* :func:`fast_tls` -- a quicker data path for a spliced TLS pool connection
  (whole chunks into ``SSL_write``, gathered ``SSL_read`` records), with
  Twisted's code still in charge of handshakes, shutdown and errors.
  ``NP_NO_FAST_TLS=1`` keeps Twisted's path (callers check it).
"""

from __future__ import annotations

from OpenSSL._util import ffi as _ffi, lib as _lib
from OpenSSL.SSL import WantReadError as SSLWantReadError
from twisted.internet import main
from twisted.internet.abstract import FileDescriptor
from twisted.protocols.tls import TLSMemoryBIOProtocol

from nodepass.relay.core import RelayEnd


def tls_protocol(end: RelayEnd):
    """The TLSMemoryBIOProtocol behind a relay end, if it talks TLS."""
    t = end.transport
    if isinstance(t, TLSMemoryBIOProtocol):
        return t  # client side: connectSSL wraps the protocol
    proto = getattr(t, "protocol", None)
    if getattr(t, "TLS", False) and isinstance(proto, TLSMemoryBIOProtocol):
        return proto  # server side: startTLS on the accepted connection
    return None


def release_on_tls_shutdown(end: RelayEnd) -> None:
    """When the peer ends TLS (close_notify) or TLS fails, let go of the
    relay's producer so the socket can actually close.

    Twisted closes a TLS connection's socket only once no paused streaming
    producer is registered on it; the relay unregisters producers when it
    sees ``connectionLost`` -- which a TLS shutdown never reaches while the
    producer is registered.  Without this, a relayed download whose user
    went away kept the exit side reading its target forever."""
    tls = tls_protocol(end)
    if tls is None:
        return
    finished = tls._tlsShutdownFinished

    def shutdown_finished(reason) -> None:
        finished(reason)
        try:
            tls.unregisterProducer()
        except Exception:  # noqa: BLE001 - nothing registered / already gone
            pass

    tls._tlsShutdownFinished = shutdown_finished


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
_tls_rbuf = None
_tls_wbuf = None
# Ciphertext is read from the socket into this buffer (instead of a new
# ``bytes`` per read, whose 1 MiB allocations glibc keeps returning to the
# kernel and faulting back in); OpenSSL decrypts straight out of it through a
# read-only memory BIO (see ``data_received``).
_tls_inbuf = None


def _mem_pending(bio) -> int:
    """Bytes waiting in a memory BIO."""
    return _lib.BIO_get_mem_data(bio, _ffi.new("char **"))


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
    global _tls_rbuf, _tls_wbuf, _tls_inbuf
    tls = tls_protocol(end)
    if tls is None or not tls._handshakeDone:
        return
    conn = tls._tlsConnection
    ssl_ptr = getattr(conn, "_ssl", None)
    out_bio = getattr(conn, "_from_ssl", None)
    if ssl_ptr is None or out_bio is None:
        return  # pyOpenSSL internals changed: keep Twisted's path
    if _tls_rbuf is None:
        _tls_rbuf = _ffi.new("char[]", _TLS_BUF_SIZE)
        _tls_wbuf = _ffi.new("char[]", _TLS_BUF_SIZE)
        _tls_inbuf = memoryview(bytearray(_TLS_BUF_SIZE))
    rbuf, wbuf, size = _tls_rbuf, _tls_wbuf, _TLS_BUF_SIZE
    # One SSL_write takes a whole chunk (the memory BIO never blocks).
    _lib.SSL_clear_mode(ssl_ptr, _lib.SSL_MODE_ENABLE_PARTIAL_WRITE)
    raw = tls.transport
    # The TCP connection under the TLS layer, written to directly when
    # Twisted holds nothing for it (server side: the connection startTLS ran
    # on, whose own write() would encrypt again; client side: the transport
    # connectSSL wrapped).
    sock_conn = end.transport if getattr(end.transport, "TLS", False) else raw
    sock = getattr(sock_conn, "socket", None)
    fd_write = FileDescriptor.write
    slow_write = tls.write
    slow_received = tls.dataReceived
    ssl_write, ssl_read, bio_read = _lib.SSL_write, _lib.SSL_read, _lib.BIO_read
    from_buffer, buffer = _ffi.from_buffer, _ffi.buffer
    new_mem_buf, set_mem_eof_return, set_bio = _lib.BIO_new_mem_buf, _lib.BIO_set_mem_eof_return, _lib.SSL_set_bio
    bio_new, s_mem, get_mem_data, bio_write = _lib.BIO_new, _lib.BIO_s_mem, _lib.BIO_get_mem_data, _lib.BIO_write
    left_ptr = _ffi.new("char **")

    def drain() -> None:
        while True:
            n = bio_read(out_bio, wbuf, size)
            if n <= 0:
                return
            view = buffer(wbuf, n)
            if (
                sock is not None
                and not sock_conn._tempDataLen
                and sock_conn.offset == len(sock_conn.dataBuffer)
                and sock_conn.connected
                and not sock_conn.disconnecting
            ):
                try:
                    sent = sock.send(view)
                except OSError:
                    sent = 0  # EAGAIN, or an error the normal path reports
                if sent == n:
                    continue
                view = view[sent:]
            if sock is not None:
                fd_write(sock_conn, bytes(view))  # under TLS: no re-encryption
            else:
                raw.write(bytes(view))

    def write(data) -> None:
        if tls.disconnecting or tls._lostTLSConnection or tls._appSendBuffer or len(data) > 0x7FFFFFFF:
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

    def data_received(data) -> None:
        if tls._lostTLSConnection or tls._appSendBuffer:
            slow_received(bytes(data))
            return
        got = 0
        fresh = _ffi.NULL if _mem_pending(conn._into_ssl) else bio_new(s_mem())
        if fresh != _ffi.NULL:
            # OpenSSL reads the ciphertext where it lies (a read-only memory
            # BIO over ``data``) instead of a copy in the memory BIO, which
            # is zero-filled as it grows; what it leaves goes into a fresh
            # memory BIO, which pyOpenSSL and Twisted keep using.
            with from_buffer(data) as cdata:
                view_bio = new_mem_buf(cdata, len(data))
                if view_bio == _ffi.NULL:
                    _lib.BIO_free(fresh)
                    raise MemoryError("BIO_new_mem_buf")
                set_mem_eof_return(view_bio, -1)
                set_bio(ssl_ptr, view_bio, out_bio)  # frees the empty ``into``
                try:
                    while got < size - 16384:
                        n = ssl_read(ssl_ptr, rbuf + got, size - got)
                        if n <= 0:
                            break
                        got += n
                finally:
                    left = get_mem_data(view_bio, left_ptr)
                    if left > 0:
                        bio_write(fresh, left_ptr[0], left)
                    set_bio(ssl_ptr, fresh, out_bio)  # frees ``view_bio``
                    conn._into_ssl = fresh
        else:
            conn.bio_write(data)
            while got < size - 16384:
                n = ssl_read(ssl_ptr, rbuf + got, size - got)
                if n <= 0:
                    break
                got += n
        if got and not tls._aborted:
            # A view of the shared buffer: the relay sends or copies it
            # before returning (RelayEnd only keeps data before a splice,
            # and this path is installed at splice time).
            end.dataReceived(memoryview(buffer(rbuf, got)))
        # No more records: find out why through pyOpenSSL (want-read is the
        # normal case; close_notify and errors go to Twisted's handling).
        try:
            record = conn.recv(16384)
        except SSLWantReadError:
            pass
        except Exception:  # noqa: BLE001
            tls._flushReceiveBIO()
            return
        else:  # more records than the buffer held: the rest the slow way
            if not tls._aborted:
                end.dataReceived(record)
            tls._flushReceiveBIO()
            return
        drain()  # post-handshake messages may want an answer

    inbuf = _tls_inbuf

    def do_read():
        """``Connection.doRead`` of the socket under the TLS layer, reading
        into the shared buffer (``data_received`` is done with it, or has
        copied what OpenSSL left, before returning)."""
        try:
            n = recv_into(inbuf, min(sock_conn.bufferSize, _TLS_BUF_SIZE))
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return main.CONNECTION_LOST
        if not n:
            return main.CONNECTION_DONE
        tls.dataReceived(inbuf[:n])
        return None

    tls.write = write
    tls.dataReceived = data_received
    recv_into = getattr(sock, "recv_into", None)
    if recv_into is not None and getattr(sock_conn, "protocol", None) is tls:
        sock_conn.doRead = do_read
    # ``write`` is done with a chunk when it returns (encrypted, or copied on
    # the slow path), so the relay may hand it a view of its read buffer
    # instead of a copy (``nodepass.relay._write_mode``).
    end.transport.takes_views = True
