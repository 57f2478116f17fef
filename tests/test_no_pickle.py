"""No pickle on any load path: every way trainkit reads a checkpoint or an export runs in a subprocess whose
`pickle.load`/`loads`/`Unpickler` (and `torch.load` without `weights_only=True`) raise and are logged, from a
`sitecustomize.py` that patches them at interpreter start-up. Each run must succeed with an empty log.

Covered: training, restore (resume in the workdir, --resume_from), --init_from a packed model.ckpt (unpack),
export to .pt/.stablehlo/.safetensors, every `ckpt` subcommand, loading each artifact as a user would, and the ASE
calculator on an exported potential.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, cli_env

GUARD = r'''
"""Installed by tests/test_no_pickle.py: unpickling anywhere in this interpreter raises and is logged."""
import importlib.abc
import importlib.machinery
import os
import pickle
import sys
import traceback

import _pickle

_LOG = os.environ["NO_PICKLE_LOG"]


def _record(what):
    with open(_LOG, "a") as f:
        f.write(f"{what} in {sys.argv}\n{''.join(traceback.format_stack(limit=12)[:-2])}\n")
    raise RuntimeError(f"{what} is forbidden here (tests/test_no_pickle.py)")


def _refuse(what, real):
    def refuse(*args, **kwargs):
        # The one exception: a multiprocessing.Queue between two threads of this process (tensorboardX hands its
        # events to its writer thread that way). Those bytes were pickled here a moment ago, never read from disk.
        if sys._getframe(1).f_code.co_filename.endswith(os.path.join("multiprocessing", "queues.py")):
            return real(*args, **kwargs)
        _record(what)
    return refuse


def _refusing(unpickler):
    """A subclass (libraries subclass Unpickler at import time) that cannot be constructed."""
    return type(unpickler.__name__, (unpickler,), {"__init__": lambda self, *a, **k: _record("pickle.Unpickler")})


for _module in (pickle, _pickle):
    for _name in ("load", "loads", "_load", "_loads"):
        if hasattr(_module, _name):
            setattr(_module, _name, _refuse(f"{_module.__name__}.{_name}", getattr(_module, _name)))
    for _name in ("Unpickler", "_Unpickler"):
        if hasattr(_module, _name):
            setattr(_module, _name, _refusing(getattr(_module, _name)))


class _TorchLoadGuard(importlib.abc.MetaPathFinder):
    """Wraps torch.load once torch is imported: anything but weights_only=True is refused."""

    def find_spec(self, name, path, target=None):
        if name != "torch":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_guard(module):
            exec_module(module)
            real_load = module.load

            def load(*args, **kwargs):
                if kwargs.get("weights_only") is not True:
                    _record(f"torch.load(weights_only={kwargs.get('weights_only')!r})")
                return real_load(*args, **kwargs)

            module.load = load

        spec.loader.exec_module = exec_and_guard
        return spec


sys.meta_path.insert(0, _TorchLoadGuard())
'''

SHORT = ("--config.num_steps=20", "--config.batch_size=32", "--config.log_every=10", "--config.eval_every=10",
         "--config.checkpoint.every=10", "--config.checkpoint.keep_last=5")
ALL_FORMATS = "--config.export.formats=('pt','stablehlo','safetensors')"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """Run a command with pickle refused; return the finished process and the log of refused calls."""
    root = tmp_path_factory.mktemp("no_pickle")
    (root / "guard").mkdir()
    (root / "guard" / "sitecustomize.py").write_text(GUARD)
    counter = iter(range(10**6))

    def run(*argv: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, str]:
        log = root / f"refused-{next(counter)}.log"
        env = cli_env(PYTHONPATH=f"{root / 'guard'}{os.pathsep}{ROOT}", NO_PICKLE_LOG=str(log),
                      TRAINKIT_CACHE=str(root / "cache"))
        proc = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
        return proc, log.read_text() if log.exists() else ""

    run.root = root
    return run


def assert_clean(result: tuple[subprocess.CompletedProcess, str]) -> subprocess.CompletedProcess:
    proc, refused = result
    assert refused == "", f"unpickling attempted:\n{refused}"
    assert proc.returncode == 0, f"{proc.args}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def test_the_guard_refuses_pickle_and_unsafe_torch_load(guarded):
    code = """
import io, pickle, numpy as np, torch
blob = pickle.dumps({"a": 1})
for attempt in (lambda: pickle.loads(blob), lambda: pickle.load(io.BytesIO(blob)),
                lambda: pickle.Unpickler(io.BytesIO(blob)).load(),
                lambda: np.load(io.BytesIO(b"not an npy file"), allow_pickle=True),
                lambda: torch.load(io.BytesIO(b"")), lambda: torch.load(io.BytesIO(b""), weights_only=False)):
    try:
        attempt()
    except Exception as e:
        print(type(e).__name__, str(e)[:60])
    else:
        raise SystemExit("not refused")
