"""The Task shared by image classifiers (MLP, CNN): softmax cross-entropy, accuracy."""

from __future__ import annotations

from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from trainkit.models import InputSpec, Task


def classifier_task(name: str, module: nn.Module, image_shape: tuple[int, ...]) -> Task:
    """A Task for `module(images) -> logits` on batches {"image": (B, *image_shape), "label": (B,)}."""

    def init(rng: jax.Array):
        return module.init(rng, jnp.zeros((1, *image_shape), jnp.float32))["params"]

    def predict(params, images):
        return module.apply({"params": params}, images)

    def per_example(params, batch):
        logits = predict(params, batch["image"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
        accuracy = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
        return {"loss": loss, "accuracy": accuracy}

    def loss(params, batch, rng):
        del rng  # deterministic model
        metrics = {k: v.mean() for k, v in per_example(params, batch).items()}
        return metrics["loss"], metrics

    def example_inputs(seed: int, dims: Mapping[str, int]):
        rng = np.random.default_rng(seed)
        return (rng.uniform(0, 1, (dims.get("batch", 2), *image_shape)).astype(np.float32),)

    return Task(
        name=name,
        init=init,
        loss=loss,
        evaluate=per_example,
        predict=predict,
        inputs=(InputSpec("image", ("batch", *image_shape), "float32"),),
        outputs=("logits",),
        example_inputs=example_inputs,
    )
