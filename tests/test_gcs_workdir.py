"""gs:// workdirs, against a GCS JSON-API server on 127.0.0.1 (tests/gcs_emulator.py).

Nothing in trainkit is swapped out: Orbax's tensorstore writes the checkpoint shards to the server and gcsfs (behind
etils.epath) everything else, with the same requests they send to Google Cloud Storage; only the endpoint differs.
The run is killed with SIGKILL while a checkpoint is half uploaded, resumed, and must end bit for bit where an
uninterrupted local run ends.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from conftest import ROOT, assert_user_error, cli_env, run_cli, train
from gcs_emulator import GCSEmulator
from safetensors.numpy import load as load_safetensors

from trainkit.checkpoints.layout import list_steps
from trainkit.errors import TrainkitError
from trainkit.workdir import Staged

RUN = ("--config.num_steps=60", "--config.log_every=5", "--config.eval_every=20", "--config.checkpoint.every=20",
       "--config.progress=none")
BUCKET = "trainkit-test"


@pytest.fixture(scope="module")
def gcs():
    with GCSEmulator(buckets=(BUCKET,)) as emulator:  # like GCS: only buckets that were created exist
        yield emulator


def gcs_env(gcs: GCSEmulator, cache: Path) -> dict[str, str]:
    return cli_env(**gcs.env, TRAINKIT_CACHE=str(cache))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The same run in a local workdir, uninterrupted."""
    workdir = tmp_path_factory.mktemp("local")
    train(workdir, *RUN)
    return workdir


def kill_mid_upload(gcs: GCSEmulator, args: list[str], env: dict, step_prefix: str, log: Path) -> int:
    """Start training; SIGKILL it once the step's array data is on the server but the step is not committed.
    Returns how many objects of that step were there."""
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while True:
        names = gcs.names(BUCKET, step_prefix)
        if any("/state/" in n for n in names) and f"{step_prefix}commit_success.txt" not in names:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return len(names)
        assert proc.poll() is None, f"finished before the kill:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.001)


