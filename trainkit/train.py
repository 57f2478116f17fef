"""The training loop: build, start (resume / fine-tune / scratch), step, evaluate, log, save, export.

Reads top to bottom: `train_and_evaluate` is the whole story in five lines; then `build_experiment` (mesh, data,
task, optimizer, sharded abstract state), `restore_or_init` (the starting state), `train_loop`, and the jitted
step functions below them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath

from trainkit import config as config_lib
from trainkit import distributed, sharding
from trainkit.checkpoints.meta import CheckpointMeta
from trainkit.compilation_cache import enable_compilation_cache
from trainkit.checkpoints.manager import CheckpointManager
from trainkit.data import load_dataset
from trainkit.errors import TrainkitError
from trainkit.data.pipeline import TrainBatches, eval_batches
from trainkit.logging.metrics import MetricsWriter
from trainkit.models import Task, build_task
from trainkit.nonfinite import FLAG, NonFiniteGuard, guard_update
from trainkit.paths import absolute_optional, absolute_path
from trainkit.preemption import StopRequests
from trainkit.logging.progress import Progress
from trainkit.checkpoints.resume import Start, find_start
from trainkit.checkpoints.layout import list_steps
from trainkit.train_state import TrainState, make_optimizer
from trainkit.logging.wandb_run import start_wandb
from trainkit.workdir import WorkdirLock, prepare

BLOCK_EVERY = 10  # wait for a result at least this often: fake CPU devices deadlock on deep queues


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Command-line choices that are not part of the config."""

    resume_from: str | None = None
    init_from: str | None = None
    partial: bool = False
    fresh: bool = False
    overwrite: bool = False
    hf_token: str | None = None


@dataclasses.dataclass
class TrainResult:
    step: int
    state: Any
    metrics: dict[str, float]
    stopped_by: str | None  # None: finished; "SIGTERM" / "SIGINT" / "walltime": saved and stopped early


def itstime(step: int, every: int, last: int | None = None) -> bool:
    """The one predicate for periodic work (big_vision's `itstime`): every N steps, and at the last step."""
    return (every > 0 and step % every == 0) or step == last


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                       options: RunOptions = RunOptions()) -> TrainResult:
    """Train `config` in `workdir` (a relative path is taken against the current directory): build the experiment,
    start from this workdir's latest good checkpoint (else --resume_from / --init_from / scratch), then loop."""
    config_lib.validate(config)
    enable_compilation_cache(config.compilation_cache)  # before the first compilation
    workdir = prepare(absolute_path(workdir))
    options = dataclasses.replace(options, resume_from=absolute_optional(options.resume_from),
                                  init_from=absolute_optional(options.init_from))
    lock = WorkdirLock(workdir).acquire() if jax.process_index() == 0 else None
    try:
        experiment = build_experiment(config)
        if options.fresh:
            _clear_for_fresh(workdir / "checkpoints", options.overwrite)
        checkpoints = CheckpointManager(workdir, config)
        start = restore_or_init(experiment, checkpoints, options)
        _write_config(workdir, config)
        return train_loop(experiment, workdir, checkpoints, start, fresh=options.fresh)
    finally:
        if lock:
            lock.release()


@dataclasses.dataclass(frozen=True)
class Experiment:
    """What a run is built from: mesh, data, task, optimizer, and the state's abstract shapes with their shardings.
    Built once, in one place (`build_experiment`), by the loop, the tests and the benchmarks alike."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    dataset: Any
    task: Task
    tx: optax.GradientTransformation
    abstract_state: Any  # TrainState of jax.ShapeDtypeStruct, each with its sharding
    state_sharding: Any
    batch_sharding: jax.sharding.NamedSharding

    def init_state(self) -> TrainState:
        """A fresh TrainState created straight into its shardings (jitted; nothing is built twice)."""
        return jax.jit(_init_fn(self.config, self.task, self.tx), out_shardings=self.state_sharding)()


def build_experiment(config: ml_collections.ConfigDict) -> Experiment:
    """mesh -> data -> task -> optimizer -> `eval_shape` of the state -> its shardings (big_vision's order)."""
    mesh = sharding.build_mesh(config.mesh)
    sharding.check_batch(config.batch_size, mesh)
    dataset = load_dataset(config.data)
    task = build_task(config, dataset.info)
    tx = make_optimizer(config)
    abstract = jax.eval_shape(_init_fn(config, task, tx))
    state_sharding = sharding.state_shardings(abstract, mesh, task.sharding_rules)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sharding)
    batch_sharding = sharding.batch_sharding(mesh)
    distributed.check_batch_split(batch_sharding, config.batch_size)
    return Experiment(config, mesh, dataset, task, tx, abstract, state_sharding, batch_sharding)


def _init_fn(config: ml_collections.ConfigDict, task: Task, tx: optax.GradientTransformation):
    rng = jax.random.key_data(jax.random.key(config.seed))
    return lambda: TrainState.create(task.init(jax.random.wrap_key_data(rng)), tx, rng)


