"""One helper thread that runs a function on each piece handed to it, in order.

The layer pipeline hands big pieces to lanes so its passes run on both cores: the diffID's
sha256 (:class:`~blobchain.layers.digest.OverlappedHashingWriter`) and the blob sink (the
store's sha256 and file write), all of which release the GIL. A lane holds at most ``depth``
pieces not yet done, so memory stays flat, and a few in flight let a briefly descheduled
stage catch up instead of stalling the stage that feeds it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, TypeVar

__all__ = ["DEPTH", "Lane"]

T = TypeVar("T")

DEPTH = 4  # pieces in flight per lane (1 MiB pieces in the layer pipeline: 4 MiB per lane)


class Lane(Generic[T]):
    """``fn`` called on one helper thread with each piece given to :meth:`put`, in order.

    :meth:`put` returns once the piece is queued (waiting first while ``depth`` are pending);
    :meth:`drain` waits until every piece is done. The first error of ``fn`` is raised by the
    next :meth:`put`, :meth:`drain` or :meth:`close`, and ``fn`` is not called again after
    it. Pieces must not change after :meth:`put` (the layer pipeline hands over ``bytes``)."""

    def __init__(self, fn: Callable[[T], object], *, name: str, depth: int = DEPTH) -> None:
        self._fn = fn
        self._name = name
        self._depth = max(1, depth)
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[Future[None]] = deque()
        self._failed = False

    def put(self, piece: T) -> None:
        while len(self._pending) >= self._depth:
            self._pending.popleft().result()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix=self._name)
        self._pending.append(self._pool.submit(self._run, piece))

    def _run(self, piece: T) -> None:
        if self._failed:
            return  # an earlier piece failed: its error is the one reported
        try:
            self._fn(piece)
        except BaseException:
            self._failed = True
            raise

    def drain(self) -> None:
        """Wait for every piece given so far; raise the first error."""
        try:
            while self._pending:
                self._pending.popleft().result()
        except BaseException:
            self._failed = True
            self._pending.clear()  # the rest are skipped by _run
            raise

    def close(self) -> None:
        """:meth:`drain`, then stop the thread (also when draining raised)."""
        try:
            self.drain()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
