"""The parts of Twisted's TLS layer below its public API that nodepass
relies on (the rest of Twisted's internals we use are in
:mod:`nodepass.compat.twisted_internals`, which imports nothing of TLS).

Each one buys speed or a behaviour the public API does not offer (see
docs/benchmarks.md for the figures); ``tests/test_compat.py`` checks every
name here against the installed Twisted:

* ``tcp.Connection.TLS`` and ``.protocol`` after ``startTLS``, and the
  connection behind the TLS layer's transport then (``_newtls._BypassTLS``
  and its ``_connection``);
* ``BufferingTLSTransport._aggregator`` (its ``flush``), which holds small
  writes for a reactor turn;
* the steps of ``_newtls.startTLS``, which :func:`start_tls` takes itself:
  ``_tlsClientDefault`` (which side the connection is), the ``TLS`` flag,
  and ``_BypassTLS(base, connection)``, which writes the TLS layer's records
  with ``base.write(connection, data)`` (:func:`start_tls` gives it a base
  that sends them at once);
* the steps of ``TLSMemoryBIOProtocol.makeConnection``, which
  :class:`LeanTLSProtocol` takes itself: ``factory._creatorCallable``,
  ``_appSendBuffer``, ``factory.registerProtocol``, ``_connectWrapped`` and
  ``_checkHandshakeStatus``;
* ``TLSMemoryBIOProtocol``'s state: ``_tlsConnection``, ``_handshakeDone``,
  ``_lostTLSConnection``, ``_appSendBuffer``, ``_aborted``, and its methods
  ``_flushReceiveBIO``, ``_flushSendBIO`` (which :class:`LeanTLSProtocol`
  calls only when the outgoing BIO holds bytes) and
  ``_tlsShutdownFinished``, and its ``write`` and
  ``dataReceived`` looked up on the instance (so that one connection's can
  be replaced);
* what the TLS layer and ``startTLS`` leave on a closed connection: the
  instance attributes above, the ``getHandle``/``getPeerCertificate`` bound
  methods of the TLS layer ``startTLS`` puts on the connection, and the
  ``doRead``/``doWrite`` a relay installed (:func:`release_tls_layer` drops
  them, so that no reference cycle is left for the garbage collector);
* the interfaces ``TLSMemoryBIOProtocol.makeConnection`` copies from its
  transport with one ``directlyProvides`` each (zope.interface caches the
  declarations in a weak-value dictionary: :func:`keep_tls_declarations`).
"""

from __future__ import annotations

from operator import attrgetter
from types import MethodType
from typing import Any, Callable, Optional

from twisted.internet import tcp
from twisted.internet._newtls import _BypassTLS
from twisted.internet.abstract import FileDescriptor
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import providedBy
from zope.interface.declarations import Provides, implementedBy

from nodepass.compat.openssl_internals import mem_pending
from nodepass.compat.twisted_internals import unsent

# -- the TLS layer -----------------------------------------------------------
# The fast TLS path sets itself up once per relayed connection, on a path
# that is measured in connections per second: each helper below answers
# several questions in one call.


def tls_layer(transport: Any) -> Optional[TLSMemoryBIOProtocol]:
    """The ``TLSMemoryBIOProtocol`` of a connection, if it talks TLS: the
    transport itself (``connectSSL`` wraps the protocol), or the protocol of
    a TCP connection that ran ``startTLS``."""
    if isinstance(transport, TLSMemoryBIOProtocol):
        return transport
    proto = getattr(transport, "protocol", None)
    if getattr(transport, "TLS", False) and isinstance(proto, TLSMemoryBIOProtocol):
        return proto
    return None


def tls_connection_when_ready(tls: TLSMemoryBIOProtocol) -> Any:
    """The ``OpenSSL.SSL.Connection`` (memory BIOs) of the TLS layer once its
    handshake is done; None before, or once the connection is gone."""
    return tls._tlsConnection if tls._handshakeDone else None


def below_tls(transport: Any, tls: TLSMemoryBIOProtocol) -> tuple[Any, Any]:
    """``(connection, socket)``: the TCP connection under the TLS layer of
    ``transport`` (server side: the connection ``startTLS`` ran on; client
    side: the one ``connectSSL`` wrapped) and its socket (None if closed)."""
    if isinstance(transport, TLSMemoryBIOProtocol):
        # (A protocol wrapper: it would forward ``TLS`` to its protocol.)
        conn = transport.transport
    else:
        conn = transport if getattr(transport, "TLS", False) else tls.transport
    if isinstance(conn, _BypassTLS):
        # The TLS layer of a startTLS connection, given as the transport:
        # the wrapper it writes through forwards to the connection.
        conn = conn._connection
    return conn, getattr(conn, "socket", None)


