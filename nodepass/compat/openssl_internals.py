"""The parts of pyOpenSSL below its public API that nodepass relies on.

The TLS fast path (``nodepass.relay.tls_fast``) calls OpenSSL through the
cffi binding pyOpenSSL itself uses, on the ``SSL`` object and memory BIOs of
a pyOpenSSL ``Connection``: one ``SSL_write`` per relayed chunk, records
gathered by ``SSL_read`` into one buffer, ciphertext decrypted where it lies
(docs/benchmarks.md, "TLS relay path").  Relied on, and checked by
``tests/test_compat.py`` against the installed pyOpenSSL:

* ``OpenSSL._util.ffi`` and ``OpenSSL._util.lib`` (:data:`ffi`, :data:`lib`)
  with the functions and constants in :data:`LIB_NAMES`;
* a memory-BIO ``Connection``'s ``_ssl`` (the ``SSL *``), ``_from_ssl``
  (the BIO OpenSSL writes ciphertext to) and ``_into_ssl`` (the BIO it
  reads ciphertext from, which the fast path swaps).

Hot paths bind these once per connection (``lib.SSL_write`` and the
accessors below are plain callables made once per connection), never look
them up per chunk."""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional

from OpenSSL._util import ffi, lib

#: The ``lib`` functions and constants the fast path uses.
LIB_NAMES = (
    "SSL_write",
    "SSL_read",
    "SSL_get_error",
    "SSL_ERROR_WANT_READ",
    "SSL_set_bio",
    "SSL_clear_mode",
    "SSL_MODE_ENABLE_PARTIAL_WRITE",
    "BIO_new",
    "BIO_s_mem",
    "BIO_new_mem_buf",
    "BIO_set_mem_eof_return",
    "BIO_get_mem_data",
    "BIO_read",
    "BIO_write",
    "BIO_free",
)


def memory_bio_access(conn: Any) -> Optional[tuple[Any, Any, Callable[[], int], Callable[[Any], None]]]:
    """What the fast path needs of a memory-BIO ``Connection``, or None if
    pyOpenSSL no longer has it: ``(ssl, output, pending, set_input)`` --
    the ``SSL *``, the BIO OpenSSL writes ciphertext to, a function telling
    how many ciphertext bytes wait in the BIO it reads from, and one that
    makes pyOpenSSL (``conn.bio_write``, ``conn.recv``) use a new input BIO
    after ``SSL_set_bio`` gave OpenSSL one (a C-level partial)."""
    ssl = getattr(conn, "_ssl", None)
    output = getattr(conn, "_from_ssl", None)
    if ssl is None or output is None or not hasattr(conn, "_into_ssl"):
        return None
    get_mem_data = lib.BIO_get_mem_data
    out = ffi.new("char **")

    def pending() -> int:
        return get_mem_data(conn._into_ssl, out)

    return ssl, output, pending, partial(setattr, conn, "_into_ssl")


#: Where ``BIO_get_mem_data`` puts its pointer for :func:`mem_pending`
#: (one reactor thread; the pointer is never read).
_MEM_DATA_OUT = ffi.new("char **")


def mem_pending(bio: Any) -> int:
    """Bytes waiting in a memory BIO."""
    return int(lib.BIO_get_mem_data(bio, _MEM_DATA_OUT))


def session_reused(conn: Any) -> bool:
    """Whether a pyOpenSSL ``Connection`` resumed a TLS session
    (``SSL_session_reused``, which pyOpenSSL does not wrap)."""
    return bool(lib.SSL_session_reused(conn._ssl))


__all__ = ["LIB_NAMES", "ffi", "lib", "mem_pending", "memory_bio_access", "session_reused"]
