"""The non-finite guard: a step whose loss, gradient norm or new state is not finite never reaches a checkpoint.

The jitted train step computes one scalar flag, `finite` (fused into the update: no extra pass on the host), and
with `on_nonfinite="skip"` keeps the previous params and optimizer state for such a step (optax's
`apply_if_finite` idea, extended to the new state: `learning_rate=nan` gives NaN params after a finite loss).
The host reads the flags only where the loop waits anyway (every BLOCK_EVERY steps, at log and eval time) and
always before a save, so a non-finite state is never saved and never becomes `last` or `best`.

    on_nonfinite="stop"   # default: the run ends at the first such step, in one line naming the last good step
    on_nonfinite="skip"   # the update is dropped, the step still counts; `train/skipped_steps` counts them
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from trainkit.errors import TrainkitError

FLAG = "finite"  # the per-step metric the train step adds; the loop strips it before logging


def all_finite(tree: Any) -> jax.Array:
    """A scalar bool: every floating-point value in `tree` is finite (integer leaves always are)."""
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


def guard_update(old: Any, new: Any, loss: jax.Array, grad_norm: jax.Array, mode: str) -> tuple[Any, jax.Array]:
    """Inside the train step: `(state to keep, finite flag)` for the step `old -> new` (TrainStates). `skip` keeps
    `old`'s params and optimizer state when the step is not finite (the step counter still advances, so the data
    and the per-step RNG move on exactly as in an uninterrupted run); `stop` returns `new` as is: the host stops
    before anything saves it."""
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite((new.params, new.opt_state))
    if mode == "skip":
        params, opt_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o),
                                         (new.params, new.opt_state), (old.params, old.opt_state))
        new = new.replace(params=params, opt_state=opt_state)
    return new, finite


class NonFiniteGuard:
    """The host side: per-step flags kept as device arrays until the loop syncs, then read in one transfer.

    `check()` raises a one-line TrainkitError at the first non-finite step in `stop` mode; in `skip` mode it counts
    them (`skipped`, over this process's run). Call it before every save and wherever the loop blocks anyway.
    """

    def __init__(self, mode: str, last_good: Callable[[], str]):
        self.mode = mode
        self.skipped = 0
        self._last_good = last_good  # "the last good checkpoint is ..." (waits for a save in flight)
        self._pending: list[tuple[int, dict[str, jax.Array]]] = []

    def add(self, step: int, metrics: dict[str, jax.Array]) -> None:
        self._pending.append((step, {k: metrics[k] for k in (FLAG, "loss", "grad_norm")}))

    def check(self) -> None:
        pending, self._pending = jax.device_get(self._pending), []
        for step, values in pending:
            if bool(values[FLAG]):
                continue
            if self.mode == "skip":
                self.skipped += 1
                continue
            loss, grad_norm = float(values["loss"]), float(values["grad_norm"])
            what = ("the loss and gradient norm were finite but the update made the parameters or optimizer state "
                    "non-finite" if math.isfinite(loss) and math.isfinite(grad_norm) else "non-finite loss or gradient")
            raise TrainkitError(
                f"step {step}: {what} (loss={loss}, grad_norm={grad_norm}); stopped without saving it; "
                f"{self._last_good()}; run again with a lower --config.learning_rate (or set "
                "--config.grad_clip_norm), or with --config.on_nonfinite=skip to skip such steps"
            )
