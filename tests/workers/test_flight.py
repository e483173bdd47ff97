import threading
import time

import pytest

from blobchain.workers.flight import Flight


def _wait_for_waiters(flight: Flight, key: str, n: int) -> None:
    # Release the leader only once every other caller has joined its call; a caller arriving
    # after the leader finished would start a fresh call.
    deadline = time.monotonic() + 30
    while flight.waiters(key) < n:
        assert time.monotonic() < deadline, f"{flight.waiters(key)} of {n} callers joined"
        time.sleep(0.001)


def test_concurrent_callers_share_one_call():
    flight: Flight[int] = Flight()
    calls = []
    gate = threading.Event()

    def fn() -> int:
        calls.append(1)
        gate.wait(30)
        return 42

    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(flight.do("k", fn))) for _ in range(8)]
    for t in threads:
        t.start()
    _wait_for_waiters(flight, "k", 7)
    gate.set()
    for t in threads:
        t.join(30)
    assert results == [42] * 8
    assert len(calls) == 1


def test_errors_are_shared_and_not_cached():
    flight: Flight[int] = Flight()
    gate = threading.Event()
    errors: list[BaseException] = []

    def boom() -> int:
        gate.wait(30)
        raise ValueError("boom")

    def call() -> None:
        try:
            flight.do("k", boom)
        except ValueError as e:
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    _wait_for_waiters(flight, "k", 3)
    gate.set()
    for t in threads:
        t.join(30)
    assert len(errors) == 4 and len({id(e) for e in errors}) == 1
    # A later call starts afresh.
    assert flight.do("k", lambda: 7) == 7
    with pytest.raises(ValueError):
        flight.do("k", lambda: (_ for _ in ()).throw(ValueError("x")))


def test_different_keys_run_independently():
    flight: Flight[str] = Flight()
    assert flight.do("a", lambda: "a") == "a"
    assert flight.do("b", lambda: "b") == "b"
