"""The trial suite.  Importing it loads the hypothesis profile.

Property tests are deterministic by default (profile ``ci``: derandomized,
no example database, bounded example counts) so that a run on a fresh
machine is the same run every time.  ``HYPOTHESIS_PROFILE=deep`` is for
local bug hunting: random seeds and many more examples.  Tests size their
example counts with :func:`examples` so that both profiles scale them.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
if PROFILE not in ("ci", "deep"):
    raise RuntimeError(f"HYPOTHESIS_PROFILE={PROFILE!r}: use 'ci' (the default) or 'deep'")

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "deep",
    derandomize=False,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(PROFILE)

#: How many times more examples the deep profile runs.
DEEP_FACTOR = 20


def examples(ci: int) -> int:
    """``max_examples`` for a property: ``ci`` in the default profile,
    ``DEEP_FACTOR`` times as many with ``HYPOTHESIS_PROFILE=deep``."""
    return ci * DEEP_FACTOR if PROFILE == "deep" else ci
