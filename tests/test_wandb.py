"""W&B logging as a specification, in offline mode (no network): an interrupted and resumed training is ONE
W&B run whose history holds every logged step once, in increasing order — read from W&B's own run files."""

from __future__ import annotations

import re
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from conftest import ROOT, assert_user_error, cli_env, train

from trainkit.checkpoints.layout import read_alias, step_dir_name
from trainkit.logging.metrics import read_metrics
from trainkit.logging.wandb_run import read_run_id

pytest.importorskip("wandb")

RUN = ("--config.num_steps=40", "--config.log_every=2", "--config.eval_every=10", "--config.checkpoint.every=10",
       "--config.checkpoint.keep_last=10", "--config.wandb.enabled=true", "--config.wandb.mode=offline")


# -- reading W&B's offline run files -----------------------------------------------------------------------
# A `run-<id>.wandb` file is W&B's transaction log: a 7-byte header (":W&B", magic 0xBEE1, version 0), then
# LevelDB-log records in 32 KiB blocks (crc32, length, type: full/first/middle/last) holding serialized
# `wandb_internal_pb2.Record`s. wandb 0.31 ships no Python reader (its own lives in the Go wandb-core).

def wandb_records(path: Path):
    """Yield the Records of one .wandb file; stops at a truncated tail (a run killed mid-write)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1, f"{path} is not a .wandb file"
    pos, block, payload = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        if kind == 0 or len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            return
        pos += 7 + length
        payload = chunk if kind in (1, 2) else payload + chunk
        if kind in (1, 4):  # full, or the last piece of a split record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            yield record


def wandb_segments(workdir: Path) -> list[tuple[str, list[tuple[int, dict[str, float]]]]]:
    """One (run id, [(step, values), ...]) per offline run dir of `W/wandb`, in the order they started.
    Each start of trainkit writes one; `wandb sync` appends them to the run in that order."""
    import json

    segments = []
    for path in (workdir / "wandb").glob("offline-run-*/run-*.wandb"):
        records = list(wandb_records(path))
        run = next((r.run for r in records if r.WhichOneof("record_type") == "run"), None)
        rows = []
        for r in records:
            if r.WhichOneof("record_type") == "history":  # "train/loss" is stored as a nested key
                values = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
                rows.append((r.history.step.num, {k: v for k, v in values.items() if not k.startswith("_")}))
        if run is None:  # a killed writer may leave only the header: no run record, no rows
            segments.append((path.stat().st_mtime_ns, path.stem.removeprefix("run-"), rows))
        else:
            segments.append((run.start_time.ToNanoseconds(), run.run_id, rows))
    return [(run_id, rows) for _, run_id, rows in sorted(segments)]


def wandb_env(tmp_path: Path) -> dict[str, str]:
    env = cli_env()
    for key in [k for k in env if k.startswith("WANDB_")]:
        del env[key]
    home = tmp_path / "wandb-home"  # nothing is written to ~ or read from a user's settings
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(home), WANDB_CONFIG_DIR=str(home / "config"),
               WANDB_CACHE_DIR=str(home / "cache"), WANDB_DATA_DIR=str(home / "data"))
    return env


def start(workdir: Path, env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "trainkit.main", "--config=configs/default.py", f"--workdir={workdir}", *RUN, *args],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def stop_at(workdir: Path, proc: subprocess.Popen, step: int, sig: signal.Signals, timeout: float = 120) -> None:
    """Send `sig` once `step` is logged and a checkpoint is complete (the `last` alias exists)."""
    deadline = time.time() + timeout
    while not (any(r.get("step", 0) >= step for r in read_metrics(workdir))
               and read_alias(workdir / "checkpoints", "last") is not None):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"step {step} not reached"
        time.sleep(0.02)
    proc.send_signal(sig)
    proc.communicate(timeout=120)


def assert_rows_match_metrics(workdir: Path, rows: list[tuple[int, dict[str, float]]]) -> None:
    """Each W&B row holds exactly the values metrics.jsonl recorded at its step."""
    expected: dict[int, dict[str, float]] = {}
    for r in read_metrics(workdir):
        if "event" not in r:
            expected.setdefault(r["step"], {}).update({k: v for k, v in r.items() if k != "step"})
    for step, values in rows:
        assert values == expected[step], step


@pytest.fixture(scope="module")
def resumed(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A 40-step run stopped by SIGTERM after step 14 and resumed by the same command."""
    tmp = tmp_path_factory.mktemp("wandb")
    workdir, env = tmp / "w", wandb_env(tmp)
    stop_at(workdir, start(workdir, env), 14, signal.SIGTERM)
    assert read_alias(workdir / "checkpoints", "final") is None, "the run was not interrupted"
    train(workdir, *RUN, env=env)
    return workdir, env


