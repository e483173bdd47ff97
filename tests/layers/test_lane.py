"""Lane: one helper thread, pieces in order, a bounded number in flight, the first error."""

from __future__ import annotations

import threading

import pytest

from blobchain.layers.lane import Lane


def _lane_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("test-lane")]


def test_pieces_run_in_order_on_one_thread() -> None:
    seen: list[tuple[int, str]] = []
    lane: Lane[int] = Lane(lambda i: seen.append((i, threading.current_thread().name)), name="test-lane", depth=3)
    for i in range(50):
        lane.put(i)
    lane.drain()
    assert [i for i, _ in seen] == list(range(50))
    assert len({name for _, name in seen}) == 1 and seen[0][1] != threading.current_thread().name
    lane.close()
    assert not _lane_threads()


def test_at_most_depth_pieces_in_flight() -> None:
    release = threading.Event()
    started = threading.Event()

    def slow(i: int) -> None:
        started.set()
        release.wait()

    lane: Lane[int] = Lane(slow, name="test-lane", depth=2)
    lane.put(0)
    assert started.wait(10)
    lane.put(1)  # two pending (one running): put returns at once
    blocked = threading.Thread(target=lane.put, args=(2,))
    blocked.start()
    blocked.join(0.2)
    assert blocked.is_alive()  # the third waits for the first to finish
    release.set()
    blocked.join(10)
    assert not blocked.is_alive()
    lane.close()


def test_first_error_is_raised_and_later_pieces_are_skipped() -> None:
    calls: list[int] = []

    def fn(i: int) -> None:
        calls.append(i)
        if i >= 3:
            raise ValueError(f"piece {i}")

    lane: Lane[int] = Lane(fn, name="test-lane", depth=4)
    with pytest.raises(ValueError, match="piece 3"):
        for i in range(20):
            lane.put(i)
        lane.drain()
    assert calls == [0, 1, 2, 3]
    lane.close()  # nothing more to raise; the thread stops
    assert not _lane_threads()


def test_close_raises_the_error_and_still_stops_the_thread() -> None:
    def fn(i: int) -> None:
        raise OSError("disk gone")

    lane: Lane[int] = Lane(fn, name="test-lane")
    lane.put(1)
    with pytest.raises(OSError, match="disk gone"):
        lane.close()
    assert not _lane_threads()
