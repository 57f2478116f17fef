"""scikit-learn's handwritten digits (1797 8x8 images, shipped with the package): a quick real benchmark."""

from __future__ import annotations

import ml_collections
import numpy as np
from sklearn.datasets import load_digits

from trainkit.data import ArraySource, Dataset


def load(config: ml_collections.ConfigDict) -> Dataset:
    """Images scaled to [0, 1] as (8, 8, 1) float32, labels int32; a fixed held-out split."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[..., None]
    labels = digits.target.astype(np.int32)
    order = np.random.default_rng(0).permutation(len(labels))  # the split never depends on the run's seed
    n_eval = int(round(len(labels) * config.get("eval_fraction", 0.2)))
    eval_idx, train_idx = order[:n_eval], order[n_eval:]
    return Dataset(
        train=ArraySource({"image": images[train_idx], "label": labels[train_idx]}),
        eval=ArraySource({"image": images[eval_idx], "label": labels[eval_idx]}),
        info={"num_classes": 10, "image_shape": images.shape[1:]},
    )
