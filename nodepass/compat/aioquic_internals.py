"""The parts of aioquic below its public API that nodepass relies on.

The QUIC pool (``nodepass.pools.quic``) drives aioquic's sans-I/O
``QuicConnection`` and needs a few things it does not publish, all checked
by ``tests/test_compat.py`` against the installed aioquic:

* ``QuicConnection._write_stream_limits(builder, space, stream)``, called for
  every stream while packets are built, and ``_on_max_stream_data_delivery``
  -- overridden by :class:`SlidingWindowConnection` so a stream's receive
  window follows its reader (aioquic doubles it whether or not the data was
  taken);
* ``QuicStream.max_stream_data_local`` / ``max_stream_data_local_sent``,
  ``QuicStreamReceiver.highest_offset`` / ``is_finished``;
* ``QuicConnection._local_max_streams_bidi`` (a ``Limit``: the streams the
  peer may open, announced in the transport parameters),
  ``_remote_max_streams_bidi`` (the streams the peer lets us open) and
  ``_streams`` (stream objects by ID; the same dict for the connection's
  life);
* ``QuicStreamSender._buffer_start`` / ``_buffer_stop`` (bytes written and
  not yet acknowledged);
* ``conn.tls._peer_certificate`` / ``_peer_certificate_chain`` (what the
  peer presented, for a refusal that says why);
* stream objects that accept attributes of ours (no ``__slots__``)."""

from __future__ import annotations

from operator import attrgetter
from typing import Any, Callable, Optional

from aioquic.quic.connection import MAX_STREAM_DATA_FRAME_CAPACITY, QuicConnection
from aioquic.quic.packet import QuicFrameType
from aioquic.quic.stream import QuicStream

#: ``(written up to, acknowledged up to)`` offsets of a stream's sender.
sender_offsets: Callable[[QuicStream], tuple[int, int]] = attrgetter("sender._buffer_stop", "sender._buffer_start")


class SlidingWindowConnection(QuicConnection):
    """A ``QuicConnection`` whose stream receive windows slide: at most
    :attr:`receive_window` bytes beyond what was received, and widened only
    while the stream is not held (:func:`hold`) -- a paused reader's peer
    stops once one window is buffered, so nothing grows without bound."""

    #: Receive window per stream, in bytes.
    receive_window = 1024 * 1024

    def _write_stream_limits(self, builder: Any, space: Any, stream: QuicStream) -> None:
        limit = stream.max_stream_data_local
        if limit and not getattr(stream, "np_held", False):
            window = self.receive_window
            target = stream.receiver.highest_offset + window
            if target - limit >= window // 2:
                stream.max_stream_data_local = target
        if stream.max_stream_data_local_sent != stream.max_stream_data_local:
            buf = builder.start_frame(
                QuicFrameType.MAX_STREAM_DATA,
                capacity=MAX_STREAM_DATA_FRAME_CAPACITY,
                handler=self._on_max_stream_data_delivery,
                handler_args=(stream,),
            )
            buf.push_uint_var(stream.stream_id)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local


def allow_peer_streams(conn: QuicConnection, count: int) -> None:
    """How many bidirectional streams the peer may have open at once (the
    transport parameter ``initial_max_streams_bidi``); call before
    ``connect``/the first datagram."""
    conn._local_max_streams_bidi.value = count


def stream_table(conn: QuicConnection) -> dict[int, QuicStream]:
    """The connection's streams by ID (the same dict for its life)."""
    return conn._streams


def has_stream_credit(conn: QuicConnection) -> bool:
    """The peer lets this connection open another bidirectional stream now."""
    return conn.get_next_available_stream_id() // 4 < conn._remote_max_streams_bidi


def receive_finished(stream: QuicStream) -> bool:
    """The peer's direction of the stream is over (FIN or reset seen)."""
    return bool(stream.receiver.is_finished)


def hold(stream: QuicStream, held: bool) -> None:
    """Stop (or resume) widening the stream's receive window."""
    setattr(stream, "np_held", held)  # our mark on aioquic's object


def claim(stream: QuicStream) -> bool:
    """Mark a peer-opened stream as handed to the application; False when it
    was already (late data on a stream we have closed)."""
    if getattr(stream, "np_seen", False):
        return False
    setattr(stream, "np_seen", True)  # our mark on aioquic's object
    return True


def peer_certificates(conn: QuicConnection) -> tuple[Optional[Any], list]:
    """``(leaf, chain)`` the peer presented in the TLS handshake, as
    ``cryptography`` certificates (``(None, [])`` before there are any)."""
    tls = getattr(conn, "tls", None)
    leaf = getattr(tls, "_peer_certificate", None)
    return leaf, list(getattr(tls, "_peer_certificate_chain", []))
