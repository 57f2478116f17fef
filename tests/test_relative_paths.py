"""Paths as people type them: every command run from a scratch working directory with relative arguments only.

The journey a user takes: train (Ctrl-C) -> run again (auto-resume) -> --resume_from into another workdir ->
--init_from -> ckpt ls|inspect|verify|diff|pack -> export (.safetensors, .pt, .stablehlo) -> plot -> launch -n 2;
and workdirs given as a symlink or as `./runs/x/`. Each step asserts exactly what is on disk, and that relative
outputs land where the user's working directory says (not in the repo, not in the workdir).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, cli_env

from trainkit.checkpoints.layout import list_steps, read_alias
from trainkit.logging.metrics import read_metrics

pytestmark = pytest.mark.slow

RUN = ("--config=configs/default.py", "--config.num_steps=40", "--config.log_every=2", "--config.eval_every=10",
       "--config.checkpoint.every=10", "--config.checkpoint.keep_last=10")


def tk(cwd: Path, module: str, *args: str, expect: int = 0, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m trainkit.<module> args...` with `cwd` as the working directory, as a user at a shell."""
    proc = subprocess.run([sys.executable, "-m", f"trainkit.{module}", *args], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == expect, f"{module} {' '.join(args)}: exit {proc.returncode}\n{proc.stdout[-2000:]}" \
                                      f"\n{proc.stderr[-4000:]}"
    return proc


def steps(workdir: Path) -> list[int]:
    return list_steps(workdir / "checkpoints")


def aliases(workdir: Path) -> dict[str, int | None]:
    return {name: read_alias(workdir / "checkpoints", name) for name in ("last", "best", "final")}


def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def cwd(tmp_path_factory) -> Path:
    """A scratch working directory with the repo's configs/ beside it, as in a clone."""
    scratch = tmp_path_factory.mktemp("cwd")
    (scratch / "configs").symlink_to(ROOT / "configs")
    return scratch


@pytest.fixture(scope="module")
def run_a(cwd) -> dict:
    """runs/a: trained until Ctrl-C (SIGINT) after step 14, then run again with the same command to the end."""
    proc = subprocess.Popen([sys.executable, "-m", "trainkit.main", *RUN, "--workdir=runs/a"], cwd=cwd,
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not any(r.get("step", 0) >= 14 for r in read_metrics(cwd / "runs/a")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-4000:]
    interrupted = read_alias(cwd / "runs/a/checkpoints", "last")
    assert interrupted is not None and 14 <= interrupted < 40, out
    assert f"saved step {interrupted}" in out and "SIGINT" in out
    assert read_alias(cwd / "runs/a/checkpoints", "final") is None
    resumed = tk(cwd, "main", *RUN, "--workdir=runs/a")
    return {"interrupted": interrupted, "stdout": resumed.stdout}


def test_ctrl_c_then_the_same_command_resumes(cwd, run_a):
    a = cwd / "runs/a"
    step = run_a["interrupted"]
    assert f"start: workdir {a}/checkpoints/{step:06d} at step {step}" in run_a["stdout"], run_a["stdout"][-2000:]
    assert steps(a) == sorted({10, 20, 30, 40, run_a["interrupted"]})
    assert aliases(a)["last"] == 40 and aliases(a)["final"] == 40 and aliases(a)["best"] in steps(a)
    logged = [r["step"] for r in read_metrics(a) if "train/loss" in r]
    assert logged == sorted(set(logged)) and logged[-1] == 40  # every step once: cut at the resume point
    assert {"model.ckpt", "model.json", "model.safetensors", "model.stablehlo"} <= set(os.listdir(a / "export"))
    assert not (cwd / "checkpoints").exists() and not (ROOT / "runs" / "a").exists()


def test_resume_from_a_relative_alias_into_another_relative_workdir(cwd, run_a):
    proc = tk(cwd, "main", *RUN, "--config.num_steps=50", "--workdir=runs/b",
              "--resume_from=runs/a/checkpoints/last")
    assert "at step 40" in proc.stdout
    assert steps(cwd / "runs/b") == [50] and aliases(cwd / "runs/b")["final"] == 50
    assert [r["step"] for r in read_metrics(cwd / "runs/b") if "train/loss" in r][0] == 42


def test_init_from_a_relative_workdir(cwd, run_a):
    proc = tk(cwd, "main", *RUN, "--config.num_steps=10", "--workdir=runs/c", "--init_from=runs/a")
    assert "init_from" in proc.stdout
    assert steps(cwd / "runs/c") == [10] and aliases(cwd / "runs/c")["final"] == 10


def test_ckpt_commands_with_relative_paths(cwd, run_a):
    listing = json.loads(tk(cwd, "ckpt", "ls", "runs/a", "--json").stdout)
    assert [row["step"] for row in listing] == steps(cwd / "runs/a")
    expected = {"last", "final"} | ({"best"} if aliases(cwd / "runs/a")["best"] == 40 else set())
    assert set(next(row for row in listing if row["step"] == 40)["aliases"]) == expected
    inspected = json.loads(tk(cwd, "ckpt", "inspect", "runs/a/checkpoints/best", "--json").stdout)
    assert inspected["step"] == aliases(cwd / "runs/a")["best"]
    assert "OK" in tk(cwd, "ckpt", "verify", "./runs/a/").stdout
    diff = tk(cwd, "ckpt", "diff", "runs/a/checkpoints/000010", "runs/a", expect=1).stdout
    assert "leaves differ" in diff
    tk(cwd, "ckpt", "pack", "runs/a", "-o", "packed/a.ckpt")
    assert (cwd / "packed/a.ckpt").is_file() and not (ROOT / "packed").exists()
    assert "OK" in tk(cwd, "ckpt", "verify", "packed/a.ckpt").stdout


@pytest.mark.parametrize("out", ["model.safetensors", "out/model.pt", "model.stablehlo"])
def test_export_writes_a_relative_output_in_the_working_directory(cwd, run_a, out):
    before = files_under(cwd / "runs/a")
    tk(cwd, "export", "runs/a", "-o", out)
    assert (cwd / out).is_file() and (cwd / out).with_suffix(".json").is_file()
    assert files_under(cwd / "runs/a") == before and not (ROOT / out).exists()
    sidecar = json.loads((cwd / out).with_suffix(".json").read_text())
    assert sidecar["source"]["step"] == 40


def test_plot_writes_a_relative_output_in_the_working_directory(cwd, run_a):
    tk(cwd, "plot", "runs/a", "./runs/b/", "-o", "curves.png")
    assert (cwd / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (ROOT / "curves.png").exists() and not (cwd / "runs/a/curves.png").exists()


def test_symlinked_workdir_and_trailing_slash(cwd, run_a):
    (cwd / "link").symlink_to("runs/a", target_is_directory=True)
    proc = tk(cwd, "main", *RUN, "--config.num_steps=44", "--workdir=link")
    assert "at step 40" in proc.stdout
    assert steps(cwd / "runs/a")[-1] == 44 and aliases(cwd / "runs/a")["final"] == 44
    assert (cwd / "link").is_symlink()  # the link is used, not replaced
    tk(cwd, "main", *RUN, "--config.num_steps=10", "--workdir=./runs/x/")
    assert steps(cwd / "runs/x") == [10] and not (cwd / "runs/x/runs").exists()


def test_launch_two_processes_with_a_relative_workdir(cwd):
    proc = subprocess.run([sys.executable, "-m", "trainkit.launch", "-n", "2", "--devices_per_process", "1", "--",
                           "--config=configs/default.py", "--workdir=runs/mh", "--config.num_steps=10",
                           "--config.checkpoint.every=5", "--config.eval_every=5", "--config.log_every=5"],
                          cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert steps(cwd / "runs/mh") == [5, 10] and aliases(cwd / "runs/mh")["final"] == 10

