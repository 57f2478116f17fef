"""6. Time to first step: `python -m trainkit.main --config=configs/default.py` from process start until its
first train step is done, vs. a bare script that imports jax + flax + optax, builds the same model and runs one
jitted step (bench/first_step_bare.py). Goal ≤ 1.3×.

trainkit's first step is done when metrics.jsonl holds step 1 (log_every=1: the loop writes it right after
pulling the step's metrics to the host); the bare script writes a file after `float(loss)`. Both are polled
every 5 ms from the parent, which starts the clock just before spawning the process and kills it once seen.

    python bench/first_step.py [--quick]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import harness
from harness import Figure, Section

POLL_S = 0.005
TIMEOUT_S = 300


def _env() -> dict[str, str]:
    """The benchmark's environment, minus a JAX compilation cache set from outside (the test session sets one):
    trainkit's own cache (config key `compilation_cache`) is what is measured."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.pop("JAX_ENABLE_COMPILATION_CACHE", None)
    return {**env, "PYTHONPATH": str(harness.ROOT)}


def _time_until(argv: list[str], done: Callable[[], bool]) -> float:
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=harness.ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=_env())
    try:
        while not done():
            if proc.poll() is not None:
                raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode} before its first step:\n"
                                   f"{proc.stderr.read()[-3000:]}")
            if time.perf_counter() - start > TIMEOUT_S:
                raise RuntimeError(f"{' '.join(argv)}: no first step after {TIMEOUT_S} s")
            time.sleep(POLL_S)
        return time.perf_counter() - start
    finally:
        proc.kill()
        proc.wait()


def _metrics_has_step_1(path: Path) -> bool:
    try:
        return '"step": 1,' in path.read_text()
    except FileNotFoundError:
        return False


def trainkit_first_step() -> float:
    workdir = Path(tempfile.mkdtemp(prefix="bench-first-", dir=harness.scratch_dir()))
    try:
        return _time_until(
            [sys.executable, "-m", "trainkit.main", "--config=configs/default.py", f"--workdir={workdir}",
             "--config.log_every=1"],
            lambda: _metrics_has_step_1(workdir / "metrics.jsonl"))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _metrics_has_step(path: Path, step: int) -> bool:
    try:
        return f'"step": {step},' in path.read_text()
    except FileNotFoundError:
        return False


def cold_and_restart() -> tuple[float, float]:
    """(cold start, restart) seconds to the first step of `configs/default.py`: cold = a fresh workdir and an empty
    compilation cache; restart = the same command again after it saved step 10 (restore + cached compilations)."""
    with tempfile.TemporaryDirectory(prefix="bench-restart-", dir=harness.scratch_dir()) as tmp:
        workdir, cache = Path(tmp) / "w", Path(tmp) / "jax-cache"
        argv = [sys.executable, "-m", "trainkit.main", "--config=configs/default.py", f"--workdir={workdir}",
                "--config.log_every=1", "--config.eval_every=1000", "--config.checkpoint.every=10",
                f"--config.compilation_cache={cache}", "--config.export.formats=()"]
        cold = _time_until(argv + ["--config.num_steps=10"], lambda: _metrics_has_step(workdir / "metrics.jsonl", 1))
        shutil.rmtree(workdir)
        subprocess.run(argv + ["--config.num_steps=10"], cwd=harness.ROOT, env=_env(), check=True,
                       capture_output=True, timeout=TIMEOUT_S)
        restart = _time_until(argv + ["--config.num_steps=20"],
                              lambda: _metrics_has_step(workdir / "metrics.jsonl", 11))
    return cold, restart


def bare_first_step() -> float:
    with tempfile.TemporaryDirectory(prefix="bench-first-", dir=harness.scratch_dir()) as tmp:
        done = Path(tmp) / "done"
        return _time_until([sys.executable, str(Path(__file__).with_name("first_step_bare.py")), str(done)],
                           done.exists)


