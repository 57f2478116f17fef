"""Where a run starts: --resume_from SOURCE -> the latest good step in W -> --init_from SOURCE -> scratch.

One place decides, checks that the checkpoint fits the config, and says what changed.
"""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from trainkit import config as config_lib
from trainkit.checkpoints.meta import CheckpointMeta
from trainkit.checkpoints.manager import CheckpointManager, Restored, read_state_arrays, read_step_config, restore_step
from trainkit.checkpoints.sources import resolve_source
from trainkit.errors import TrainkitError
from trainkit.sharding import path_name


class Origin(enum.StrEnum):
    """Where the starting state came from (a StrEnum, so messages print the plain value: `start: workdir`)."""

    SCRATCH = "scratch"
    WORKDIR = "workdir"  # the latest good step of this workdir
    RESUME_FROM = "resume_from"
    INIT_FROM = "init_from"  # params only


@dataclasses.dataclass(frozen=True)
class Start:
    state: Any
    data_state: dict[str, Any] | None
    meta: CheckpointMeta | None  # of the restored step; None when no step was restored (scratch, init_from)
    origin: Origin
    source: str | None = None
    source_workdir: Path | None = None  # the local workdir the restored step lies in, when it lies in one

    @property
    def resumed(self) -> bool:
        """The whole training state was restored (step, optimizer, data position), not just params."""
        return self.origin in (Origin.WORKDIR, Origin.RESUME_FROM)


def check_compatible(step_dir: Path, config: ml_collections.ConfigDict, *, for_init: bool = False) -> None:
    """Refuse a checkpoint whose model differs; print the config keys that changed."""
    old = read_step_config(step_dir)
    new = config_lib.to_dict(config)
    if not for_init and old.get("model", {}).get("name") != config.model.name:
        raise TrainkitError(
            f"checkpoint {step_dir} was written for model {old.get('model', {}).get('name')!r}, config asks for "
            f"{config.model.name!r}; use a checkpoint of the same model, or --init_from with --partial "
            "to load only matching parameters"
        )
    changes = config_lib.diff(old, new)
    if changes and jax.process_index() == 0:
        shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
        print(f"trainkit: config changed since {step_dir}: {shown}", flush=True)
    structural = config_lib.structural_changes(changes)
    if structural and not for_init:
        raise TrainkitError(
            f"cannot resume {step_dir}: {', '.join(structural)} changed, which changes the parameters; "
            "revert them, or start a new workdir with --init_from (and --partial for matching parameters)"
        )


def merge_params(fresh: Any, loaded: Any, *, partial: bool, origin: str) -> Any:
    """Loaded params where path and shape match the fresh ones; with `partial` the rest stay freshly initialised."""
    loaded_leaves = {path_name(p): v for p, v in jax.tree_util.tree_leaves_with_path(loaded)}
    taken, mismatched = 0, []

    def pick(path, leaf):
        nonlocal taken
        value = loaded_leaves.get(path_name(path))
        if value is not None and tuple(value.shape) == tuple(leaf.shape):
            taken += 1
            return jax.device_put(np.asarray(value, dtype=leaf.dtype), leaf.sharding)
        mismatched.append(path_name(path))
        return leaf

    merged = jax.tree_util.tree_map_with_path(pick, fresh)
    if mismatched and not partial:
        raise TrainkitError(
            f"--init_from {origin}: parameters {', '.join(mismatched[:4])}"
            f"{' ...' if len(mismatched) > 4 else ''} do not match the model in shape or name; "
            "add --partial to load only the matching parameters"
        )
    if jax.process_index() == 0:
        print(f"trainkit: initialised {taken} parameter arrays from {origin}"
              + (f", {len(mismatched)} fresh" if mismatched else ""), flush=True)
    return merged


def find_start(
    config: ml_collections.ConfigDict,
    checkpoints: CheckpointManager,
    abstract_state: Any,
    init_state: Callable[[], Any],
    *,
    resume_from: str | None = None,
    init_from: str | None = None,
    partial: bool = False,
    hf_token: str | None = None,
) -> Start:
    """Decide and restore the starting state. The resolved SOURCE is read through trainkit.checkpoints.sources."""
    def restored_start(step_dir: Path, origin: Origin, source: str, source_workdir: Path | None) -> Start:
        check_compatible(step_dir, config)
        r: Restored = restore_step(step_dir, abstract_state)
        return Start(r.state, r.data_state, r.meta, origin, source, source_workdir)

    if resume_from:
        resolved = resolve_source(resume_from, hf_token=hf_token)
        return restored_start(resolved.step_dir, Origin.RESUME_FROM, resolved.origin, resolved.workdir)
    step = checkpoints.latest_good_step()
    if step is not None:
        step_dir = checkpoints.step_dir(step)
        return restored_start(step_dir, Origin.WORKDIR, str(step_dir), None)
    state = init_state()
    if init_from:
        resolved = resolve_source(init_from, hf_token=hf_token)
        check_compatible(resolved.step_dir, config, for_init=True)
        params = merge_params(state.params, read_state_arrays(resolved.step_dir)["params"], partial=partial,
                              origin=resolved.origin)
        return Start(state.replace(params=params), None, None, Origin.INIT_FROM, resolved.origin)
    return Start(state, None, None, Origin.SCRATCH)
