"""The notebooks in colabs/ run top to bottom in a real Jupyter kernel, with their parameters cell shrunk to tiny
runs; and they are stored without outputs."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT, cli_env

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

# Appended to each notebook's `parameters` cell (the cell tagged "parameters", as papermill does).
SMALL = {
    "quickstart.ipynb": {"NUM_STEPS": 20, "EVAL_EVERY": 5},
    "finetune.ipynb": {"CONFIG": "configs/potential.py:tiny", "PRETRAIN_STEPS": 10, "FINETUNE_STEPS": 10,
                       "EVAL_EVERY": 5},
    "export_to_simulator.ipynb": {"CONFIG": "configs/potential.py:tiny", "NUM_STEPS": 20, "MD_STEPS": 50},
}
NOTEBOOKS = tuple(SMALL)
WORKDIRS = {"quickstart.ipynb": ["runs/quickstart"], "export_to_simulator.ipynb": ["runs/potential"],
            "finetune.ipynb": ["runs/finetune/cu_ni", "runs/finetune/cu_pd_finetuned", "runs/finetune/cu_pd_scratch"]}


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory) -> dict[str, str]:
    """The kernel's environment: one CPU device like a user's laptop; a python3 kernelspec installed if missing."""
    from jupyter_client.kernelspec import KernelSpecManager

    env = cli_env(MPLBACKEND="Agg")
    if "python3" not in KernelSpecManager().find_kernel_specs():
        prefix = tmp_path_factory.mktemp("jupyter")
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--prefix", str(prefix)], check=True)
        env["JUPYTER_PATH"] = str(prefix / "share" / "jupyter")
    return env


def parameters_cell(notebook) -> object:
    cells = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "a notebook needs exactly one cell tagged 'parameters'"
    return cells[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_top_to_bottom(name, kernel_env, tmp_path):
    notebook = nbformat.read(ROOT / "colabs" / name, as_version=4)
    overrides = SMALL[name]  # the workdirs stay as written: relative to the working directory, as users run them
    cell = parameters_cell(notebook)
    names = {line.split("=")[0].strip() for line in cell.source.splitlines() if "=" in line}
    cell.source += "\n# test_notebooks.py: tiny runs\n" + "\n".join(
        f"{k} = {v!r}" for k, v in overrides.items() if k in names)
    scratch = tmp_path / "cwd"  # the kernel's working directory: a clone's root, with its configs/
    scratch.mkdir()
    (scratch / "configs").symlink_to(ROOT / "configs")
    client = nbclient.NotebookClient(notebook, kernel_name="python3", timeout=300,
                                     resources={"metadata": {"path": str(scratch)}})
    client.execute(env=kernel_env)  # raises CellExecutionError naming the cell on the first error
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.output_type == "error"]
    assert not errors, errors
    text = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "trainkit: error" not in text and "Traceback" not in text, text[-3000:]
    for workdir in WORKDIRS[name]:  # relative workdirs landed under the working directory
        assert (scratch / workdir / "checkpoints" / "final").is_file(), workdir
    images = [o for c in notebook.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert images, "the notebook showed no plot"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_stored_without_outputs(name):
    notebook = nbformat.read(ROOT / "colabs" / name, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{name}: clear the outputs before committing"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_installs_trainkit_only_in_colab(name):
    notebook = nbformat.read(ROOT / "colabs" / name, as_version=4)
    first_code = next(c for c in notebook.cells if c.cell_type == "code").source
    assert 'if "google.colab" in sys.modules:' in first_code and "pip install" in first_code
    parameters_cell(notebook)