def trainkit_timeline(workdir: Path) -> dict[str, float]:
    """Run in a fresh process (`--timeline-worker W`): seconds since start at each stage of trainkit's way to
    step 1, from wrappers around the collaborators `train._run` calls (and the first call of each jit)."""
    start = time.perf_counter()
    import trainkit.main as main_lib

    timeline = {"import trainkit.main": time.perf_counter() - start}
    import trainkit.logging.metrics as metrics_lib
    from trainkit import train

    timeline["import trainkit.train (jax, flax, optax, orbax, grain)"] = time.perf_counter() - start

    def after(name, fn):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            timeline[name] = time.perf_counter() - start
            return out
        return wrapped

    stages = {"load_dataset": "dataset (imports sklearn)", "CheckpointManager": "Orbax CheckpointManager",
              "find_start": "init state (jit of init + optimizer state: compile + run)",
              "MetricsWriter": "metrics writer (tensorboardX)"}
    for attr, name in stages.items():
        setattr(train, attr, after(name, getattr(train, attr)))
    write = metrics_lib.MetricsWriter.write

    def write_and_stop(self, step, metrics):
        write(self, step, metrics)
        if "train/loss" in metrics:
            timeline["first step (compile + run)"] = time.perf_counter() - start
            print(json.dumps(timeline), flush=True)
            os._exit(0)

    metrics_lib.MetricsWriter.write = write_and_stop
    sys.argv = ["trainkit.main", "--config=configs/default.py", f"--workdir={workdir}", "--config.log_every=1"]
    main_lib.run()
    raise RuntimeError("trainkit.main returned before step 1")


def _timelines() -> tuple[dict[str, float], dict[str, float]]:
    with tempfile.TemporaryDirectory(prefix="bench-first-", dir=harness.scratch_dir()) as tmp:
        proc = subprocess.run([sys.executable, __file__, "--timeline-worker", str(Path(tmp) / "w")],
                              cwd=harness.ROOT, capture_output=True, text=True, timeout=TIMEOUT_S,
                              env={**os.environ, "PYTHONPATH": str(harness.ROOT)})
        trainkit = json.loads(proc.stdout.strip().splitlines()[-1])
        done = Path(tmp) / "bare.json"
        subprocess.run([sys.executable, str(Path(__file__).with_name("first_step_bare.py")), str(done)],
                       check=True, timeout=TIMEOUT_S)
        return trainkit, json.loads(done.read_text())


def _format(timeline: dict[str, float]) -> str:
    previous, parts = 0.0, []
    for name, at in sorted(timeline.items(), key=lambda kv: kv[1]):
        parts.append(f"{name} +{at - previous:.2f} s")
        previous = at
    return "; ".join(parts) + f" (total {previous:.2f} s)"


def run(quick: bool) -> Section:
    repeats = 1 if quick else 6
    times = harness.interleaved({"trainkit": trainkit_first_step, "bare": bare_first_step}, repeats)
    ratio = harness.paired_ratio(times["trainkit"], times["bare"])
    trainkit_stages, bare_stages = _timelines()
    pairs = [cold_and_restart() for _ in range(repeats if quick else 3)]
    cold, restart = [c for c, _ in pairs], [r for _, r in pairs]
    section = Section("first_step", "6. Time to first step")
    section.figures.append(Figure(
        "time to first step, `python -m trainkit.main` ÷ bare script", ratio, "×", ("<=", 1.3),
        f"{harness.spread(times['trainkit'], '{:.1f}')} s vs {harness.spread(times['bare'], '{:.1f}')} s",
        "trainkit imports and starts more before step 1: Orbax + tensorstore (checkpoint manager, resume "
        "check), grain, tensorboardX, and it compiles init and step under shardings; see the imports below. "
        "Closing it: import Orbax/grain/tensorboardX lazily and start the checkpoint manager after step 1"))
    section.figures.append(Figure(
        "time to first step, restart (resume + cached compilations) ÷ cold start", harness.paired_ratio(restart, cold),
        "×", ("<=", 0.5), f"{harness.spread(restart, '{:.1f}')} s vs {harness.spread(cold, '{:.1f}')} s",
        "a restart still pays the interpreter, the imports (jax, flax, optax, orbax, grain) and the dataset, which "
        "a compilation cache cannot remove; only compilation and init are saved"))
    section.notes += [
        "Restart vs. cold start: `configs/default.py` with its own compilation cache directory, empty for the cold "
        f"start; it then trains to step 10 (saved) and the same command is started again; {len(pairs)} pair(s).",
        f"{repeats} alternating repetitions, wall clock from spawn to the first completed step; median of "
        "per-repetition ratios. Both processes compile from scratch (no persistent compilation cache).",
        "Where the time goes (one more run of each, seconds since the interpreter started running the script, "
        "stage by stage): trainkit: " + _format(trainkit_stages) + ". Bare: " + _format(bare_stages) + ".",
        "Found and fixed: tensorboardX imports PyTorch whenever it is installed (~1.5 s here, for nothing "
        "trainkit logs); trainkit.logging.metrics now imports tensorboardX with `import torch` made to fail.",
    ]
    return section


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--timeline-worker":
        trainkit_timeline(Path(sys.argv[2]))
    else:
        harness.main(run)
