"""The training loop: build, start (resume / fine-tune / scratch), step, evaluate, log, save, export.

Reads top to bottom: `train_and_evaluate` is the whole story; the jitted step functions are below it.
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
from trainkit.checkpoint_meta import CheckpointMeta
from trainkit.checkpointing import CheckpointManager
from trainkit.data import load_dataset
from trainkit.errors import TrainkitError
from trainkit.data.pipeline import TrainBatches, eval_batches
from trainkit.metrics import MetricsWriter
from trainkit.models import Task, build_task
from trainkit.paths import absolute_optional, absolute_path
from trainkit.preemption import StopRequests
from trainkit.progress import Progress
from trainkit.resume import find_start
from trainkit.aliases import list_steps
from trainkit.train_state import TrainState, make_optimizer
from trainkit.wandb_logger import start_wandb
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
    config_lib.validate(config)
    workdir = prepare(absolute_path(workdir))
    options = dataclasses.replace(options, resume_from=absolute_optional(options.resume_from),
                                  init_from=absolute_optional(options.init_from))
    lock = WorkdirLock(workdir).acquire() if jax.process_index() == 0 else None
    try:
        return _run(config, workdir, options)
    finally:
        if lock:
            lock.release()


def _run(config: ml_collections.ConfigDict, workdir: epath.Path, options: RunOptions) -> TrainResult:
    mesh = sharding.build_mesh(config.mesh)
    sharding.check_batch(config.batch_size, mesh)
    dataset = load_dataset(config.data)
    task = build_task(config, dataset.info)
    tx = make_optimizer(config)

    # Initialise straight into the shardings: eval_shape -> shardings -> jitted init (nothing built twice).
    rng = jax.random.key_data(jax.random.key(config.seed))
    init_fn = lambda: TrainState.create(task.init(jax.random.wrap_key_data(rng)), tx, rng)  # noqa: E731
    abstract = jax.eval_shape(init_fn)
    state_sharding = sharding.state_shardings(abstract, mesh, task.sharding_rules)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sharding)

    if options.fresh:
        _clear_for_fresh(workdir / "checkpoints", options.overwrite)
    checkpoints = CheckpointManager(workdir, config)
    start = find_start(
        config, checkpoints, abstract, jax.jit(init_fn, out_shardings=state_sharding),
        resume_from=options.resume_from, init_from=options.init_from, partial=options.partial,
        hf_token=options.hf_token,
    )
    state = start.state
    step = int(jax.device_get(state.step))
    _write_config(workdir, config)
    if step >= config.num_steps and start.resumed:
        print(f"trainkit: already trained to step {step} (num_steps={config.num_steps}); nothing to do. "
              "Raise --config.num_steps to train further.", flush=True)
        if checkpoints.step_dir(step).is_dir():  # not when --resume_from named a finished step of another workdir
            _finish(checkpoints, workdir, config, task, step)
        checkpoints.close()
        return TrainResult(step, state, {}, None)
    if jax.process_index() == 0:
        print(f"trainkit: {task.name} on {dict(mesh.shape)} ({jax.device_count()} devices); "
              f"start: {start.origin}{' ' + start.source if start.source else ''} at step {step}", flush=True)

    batches = TrainBatches(dataset.train, config.batch_size, config.seed,
                           jax.process_index(), jax.process_count())
    if start.data_state:
        batches.set_state(start.data_state)
    batch_sharding = sharding.batch_sharding(mesh)
    distributed.check_batch_split(batch_sharding, config.batch_size)
    train_step = jax.jit(
        _make_train_step(task, tx),
        in_shardings=(state_sharding, batch_sharding),
        out_shardings=(state_sharding, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    eval_step = jax.jit(_make_eval_step(task), out_shardings=sharding.replicated(mesh))

    wandb_run = start_wandb(config, workdir, start, step, fresh=options.fresh)  # reads metrics.jsonl: first
    writer = MetricsWriter(workdir, step, resumed=start.resumed, wandb_run=wandb_run)
    progress = Progress(config.progress, step, config.num_steps)
    stops = StopRequests(config.walltime).install()
    meta = CheckpointMeta(model=task.name, step=step, best=start.meta.best if start.meta is not None else None,
                          wandb_run_id=wandb_run.id if wandb_run is not None else None)
    pending: list[dict[str, jax.Array]] = []
    last_metrics: dict[str, float] = {}
    stopped_by = None
    saved_step = step if start.resumed else None
    t_log, step_at_log = time.perf_counter(), step
    try:
        while step < config.num_steps:
            stopped_by = stops.reason(checkpoints.last_blocked_s, step)
            if stopped_by:
                break
            batch = sharding.global_batch(next(batches), batch_sharding)
            state, metrics = train_step(state, batch)
            step += 1
            pending.append(metrics)
            if itstime(step, config.log_every, config.num_steps):
                train = {f"train/{k}": float(v) for k, v in _mean(pending).items()}
                now = time.perf_counter()
                train["steps_per_sec"] = (step - step_at_log) / (now - t_log)
                t_log, step_at_log, pending = now, step, []
                writer.write(step, train)
                last_metrics.update(train)
            elif step % BLOCK_EVERY == 0:
                jax.block_until_ready(metrics)
            eval_metrics = None
            if itstime(step, config.eval_every, config.num_steps):
                eval_metrics = evaluate(eval_step, state.params, dataset.eval, config.batch_size, batch_sharding)
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


def _make_train_step(task: Task, tx: optax.GradientTransformation):
    def train_step(state: TrainState, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        (loss, metrics), grads = jax.value_and_grad(task.loss, has_aux=True)(state.params, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**metrics, "grad_norm": optax.global_norm(grads)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def _make_eval_step(task: Task):
    def eval_step(params, batch):
        mask = batch["mask"]
        values = task.evaluate(params, {k: v for k, v in batch.items() if k != "mask"})
        return {k: jnp.sum(v * mask) for k, v in values.items()}, jnp.sum(mask)

    return eval_step


def _mean(metrics: list[dict[str, jax.Array]]) -> dict[str, float]:
    host = jax.device_get(metrics)
    return {k: float(np.mean([m[k] for m in host])) for k in host[0]}


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


def _finish(checkpoints: CheckpointManager, workdir: epath.Path, config, task: Task, step: int) -> None:
    """Mark the final step and write the configured exports beside the packed final checkpoint."""
    checkpoints.mark_final(step)
    if jax.process_index() != 0 or not config.export.formats:
        return
    from trainkit.export.checkpoint import export_final

    export_final(workdir, checkpoints.step_dir(step), config, task)
