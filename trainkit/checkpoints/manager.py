"""W/checkpoints: the Orbax CheckpointManager with trainkit's retention, aliases, manifests and restore.

A step dir `W/checkpoints/000040/` holds the Orbax items `state` (TrainState), `data` (iterator position) and
`meta` (a CheckpointMeta: format version, model, best-so-far, logger ids), plus `train_config.json` and `manifest.json`
(sizes and sha256 of every file). The manifest is written after Orbax has finalized the step, in a background
thread, so the loop never waits on I/O; a step is *good* when its manifest verifies.

Retention keeps the union of the last `keep_last`, the best `keep_best` by `best_metric`, and every `keep_every`-th
step (an AnyPreservationPolicy: Orbax's own best_fn + max_to_keep would delete the latest step when it is not
among the best). Aliases `last`/`best`/`final` are pointer files (checkpoints.layout). The manager is the one
owner of "best": it decides when an eval is a new best (`improved_best`), keeps the best steps and writes `best`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import json
import math
import shutil
import time
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from trainkit import config as config_lib
from trainkit import distributed
from trainkit.checkpoints.meta import FORMAT_VERSION, Best, CheckpointMeta, check_readable
from trainkit.errors import TrainkitError, find_write_error
from trainkit.checkpoints.manifest import list_files, verify_manifest, write_manifest
from trainkit.checkpoints.layout import list_steps, step_dir_name, write_alias
from trainkit.paths import is_local

CONFIG_FILE = "train_config.json"
# Retention first renames a step out of the way (atomic), then trainkit deletes it: a kill mid-delete must not
# leave a half-deleted step that still looks like one.
DELETING_DIR = ".deleting"


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


def _preservation_policy(ck: ml_collections.ConfigDict) -> pp.PreservationPolicy:
    policies: list[pp.PreservationPolicy] = [pp.LatestN(ck.keep_last)]
    if ck.keep_best:
        policies.append(
            pp.BestN(
                get_metric_fn=lambda m: m[ck.best_metric],
                reverse=ck.best_mode == "min",
                n=ck.keep_best,
                keep_checkpoints_without_metrics=False,
            )
        )
    if ck.keep_every:
        policies.append(pp.EveryNSteps(ck.keep_every))
    return pp.AnyPreservationPolicy(policies)


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
        self._sync = not ck.async_save
        # Process 0 verifies (and sets damaged steps aside); the others take its answer, so all start alike.
        self._good_step = self._find_good_step() if self._primary and self.directory.exists() else None
        self._good_step = distributed.broadcast_from_primary(self._good_step)
        self._finish_deletions()
        options = ocp.CheckpointManagerOptions(
            step_format_fixed_length=6,
            preservation_policy=_preservation_policy(ck),
            best_fn=(lambda m: m[ck.best_metric]) if ck.keep_best else None,
            best_mode=ck.best_mode,
            cleanup_tmp_directories=True,
            todelete_subdir=DELETING_DIR if self._local else None,
            enable_async_checkpointing=ck.async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_handlers={
                "state": ocp.PyTreeCheckpointHandler(use_compression=ck.compression),
                "data": ocp.JsonCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
            options=options,
        )
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="trainkit-ckpt")
        self._pending: concurrent.futures.Future | None = None
        self._pending_step: int | None = None
        self.last_blocked_s = 0.0
        self.saves: list[dict[str, float]] = []  # one record per save: step, bytes, seconds, blocked_s

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
        """Start saving `step`; returns once the arrays are copied off the devices (async) or written (sync).
        `meta` is written as of `step` (its `step` is set here), in the current format: the one place it is written."""
        self.wait()
        start = time.perf_counter()
        self._pending_step = step
        with self._write_errors_are_user_errors():
            ok = self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeSave(state),
                    data=ocp.args.JsonSave(dict(data_state)),
                    meta=ocp.args.JsonSave(dataclasses.replace(meta, step=step).to_json()),
                ),
                metrics=dict(metrics) if metrics else None,
                force=True,
            )
        if not ok:
            raise RuntimeError(f"Orbax declined to save step {step}")
        blocked = time.perf_counter() - start
        self.last_blocked_s = blocked
        self._pending = self._worker.submit(self._after_save, step, start, blocked)
        if self._sync:
            self.wait()

    def _after_save(self, step: int, start: float, blocked: float) -> None:
        self._manager.wait_until_finished()
        self._finish_deletions()
        seconds = time.perf_counter() - start
        nbytes = self._complete(step)
        if nbytes is None:  # removed by retention before we got here (cannot happen for the latest)
            return
        if self._primary:
            write_alias(self.directory, "last", step)
            best = self._manager.best_step()
            if self.config.checkpoint.keep_best and best is not None:
                write_alias(self.directory, "best", best)
        record = {"step": step, "bytes": nbytes, "seconds": seconds, "blocked_s": blocked}
        self.saves.append(record)
        if self._primary:
            print(f"trainkit: saved step {step}: {nbytes / 1e6:.1f} MB in {seconds:.2f} s "
                  f"({nbytes / 1e9 / max(seconds, 1e-9):.2f} GB/s), train loop blocked {blocked * 1e3:.1f} ms",
                  flush=True)

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
        """Block until the pending save is on disk with its manifest; re-raise its error if it failed."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            with self._write_errors_are_user_errors():
                pending.result()

    @contextlib.contextmanager
    def _write_errors_are_user_errors(self):
        """A save that fails on a full disk, a read-only remount, a lost permission or a failing disk (Orbax
        re-raises it from its background thread, or the manifest write raises it) is the user's to fix: say so in
        one line. The earlier steps are untouched; the failed save's tmp dir (never listed) is deleted to give its
        space back, as the next start would."""
        try:
            yield
        except Exception as e:
            found = None if isinstance(e, TrainkitError) else find_write_error(e)
            if found is None:
                raise
            if self._primary and self._pending_step is not None:
                for tmp_dir in self.directory.glob(f"{step_dir_name(self._pending_step)}.orbax-checkpoint-tmp*"):
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
                f"saving checkpoint step {self._pending_step} to {self.directory} failed: {cause}; {fix} "
                f"and run the same command again: {resume}"
            ) from e  # the cause marks it as a write error for exits_cleanly

    def mark_final(self, step: int) -> None:
        self.wait()
        if self._primary:
            write_alias(self.directory, "final", step)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            try:
                with self._write_errors_are_user_errors():
                    self._manager.close()  # re-raises a failed background save
            finally:
                self._worker.shutdown()
