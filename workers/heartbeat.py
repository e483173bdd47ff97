"""Keep a lock lease alive while work runs; notice when it is lost."""

from __future__ import annotations

import threading
from types import TracebackType

from blobchain.layers.errors import BlobchainError, LeaseLost
from blobchain.storage.locks import Lease

__all__ = ["Heartbeat"]


class Heartbeat:
    """Refresh ``lease`` every ``interval_s`` from a daemon thread. ``check()`` raises LeaseLost
    once a refresh failed, so the holder stops before committing over a new holder."""

    def __init__(self, lease: Lease, interval_s: float) -> None:
        self._lease = lease
        self._interval = max(0.05, interval_s)
        self._stop = threading.Event()
        self._lost: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"heartbeat:{lease.key}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._lease.refresh()
            except BlobchainError as e:  # LeaseLost or Unavailable: either way we no longer hold it
                self._lost = e
                return

    def check(self) -> None:
        if self._lost is not None:
            raise LeaseLost(f"lost the lease on {self._lease.key}: {self._lost}", key=self._lease.key)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
