"""Checkpoints written by every format version (tests/data/golden_v1: sha256 manifest; golden_v2: crc32c manifest;
each an MLP on digits) must keep loading and verifying.

When the format changes, bump FORMAT_VERSION, add `upgrade_v{N}_to_v{N+1}` to `trainkit.checkpoints.meta.UPGRADES`,
and add a new golden directory beside this one; never edit an old one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import ROOT, run_cli, train, tree_hash
from trainkit.checkpoints.meta import FORMAT_VERSION, UPGRADES, Best, CheckpointMeta
from trainkit.checkpoints.manager import read_meta, read_state_arrays
from trainkit.checkpoints.manifest import verify_manifest
from trainkit.errors import TrainkitError
from trainkit.checkpoints.sources import resolve_source

GOLDEN = ROOT / "tests" / "data" / "golden_v1"
GOLDEN_META = GOLDEN / "checkpoints" / "000002" / "meta" / "metadata"  # the JSON Orbax wrote for `meta`
CONFIG = ("--config.model.hidden=(16,)", "--config.log_every=1", "--config.eval_every=3",
          "--config.export.formats=('safetensors',)")


def test_golden_v1_resolves_and_reads():
    before = tree_hash(GOLDEN)
    resolved = resolve_source(str(GOLDEN))
    assert resolved.step == 2
    meta = read_meta(resolved.step_dir)
    assert meta == CheckpointMeta(model="mlp", step=2, best=Best(step=2, value=0.055710306406685235))
    params = read_state_arrays(resolved.step_dir)["params"]
    shapes = {"/".join(str(k.key) for k in p): v.shape for p, v in jax.tree_util.tree_leaves_with_path(params)}
    assert shapes == {"Dense_0/kernel": (64, 16), "Dense_0/bias": (16,), "Dense_1/kernel": (16, 10),
                      "Dense_1/bias": (10,)}
    assert all(np.isfinite(v).all() for v in jax.tree.leaves(params))
    assert tree_hash(GOLDEN) == before, "reading must not write into a checkpoint"


@pytest.mark.parametrize("version", range(1, FORMAT_VERSION + 1))
def test_golden_verifies_and_resumes(tmp_path: Path, version: int):
    golden = ROOT / "tests" / "data" / f"golden_v{version}"
    before = tree_hash(golden)
    assert run_cli("verify", str(golden / "checkpoints" / "best"), module="trainkit.ckpt").returncode == 0
    proc = train(tmp_path, *CONFIG, "--config.num_steps=3", f"--resume_from={golden}", config="configs/default.py:mlp")
    assert "start: resume_from" in proc.stdout and "at step 2" in proc.stdout
    sidecar = json.loads((tmp_path / "export" / "model.json").read_text())
    assert sidecar["source"]["step"] == 3
    assert tree_hash(golden) == before


def test_golden_v1_damage_is_found_by_its_sha256(tmp_path: Path):
    step_dir = tmp_path / "000002"
    shutil.copytree(GOLDEN / "checkpoints" / "000002", step_dir)
    data = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    problems = verify_manifest(step_dir)
    assert len(problems) == 1 and str(data) in problems[0] and "sha256" in problems[0]


def test_golden_v2_records_crc32c_and_its_meta_upgrades_from_v1():
    manifest = json.loads((ROOT / "tests/data/golden_v2/checkpoints/000002/manifest.json").read_text())
    assert manifest["format_version"] == 2
    assert all(set(entry) == {"size", "crc32c"} for entry in manifest["files"].values())
    v1 = json.loads(GOLDEN_META.read_text())
    assert UPGRADES[1](v1) == {**v1, "format_version": 2}


def test_golden_v1_meta_reads_as_typed_and_writes_back_byte_for_byte():
    raw = json.loads(GOLDEN_META.read_text())
    assert raw["format_version"] == 1
    meta = CheckpointMeta.from_json(raw)
    assert meta == CheckpointMeta(model="mlp", step=2, best=Best(step=2, value=0.055710306406685235),
                                  wandb_run_id=None)
    # Orbax writes json.dumps of to_json(): a step saved today has v1's bytes (while FORMAT_VERSION is 1).
    if FORMAT_VERSION == 1:
        assert json.dumps(meta.to_json()).encode() == GOLDEN_META.read_bytes()


def test_meta_without_best_and_with_wandb_run_round_trips():
    meta = CheckpointMeta(model="cnn", step=40, wandb_run_id="ab12cd34")
    raw = meta.to_json()
    assert list(raw) == ["model", "best", "wandb_run_id", "format_version", "step"] and raw["best"] == {}
    assert CheckpointMeta.from_json(json.loads(json.dumps(raw))) == meta


def test_every_older_format_version_has_an_upgrade_and_a_golden_checkpoint():
    # A bump without an upgrade, or without a golden checkpoint of the new version, fails here.
    assert set(UPGRADES) == set(range(1, FORMAT_VERSION))
    assert all((ROOT / "tests" / "data" / f"golden_v{v}").is_dir() for v in range(1, FORMAT_VERSION + 1))


def test_meta_of_a_newer_format_version_is_refused():
    raw = {**json.loads(GOLDEN_META.read_text()), "format_version": FORMAT_VERSION + 1}
    with pytest.raises(TrainkitError) as info:
        CheckpointMeta.from_json(raw, "W/checkpoints/000002")
    message = str(info.value)
    assert "\n" not in message
    assert f"W/checkpoints/000002 has checkpoint format version {FORMAT_VERSION + 1}" in message
    assert "upgrade trainkit" in message
