"""trainkit's checkpoint thread: saves run one at a time, in order, off the training loop.

The loop hands a save over (`submit`) and returns to training. While one save is being written, at most one more
waits behind it: a third `submit` waits until the one being written is done, so a disk slower than
`checkpoint.every` steps holds at most two snapshots of the state in memory (the one being written and the one
waiting) and slows the loop only then. The first time a save has to wait behind another, one line says so.

A save that fails stops the queue: saves still waiting are dropped (their steps are not on disk) and the error
is raised, with the step it belongs to, by the next `submit` or `wait`.

Example:
    queue = SaveQueue()
    queue.submit(40, lambda: write_step(40))   # returns at once
    queue.wait()                               # step 40 is on disk (or its error is raised here)
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Any, Callable

import jax


def snapshot(state: Any) -> Any:
    """An on-device copy of `state` for the checkpoint thread to write, dispatched asynchronously: the copy is
    ordered before any later computation that donates `state`'s buffers, so the loop does not wait for it.

    Arrays this process holds whole are copied in one batched `device_put`; an array spread over several
    processes is copied shard by shard (its addressable shards) and reassembled with the same sharding. Neither
    compiles anything, so the first save costs what the others do."""
    leaves, treedef = jax.tree.flatten(state)
    whole = [i for i, x in enumerate(leaves) if not isinstance(x, jax.Array) or x.is_fully_addressable]
    copies = dict(zip(whole, jax.device_put([leaves[i] for i in whole], may_alias=False)))
    for i, x in enumerate(leaves):
        if i not in copies:
            shards = [jax.device_put(shard.data, shard.device, may_alias=False) for shard in x.addressable_shards]
            copies[i] = jax.make_array_from_single_device_arrays(x.shape, x.sharding, shards)
    return jax.tree.unflatten(treedef, [copies[i] for i in range(len(leaves))])


class SaveFailed(Exception):
    """A save on the checkpoint thread raised; `step` is the step it was writing (the cause is `__cause__`)."""

    def __init__(self, step: int, error: BaseException):
        super().__init__(f"saving step {step} failed: {error}")
        self.step = step
        self.error = error


@dataclasses.dataclass
class _Job:
    step: int
    run: Callable[[], None]


class SaveQueue:
    """One background thread that runs submitted saves in order; at most `max_waiting` wait behind the running one."""

    def __init__(self, max_waiting: int = 1, name: str = "trainkit-ckpt", announce: Callable[[str], None] = print):
        self.max_waiting = max_waiting
        self._announce = announce
        self._cond = threading.Condition()
        self._waiting: collections.deque[_Job] = collections.deque()
        self._running: _Job | None = None
        self._failure: SaveFailed | None = None
        self._closed = False
        self._said_queued = False
        self.most_waiting = 0  # the most saves ever waiting behind a running one (tests check the bound)
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, step: int, run: Callable[[], None]) -> None:
        """Queue `run` (the save of `step`); returns at once unless `max_waiting` saves already wait."""
        with self._cond:
            self._raise_failure()
            if self._running is not None and not self._said_queued:
                self._said_queued = True
                self._announce(f"trainkit: checkpoint step {step} waits for step {self._running.step}, which is still "
                               f"being written (the disk is slower than checkpoint.every steps); at most "
                               f"{self.max_waiting} save waits, beyond that the training loop waits (said once)")
            while len(self._waiting) >= self.max_waiting and self._failure is None:
                self._cond.wait()
            self._raise_failure()
            self._waiting.append(_Job(step, run))
            self.most_waiting = max(self.most_waiting, len(self._waiting))
            self._cond.notify_all()

    def wait(self) -> None:
        """Block until every submitted save is done; raise SaveFailed for one that failed."""
        with self._cond:
            while (self._waiting or self._running is not None) and self._failure is None:
                self._cond.wait()
            self._raise_failure()

    @property
    def busy(self) -> bool:
        """A save is being written or waits."""
        with self._cond:
            return bool(self._waiting) or self._running is not None

    def close(self) -> None:
        """Let the thread finish what was submitted, then stop it (raises a failure `wait` would raise)."""
        try:
            self.wait()
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
            self._thread.join()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure from failure.error

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if not self._waiting:
                    return
                self._running = self._waiting.popleft()
                self._cond.notify_all()  # room for one more
            job = self._running
            try:
                job.run()
            except BaseException as e:  # noqa: BLE001 - handed to the loop's thread, which raises it
                with self._cond:
                    self._failure = SaveFailed(job.step, e)
                    self._waiting.clear()
            finally:
                with self._cond:
                    self._running = None
                    self._cond.notify_all()