@pytest.mark.slow  # ~45 s: a local reference run and an interrupted gs:// run
def test_gs_workdir_survives_a_kill_mid_upload_and_ends_bit_exact(gcs, reference, tmp_path):
    workdir = f"gs://{BUCKET}/runs/K"
    env = gcs_env(gcs, tmp_path / "cache")
    args = [sys.executable, "-m", "trainkit.main", "--config=configs/default.py", f"--workdir={workdir}", *RUN]
    partial = kill_mid_upload(gcs, args, env, "runs/K/checkpoints/000040/", tmp_path / "killed.log")
    assert partial > 0
    resumed = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    assert f"start: workdir {workdir}/checkpoints/000020 at step 20" in resumed.stdout  # not the half-written 40
    assert f"exported {workdir}/export/model.safetensors" in resumed.stdout

    # Bit for bit the local uninterrupted run: same params in the final export.
    ours = load_safetensors(gcs.read(BUCKET, "runs/K/export/model.safetensors"))
    theirs = load_safetensors((reference / "export" / "model.safetensors").read_bytes())
    assert ours.keys() == theirs.keys()
    assert all(np.array_equal(ours[k], theirs[k]) for k in ours)

    # The workdir layout, on the bucket: committed steps with manifests, aliases, metrics, TensorBoard, exports.
    names = set(gcs.names(BUCKET, "runs/K/"))
    kept = list_steps(reference / "checkpoints")
    for step in kept:
        for file in ("commit_success.txt", "manifest.json", "train_config.json"):
            assert f"runs/K/checkpoints/{step:06d}/{file}" in names
    assert {n.split("/")[3] for n in names if n.startswith("runs/K/checkpoints/0")} == {f"{s:06d}" for s in kept}
    for alias in ("last", "final"):
        assert gcs.read(BUCKET, f"runs/K/checkpoints/{alias}").decode().strip() == "000060"
    for file in ("train_config.json", "export/model.ckpt", "export/model.json", "export/model.stablehlo"):
        assert f"runs/K/{file}" in names
    assert any(n.startswith("runs/K/tensorboard/events.out.tfevents.") for n in names)
    assert not (ROOT / "gs:").exists() and not (tmp_path / "gs:").exists()  # nothing went to a local "gs:" dir

    # metrics.jsonl: every logged step exactly once (the killed run's lines past step 20 were dropped), one resume.
    records = [json.loads(line) for line in gcs.read(BUCKET, "runs/K/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == list(range(5, 61, 5))
    assert [r["step"] for r in records if r.get("event") == "resume"] == [20]
    local = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/loss"] for r in records if "train/loss" in r] == [r["train/loss"] for r in local
                                                                       if "train/loss" in r]

    # The tools read the gs:// workdir as they read a local one.
    listed = run_cli("ls", workdir, "--json", module="trainkit.ckpt", env=env)
    assert [r["step"] for r in json.loads(listed.stdout)] == kept, listed.stderr
    verified = run_cli("verify", f"{workdir}/checkpoints/final", module="trainkit.ckpt", env=env)
    assert verified.returncode == 0 and verified.stdout.startswith("OK"), verified.stderr
    plotted = run_cli(workdir, "-o", str(tmp_path / "curves.png"), module="trainkit.plot", env=env)
    assert plotted.returncode == 0 and (tmp_path / "curves.png").stat().st_size > 0, plotted.stderr

    # Finished: the same command again does nothing and changes nothing on the bucket.
    before = {n: gcs.read(BUCKET, n) for n in gcs.names(BUCKET, "runs/K/checkpoints/")}
    again = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "already trained to step 60" in again.stdout, again.stderr[-3000:]
    assert {n: gcs.read(BUCKET, n) for n in gcs.names(BUCKET, "runs/K/checkpoints/")} == before


@pytest.mark.slow
def test_fresh_overwrite_clears_a_gs_workdir(gcs, tmp_path):
    workdir = f"gs://{BUCKET}/runs/F"
    env = gcs_env(gcs, tmp_path / "cache")
    short = ("--config.num_steps=10", "--config.checkpoint.every=5", "--config.eval_every=5",
             "--config.progress=none", "--config.export.formats=()")
    train(workdir, *short, env=env)
    assert {n.split("/")[3] for n in gcs.names(BUCKET, "runs/F/checkpoints/0")} == {"000005", "000010"}
    refused = train(workdir, *short, "--fresh", check=False, env=env)
    assert_user_error(refused, "--fresh", "[5, 10]", "--overwrite")
    train(workdir, "--config.num_steps=5", *short[1:], "--fresh", "--overwrite", env=env)
    assert {n.split("/")[3] for n in gcs.names(BUCKET, "runs/F/checkpoints/0")} == {"000005"}


@pytest.mark.parametrize("workdir, fragments", [
    ("gs://Not_A_Bucket/run", ["'Not_A_Bucket' is not a valid GCS bucket name", "gs://BUCKET/path"]),
    ("s3://bucket/run", ["only local paths and gs://"]),
])
def test_bad_remote_workdirs_are_one_line(gcs, tmp_path, workdir, fragments):
    proc = train(workdir, check=False, env=gcs_env(gcs, tmp_path / "cache"))
    assert_user_error(proc, workdir, *fragments)


def test_a_failed_upload_warns_and_is_retried(gcs, tmp_path, monkeypatch, capsys):
    """Metrics uploads that fail (403 here) do not stop a run: a warning, and the next sync sends the newest bytes.
    The final exports (`strict`) fail with one line naming the local copy instead."""
    for key, value in {**gcs.env, "TRAINKIT_CACHE": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(key, value)
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    remote = epath.Path(f"gs://{BUCKET}/runs/U")
    staged = Staged(remote, ("metrics.jsonl",))
    metrics = staged.local / "metrics.jsonl"
    metrics.write_text('{"step": 1}\n')
    gcs.refuse_uploads = True
    staged.sync(force=True)  # fails in the background
    metrics.write_text('{"step": 1}\n{"step": 2}\n')
    staged.sync(force=True)  # waits for that upload, warns, tries again
    gcs.refuse_uploads = False
    staged.close()
    out = capsys.readouterr().out
    assert f"trainkit: warning: uploading metrics.jsonl to {remote}/metrics.jsonl failed (" in out
    assert "retrying now" in out
    assert gcs.read(BUCKET, "runs/U/metrics.jsonl") == b'{"step": 1}\n{"step": 2}\n'

    strict = Staged(remote, ("export",), strict=True)
    (strict.local / "export").mkdir()
    (strict.local / "export" / "model.pt").write_bytes(b"weights")
    gcs.refuse_uploads = True
    try:
        with pytest.raises(TrainkitError, match=r"uploading model.pt to .*export/model.pt failed \(.*the files are in"):
            strict.close()
    finally:
        gcs.refuse_uploads = False
        epath_backend.fsspec_backend._get_filesystem.cache_clear()
    assert "runs/U/export/model.pt" not in gcs.names(BUCKET, "runs/U/")


def test_a_missing_bucket_is_one_line_and_is_not_created(tmp_path):
    """gcsfs's mkdir would create a missing bucket; trainkit probes with one object write instead."""
    with GCSEmulator(buckets=("real-bucket",)) as strict:
        proc = train("gs://reel-bucket/run", check=False, env=gcs_env(strict, tmp_path / "cache"))
        assert_user_error(proc, "bucket gs://reel-bucket does not exist", "gcloud storage buckets create",
                          "--workdir")
        assert set(strict.store.buckets) == {"real-bucket"}
        assert not any(method == "POST" and path.split("?")[0].rstrip("/") == "/storage/v1/b"
                       for method, path in strict.store.requests)