class _SendAtOnce(FileDescriptor):
    """The base class ``_BypassTLS`` calls (unbound, with the TCP connection
    as ``self``) for the records of a TLS layer :func:`start_tls` made: a
    record goes to the socket at once when nothing is queued ahead of it.
    Twisted's own base (``FileDescriptor``) queues every record -- each
    handshake flight, the pool ID, close_notify -- and registers the socket
    for writing, to send it a reactor turn later (two ``epoll_ctl`` calls
    and a wake-up per record).  What the socket does not take is queued as
    before, so flow control and ordering are Twisted's."""

    def write(self, data: bytes) -> None:
        rest = unsent(self, data)
        if rest:
            FileDescriptor.write(self, rest)


#: ``id(transport declaration) -> (that declaration, the layer's)`` for
#: :class:`LeanTLSProtocol` (the declaration is kept, so its id is not reused).
_LAYER_PROVIDES: dict[tuple[type, int], tuple[Any, Any]] = {}
#: ``transport type -> Provides(type, ISSLTransport)`` for :func:`start_tls`.
_STARTED_PROVIDES: dict[type, Any] = {}
#: Bound on both caches (one entry per kind of transport in practice).
_CACHE_LIMIT = 64


def _layer_provides(layer_type: type, transport: Any) -> Any:
    """The interface declaration ``TLSMemoryBIOProtocol.makeConnection``
    leaves a layer of ``layer_type`` with over ``transport``, or None when
    it leaves none: one ``directlyProvides`` per interface the transport
    provides, each replacing the one before, so the last interface alone."""
    spec = providedBy(transport)
    key = (layer_type, id(spec))
    known = _LAYER_PROVIDES.get(key)
    if known is not None and known[0] is spec:
        return known[1]
    last = None
    for last in spec:
        pass
    provides = None if last is None else Provides(layer_type, last)
    if len(_LAYER_PROVIDES) < _CACHE_LIMIT:
        _LAYER_PROVIDES[key] = (spec, provides)
    return provides


class LeanTLSProtocol(BufferingTLSTransport):
    """Twisted's TLS layer (``BufferingTLSTransport``, the layer
    ``TLSMemoryBIOFactory`` builds), with its interface declaration made
    once per kind of transport.

    ``TLSMemoryBIOProtocol.makeConnection`` copies the interfaces its
    transport provides with one ``directlyProvides`` each.  Each call
    replaces the declaration before it, so the layer ends up providing the
    last interface alone, and the ten calls for a TCP connection's
    interfaces cost 26 µs per connection and end, among the largest Python
    costs of a short tls=1 request (docs/benchmarks.md, run V).  This ``makeConnection`` sets that same declaration from a cache
    and otherwise does what Twisted's does, in the same order
    (``tests/test_compat.py`` compares the two)."""

    def makeConnection(self, transport: Any) -> None:
        self._tlsConnection = self.factory._creatorCallable(self)
        self._appSendBuffer = []
        provides = _layer_provides(type(self), transport)
        if provides is not None:
            self.__provides__ = provides
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        if self._connectWrapped:
            ProtocolWrapper.makeConnection(self, transport)
        self._checkHandshakeStatus()

    def _tlsShutdownFinished(self, reason: Any) -> None:
        """Twisted's, with the reason's frames dropped first.  The reason is
        a ``Failure`` of an exception Twisted caught in ``_flushReceiveBIO``
        (or in the handshake): its traceback holds that method's frame, whose
        locals hold this layer and the ``Failure`` itself, and pyOpenSSL's
        frames, which hold the SSL connection -- a reference cycle for every
        TLS connection that ends without close_notify (a peer that died or
        was killed).  Processes that run tunnels collect cycles rarely
        (``nodepass.base.collector``), so a client whose server restarted
        kept its whole old pool, about 3 MB per restart at ``min=64``.  The
        type and the message stay (``cleanFailure``), which is what the
        layers above read."""
        if reason is not None:
            reason.cleanFailure()
        super()._tlsShutdownFinished(reason)

    def _flushSendBIO(self) -> None:
        """Twisted's, minus its exception when there is nothing to send:
        it reads the outgoing BIO and catches ``WantReadError`` when it is
        empty, which it is at most of the nine or so calls a short tls=1
        connection makes per end (a raised and caught pyOpenSSL error each).
        Asking the BIO first leaves the same outcome either way."""
        tls = self._tlsConnection
        if tls is not None and not mem_pending(tls._from_ssl):
            return
        super()._flushSendBIO()


