"""The parts of h2 (and of hyperframe, its frame layer) below their public
API that the HTTP/2 pool relies on.

h2's own bulk path copies every DATA byte four or five times on the way
out -- ``memoryview.tobytes``, the join in ``DataFrame.serialize_body``,
header plus body in ``Frame.serialize``, the connection's output
``bytearray`` and the ``bytes`` that ``data_to_send`` returns -- and three
times on the way in (into its ``FrameBuffer``, a slice of it per frame, and
the frame's body), and it formats every received frame for a trace log
nobody reads (``repr(frame)``, which for a DATA frame serializes the body
again and hex-encodes all of it).  Together they were about half of the
HTTP/2 pool's CPU (issue 12's profile).  Relied on, and checked by
``tests/test_compat.py`` against the installed versions:

* ``H2Connection._prepare_for_sending(frames)``, through which every frame
  h2 sends passes (overridden by :class:`LeanH2Connection`), its
  ``_data_to_send`` output ``bytearray`` (only ever appended to, or
  replaced when taken) and ``clear_outbound_data_buffer``;
* ``H2Connection.incoming_buffer``, the ``FrameBuffer`` that
  ``receive_data`` feeds and iterates (replaced by :class:`LeanFrameBuffer`),
  and the ``FrameBuffer`` internals it builds on: ``_data`` (a
  ``bytearray``), ``_preamble_len``, ``_validate_frame_length`` and
  ``_update_header_buffer``;
* hyperframe's ``Frame.parse_frame_header`` and every frame's
  ``parse_body`` copying what it keeps (never keeping the view it is
  given), ``DataFrame`` with ``data``, ``flags``, ``pad_length``,
  ``stream_id`` and ``body_len`` (h2 checks ``body_len`` after
  ``_prepare_for_sending``), and ``Frame._body_repr``, which :func:`install`
  makes cheap for DATA frames.
"""

from __future__ import annotations

import struct
from typing import Any, Optional

from h2.connection import H2Connection
from h2.exceptions import FrameDataMissingError, ProtocolError
from h2.frame_buffer import FrameBuffer
from hyperframe.exceptions import InvalidDataError, InvalidFrameError
from hyperframe.frame import DataFrame, Frame

#: A frame header: 24-bit length (as 16 + 8 bits), type, flags, stream ID.
_HEADER = struct.Struct("!HBBBL")
#: DATA frames at least this big leave without being copied (smaller ones
#: are copied once into the output buffer, where they join the frames
#: around them: one write, one TLS record, for many small frames).
LEAN_MIN = 32 * 1024
_END_STREAM = 0x01


def _data_body_repr(frame: Any) -> str:
    return f"<{len(frame.data)} bytes>"


def install() -> None:
    """Make ``repr()`` of a DATA frame cheap: h2 builds one for every frame
    it receives (for a trace log line), and hyperframe's would serialize the
    payload and hex-encode all of it."""
    setattr(DataFrame, "_body_repr", _data_body_repr)


