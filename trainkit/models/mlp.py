"""A multi-layer perceptron classifier on flattened images."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import ml_collections

from trainkit.models import Task
from trainkit.models.classifier import classifier_task


class MLP(nn.Module):
    hidden: Sequence[int] = (256, 256)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        for h in self.hidden:
            x = nn.relu(nn.Dense(h)(x))
        return nn.Dense(self.num_classes)(x)


def build(config: ml_collections.ConfigDict, info: Mapping[str, Any]) -> Task:
    module = MLP(tuple(config.hidden), info["num_classes"])
    return classifier_task("mlp", module, tuple(info["image_shape"]))
