"""The export formats: one table, `FORMATS`, read by config validation, the export command and the end of training.

Adding a format is one row: a `Format` whose `write(task, params, path, spec) -> Report` writes the artifact to
`path` and checks it against JAX (on `spec.args`, against `spec.ref`, every output by name). This module imports
no JAX and no torch, so that `trainkit.config` can validate `export.formats` cheaply; each writer is imported on
first use.

    FORMATS["stablehlo"].suffix       # ".stablehlo"
    format_of("model.pt").name        # "pt"
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from trainkit.errors import TrainkitError

if TYPE_CHECKING:
    import numpy as np

    from trainkit.models import Task


@dataclasses.dataclass(frozen=True)
class Report:
    """An artifact's parity with JAX, as recorded in the sidecar: max |got - ref| and that over max |ref|;
    forces too for potentials; `tensors` for weight files (checked by read-back rather than by running)."""

    max_abs: float
    max_rel: float
    forces_max_abs: float | None = None
    forces_max_rel: float | None = None
    tensors: int | None = None

    @property
    def worst(self) -> float:
        """The relative error the tolerance is compared with: NaN (a NaN output or force) counts as infinite, so
        that it fails the gate whichever of the two it is in (`max` alone would drop a NaN second argument)."""
        errors = [self.max_rel, *([] if self.forces_max_rel is None else [self.forces_max_rel])]
        return math.inf if any(math.isnan(e) for e in errors) else max(errors)

    def as_dict(self) -> dict[str, float | int]:
        """The sidecar's `parity` entry: the fields that were measured, in declaration order."""
        return {f.name: v for f in dataclasses.fields(self) if (v := getattr(self, f.name)) is not None}


SCALE_FLOOR = 0.1  # outputs whose largest magnitude is below this are measured relative to it


def relative_error(ref: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """(max |got - ref|, that / max(max |ref|, SCALE_FLOOR)) in float64; NaNs in the same places count as equal,
    a NaN or inf where JAX is finite counts as an infinite error, and a different shape raises.

    The error is relative to the output's largest magnitude, so elements near zero do not blow it up; and to at
    least SCALE_FLOOR, so that an output that is ~0 everywhere (a saturated tanh) is not a false alarm at a
    rounding-level absolute error (an absolute tolerance of SCALE_FLOOR × the relative one).
    """
    import numpy as np

    ref64, got64 = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    if ref64.shape != got64.shape:
        raise TrainkitError(f"export parity: output shape {got64.shape} differs from JAX's {ref64.shape}")
    diff = np.where(np.isnan(got64) & np.isnan(ref64), 0.0, np.abs(got64 - ref64))
    diff = np.where(np.isnan(diff), np.inf, diff)
    err = float(diff.max(initial=0.0))
    finite = np.abs(ref64[np.isfinite(ref64)])
    return err, err / max(float(finite.max(initial=0.0)), SCALE_FLOOR)


@dataclasses.dataclass(frozen=True)
class ArtifactSpec:
    """What one artifact is written as and checked against, computed once per export."""

    file: str  # the final file name (the writer is handed a temporary path)
    metadata: Mapping[str, Any]  # the sidecar so far, for formats that embed it
    args: tuple[np.ndarray, ...]  # check inputs: their symbolic sizes differ from the tracing example's
    ref: Mapping[str, np.ndarray]  # JAX's outputs on `args` by name (the signature's), "forces" included
    # What the writer found out, for this artifact's sidecar entry (ARTIFACT_FACTS: an AOTInductor package's
    # target machine, a torch.export program's dims and control flow).
    facts: dict[str, Any] = dataclasses.field(default_factory=dict)


ARTIFACT_FACTS = ("dims", "control_flow", "target")


Writer = Callable[["Task", Any, Path, ArtifactSpec], Report]


@dataclasses.dataclass(frozen=True)
class Requirement:
    """An optional package a format needs, and the extra that installs it."""

    module: str
    name: str
    extra: str

    def installed(self) -> bool:
        return importlib.util.find_spec(self.module) is not None  # finds it without importing it


@dataclasses.dataclass(frozen=True)
class Format:
    name: str  # as in `export.formats` and in the sidecar's `artifacts`
    suffix: str  # the file name suffix that picks this format in `python -m trainkit.export SOURCE -o OUT`
    description: str  # shown in the error for an unknown suffix
    write: Writer
    needs: Requirement | None = None
    runs_model: bool = True  # False for weights: no forces output in the signature
    stem: str = "model"  # the file name at the end of training: W/export/<stem><suffix>

    @property
    def file_name(self) -> str:
        return self.stem + self.suffix

    def missing(self) -> Requirement | None:
        """The optional package this format needs and this environment lacks, or None."""
        return self.needs if self.needs is not None and not self.needs.installed() else None

    def require(self) -> None:
        if needs := self.missing():
            raise TrainkitError(f"exporting {self.suffix} needs {needs.name}: pip install 'trainkit[{needs.extra}]'")


def _imported(module: str, function: str) -> Writer:
    """`module.function`, imported at the first call (the writers import JAX or torch)."""

    def write(task: Task, params: Any, path: Path, spec: ArtifactSpec) -> Report:
        return getattr(importlib.import_module(module), function)(task, params, path, spec)

    return write


TORCH = Requirement("torch", "PyTorch", "torch")
METATOMIC = Requirement("metatomic.torch", "metatomic-torch", "metatomic")

FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("pt", ".pt", "TorchScript", _imported("trainkit.export.pt", "write_torchscript"), needs=TORCH),
    Format("stablehlo", ".stablehlo", "serialized jax.export",
           _imported("trainkit.export.stablehlo", "write_stablehlo")),
    Format("safetensors", ".safetensors", "weights", _imported("trainkit.export.safetensors", "write_safetensors"),
           runs_model=False),
    Format("metatomic", ".pt", "metatomic AtomisticModel, with --format metatomic",
           _imported("trainkit.export.metatomic", "write_metatomic"), needs=METATOMIC, stem="model-metatomic"),
    Format("pt2", ".pt2", "torch.export program", _imported("trainkit.export.pt2", "write_pt2"), needs=TORCH),
    Format("aoti", ".aoti.pt2", "AOTInductor package for this machine",
           _imported("trainkit.export.pt2", "write_aoti"), needs=TORCH),
)}


def format_named(name: str, out: str | Path) -> Format:
    """The format `--format NAME` asks for; OUT must have its suffix."""
    if name not in FORMATS:
        raise TrainkitError(f"unknown --format {name!r}; choose one of {', '.join(FORMATS)}")
    fmt = FORMATS[name]
    if not Path(out).name.endswith(fmt.suffix):
        raise TrainkitError(f"--format {name} writes a {fmt.suffix} file; name the output {Path(out).stem}{fmt.suffix}")
    return fmt


def format_of(out: str | Path) -> Format:
    """The format an output file name asks for, by its suffix (the longest that matches: `.aoti.pt2` before
    `.pt2`)."""
    for fmt in sorted(FORMATS.values(), key=lambda f: -len(f.suffix)):
        if Path(out).name.endswith(fmt.suffix):
            return fmt
    choices = [f"{f.suffix} ({f.description})" for f in FORMATS.values()]
    raise TrainkitError(f"cannot tell the export format of {out}: use a {', '.join(choices[:-1])} or {choices[-1]} "
                        "file name")