def start_tls(transport: Any, context: Any) -> None:
    """``transport.startTLS(context)`` for a TCP connection (the side its
    ``_tlsClientDefault`` says), with the TLS layer's records sent at once
    (:class:`_SendAtOnce`) and the layer a :class:`LeanTLSProtocol`.  Any
    other transport runs its own ``startTLS``.

    What Twisted's ``_newtls.startTLS`` does, step by step: a streaming
    producer is set aside while the layer goes in; the layer becomes the
    connection's protocol, lends it ``getHandle`` and
    ``getPeerCertificate``, and the connection declares ``ISSLTransport``
    (alone, replacing what it declared before: a cached declaration here)
    and is marked ``TLS``; the layer then connects over ``_BypassTLS``,
    which starts the handshake."""
    if not isinstance(transport, tcp.Connection):
        transport.startTLS(context)
        return
    conn: Any = transport  # (attributes the TLS mixin and startTLS add)
    producer = conn.producer
    streaming = conn.streamingProducer
    if producer is not None:
        conn.unregisterProducer()
    no_wrapped_factory: Any = None  # (the layer wraps the connection's protocol)
    layer = LeanTLSProtocol(TLSMemoryBIOFactory(context, conn._tlsClientDefault, no_wrapped_factory), conn.protocol, False)
    conn.protocol = layer
    conn.getHandle = layer.getHandle
    conn.getPeerCertificate = layer.getPeerCertificate
    kind = type(conn)
    provides = _STARTED_PROVIDES.get(kind)
    if provides is None:
        provides = Provides(kind, ISSLTransport)
        if len(_STARTED_PROVIDES) < _CACHE_LIMIT:
            _STARTED_PROVIDES[kind] = provides
    conn.__provides__ = provides
    conn.TLS = True
    layer.makeConnection(_BypassTLS(_SendAtOnce, conn))
    if producer is not None:
        conn.registerProducer(producer, streaming)


def write_unbuffered(transport: Any, data: bytes) -> None:
    """Write ``data`` on a connection now: through its TLS layer without
    the reactor turn Twisted's ``BufferingTLSTransport`` holds small writes
    for (anything it holds goes first); a plain transport's ``write``
    otherwise."""
    tls = tls_layer(transport)
    if tls is None:
        transport.write(data)
        return
    aggregator = getattr(tls, "_aggregator", None)
    if aggregator is not None:
        aggregator.flush()
    TLSMemoryBIOProtocol.write(tls, data)


#: ``(TLS connection lost, cleartext waiting for the handshake)``: when
#: either is set, Twisted's own write and read paths must handle the data.
tls_blockers: Callable[[TLSMemoryBIOProtocol], tuple[bool, list]] = attrgetter("_lostTLSConnection", "_appSendBuffer")
#: Whether ``abortConnection`` was called (no more data for the protocol).
tls_aborted: Callable[[TLSMemoryBIOProtocol], bool] = attrgetter("_aborted")


def install_tls_data_path(
    tls: TLSMemoryBIOProtocol, write: Callable[[Any], None], data_received: Callable[[Any], None]
) -> tuple[Callable[[bytes], None], Callable[[bytes], None], Callable[[], None]]:
    """Route the TLS layer's cleartext writes and ciphertext reads through
    ``write`` and ``data_received``.  Returns what they fall back on:
    Twisted's own ``write`` and ``dataReceived``, and its "read what
    OpenSSL holds" step (which also handles close_notify and errors)."""
    # Twisted's default TLS transport (``BufferingTLSTransport``) holds small
    # writes in an aggregator until the next reactor turn: what it holds
    # goes out now, ahead of anything the new path writes, and the fallback
    # is the unbuffered write under it, so that nothing is reordered.
    aggregator = getattr(tls, "_aggregator", None)
    if aggregator is not None:
        aggregator.flush()
    original = (MethodType(TLSMemoryBIOProtocol.write, tls), tls.dataReceived, tls._flushReceiveBIO)
    # Instance attributes shadow the methods for this connection only.
    setattr(tls, "write", write)
    setattr(tls, "writeSequence", lambda seq: write(b"".join(seq)))
    setattr(tls, "dataReceived", data_received)
    return original


