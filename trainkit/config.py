"""Every configuration knob with its default, and the checks and diffs run on a resolved config.

Config files in `configs/` start from `base_config()` and override what their task needs:

    def get_config(arg=None):
        config = base_config()
        config.model.name = "mlp"
        return config
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import ml_collections

from trainkit.errors import TrainkitError
from trainkit.export.formats import FORMATS  # import-light: no JAX, no torch


def base_config() -> ml_collections.ConfigDict:
    """All keys trainkit reads, with defaults. The configuration reference in docs/ documents each."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_steps = 1000  # total, including steps already done (HF Trainer's max_steps)
    c.batch_size = 128  # global, over all processes and devices
    c.learning_rate = 1e-3
    c.warmup_steps = 0
    c.weight_decay = 0.0
    c.grad_clip_norm = 0.0  # 0 = off
    c.log_every = 10
    c.eval_every = 100
    c.walltime = 0.0  # seconds; > 0: save and exit cleanly before the budget ends
    c.progress = "auto"  # "auto" (a bar on a TTY, log lines otherwise) | "bar" | "log" | "none"
    c.on_nonfinite = "stop"  # a non-finite loss/gradient/state: "stop" (one line, nothing saved) | "skip" the update
    c.compilation_cache = "auto"  # persistent JAX compilation cache: "auto" (user's cache dir) | "off" | a dir

    c.model = ml_collections.ConfigDict({"name": "cnn", "features": (32, 64), "hidden": 128})
    c.data = ml_collections.ConfigDict({"name": "digits", "eval_fraction": 0.2})

    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})  # -1 = the remaining devices

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 100  # save every N steps (and at the end); 0 = only at the end
    c.checkpoint.keep_last = 2
    c.checkpoint.keep_best = 1  # 0 = no best tracking
    c.checkpoint.best_metric = "eval/loss"
    c.checkpoint.best_mode = "min"  # "min" | "max"
    c.checkpoint.keep_every = 0  # also keep every N-th step forever; 0 = off
    c.checkpoint.async_save = True
    c.checkpoint.compression = False  # zstd in OCDBT: smaller, ~2.5x slower to write (see BENCHMARKS.md)

    c.export = ml_collections.ConfigDict()
    # any of FORMATS: "pt", "pt2", "aoti", "stablehlo", "safetensors", "metatomic"; into W/export/
    c.export.formats = ("safetensors", "stablehlo")
    c.export.tolerance = 1e-5  # max relative parity error accepted at export

    c.wandb = ml_collections.ConfigDict({"enabled": False, "project": "trainkit", "entity": "", "mode": "online"})
    return c


NONFINITE_MODES = ("stop", "skip")  # what trainkit.nonfinite does with a non-finite step

# Keys whose change alters the parameter shapes/structure, so a checkpoint cannot be resumed under them.
STRUCTURAL_PREFIXES = ("model.", "data.name", "data.cutoff", "data.seq_len")


def to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """A JSON-ready plain dict (tuples become lists)."""
    return json.loads(config.to_json())


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Keys whose values differ between two config dicts: {"a.b": (old, new)}; missing keys show as None."""
    a, b = flatten(old), flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def structural_changes(changes: Mapping[str, tuple[Any, Any]]) -> list[str]:
    """The changed keys that alter parameter shapes or structure."""
    return [k for k in changes if k.startswith(STRUCTURAL_PREFIXES)]


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks that need no devices; mesh/batch checks against devices live in trainkit.sharding."""
    if config.num_steps < 0:
        raise TrainkitError(f"num_steps={config.num_steps} must be >= 0 (it is the total number of steps)")
    if config.batch_size <= 0:
        raise TrainkitError(f"batch_size={config.batch_size} must be positive")
    for key in ("log_every", "eval_every"):
        if config[key] <= 0:
            raise TrainkitError(f"{key}={config[key]} must be positive")
    if config.on_nonfinite not in NONFINITE_MODES:
        raise TrainkitError(f"on_nonfinite={config.on_nonfinite!r} must be 'stop' or 'skip'")
    if not config.compilation_cache:
        raise TrainkitError("compilation_cache is empty; use 'auto', 'off' or a directory")
    ck = config.checkpoint
    if ck.best_mode not in ("min", "max"):
        raise TrainkitError(f"checkpoint.best_mode={ck.best_mode!r} must be 'min' or 'max'")
    for key in ("every", "keep_last", "keep_best", "keep_every"):
        if ck[key] < 0:
            raise TrainkitError(f"checkpoint.{key}={ck[key]} must be >= 0")
    if ck.keep_last < 1:
        raise TrainkitError("checkpoint.keep_last must be >= 1 (the latest checkpoint is always kept)")
    unknown = set(config.export.formats) - set(FORMATS)
    if unknown:
        raise TrainkitError(
            f"export.formats has {sorted(unknown)}; use any of {', '.join(map(repr, FORMATS))}"
        )
    for name in config.export.formats:
        if needs := FORMATS[name].missing():
            raise TrainkitError(f"export.formats asks for {name!r} but {needs.name} is not installed: "
                                f"pip install 'trainkit[{needs.extra}]', or drop {name!r} from --config.export.formats")
