"""In-process single-flight (BuildKit ``util/flightcontrol``): concurrent calls with one key run
the function once and all get its result or its error."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar, cast

__all__ = ["Flight"]

T = TypeVar("T")


class _Call(Generic[T]):
    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: T | None = None
        self.error: BaseException | None = None
        self.waiters = 0  # callers sharing the leader's call


class Flight(Generic[T]):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[str, _Call[T]] = {}

    def do(self, key: str, fn: Callable[[], T]) -> T:
        with self._lock:
            call = self._calls.get(key)
            leader = call is None
            if call is None:
                call = self._calls[key] = _Call()
            else:
                call.waiters += 1
        if leader:
            try:
                call.value = fn()
            except BaseException as e:
                call.error = e
            finally:
                # Forget the key before waking waiters: a late caller starts a fresh call
                # (after an error BuildKit retries too; after success the fast path answers).
                with self._lock:
                    self._calls.pop(key, None)
                call.done.set()
        else:
            call.done.wait()
        if call.error is not None:
            raise call.error
        return cast(T, call.value)  # set: the call returned without an error

    def in_flight(self) -> int:
        with self._lock:
            return len(self._calls)

    def waiters(self, key: str) -> int:
        """How many callers are waiting on the call running for ``key`` (0 if none runs)."""
        with self._lock:
            call = self._calls.get(key)
            return 0 if call is None else call.waiters
