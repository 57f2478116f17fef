"""Weights & Biases logging (optional): one W&B run per training history, continued across restarts.

    python -m trainkit.main --config=configs/default.py --workdir=W --config.wandb.enabled=true

Process 0 starts the run with `dir=W` (W&B's files go to `W/wandb/`). Its id is kept in `W/wandb_run_id` and in
the `meta` of every checkpoint, so a restart in the same workdir, or `--resume_from` a checkpoint elsewhere,
continues the same W&B run (`resume="allow"`) from the restored step on. W&B refuses steps lower than the last
it holds, so trainkit does not send them: online, W&B reports the run's last step at start-up (a run killed
between saves got further than its checkpoint; resume is bit-exact, so W&B's values for those steps stay right).
Offline, each start writes its own `W/wandb/offline-run-*` segment, which `wandb sync` appends to the same run;
a killed process loses the segment's unflushed tail, which the restart logs again from the restored step.

Which run a start logs to:
  1. `$WANDB_RUN_ID` if set (the user's explicit choice);
  2. resuming a checkpoint: the run recorded in its meta, unless it is a branch (`--resume_from` an older step
     of a run whose W&B history already goes further), which gets a new run;
  3. this workdir's `wandb_run_id` (a restart that died before its first checkpoint), unless `--fresh`;
  4. a new run.
`$WANDB_MODE` (online | offline | disabled), when set, overrides `config.wandb.mode`.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import string
from pathlib import Path
from typing import Any, Mapping

import jax
import ml_collections
from etils import epath

from trainkit import config as config_lib
from trainkit.errors import TrainkitError
from trainkit.logging.metrics import read_metrics
from trainkit.checkpoints.resume import Origin, Start
from trainkit.workdir import display_name, staging_dir

RUN_ID_FILE = "wandb_run_id"
MODES = ("online", "offline", "disabled", "shared")


@dataclasses.dataclass
class WandbRun:
    """A started W&B run. `logged_up_to`: W&B already holds the steps up to here; they are not sent again."""

    run: Any
    id: str
    logged_up_to: int

    def log(self, values: Mapping[str, float], step: int) -> None:
        """Log `values` at `step` (called by MetricsWriter, after metrics.jsonl)."""
        if step > self.logged_up_to:
            self.run.log(dict(values), step=step)

    def finish(self, failed: bool = False) -> None:
        """Flush and close the run; `failed` marks it crashed (a stopped-early run ended cleanly)."""
        self.run.finish(exit_code=1 if failed else 0)


def start_wandb(config: ml_collections.ConfigDict, workdir: epath.Path, start: Start, step: int, *,
                fresh: bool = False) -> WandbRun | None:
    """Start (or continue) the W&B run of this training, on process 0 when `config.wandb.enabled`."""
    if not config.wandb.enabled or jax.process_index() != 0:
        return None
    mode = os.environ.get("WANDB_MODE") or config.wandb.mode
    if mode not in MODES:
        raise TrainkitError(f"wandb mode {mode!r} is not one of {', '.join(MODES)}; "
                            "set --config.wandb.mode (or $WANDB_MODE) to e.g. offline")
    try:
        import wandb
    except ImportError:
        raise TrainkitError("config.wandb.enabled is set but wandb is not installed; "
                            "pip install 'trainkit[wandb]', or set --config.wandb.enabled=false") from None
    run_id = _choose_run(workdir, start, step, fresh)
    try:
        run = wandb.init(
            project=config.wandb.project, entity=config.wandb.entity or None, mode=mode, id=run_id,
            resume="allow", dir=str(staging_dir(workdir)), name=display_name(workdir),
            config=config_lib.to_dict(config),
            allow_val_change=True,  # a resume may change e.g. num_steps or learning_rate
        )
    except wandb.Error as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrainkitError(f"W&B could not start a run: {first}; run `wandb login`, or set "
                            "--config.wandb.mode=offline (sync later with `wandb sync W/wandb`)") from None
    (workdir / RUN_ID_FILE).write_text(run_id + "\n")
    logged_up_to = max(step, run.starting_step - 1)  # starting_step: the step after the last W&B holds
    print(f"trainkit: W&B run {run_id} ({mode}), logging steps after {logged_up_to}", flush=True)
    return WandbRun(run, run_id, logged_up_to)


def new_run_id() -> str:
    """A fresh id in W&B's style: 8 characters of [a-z0-9]."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def read_run_id(workdir: epath.PathLike) -> str | None:
    """The W&B run id recorded in `W/wandb_run_id`, or None."""
    path = epath.Path(workdir) / RUN_ID_FILE
    if not path.exists():
        return None
    return path.read_text().strip() or None


def _choose_run(workdir: epath.Path, start: Start, step: int, fresh: bool) -> str:
    """The W&B run id to log to, by the rules in the module docstring."""
    here = None if fresh else read_run_id(workdir)
    restored = start.meta.wandb_run_id if start.meta is not None else None  # None unless resumed
    if os.environ.get("WANDB_RUN_ID"):
        run_id = os.environ["WANDB_RUN_ID"]
    elif restored and start.origin is Origin.RESUME_FROM and _last_step(start.source_workdir) > step:
        run_id = new_run_id()
        print(f"trainkit: W&B run {restored} already has steps after {step}; logging this branch as the new "
              f"W&B run {run_id}", flush=True)
    else:
        run_id = restored or here or new_run_id()
    return run_id


def _last_step(workdir: Path | None) -> int:
    """The highest step in `workdir`'s metrics.jsonl (0 if none)."""
    if workdir is None:
        return 0
    return max((int(r.get("step", 0)) for r in read_metrics(workdir)), default=0)
