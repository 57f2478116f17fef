"""The bare baseline of bench/first_step.py: import jax + flax + optax, load digits, build the default CNN and
AdamW, run one jitted train step; when the step's loss is on the host, write the file named by argv[1] (a JSON
timeline: seconds since this script started at each stage).

Deliberately standalone (no trainkit import): it is what a user would write without trainkit.
"""

import time

START = time.perf_counter()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

IMPORTED = time.perf_counter()


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        for features in (32, 64):
            x = nn.relu(nn.Conv(features, (3, 3))(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2)).reshape((x.shape[0], -1))
        return nn.Dense(10)(nn.relu(nn.Dense(128)(x)))


def main(done: Path) -> None:
    timeline = {"imports (jax, flax, optax, sklearn)": IMPORTED - START}
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    labels = digits.target.astype(np.int32)
    model = CNN()
    tx = optax.adamw(optax.warmup_cosine_decay_schedule(2e-3, 2e-3, 0, 600, 2e-5))
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"]
    opt_state = tx.init(params)
    jax.block_until_ready(opt_state)
    timeline["data, init and optimizer state (compiles)"] = time.perf_counter() - START

    @jax.jit
    def step(params, opt_state, x, y):
        def loss_fn(p):
            return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    idx = np.random.default_rng(0).permutation(len(labels))[:128]
    params, opt_state, loss = step(params, opt_state, images[idx], labels[idx])
    float(loss)
    timeline["first step (compile + run)"] = time.perf_counter() - START
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(timeline))
    os.replace(tmp, done)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
