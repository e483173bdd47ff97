"""Progress reports at a bounded rate, for every executor: a build reports (files, bytes) as
often as it likes; the consumer (an event queue, Celery's result backend) hears at most one
report per interval."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["Progress", "Throttle"]

Progress = Callable[[int, int], None]


class Throttle:
    """Forwards ``(files, bytes)`` to ``report`` at most once every ``every_s`` seconds (the
    first report goes through at once). Thread-safe."""

    def __init__(self, report: Callable[[int, int], object], every_s: float) -> None:
        self._report = report
        self._every_s = every_s
        self._last = float("-inf")
        self._lock = threading.Lock()

    def __call__(self, files: int, nbytes: int) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last < self._every_s:
                return
            self._last = now
        self._report(files, nbytes)