def unregister_producer_on_tls_shutdown(tls: TLSMemoryBIOProtocol) -> None:
    """Once the TLS layer has finished (close_notify from the peer, or a TLS
    error) and Twisted has handled it, unregister its producer.

    Twisted closes a TLS connection's socket only once no paused streaming
    producer is registered on it, and that shutdown never reaches
    ``connectionLost`` (where producers are usually let go) while one is."""
    finished = tls._tlsShutdownFinished

    def shutdown_finished(reason: Any) -> None:
        finished(reason)
        try:
            tls.unregisterProducer()
        except Exception:  # noqa: BLE001 - nothing registered / already gone
            pass

    setattr(tls, "_tlsShutdownFinished", shutdown_finished)  # this connection only


#: The methods the fast TLS path and :func:`unregister_producer_on_tls_shutdown`
#: shadow on one TLS layer (closures that hold the layer: reference cycles).
_TLS_SHADOWED = ("write", "writeSequence", "dataReceived", "_tlsShutdownFinished", "connectionLost")
#: What ``startTLS`` sets on the connection: bound methods of its TLS layer,
#: which holds the connection (through ``_BypassTLS``) -- a cycle too.
_START_TLS_BOUND = ("getHandle", "getPeerCertificate")


def release_tls_layer(transport: Any) -> None:
    """Break the reference cycles a closed TLS connection is left in, so
    that reference counting frees it instead of the garbage collector (a
    collection's worth of work per connection otherwise).

    ``transport`` is a pool end's transport once it is lost: the TLS layer
    itself (``connectSSL``) or the TCP connection that ran ``startTLS``.
    Drops the instance attributes the fast path and the shutdown hook put on
    the TLS layer, and on the TCP connection the TLS layer's ``getHandle``
    and ``getPeerCertificate`` (afterwards they raise, as any closed TCP
    connection's do; callers treat that as "no certificate") and the
    relay's ``doRead``/``doWrite``.  Nothing happens while the TCP
    connection is still open."""
    tls: Optional[TLSMemoryBIOProtocol] = None
    conn: Any = transport
    if isinstance(transport, TLSMemoryBIOProtocol):
        tls = transport
        conn = transport.transport
        if isinstance(conn, _BypassTLS):
            conn = conn._connection
    if not isinstance(conn, tcp.Connection):
        return  # no TCP connection under it (a QUIC, WebSocket or HTTP/2 stream)
    d = conn.__dict__
    if "socket" in d:
        return  # still open
    for name in _START_TLS_BOUND:
        bound = d.pop(name, None)
        owner = getattr(bound, "__self__", None)
        if tls is None and isinstance(owner, TLSMemoryBIOProtocol):
            tls = owner
    d.pop("doRead", None)
    d.pop("doWrite", None)
    if tls is not None:
        shadowed = tls.__dict__
        for name in _TLS_SHADOWED:
            shadowed.pop(name, None)


#: Interface declarations kept alive (see :func:`keep_tls_declarations`).
_KEPT_DECLARATIONS: dict[tuple[type, Any], Any] = {}


def keep_tls_declarations(*transport_types: type) -> None:
    """Keep the interface declarations that a TLS layer over one of
    ``transport_types`` gets, so that they are made once, not per connection.

    ``TLSMemoryBIOProtocol.makeConnection`` calls ``directlyProvides(self,
    interface)`` once for each interface its transport provides, each call
    replacing the previous declaration: every one but the last is dropped
    at once.  zope.interface caches declarations in a weak-value dictionary
    (``Provides``' documented behaviour), so each dropped one was built anew
    -- its resolution order computed in Python -- for every TLS connection
    (about 5% of a short tls=1 connection's CPU).  A startTLS connection
    also provides ``ISSLTransport``, which its TLS layer then copies too."""
    layers: set[type] = {TLSMemoryBIOProtocol, TLSMemoryBIOFactory.protocol, LeanTLSProtocol}
    for transport_type in transport_types:
        for interface in [ISSLTransport, *Provides(transport_type, ISSLTransport), *implementedBy(transport_type)]:
            for layer in layers:
                _KEPT_DECLARATIONS[layer, interface] = Provides(layer, interface)
