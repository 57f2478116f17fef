"""Load an AOTInductor package only where it can run.

A package holds machine code for the machine it was compiled on: its CPU architecture, vector ISA (AVX2,
AVX-512) and the other instruction-set extensions of that CPU (AOTInductor compiles with -march=native), or its
CUDA compute capability. Loaded on a machine without them, `aoti_load_package` succeeds and the
first call dies of an illegal instruction. `load_package` compares the package's own record (its metadata
`AOTI_MACHINE`, `AOTI_CPU_ISA`, `AOTI_COMPUTE_CAPABILITY`, written by torch, and `trainkit.cpu_flags`) with
this process and refuses in one
line, naming the fix. The ISA this process may use honours `ATEN_CPU_CAPABILITY`, as torch's own kernels do.
The loaded package checks its inputs on every call (`CheckedPackage`).

This module imports torch and the standard library only: copy it into a service that has neither JAX nor
trainkit, or call `trainkit.export.runtime.load_package` (importing it imports nothing else of trainkit's).
"""

from __future__ import annotations

import json
import os
import platform
import re
from typing import Any


class PackageTargetError(RuntimeError):
    """The package was compiled for another machine than this one."""


CPU_FLAGS = "trainkit.cpu_flags"  # the package metadata key: the compiling CPU's instruction-set flags
# AOTInductor compiles with -march=native: every instruction-set extension of the compiling CPU may be used, not
# only the vector ISA torch records. These /proc/cpuinfo flags name the extensions a compiler targets.
_ISA_FLAG = re.compile(r"^(sse\w*|ssse3|avx\w*|fma\w*|f16c|bmi\d|adx|popcnt|lzcnt|abm|movbe|amx\w*|vnni\w*|"
                       r"sha_ni|aes|pclmulqdq|vaes|vpclmulqdq|gfni|asimd\w*|sve\w*|fp16|bf16|i8mm)$")


def cpu_flags() -> set[str]:
    """This CPU's instruction-set flags (Linux: /proc/cpuinfo), or an empty set where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return {flag for flag in line.split(":", 1)[1].split() if _ISA_FLAG.match(flag)}
    except OSError:
        pass
    return set()


def runnable_isas() -> list[str]:
    """The CPU vector ISAs this process can run, as torch names them in `AOTI_CPU_ISA` ("AVX512 AVX512_VNNI",
    "AVX2", ...): this CPU's, no wider than what `ATEN_CPU_CAPABILITY` allows; "" is the scalar fallback."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa, valid_vec_isa_list

    picked = pick_vec_isa()
    width = picked.bit_width() if picked else 0
    return [str(isa).upper() for isa in valid_vec_isa_list() if isa.bit_width() <= width] + [""]


def check_target(metadata: dict[str, str], name: str) -> None:
    """Raise `PackageTargetError` unless the package described by `metadata` can run in this process."""
    import torch

    fix = f"compile it again on this machine (python -m trainkit.export SOURCE -o {name})"
    machine = metadata.get("AOTI_MACHINE", "")
    if machine and machine != platform.machine():
        raise PackageTargetError(f"{name} was compiled for {machine} CPUs and this machine is {platform.machine()}; "
                                 f"{fix}")
    device = metadata.get("AOTI_DEVICE_KEY", "cpu")
    if device == "cpu":
        isa = metadata.get("AOTI_CPU_ISA", "").upper().replace("INVALID_VEC_ISA", "")
        runnable = runnable_isas()
        if isa not in runnable:
            here = ", ".join(r for r in runnable if r) or "no vector ISA"
            limit = os.environ.get("ATEN_CPU_CAPABILITY")
            why = f" (ATEN_CPU_CAPABILITY={limit})" if limit else ""
            raise PackageTargetError(f"{name} was compiled for {isa} CPUs and this process can run {here}{why}; "
                                     f"{fix}")
        here = cpu_flags()
        missing = sorted(set(metadata.get(CPU_FLAGS, "").split()) - here) if here else []
        if missing:
            raise PackageTargetError(f"{name} was compiled for a CPU with {' '.join(missing)} and this one has "
                                     f"not; {fix}")
    elif device == "cuda":
        wanted = metadata.get("AOTI_COMPUTE_CAPABILITY", "")
        if not torch.cuda.is_available():
            raise PackageTargetError(f"{name} was compiled for a CUDA GPU (compute capability {wanted}) and this "
                                     f"machine has none; {fix}")
        major, minor = torch.cuda.get_device_capability()
        if wanted and wanted != f"{major}{minor}":
            raise PackageTargetError(f"{name} was compiled for CUDA compute capability {wanted} and this GPU is "
                                     f"{major}{minor}; {fix}")


