"""Retention as a specification: the exact steps on disk after every save, across a restart."""

from __future__ import annotations

import numpy as np
import pytest

from trainkit.checkpoints.layout import list_steps, read_alias
from trainkit.checkpoints.meta import Best, CheckpointMeta
from trainkit.checkpoints.manager import CheckpointManager
from trainkit.config import base_config

# step -> eval/loss (None: a save without an eval, e.g. at a preemption)
SCRIPT = [(50, 0.9), (100, 0.8), (150, 0.5), (200, 0.7), (250, 0.6), (300, 0.65),
          "restart", (350, 0.4), (375, None), (400, 0.45)]
EXPECTED = {
    50: [50],
    100: [50, 100],
    150: [100, 150],                      # 50 is neither latest-2, best nor a multiple of 100
    200: [100, 150, 200],
    250: [100, 150, 200, 250],
    300: [100, 150, 200, 250, 300],
    350: [100, 200, 300, 350],            # new best 350 retires 150; 250 falls out of latest-2
    375: [100, 200, 300, 350, 375],       # no metrics: kept as latest only
    400: [100, 200, 300, 350, 375, 400],  # 375 stays: still one of the last two
}
BEST = {50: 50, 100: 100, 150: 150, 200: 150, 250: 150, 300: 150, 350: 350, 375: 350, 400: 350}


def manager(workdir, async_save: bool) -> CheckpointManager:
    config = base_config()
    config.checkpoint.update(keep_last=2, keep_best=1, best_metric="eval/loss", best_mode="min",
                             keep_every=100, async_save=async_save)
    return CheckpointManager(workdir, config)


@pytest.mark.parametrize("async_save", [True, False])
def test_exact_steps_kept(tmp_path, async_save):
    ckpts = manager(tmp_path, async_save)
    for entry in SCRIPT:
        if entry == "restart":
            ckpts.close()
            ckpts = manager(tmp_path, async_save)
            continue
        step, loss = entry
        state = {"w": np.full((4,), step, np.float32), "step": np.int32(step)}
        ckpts.save(step, state, {"next_index": step}, CheckpointMeta(model="toy", step=step),
                   None if loss is None else {"eval/loss": loss})
        ckpts.wait()
        assert list_steps(tmp_path / "checkpoints") == EXPECTED[step], f"after saving step {step}"
        assert read_alias(tmp_path / "checkpoints", "last") == step
        assert read_alias(tmp_path / "checkpoints", "best") == BEST[step]
    ckpts.close()


def test_keep_best_max_mode(tmp_path):
    config = base_config()
    config.checkpoint.update(keep_last=1, keep_best=2, best_metric="eval/accuracy", best_mode="max",
                             keep_every=0, async_save=False)
    ckpts = CheckpointManager(tmp_path, config)
    for step, acc in [(1, 0.5), (2, 0.9), (3, 0.7), (4, 0.8), (5, 0.1)]:
        ckpts.save(step, {"w": np.zeros(2, np.float32)}, {"next_index": step}, CheckpointMeta(model="toy", step=step),
                   {"eval/accuracy": acc})
    ckpts.close()
    assert list_steps(tmp_path / "checkpoints") == [2, 4, 5]
    assert read_alias(tmp_path / "checkpoints", "best") == 2


@pytest.mark.parametrize("mode, better, worse", [("min", 0.4, 0.6), ("max", 0.6, 0.4)])
def test_manager_decides_when_an_eval_is_a_new_best(tmp_path, mode, better, worse):
    config = base_config()
    config.checkpoint.update(keep_best=1, best_metric="eval/m", best_mode=mode, async_save=False)
    ckpts = CheckpointManager(tmp_path, config)
    assert ckpts.improved_best(None, 10, {"eval/m": 0.5}) == Best(step=10, value=0.5)  # the first eval
    assert ckpts.improved_best(Best(10, 0.5), 20, {"eval/m": better}) == Best(step=20, value=better)
    assert ckpts.improved_best(Best(10, 0.5), 20, {"eval/m": worse}) is None
    assert ckpts.improved_best(Best(10, 0.5), 20, {"eval/m": 0.5}) is None  # a tie keeps the older step
    assert ckpts.improved_best(Best(10, 0.5), 20, {"eval/other": better}) is None  # best_metric not evaluated
    assert ckpts.improved_best(Best(10, 0.5), 20, None) is None  # no eval at this step
    ckpts.close()
    config.checkpoint.keep_best = 0  # "best" is off: no eval forces a save
    ckpts = CheckpointManager(tmp_path, config)
    assert ckpts.improved_best(None, 30, {"eval/m": better}) is None
    ckpts.close()
