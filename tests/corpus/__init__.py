"""A third-party corpus for the TorchScript exporter (issue #14 item 4): functions written with e3nn-jax, jax-md,
equinox, flax (linen and nnx), Hugging Face's Flax models and plain jax.numpy/lax, as a user would write them.

Each module registers builders with `@case(name, dtypes)`; `build(case_id)` returns a `Case` for one dtype.
Builders run inside `jax.enable_x64(dtype == "float64")` (tests/test_corpus.py), so float64 cases are real
float64 all the way through. Nothing is downloaded: models come from small configs with fixed-seed random init.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

SHORT = {"float32": "f32", "float64": "f64", "bfloat16": "bf16"}
MODULES = ("jnp_cases", "jaxmd", "e3nn", "equinox_cases", "flax_cases", "hf_cases")
REGISTRY: dict[str, Callable[[], "Case"]] = {}


@dataclasses.dataclass
class Case:
    """fn(params, *args); args1 at the export size, args2 at another size of the dynamic axes."""

    name: str
    fn: Callable[..., Any]
    params: Any
    args1: tuple
    args2: tuple
    dynamic_axes: list | None
    with_forces: bool = False
    dtype: str = "float32"
    dim_constraints: tuple[str, ...] = ()  # bounds a model needs on its dynamic sizes (GPT-2: "seq <= 64")


def np_dtype(dtype: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)


def cast(tree: Any, dtype: str) -> Any:
    """Every floating leaf (numpy or jax) in `dtype`; integer leaves untouched."""
    def leaf(x):
        if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
            return x.astype(np_dtype(dtype))
        return x
    return jax.tree.map(leaf, tree)


def case(name: str, dtypes: tuple[str, ...] = ("float32", "float64")):
    """Register `builder(dtype) -> Case` under '<name>-<f32|f64|bf16>' for each dtype."""
    def deco(builder: Callable[[str], Case]) -> Callable[[str], Case]:
        for dtype in dtypes:
            case_id = f"{name}-{SHORT[dtype]}"
            assert case_id not in REGISTRY, case_id
            REGISTRY[case_id] = functools.partial(_build, builder, case_id, dtype)
        return builder
    return deco


def _build(builder: Callable[[str], Case], case_id: str, dtype: str) -> Case:
    c = builder(dtype)
    return dataclasses.replace(c, name=case_id, dtype=dtype)


def case_ids() -> list[str]:
    for module in MODULES:
        importlib.import_module(f"{__name__}.{module}")
    return list(REGISTRY)


def build(case_id: str) -> Case:
    if case_id not in REGISTRY:
        case_ids()
    return REGISTRY[case_id]()


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)
