"""Where nodepass leans on the insides of the libraries it uses.

The relay's speed comes from reaching under public APIs (docs/benchmarks.md
says what each shortcut buys); those reaches live here and nowhere else, one
module per library -- :mod:`~nodepass.compat.twisted_internals`,
:mod:`~nodepass.compat.openssl_internals`,
:mod:`~nodepass.compat.aioquic_internals`,
:mod:`~nodepass.compat.wsproto_internals`,
:mod:`~nodepass.compat.h2_internals`; Twisted's lean TCP transports
(a subclass of ``tcp.Connection``) are big enough for a module of their
own, :mod:`~nodepass.compat.twisted_fastpath` -- so that an upgrade that moves
them breaks in one place, and ``tests/test_compat.py`` names the library
and version that did it.  The package imports only third-party libraries."""
