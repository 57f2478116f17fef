"""A small convolutional classifier (NHWC), the default config's model."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import ml_collections

from trainkit.models import Task
from trainkit.models.classifier import classifier_task


class CNN(nn.Module):
    features: Sequence[int] = (32, 64)
    hidden: int = 128
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        for f in self.features:
            x = nn.relu(nn.Conv(f, (3, 3))(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.num_classes)(x)


def build(config: ml_collections.ConfigDict, info: Mapping[str, Any]) -> Task:
    module = CNN(tuple(config.features), config.hidden, info["num_classes"])
    return classifier_task("cnn", module, tuple(info["image_shape"]))
