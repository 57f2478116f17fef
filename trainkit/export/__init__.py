"""Standalone exports of trained models: TorchScript, torch.export / AOTInductor, StableHLO, safetensors.

Importing this package is light (no torch, no JAX): `from trainkit.export import to_torchscript` (a `.pt`) or
`to_torch_export` (a `.pt2`; `compile=True`: an AOTInductor package) loads the converter, and with it torch, on
first use. `trainkit.export.formats.FORMATS` is the one table of formats (suffix,
writer, what it needs); the writers are submodules (`pt`, `stablehlo`, `safetensors`), and
`trainkit.export.checkpoint` exports a checkpoint through that table.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainkit.export.torchscript import to_torch_export, to_torchscript

__all__ = ["to_torch_export", "to_torchscript"]


def __getattr__(name: str) -> Any:
    # PEP 562: a module attribute resolved on first access, so that `import trainkit.export` does not import torch.
    if name in __all__:
        return getattr(importlib.import_module("trainkit.export.torchscript"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
