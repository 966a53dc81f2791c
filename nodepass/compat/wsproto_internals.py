"""WebSocket masking in C: websockets' ``apply_mask``.

RFC 6455 makes a client mask every byte it sends with a fresh 4-byte key,
and the server unmask them.  wsproto does this in Python (four strided
``bytearray.translate`` passes): about 60 µs per 64 KiB, which made masking
two thirds of the WebSocket pool's CPU and held its throughput near a
quarter of the TCP pool's (docs/benchmarks.md, run Q).  The ``websockets``
package ships the same operation in C (``websockets.speedups.apply_mask``,
under 2 µs per 64 KiB).  The WebSocket pool writes and reads its frames
itself and calls :data:`apply_mask` on each (the C function itself, not a
Python wrapper around it: that wrapper's call was a measurable part of a
short pool connection's cost).
``websockets.speedups`` is a private module of that package:
``tests/test_compat.py`` checks it against the installed version and its
result against wsproto's own masking.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from wsproto import frame_protocol

_Simple = frame_protocol.XorMaskerSimple


def _python_mask(data: Any, key: bytes) -> bytes:  # pragma: no cover - websockets is a dependency
    """wsproto's Python masker: the fallback without websockets' C code."""
    return bytes(_Simple(bytearray(key)).process(bytearray(data)))


#: ``apply_mask(data, key)``: ``data`` (bytes or a view) XORed with the
#: 4-byte ``key`` repeated, as new bytes: what masks a frame's payload and
#: unmasks it again.  The WebSocket pool's own frame path
#: (``nodepass.pools.ws``) calls it for every masked frame, so it *is*
#: websockets' C function, not a Python function calling it (one frame less
#: per call, two or three calls per pool connection at each end); wsproto's
#: Python masker is the fallback.
_apply_mask: Optional[Callable[[Any, bytes], bytes]]
try:  # the C speed-up; without it nothing is replaced
    from websockets.speedups import apply_mask as _apply_mask
except ImportError:  # pragma: no cover - websockets is a dependency
    _apply_mask = None

apply_mask: Callable[[Any, bytes], bytes] = _apply_mask if _apply_mask is not None else _python_mask