class LeanFrameBuffer(FrameBuffer):
    """h2's ``FrameBuffer`` without copying the bytes it is given into its
    buffer first: what :meth:`add_data` gets while nothing is buffered is
    parsed where it lies (each frame's body is copied once, by hyperframe's
    ``parse_body``), and only an incomplete frame at its end is kept (by
    :meth:`detach`, which :class:`LeanH2Connection` calls before
    ``receive_data`` returns: the bytes are the caller's, and may be a view
    of a buffer that is reused).  Anything else -- the server's preface,
    bytes already buffered -- takes h2's own path, as do the frame checks
    (length, header blocks)."""

    def __init__(self, server: bool = False) -> None:
        super().__init__(server=server)
        self._np_view: Optional[memoryview] = None
        self._np_pos = 0

    def add_data(self, data: Any) -> None:
        if self._np_view is not None:
            self.detach()
        if self._preamble_len or self._data:
            super().add_data(data)
            return
        self._np_view = memoryview(data)
        self._np_pos = 0

    def detach(self) -> None:
        """Keep what is left of the bytes given (a partial frame) in h2's
        buffer, and let go of them."""
        view = self._np_view
        if view is None:
            return
        self._np_view = None
        rest = view[self._np_pos :]
        if len(rest):
            self._data += rest
        rest.release()
        view.release()

    def __next__(self) -> Any:
        view = self._np_view
        if view is None:
            return super().__next__()
        pos = self._np_pos
        if len(view) - pos < 9:
            self.detach()
            raise StopIteration
        try:
            f, length = Frame.parse_frame_header(view[pos : pos + 9])
        except (InvalidDataError, InvalidFrameError) as err:  # pragma: no cover - as h2's
            msg = f"Received frame with invalid header: {err!s}"
            raise ProtocolError(msg) from err
        if len(view) - pos < length + 9:
            self.detach()
            raise StopIteration
        self._validate_frame_length(length)
        try:
            f.parse_body(view[pos + 9 : pos + 9 + length])
        except InvalidDataError as err:
            msg = "Received frame with non-compliant data"
            raise ProtocolError(msg) from err
        except InvalidFrameError as err:
            msg = "Frame data missing or invalid"
            raise FrameDataMissingError(msg) from err
        self._np_pos = pos + 9 + length
        new_frame = self._update_header_buffer(f)
        return new_frame if new_frame is not None else self.__next__()


class LeanH2Connection(H2Connection):
    """An ``H2Connection`` whose DATA frames are not serialized by
    hyperframe: each unpadded DATA frame is its 9-byte header appended to
    the output buffer, then its payload (the ``bytes`` h2 holds) -- appended
    too when it is small, else kept as a piece of its own, never copied.
    :meth:`output_parts` hands the output over as a list of pieces, in
    order, for a writer that takes pieces (one ``SSL_write`` each:
    ``nodepass.relay.tls_fast``).  Every other frame, and everything h2
    writes to its buffer itself, goes the usual way; ``data_to_send``
    still returns everything joined."""

    def __init__(self, config: Any = None) -> None:
        super().__init__(config=config)
        self._np_parts: list[Any] = []
        self.incoming_buffer = LeanFrameBuffer(server=not self.config.client_side)

    def receive_data(self, data: Any) -> list[Any]:
        """h2's, reading frames where they lie (:class:`LeanFrameBuffer`);
        nothing of ``data`` is kept past the call but copies."""
        buffer = self.incoming_buffer
        try:
            return super().receive_data(data)
        finally:
            if isinstance(buffer, LeanFrameBuffer):
                buffer.detach()

    def _prepare_for_sending(self, frames: list[Any]) -> None:
        if not frames:
            return
        for f in frames:
            if type(f) is DataFrame and not f.pad_length and "PADDED" not in f.flags:
                data = f.data
                size = len(data)
                out = self._data_to_send
                flags = _END_STREAM if "END_STREAM" in f.flags else 0
                out += _HEADER.pack(size >> 8, size & 0xFF, 0, flags, f.stream_id & 0x7FFFFFFF)
                if size >= LEAN_MIN:
                    # The buffer (ending with this header) and the payload
                    # are pieces of their own; a fresh buffer follows.
                    self._np_parts += (out, data)
                    self._data_to_send = bytearray()
                else:
                    out += data
                f.body_len = size
            else:
                self._data_to_send += f.serialize()
            assert f.body_len <= self.max_outbound_frame_size

    def output_parts(self) -> list[Any]:
        """Everything there is to send, as pieces in order (bytes or
        bytearrays, no longer touched by h2), and taken."""
        parts = self._np_parts
        if self._data_to_send:
            parts.append(self._data_to_send)
            self._data_to_send = bytearray()
        if parts:
            self._np_parts = []
        return parts

    def data_to_send(self, amount: Optional[int] = None) -> bytes:
        if self._np_parts:
            joined = b"".join(self.output_parts())
            if amount is None or amount >= len(joined):
                return joined
            self._data_to_send = bytearray(joined[amount:])
            return joined[:amount]
        return super().data_to_send(amount)

    def clear_outbound_data_buffer(self) -> None:
        self._np_parts = []
        super().clear_outbound_data_buffer()
