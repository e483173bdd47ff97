"""Keep a claim alive while work runs; notice when it is lost. Works with any ``Claim``."""

from __future__ import annotations

import logging
import threading
import time

from blobchain.layers.errors import InvalidArgument, Unavailable
from blobchain.storage.claims import Claim, ClaimLost

__all__ = ["Heartbeat"]

log = logging.getLogger(__name__)


class Heartbeat:
    """Refresh a claim from a daemon thread until the ``with`` block ends.

    ``lost`` becomes true when a refresh raises ClaimLost, or when refreshes kept failing
    (service unavailable) for longer than ``ttl_s`` since the last good one (the claim has
    expired by then). The work loop calls :meth:`check` between steps. Works with any
    :class:`blobchain.storage.claims.Claim`.
    """

    def __init__(self, claim: Claim, interval_s: float, *, ttl_s: float | None = None) -> None:
        if not interval_s > 0:
            raise InvalidArgument(f"heartbeat interval must be > 0 (got {interval_s})")
        self.claim = claim
        self.interval_s = interval_s
        self.ttl_s = ttl_s if ttl_s is not None else 3 * interval_s
        self._stop = threading.Event()
        self._lost = threading.Event()
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def check(self) -> None:
        """Raise ClaimLost if the heartbeat found the claim lost."""
        if self._lost.is_set():
            raise ClaimLost(f"claim on {self.claim.key!r} lost: {self.error}", key=self.claim.key)

    def start(self) -> Heartbeat:
        self._thread = threading.Thread(target=self._run, name=f"heartbeat:{self.claim.key}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(self.interval_s):
            try:
                self.claim.refresh()
                last_ok = time.monotonic()
            except ClaimLost as e:
                self._mark_lost(e)
                return
            except Unavailable as e:
                if time.monotonic() - last_ok >= self.ttl_s:
                    self._mark_lost(e)
                    return
                log.warning("heartbeat for %r failed, will retry: %s", self.claim.key, e)
            except Exception as e:  # never let the thread die silently
                self._mark_lost(e)
                return

    def _mark_lost(self, e: BaseException) -> None:
        self.error = e
        self._lost.set()
        log.warning("claim on %r lost: %s", self.claim.key, e)

    def __enter__(self) -> Heartbeat:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
