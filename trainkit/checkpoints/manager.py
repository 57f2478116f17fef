"""W/checkpoints: the Orbax CheckpointManager with trainkit's retention, aliases, manifests and restore.

A step dir `W/checkpoints/000040/` holds the Orbax items `state` (TrainState), `data` (iterator position) and
`meta` (a CheckpointMeta: format version, model, best-so-far, logger ids), plus `train_config.json` and `manifest.json`
(size and crc32c of every file). The loop only dispatches an on-device copy of the state and queues it; Orbax's
save, the manifest, the aliases and retention run on trainkit's checkpoint thread (checkpoints.save_queue: at most
one save waits behind the one being written). A step is *good* when its manifest verifies.

Retention keeps the union of the last `keep_last`, the best `keep_best` by `best_metric`, and every `keep_every`-th
step (checkpoints.orbax_options, which also picks the state's layout on disk). Aliases `last`/`best`/`final` are
pointer files (checkpoints.layout). The manager is the one owner of "best": it decides when an eval is a new best
(`improved_best`), keeps the best steps and writes `best`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import threading
import time
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from trainkit import config as config_lib
from trainkit import distributed
from trainkit.checkpoints.meta import FORMAT_VERSION, Best, CheckpointMeta, check_readable
from trainkit.errors import TrainkitError, find_write_error
from trainkit.checkpoints.manifest import list_files, verify_manifest, write_manifest
from trainkit.checkpoints.fast_restore import read_state
from trainkit.checkpoints.layout import list_steps, step_dir_name, write_alias
from trainkit.checkpoints.orbax_options import orbax_manager
from trainkit.checkpoints.save_queue import SaveFailed, SaveQueue, snapshot
from trainkit.paths import is_local

CONFIG_FILE = "train_config.json"
# Retention first renames a step out of the way (atomic), then trainkit deletes it: a kill mid-delete must not
# leave a half-deleted step that still looks like one.
DELETING_DIR = ".deleting"
TMP_MARK = ".orbax-checkpoint-tmp"  # an unfinished save: never listed, removed at start


@dataclasses.dataclass(frozen=True)
class Restored:
    """What a checkpoint step holds, restored onto the current mesh."""

    state: Any
    data_state: dict[str, Any] | None
    meta: CheckpointMeta
    step: int
    step_dir: epath.Path


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """A step's small files, read once: its resolved config and its meta (format version checked first)."""

    step_dir: epath.Path
    config: dict[str, Any]
    meta: CheckpointMeta


def read_step_info(step_dir: epath.PathLike) -> StepInfo:
    """Config and meta of a finished step (not its arrays: `read_state_arrays` or `restore_step` read those)."""
    config = read_step_config(step_dir)  # first: a directory without it is not a trainkit step at all
    return StepInfo(epath.Path(step_dir), config, read_meta(step_dir))


def read_step_config(step_dir: epath.PathLike) -> dict[str, Any]:
    """The resolved config a step was trained with."""
    path = epath.Path(step_dir) / CONFIG_FILE
    if not path.exists():
        raise TrainkitError(f"{step_dir} has no {CONFIG_FILE}; it is not a trainkit checkpoint step")
    return json.loads(path.read_text())


def read_meta(step_dir: epath.PathLike) -> CheckpointMeta:
    """The `meta` item of a step (upgraded to the current format), checking the format version first: the one
    place that reads it. Example: `read_meta("W/checkpoints/000040").best`."""
    step_dir = epath.Path(step_dir)
    manifest = step_dir / "manifest.json"
    # The manifest says the version before Orbax touches files a newer trainkit may have laid out differently.
    check_readable(json.loads(manifest.read_text()).get("format_version", 0) if manifest.exists() else 0,
                   str(step_dir))
    local = _this_process_only()
    raw = ocp.Checkpointer(ocp.JsonCheckpointHandler(multiprocessing_options=local),
                           multiprocessing_options=local).restore(step_dir / "meta")
    return CheckpointMeta.from_json(raw, str(step_dir))


def _this_process_only() -> ocp.options.MultiprocessingOptions:
    """For reads one process may do alone (export on process 0): no barriers with the other processes."""
    return ocp.options.MultiprocessingOptions(primary_host=jax.process_index(), active_processes={jax.process_index()})


