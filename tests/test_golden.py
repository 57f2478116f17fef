"""A checkpoint written by format version 1 (tests/data/golden_v1, an MLP on digits) must keep loading.

When the format changes, bump FORMAT_VERSION, add an upgrade step in `checkpointing.upgrade_meta`, and add a new
golden directory beside this one; never edit an old one.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from conftest import ROOT, run_cli, train, tree_hash
from trainkit.checkpointing import FORMAT_VERSION, read_meta, read_state_arrays
from trainkit.sources import resolve_source

GOLDEN = ROOT / "tests" / "data" / "golden_v1"
CONFIG = ("--config.model.hidden=(16,)", "--config.log_every=1", "--config.eval_every=3",
          "--config.export.formats=('safetensors',)")


def test_golden_v1_resolves_and_reads():
    before = tree_hash(GOLDEN)
    resolved = resolve_source(str(GOLDEN))
    assert resolved.step == 2
    meta = read_meta(resolved.step_dir)
    assert meta["format_version"] == 1 <= FORMAT_VERSION and meta["model"] == "mlp"
    params = read_state_arrays(resolved.step_dir)["params"]
    shapes = {"/".join(str(k.key) for k in p): v.shape for p, v in jax.tree_util.tree_leaves_with_path(params)}
    assert shapes == {"Dense_0/kernel": (64, 16), "Dense_0/bias": (16,), "Dense_1/kernel": (16, 10),
                      "Dense_1/bias": (10,)}
    assert all(np.isfinite(v).all() for v in jax.tree.leaves(params))
    assert tree_hash(GOLDEN) == before, "reading must not write into a checkpoint"


def test_golden_v1_verifies_and_resumes(tmp_path: Path):
    before = tree_hash(GOLDEN)
    assert run_cli("verify", str(GOLDEN / "checkpoints" / "best"), module="trainkit.ckpt").returncode == 0
    proc = train(tmp_path, *CONFIG, "--config.num_steps=3", f"--resume_from={GOLDEN}", config="configs/default.py:mlp")
    assert "start: resume_from" in proc.stdout and "at step 2" in proc.stdout
    sidecar = json.loads((tmp_path / "export" / "model.json").read_text())
    assert sidecar["source"]["step"] == 3
    assert tree_hash(GOLDEN) == before