@pytest.mark.slow
def test_sigterm_and_resume_is_one_wandb_run_without_duplicate_steps(resumed):
    from trainkit.checkpoints.manager import read_meta

    workdir, _ = resumed
    segments = wandb_segments(workdir)
    assert len(segments) == 2, "expected two offline segments: before and after the SIGTERM"
    run_id = read_run_id(workdir)
    final = workdir / "checkpoints" / step_dir_name(read_alias(workdir / "checkpoints", "final"))
    assert {i for i, _ in segments} == {run_id} and read_meta(final).wandb_run_id == run_id
    steps = [step for _, rows in segments for step, _ in rows]
    assert steps == list(range(2, 41, 2)), steps  # strictly increasing, none twice, none missing
    assert_rows_match_metrics(workdir, [row for _, rows in segments for row in rows])


@pytest.mark.slow
def test_kill_between_saves_resumes_logging_at_the_restored_step(tmp_path):
    """SIGKILL after step 14 (last checkpoint 10, normally). W&B's offline writer had not flushed the killed
    segment; the restart continues the same run and logs from the restored step on, with the recomputed (identical)
    values."""
    env = wandb_env(tmp_path)
    workdir = tmp_path / "w"
    stop_at(workdir, start(workdir, env), 14, signal.SIGKILL)
    proc = train(workdir, *RUN, env=env)
    restored = int(re.search(r"start: workdir \S+ at step (\d+)", proc.stdout)[1])
    assert 10 <= restored < 40, proc.stdout
    segments = wandb_segments(workdir)
    assert len(segments) == 2 and {i for i, _ in segments} == {read_run_id(workdir)}, segments
    assert [step for step, _ in segments[1][1]] == list(range(restored + 2, 41, 2))
    assert_rows_match_metrics(workdir, segments[1][1])


@pytest.mark.slow
def test_resume_from_latest_continues_and_from_older_step_branches(resumed, tmp_path):
    workdir, env = resumed
    proc = train(tmp_path / "more", *RUN, "--config.num_steps=44", f"--resume_from={workdir}", env=env)
    assert read_run_id(tmp_path / "more") == read_run_id(workdir), proc.stdout
    assert [(i, [s for s, _ in rows]) for i, rows in wandb_segments(tmp_path / "more")] == [
        (read_run_id(workdir), [42, 44])]

    proc = train(tmp_path / "branch", *RUN, f"--resume_from={workdir}/checkpoints/000020", env=env)
    assert read_run_id(tmp_path / "branch") != read_run_id(workdir)
    assert "logging this branch as the new W&B run" in proc.stdout
    [(branch_id, rows)] = wandb_segments(tmp_path / "branch")
    assert branch_id == read_run_id(tmp_path / "branch") and [s for s, _ in rows] == list(range(22, 41, 2))


def test_enabled_without_wandb_installed_is_one_line(tmp_path):
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "wandb.py").write_text("raise ModuleNotFoundError(\"No module named 'wandb'\", name='wandb')\n")
    env = wandb_env(tmp_path)
    env["PYTHONPATH"] = f"{stub}:{ROOT}"
    proc = train(tmp_path / "w", *RUN, env=env, check=False)
    assert_user_error(proc, "wandb is not installed", "--config.wandb.enabled=false")


def test_wandb_is_not_imported_when_disabled():
    code = "import sys, trainkit.train, trainkit.logging.metrics; assert 'wandb' not in sys.modules, 'wandb imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=cli_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
