"""trainkit's checkpoint thread (trainkit.checkpoints.save_queue): saves run in order, off the caller's thread; at
most one waits behind the one being written, a third hand-over waits for room; the first wait is said once; a
failed save is raised, with its step, to the caller. Real threads and real (sleeping) save functions."""

from __future__ import annotations

import threading
import time

import pytest

from trainkit.checkpoints.save_queue import SaveFailed, SaveQueue


def test_submit_returns_at_once_and_saves_run_in_order():
    done: list[int] = []
    queue = SaveQueue(announce=lambda line: None)
    start = time.perf_counter()
    queue.submit(1, lambda: (time.sleep(0.2), done.append(1)))
    assert time.perf_counter() - start < 0.1 and done == []  # the caller did not wait for the save
    queue.wait()
    assert done == [1]
    queue.close()


def test_at_most_one_save_waits_and_the_third_hand_over_waits_for_room():
    lines: list[str] = []
    release = threading.Event()
    done: list[int] = []

    def slow(step: int):
        def run():
            release.wait(5)
            done.append(step)
        return run

    queue = SaveQueue(announce=lines.append)
    queue.submit(10, slow(10))  # written now
    while not queue.busy:
        pass
    time.sleep(0.05)
    queue.submit(20, slow(20))  # waits behind 10: returns at once, says so
    assert len(lines) == 1 and "step 20 waits for step 10" in lines[0]
    third = threading.Thread(target=queue.submit, args=(30, slow(30)))
    third.start()
    third.join(0.3)
    assert third.is_alive(), "a third save was queued while two were outstanding"
    release.set()
    third.join(5)
    assert not third.is_alive()
    queue.submit(40, slow(40))
    queue.wait()
    assert done == [10, 20, 30, 40]
    assert queue.most_waiting == 1
    assert len(lines) == 1, "the wait is said once"
    queue.close()


def test_a_failed_save_is_raised_with_its_step_and_drops_the_ones_waiting():
    done: list[int] = []
    queue = SaveQueue(announce=lambda line: None)

    def fail():
        time.sleep(0.1)
        raise OSError(5, "Input/output error")

    queue.submit(10, fail)
    queue.submit(20, lambda: done.append(20))
    with pytest.raises(SaveFailed) as info:
        queue.wait()
    assert info.value.step == 10 and isinstance(info.value.error, OSError)
    assert done == []
    queue.submit(30, lambda: done.append(30))  # the queue goes on after the error was handed over
    queue.close()
    assert done == [30]