"""
    proc, refused = guarded("-c", code)
    assert proc.returncode == 0, proc.stderr
    for what in ("pickle.loads", "pickle.load", "pickle.Unpickler", "torch.load(weights_only=None)",
                 "torch.load(weights_only=False)"):
        assert what in refused, what


def train_args(workdir: Path, *extra: str, config: str = "configs/default.py") -> tuple[str, ...]:
    return ("-m", "trainkit.main", f"--config={config}", f"--workdir={workdir}", *SHORT, *extra)


@pytest.mark.slow
def test_every_load_path_runs_without_pickle(guarded):
    root = guarded.root
    w, pot = root / "W", root / "pot"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        trained = [pool.submit(guarded, *train_args(w, ALL_FORMATS)),
                   pool.submit(guarded, *train_args(pot, "--config.export.formats=('pt',)",
                                                    config="configs/potential.py:tiny"))]
        for future in trained:
            assert_clean(future.result())
    packed = w / "export" / "model.ckpt"
    out = root / "out"
    shutil.copytree(w, root / "W2")  # resumed while the other commands read W
    commands = {
        "restore in the workdir": train_args(root / "W2", ALL_FORMATS, "--config.num_steps=30"),
        "--resume_from": train_args(root / "resumed", "--config.num_steps=24", "--config.export.formats=()",
                                    f"--resume_from={w}/checkpoints/000010"),
        "--init_from a packed model.ckpt": train_args(root / "fine", "--config.num_steps=4",
                                                      "--config.export.formats=()", f"--init_from={packed}"),
        "export .pt": ("-m", "trainkit.export", str(w), "-o", str(out / "m.pt")),
        "export .stablehlo": ("-m", "trainkit.export", f"{w}/checkpoints/best", "-o", str(out / "m.stablehlo")),
        "export .safetensors of a packed file": ("-m", "trainkit.export", str(packed), "-o",
                                                 str(out / "m.safetensors")),
        "ckpt ls": ("-m", "trainkit.ckpt", "ls", str(w)),
        "ckpt inspect (unpacks)": ("-m", "trainkit.ckpt", "inspect", str(packed)),
        "ckpt verify": ("-m", "trainkit.ckpt", "verify", f"{w}/checkpoints/000010"),
        "ckpt diff": ("-m", "trainkit.ckpt", "diff", f"{w}/checkpoints/000020", str(packed)),
        "ckpt pack": ("-m", "trainkit.ckpt", "pack", f"{w}/checkpoints/000010", "-o", str(out / "p.ckpt")),
        "artifacts as users load them": ("-c", f"""
import json, numpy as np, torch
from safetensors.numpy import load_file
from trainkit.export.stablehlo import load_stablehlo
export = {str(w / 'export')!r}
sidecar = json.loads(open(export + "/model.json").read())
x = np.zeros([3 if d is None else d for d in sidecar["inputs"][0]["shape"]], sidecar["inputs"][0]["dtype"])
print(torch.jit.load(export + "/model.pt")(torch.from_numpy(x)).shape)
print(load_stablehlo(export + "/model.stablehlo").call(x).shape)
print(len(load_file(export + "/model.safetensors")))
"""),
        "ASE calculator": ("-c", f"""
from ase.build import bulk
from trainkit.ase import TorchScriptCalculator
atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(2)
atoms.rattle(0.05, seed=1)
atoms.calc = TorchScriptCalculator({str(pot / 'export' / 'model.pt')!r})
print(atoms.get_potential_energy(), abs(atoms.get_forces()).max())
"""),
    }
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = dict(zip(commands, pool.map(lambda argv: guarded(*argv), commands.values())))
    for name, result in results.items():
        proc = assert_clean(result)
        assert "Traceback" not in proc.stderr, (name, proc.stderr[-3000:])
    assert "start: workdir" in results["restore in the workdir"][0].stdout
    assert "start: resume_from" in results["--resume_from"][0].stdout
    assert "start: init_from" in results["--init_from a packed model.ckpt"][0].stdout
    assert {p.name for p in out.iterdir()} >= {"m.pt", "m.stablehlo", "m.safetensors", "p.ckpt"}


def test_package_source_never_unpickles():
    """Belt and braces: no pickle import, no pickled numpy, and any torch.load says weights_only=True."""
    offenders = []
    for path in sorted((ROOT / "trainkit").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if re.search(r"\b(import|from)\s+(c?pickle|_pickle|dill|cloudpickle|joblib|shelve)\b", code) \
                    or re.search(r"\b(c?pickle|dill|cloudpickle|joblib)\.(load|loads|Unpickler)\b", code) \
                    or "allow_pickle=True" in code:
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
            if "torch.load(" in code and "weights_only=True" not in code:
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()} (needs weights_only=True)")
    assert offenders == []
