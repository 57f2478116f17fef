"""The README as a specification: its ```bash commands run verbatim (step counts shrunk as tests/test_docs.py
shrinks them) from a scratch copy of the repo root, so `--workdir=runs/digits` is relative, as a user types it.

Install steps (`python -m pip install ...`) and the test command itself are not run here: bench/fresh_clone.sh
runs the README's commands, installs included, in a fresh clone and venv.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, cli_env
from test_docs import bash_lines, shrink

from trainkit.checkpoints.layout import list_steps, read_alias
from trainkit.logging.metrics import read_metrics

NOT_RUN = {
    "python -m pip install": "installs: bench/fresh_clone.sh runs them in a fresh venv",
    "python -m pytest": "the test suite itself",
}


def readme_commands() -> list[tuple[int, str]]:
    """(README line, command) for every command of the README's ```bash blocks, `a && b` split in two."""
    out = []
    for number, line in bash_lines(ROOT / "README.md"):
        for command in line.split(" && "):
            if not any(command.startswith(prefix) for prefix in NOT_RUN):
                out.append((number, command.strip()))
    return out


def repo_copy(tmp_path: Path) -> Path:
    """A scratch copy of what a clone's root holds for running commands (package, configs, README)."""
    scratch = tmp_path / "clone"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("trainkit", "configs"):
        shutil.copytree(ROOT / name, scratch / name, ignore=ignore)
    shutil.copy(ROOT / "README.md", scratch / "README.md")
    return scratch


def best_eval_step(workdir: Path, metric: str, mode: str) -> tuple[float, set[int]]:
    """The best value of `metric` over the evaluations at saved steps, and the steps that reach it."""
    evals = {r["step"]: r[metric] for r in read_metrics(workdir) if metric in r and r.get("event") is None}
    best = (max if mode == "max" else min)(evals.values())
    return best, {step for step, value in evals.items() if value == best}


def test_readme_commands_are_all_trainkit_commands_and_the_quick_start_comes_first():
    commands = readme_commands()
    assert commands[0][1] == "python -m trainkit.main --config=configs/default.py --workdir=runs/digits"
    for number, command in commands:
        assert command.startswith("python -m trainkit."), f"README.md:{number}: {command}"
        assert "/tmp/" not in command and "runs/" in command, f"README.md:{number}: use relative paths as users do"


@pytest.mark.slow
def test_readme_commands_run_verbatim_from_a_copy_of_the_repo(tmp_path):
    scratch = repo_copy(tmp_path)
    env = cli_env(TRAINKIT_CACHE=str(tmp_path / "cache"), HOME=str(tmp_path / "home"))
    env.pop("PYTHONPATH")  # `python -m trainkit...` from the clone's root imports the clone's package
    commands = readme_commands()
    outputs, best_at_30 = [], None
    for number, command in commands:
        ran = shrink(command)
        proc = subprocess.run(["bash", "-c", ran], cwd=scratch, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, f"README.md:{number}: {ran}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        assert "Traceback" not in proc.stderr, proc.stderr
        outputs.append(proc.stdout)
        if command == commands[0][1]:
            check_quick_start(scratch / "runs" / "digits", final=30)
            best_at_30 = read_alias(scratch / "runs" / "digits" / "checkpoints", "best")
    workdir = scratch / "runs" / "digits"
    check_quick_start(workdir, final=40)  # the README's "continue to 800", shrunk
    listing = outputs[1]
    assert all(re.search(rf"^\s*{step}\s", listing, re.M) for step in (25, 30)), listing
    exported = scratch / "digits.safetensors"
    assert exported.is_file() and exported.with_suffix(".json").is_file()
    assert json.loads(exported.with_suffix(".json").read_text())["source"]["step"] == best_at_30
    assert not (ROOT / "digits.safetensors").exists()


def check_quick_start(workdir: Path, final: int) -> None:
    """The workdir the quick start leaves: the last two steps and the best, aliases, exports, resolved config."""
    checkpoints = workdir / "checkpoints"
    best = read_alias(checkpoints, "best")
    value, best_steps = best_eval_step(workdir, "eval/accuracy", "max")
    assert best in best_steps, (best, value, best_steps)
    assert list_steps(checkpoints) == sorted({final - 5, final, best})
    assert read_alias(checkpoints, "last") == read_alias(checkpoints, "final") == final
    assert {p.name for p in (workdir / "export").iterdir()} == {
        "model.ckpt", "model.json", "model.safetensors", "model.stablehlo"}
    assert json.loads((workdir / "train_config.json").read_text())["num_steps"] == final
    assert (checkpoints / f"{final:06d}" / "train_config.json").is_file()
