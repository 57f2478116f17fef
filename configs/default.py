"""Default: a small CNN on scikit-learn's digits. ~97% held-out accuracy in about a minute on 2 CPU cores.

    python -m trainkit.main --config=configs/default.py --workdir=runs/digits
"""

import ml_collections

from trainkit.config import base_config


def get_config(arg: str | None = None):
    config = base_config()
    config.num_steps = 600
    config.batch_size = 128
    config.learning_rate = 2e-3
    config.eval_every = 100
    config.checkpoint.every = 100
    config.checkpoint.best_metric = "eval/accuracy"
    config.checkpoint.best_mode = "max"
    if arg == "mlp":
        config.model = ml_collections.ConfigDict({"name": "mlp", "hidden": (256, 256)})
    return config
