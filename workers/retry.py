"""The one backoff policy of blobchain's executors: capped exponential with jitter, as a
tenacity wait. The embedded executor retries with it in-process (``tenacity.Retrying``); the
Celery tasks turn the same curve into a retry countdown (:func:`backoff`)."""

from __future__ import annotations

import random

from tenacity import RetryCallState
from tenacity.wait import wait_base

__all__ = ["JitteredBackoff", "backoff"]


class JitteredBackoff(wait_base):
    """``first_s``, ``2 * first_s``, ``4 * first_s`` ... up to ``cap_s``, each times a random
    factor in [0.5, 1.5) (jitter spreads duplicates of one ref out), never above ``cap_s``."""

    def __init__(self, first_s: float, cap_s: float) -> None:
        self.first_s = first_s
        self.cap_s = cap_s

    def delay(self, retries: int) -> float:
        """The wait before retry number ``retries + 1`` (``retries`` done so far)."""
        base = min(self.cap_s, self.first_s * 2.0 ** max(0, retries))
        return min(self.cap_s, base * (0.5 + random.random()))

    def __call__(self, retry_state: RetryCallState) -> float:
        return self.delay(retry_state.attempt_number - 1)


def backoff(retries: int, cap_s: float, first_s: float = 0.25) -> float:
    """:class:`JitteredBackoff`'s wait after ``retries`` retries (a Celery retry countdown)."""
    return JitteredBackoff(first_s, cap_s).delay(retries)
