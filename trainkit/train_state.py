"""TrainState: everything that changes during training and is saved in a checkpoint."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct


class TrainState(struct.PyTreeNode):
    """step, params, optimizer state and the base RNG. Per-step randomness is `fold_in(rng, step)`, so a
    resumed run draws exactly the numbers an uninterrupted one would."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key data (checkpoint-friendly)

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation, rng: jax.Array) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng)


def make_optimizer(config) -> optax.GradientTransformation:
    """AdamW with linear warmup and cosine decay over `num_steps`, optional global-norm clipping."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if config.warmup_steps else config.learning_rate,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=max(config.num_steps, config.warmup_steps + 1),
        end_value=config.learning_rate * 0.01,
    )
    parts = [optax.clip_by_global_norm(config.grad_clip_norm)] if config.grad_clip_norm else []
    parts.append(optax.adamw(schedule, weight_decay=config.weight_decay))
    return optax.chain(*parts)