def restore_or_init(experiment: Experiment, checkpoints: CheckpointManager, options: RunOptions) -> Start:
    """The starting state, in this order: the workdir's latest good step, --resume_from, --init_from (params into
    a fresh state), scratch. Restored states land in the experiment's shardings, whatever mesh saved them."""
    return find_start(
        experiment.config, checkpoints, experiment.abstract_state, experiment.init_state,
        resume_from=options.resume_from, init_from=options.init_from, partial=options.partial,
        hf_token=options.hf_token,
    )


def train_loop(experiment: Experiment, workdir: epath.Path, checkpoints: CheckpointManager, start: Start, *,
               fresh: bool = False) -> TrainResult:
    """Step, log, evaluate, save, from `start` to `num_steps`; stop early (after a save) on SIGTERM/SIGINT or
    the walltime budget; at the end mark `final` and write the exports."""
    config, task = experiment.config, experiment.task
    state = start.state
    step = int(jax.device_get(state.step))
    if step >= config.num_steps and start.resumed:
        print(f"trainkit: already trained to step {step} (num_steps={config.num_steps}); nothing to do. "
              "Raise --config.num_steps to train further.", flush=True)
        if checkpoints.step_dir(step).is_dir():  # not when --resume_from named a finished step of another workdir
            _finish(checkpoints, workdir, config, task, step)
        checkpoints.close()
        return TrainResult(step, state, {}, None)
    if jax.process_index() == 0:
        print(f"trainkit: {task.name} on {dict(experiment.mesh.shape)} ({jax.device_count()} devices); "
              f"start: {start.origin}{' ' + start.source if start.source else ''} at step {step}", flush=True)

    batches = TrainBatches(experiment.dataset.train, config.batch_size, config.seed,
                           jax.process_index(), jax.process_count())
    if start.data_state:
        batches.set_state(start.data_state)
    replicated = sharding.replicated(experiment.mesh)
    train_step = jax.jit(make_train_step(task, experiment.tx, config.on_nonfinite),
                         in_shardings=(experiment.state_sharding, experiment.batch_sharding),
                         out_shardings=(experiment.state_sharding, replicated), donate_argnums=0)
    eval_step = jax.jit(make_eval_step(task), out_shardings=replicated)

    wandb_run = start_wandb(config, workdir, start, step, fresh=fresh)  # reads metrics.jsonl: first
    writer = MetricsWriter(workdir, step, resumed=start.resumed, wandb_run=wandb_run)
    progress = Progress(config.progress, step, config.num_steps)
    stops = StopRequests(config.walltime).install()
    meta = CheckpointMeta(model=task.name, step=step, best=start.meta.best if start.meta is not None else None,
                          wandb_run_id=wandb_run.id if wandb_run is not None else None)
    window = TrainWindow(step, count_skipped=config.on_nonfinite == "skip")
    guard = NonFiniteGuard(config.on_nonfinite, lambda: _last_good(checkpoints))
    last_metrics: dict[str, float] = {}
    stopped_by = None
    saved_step = step if start.resumed else None
    try:
        while step < config.num_steps:
            stopped_by = stops.reason(checkpoints.expected_save_s, step)
            if stopped_by:
                break
            batch = sharding.global_batch(next(batches), experiment.batch_sharding)
            state, metrics = train_step(state, batch)
            step += 1
            window.add(metrics)
            guard.add(step, metrics)
            if step % BLOCK_EVERY == 0 or any(itstime(step, every, config.num_steps) for every in
                                              (config.log_every, config.eval_every, config.checkpoint.every)):
                guard.check()  # the loop waits here anyway; before any eval or save sees the state
            if itstime(step, config.log_every, config.num_steps):
                train = window.flush(step)
                writer.write(step, train)
                last_metrics.update(train)
            eval_metrics = None
            if itstime(step, config.eval_every, config.num_steps):
                eval_metrics = evaluate(eval_step, state.params, experiment.dataset.eval, config.batch_size,
                                        experiment.batch_sharding)
                writer.write(step, eval_metrics)
                last_metrics.update(eval_metrics)
            if itstime(step, config.log_every, config.num_steps) or eval_metrics is not None:
                progress.update(step, last_metrics)
            new_best = checkpoints.improved_best(meta.best, step, eval_metrics)
            if new_best is not None:
                meta = dataclasses.replace(meta, best=new_best)
            if itstime(step, config.checkpoint.every, config.num_steps) or new_best is not None:
                checkpoints.save(step, state, batches.get_state(), meta, eval_metrics)
                writer.sync()  # a gs:// workdir's metrics reach the bucket with each checkpoint
                saved_step = step
        guard.check()
        if guard.skipped and jax.process_index() == 0:
            print(f"trainkit: skipped {guard.skipped} non-finite steps (on_nonfinite=skip)", flush=True)
        if stopped_by:
            if saved_step != step:
                checkpoints.save(step, state, batches.get_state(), meta, None)
            print(f"trainkit: {stopped_by}: saved step {step} to {checkpoints.step_dir(step)}; "
                  "run the same command again to continue", flush=True)
        else:
            _finish(checkpoints, workdir, config, task, step)
    finally:
        stops.uninstall()
        progress.close()
        writer.close()
        checkpoints.close()
        if wandb_run is not None:
            wandb_run.finish(failed=sys.exc_info()[0] is not None)
    return TrainResult(step, state, last_metrics, stopped_by)