INPUTS = "trainkit.inputs"  # the package metadata key: JSON [{"name", "shape": [int | dim name], "dtype"}, ...]
DIMS = "trainkit.dims"  # the package metadata key: JSON {dim name: {"min": int, "max": int | None}}


class PackageInputError(RuntimeError):
    """An input that does not fit the package's signature."""


class CheckedPackage:
    """A loaded package that checks its inputs first. A package does not check them itself (torch's optional
    check, AOTI_RUNTIME_CHECK_INPUTS=1, also refuses sizes the program allows, from guards Inductor adds while
    tuning: a CNN traced at batch 2 refused batch 16), and reads an input of the wrong shape, dtype or strides
    as if it were right. Here each input must have its rank, its static sizes and the same size for the same
    dimension name, within the bounds; it is cast to the package's dtype and made contiguous. The signature is
    read from the package's metadata once, at load."""

    def __init__(self, runner: Any, name: str):
        import torch

        self.runner, self.name = runner, name
        metadata = runner.get_metadata()
        self.inputs = json.loads(metadata.get(INPUTS, "null"))
        self.dtypes = [getattr(torch, spec["dtype"]) for spec in self.inputs or []]
        self.bounds = {k: (v["min"], v["max"]) for k, v in json.loads(metadata.get(DIMS, "{}")).items()}

    def get_metadata(self) -> dict[str, str]:
        return self.runner.get_metadata()

    def __call__(self, *inputs: Any) -> Any:
        if self.inputs is None:  # a package not made by trainkit: as it is
            return self.runner(*inputs)
        if len(inputs) != len(self.inputs):
            raise PackageInputError(f"{self.name} takes {len(self.inputs)} inputs "
                                    f"({', '.join(i['name'] for i in self.inputs)}), got {len(inputs)}")
        sizes: dict[str, int] = {}
        ready = []
        for x, spec, dtype in zip(inputs, self.inputs, self.dtypes):
            shape = spec["shape"]
            if x.dim() != len(shape):
                raise PackageInputError(f"{self.name}: input '{spec['name']}' must have {len(shape)} dimensions "
                                        f"({shape}), got shape {list(x.shape)}")
            for axis, (want, got) in enumerate(zip(shape, x.shape)):
                if isinstance(want, int) and got != want:
                    raise PackageInputError(f"{self.name}: input '{spec['name']}' axis {axis} must have size "
                                            f"{want}, got {got}")
                if isinstance(want, str) and sizes.setdefault(want, got) != got:
                    raise PackageInputError(f"{self.name}: input '{spec['name']}' axis {axis} is '{want}', "
                                            f"{sizes[want]} in an earlier input, got {got}")
            ready.append(x.to(dtype).contiguous())
        for dim, n in sizes.items():
            lo, hi = self.bounds.get(dim, (1, None))
            if n < lo or (hi is not None and n > hi):
                raise PackageInputError(f"{self.name}: dimension '{dim}' is {n}, outside [{lo}, {hi or 'inf'}]")
        return self.runner(*ready)


def load_package(path: str | os.PathLike) -> CheckedPackage:
    """`torch._inductor.aoti_load_package(path)` after `check_target`, as a callable `runner(*inputs)` that
    checks its inputs (`CheckedPackage`)."""
    import torch

    runner = torch._inductor.aoti_load_package(os.fspath(path))
    name = os.path.basename(os.fspath(path))
    check_target(runner.get_metadata(), name)
    return CheckedPackage(runner, name)
