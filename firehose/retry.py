"""The daemon's retry delays, in one place."""

from __future__ import annotations

import random


def jittered_backoff(rng: random.Random, attempt: int, initial_ms: int, max_ms: int) -> float:
    """Seconds to wait before retry ``attempt`` (1 for the first) of a remote call: ``initial_ms``
    doubled at each attempt up to ``max_ms``, then jittered to a uniform pick between half of it
    and all of it."""
    ms = min(max_ms, initial_ms * 2 ** min(attempt - 1, 20))
    return rng.uniform(ms / 2, ms) / 1000.0


def local_failure_pause(failures: int) -> float:
    """Seconds to pause after the ``failures``-th failure in a row of a local step (a bug, a disk
    error), so that it is retried but never in a tight loop: 1, 2, 4 ... up to 30."""
    return min(30.0, 0.5 * 2 ** min(failures, 6))