def restore_step(step_dir: epath.PathLike, abstract_state: Any) -> Restored:
    """Restore a step dir into `abstract_state`'s shapes, dtypes and shardings (any mesh, any device count)."""
    step_dir = epath.Path(step_dir)
    meta = read_meta(step_dir)
    state = read_state(step_dir / "state", abstract_state)  # local zarr-per-array steps, at disk speed
    if state is None:
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
        state = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(
            step_dir / "state", args=ocp.args.PyTreeRestore(item=abstract_state, restore_args=restore_args)
        )
    data_dir = step_dir / "data"
    data_state = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(data_dir) if data_dir.exists() else None
    return Restored(state, data_state, meta, meta.step, step_dir)


def read_state_arrays(step_dir: epath.PathLike) -> dict[str, Any]:
    """The saved TrainState as a tree of host numpy arrays, whatever mesh wrote it (export, ckpt, init_from)."""
    local = _this_process_only()
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=local),
                                    multiprocessing_options=local)
    tree = checkpointer.metadata(epath.Path(step_dir) / "state").item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(
        epath.Path(step_dir) / "state", args=ocp.args.PyTreeRestore(item=None, restore_args=restore_args)
    )


def read_step_metrics(step_dir: epath.PathLike) -> dict[str, float]:
    """The eval metrics recorded with a step ({} for steps saved without an eval)."""
    path = epath.Path(step_dir) / "metrics" / "metrics"
    return json.loads(path.read_text()) if path.exists() else {}