class TrainWindow:
    """The train metrics of the steps since the last log line, and the throughput over them. Skipped (non-finite)
    steps are left out of the means; with `count_skipped` their number is logged as `train/skipped_steps`."""

    def __init__(self, step: int, count_skipped: bool = False):
        self.pending: list[dict[str, jax.Array]] = []
        self.since, self.step = time.perf_counter(), step
        self.count_skipped = count_skipped

    def add(self, metrics: dict[str, jax.Array]) -> None:
        self.pending.append(metrics)  # device arrays: reading them here would wait for every step

    def flush(self, step: int) -> dict[str, float]:
        """{"train/<name>": mean over the window, "steps_per_sec": ...}; starts the next window."""
        host = jax.device_get(self.pending)
        finite = [m for m in host if m[FLAG]]
        values = {f"train/{k}": float(np.mean([m[k] for m in finite])) if finite else float("nan")
                  for k in host[0] if k != FLAG}
        if self.count_skipped:
            values["train/skipped_steps"] = float(len(host) - len(finite))
        now = time.perf_counter()
        values["steps_per_sec"] = (step - self.step) / (now - self.since)
        self.pending, self.since, self.step = [], now, step
        return values


def evaluate(eval_step, params, source, batch_size: int, batch_sharding) -> dict[str, float]:
    """Masked means of the task's per-example metrics over the whole eval set."""
    sums: dict[str, float] = {}
    count = 0.0
    for local in eval_batches(source, batch_size, jax.process_index(), jax.process_count()):
        batch = sharding.global_batch(local, batch_sharding)
        totals, n = eval_step(params, batch)
        count += float(n)
        for k, v in totals.items():
            sums[k] = sums.get(k, 0.0) + float(v)
    return {f"eval/{k}": v / max(count, 1.0) for k, v in sums.items()}


def make_train_step(task: Task, tx: optax.GradientTransformation, on_nonfinite: str = "stop"):
    """The functional train step `(state, batch) -> (state, metrics)`; per-step randomness is fold_in(rng, step).
    `metrics["finite"]` flags a step whose loss, gradient norm or new state is not finite (trainkit.nonfinite)."""
    def train_step(state: TrainState, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        (loss, metrics), grads = jax.value_and_grad(task.loss, has_aux=True)(state.params, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.global_norm(grads)
        new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        new, finite = guard_update(state, new, loss, grad_norm, on_nonfinite)
        return new, {**metrics, "grad_norm": grad_norm, FLAG: finite}

    return train_step


def make_eval_step(task: Task):
    """`(params, batch) -> ({metric: masked sum}, count)`; `evaluate` turns the sums into means."""
    def eval_step(params, batch):
        mask = batch["mask"]
        values = task.evaluate(params, {k: v for k, v in batch.items() if k != "mask"})
        return {k: jnp.sum(v * mask) for k, v in values.items()}, jnp.sum(mask)

    return eval_step


def _write_config(workdir: epath.Path, config: ml_collections.ConfigDict) -> None:
    if jax.process_index() == 0:
        (workdir / "train_config.json").write_text(json.dumps(config_lib.to_dict(config), indent=2))


def _clear_for_fresh(directory: epath.Path, overwrite: bool) -> None:
    """--fresh ignores existing checkpoints; it deletes them only when --overwrite says so."""
    steps = list_steps(directory) if directory.exists() else []
    if steps and not overwrite:
        raise TrainkitError(
            f"--fresh: {directory} already holds steps {steps}; "
            "add --overwrite to delete them, or choose another --workdir"
        )
    if directory.exists() and jax.process_index() == 0:
        directory.rmtree()


def _last_good(checkpoints: CheckpointManager) -> str:
    """Names the step a stopped run resumes from (after the save in flight, if any, is on disk)."""
    checkpoints.wait()
    steps = checkpoints.steps()
    if not steps:
        return "no checkpoint was saved yet, so the next start begins from scratch"
    return (f"the last good checkpoint is step {steps[-1]} ({checkpoints.step_dir(steps[-1])}), "
            "where the next start resumes")


def _finish(checkpoints: CheckpointManager, workdir: epath.Path, config, task: Task, step: int) -> None:
    """Mark the final step and write the configured exports beside the packed final checkpoint."""
    checkpoints.mark_final(step)
    if jax.process_index() != 0 or not config.export.formats:
        return
    from trainkit.export.checkpoint import export_final

    export_final(workdir, checkpoints.step_dir(step), config, task)
