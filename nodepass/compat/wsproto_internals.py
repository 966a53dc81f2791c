"""WebSocket masking in C: websockets' ``apply_mask``.

RFC 6455 makes a client mask every byte it sends with a fresh 4-byte key,
and the server unmask them.  wsproto does this in Python (four strided
``bytearray.translate`` passes): about 60 µs per 64 KiB, which made masking
two thirds of the WebSocket pool's CPU and held its throughput near a
quarter of the TCP pool's (docs/benchmarks.md, run Q).  The ``websockets``
package ships the same operation in C (``websockets.speedups.apply_mask``,
under 2 µs per 64 KiB).  The WebSocket pool writes and reads its data
frames itself and calls :func:`apply_mask` on each; wsproto only sees
control frames (125 bytes at most) and masks them its own way.
``websockets.speedups`` is a private module of that package:
``tests/test_compat.py`` checks it against the installed version and its
result against wsproto's own masking.
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


def apply_mask(data: Any, key: bytes) -> bytes:
    """``data`` (bytes or a view) XORed with the 4-byte ``key`` repeated,
    as new bytes: what masks a frame's payload and unmasks it again.  The
    WebSocket pool's own data-frame path (``nodepass.pools.ws``) calls it
    directly; wsproto's Python masker is the fallback."""
    if _apply_mask is not None:
        return _apply_mask(data, key)
    return bytes(_Simple(bytearray(key)).process(bytearray(data)))  # pragma: no cover - websockets is a dependency