def _set_aside(step_dir: epath.Path, target: epath.Path) -> None:
    """Move a step dir out of Orbax's way: a rename on a local disk; on gs:// (no rename) a copy, then a delete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_local(step_dir):
        step_dir.rename(target)
        return
    for rel in list_files(step_dir):
        (target / rel).write_bytes((step_dir / rel).read_bytes())
    step_dir.rmtree()


@dataclasses.dataclass
class _SaveJob:
    """One save handed from the loop to the checkpoint thread."""

    step: int
    args: ocp.args.Composite
    metrics: dict[str, float] | None
    start: float  # when the loop called save()
    blocked_s: float = 0.0  # how long save() kept the loop, set once it returns
    handed_over: threading.Event = dataclasses.field(default_factory=threading.Event)


class CheckpointManager:
    """Saves and lists the steps of one workdir (local or gs://). All processes call `save`; process 0 writes
    files. On gs:// Orbax marks finished steps with commit_success.txt instead of a rename, and deletes old steps
    directly (a rename there is a copy)."""

    def __init__(self, workdir: epath.PathLike, config: ml_collections.ConfigDict):
        self.directory = epath.Path(workdir) / "checkpoints"
        self._local = is_local(self.directory)
        self.config = config
        ck = config.checkpoint
        self._primary = jax.process_index() == 0
        # With several processes a save waits in the loop's thread: Orbax's cross-process barriers on the checkpoint
        # thread, beside the train step's collectives on the loop's, deadlock (seen with 2 processes on CPU).
        self._sync = not ck.async_save or jax.process_count() > 1
        # Process 0 verifies (and sets damaged steps aside); the others take its answer, so all start alike.
        self._good_step = self._find_good_step() if self._primary and self.directory.exists() else None
        if self._primary and self.directory.exists():  # what Orbax would remove when built (at the first save)
            for tmp_dir in self.directory.glob(f"*{TMP_MARK}*"):
                tmp_dir.rmtree()
        self._good_step = distributed.broadcast_from_primary(self._good_step)
        self._finish_deletions()
        self._manager: ocp.CheckpointManager | None = None  # built by the first save, which knows the state
        self._queue = SaveQueue(announce=self._announce)
        self.last_blocked_s = 0.0
        self.saves: list[dict[str, float]] = []  # one record per save: step, bytes, seconds, blocked_s

    @property
    def expected_save_s(self) -> float:
        """How long the next save may take to reach the disk (the last one's time on the checkpoint thread, twice
        if one was waiting): what a walltime budget keeps in hand for the final save."""
        if not self.saves:
            return self.last_blocked_s
        last = self.saves[-1]
        return last["seconds"] + last.get("queued_s", 0.0)

    def _announce(self, line: str) -> None:
        if self._primary:
            print(line, flush=True)

    # -- reading -------------------------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Complete steps on disk, oldest first (partial saves are never listed)."""
        return list_steps(self.directory)

    def latest_good_step(self) -> int | None:
        """The newest step whose manifest verifies (damaged newer steps were set aside at start-up)."""
        return self._good_step

    def _find_good_step(self) -> int | None:
        """Verify steps newest first. A damaged step is moved to W/checkpoints.damaged/ (kept for inspection,
        out of Orbax's way so the step can be saved again) and the previous step is tried."""
        for step in reversed(list_steps(self.directory)):
            step_dir = self.directory / step_dir_name(step)
            if not (step_dir / "manifest.json").exists() and (step_dir / "_CHECKPOINT_METADATA").exists():
                # Orbax finalized it (an atomic rename) but the run died before writing the manifest.
                self._complete(step)
            # On gs:// sizes only: hashing would download the whole step, and GCS checks every upload's crc32c.
            problems = verify_manifest(step_dir, hashes=self._local)
            if not problems:
                return step
            if self._primary:
                print(f"trainkit: warning: skipping damaged checkpoint {step_dir}: {problems[0]}; "
                      f"moved to {self.directory}.damaged/", flush=True)
                _set_aside(step_dir, epath.Path(f"{self.directory}.damaged") / f"{step_dir.name}-{int(time.time())}")
        return None

    def step_dir(self, step: int) -> epath.Path:
        return self.directory / step_dir_name(step)

    # -- best ----------------------------------------------------------------------------------------------
    def improved_best(self, best: Best | None, step: int, metrics: Mapping[str, float] | None) -> Best | None:
        """The new best if `metrics` (the eval at `step`) beat `best` on checkpoint.best_metric, else None.
        The loop saves such a step even between its regular saves, so that `best` names a step on disk.

        Example: `checkpoints.improved_best(Best(step=10, value=0.5), 20, {"eval/loss": 0.4})` -> Best(20, 0.4)
        """
        ck = self.config.checkpoint
        if not ck.keep_best or not metrics or ck.best_metric not in metrics:
            return None
        value = metrics[ck.best_metric]
        if not math.isfinite(value):  # a NaN eval never becomes `best` (nor ranks a step for retention)
            return None
        if best is not None and not (value < best.value if ck.best_mode == "min" else value > best.value):
            return None
        return Best(step=step, value=value)

    # -- writing -------------------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        state: Any,
        data_state: Mapping[str, Any],
        meta: CheckpointMeta,
        metrics: Mapping[str, float] | None = None,
    ) -> None:
        """Hand `step` to the checkpoint thread and return (async), or write it and return (sync).

        The loop keeps only the cost of dispatching an on-device copy of `state` (the next train step may donate
        `state`'s buffers; the copy is what gets written) and of queueing it: Orbax's save, the manifest, the
        aliases and retention all run on the checkpoint thread (checkpoints.save_queue), at most one save waiting
        behind the one being written. `meta` is written as of `step` (its `step` is set here), in the current
        format: the one place it is written."""
        start = time.perf_counter()
        # An async save writes a copy (dispatched, not waited for; ordered before the next step donates `state`); a
        # sync one is written before save() returns, so `state` itself is safe to write.
        copy = state if self._sync else snapshot(state)
        job = _SaveJob(step, ocp.args.Composite(
            state=ocp.args.PyTreeSave(copy),
            data=ocp.args.JsonSave(dict(data_state)),
            meta=ocp.args.JsonSave(dataclasses.replace(meta, step=step).to_json()),
        ), dict(metrics) if metrics else None, start)
        with self._write_errors_are_user_errors():
            self._queue.submit(step, lambda: self._write(job))
        job.blocked_s = time.perf_counter() - start
        job.handed_over.set()
        if self._sync:
            self.wait()
        self.last_blocked_s = time.perf_counter() - start

    def _orbax(self, state: Any) -> ocp.CheckpointManager:
        """Orbax's CheckpointManager, built by the first save (on the checkpoint thread) for the state it saves."""
        if self._manager is None:
            self._manager = orbax_manager(self.directory, self.config.checkpoint, state,
                                          todelete_subdir=DELETING_DIR if self._local else None)
        return self._manager

    def _write(self, job: _SaveJob) -> None:
        """On the checkpoint thread: Orbax's save (synchronous here: this thread is the asynchrony), then the
        manifest, the aliases and the one-line summary."""
        began = time.perf_counter()
        orbax = self._orbax(job.args.state.item)
        ok = orbax.save(job.step, args=job.args, metrics=job.metrics, force=True)
        if not ok:
            raise RuntimeError(f"Orbax declined to save step {job.step}")
        written = time.perf_counter()
        self._finish_deletions()
        nbytes = self._complete(job.step)
        if nbytes is None:  # removed by retention before we got here (cannot happen for the latest)
            return
        if self._primary:
            write_alias(self.directory, "last", job.step)
            best = orbax.best_step()
            if self.config.checkpoint.keep_best and best is not None:
                write_alias(self.directory, "best", best)
        end = time.perf_counter()
        job.handed_over.wait()
        if self._sync:  # the loop waits for the whole save
            job.blocked_s = end - job.start
        seconds = end - began
        record = {"step": job.step, "bytes": nbytes, "seconds": seconds, "blocked_s": job.blocked_s,
                  "queued_s": began - job.start, "orbax_s": written - began, "manifest_s": end - written}
        self.saves.append(record)
        if self._primary:
            queued = f", waited {began - job.start:.2f} s for the previous save" if began - job.start > 0.05 else ""
            print(f"trainkit: saved step {job.step}: {nbytes / 1e6:.1f} MB in {seconds:.2f} s "
                  f"({nbytes / 1e9 / max(seconds, 1e-9):.2f} GB/s){queued}, train loop blocked "
                  f"{job.blocked_s * 1e3:.1f} ms", flush=True)

    def _finish_deletions(self) -> None:
        """Delete the steps that retention renamed into W/checkpoints/.deleting/ (also those a kill interrupted)."""
        if self._primary and self._local:
            shutil.rmtree(self.directory / DELETING_DIR, ignore_errors=True)

    def _complete(self, step: int) -> int | None:
        """Write train_config.json and the manifest of a finalized step; return its size in bytes."""
        step_dir = self.step_dir(step)
        if not step_dir.exists():
            return None
        if self._primary:
            (step_dir / CONFIG_FILE).write_text(json.dumps(config_lib.to_dict(self.config), indent=2))
            manifest = write_manifest(step_dir, step=step, format_version=FORMAT_VERSION)
            return sum(f["size"] for f in manifest["files"].values())
        return 0

    def wait(self) -> None:
        """Block until every save handed over is on disk with its manifest; re-raise the error of one that failed."""
        with self._write_errors_are_user_errors():
            self._queue.wait()

    @contextlib.contextmanager
    def _write_errors_are_user_errors(self):
        """A save that fails on a full disk, a read-only remount, a lost permission or a failing disk (raised on
        the checkpoint thread, handed to the loop by the save queue) is the user's to fix: say so in
        one line. The earlier steps are untouched; the failed save's tmp dir (never listed) is deleted to give its
        space back, as the next start would."""
        try:
            yield
        except SaveFailed as failed:
            self._raise_for_people(failed.error, failed.step)
            raise failed.error from None  # not a write error: our own bug, with its own traceback

    def _raise_for_people(self, e: BaseException, step: int) -> None:
        """Raise a write error as a one-line TrainkitError (the earlier steps are fine); return for anything else."""
        found = None if isinstance(e, TrainkitError) else find_write_error(e)
        if found is None:
            return
        if self._primary:
            for tmp_dir in self.directory.glob(f"{step_dir_name(step)}.orbax-checkpoint-tmp*"):
                shutil.rmtree(tmp_dir, ignore_errors=True)
        steps = list_steps(self.directory)  # Orbax lists no unfinished save; a finished one resumes
        resume = (f"it resumes from step {steps[-1]}, the last complete checkpoint" if steps
                  else "there is no complete checkpoint yet, so it starts from scratch")
        if found.disk_full:
            free = shutil.disk_usage(self.directory).free if self._local and self.directory.exists() else 0
            cause = f"{found.cause}, {free / 1e6:.1f} MB free"
            fix = ("free space on that disk (or lower checkpoint.keep_last / keep_best, or choose a --workdir on a "
                   "larger disk)")
        else:
            cause = found.cause
            fix = "make that disk writable again (or choose another --workdir)"
        raise TrainkitError(
            f"saving checkpoint step {step} to {self.directory} failed: {cause}; {fix} "
            f"and run the same command again: {resume}"
        ) from e  # the cause marks it as a write error for exits_cleanly

    def mark_final(self, step: int) -> None:
        self.wait()
        if self._primary:
            write_alias(self.directory, "final", step)

    def close(self) -> None:
        try:
            with self._write_errors_are_user_errors():
                self._queue.close()
        finally:
            if self._manager is not None:
                self._manager.close()
