import threading
import time

import pytest

from blobchain.workers.flight import Flight


def test_concurrent_callers_share_one_call():
    flight: Flight[int] = Flight()
    calls = []
    gate = threading.Event()

    def fn() -> int:
        calls.append(1)
        gate.wait(5)
        return 42

    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(flight.do("k", fn))) for _ in range(8)]
    for t in threads:
        t.start()
    while flight.in_flight() == 0:
        time.sleep(0.001)
    time.sleep(0.05)
    gate.set()
    for t in threads:
        t.join(5)
    assert results == [42] * 8
    assert len(calls) == 1


def test_errors_are_shared_and_not_cached():
    flight: Flight[int] = Flight()
    gate = threading.Event()
    errors: list[BaseException] = []

    def boom() -> int:
        gate.wait(5)
        raise ValueError("boom")

    def call() -> None:
        try:
            flight.do("k", boom)
        except ValueError as e:
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    gate.set()
    for t in threads:
        t.join(5)
    assert len(errors) == 4 and len({id(e) for e in errors}) == 1
    # A later call starts afresh.
    assert flight.do("k", lambda: 7) == 7
    with pytest.raises(ValueError):
        flight.do("k", lambda: (_ for _ in ()).throw(ValueError("x")))


def test_different_keys_run_independently():
    flight: Flight[str] = Flight()
    assert flight.do("a", lambda: "a") == "a"
    assert flight.do("b", lambda: "b") == "b"
