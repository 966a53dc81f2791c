"""wsproto's frame masking, done by websockets' C ``apply_mask``.

RFC 6455 makes a client mask every byte it sends with a fresh 4-byte key,
and the server unmask them.  wsproto does this in Python (four strided
``bytearray.translate`` passes): about 60 µs per 64 KiB, which made masking
two thirds of the WebSocket pool's CPU and held its throughput near a
quarter of the TCP pool's (docs/benchmarks.md, run Q).  The ``websockets``
package ships the same operation in C (``websockets.speedups.apply_mask``,
under 2 µs per 64 KiB).  :func:`install` replaces wsproto's masker class
(``wsproto.frame_protocol.XorMaskerSimple``, looked up by name where frames
are built and parsed) with a subclass that keeps its interface -- the key
rotates between calls as a message arrives in pieces -- and uses the C
function.  Both are library internals: ``tests/test_compat.py`` checks them
against the installed versions and the result against wsproto's own.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from wsproto import frame_protocol

_apply_mask: Optional[Callable[[Any, bytes], bytes]]
try:  # the C speed-up; without it nothing is replaced
    from websockets.speedups import apply_mask as _apply_mask
except ImportError:  # pragma: no cover - websockets is a dependency
    _apply_mask = None

_Simple = frame_protocol.XorMaskerSimple


class FastXorMasker(_Simple):
    """wsproto's masker with the XOR in C; same key rotation."""

    def process(self, data: Any) -> bytearray:
        if not data:
            return bytearray(data)
        key = bytes(self._masking_key)
        assert _apply_mask is not None  # installed only with it
        out = bytearray(_apply_mask(data, key))
        turn = len(data) % 4
        if turn:
            self._masking_key = key[turn:] + key[:turn]
        return out


def install() -> bool:
    """Use :class:`FastXorMasker` for every WebSocket from now on; False
    when the C function is not there (wsproto's own stays)."""
    if _apply_mask is None:
        return False
    frame_protocol.XorMaskerSimple = FastXorMasker  # type: ignore[misc]
    return True
